"""The heavy packages inside QGIS: imported once, on the main thread, without triton.

Two rules keep QGIS alive (docs/plugin.md, "Why QGIS does not crash"):

1. **No triton in QGIS's process.** torch's CUDA wheels bring triton, whose
   native library carries its own LLVM. QGIS's OpenGL driver (Mesa's llvmpipe
   under Xvfb or in virtual machines, radeonsi on AMD desktops) has already
   loaded the system's libLLVM into the process with global symbols; loading
   triton's next to it crashes QGIS (SIGSEGV in ``triton/knobs.py``). The import
   is reached without any compilation: ``torchvision.ops`` imports
   ``torch._dynamo``, which asks whether triton is there by importing it.
   Inference never needs triton (no ``torch.compile`` here), so
   :func:`block_triton` marks it absent (``sys.modules["triton"] = None``):
   torch then reports "no triton" and takes its eager paths.
2. **Heavy imports on the main thread, before the first task.** torch,
   torchvision, open_clip and rasterio load in :func:`preload`, called by the
   dock and the dialogs just before they start their first QgsTask and by the
   Processing algorithms in ``prepareAlgorithm`` (which QGIS runs on the main
   thread), never for the first time inside a worker thread.
"""
from __future__ import annotations

import importlib
import sys
import threading
from typing import List

#: imported by :func:`preload`, in this order
HEAVY = ("numpy", "torch", "torchvision", "open_clip", "rasterio", "affine")

_lock = threading.Lock()
_done: List[str] = []


def block_triton() -> bool:
    """Make ``import triton`` fail cleanly in this process; False if it is loaded already."""
    mod = sys.modules.get("triton", False)
    if mod is None:
        return True
    if mod is not False:
        return False  # someone imported it before us; nothing safe to do now
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def preloaded() -> bool:
    return len(_done) == len(HEAVY)


def preload() -> None:
    """Import the heavy packages now (main thread). Raises ImportError naming the package."""
    block_triton()
    with _lock:
        for name in HEAVY:
            if name in _done:
                continue
            importlib.import_module(name)
            _done.append(name)
