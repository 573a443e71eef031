"""The result of an install: which torch it is, and whether the engine imports with QGIS's sys.path.

The check imports the engine in a subprocess whose sys.path is the one QGIS
will have (the folder first) and, when that fails, names the module, the
error and a fix (:func:`diagnose`).
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ...engine.core.interpreter import qgis_python
from .folder import (PROTECTED, deps_dir, inside, module_location, normal_name, qgis_path,
                     same_path, top_level_names)
from .plan import VERIFY_IF_PRESENT, VERIFY_MODULES, PipPlan, python_program

#: kept out of the check's Python as QGIS keeps them out of its own (runtime.block_triton)
VERIFY_BLOCK: Tuple[str, ...] = ("triton",)
VERIFY_MARKER = "MAPCLIP-VERIFY "


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
        if entry and inside(filename, entry) and not same_path(filename, entry):
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
        tops = {normal_name(dist).replace("-", "_")}
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
        if top in in_target and where and not inside(where, target):
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
                and where and not inside(where, target):
            problems.append(shadow_problem(top, "imported from another copy", top, where,
                                           "warning"))
    numpy_where = loaded.get("numpy")
    if numpy_where and inside(numpy_where, target):
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
    loaded = {n: module_location(sys.modules.get(n)) for n in tops if n in sys.modules}
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
