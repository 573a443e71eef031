"""The embedding cache: a bounded LRU in memory over a bounded folder on disk.

An entry is a few NumPy arrays and a small JSON ``meta`` dict, kept under the
digest of its key (:mod:`.keys`). On disk each entry is one ``.npz`` file in
``$MAPCLIP_CACHE/embeddings`` (``~/.cache/mapclip/embeddings`` without it),
written to a temporary name in the same folder and renamed into place, so a
reader (another process, a QGIS and a CLI at once) sees a whole entry or none.
The file holds the whole key; a read whose key differs, or a file that does
not load, is a miss (a damaged file is removed and rebuilt by the next pass).
After each write the oldest entries (by last use) are removed until the folder
is within its bound. Limits: :data:`engine.core.options.CACHE_MEMORY_MB` and
``CACHE_DISK_MB``, or ``$MAPCLIP_CACHE_MEMORY_MB`` / ``$MAPCLIP_CACHE_DISK_MB``.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..core.options import CACHE_DISK_MB, CACHE_MEMORY_MB
from .keys import key_digest
from ..model.hub import cache_dir

MEMORY_ENV = "MAPCLIP_CACHE_MEMORY_MB"
DISK_ENV = "MAPCLIP_CACHE_DISK_MB"
SUFFIX = ".npz"
_KEY = "__key__"
_META = "__meta__"


def _limit_bytes(env: str, default_mb: float) -> int:
    """A bound in MB from ``env`` (fractions allowed), else ``default_mb``; in bytes."""
    try:
        mb = float(os.environ.get(env, "").strip() or default_mb)
    except ValueError:
        mb = default_mb
    return int(max(0.0, mb) * 2 ** 20)


def cache_folder() -> Path:
    """``$MAPCLIP_CACHE/embeddings`` (the models' cache root, see engine.model.models)."""
    return cache_dir().parent / "embeddings"


@dataclass
class Entry:
    arrays: Dict[str, np.ndarray]
    meta: Dict[str, Any]
    source: str              # "memory" or "disk"

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


class EmbeddingCache:
    """See the module doc. Thread-safe; safe with other processes on the same folder."""

    def __init__(self, folder: Optional[Path] = None, memory_mb: Optional[float] = None,
                 disk_mb: Optional[float] = None):
        self._folder = folder
        self._memory_mb = memory_mb
        self._disk_mb = disk_mb
        self._mem: "OrderedDict[str, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    # limits and place are read at each use, so a changed $MAPCLIP_CACHE applies at once
    @property
    def folder(self) -> Path:
        return self._folder if self._folder is not None else cache_folder()

    @property
    def memory_bytes(self) -> int:
        if self._memory_mb is not None:
            return int(self._memory_mb * 2 ** 20)
        return _limit_bytes(MEMORY_ENV, CACHE_MEMORY_MB)

    @property
    def disk_bytes(self) -> int:
        if self._disk_mb is not None:
            return int(self._disk_mb * 2 ** 20)
        return _limit_bytes(DISK_ENV, CACHE_DISK_MB)

    def fits(self, nbytes: int) -> bool:
        """Whether a pass of ``nbytes`` is worth keeping (fits the memory or the disk bound)."""
        return 0 < nbytes <= max(self.memory_bytes, self.disk_bytes)

    # ------------------------------------------------------------------ get --
    def get(self, key: Dict[str, Any]) -> Optional[Entry]:
        digest = key_digest(key)
        mem_key = (str(self.folder), digest)
        with self._lock:
            hit = self._mem.get(mem_key)
            if hit is not None and hit[0] == key:
                self._mem.move_to_end(mem_key)
                return Entry(hit[1], dict(hit[2]), "memory")
        path = self.folder / (digest + SUFFIX)
        entry = self._load(path, key)
        if entry is not None:
            self._remember(mem_key, key, entry)
        return entry

    def _load(self, path: Path, key: Dict[str, Any]) -> Optional[Entry]:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = json.loads(str(z[_KEY]))
                meta = json.loads(str(z[_META]))
                arrays = {k: z[k] for k in z.files if k not in (_KEY, _META)}
        except Exception:  # noqa: BLE001 - a damaged or foreign file: dropped, rebuilt later
            self._remove(path)
            return None
        if stored != key:
            return None
        try:
            os.utime(path)      # last use, for eviction
        except OSError:
            pass
        return Entry(arrays, meta, "disk")

    # ------------------------------------------------------------------ put --
    def put(self, key: Dict[str, Any], arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> bool:
        """Keep a pass; False when it is larger than both bounds (nothing kept)."""
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        entry = Entry(arrays, dict(meta), "memory")
        if not self.fits(entry.nbytes):
            return False
        digest = key_digest(key)
        self._remember((str(self.folder), digest), key, entry)
        if entry.nbytes <= self.disk_bytes:
            self._write(self.folder / (digest + SUFFIX), key, entry)
            self._evict_disk()
        return True

    def _remember(self, mem_key, key, entry: Entry) -> None:
        if entry.nbytes > self.memory_bytes:
            return
        with self._lock:
            self._mem[mem_key] = (key, entry.arrays, entry.meta, entry.nbytes)
            self._mem.move_to_end(mem_key)
            total = sum(v[3] for v in self._mem.values())
            while total > self.memory_bytes and self._mem:
                _, old = self._mem.popitem(last=False)
                total -= old[3]

    def _write(self, path: Path, key, entry: Entry) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=SUFFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **entry.arrays, **{_KEY: np.array(json.dumps(key)),
                                                   _META: np.array(json.dumps(entry.meta))})
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:
            pass    # a full or read-only disk: the entry stays in memory only

    def _evict_disk(self) -> None:
        files = self._files()
        total = sum(s for _, s, _ in files)
        for path, size, _ in sorted(files, key=lambda f: f[2]):
            if total <= self.disk_bytes:
                break
            self._remove(path)
            total -= size

    def _files(self):
        out = []
        try:
            items = list(self.folder.iterdir())
        except OSError:
            return out
        now = time.time()
        for p in items:
            try:
                st = p.stat()
            except OSError:
                continue
            if p.name.startswith(".part-"):
                if now - st.st_mtime > 3600:      # left by a killed writer
                    self._remove(p)
                continue
            if p.suffix == SUFFIX:
                out.append((p, st.st_size, st.st_mtime))
        return out

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    # -------------------------------------------------------- info / clear --
    def info(self) -> Dict[str, Any]:
        files = self._files()
        with self._lock:
            mem_n = len(self._mem)
            mem_b = sum(v[3] for v in self._mem.values())
        return {"folder": str(self.folder), "entries": len(files),
                "disk_mb": round(sum(s for _, s, _ in files) / 2 ** 20, 2),
                "disk_limit_mb": round(self.disk_bytes / 2 ** 20, 2),
                "memory_entries": mem_n, "memory_mb": round(mem_b / 2 ** 20, 2),
                "memory_limit_mb": round(self.memory_bytes / 2 ** 20, 2)}

    def clear(self) -> int:
        """Empty memory and disk; returns the number of files removed."""
        with self._lock:
            self._mem.clear()
        files = self._files()
        for p, _, _ in files:
            self._remove(p)
        return len(files)


#: the process-wide cache every job uses
CACHE = EmbeddingCache()
