"""What is missing: the packages whose absence stops the plugin, found without importing them."""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Sequence

#: import name -> pip name, for the packages whose absence stops the plugin
REQUIRED: Dict[str, str] = {"torch": "torch", "open_clip": "open_clip_torch",
                            "rasterio": "rasterio"}

# A test or a user can force the "missing" path: MAPCLIP_PRETEND_MISSING=torch,rasterio
PRETEND_ENV = "MAPCLIP_PRETEND_MISSING"


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
