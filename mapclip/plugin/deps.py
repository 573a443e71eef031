"""Missing dependencies: find them, say so, install them on request, check the result.

The engine needs torch, open_clip and rasterio (plus a few smaller packages)
in QGIS's own Python. When one cannot be found the plugin still loads, shows a
message-bar warning naming what is missing, and offers to install them with
pip into a plugin-owned folder, ``<QGIS profile>/python/mapclip-deps``.

How the folder stays consistent with QGIS:

- It goes to the **front** of ``sys.path``, so its copies win over older system
  copies (Debian's sympy 1.11 in ``/usr/lib/python3/dist-packages`` breaks
  torch's ``from sympy.core.numbers import equal_valued``).
- QGIS's own packages are **never** taken from it: ``pip install --target``
  installs every dependency, so after pip the installer deletes NumPy, GDAL
  (``osgeo``), PyQt5, sip and qgis from the folder (:data:`PROTECTED`), and
  :func:`add_deps_path` does the same for a folder left by an older installer.
- pip resolves against QGIS's **exact** NumPy version (``numpy==1.24.2`` on
  Debian 12), so every package it picks accepts the NumPy that QGIS and GDAL
  are built against. The exact pins of ``requirements.txt`` are kept for
  torch, torchvision and open_clip; the others become upper bounds
  (``faiss-cpu<=1.15.1``), so pip takes the tested release where QGIS's NumPy
  allows it and the newest older one otherwise.

The torch build is chosen honestly: the CPU build is pinned with its local
version (``torch==2.14.1+cpu``), which only the PyTorch CPU index has, so when
that index cannot be reached pip fails with a clear message instead of quietly
taking the default index's CUDA build (6 GB with triton and the nvidia
wheels). After pip, the installer reads which build it really installed
(``torch/version.py``) and imports the engine in a subprocess with the
``sys.path`` QGIS will have (the folder first), and names the module, the
error and a fix when that fails.

pip runs in a QProcess; its output drives a progress signal carrying
``(fraction or -1, text)``: bytes downloaded of the sizes pip has announced,
and the package being downloaded.
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse

from ..engine.core.errors import UsageError

#: import name -> pip name, for the packages whose absence stops the plugin
REQUIRED: Dict[str, str] = {"torch": "torch", "open_clip": "open_clip_torch",
                            "rasterio": "rasterio"}
#: requirements.txt entries that are for development only (pycocoevalcap: the demo
#: captioner's metrics, 100 MB of Java jars; ray: cluster builds from the command
#: line, which QGIS does not run), or that QGIS provides
NOT_FOR_QGIS = {"pytest", "pytest-qt", "numpy", "pycocoevalcap", "ray"}
#: requirements whose exact pin is kept (the engine is tested with these releases);
#: the other ``==`` pins become upper bounds so pip can match QGIS's NumPy
EXACT_PINS = {"torch", "torchvision", "open-clip-torch"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"
TORCH_PACKAGES = {"torch", "torchvision"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
#: the package QGIS imports the plugin as ("mapclip"), for the engine's import names
PACKAGE = (__package__ or "mapclip.plugin").rsplit(".", 1)[0]

#: distributions QGIS provides that must never come from the deps folder:
#: normalised distribution name -> the top-level import names it installs
PROTECTED: Dict[str, Tuple[str, ...]] = {
    "numpy": ("numpy", "numpy.libs"),
    "gdal": ("osgeo", "osgeo_utils"),
    "pyqt5": ("PyQt5",),
    "pyqt5-sip": ("PyQt5",),
    "pyqt5-qt5": ("PyQt5",),
    "sip": ("sip",),
    "qgis": ("qgis",),
}
#: what the installer imports to check the result (third-party, then the engine)
VERIFY_MODULES: Tuple[str, ...] = (
    "numpy", "torch", "torchvision", "torchvision.ops", "open_clip", "rasterio",
    "safetensors.torch", "cv2", "pyogrio", "faiss", "imagehash",
    f"{PACKAGE}.engine.raster.reader", f"{PACKAGE}.engine.model.encode", f"{PACKAGE}.engine.detect")
#: QGIS's own modules, imported after the packages when QGIS's Python has them:
#: they fail when a package in the folder breaks NumPy for GDAL
VERIFY_IF_PRESENT: Tuple[str, ...] = ("osgeo.gdal", "osgeo.gdal_array")
#: kept out of the check's Python as QGIS keeps them out of its own (runtime.block_triton)
VERIFY_BLOCK: Tuple[str, ...] = ("triton",)
VERIFY_MARKER = "MAPCLIP-VERIFY "

# A test or a user can force the "missing" path: MAPCLIP_PRETEND_MISSING=torch,rasterio
PRETEND_ENV = "MAPCLIP_PRETEND_MISSING"


def _norm(name: str) -> str:
    """A distribution name in PEP 503 normal form (open_clip_torch -> open-clip-torch)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
    except (OSError, ValueError):
        return False


def _inside(path: str, folder: str) -> bool:
    try:
        path = os.path.normcase(os.path.realpath(path))
        folder = os.path.normcase(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------- #
# The folder and sys.path
# --------------------------------------------------------------------------- #
def deps_dir() -> str:
    """The plugin-owned folder pip installs into (inside the QGIS profile)."""
    from qgis.core import QgsApplication
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "mapclip-deps")


def add_deps_path(path: Optional[str] = None) -> str:
    """Put the deps folder at the front of sys.path (its copies win over system ones).

    QGIS's own packages (:data:`PROTECTED`) that an older installer left in the
    folder are deleted first, so NumPy, GDAL, PyQt5 and qgis stay QGIS's.
    Returns the folder.
    """
    path = path or deps_dir()
    if not os.path.isdir(path):
        return path
    removed = prune_protected(path, only_provided_elsewhere=True)
    sys.path[:] = [p for p in sys.path if not (p and _same_path(p, path))]
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    early = loaded_elsewhere(path)
    if removed or early:
        try:
            from . import log
            if removed:
                log.info(f"removed QGIS's own packages from {path}: {', '.join(removed)}")
            if early:
                log.warning("imported before MapCLIP's folder was on the path, so these stay "
                            "the older copies until QGIS restarts: " +
                            ", ".join(f"{k} ({v})" for k, v in sorted(early.items())))
        except Exception:  # outside QGIS
            pass
    return path


def qgis_path(target: str, path: Optional[Sequence[str]] = None) -> List[str]:
    """sys.path as QGIS will have it after a restart: the deps folder first, then QGIS's entries."""
    path = sys.path if path is None else path
    rest = [p for p in path if p and not _same_path(p, target)]
    parent = os.path.dirname(ROOT)          # where the plugin package itself is found
    if not any(_same_path(p, parent) for p in rest):
        rest.append(parent)
    return [target, *rest]


def top_level_names(target: str) -> List[str]:
    """The importable top-level names in the folder (packages, modules, extension modules)."""
    out = set()
    try:
        entries = os.listdir(target)
    except OSError:
        return []
    for entry in entries:
        full = os.path.join(target, entry)
        if entry.startswith((".", "__")) or entry.endswith((".dist-info", ".egg-info", ".libs")):
            continue
        if os.path.isdir(full):
            if entry.isidentifier() and entry != "bin":
                out.add(entry)
        elif entry.endswith((".py", ".so", ".pyd")):
            name = entry.split(".", 1)[0]
            if name.isidentifier():
                out.add(name)
    return sorted(out)


def _dist_name(entry: str) -> str:
    """'numpy-1.24.2.dist-info' -> 'numpy'."""
    stem = entry.rsplit(".", 1)[0]
    return _norm(stem.split("-", 1)[0])


def provided_elsewhere(name: str, target: str, path: Optional[Sequence[str]] = None) -> bool:
    """QGIS's Python finds the top-level module ``name`` outside ``target``."""
    path = [p for p in (sys.path if path is None else path) if p and not _same_path(p, target)]
    try:
        return importlib.machinery.PathFinder.find_spec(name, path) is not None
    except (ImportError, ValueError):
        return False


