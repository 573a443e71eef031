"""Near-duplicate images by perceptual hash, found in groups (RemoteCLIP's recipe).

Two images are duplicates when the Hamming distance of their p-Hashes
(:mod:`engine.dedup.hashing`) is at most ``max_distance`` (``D``); the
default ``D = 1`` is RemoteCLIP's "distance below 2". Pairs come from the
segment index (:mod:`engine.dedup.segments`), never from all pairs.

Duplicates form groups (union-find over the pairs: A~B and B~C put A, B, C
in one group even if A and C are further apart). One image per group is
kept: the one with the most pixels, then the first by path. With
``against`` (a held-out test set) every image that lies within ``D`` of a
test image is *contaminated*; it is never kept, and when a whole group is
contaminated none of it is. Inputs are never modified here;
:mod:`engine.dedup.quarantine` moves the images not kept, and back.
"""
from __future__ import annotations

import csv
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.errors import UsageError
from ..core.jobs import CancelFlag, Job, ProgressFn, atomic_path, check_outputs, is_inside, same_file
from ..core.options import DedupOptions
from .hashing import (IMAGE_EXTENSIONS, HashCache, ImageRecord, PathLike, default_cache_path,
                      hash_images, input_roots, list_images)
from .segments import distinct_values, check_segments, find_cross_pairs, hamming, unique_pairs

REPORT_COLUMNS = ("group", "action", "path", "duplicate_of", "distance", "width", "height",
                  "hash", "note")


