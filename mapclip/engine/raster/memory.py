"""Memory flat in raster size: freed heap memory handed back to the system while
tiles stream (:func:`trim_heap`, called once per batch by both batch iterators)."""
from __future__ import annotations

import os
import sys
import time

#: seconds between two heap trims while streaming
TRIM_INTERVAL_S = 2.0
_trim_state = {"last": 0.0, "fn": None}
#: glibc's mallopt parameter number, and the fixed threshold the reader sets
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def trim_heap(force: bool = False) -> bool:
    """Give freed heap memory back to the system (glibc ``malloc_trim``), at most
    every TRIM_INTERVAL_S; True when it ran.

    Streaming a large raster allocates and frees many same-sized buffers
    (windows, model inputs); glibc raises its mmap threshold after the first
    large free and then serves them from the heap, whose freed pages it keeps,
    so a long run's peak memory crept up with the raster's size (issue 16).
    The first call therefore also fixes glibc's mmap threshold at 1 MB (unless
    ``MALLOC_MMAP_THRESHOLD_`` is set). The batch iterators call this once per
    batch; off glibc it does nothing.
    """
    now = time.monotonic()
    if not force and now - _trim_state["last"] < TRIM_INTERVAL_S:
        return False
    _trim_state["last"] = now
    fn = _trim_state["fn"]
    if fn is None:
        fn = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                libc = ctypes.CDLL("libc.so.6")
                fn = libc.malloc_trim
                if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
                    # a fixed threshold (no dynamic raise): big buffers are mapped and
                    # unmapped on their own instead of fragmenting the heap
                    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            except (OSError, AttributeError):
                fn = False
        _trim_state["fn"] = fn
    if fn:
        fn(0)
        return True
    return False