def prune_protected(target: str, protected: Optional[Dict[str, Tuple[str, ...]]] = None,
                    only_provided_elsewhere: bool = False) -> List[str]:
    """Delete QGIS's own packages (NumPy, GDAL, PyQt5, sip, qgis) from the deps folder.

    ``pip install --target`` installs every dependency, whatever QGIS's Python
    already has, so NumPy lands in the folder. At the front of sys.path it
    would replace the NumPy that QGIS and GDAL are built against. Only
    entries inside ``target`` are touched. With ``only_provided_elsewhere``,
    a package is kept when QGIS's Python has no copy of its own (then the
    folder's copy is the only one). Returns the deleted entries (names
    relative to ``target``).
    """
    protected = PROTECTED if protected is None else protected
    if not os.path.isdir(target):
        return []
    names = set()
    dists = set()
    for dist, tops in protected.items():
        if only_provided_elsewhere and not any(provided_elsewhere(t, target) for t in tops
                                               if t.isidentifier()):
            continue
        dists.add(dist)
        names.update(tops)
    removed: List[str] = []
    scripts = set()
    entries = sorted(os.listdir(target))
    infos = [e for e in entries
             if e.endswith((".dist-info", ".egg-info")) and _dist_name(e) in dists]
    for entry in infos:                 # what the protected distributions installed
        record = os.path.join(target, entry, "RECORD")
        if not os.path.isfile(record):
            continue
        with open(record, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                rel = line.split(",", 1)[0].strip().replace("\\", "/")
                if rel.startswith("../"):
                    if "/bin/" in f"/{rel}" or "/Scripts/" in f"/{rel}":
                        scripts.add(rel.rsplit("/", 1)[-1])          # e.g. f2py
                    continue
                top = rel.split("/", 1)[0]
                if top in ("", "bin", "__pycache__", ".."):
                    continue
                if "/" not in rel and top.endswith((".py", ".so", ".pyd")):
                    top = top.split(".", 1)[0]
                names.add(top)
    for entry in entries:
        full = os.path.join(target, entry)
        base = entry
        if os.path.isfile(full) and entry.endswith((".py", ".so", ".pyd")):
            base = entry.split(".", 1)[0]
        if entry in infos or base in names or entry in names:
            _remove(full)
            removed.append(entry)
    for folder in ("bin", "Scripts"):          # pip --target puts scripts there
        for script in sorted(scripts):
            for cand in (script, script + ".exe"):
                full = os.path.join(target, folder, cand)
                if os.path.isfile(full):
                    _remove(full)
                    removed.append(f"{folder}/{cand}")
    if removed:
        importlib.invalidate_caches()
    return removed


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def loaded_elsewhere(target: str) -> Dict[str, str]:
    """Packages in the folder that this Python has already imported from somewhere else.

    Those stay the old copies until QGIS restarts (a module is imported once).
    """
    out = {}
    for name in top_level_names(target):
        module = sys.modules.get(name)
        where = _module_location(module)
        if where and not _inside(where, target):
            out[name] = where
    return out


def _module_location(module) -> Optional[str]:
    if module is None:
        return None
    where = getattr(module, "__file__", None)
    if not where:
        paths = list(getattr(module, "__path__", []) or [])
        where = paths[0] if paths else None
    return where


# --------------------------------------------------------------------------- #
# What is missing
# --------------------------------------------------------------------------- #
def missing_modules(required: Optional[Dict[str, str]] = None) -> List[str]:
    """Import names in ``required`` that QGIS's Python cannot find (cheap: no import)."""
    required = REQUIRED if required is None else required
    pretend = {m.strip() for m in os.environ.get(PRETEND_ENV, "").split(",") if m.strip()}
    out = []
    for name in required:
        if name in pretend:
            out.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def missing_message(missing: Sequence[str]) -> str:
    names = ", ".join(f"{m} ({REQUIRED.get(m, m)})" if REQUIRED.get(m, m) != m else m
                      for m in missing)
    return (f"MapCLIP needs Python packages that QGIS cannot find: {names}. "
            f"Searching is disabled until they are installed.")


# --------------------------------------------------------------------------- #
# The pip command
# --------------------------------------------------------------------------- #
def read_requirements(path: str = REQUIREMENTS) -> List[str]:
    """Runtime requirement lines from requirements.txt (dev-only and numpy left out)."""
    if not os.path.isfile(path):
        return [REQUIRED[m] for m in REQUIRED]
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = re.split(r"[<>=!~\[; ]", line, 1)[0].strip().lower()
            if name in NOT_FOR_QGIS:
                continue
            out.append(line)
    return out


def _split_requirement(line: str) -> Tuple[str, str]:
    """'torch==2.14.1' -> ('torch', '==2.14.1'); the name as written."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", line)
    return (m.group(1), m.group(2).strip()) if m else (line.strip(), "")


def installer_requirements(lines: Sequence[str], torch_local: Optional[str] = None) -> List[str]:
    """requirements.txt lines as the installer passes them to pip.

    - torch, torchvision, open_clip_torch keep their exact pins; torch and
      torchvision get the build's local version (``torch==2.14.1+cpu``) when
      ``torch_local`` is given, which only the PyTorch index of that build has.
    - every other ``==`` pin becomes ``<=``: pip prefers the newest release, so
      it takes the pinned one unless that one needs a newer NumPy than QGIS's.
    """
    out = []
    for line in lines:
        name, spec = _split_requirement(line)
        norm = _norm(name)
        m = re.fullmatch(r"==\s*([^\s,;]+)", spec)
        if m and norm in EXACT_PINS:
            version = m.group(1)
            if torch_local and norm in TORCH_PACKAGES and "+" not in version:
                version = f"{version}+{torch_local}"
            out.append(f"{name}=={version}")
        elif m:
            out.append(f"{name}<={m.group(1)}")
        else:
            out.append(line.strip())
    return out


def qgis_numpy_version() -> Optional[str]:
    """The NumPy version QGIS's Python runs (the imported one if any), or None without NumPy."""
    module = sys.modules.get("numpy")
    version = getattr(module, "__version__", None) if module is not None else None
    if version:
        return str(version)
    try:
        from importlib.metadata import version as _v
        return _v("numpy")
    except Exception:
        return None


def numpy_pin(version: Optional[str] = None) -> str:
    """The NumPy requirement that keeps pip on QGIS's NumPy: its exact version.

    Every package pip picks must then accept the NumPy that QGIS and GDAL are
    built against; the NumPy pip puts into the folder is deleted afterwards
    (:func:`prune_protected`). Without a known version: ``numpy<2``.
    """
    if version is None:
        version = qgis_numpy_version() or ""
    version = version.split("+", 1)[0].strip()
    if re.fullmatch(r"\d+(\.\d+)*([a-z]+\d*)?(\.post\d+)?", version or ""):
        return f"numpy=={version}"
    return "numpy<2"


def has_cuda(platform: Optional[str] = None) -> bool:
    """An NVIDIA driver is present (nvidia-smi on PATH, or in its Windows place)."""
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return False
    if shutil.which("nvidia-smi"):
        return True
    win = os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvidia-smi.exe")
    return platform.startswith("win") and os.path.isfile(win)


@dataclass
class TorchChoice:
    """Which torch build to ask for, from where, and how strictly."""

    build: str                    # "CPU", "CUDA" or "macOS" (PyPI's CPU/MPS build)
    index: Optional[str]          # extra index for torch/torchvision, None: pip's default only
    local: Optional[str]          # local version pinned (cpu): only that index has it


def torch_choice(cuda: bool, platform: Optional[str] = None,
                 torch_index: Optional[str] = None) -> TorchChoice:
    """The torch build for this machine.

    - macOS: PyPI's torch (CPU and Apple MPS; there is no CUDA build).
    - NVIDIA driver: the CUDA index; PyPI's Linux torch is a CUDA build too.
    - otherwise: ``+cpu`` builds from the CPU index, pinned by their local
      version so an unreachable index fails instead of falling back to the
      default index's CUDA build.
    """
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return TorchChoice("macOS", torch_index, None)
    if cuda:
        return TorchChoice("CUDA", torch_index or TORCH_CUDA_INDEX, None)
    return TorchChoice("CPU", torch_index or TORCH_CPU_INDEX, "cpu")


def pip_version() -> Tuple[int, ...]:
    """The version of pip in this Python (the one that runs the install), or () when unknown."""
    try:
        from importlib.metadata import version as _v
        return tuple(int(p) for p in re.findall(r"\d+", _v("pip"))[:2])
    except Exception:
        return ()


def pip_wheel() -> Optional[str]:
    """A pip wheel that QGIS's Python can run pip from when it has no pip module.

    ensurepip's bundled wheel, or Debian's python3-pip-whl
    (``/usr/share/python-wheels``, a dependency of python3-venv).
    """
    folders = []
    try:
        import ensurepip
        folders.append(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"))
    except Exception:
        pass
    folders.append("/usr/share/python-wheels")
    for folder in folders:
        try:
            wheels = [f for f in os.listdir(folder)
                      if re.fullmatch(r"pip-[\d.]+-py3-none-any\.whl", f)]
        except OSError:
            continue
        if wheels:
            wheels.sort(key=lambda f: [int(x) for x in re.findall(r"\d+", f)])
            return os.path.join(folder, wheels[-1])
    return None


def python_program() -> str:
    """QGIS's Python as a program, for pip and the check after it: the engine's one finder
    (engine.core.interpreter.qgis_python: the running interpreter, checked by running it,
    never merely the first Python on PATH). A UsageError, with the hand-install command,
    where there is none."""
    from ..engine.core.interpreter import qgis_python
    found = qgis_python()
    if found.path is None:
        raise UsageError(
            f"the installer runs pip with QGIS's own Python, and {found.why_none()}",
            "start QGIS without another Python (pyenv, conda, a virtual environment) first on "
            "PATH and install again, or install the packages by hand with QGIS's Python: "
            f"{hand_install_command('python3', deps_dir(), read_requirements())}")
    return found.path


def hand_install_command(python: str, target: str, packages: Sequence[str],
                         index_args: Sequence[str] = ()) -> str:
    """The pip command line that installs ``packages`` into ``target`` by hand, quoted for
    this system's shell."""
    import shlex
    cmd = [python, "-m", "pip", "install", "--target", target, *index_args, *packages]
    if sys.platform.startswith("win"):
        return subprocess.list2cmdline(cmd)
    return shlex.join(cmd)


@dataclass
class PipPlan:
    """One pip invocation: program, arguments, and why it looks like that."""

    program: str
    args: List[str]
    target: str
    cuda: bool
    packages: List[str] = field(default_factory=list)
    #: the torch build asked for ("CPU", "CUDA", "macOS") and the index it comes from
    torch_build: str = ""
    torch_index: Optional[str] = None
    #: QGIS's NumPy that pip resolved against ("" when QGIS has none)
    numpy_version: str = ""
    #: extra environment for pip (a value of None removes the variable)
    env: Dict[str, Optional[str]] = field(default_factory=dict)
    #: QGIS's distributions deleted from the folder after pip (see PROTECTED)
    protected: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: dict(PROTECTED))
    #: the result check: modules imported, in a Python whose sys.path is verify_path
    verify_modules: List[str] = field(default_factory=lambda: list(VERIFY_MODULES))
    verify_if_present: List[str] = field(default_factory=lambda: list(VERIFY_IF_PRESENT))
    verify_path: Optional[List[str]] = None
    verify_timeout_s: int = 300

    def command(self) -> List[str]:
        return [self.program, *self.args]

    def indexes(self) -> List[Tuple[str, str]]:
        """(what it is, URL) of each index pip asks: the package index, then PyTorch's."""
        def after(flag):
            return self.args[self.args.index(flag) + 1] if flag in self.args else None
        out = [("the package index", after("--index-url") or PYPI_INDEX)]
        if after("--extra-index-url"):
            out.append((f"the PyTorch {self.torch_build or 'CPU'} wheel index",
                        after("--extra-index-url")))
        return out

    def hand_command(self, packages: Optional[Sequence[str]] = None,
                     indexes: Optional[Sequence[str]] = None) -> str:
        """The pip command line that does this install by hand (``packages`` and ``indexes``
        default to the plan's own)."""
        urls = [u for _, u in self.indexes()] if indexes is None else list(indexes)
        index_args = ["--index-url", urls[0]] if urls and urls[0] != PYPI_INDEX else []
        for url in urls[1:]:
            index_args += ["--extra-index-url", url]
        return hand_install_command(self.program, self.target,
                                    self.packages if packages is None else packages, index_args)

    def summary(self) -> str:
        """What the install will do, in one line for the message bar."""
        where = f" from {self.torch_index}" if self.torch_index else ""
        build = {"CPU": "CPU torch", "CUDA": "CUDA torch",
                 "macOS": "torch for macOS"}.get(self.torch_build, "torch")
        return f"installing MapCLIP's packages into {self.target} ({build}{where})…"


def pip_plan(target: Optional[str] = None, cuda: Optional[bool] = None,
             numpy_version: Optional[str] = None, python: Optional[str] = None,
             requirements: Optional[Sequence[str]] = None, *,
             platform: Optional[str] = None, index_url: Optional[str] = None,
             torch_index: Optional[str] = None, pip: Optional[Tuple[int, ...]] = None,
             env: Optional[Dict[str, Optional[str]]] = None,
             verify_modules: Optional[Sequence[str]] = None,
             verify_path: Optional[Sequence[str]] = None,
             wheel: Optional[str] = None) -> PipPlan:
    """The pip command that installs the engine's packages into ``target``.

    ``index_url`` replaces pip's default index (tests use a local one);
    ``torch_index`` replaces the PyTorch index of the chosen build;
    ``numpy_version`` is QGIS's NumPy (``""``: QGIS has none, so NumPy stays
    in the folder). ``verify_path`` is the sys.path the check after pip
    uses (default: this Python's, with the folder first). ``wheel`` is a pip
    wheel to run pip from (``PYTHONPATH``); by default one is used when this
    Python has no pip module (Debian without python3-pip).
    """
    target = target or deps_dir()
    platform = sys.platform if platform is None else platform
    cuda = has_cuda(platform) if cuda is None else cuda
    choice = torch_choice(cuda, platform, torch_index)
    lines = list(requirements) if requirements is not None else read_requirements()
    packages = installer_requirements(lines, choice.local)
    if numpy_version is None:
        numpy_version = qgis_numpy_version() or ""
    protected = dict(PROTECTED)
    if numpy_version:
        packages.append(numpy_pin(numpy_version))
    else:                              # QGIS's Python has no NumPy: the folder's is the only one
        protected.pop("numpy", None)
    env = dict(env or {})
    if wheel is None and python is None and importlib.util.find_spec("pip") is None:
        wheel = pip_wheel()
    if wheel:
        env["PYTHONPATH"] = wheel
        m = re.search(r"pip-(\d+)\.(\d+)", os.path.basename(wheel))
        pip = pip if pip is not None else (tuple(int(x) for x in m.groups()) if m else ())
    pip = pip_version() if pip is None else pip
    if pip >= (24, 1):
        progress = "raw"                 # "Progress <bytes> of <total>" lines
    else:                                # pip's rich bar, drawn into the pipe when forced
        progress = "on"
        env.setdefault("FORCE_COLOR", "1")
        env.setdefault("COLUMNS", "200")
    args = ["-m", "pip", "install", "--upgrade", "--target", target, "--no-input",
            "--disable-pip-version-check", "--no-warn-script-location", "--prefer-binary",
            "--progress-bar", progress]
    if index_url:
        args += ["--index-url", index_url]
    if choice.index:
        args += ["--extra-index-url", choice.index]
    args += packages
    plan = PipPlan(python or python_program(), args, target, choice.build == "CUDA", packages,
                   torch_build=choice.build, torch_index=choice.index,
                   numpy_version=numpy_version.split("+", 1)[0], env=env, protected=protected)
    if verify_modules is not None:
        plan.verify_modules = list(verify_modules)
    if verify_path is not None:
        plan.verify_path = list(verify_path)
    return plan


# --------------------------------------------------------------------------- #
# Explaining failures
# --------------------------------------------------------------------------- #
_FAILURES = (
    (("ProxyError", "407 Proxy", "Tunnel connection failed", "Cannot connect to proxy"),
     "pip could not get through the proxy. Set HTTPS_PROXY (user:password@host:port) in "
     "Settings > Options > System > Environment, or in QGIS's network proxy settings, and retry."),
    (("Temporary failure in name resolution", "Name or service not known",
      "Failed to establish a new connection", "Network is unreachable", "No route to host",
      "getaddrinfo failed", "Connection refused", "timed out", "ConnectTimeoutError"),
     "pip could not reach the package index (no network?). Connect this machine to the "
     "internet, or install the packages listed in MapCLIP's requirements.txt into QGIS's "
     "Python by hand."),
    (("Permission denied", "[Errno 13]", "EACCES", "Access is denied"),
     "pip could not write to the install folder (permissions). Check that your user can "
     "write to it, or install the packages by hand as an administrator."),
    (("No space left on device", "[Errno 28]"),
     "the disk is full: torch needs several GB. Free space and retry."),
    (("No matching distribution found", "Could not find a version that satisfies"),
     "pip found no build of a package for this Python/OS. Check that QGIS's Python "
     "version is supported by torch, or install a matching torch by hand."),
    (("No module named pip",),
     "QGIS's Python has no pip. Install it (e.g. python3-pip on Debian/Ubuntu, or the "
     "OSGeo4W pip package on Windows) and retry."),
)
_CONNECT = ("Failed to establish a new connection", "Connection refused", "timed out",
            "Temporary failure in name resolution", "Name or service not known",
            "Network is unreachable", "No route to host", "getaddrinfo failed",
            "ConnectTimeoutError", "ProxyError", "Max retries exceeded")


#: pip's default index, and the host its files come from
PYPI_INDEX = "https://pypi.org/simple"
PYPI_FILES = "files.pythonhosted.org"


def _hosts(line: str) -> List[str]:
    """Host names a line of pip's output mentions (host='...' and URLs)."""
    return re.findall(r"host='([^']+)'", line) + re.findall(r"https?://([^/\s:'\"]+)", line)


def _index_failure(output: str, plan: Optional[PipPlan],
                   probe: Optional[Callable[[str], Optional[str]]]) -> Optional[str]:
    """pip could not connect to some of the plan's indexes: which failed, which answered,
    the exact command to install by hand and the folder it installs into."""
    if plan is None:
        return None
    failed_hosts = {h for line in output.splitlines() if any(c in line for c in _CONNECT)
                    for h in _hosts(line)}
    if not failed_hosts:
        return None
    failed, answered, hosts = [], [], []
    for label, url in plan.indexes():
        host = urlparse(url).hostname or url
        files = {host} | ({PYPI_FILES} if url == PYPI_INDEX else set())
        if files & failed_hosts:
            failed.append(f"{host} ({label}, {url})")
            hosts.append(host)
        elif probe is not None and probe(url) is None:
            answered.append(f"{host} ({label})")
    if not failed:
        return None
    cause = f"pip could not connect to {' or '.join(failed)}"
    cause += f"; {', '.join(answered)} answered." if answered else " (no network?)."
    return (f"{cause} Nothing was installed. Fix: make {' and '.join(hosts)} reachable from this machine "
            f"(proxy: set HTTPS_PROXY in Settings > Options > System > Environment) and install "
            f"again, or install by hand: {plan.hand_command()} (target folder: {plan.target})")


def index_error(url: str, timeout: float = 4.0) -> Optional[str]:
    """Why ``url`` (a package index) cannot be fetched, or None when it answers.

    Uses the same proxy variables as pip (HTTPS_PROXY...). Only called after
    pip failed to find the torch build, to say which of the two it was.
    """
    import urllib.error
    import urllib.request
    probe = url.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as resp:
            resp.read(1)
        return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except Exception as exc:  # URLError, socket errors, timeouts
        reason = getattr(exc, "reason", None) or exc
        return f"{type(reason).__name__}: {reason}"


def _torch_pin_failure(output: str, plan: Optional[PipPlan],
                       probe: Optional[Callable[[str], Optional[str]]]) -> Optional[str]:
    """The PyTorch index of the chosen build could not serve torch: say so, never fall back."""
    m = re.search(r"No matching distribution found for (torch(?:vision)?)\s*==\s*([^\s]+)", output)
    if not m or plan is None or not plan.torch_index:
        return None
    pin = f"{m.group(1)}=={m.group(2)}"
    index = plan.torch_index
    parts = urlparse(index)
    marks = [p for p in (parts.hostname, parts.path.rstrip("/") + "/" if parts.path.strip("/")
                         else None) if p]
    failed = [line for line in output.splitlines()
              if any(mk in line for mk in marks) and any(c in line for c in _CONNECT)]
    why = None
    if failed:
        why = "connection failed"
    elif probe is not None:
        why = probe(index)
    build = plan.torch_build or "CPU"
    if why:
        cause = (f"pip could not reach the PyTorch {build} wheel index ({index}: {why}), the "
                 f"only place that has {pin}. Nothing was installed: MapCLIP does not fall back "
                 f"to the default index, whose torch for Linux is the CUDA build (about 6 GB "
                 f"with triton and the nvidia libraries).")
    else:
        cause = (f"the PyTorch {build} wheel index ({index}) has no {pin} for this Python and "
                 f"OS. Nothing was installed.")
    fix = (f"Fix: make {parts.hostname or index} reachable from this machine (proxy: set "
           f"HTTPS_PROXY in Settings > Options > System > Environment) and install again, or "
           f"install it by hand: {plan.hand_command([pin], [index])} (target folder: "
           f"{plan.target})")
    return f"{cause} {fix}"


def explain_failure(output: str, exit_code: int, plan: Optional[PipPlan] = None,
                    probe: Optional[Callable[[str], Optional[str]]] = index_error) -> str:
    """One clear sentence for a failed pip run, from its output.

    With the ``plan``, a torch build pip could not find is explained (the
    PyTorch index unreachable, checked with ``probe``, or without that build).
    """
    torch = _torch_pin_failure(output, plan, probe) or _index_failure(output, plan, probe)
    if torch:
        return torch
    m = re.search(r"No matching distribution found for numpy\s*==\s*([^\s]+)", output)
    if m:
        return (f"pip looks for QGIS's exact NumPy ({m.group(1)}) so that every package it "
                f"picks works with it, and the package index has no NumPy {m.group(1)} for "
                f"this Python. Fix: install MapCLIP's packages by hand with a NumPy pin your "
                f"index has and that QGIS accepts (same major version), then delete the numpy "
                f"folder that pip puts into {plan.target if plan else 'the MapCLIP folder'}.")
    for needles, text in _FAILURES:
        if any(n.lower() in output.lower() for n in needles):
            return text
    tail = " | ".join(l.strip() for l in output.strip().splitlines()[-3:] if l.strip())
    return f"pip failed (exit code {exit_code}): {tail or 'no output'}"


# --------------------------------------------------------------------------- #
# Progress from pip's output
# --------------------------------------------------------------------------- #
_UNITS = {"bytes": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
_SIZE = r"\(\s*([\d.,]+)\s*(bytes|[kKMG]i?B)\s*\)"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_RE_COLLECT = re.compile(r"^Collecting\s+(.+?)\s*$")
_RE_DOWNLOAD = re.compile(r"^\s*Downloading\s+(\S+)(?:\s+" + _SIZE + r")?")
_RE_CACHED = re.compile(r"^\s*Using cached\s+(\S+)(?:\s+" + _SIZE + r")?")
#: pip >= 24.1, --progress-bar raw
_RE_RAW = re.compile(r"^\s*Progress\s+(\d+)\s+of\s+(\d+)\s*$")
#: pip's rich progress bar (forced on with FORCE_COLOR): "━━━━━╸━━━━ 84.3/184.5 MB 9.1 MB/s eta 0:00:11"
_RE_BAR = re.compile(r"(?:^|\s)([\d,]+(?:\.\d+)?)/([\d,]+(?:\.\d+)?)\s*(bytes|[kMG]B)\b")
_RE_INSTALLING = re.compile(r"^Installing collected packages:\s*(.*)$")
_RE_DONE = re.compile(r"^Successfully installed\s+(.*)$")
_RE_BUILD = re.compile(r"^\s*Building wheel for\s+(\S+)")


def strip_ansi(line: str) -> str:
    return _ANSI.sub("", line)


def human_size(n: float) -> str:
    """Bytes the way pip writes them: 536 kB, 184.5 MB, 6.12 GB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e4:
        return f"{int(n / 1e3)} kB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{int(n)} bytes"


def _bytes(value: str, unit: str) -> float:
    return float(value.replace(",", "")) * _UNITS[unit.lower()]


def file_label(url: str) -> str:
    """'https://…/torch-2.14.1%2Bcpu-cp311-…whl' -> 'torch 2.14.1+cpu'."""
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1] if "://" in url else
                   url.replace("\\", "/").rsplit("/", 1)[-1])
    if name.endswith(".whl"):
        parts = name[:-4].split("-")
        if len(parts) >= 2:
            return f"{parts[0]} {parts[1]}"
    for ext in (".tar.gz", ".tar.bz2", ".zip", ".tgz"):
        if name.endswith(ext):
            stem = name[:-len(ext)]
            if "-" in stem:
                pkg, ver = stem.rsplit("-", 1)
                return f"{pkg} {ver}"
            return stem
    return name


def shorten(text: str, limit: int = 110) -> str:
    """Cut ``text`` at a word boundary after its first two words (the verb and the package).

    A single word longer than the room left is cut hard, so the package name
    that starts it stays readable.
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    words = text.split(" ")
    keep = len(words[0]) + 1 + len(words[1]) if len(words) > 1 else len(words[0])
    cut = text.rfind(" ", 0, limit - 1)
    if cut < keep:
        return text[:limit - 1] + "…"
    return text[:cut].rstrip(",;:") + "…"


class PipProgress:
    """Turns pip's output lines into (fraction, text).

    The fraction is the share of the file in flight that has arrived, from
    pip's own byte counts (its progress bar, or ``Progress <bytes> of
    <total>`` with pip >= 24.1), or -1 where pip gives no measure (resolving,
    unpacking, building). Texts start with what is happening and the package,
    then the running totals: the file's number and the bytes downloaded so far.
    """

    def __init__(self):
        self.collected = 0
        self.files = 0
        self.done = 0.0           # bytes of finished downloads
        self.current: Optional[Tuple[str, float]] = None
        self.current_bytes = 0.0
        self.installing: List[str] = []
        self.installed: List[str] = []

    def _finish_current(self) -> None:
        if self.current is not None:
            self.done += max(self.current[1], self.current_bytes)
            self.current = None
            self.current_bytes = 0.0

    def _so_far(self) -> str:
        total = self.done + self.current_bytes
        return f" · file {self.files}, {human_size(total)} downloaded so far" if total else ""

    def _bytes_event(self, cur: float, total: float) -> Optional[Tuple[float, str]]:
        if self.current is None:
            return None
        name, size = self.current
        if total > 0 and size <= 0:          # pip did not print the size on the line before
            size = total
            self.current = (name, size)
        self.current_bytes = min(cur, size) if size > 0 else cur
        fraction = self.current_bytes / size if size > 0 else -1.0
        return fraction, shorten(f"downloading {name}: {human_size(self.current_bytes)} of "
                                 f"{human_size(size)}{self._so_far()}")

    def feed(self, line: str) -> Optional[Tuple[float, str]]:
        line = strip_ansi(line).rstrip()
        m = _RE_RAW.match(line)
        if m:
            return self._bytes_event(float(m.group(1)), float(m.group(2)))
        m = _RE_COLLECT.match(line)
        if m:
            self._finish_current()
            self.collected += 1
            return -1.0, shorten(f"collecting {m.group(1)} "
                                 f"(requirements so far: {self.collected})")
        m = _RE_DOWNLOAD.match(line) or _RE_CACHED.match(line)
        if m:
            self._finish_current()
            cached = line.lstrip().startswith("Using cached")
            name = file_label(m.group(1))
            size = _bytes(m.group(2), m.group(3)) if m.group(2) else 0.0
            self.files += 1
            sized = f" ({human_size(size)})" if size else ""
            if cached:
                return -1.0, shorten(f"using cached {name}{sized}")
            self.current = (name, size)
            # pip draws its bar (and so counts bytes) for files over 40 kB only
            fraction = 0.0 if size > 40e3 else -1.0
            return fraction, shorten(f"downloading {name}{sized}{self._so_far()}")
        m = _RE_BAR.search(line)
        if m and self.current is not None:
            unit = m.group(3)
            return self._bytes_event(_bytes(m.group(1), unit), _bytes(m.group(2), unit))
        m = _RE_BUILD.match(line)
        if m:
            self._finish_current()
            return -1.0, shorten(f"building {m.group(1)} from source (this can take minutes)")
        m = _RE_INSTALLING.match(line)
        if m:
            self._finish_current()
            self.installing = [n.strip() for n in m.group(1).split(",") if n.strip()]
            names = ", ".join(self.installing)
            return -1.0, shorten(f"unpacking {len(self.installing)} packages into the folder: "
                                 f"{names}")
        m = _RE_DONE.match(line)
        if m:
            self._finish_current()
            self.installed = m.group(1).split()
            got = f" ({human_size(self.done)} downloaded)" if self.done else ""
            return 1.0, shorten(f"pip installed {len(self.installed)} packages{got}")
        return None


def progress_line(line: str) -> Optional[str]:
    """A short status for a pip output line worth showing, else None."""
    got = PipProgress().feed(line)
    return got[1] if got else None


# --------------------------------------------------------------------------- #
# The result: which torch, and does the engine import with QGIS's sys.path
# --------------------------------------------------------------------------- #
@dataclass
class TorchBuild:
    version: str
    cuda: Optional[str]

    def describe(self) -> str:
        return f"torch {self.version} ({'CUDA ' + self.cuda if self.cuda else 'CPU'} build)"


def torch_build(target: str) -> Optional[TorchBuild]:
    """Which torch build is in the folder, from torch/version.py (no import)."""
    path = os.path.join(target, "torch", "version.py")
    if not os.path.isfile(path):
        return None
    values: Dict[str, object] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = re.match(r"^(__version__|cuda)\s*(?::[^=]*)?=\s*(.+?)\s*$", line)
            if m:
                try:
                    values[m.group(1)] = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    values[m.group(1)] = m.group(2).strip("'\"")
    cuda = values.get("cuda")
    return TorchBuild(str(values.get("__version__", "?")), str(cuda) if cuda else None)


VERIFY_SCRIPT = r'''
import importlib, importlib.util, json, sys, traceback
cfg = json.loads(sys.argv[1])
sys.path[:] = cfg["path"]
for name in cfg.get("block", []):
    sys.modules[name] = None
importlib.invalidate_caches()
out = {"imported": {}, "errors": [], "skipped": [], "loaded": {}, "versions": {}}
for name in cfg["modules"] + cfg["if_present"]:
    if name in cfg["if_present"]:
        try:
            present = importlib.util.find_spec(name.split(".")[0]) is not None
        except Exception:
            present = False
        if not present:
            out["skipped"].append(name)
            continue
    sys.stderr.write("importing " + name + "\n")
    sys.stderr.flush()
    try:
        mod = importlib.import_module(name)
        out["imported"][name] = getattr(mod, "__file__", None)
    except BaseException as exc:
        frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
        out["errors"].append({"module": name, "type": type(exc).__name__,
                              "error": str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                              "name": getattr(exc, "name", None), "path": getattr(exc, "path", None),
                              "frames": frames})
for top in set(cfg["top"]) | {"numpy"}:
    m = sys.modules.get(top)
    if m is not None:
        where = getattr(m, "__file__", None) or next(iter(getattr(m, "__path__", []) or []), None)
        out["loaded"][top] = where
        out["versions"][top] = str(getattr(m, "__version__", "") or "")
t = sys.modules.get("torch")
if t is not None and getattr(t, "version", None) is not None:
    out["torch_cuda"] = getattr(t.version, "cuda", None)
sys.stdout.write("\n" + cfg["marker"] + json.dumps(out) + "\n")
sys.stdout.flush()
'''


RECORD_FILE = ".mapclip-install.json"


def write_install_record(plan: PipPlan, torch: Optional[TorchBuild]) -> str:
    """Note in the folder what this install was for: QGIS's NumPy, the torch build, the pins."""
    import datetime
    path = os.path.join(plan.target, RECORD_FILE)
    record = {"numpy": plan.numpy_version, "torch_build_asked": plan.torch_build,
              "torch": {"version": torch.version, "cuda": torch.cuda} if torch else None,
              "packages": plan.packages, "python": plan.program,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
    return path


def install_record(target: str) -> Optional[Dict]:
    """What the last install into ``target`` was for (see write_install_record), or None."""
    try:
        with open(os.path.join(target, RECORD_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def verify_command(python: str, target: str, modules: Sequence[str],
                   path: Sequence[str], if_present: Sequence[str] = ()) -> List[str]:
    """The command that imports ``modules`` in a fresh Python whose sys.path is ``path``."""
    cfg = {"path": list(path), "modules": list(modules), "if_present": list(if_present),
           "top": top_level_names(target), "marker": VERIFY_MARKER, "block": list(VERIFY_BLOCK)}
    return [python, "-s", "-c", VERIFY_SCRIPT, json.dumps(cfg)]


@dataclass
class Problem:
    """One thing wrong after the install: the module, the error, the cause and the fix."""

    module: str
    error: str
    cause: str
    fix: str
    #: "error": the module does not import; "warning": it imports, from the wrong copy
    severity: str = "error"

    def text(self) -> str:
        return f"{self.module}: {self.error}. {self.cause} Fix: {self.fix}"


@dataclass
class VerifyResult:
    ok: bool
    problems: List[Problem]
    data: Dict = field(default_factory=dict)
    returncode: int = 0

    @property
    def torch_cuda(self) -> Optional[str]:
        return self.data.get("torch_cuda")


_NUMPY_ABI = re.compile(r"numpy\.core\.multiarray failed to import|compiled using NumPy|"
                        r"_ARRAY_API not found|numpy\.dtype size changed|"
                        r"module compiled against (?:API|ABI) version|numpy\.core\._multiarray_umath",
                        re.I)
_SHARED_LIB = re.compile(r"cannot open shared object file|DLL load failed|Library not loaded|"
                         r"undefined symbol|image not found", re.I)


def _top_of_file(filename: str, path: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(top-level package, the sys.path entry it lives in) for a source file."""
    best = None
    for entry in path:
        if entry and _inside(filename, entry) and not _same_path(filename, entry):
            if best is None or len(entry) > len(best):
                best = entry
    if best is None:
        return None
    rel = os.path.relpath(os.path.realpath(filename), os.path.realpath(best))
    top = rel.split(os.sep, 1)[0]
    if top.endswith((".py", ".so", ".pyd")):
        top = top.split(".", 1)[0]
    return top, best


def _dist_version(target: str, top: str) -> Optional[Tuple[str, str]]:
    """(distribution, version) in the folder that installs ``top``."""
    try:
        entries = os.listdir(target)
    except OSError:
        return None
    for entry in entries:
        if not entry.endswith(".dist-info"):
            continue
        dist, _, version = entry[:-len(".dist-info")].partition("-")
        tops = {_norm(dist).replace("-", "_")}
        tl = os.path.join(target, entry, "top_level.txt")
        if os.path.isfile(tl):
            with open(tl, encoding="utf-8", errors="replace") as fh:
                tops.update(l.strip() for l in fh if l.strip())
        else:
            record = os.path.join(target, entry, "RECORD")
            if os.path.isfile(record):
                with open(record, encoding="utf-8", errors="replace") as fh:
                    tops.update(l.split("/", 1)[0] for l in fh if "/" in l.split(",", 1)[0])
        if top in tops:
            return dist, version
    return None


def _apt_hint(top: str, where: str) -> str:
    if where.startswith("/usr/lib/python3/dist-packages"):
        return f" (Debian/Ubuntu: sudo apt remove python3-{top.lower()})"
    return ""


def diagnose(data: Dict, target: str, path: Sequence[str], python: str = "python",
             numpy_version: Optional[str] = None) -> List[Problem]:
    """What is wrong, from the verify script's report: each failing module, cause and fix.

    The fixes say what helps: a shadowing copy is named with where it lives
    (installing again cannot help there), a NumPy mismatch names the package
    and QGIS's NumPy, a missing system library is named, and only a package
    that pip did not install is answered with "install again".
    """
    problems: List[Problem] = []
    loaded: Dict[str, Optional[str]] = data.get("loaded", {}) or {}
    versions: Dict[str, str] = data.get("versions", {}) or {}
    in_target = set(top_level_names(target))
    qgis_numpy = numpy_version or versions.get("numpy") or "?"
    protected_tops = {t for tops in PROTECTED.values() for t in tops}
    seen_shadow = set()

    def shadow_problem(module: str, error: str, top: str, where: str,
                       severity: str = "error") -> Problem:
        seen_shadow.add(top)
        found = _top_of_file(where, path)
        folder = found[1] if found else os.path.dirname(where)
        mine = _dist_version(target, top)
        theirs = versions.get(top) or "?"
        return Problem(
            module, error,
            f"{top} is imported from {folder} (version {theirs}), not from MapCLIP's folder "
            f"{target}{' (version ' + mine[1] + ')' if mine else ''}: the older copy shadows "
            f"the one installed for MapCLIP, so installing again cannot help.",
            f"MapCLIP's folder must come before {folder} on Python's path; the plugin puts it "
            f"first when QGIS starts, so restart QGIS. If it persists, something imports {top} "
            f"earlier or puts {folder} first (PYTHONPATH, a .pth file, another plugin): remove or "
            f"upgrade that copy{_apt_hint(top, where)}.", severity)

    for err in data.get("errors", []):
        module, etype = err.get("module", "?"), err.get("type", "Error")
        message = f"{etype}: {err.get('error', '')}".strip()
        name = err.get("name") or ""
        top = name.split(".", 1)[0] if name else None
        where = err.get("path") or (loaded.get(top) if top else None)
        if not top or top not in loaded and etype != "ModuleNotFoundError":
            # the deepest frame that lies in a sys.path entry names the package at fault
            for frame in reversed(err.get("frames", [])):
                found = _top_of_file(frame, path)
                if found:
                    top, _ = found
                    where = loaded.get(top) or frame
                    break
        top = top or module.split(".", 1)[0]
        where = where or loaded.get(top) or ""
        if top in in_target and where and not _inside(where, target):
            problems.append(shadow_problem(module, message, top, where))
        elif _NUMPY_ABI.search(message):
            culprit = next((_top_of_file(f, path)[0] for f in reversed(err.get("frames", []))
                            if _top_of_file(f, path) and _top_of_file(f, path)[0] != "numpy"),
                           module.split(".", 1)[0])
            dist = _dist_version(target, culprit)
            pin = f"'{dist[0]}<{dist[1]}'" if dist else culprit
            record = install_record(target) or {}
            if record.get("numpy") != qgis_numpy:
                # installed for another NumPy (an older installer, or QGIS was upgraded since)
                was = record.get("numpy") or "another NumPy"
                fix = (f"install MapCLIP's packages again (Raster > MapCLIP > Install "
                       f"dependencies…): the folder was installed for {was}, and the installer "
                       f"picks packages for QGIS's NumPy {qgis_numpy}.")
            else:
                fix = (f"install an older {culprit} that accepts NumPy {qgis_numpy}: {python} -m "
                       f"pip install --upgrade --no-deps --target \"{target}\" {pin}, or use a "
                       f"QGIS with a newer NumPy.")
            problems.append(Problem(
                module, message,
                f"{culprit} was built for another NumPy than QGIS's ({qgis_numpy}).", fix))
        elif etype == "ModuleNotFoundError" and top in protected_tops:
            problems.append(Problem(
                module, message, f"QGIS's Python has no {top} of its own.",
                f"install QGIS's {top} (Debian/Ubuntu: python3-{top.lower()}; OSGeo4W: the "
                f"python3-{top.lower()} package), then restart QGIS."))
        elif etype == "ModuleNotFoundError" and top in in_target and name != top:
            problems.append(Problem(
                module, message, f"{top} in MapCLIP's folder has no {name}: an incomplete or "
                                 f"mixed install of {top}.",
                f"delete {os.path.join(target, top)} and install again."))
        elif etype == "ModuleNotFoundError":
            problems.append(Problem(
                module, message, f"{top} is not in MapCLIP's folder nor anywhere on QGIS's path: "
                                 f"pip did not install it.",
                f"install again; if it stays missing, install it by hand: {python} -m pip "
                f"install --target \"{target}\" {top}"))
        elif _SHARED_LIB.search(message) or etype == "OSError":
            lib = re.search(r"([\w.+-]+\.(?:so(?:\.[\d.]+)?|dll|dylib))", message)
            problems.append(Problem(
                module, message,
                f"a system library that {top} needs is missing"
                f"{': ' + lib.group(1) if lib else ''}.",
                "install that library with the system's package manager (on Windows: the "
                "Microsoft Visual C++ Redistributable); installing the Python packages again "
                "cannot add it."))
        else:
            problems.append(Problem(
                module, message, f"importing {module} fails in {where or top}.",
                "see the MapCLIP log for the full output; report it with this message."))

    # copies in the folder that lost to another copy, even where nothing failed (yet)
    for top, where in loaded.items():
        if top in in_target and top not in seen_shadow and top not in protected_tops \
                and where and not _inside(where, target):
            problems.append(shadow_problem(top, "imported from another copy", top, where,
                                           "warning"))
    numpy_where = loaded.get("numpy")
    if numpy_where and _inside(numpy_where, target):
        problems.append(Problem(
            "numpy", f"numpy {versions.get('numpy', '?')} comes from MapCLIP's folder",
            "QGIS and GDAL are built against QGIS's own NumPy; a copy in the folder replaces it.",
            f"delete {os.path.join(target, 'numpy')} (MapCLIP deletes it when QGIS starts)."))
    return problems


def parse_verify(stdout: str, stderr: str, returncode: int, target: str, path: Sequence[str],
                 python: str = "python", numpy_version: Optional[str] = None) -> VerifyResult:
    """The check's outcome from the verify process's output."""
    data = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(VERIFY_MARKER):
            try:
                data = json.loads(line[len(VERIFY_MARKER):])
            except ValueError:
                data = None
            break
    if data is None:
        last = [l[len("importing "):] for l in stderr.splitlines() if l.startswith("importing ")]
        module = last[-1] if last else "python"
        how = (f"crashed (signal {-returncode})" if returncode < 0 else
               f"stopped (exit code {returncode})")
        tail = " | ".join(l.strip() for l in stderr.strip().splitlines()[-2:] if l.strip())
        return VerifyResult(False, [Problem(
            module, f"Python {how} while importing {module}" + (f": {tail}" if tail else ""),
            f"importing {module} with QGIS's packages kills the Python process.",
            "see the MapCLIP log for the output; report it with this message.")],
            {}, returncode)
    problems = diagnose(data, target, path, python, numpy_version)
    ok = not any(p.severity == "error" for p in problems)
    return VerifyResult(ok, problems, data, returncode)


def verify_install(target: str, python: Optional[str] = None,
                   modules: Sequence[str] = VERIFY_MODULES,
                   path: Optional[Sequence[str]] = None,
                   if_present: Sequence[str] = VERIFY_IF_PRESENT,
                   timeout: float = 300) -> VerifyResult:
    """Import ``modules`` in a fresh Python with ``path`` (default: QGIS's, folder first).

    The blocking form of the check the installer runs after pip.
    """
    python = python or python_program()
    path = list(path) if path is not None else qgis_path(target)
    cmd = verify_command(python, target, modules, path, if_present)
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return parse_verify("", err, 124, target, path, python)
    return parse_verify(proc.stdout, proc.stderr, proc.returncode, target, path, python)


def _python_or_name() -> str:
    from ..engine.core.interpreter import qgis_python
    return qgis_python().path or "python"


def explain_import_error(exc: BaseException, target: Optional[str] = None) -> Optional[str]:
    """For an ImportError in QGIS after an install: what is wrong and a fix that can help.

    Returns None when the folder has nothing to do with it (then "install
    MapCLIP's packages" is the right advice).
    """
    if not isinstance(exc, ImportError):
        return None
    try:
        target = target or deps_dir()
    except Exception:
        return None
    if not os.path.isdir(target):
        return None
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    tops = set(top_level_names(target)) | {"numpy"}
    loaded = {n: _module_location(sys.modules.get(n)) for n in tops if n in sys.modules}
    versions = {n: str(getattr(sys.modules.get(n), "__version__", "") or "") for n in loaded}
    err = {"module": getattr(exc, "name", None) or "?", "type": type(exc).__name__,
           "error": str(exc).strip().splitlines()[0] if str(exc).strip() else "",
           "name": getattr(exc, "name", None), "path": getattr(exc, "path", None),
           "frames": frames}
    problems = diagnose({"errors": [err], "loaded": loaded, "versions": versions},
                        target, sys.path, _python_or_name())
    if not problems or "pip did not install it" in problems[0].cause:
        return None
    p = problems[0]
    return f"{p.error}. {p.cause} Fix: {p.fix}"


# --------------------------------------------------------------------------- #
# Running pip (QProcess) and the message bar offer
# --------------------------------------------------------------------------- #
try:
    from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal
except ImportError:  # pragma: no cover - only outside QGIS
    QObject = object  # type: ignore


@dataclass
class InstallReport:
    """What one install did: pip's outcome, what was pruned, the torch build, the check."""

    pip_ok: bool = False
    pruned: List[str] = field(default_factory=list)
    torch: Optional[TorchBuild] = None
    verify: Optional[VerifyResult] = None
    restart_for: Dict[str, str] = field(default_factory=dict)
    message: str = ""


def _log(severity: str, text: str) -> None:
    """To the MapCLIP log panel when running in QGIS (quietly nothing elsewhere)."""
    try:
        from . import log
        (log.critical if severity == "error" else log.warning)(text)
    except Exception:
        pass


def _process_env(extra: Dict[str, Optional[str]]):
    env = QProcessEnvironment.systemEnvironment()
    env.insert("PYTHONNOUSERSITE", "1")
    for key, value in extra.items():
        if value is None:
            env.remove(key)
        else:
            env.insert(key, value)
    return env


class PipInstaller(QObject):  # type: ignore[misc]
    """Run a :class:`PipPlan` in a QProcess, then check the result in a second one.

    Signals: ``progress(fraction, text)`` (fraction 0..1, or -1 where pip gives
    no measure), ``step(n, text)`` (the n-th status line, as before) and
    ``finished(ok, message)``. ``report`` holds the details afterwards.
    """

    step = pyqtSignal(int, str)          # steps seen so far, the latest status line
    progress = pyqtSignal(float, str)    # fraction 0..1 or -1, the status line
    finished = pyqtSignal(bool, str)     # ok, message

    def __init__(self, plan: PipPlan, parent=None):
        super().__init__(parent)
        self.plan = plan
        self.output: List[str] = []
        self.steps = 0
        self.report = InstallReport()
        self.parser = PipProgress()
        self._partial = ""
        self._last_bytes = 0.0
        self._cancelled = False
        self._done_emitted = False
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.MergedChannels)
        self.process.setProcessEnvironment(_process_env(plan.env))
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.finished.connect(self._done)
        self.process.errorOccurred.connect(self._error)
        self.checker: Optional[QProcess] = None
        self._verify_path: List[str] = []
        self._timer: Optional[QTimer] = None

    # -- control ---------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.plan.target, exist_ok=True)
        self._emit(-1.0, self.plan.summary())
        self.process.start(self.plan.program, self.plan.args)

    def cancel(self) -> None:
        self._cancelled = True
        for proc in (self.process, self.checker):
            if proc is not None and proc.state() != QProcess.NotRunning:
                proc.kill()

    def running(self) -> bool:
        return any(p is not None and p.state() != QProcess.NotRunning
                   for p in (self.process, self.checker))

    # -- pip -------------------------------------------------------------------
    def _emit(self, fraction: float, text: str) -> None:
        self.steps += 1
        self.step.emit(self.steps, text)
        self.progress.emit(float(fraction), text)

    def _read(self) -> None:
        chunk = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        text = self._partial + chunk
        lines = re.split(r"\r\n|\n|\r", text)
        self._partial = lines.pop()           # an unfinished line waits for the rest
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        line = strip_ansi(line)
        if not line.strip():
            return
        is_bytes = bool(_RE_RAW.match(line) or _RE_BAR.search(line))
        if not is_bytes:
            self.output.append(line)
        got = self.parser.feed(line)
        if not got:
            return
        now = time.monotonic()
        if is_bytes and 0.0 < got[0] < 1.0 and now - self._last_bytes < 0.2:
            return                            # pip redraws its bar often: 5 updates a second
        if is_bytes:
            self._last_bytes = now
        self._emit(*got)

    def _error(self, err) -> None:
        if err == QProcess.FailedToStart:
            self._finish(False, f"could not start {self.plan.program}: "
                                f"{self.process.errorString()}. Check that QGIS's Python is there "
                                f"(MapCLIP looks next to the QGIS program).")

    def _finish(self, ok: bool, message: str) -> None:
        if self._done_emitted:
            return
        self._done_emitted = True
        self.report.message = message
        self.finished.emit(ok, message)

    def _done(self, code: int, status) -> None:
        if self.process.bytesAvailable():
            self._read()
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        out = "\n".join(self.output)
        if self._cancelled:
            self._finish(False, "the install was cancelled; the folder may hold part of it: "
                                "install again to complete it")
            return
        if code != 0 or status != QProcess.NormalExit:
            _log("error", f"pip failed (exit code {code}): {' '.join(self.plan.command())}\n"
                          + "\n".join(self.output[-60:]))
            self._finish(False, explain_failure(out, code, self.plan))
            return
        self.report.pip_ok = True
        self.report.pruned = prune_protected(self.plan.target, self.plan.protected)
        self.report.torch = torch_build(self.plan.target)
        write_install_record(self.plan, self.report.torch)
        self._start_check()

    # -- the check -------------------------------------------------------------
    def _start_check(self) -> None:
        path = (list(self.plan.verify_path) if self.plan.verify_path is not None
                else qgis_path(self.plan.target))
        if not path or not _same_path(path[0], self.plan.target):
            path = [self.plan.target, *[p for p in path if not _same_path(p, self.plan.target)]]
        self._verify_path = path
        names = [m for m in self.plan.verify_modules if m != "numpy"][:4]
        self._emit(-1.0, shorten(f"checking the install: importing {', '.join(names)} with "
                                 f"QGIS's paths"))
        cmd = verify_command(self.plan.program, self.plan.target, self.plan.verify_modules,
                             path, self.plan.verify_if_present)
        self.checker = QProcess(self)
        self.checker.setProcessEnvironment(_process_env(
            {k: v for k, v in self.plan.env.items() if not k.startswith("PIP_")}))
        self.checker.finished.connect(self._checked)
        self.checker.errorOccurred.connect(self._check_error)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._check_timeout)
        self._timer.start(int(self.plan.verify_timeout_s * 1000))
        self.checker.start(cmd[0], cmd[1:])

    def _check_timeout(self) -> None:
        if self.checker is not None and self.checker.state() != QProcess.NotRunning:
            self.checker.kill()

    def _check_error(self, err) -> None:
        if err == QProcess.FailedToStart:
            self._finish(False, f"pip finished, but the check could not start "
                                f"{self.plan.program}: {self.checker.errorString()}")

    def _checked(self, code: int, status) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._cancelled:
            self._finish(False, "the install was cancelled during the check")
            return
        stdout = bytes(self.checker.readAllStandardOutput()).decode("utf-8", "replace")
        stderr = bytes(self.checker.readAllStandardError()).decode("utf-8", "replace")
        if status != QProcess.NormalExit and code == 0:
            code = -9
        result = parse_verify(stdout, stderr, code, self.plan.target, self._verify_path,
                              self.plan.program)
        self.report.verify = result
        if stderr.strip():
            self.output.append(stderr.strip())
        for problem in result.problems:
            _log(problem.severity, f"install check, {problem.severity}: {problem.text()}")
        add_deps_path(self.plan.target)
        self.report.restart_for = loaded_elsewhere(self.plan.target)
        self._finish(result.ok, self._message(result))

    def _message(self, result: VerifyResult) -> str:
        torch = self.report.torch
        if torch is None and result.data.get("versions", {}).get("torch"):
            torch = TorchBuild(result.data["versions"]["torch"], result.torch_cuda)
        parts = []
        if torch is not None:
            build = torch.describe()
            wanted = self.plan.torch_build
            if wanted == "CPU" and torch.cuda:
                build += " although the CPU build was asked for"
            elif wanted == "CUDA" and not torch.cuda:
                build += (" although a CUDA build was asked for (the CUDA wheels were not "
                          "found for this Python)")
            parts.append(build)
        pruned = sorted({_dist_name(p) for p in self.report.pruned
                         if p.endswith((".dist-info", ".egg-info"))})
        errors = [p for p in result.problems if p.severity == "error"]
        warnings = [p for p in result.problems if p.severity != "error"]
        if not result.ok:
            first = errors[0]
            more = (f" ({len(result.problems) - 1} more problem(s) in the log)"
                    if len(result.problems) > 1 else "")
            return (f"pip installed the packages into {self.plan.target}"
                    f"{' (' + parts[0] + ')' if parts else ''}, but they do not import with "
                    f"QGIS's paths: {first.text()}{more}")
        text = f"installed into {self.plan.target}"
        if parts:
            text += f": {parts[0]}"
        text += "; the engine imports with QGIS's paths"
        if pruned:
            text += f" (QGIS's own {', '.join(pruned)} kept)"
        if self.report.restart_for:
            names = ", ".join(sorted(self.report.restart_for))
            text += f". Restart QGIS before searching: {names} was already loaded from older copies"
        if warnings:
            text += ". Note: " + " ".join(p.text() for p in warnings)
        return text


def offer_install(iface, missing: Sequence[str], on_install: Callable[[], None]):
    """A message-bar warning naming what is missing, with an Install button.

    Returns the message-bar item (or None without a message bar).
    """
    from qgis.core import Qgis
    from qgis.PyQt.QtWidgets import QPushButton

    from . import log
    text = missing_message(missing)
    log.warning(text)
    bar = iface.messageBar() if iface is not None else None
    if bar is None:
        return None
    item = bar.createMessage("MapCLIP", text)
    button = QPushButton("Install…", item)
    button.setObjectName("mapclipInstallDeps")
    button.setToolTip("pip install " + " ".join(read_requirements()) + f" into {deps_dir()}")
    button.clicked.connect(on_install)
    item.layout().addWidget(button)
    bar.pushWidget(item, Qgis.Warning, 0)
    return item