@dataclass
class DedupResult:
    """Groups of duplicates, contamination and what to set aside."""

    roots: List[str]
    against_roots: List[str]
    images: int                     # images under the input folders (readable)
    against_images: int
    pairs: int                      # duplicate pairs among the inputs
    groups: List[List[str]]         # each group of duplicates, the kept image first
    contaminated: Dict[str, Tuple[str, int]]   # input image -> (test image, distance)
    remove: List[str]               # images not kept: duplicates and contaminated, sorted
    unreadable: List[Tuple[str, str]]          # (path, reason)
    hashed: int
    from_cache: int
    segments: int
    max_distance: int
    hash_size: int
    report: Optional[str]
    seconds: float
    #: duplicates or contaminated images left in place: input symlinks point at them
    #: (path -> the links), so moving them would leave the links dangling
    linked: Dict[str, List[str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["contaminated"] = {k: {"test_image": v[0], "distance": v[1]}
                             for k, v in self.contaminated.items()}
        return d


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _keep_key(rec: ImageRecord):
    return (-rec.pixels, rec.path)


def find_duplicates(dirs: Sequence[PathLike], out: Optional[PathLike] = None,
                    against: Optional[Sequence[PathLike]] = None,
                    options: Optional[DedupOptions] = None,
                    progress: Optional[ProgressFn] = None,
                    cancel: Optional[CancelFlag] = None) -> DedupResult:
    """Hash every image under ``dirs`` (and ``against``), find duplicate groups and
    contaminated images, and write the CSV report to ``out`` when given."""
    t0 = time.perf_counter()
    o = options or DedupOptions()
    if not dirs:
        raise UsageError("no input folders", "name at least one folder of images")
    if o.hash_size < 2:
        raise UsageError(f"hash size {o.hash_size} is too small", "use 8 (64 bits) or more")
    bits = o.hash_size ** 2
    n_seg = check_segments(bits, o.max_distance, o.segments)
    roots = input_roots(dirs)
    test_roots = input_roots(against or [])
    for t in test_roots:
        for r in roots:
            if is_inside(t, r) or is_inside(r, t):
                raise UsageError(f"test folder {t} (--against) overlaps input folder {r}",
                                 "give --against the held-out test set, a folder apart from "
                                 "the training folders")
    cache_file = default_cache_path() if o.cache == "default" else o.cache
    checked = check_outputs([("--out", out), ("--cache", cache_file)],
                            [("input", d) for d in list(dirs) + list(against or [])],
                            overwrite=o.overwrite, may_exist=["--cache"])
    out_path = checked.get("--out")
    links: Dict[str, List[str]] = {}
    files = list_images(dirs, links)
    test_files = list_images(against) if against else []
    for label, path in checked.items():
        if any(same_file(path, p) for p, _ in files + test_files):
            raise UsageError(f"{label} {path} is one of the input images",
                             f"write {label} to another path")
    test_set = {p for p, _ in test_files}
    files = [f for f in files if f[0] not in test_set]   # a test image is never a training one
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                         f"{', '.join(map(str, dirs))}", "check the folders")
    job = Job(progress, cancel, total=len(files) + len(test_files))
    job.set_total(len(files) + len(test_files))
    cache = HashCache(cache_file)
    try:
        recs, hits = hash_images(files, o.hash_size, cache, job, o.workers)
        test_recs, test_hits = hash_images(test_files, o.hash_size, cache, job, o.workers)
    finally:
        cache.close()
    unreadable = [(r.path, r.error or "") for r in recs + test_recs if r.hash is None]
    good = [r for r in recs if r.hash is not None]
    test_good = [r for r in test_recs if r.hash is not None]
    job.check()

    # duplicate pairs among the inputs, on distinct hash values
    hashes = [r.hash for r in good]
    values, items = distinct_values(hashes)
    uf = _UnionFind(len(good))
    n_pairs = sum(len(g) * (len(g) - 1) // 2 for g in items)
    for group in items:
        for i in group[1:]:
            uf.union(group[0], i)
    for u, v, _ in unique_pairs(values, o.max_distance, bits, n_seg, job):
        uf.union(items[u][0], items[v][0])
        n_pairs += len(items[u]) * len(items[v])
    job.check()

    # contamination: input images near a test image
    contaminated: Dict[str, Tuple[str, int]] = {}
    if test_good:
        for qi, ti, d in find_cross_pairs(values, [r.hash for r in test_good], o.max_distance,
                                          bits, n_seg):
            for i in items[qi]:
                prev = contaminated.get(good[i].path)
                cand = (test_good[ti].path, d)
                if prev is None or (d, cand[0]) < (prev[1], prev[0]):
                    contaminated[good[i].path] = cand

    members: Dict[int, List[int]] = defaultdict(list)
    for i in range(len(good)):
        members[uf.find(i)].append(i)
    groups: List[List[str]] = []
    remove = set(contaminated)
    for idx in members.values():
        if len(idx) < 2:
            continue
        ordered = sorted((good[i] for i in idx), key=lambda r: (r.path not in links, _keep_key(r)))
        clean = [r for r in ordered if r.path not in contaminated]
        kept = clean[0] if clean else None
        rest = [r for r in ordered if r is not kept]
        groups.append(([kept.path] if kept else []) + [r.path for r in rest])
        remove.update(r.path for r in rest)
    groups.sort()
    pinned = {p: links[p] for p in sorted(remove) if p in links}
    remove.difference_update(pinned)
    result = DedupResult(
        roots=sorted({r for _, r in list_images_roots(dirs)}),
        against_roots=sorted({r for _, r in list_images_roots(against or [])}),
        images=len(good), against_images=len(test_good), pairs=n_pairs, groups=groups,
        contaminated=dict(sorted(contaminated.items())), remove=sorted(remove),
        unreadable=unreadable, hashed=len(recs) + len(test_recs) - hits - test_hits - len(unreadable),
        from_cache=hits + test_hits, segments=n_seg, max_distance=o.max_distance,
        hash_size=o.hash_size, report=str(out_path) if out_path else None, seconds=0.0,
        linked=pinned)
    if out_path is not None:
        write_report(result, {r.path: r for r in recs + test_recs}, out_path)
    result.seconds = time.perf_counter() - t0
    return result


def list_images_roots(dirs: Sequence[PathLike]) -> List[Tuple[str, str]]:
    """(given, real root folder) of each input."""
    out = []
    for d in dirs:
        p = os.path.realpath(d)
        out.append((str(d), p if os.path.isdir(p) else os.path.dirname(p)))
    return out


def write_report(result: DedupResult, records: Dict[str, ImageRecord], out: Path) -> None:
    """One CSV row per image that is kept from a group, a duplicate, contaminated or
    unreadable (columns :data:`REPORT_COLUMNS`)."""
    hex_width = (result.hash_size ** 2 + 3) // 4

    def row(group, action, path, dup_of="", dist="", note=""):
        r = records.get(path)
        if path in result.linked:
            note = f"not moved: linked from {', '.join(result.linked[path])}"
        h = format(r.hash, f"0{hex_width}x") if r is not None and r.hash is not None else ""
        return [group, action, path, dup_of, dist, r.width if r else "", r.height if r else "",
                h, note]

    rows = []
    in_group = set()
    for g, paths in enumerate(result.groups, 1):
        kept = paths[0] if paths[0] not in result.contaminated else None
        for p in paths:
            in_group.add(p)
            if p in result.contaminated:
                test, d = result.contaminated[p]
                rows.append(row(g, "contaminated", p, test, d))
            elif p == kept:
                rows.append(row(g, "keep", p, "", 0))
            else:
                d = hamming(records[p].hash, records[kept].hash) if kept else ""
                rows.append(row(g, "duplicate", p, kept or "", d))
    g = len(result.groups)
    for p, (test, d) in result.contaminated.items():
        if p not in in_group:
            g += 1
            rows.append(row(g, "contaminated", p, test, d))
    for p, why in result.unreadable:
        rows.append(row("", "unreadable", p, note=why))
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(REPORT_COLUMNS)
            w.writerows(rows)
