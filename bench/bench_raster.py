"""Raster reader benchmark: tiles/s of iter_tile_batches with reader threads and
reader processes (mapclip/engine/raster/workers.py), each figure printed with its goal.

On a generated 3-band uint8 GeoTIFF, tiled 512 px and deflate-compressed
(the issue's case), 224-px tiles, no overlap, batch 256, a consumer that
only touches each batch:

* 1 and 2 reader threads (``ReadOptions.workers=0``), for comparison;
* 1 and 2 reader processes and the ratio 2 / 1 (goal >= 1.8x on a 2-core
  machine), in wall-clock tiles/s and in tiles per CPU-second of the
  workers (equal per-CPU figures mean no block is decoded twice);
* per core: tiles per CPU-second of one reader process (goal >= 5,000
  224-px tiles/s from a deflate tiled GeoTIFF), next to what GDAL's deflate
  decoding alone reaches on one core (the ceiling) and the same raster
  uncompressed.

Each pass opens new handles (no GDAL cache carried over); the file is read
once first so the page cache holds it. Default 8000 x 8000 px (1,296 tiles a
pass, two passes; the reader processes' start, about 0.04 CPU-s each, is
counted), ``--full`` 16000 x 16000. The wall-clock figures
suffer on a shared CPU (the load average is printed); the CPU-second
figures much less. Rasters are cached in .cache/bench/.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_RATIO = 1.8
GOAL_PER_CORE = 5000


def _raster(side: int, compress: str = "deflate") -> Path:
    from bench.fixtures import cached
    t0 = time.perf_counter()
    path, made = cached(f"raster_{side}_u8x3_b512_{compress}.tif", side, side, CACHE,
                        block=512, compress=None if compress == "none" else compress)
    if made:
        print(f"  generated {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measure(path: Path, workers: int, threads: int = 1, tile: int = 224, batch: int = 256,
            min_tiles: int = 2000) -> dict:
    """Stream the grid (whole passes until ``min_tiles``); wall and CPU figures."""
    from mapclip.engine.core.options import ReadOptions
    from mapclip.engine.raster.stream import iter_tile_batches
    from mapclip.engine.raster.reader import open_raster
    n = 0
    wall = worker_cpu = 0.0
    c0 = _self_cpu()
    with open_raster(path, ReadOptions(workers=workers)) as r:
        grid = r.grid(tile_px=tile)
        passes = max(1, -(-min_tiles // len(grid)))
        for _ in range(passes):
            t0 = time.perf_counter()
            it = iter_tile_batches(r, grid.tiles, batch, workers=threads, prefetch=max(2, threads))
            try:
                for ts, arr in it:
                    arr[:, 0, 0, 0].sum()            # touch the batch
                    n += len(ts)
            finally:
                it.close()
            wall += time.perf_counter() - t0
            worker_cpu += sum(getattr(it, "worker_cpu_s", {}).values())
    main_cpu = _self_cpu() - c0
    return {"tiles": n, "wall": wall, "tps": n / wall, "main_cpu": main_cpu,
            "worker_cpu": worker_cpu,
            "per_cpu": n / max(1e-9, worker_cpu if workers else main_cpu)}


def decode_ceiling(path: Path, tile: int = 224) -> float:
    """224-px tiles' worth of pixels per CPU-second that GDAL alone decodes,
    reading the raster once by whole block rows (no tiles cut): the most any
    reader can get from one core."""
    import rasterio
    from rasterio.windows import Window

    from mapclip.engine.raster.reader import _limit_gdal_cache
    _limit_gdal_cache()
    with rasterio.open(path) as ds:
        bh = ds.block_shapes[0][0]
        c0 = time.process_time()
        for r in range(0, ds.height, bh):
            ds.read(window=Window(0, r, ds.width, min(bh, ds.height - r)))
        cpu = time.process_time() - c0
        return ds.width * ds.height / (tile * tile) / max(cpu, 1e-9)


def run(argv) -> None:
    ap = argparse.ArgumentParser(prog="bench_raster", add_help=False)
    ap.add_argument("--full", action="store_true")
    args, _ = ap.parse_known_args(argv)
    side = 16000 if args.full else 8000
    min_tiles = 10000 if args.full else 2500
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"raster reader: {side} x {side} px, 3-band uint8, 512-px blocks, deflate; 224-px "
          f"tiles, batch 256; {os.cpu_count()} cores, load average at start {load:.1f}",
          flush=True)
    path = _raster(side)
    measure(path, 0, 1, min_tiles=1)                   # page cache
    measure(path, 1, min_tiles=1)                      # forkserver started once
    res = {}
    for label, workers, threads in (("1 thread", 0, 1), ("2 threads", 0, 2),
                                    ("1 process", 1, 1), ("2 processes", 2, 1)):
        m = res[label] = measure(path, workers, threads, min_tiles=min_tiles)
        cpu_note = (f"workers' CPU {m['worker_cpu']:.2f} s, consumer CPU {m['main_cpu']:.2f} s"
                    if workers else f"CPU {m['main_cpu']:.2f} s")
        print(f"  {label:<11}: {m['tiles']} tiles in {m['wall']:.2f} s = {m['tps']:,.0f} tiles/s "
              f"({cpu_note})", flush=True)
    one, two = res["1 process"], res["2 processes"]
    ratio = two["tps"] / one["tps"]
    print(f"  reader processes 2 / 1 (wall clock): {ratio:.2f}x   goal >= {GOAL_RATIO}x  "
          f"[{'met' if ratio >= GOAL_RATIO else 'NOT met'}]", flush=True)
    per_core = one["per_cpu"]
    print(f"  per core (tiles per CPU-second of one reader process): {per_core:,.0f} tiles/s   "
          f"goal >= {GOAL_PER_CORE:,}  [{'met' if per_core >= GOAL_PER_CORE else 'NOT met'}]",
          flush=True)
    ceiling = decode_ceiling(path)
    print(f"  GDAL's deflate decode alone (whole block rows, no tiles cut): {ceiling:,.0f} "
          f"tiles' worth per CPU-second: the ceiling for any reader on this CPU", flush=True)
    raw = _raster(side, "none")
    measure(raw, 1, min_tiles=1)
    m = measure(raw, 1, min_tiles=min_tiles)
    print(f"  same raster uncompressed, 1 process: {m['per_cpu']:,.0f} tiles per CPU-second "
          f"({m['tps']:,.0f} tiles/s wall clock)", flush=True)
    eff = two["per_cpu"] / max(1e-9, one["per_cpu"])
    print(f"  2 processes' tiles per CPU-second / 1 process's: {eff:.2f} (1.0 = no work "
          "duplicated between workers: each block decoded once)", flush=True)


if __name__ == "__main__":
    run(sys.argv[1:])
