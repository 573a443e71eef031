"""The deps folder's contents: where it is, what is in it, and QGIS's own packages kept out.

pip --target installs every dependency, so after pip (and at start-up, for a
folder an older installer left) the distributions QGIS provides
(:data:`PROTECTED`: NumPy, GDAL, PyQt5, sip, qgis) are deleted from it.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def normal_name(name: str) -> str:
    """A distribution name in PEP 503 normal form (open_clip_torch -> open-clip-torch)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file or folder."""
    try:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
    except (OSError, ValueError):
        return False


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it."""
    try:
        path = os.path.normcase(os.path.realpath(path))
        folder = os.path.normcase(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def deps_dir() -> str:
    """The plugin-owned folder pip installs into (inside the QGIS profile)."""
    from qgis.core import QgsApplication
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "mapclip-deps")


def qgis_path(target: str, path: Optional[Sequence[str]] = None) -> List[str]:
    """sys.path as QGIS will have it after a restart: the deps folder first, then QGIS's entries."""
    path = sys.path if path is None else path
    rest = [p for p in path if p and not same_path(p, target)]
    parent = os.path.dirname(ROOT)          # where the plugin package itself is found
    if not any(same_path(p, parent) for p in rest):
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


def dist_name(entry: str) -> str:
    """'numpy-1.24.2.dist-info' -> 'numpy'."""
    stem = entry.rsplit(".", 1)[0]
    return normal_name(stem.split("-", 1)[0])


def provided_elsewhere(name: str, target: str, path: Optional[Sequence[str]] = None) -> bool:
    """QGIS's Python finds the top-level module ``name`` outside ``target``."""
    path = [p for p in (sys.path if path is None else path) if p and not same_path(p, target)]
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
             if e.endswith((".dist-info", ".egg-info")) and dist_name(e) in dists]
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
        where = module_location(module)
        if where and not inside(where, target):
            out[name] = where
    return out


def module_location(module) -> Optional[str]:
    if module is None:
        return None
    where = getattr(module, "__file__", None)
    if not where:
        paths = list(getattr(module, "__path__", []) or [])
        where = paths[0] if paths else None
    return where
