"""The deps folder at the front of sys.path, at start-up and after an install."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

from .. import log
from .folder import deps_dir, loaded_elsewhere, prune_protected, same_path

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
    sys.path[:] = [p for p in sys.path if not (p and same_path(p, path))]
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    early = loaded_elsewhere(path)
    if removed or early:
        try:
            if removed:
                log.info(f"removed QGIS's own packages from {path}: {', '.join(removed)}")
            if early:
                log.warning("imported before MapCLIP's folder was on the path, so these stay "
                            "the older copies until QGIS restarts: " +
                            ", ".join(f"{k} ({v})" for k, v in sorted(early.items())))
        except Exception:  # outside QGIS
            pass
    return path
