"""The hash maths: Hamming distances and the segment index (RemoteCLIP's recipe).

Comparing all pairs is quadratic, so each hash is cut into ``N`` contiguous
bit segments and each segment value goes into its own dictionary (segment
value -> images). Only images that share at least one identical segment are
compared. With ``N > D`` no pair within the distance ``D`` is missed (pigeonhole:
``D`` differing bits touch at most ``D`` segments, so at least one of the
``N`` is identical). ``N`` defaults to ``D + 1``, the largest segments and so
the fewest chance candidates. When the bit count is not a multiple of ``N``,
the first ``bits % N`` segments are one bit longer; the argument only needs
the segments to be disjoint and to cover every bit. :func:`brute_force_pairs`
compares every pair (numpy), the reference the index is tested and timed against.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import UsageError
from ..core.jobs import Job
from ..core.options import DEFAULT_HASH_SIZE, DEFAULT_MAX_DISTANCE


def segment_layout(bits: int, segments: int) -> List[Tuple[int, int]]:
    """(shift, width) of each of ``segments`` contiguous segments covering ``bits``
    bits, from the top; the first ``bits % segments`` are one bit longer."""
    base, extra = divmod(bits, segments)
    layout, top = [], bits
    for i in range(segments):
        width = base + (1 if i < extra else 0)
        top -= width
        layout.append((top, width))
    return layout


def check_segments(bits: int, max_distance: int, segments: Optional[int]) -> int:
    """The segment count to use (default ``max_distance + 1``), validated."""
    if max_distance < 0:
        raise UsageError(f"max distance {max_distance} is negative", "use 0 or more bits")
    if max_distance >= bits:
        raise UsageError(f"max distance {max_distance} is not below the hash's {bits} bits",
                         "use a smaller --max-distance")
    n = max_distance + 1 if segments is None else int(segments)
    if n <= max_distance:
        raise UsageError(f"{n} segments can miss pairs at distance {max_distance}: "
                         "the segment method needs more segments than the max distance",
                         f"use --segments {max_distance + 1} or more (default: max distance + 1)")
    if n > bits:
        raise UsageError(f"{n} segments for a {bits}-bit hash", f"use at most {bits} segments")
    return n


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _segment_index(values: Sequence[int], layout) -> List[Dict[int, List[int]]]:
    tables: List[Dict[int, List[int]]] = []
    for shift, width in layout:
        mask = (1 << width) - 1
        table: Dict[int, List[int]] = defaultdict(list)
        for i, v in enumerate(values):
            table[(v >> shift) & mask].append(i)
        tables.append(table)
    return tables


def distinct_values(hashes: Sequence[int]) -> Tuple[List[int], List[List[int]]]:
    """Distinct values (in first-seen order) and the items holding each."""
    where: Dict[int, List[int]] = {}
    for i, h in enumerate(hashes):
        where.setdefault(int(h), []).append(i)
    return list(where), list(where.values())


def unique_pairs(values: Sequence[int], max_distance: int, bits: int,
                 segments: Optional[int] = None,
                 job: Optional[Job] = None) -> List[Tuple[int, int, int]]:
    """Pairs (i, j, distance), i < j, of *distinct* values within ``max_distance``,
    by the segment index (``job``: checked for cancel every few thousand buckets)."""
    n = check_segments(bits, max_distance, segments)
    tables = _segment_index(values, segment_layout(bits, n))
    seen = set()
    out = []
    for table in tables:
        for k, bucket in enumerate(table.values()):
            if job is not None and k % 4096 == 0:
                job.check()
            if len(bucket) < 2:
                continue
            for x in range(len(bucket)):
                i = bucket[x]
                vi = values[i]
                for j in bucket[x + 1:]:
                    if (i, j) in seen:
                        continue
                    seen.add((i, j))
                    d = (vi ^ values[j]).bit_count()
                    if d <= max_distance:
                        out.append((i, j, d))
    out.sort()
    return out


def find_pairs(hashes: Sequence[int], max_distance: int = DEFAULT_MAX_DISTANCE,
               bits: int = DEFAULT_HASH_SIZE ** 2,
               segments: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """All pairs (i, j, distance), i < j, of ``hashes`` (ints of ``bits`` bits)
    within Hamming distance ``max_distance``, by the segment index. Equal hashes
    are compared once (so a thousand copies of a blank tile cost no more than two)."""
    values, items = distinct_values(hashes)
    out = [(a, b, 0) for group in items for k, a in enumerate(group) for b in group[k + 1:]]
    for u, v, d in unique_pairs(values, max_distance, bits, segments):
        out.extend((min(a, b), max(a, b), d) for a in items[u] for b in items[v])
    out.sort()
    return out


def find_cross_pairs(queries: Sequence[int], references: Sequence[int],
                     max_distance: int = DEFAULT_MAX_DISTANCE, bits: int = DEFAULT_HASH_SIZE ** 2,
                     segments: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """Pairs (query index, reference index, distance) within ``max_distance``:
    the references go into the segment dictionaries, each query looks itself up."""
    n = check_segments(bits, max_distance, segments)
    layout = segment_layout(bits, n)
    tables = _segment_index(references, layout)
    out = []
    for qi, q in enumerate(queries):
        cand = set()
        for (shift, width), table in zip(layout, tables):
            cand.update(table.get((q >> shift) & ((1 << width) - 1), ()))
        for ri in cand:
            d = (q ^ references[ri]).bit_count()
            if d <= max_distance:
                out.append((qi, ri, d))
    out.sort()
    return out


_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), \
    np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (SWAR, vectorised; ``x`` is overwritten)."""
    t = np.right_shift(x, np.uint64(1))
    t &= _M1
    x -= t
    t = np.right_shift(x, np.uint64(2))
    t &= _M2
    x &= _M2
    x += t
    t = np.right_shift(x, np.uint64(4))
    x += t
    x &= _M4
    x *= _H01
    x >>= np.uint64(56)
    return x


def brute_force_pairs(hashes: Sequence[int], max_distance: int = DEFAULT_MAX_DISTANCE,
                      block: int = 64, chunk: int = 4096) -> List[Tuple[int, int, int]]:
    """All pairs within ``max_distance`` by comparing every pair (numpy, 64-bit
    hashes); the reference the segment index is tested and timed against.
    Tiles of ``block`` rows x ``chunk`` columns keep the work in the CPU cache."""
    h = np.asarray([int(v) for v in hashes], dtype=np.uint64)
    n = len(h)
    out = []
    for start in range(0, n, block):
        rows = h[start:start + block, None]
        for c0 in range(start + 1, n, chunk):
            d = popcount64(np.bitwise_xor(rows, h[c0:c0 + chunk]))
            ii, jj = np.nonzero(d <= max_distance)          # local row, column
            gi, gj = ii + start, jj + c0                      # global indices
            keep = gj > gi
            for i, j, dist in zip(gi[keep].tolist(), gj[keep].tolist(),
                                  d[ii[keep], jj[keep]].tolist()):
                out.append((i, j, int(dist)))
    out.sort()
    return out
