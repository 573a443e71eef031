"""The pip command: the requirements, QGIS's NumPy pin, the torch build and its index.

The CPU build is pinned with its local version (``torch==2.14.1+cpu``), which
only the PyTorch CPU index has, so when that index cannot be reached pip fails
with a clear message instead of quietly taking the default index's CUDA build.
The exact pins of ``requirements.txt`` are kept for torch, torchvision and
open_clip; the others become upper bounds so pip can match QGIS's NumPy.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ...engine.core.errors import UsageError
from ...engine.core.interpreter import qgis_python
from .folder import PROTECTED, ROOT, deps_dir, normal_name
from .missing import REQUIRED

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
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
#: the package QGIS imports the plugin as ("mapclip"), for the engine's import names
PACKAGE = (__package__ or "mapclip.plugin.deps").rsplit(".", 2)[0]
#: what the installer imports to check the result (third-party, then the engine)
VERIFY_MODULES: Tuple[str, ...] = (
    "numpy", "torch", "torchvision", "torchvision.ops", "open_clip", "rasterio",
    "safetensors.torch", "cv2", "pyogrio", "faiss", "imagehash",
    f"{PACKAGE}.engine.raster.reader", f"{PACKAGE}.engine.model.encode", f"{PACKAGE}.engine.detect")
#: QGIS's own modules, imported after the packages when QGIS's Python has them:
#: they fail when a package in the folder breaks NumPy for GDAL
VERIFY_IF_PRESENT: Tuple[str, ...] = ("osgeo.gdal", "osgeo.gdal_array")
PYPI_INDEX = "https://pypi.org/simple"


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
        norm = normal_name(name)
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
