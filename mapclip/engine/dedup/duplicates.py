"""Near-duplicate images by perceptual hash, with a segment index (RemoteCLIP's recipe).

Every image gets a p-Hash (``imagehash.phash``: the sign pattern of the
lowest ``hash_size x hash_size`` DCT coefficients of a 32 x 32 grey copy,
64 bits for the default ``hash_size=8``). Two images are duplicates when the
Hamming distance of their hashes is at most ``max_distance`` (``D``); the
default ``D = 1`` is RemoteCLIP's "distance below 2".

Comparing all pairs is quadratic, so each hash is cut into ``N`` contiguous
bit segments and each segment value goes into its own dictionary (segment
value -> images). Only images that share at least one identical segment are
compared. With ``N > D`` no pair within the distance is missed (pigeonhole:
``D`` differing bits touch at most ``D`` segments, so at least one of the
``N`` is identical). ``N`` defaults to ``D + 1``, the largest segments and so
the fewest chance candidates. When the bit count is not a multiple of ``N``,
the first ``bits % N`` segments are one bit longer; the argument only needs
the segments to be disjoint and to cover every bit.

Duplicates form groups (union-find over the pairs: A~B and B~C put A, B, C
in one group even if A and C are further apart). One image per group is
kept: the one with the most pixels, then the first by path. With
``against`` (a held-out test set) every image that lies within ``D`` of a
test image is *contaminated*; it is never kept, and when a whole group is
contaminated none of it is.

Inputs are never modified. :func:`move_duplicates` moves the images not
kept (duplicates and contaminated) into a quarantine folder, keeping their
paths below their input folder, after writing a JSON manifest (atomically)
that :func:`undo_move` follows to put them back; undo refuses to overwrite a
file that reappeared at an original path.

Hashes are cached in an SQLite file keyed by absolute path, file size,
modification time (ns) and hash size: by default
``$MAPCLIP_CACHE/dedup/phash.sqlite`` (``~/.cache/mapclip/dedup/phash.sqlite``
without ``$MAPCLIP_CACHE``). An edited file changes size or mtime and is hashed
again. Unreadable images are skipped and listed.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import UsageError
from ..core.options import DEFAULT_HASH_SIZE, DEFAULT_MAX_DISTANCE, DedupOptions
from ..core.jobs import (TEMP_TAG, CancelFlag, _pid_alive, Job, ProgressFn, atomic_path, check_outputs, is_inside, same_file)

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
#: images per progress report / cancel check
BATCH = 128
MANIFEST_VERSION = 1
REPORT_COLUMNS = ("group", "action", "path", "duplicate_of", "distance", "width", "height",
                  "hash", "note")


# ------------------------------------------------------------ hash maths --
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


def _unique(hashes: Sequence[int]) -> Tuple[List[int], List[List[int]]]:
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
    values, items = _unique(hashes)
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


# --------------------------------------------------------------- hashing --
def default_cache_path() -> Path:
    from ..model.hub import CACHE_ENV
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "mapclip")
    return Path(root) / "dedup" / "phash.sqlite"


class HashCache:
    """p-Hashes by (absolute path, size, mtime ns, hash size), in SQLite."""

    def __init__(self, path: Optional[PathLike]):
        self.path = Path(path) if path else None
        self._db = None
        self._lock = threading.Lock()   # one connection, used by the hashing threads
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(self.path), check_same_thread=False)
                self._db.execute("CREATE TABLE IF NOT EXISTS phash (path TEXT, hash_size INTEGER,"
                                 " size INTEGER, mtime_ns INTEGER, hash TEXT, width INTEGER,"
                                 " height INTEGER, PRIMARY KEY (path, hash_size))")
            except (OSError, sqlite3.Error) as exc:
                raise UsageError(f"cannot use hash cache {self.path}: {exc}",
                                 "pass --cache PATH elsewhere, or --no-cache") from None

    def get(self, path: str, hash_size: int, size: int, mtime_ns: int):
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns, hash, width, height FROM phash "
                                   "WHERE path=? AND hash_size=?", (path, hash_size)).fetchone()
        if row is None or row[0] != size or row[1] != mtime_ns:
            return None
        return int(row[2], 16), int(row[3]), int(row[4])

    def put_many(self, rows: Iterable[tuple]) -> None:
        if self._db is None:
            return
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO phash VALUES (?,?,?,?,?,?,?)",
                                 [(p, hs, s, m, format(h, "x"), w, ht)
                                  for p, hs, s, m, h, w, ht in rows])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def phash_file(path: PathLike, hash_size: int = DEFAULT_HASH_SIZE) -> Tuple[int, int, int]:
    """(hash as int, width, height) of an image file (``imagehash.phash``)."""
    import imagehash
    from PIL import Image
    with Image.open(path) as img:
        img.load()
        h = imagehash.phash(img, hash_size=hash_size)
        bits = np.asarray(h.hash, dtype=bool).ravel()
        value = int("".join("1" if b else "0" for b in bits), 2)
        return value, int(img.width), int(img.height)


@dataclass
class ImageRecord:
    """One image: where it is, its hash and size, or why it could not be read."""

    path: str                     # absolute
    root: str                     # the input folder it was found under (absolute)
    hash: Optional[int] = None
    width: int = 0
    height: int = 0
    error: Optional[str] = None

    @property
    def pixels(self) -> int:
        return self.width * self.height


def input_roots(dirs: Sequence[PathLike]) -> List[str]:
    """The real folders (symlinks resolved) of ``dirs``, each once, in order."""
    out: List[str] = []
    for d in dirs:
        if not os.path.exists(d):
            raise UsageError(f"folder not found: {d}", "check the folder path")
        real = os.path.realpath(d)
        root = real if os.path.isdir(real) else os.path.dirname(real)
        if root not in out:
            out.append(root)
    return out


def list_images(dirs: Sequence[PathLike],
                links: Optional[Dict[str, List[str]]] = None) -> List[Tuple[str, str]]:
    """(absolute path, real root folder) of every image under ``dirs`` (recursive,
    sorted), each FILE once: files are identified by device and inode before
    anything is paired, so a symlink to an image, a hard link, a folder given
    twice or through a symlink never makes an image its own duplicate. Where a
    file is reached both directly and through a symlink, the real path is used;
    symlinked folders are not followed. ``links``, when given, is filled with
    listed path -> the input symlinks that point at it (moving that file would
    leave them dangling)."""
    found: Dict[Tuple[int, int], Tuple[str, str, bool]] = {}
    linked: Dict[Tuple[int, int], List[str]] = defaultdict(list)
    for d in dirs:
        if not os.path.exists(d):
            raise UsageError(f"folder not found: {d}", "check the folder path")
        real = os.path.realpath(d)
        if os.path.isfile(real):
            candidates, root = [real], os.path.dirname(real)
        else:
            root = real
            candidates = []
            for base, subdirs, names in os.walk(root, followlinks=False):
                subdirs.sort()
                candidates.extend(os.path.join(base, n) for n in sorted(names)
                                  if n.lower().endswith(IMAGE_EXTENSIONS))
        for p in candidates:
            try:
                st = os.stat(p)          # follows a symlink to its file
            except OSError:
                continue                 # a dangling link: not an image
            if not os.path.isfile(p):
                continue
            link = os.path.islink(p)
            key = (st.st_dev, st.st_ino)
            if link:
                linked[key].append(p)
            prev = found.get(key)
            if prev is None or (prev[2] and not link):
                found[key] = (p, root, link)
    if links is not None:
        links.update({found[k][0]: sorted(set(v) - {found[k][0]}) for k, v in linked.items()
                      if set(v) - {found[k][0]}})
    return sorted((p, root) for p, root, _ in found.values())


def hash_images(files: Sequence[Tuple[str, str]], hash_size: int = DEFAULT_HASH_SIZE,
                cache: Optional[HashCache] = None, job: Optional[Job] = None,
                workers: int = 2) -> Tuple[List[ImageRecord], int]:
    """Records for ``files`` ((path, root) pairs) and how many came from the cache."""
    job = job or Job()
    records: List[ImageRecord] = []
    from_cache = 0

    def one(item):
        path, root = item
        rec = ImageRecord(path=path, root=root)
        try:
            st = os.stat(path)
        except OSError as exc:
            rec.error = f"cannot stat: {exc.strerror}"
            return rec, None, False
        hit = cache.get(path, hash_size, st.st_size, st.st_mtime_ns) if cache else None
        if hit is not None:
            rec.hash, rec.width, rec.height = hit
            return rec, None, True
        try:
            rec.hash, rec.width, rec.height = phash_file(path, hash_size)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped, not fatal
            rec.error = f"unreadable: {type(exc).__name__}: {exc}"[:200]
            return rec, None, False
        return rec, (path, hash_size, st.st_size, st.st_mtime_ns, rec.hash, rec.width,
                     rec.height), False

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(files), BATCH):
            batch = files[start:start + BATCH]
            new = []
            for rec, row, hit in pool.map(one, batch):
                records.append(rec)
                from_cache += hit
                if row is not None:
                    new.append(row)
            if cache is not None and new:
                cache.put_many(new)
            job.step(len(batch))
    return records, from_cache


# --------------------------------------------------------------- finding --
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
    values, items = _unique(hashes)
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


# ---------------------------------------------------------------- moving --
@dataclass
class MoveResult:
    """What :func:`move_duplicates` or :func:`undo_move` did."""

    manifest: str
    moved: int
    skipped: List[str] = field(default_factory=list)   # entries not acted on, with reason
    #: partial copies an interrupted run left (its process gone), removed by this one
    removed_partial: List[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _partial_name(dst: Path, run: str) -> Path:
    """The temporary name of a cross-filesystem copy to ``dst`` by run ``run`` (the
    manifest's id): recognisable as this run's, so a later run can remove it."""
    return dst.with_name(f".{dst.name}.{TEMP_TAG}dedup-{run}-{os.getpid()}.part")


def remove_stale_partials(manifest: PathLike) -> List[str]:
    """Remove the partial copies (``.part`` files beside a move's source or target)
    that a killed run of ``manifest`` left, whose process is gone; the paths removed.
    A ``kill -9`` cannot remove its own; this is how they do not stay forever."""
    mpath = Path(manifest)
    run = mpath.stem[len("manifest-"):]
    try:
        moves = json.loads(mpath.read_text(encoding="utf-8"))["moves"]
        names = [(Path(str(m["from"])), Path(str(m["to"]))) for m in moves]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    pattern = re.compile(rf"^\.(.+)\.{re.escape(TEMP_TAG)}dedup-{re.escape(run)}-(\d+)\.part$")
    wanted: Dict[Path, set] = defaultdict(set)
    for a, b in names:
        for f in (a, b):
            wanted[f.parent].add(f.name)
    removed = []
    for folder, files in wanted.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for name in entries:
            m = pattern.match(name)
            if m and m.group(1) in files and not _pid_alive(int(m.group(2))):
                (folder / name).unlink(missing_ok=True)
                removed.append(str(folder / name))
    return removed


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _write_manifest(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


def check_quarantine(quarantine: PathLike, roots: Sequence[PathLike]) -> Path:
    """Refuse a quarantine folder equal to, inside or above an input folder (real
    paths compared), or one that cannot be written; call it before any work."""
    q = Path(os.path.abspath(quarantine))
    for root in roots:
        if is_inside(q, root) or is_inside(root, q):
            raise UsageError(f"quarantine {q} overlaps input folder {root}",
                             "choose a quarantine folder outside the inputs (and not above them)")
    check_outputs([("--move-to", q)], folders=["--move-to"], may_exist=["--move-to"])
    return q


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: PathLike, size: Optional[int], sha: Optional[str]) -> bool:
    """True when ``path`` has the size and hash a manifest recorded for it."""
    try:
        if size is not None and os.path.getsize(path) != int(size):
            return False
        return sha is None or file_sha256(path) == sha
    except OSError:
        return False


def safe_move(src: PathLike, dst: PathLike, size: Optional[int] = None,
              sha: Optional[str] = None, run: str = "") -> None:
    """Move one file without ever losing it. On one filesystem: a rename (atomic).
    Across filesystems: copy to a temporary name beside ``dst``, flush, verify
    size and SHA-256 against ``size``/``sha`` (the manifest's record), rename
    into place, and only then delete ``src``. A kill at any point leaves the
    original in place or a verified copy, never only a truncated one; the
    temporary copy is named with ``run`` (the manifest's id), so that the next
    run of that manifest removes it (:func:`remove_stale_partials`)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = _partial_name(dst, run or "0")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        shutil.copystat(src, tmp)
        if not _matches(tmp, size if size is not None else os.path.getsize(src),
                        sha if sha is not None else file_sha256(src)):
            raise UsageError(f"the copy of {src} in {dst.parent} does not match the original",
                             "check the quarantine's disk (space, errors) and run again; the "
                             "original was not touched")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.unlink(src)


def move_duplicates(result: DedupResult, quarantine: PathLike,
                    progress: Optional[ProgressFn] = None,
                    cancel: Optional[CancelFlag] = None) -> MoveResult:
    """Move ``result.remove`` into ``quarantine`` (below ``<k>-<input folder
    name>/`` and their path inside that folder), after writing the manifest
    ``quarantine/manifest-<UTC time>.json`` (the journal: every file's size and
    SHA-256, recorded before anything moves). Moves use :func:`safe_move`.
    Nothing is deleted."""
    q = check_quarantine(quarantine, result.roots + result.against_roots)
    roots = sorted(result.roots, key=len, reverse=True)
    moves = []
    for path in result.remove:
        root = next((r for r in roots if _inside(Path(path), Path(r))), None)
        if root is None:  # pragma: no cover - every image was found under a root
            raise UsageError(f"{path} is under no input folder", "report this")
        k = result.roots.index(root)
        rel = Path(path).relative_to(root)
        st = os.lstat(path)
        moves.append({"from": path, "to": str(q / f"{k}-{Path(root).name}" / rel),
                      "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "sha256": None if os.path.islink(path) else file_sha256(path)})
    for m in moves:
        if os.path.lexists(m["to"]):
            raise UsageError(f"{m['to']} already exists in the quarantine",
                             "choose an empty quarantine folder, or undo the last move first")
    q.mkdir(parents=True, exist_ok=True)
    removed = [p for old in sorted(q.glob("manifest-*.json")) for p in remove_stale_partials(old)]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    manifest = q / f"manifest-{stamp}.json"
    _write_manifest(manifest, {"version": MANIFEST_VERSION, "created": stamp,
                               "quarantine": str(q), "roots": result.roots,
                               "moves": moves, "undone": None})
    job = Job(progress, cancel, total=len(moves))
    job.set_total(len(moves))
    moved = 0
    for start in range(0, len(moves), BATCH):
        for m in moves[start:start + BATCH]:
            if os.path.islink(m["from"]):
                safe_move(m["from"], m["to"], run=stamp)
            else:
                safe_move(m["from"], m["to"], m["size"], m["sha256"], run=stamp)
            moved += 1
        job.step(len(moves[start:start + BATCH]))  # a cancel leaves a consistent manifest
    return MoveResult(manifest=str(manifest), moved=moved, removed_partial=removed)


def undo_move(manifest: PathLike, progress: Optional[ProgressFn] = None,
              cancel: Optional[CancelFlag] = None) -> MoveResult:
    """Move every file of a manifest back, each checked against the size and
    SHA-256 the manifest recorded. Refuses (moving nothing) when a different file
    has appeared at an original path, or when a quarantined file is not the one
    that was moved (a truncated copy, an edited file); entries already back are
    skipped, and a verified copy left by an interrupted move beside its intact
    original is removed."""
    mpath = Path(manifest)
    if not mpath.is_file():
        raise UsageError(f"manifest not found: {mpath}", "check the --undo path")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
        moves = data["moves"]
        entries = [(str(m["from"]), str(m["to"]), m.get("size"), m.get("sha256"))
                   for m in moves]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{mpath} is not a dedup manifest ({type(exc).__name__})",
                         "pass the manifest-*.json that --move-to wrote") from None
    todo, skipped, leftovers = [], [], []
    for src, dst, size, sha in entries:
        here, there = os.path.lexists(src), os.path.lexists(dst)
        is_link = os.path.islink(dst) if there else False
        if here and there:
            if not is_link and _matches(src, size, sha) and _matches(dst, size, sha):
                leftovers.append(dst)      # an interrupted cross-filesystem move: a copy
                skipped.append(f"{src}: already in place")
                continue
            raise UsageError(f"{src} exists again; undo would overwrite it",
                             "move it away, then run the undo again (nothing was moved)")
        if there:
            if not is_link and not _matches(dst, size, sha):
                raise UsageError(f"{dst} in the quarantine is not the file that was moved from "
                                 f"{src} (size or SHA-256 differs from the manifest)",
                                 "restore that file by hand if you know it is right; nothing "
                                 "was moved")
            todo.append((src, dst, size, sha, is_link))
        elif here:
            skipped.append(f"{src}: already in place")
        else:
            skipped.append(f"{src}: missing from the quarantine ({dst})")
    removed = remove_stale_partials(mpath)
    run = mpath.stem[len("manifest-"):]
    job = Job(progress, cancel, total=len(todo))
    job.set_total(len(todo))
    for dst in leftovers:
        os.unlink(dst)
    moved = 0
    created = {Path(d).parent for d in leftovers}
    for start in range(0, len(todo), BATCH):
        for src, dst, size, sha, is_link in todo[start:start + BATCH]:
            if is_link:
                safe_move(dst, src, run=run)
            else:
                safe_move(dst, src, size, sha, run=run)
            created.add(Path(dst).parent)
            moved += 1
        job.step(len(todo[start:start + BATCH]))
    q = Path(os.path.abspath(mpath.parent))
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        p = Path(os.path.abspath(folder))
        while p != q and _inside(p, q):
            try:
                p.rmdir()  # only empty folders the move made
            except OSError:
                break
            p = p.parent
    data["undone"] = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    _write_manifest(mpath, data)
    return MoveResult(manifest=str(mpath), moved=moved, skipped=skipped, removed_partial=removed)
