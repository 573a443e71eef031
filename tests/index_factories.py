"""Indexes made from given vectors, for tests and benchmarks (bench/ imports
them too): an in-memory :class:`Index` over arrays, and an index folder in the
real format written from blocks of unit vectors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from mapclip.engine.archive.format import FORMAT, FORMAT_VERSION, TILE_DTYPE
from mapclip.engine.archive.store import Index
from mapclip.engine.archive.writer import IndexWriter


def index_from_arrays(emb: np.ndarray, tiles: Optional[np.ndarray] = None,
                      model: Optional[Dict[str, Any]] = None) -> Index:
    """An in-memory Index over given vectors (benchmarks, tests); nothing is cached on disk."""
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    n, d = emb.shape
    manifest = {"format": FORMAT, "version": FORMAT_VERSION,
                "model": dict(model or {}, embed_dim=d), "options": {}, "rasters": [],
                "shards": [{"id": 1, "raster": 0, "rows": n, "emb": "", "tiles": ""}]}
    return Index.from_manifest(manifest, None, embeddings=emb,
                               tiles=tiles if tiles is not None else np.zeros(n, TILE_DTYPE))


def index_folder_from_blocks(folder, blocks, dim: int) -> Path:
    """An index folder in the real format from (rows, dim) float32 unit-vector
    blocks (benchmarks and tests of search at scale): one shard per block, tile
    records numbering the rows of one pretend raster without CRS."""
    identity = {"spec": "synthetic", "arch": "synthetic", "embed_dim": int(dim),
                "probe_text": [1.0] + [0.0] * (dim - 1), "probe_image": [1.0] + [0.0] * (dim - 1)}
    layout = {"scales": [224], "stride_px": 224, "gsd": None,
              "read": {"bands": None, "stretch": "percentile", "percentiles": [2, 98], "fixed_range": None},
              "min_valid": 0.5}
    w = IndexWriter.create(Path(folder), identity, layout)
    entry = {"id": 1, "path": str(Path(folder) / "synthetic.tif"), "name": "synthetic.tif",
             "checksum": "", "progress": {}, "complete": False, "crs": None,
             "transform": [1.0, 0.0, 0.0, 0.0, -1.0, 0.0], "width": 0, "height": 0}
    w.manifest["rasters"].append(entry)
    w.manifest["next_raster"] = 2
    at = 0
    for block in blocks:
        n = len(block)
        rec = np.zeros(n, TILE_DTYPE)
        rec["raster"], rec["tile_px"], rec["tile"] = 1, 224, np.arange(at, at + n)
        rec["width"] = rec["height"] = 224
        rec["xmin"] = np.arange(at, at + n) * 224.0
        rec["xmax"] = rec["xmin"] + 224.0
        rec["ymin"], rec["ymax"] = -224.0, 0.0
        rec["lon_min"] = rec["lat_min"] = rec["lon_max"] = rec["lat_max"] = np.nan
        w.commit(entry, 224, block.astype(np.float16), rec, at, at + n)
        at += n
    entry["complete"] = True
    w.save()
    return Path(folder)

