"""Raster reader benchmark: tile throughput and peak memory of iter_tile_batches.

Default (a few minutes on a small CPU):
  * throughput on a generated 4000 x 4000 uint8 3-band GeoTIFF tiled 512 px,
    224-px tiles, no overlap, batch 256, for 1/2/4 reader threads, plus the
    same tiles read one GDAL call per tile (RasterReader.read) for comparison,
    and a 0.5x GSD-resampled run;
  * peak RSS (ru_maxrss) of a fresh subprocess that streams every tile of an
    8000 x 8000 raster, next to the RSS of the same subprocess after imports.
``--full``: 10000 x 10000 for throughput, 20000 x 20000 for memory.
Rasters are generated block by block and cached in .cache/bench/.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"


def _raster(width: int, height: int, block: int = 512) -> Path:
    from tests.raster_fixtures import write_blockwise
    path = CACHE / f"raster_{width}x{height}_u8x3_b{block}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_suffix(".part.tif")
        write_blockwise(tmp, width, height, bands=3, dtype="uint8", block=block)
        os.replace(tmp, path)
        print(f"  generated {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def _throughput(path: Path, tile: int, batch: int, workers: int, min_tiles: int,
                gsd_scale: float = 1.0):
    """Stream the raster's grid through iter_tile_batches (whole passes until at
    least ``min_tiles``) with a consumer that only touches each batch.

    Each pass is a new iterator with new dataset handles, so no pass reads
    blocks that GDAL cached in an earlier one.
    """
    from mapclip.engine.raster.batches import iter_tile_batches
    from mapclip.engine.raster.reader import open_raster
    from mapclip.engine.geo.tiling import TileGrid
    with open_raster(path) as r:
        gsd = r.info.res[0] * gsd_scale if gsd_scale != 1.0 else None
        grid = TileGrid.for_raster(r.info, None, tile, gsd=gsd)
        passes = max(1, -(-min_tiles // len(grid)))
        n = nbytes = skipped = 0
        t0 = time.perf_counter()
        c0 = _cpu()
        for _ in range(passes):
            with iter_tile_batches(r, grid.tiles, batch, workers=workers,
                                   prefetch=workers) as it:
                for ts, arr in it:
                    n += len(ts)
                    nbytes += arr.nbytes
                skipped += it.skipped
        dt = time.perf_counter() - t0
        cpu = _cpu() - c0
        native_mb = passes * sum(t.width * t.height * 3 for t in grid.tiles) / 1e6
    return n, dt, nbytes / 1e6, native_mb, skipped, cpu


def _cpu() -> float:
    """CPU seconds of this process, all threads (meaningful on a shared machine)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _per_tile(path: Path, tile: int, limit: int):
    from mapclip.engine.raster.reader import open_raster
    from mapclip.engine.geo.tiling import TileGrid
    with open_raster(path) as r:
        tiles = TileGrid.for_raster(r.info, None, tile).tiles[:limit]
        t0 = time.perf_counter()
        for t in tiles:
            r.read(t.window())
        return len(tiles), time.perf_counter() - t0


_RSS_CHILD = r"""
import resource, sys, time
sys.path.insert(0, {root!r})

def hwm_mb():
    # VmHWM: peak RSS of this process image (ru_maxrss on Linux also carries
    # the parent's peak over fork + exec, which would hide the reader's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from mapclip.engine.raster.batches import iter_tile_batches
from mapclip.engine.raster.reader import open_raster
from mapclip.engine.geo.tiling import TileGrid
base = hwm_mb()
t0 = time.perf_counter()
with open_raster({path!r}) as r:
    grid = TileGrid.for_raster(r.info, None, {tile})
    n = 0
    for tiles, arr in iter_tile_batches(r, grid.tiles, {batch}, workers=2, prefetch=2):
        n += len(tiles)
peak = hwm_mb()
print(n, base, peak, time.perf_counter() - t0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def _peak_rss(path: Path, tile: int, batch: int):
    code = _RSS_CHILD.format(root=str(ROOT), path=str(path), tile=tile, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2]), float(out[3])


def run(argv) -> None:
    ap = argparse.ArgumentParser(prog="bench_raster")
    ap.add_argument("--full", action="store_true", help="issue sizes: 10000^2 and 20000^2")
    args, _ = ap.parse_known_args([a for a in argv if a.startswith("--")])
    sys.path.insert(0, str(ROOT))
    size = 10000 if args.full else 4000
    big = 20000 if args.full else 8000
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"raster reader benchmark ({'--full' if args.full else 'default'} sizes: "
          f"throughput {size}x{size}, memory {big}x{big}); machine: {_machine()}; "
          f"load average at start {load:.1f} (wall-clock figures suffer on a shared CPU; "
          f"tiles per CPU-second do less)", flush=True)
    path = _raster(size, size)
    tile, batch = 224, 256
    min_tiles = 6000 if args.full else 3000
    _throughput(path, tile, batch, 2, 1)  # warm the page cache
    for workers in (1, 2, 4):
        n, dt, mb, native_mb, skipped, cpu = _throughput(path, tile, batch, workers, min_tiles)
        print(f"  iter_tile_batches {tile}px tiles, batch {batch}, {workers} reader thread(s): "
              f"{n} tiles in {dt:.2f} s = {n / dt:,.0f} tiles/s, {mb / dt:,.0f} MB/s of uint8 "
              f"tiles; {cpu:.2f} CPU s = {n / max(cpu, 1e-9):,.0f} tiles per CPU-second "
              f"(skipped {skipped})", flush=True)
    n, dt, mb, native_mb, _, cpu = _throughput(path, tile, batch, 2, min_tiles // 2,
                                               gsd_scale=2.0)
    print(f"  GSD 2x native (each tile reads {2 * tile}px native, averaged to {tile}px), "
          f"2 threads: {n / dt:,.0f} tiles/s, {native_mb / dt:,.0f} MB/s native pixels read; "
          f"{n / max(cpu, 1e-9):,.0f} tiles per CPU-second", flush=True)
    n, dt = _per_tile(path, tile, 1000)
    print(f"  for comparison, one RasterReader.read call per tile (1 thread): {n / dt:,.0f} tiles/s",
          flush=True)
    bpath = _raster(big, big)
    n, base, peak, secs = _peak_rss(bpath, tile, batch)
    print(f"  peak RSS streaming all of {big}x{big} ({big * big * 3 / 1e9:.2f} GB of pixels, "
          f"{n} tiles of {tile}px, batch {batch}, 2 threads, {secs:.1f} s): {peak:,.0f} MB "
          f"(after imports {base:,.0f} MB, so the reader's own {peak - base:,.0f} MB)", flush=True)


def _machine() -> str:
    try:
        from bench.run import machine
        return machine()
    except Exception:  # pragma: no cover
        import platform
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    run(sys.argv[1:])
