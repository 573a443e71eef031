"""Writing an index: the writer's lock, :class:`IndexWriter` (shards and
manifests committed atomically, leftovers of an interrupted commit removed)
and footprints.gpkg, every tile's footprint as a polygon for GIS users.
The format it writes is engine.archive.format.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..core.errors import UsageError
from ..core.outputs import (DATASET_OPTIONS, WGS84, _pyogrio_raw, footprint_columns,
                            output_crs, same_crs)
from ..core.wkb import polygon_wkb
from . import approx
from .format import (FOOTPRINTS, FOOTPRINTS_LAYER, FORMAT, FORMAT_VERSION, LOCK, MANIFEST, SHARDS_DIR,
                     TILE_DTYPE, _fsync_write, content_id, load_shard, save_npy, shard_check,
                     short_crs)


class WriteLock:
    """An exclusive writer lock file (INDEX/.lock holding the writer's pid).

    A lock whose process no longer exists is stale and taken over.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def __enter__(self) -> "WriteLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UsageError(f"index {self.path.parent} is being written by process {pid}",
                                     "wait for that build to finish (or stop it) and run again")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise UsageError(f"cannot lock index {self.path.parent}", f"remove {self.path} if no build runs")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IndexWriter:
    """Commits shards and manifests of one index folder (hold the lock while writing)."""

    def __init__(self, folder: Path, manifest: Dict[str, Any]):
        self.folder = folder
        self.manifest = manifest
        (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, folder: Path, identity: Dict[str, Any], layout: Dict[str, Any]) -> "IndexWriter":
        folder.mkdir(parents=True, exist_ok=True)
        m = {"format": FORMAT, "version": FORMAT_VERSION, "uid": uuid.uuid4().hex,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "model": identity, "options": layout, "rasters": [], "shards": [],
             "next_raster": 1, "next_shard": 1, "footprints": None,
             "approx": {"threshold_rows": approx.APPROX_MIN_ROWS, "factory": approx.approx_factory(identity["embed_dim"])},
             "checksum": "fast1: sha256 of size, mtime_ns, first MiB, last 64 KiB and 32 sampled 64 KiB blocks"}
        w = cls(folder, m)
        w.save()
        return w

    def save(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = json.dumps(self.manifest, indent=1).encode("utf-8")
        _fsync_write(self.folder / MANIFEST, lambda f: f.write(data))

    def clean(self) -> None:
        """Remove files no manifest names: leftovers of an interrupted commit."""
        keep = {s["emb"] for s in self.manifest["shards"]} | {s["tiles"] for s in self.manifest["shards"]}
        for p in (self.folder / SHARDS_DIR).iterdir():
            rel = f"{SHARDS_DIR}/{p.name}"
            if rel not in keep:
                p.unlink(missing_ok=True)
        for p in self.folder.glob("*.part"):
            p.unlink(missing_ok=True)

    def raster_entry(self, path: str) -> Optional[Dict[str, Any]]:
        for r in self.manifest["rasters"]:
            if r["path"] == path:
                return r
        return None

    def drop_rows(self, entry: Dict[str, Any]) -> None:
        """Forget a raster's rows (manifest first, then the files)."""
        rid = int(entry["id"])
        gone = [s for s in self.manifest["shards"] if int(s["raster"]) == rid]
        self.manifest["shards"] = [s for s in self.manifest["shards"] if int(s["raster"]) != rid]
        entry["progress"] = {}
        entry["complete"] = False
        self.save()
        for s in gone:
            (self.folder / s["emb"]).unlink(missing_ok=True)
            (self.folder / s["tiles"]).unlink(missing_ok=True)

    def commit(self, entry: Dict[str, Any], tile_px: int, emb: np.ndarray, tiles: np.ndarray,
               first_tile: int, next_tile: int) -> None:
        """Write one shard (may be empty of rows) and record progress, atomically."""
        if len(tiles):
            sid = int(self.manifest["next_shard"])
            self.manifest["next_shard"] = sid + 1
            emb_rel, tiles_rel = f"{SHARDS_DIR}/{sid:06d}.emb.npy", f"{SHARDS_DIR}/{sid:06d}.tiles.npy"
            emb = np.ascontiguousarray(emb, dtype=np.float16)
            tiles = np.ascontiguousarray(tiles, dtype=TILE_DTYPE)
            save_npy(self.folder / emb_rel, emb)
            save_npy(self.folder / tiles_rel, tiles)
            self.manifest["shards"].append({"id": sid, "raster": int(entry["id"]), "tile_px": int(tile_px),
                                            "rows": int(len(tiles)), "first_tile": int(first_tile),
                                            "next_tile": int(next_tile), "emb": emb_rel, "tiles": tiles_rel,
                                            "check": shard_check(emb, tiles)})
        entry["progress"][str(tile_px)] = int(next_tile)
        self.save()


# --------------------------------------------------------------------------- #
# footprints.gpkg: every tile as a polygon, for GIS users.
# --------------------------------------------------------------------------- #
def _rows_in_crs(tiles: np.ndarray, rasters: Dict[int, Dict[str, Any]], crs: Optional[str]) -> np.ndarray:
    """(n, 4) boxes of ``tiles`` in ``crs``: native bounds where the raster's CRS is
    ``crs``, WGS84 bounds where ``crs`` is WGS84, else transformed corners."""
    boxes = np.stack([tiles["xmin"], tiles["ymin"], tiles["xmax"], tiles["ymax"]], axis=1)
    if not len(tiles):
        return boxes
    out = boxes.copy()
    for rid in np.unique(tiles["raster"]):
        sel = tiles["raster"] == rid
        rcrs = rasters[int(rid)].get("crs")
        if same_crs(rcrs, crs) or not crs:
            continue
        if same_crs(crs, WGS84):
            t = tiles[sel]
            out[sel] = np.stack([t["lon_min"], t["lat_min"], t["lon_max"], t["lat_max"]], axis=1)
        else:
            from rasterio.warp import transform
            b = boxes[sel]
            xs = np.concatenate([b[:, 0], b[:, 2], b[:, 0], b[:, 2]])
            ys = np.concatenate([b[:, 1], b[:, 1], b[:, 3], b[:, 3]])
            tx, ty = transform(rcrs, crs, xs, ys)
            tx, ty = np.asarray(tx).reshape(4, -1), np.asarray(ty).reshape(4, -1)
            out[sel] = np.stack([tx.min(0), ty.min(0), tx.max(0), ty.max(0)], axis=1)
    return out


def write_footprints(writer: IndexWriter) -> None:
    """Rewrite INDEX/footprints.gpkg (layer ``tiles``) from the shards, atomically."""
    folder = writer.folder
    m = writer.manifest
    final = folder / FOOTPRINTS
    rasters = {int(r["id"]): r for r in m["rasters"]}
    if not any(int(s["rows"]) for s in m["shards"]):
        final.unlink(missing_ok=True)
        m["footprints"] = None
        writer.save()
        return
    dim = int(m["model"]["embed_dim"])
    tiles = np.concatenate([load_shard(folder, s, dim)[1] for s in m["shards"]])
    crs = output_crs(r.get("crs") for r in m["rasters"]
                     if any(int(s["raster"]) == int(r["id"]) for s in m["shards"]))
    boxes = _rows_in_crs(tiles, rasters, crs)
    cols = footprint_columns(tiles, {rid: r["path"] for rid, r in rasters.items()})
    raw = _pyogrio_raw()
    tmp = folder / (FOOTPRINTS + ".part.gpkg")
    tmp.unlink(missing_ok=True)
    try:
        geom = polygon_wkb(boxes)
        raw.write(str(tmp), geom, list(cols.values()), list(cols.keys()),
                          layer=FOOTPRINTS_LAYER, driver="GPKG", geometry_type="Polygon", crs=crs,
                          dataset_options=DATASET_OPTIONS["GPKG"])
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    m["footprints"] = {"file": FOOTPRINTS, "layer": FOOTPRINTS_LAYER, "content": content_id(m),
                       "crs": short_crs(crs)}
    writer.save()
