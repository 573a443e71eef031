"""Images found and hashed: the p-Hash of each, kept in a cache.

Every image gets a p-Hash (``imagehash.phash``: the sign pattern of the
lowest ``hash_size x hash_size`` DCT coefficients of a 32 x 32 grey copy,
64 bits for the default ``hash_size=8``). Images are listed once per file
(device and inode), so links never make an image its own duplicate.

Hashes are cached in an SQLite file keyed by absolute path, file size,
modification time (ns) and hash size: by default
``$MAPCLIP_CACHE/dedup/phash.sqlite`` (``~/.cache/mapclip/dedup/phash.sqlite``
without ``$MAPCLIP_CACHE``). An edited file changes size or mtime and is hashed
again. Unreadable images are skipped and listed.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import UsageError
from ..core.jobs import Job
from ..core.options import DEFAULT_HASH_SIZE
from ..model.hub import CACHE_ENV

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
#: images per progress report / cancel check
BATCH = 128


def default_cache_path() -> Path:
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
