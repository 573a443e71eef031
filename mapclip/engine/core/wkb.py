"""Well-known binary (WKB) polygons, once: written for every vector output, read for
the polygons a user gives (classify's ``within``).

Standard library at import; NumPy when called.
"""
from __future__ import annotations

import struct
from typing import Any, Dict, List, Sequence, Tuple

from .errors import UsageError


def polygon_wkb(bounds: Sequence[Tuple[float, float, float, float]]):
    """WKB polygons (little-endian, one ring of 5 points), one per (xmin, ymin, xmax, ymax)."""
    import numpy as np
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    xmin, ymin, xmax, ymax = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    head = struct.pack("<BIII", 1, 3, 1, 5)
    coords = np.stack([xmin, ymin, xmax, ymin, xmax, ymax, xmin, ymax, xmin, ymin], axis=1)
    coords = np.ascontiguousarray(coords, dtype="<f8")
    out = np.empty(len(coords), dtype=object)
    for i in range(len(coords)):
        out[i] = head + coords[i].tobytes()
    return out


def _ring_wkb(ring) -> bytes:
    pts = [(float(x), float(y)) for x, y in ring]
    return struct.pack("<I", len(pts)) + b"".join(struct.pack("<dd", x, y) for x, y in pts)


def rings_wkb(rings) -> bytes:
    """One WKB polygon (little-endian) from its rings (GeoJSON ``coordinates``: outer ring first)."""
    return struct.pack("<BII", 1, 3, len(rings)) + b"".join(_ring_wkb(r) for r in rings)


def read_polygons(buf: bytes, off: int = 0) -> Tuple[List[Dict[str, Any]], int]:
    """GeoJSON polygons from WKB (ISO or EWKB; Polygon, MultiPolygon, collections of them;
    Z and M dropped), and the offset after them. Other geometry types raise a UsageError."""
    import numpy as np
    bo = "<" if buf[off] == 1 else ">"
    off += 1
    (t,) = struct.unpack_from(bo + "I", buf, off)
    off += 4
    has_z, has_m = bool(t & 0x80000000), bool(t & 0x40000000)
    if t & 0x20000000:
        off += 4  # EWKB SRID
    t &= 0x0FFFFFFF
    if t >= 1000:
        has_z |= t // 1000 in (1, 3)
        has_m |= t // 1000 in (2, 3)
        t %= 1000
    nd = 2 + int(has_z) + int(has_m)
    if t == 3:
        (n,) = struct.unpack_from(bo + "I", buf, off)
        off += 4
        rings = []
        for _ in range(n):
            (m,) = struct.unpack_from(bo + "I", buf, off)
            off += 4
            pts = np.frombuffer(buf, dtype=bo + "f8", count=m * nd, offset=off).reshape(m, nd)
            off += 8 * m * nd
            rings.append([(float(x), float(y)) for x, y in pts[:, :2]])
        return [{"type": "Polygon", "coordinates": rings}], off
    if t in (6, 7):
        (n,) = struct.unpack_from(bo + "I", buf, off)
        off += 4
        out: List[Dict[str, Any]] = []
        for _ in range(n):
            part, off = read_polygons(buf, off)
            out.extend(part)
        return out, off
    names = {1: "points", 2: "lines", 4: "points", 5: "lines"}
    raise UsageError(f"classify within needs polygons, not {names.get(t, f'geometry type {t}')}",
                     "give a polygon layer (areas, not points or lines)")
