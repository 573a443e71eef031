"""engine.raster.workers: reader processes give the thread reader's tiles, in its order,
byte for byte; they stop on cancel, report errors clearly and leave no process
or shared memory behind."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from mapclip.engine.core.errors import Cancelled, UsageError
from mapclip.engine.core.jobs import Job
from mapclip.engine.core.options import ReadOptions, check
from mapclip.engine.raster.reader import RasterReadError, open_raster
from mapclip.engine.raster.batches import TileBatches
from mapclip.engine.raster.process_plan import (AUTO_MIN_TILES, MAX_AUTO_WORKERS, WORKERS_ENV, balanced_cuts, resolve_workers,
                                               stripe_owner)
from mapclip.engine.raster.stream import iter_tile_batches
from mapclip.engine.raster.workers import SHM_PREFIX, ProcessTileBatches
from tests.raster_fixtures import make_raster, noise


def _shm_left() -> list:
    prefix = f"{SHM_PREFIX}-{os.getpid()}-"
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except FileNotFoundError:  # pragma: no cover - not Linux
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes only once reaped; check its state
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


def _read_all(path, workers, tile=64, batch=7, hold=False, **ropts):
    """(tile indices per batch, batches, skipped, reader type) for one pass."""
    with open_raster(path, ReadOptions(workers=workers, **ropts), quiet=True) as r:
        grid = r.grid(tile_px=tile)
        idx, arrays = [], []
        with iter_tile_batches(r, grid.tiles, batch, min_valid=0.5) as it:
            kind = type(it)
            for tiles, arr in it:
                idx.append([t.index for t in tiles])
                arrays.append(arr if hold else arr.copy())
            skipped = it.skipped
    return idx, arrays, skipped, kind


# --------------------------------------------------------------- choosing --
def test_auto_uses_threads_for_small_jobs_and_processes_for_large_ones(tmp_path, monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    p = str(make_raster(tmp_path / "a.tif", 64, 64))
    assert resolve_workers("auto", AUTO_MIN_TILES - 1, p, cpu_count=8) == 0
    assert resolve_workers("auto", AUTO_MIN_TILES, p, cpu_count=8) == 7
    assert resolve_workers("auto", 10 ** 6, p, cpu_count=64) == MAX_AUTO_WORKERS
    assert resolve_workers("auto", 10 ** 6, p, cpu_count=2) == 1
    assert resolve_workers("auto", 10 ** 6, p, cpu_count=1) == 0   # one core: threads
    assert resolve_workers("auto", 10 ** 6, "/vsimem/x.tif", cpu_count=8) == 0
    assert resolve_workers(0, 10 ** 6, p, cpu_count=8) == 0
    assert resolve_workers(3, 5, p, cpu_count=1) == 3               # what the user asked
    monkeypatch.setenv(WORKERS_ENV, "2")
    assert resolve_workers("auto", 5, p, cpu_count=8) == 2
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(UsageError) as e:
        resolve_workers("auto", 5, p)
    assert WORKERS_ENV in e.value.message and e.value.option == "read_workers"


def test_explicit_processes_need_a_file_on_disk():
    with pytest.raises(UsageError) as e:
        resolve_workers(2, 10, "/vsimem/x.tif")
    assert "file on disk" in e.value.message and "0" in e.value.hint


@pytest.mark.parametrize("bad", [-1, "many", 1.5, True])
def test_read_workers_option_is_checked(bad):
    with pytest.raises(UsageError) as e:
        check(ReadOptions(workers=bad))
    assert e.value.option == "read_workers" and "auto" in e.value.hint
    for good in ("auto", 0, 4):
        check(ReadOptions(workers=good))


def test_stripes_follow_block_columns(tmp_path):
    p = make_raster(tmp_path / "s.tif", 512, 64, block=64)        # 8 block columns
    with open_raster(p) as r:
        own = stripe_owner(r.info, 2)
        tiles = r.grid(tile_px=32).tiles
        owners = [own(t) for t in tiles if t.row == 0]
    assert owners == [0] * 8 + [1] * 8                            # 4 block columns each
    # 48-px tiles straddle block boundaries: contiguous stripes, both used
    with open_raster(p) as r:
        row = [t for t in r.grid(tile_px=48).tiles if t.row == 0]
        own = stripe_owner(r.info, 2, [(t.col, t.width) for t in row])
        owners = [own(t) for t in row]
    assert owners == sorted(owners) and set(owners) == {0, 1}
    strips = make_raster(tmp_path / "strips.tif", 512, 64, block=None)
    with open_raster(strips) as r:
        assert stripe_owner(r.info, 2) is None                    # whole batches in turn


def _decoded(spans, bw, width, cuts):
    """Block-column pixels each stripe decodes for these cuts."""
    b = list(cuts) + [len(spans)]
    return [min(width, -(-max(c + w for c, w in spans[b[k]:b[k + 1]]) // bw) * bw)
            - spans[b[k]][0] // bw * bw for k in range(len(cuts))]


@pytest.mark.parametrize("width,tile,bw,n", [(16000, 224, 512, 2), (8000, 224, 512, 2),
                                             (512, 48, 64, 2), (3000, 100, 256, 3),
                                             (5000, 224, 512, 4)])
def test_stripe_cuts_minimise_the_widest_stripes_decoding(width, tile, bw, n):
    """The cut between stripes is the best one: no other split into n contiguous
    stripes makes the widest stripe decode fewer block-column pixels (brute force)."""
    import itertools
    spans = [(c, min(tile, width - c)) for c in range(0, width, tile)]
    cuts = balanced_cuts(spans, bw, width, n)
    assert cuts[0] == 0 and cuts == sorted(set(cuts)) and len(cuts) == n
    best = min(max(_decoded(spans, bw, width, (0,) + rest))
               for rest in itertools.combinations(range(1, len(spans)), n - 1))
    assert max(_decoded(spans, bw, width, cuts)) == best
    even = [0] + [next(i for i, (c, _) in enumerate(spans) if c >= k * -(-width // bw // n) * bw)
                  for k in range(1, n)]
    assert best <= max(_decoded(spans, bw, width, even))      # never worse than block columns shared evenly


# ------------------------------------------------------------ same bytes --
@pytest.mark.parametrize("case", ["tiled-deflate-nodata", "strips", "uint16-gsd"])
def test_processes_give_the_thread_readers_tiles_order_and_bytes(tmp_path, case):
    if case == "tiled-deflate-nodata":
        p = make_raster(tmp_path / "t.tif", 520, 330, block=64, compress="deflate",
                        nodata=0, nodata_box=(100, 60, 200, 150), fill_box=(400, 0, 120, 70))
        kw = {}
    elif case == "strips":
        p = make_raster(tmp_path / "t.tif", 400, 300, block=None)
        kw = {}
    else:
        p = make_raster(tmp_path / "t.tif", 400, 300, block=64, dtype="uint16")
        kw = {"gsd": 0.37}
    idx0, arr0, skip0, kind0 = _read_all(p, 0, **kw)
    idx2, arr2, skip2, kind2 = _read_all(p, 2, **kw)
    assert kind0 is TileBatches and kind2 is ProcessTileBatches
    assert idx2 == idx0 and skip2 == skip0 and len(arr2) == len(arr0)
    if case == "tiled-deflate-nodata":
        assert skip0 > 0                                          # nodata and fill were skipped
    for a, b in zip(arr0, arr2):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert not _shm_left()


def test_arrays_the_consumer_keeps_are_never_overwritten(tmp_path):
    p = make_raster(tmp_path / "k.tif", 512, 384, block=64)
    _, ref, _, _ = _read_all(p, 0)
    idx, held, _, _ = _read_all(p, 2, hold=True)           # no copies: views of the slots
    assert len(held) == len(ref)
    for a, b in zip(ref, held):
        assert np.array_equal(a, b)
    del held
    assert not _shm_left()


# ------------------------------------------------- stopping and failures --
def _big(tmp_path):
    return make_raster(tmp_path / "big.tif", 1024, 1024, block=64, compress="deflate")


def test_cancel_stops_workers_promptly_and_frees_everything(tmp_path):
    p = _big(tmp_path)
    stop = threading.Event()
    with open_raster(p, ReadOptions(workers=2)) as r:
        tiles = r.grid(tile_px=32).tiles
        it = iter_tile_batches(r, tiles, 8, job=Job(cancel=stop))
        assert isinstance(it, ProcessTileBatches)
        pids = it.pids
        next(it)
        assert _shm_left()
        stop.set()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            next(it)
        assert time.monotonic() - t0 < 3.0
    assert it.done < len(tiles)
    assert not any(_alive(pid) for pid in pids)
    assert not _shm_left()


def test_closing_early_frees_everything(tmp_path):
    p = _big(tmp_path)
    with open_raster(p, ReadOptions(workers=2)) as r:
        with iter_tile_batches(r, r.grid(tile_px=32).tiles, 16) as it:
            pids = it.pids
            tiles, arr = next(it)
        assert arr.sum() > 0                                   # still readable after close
    assert not any(_alive(pid) for pid in pids)
    assert not _shm_left()


def test_a_read_error_in_a_worker_is_a_clear_raster_read_error(tmp_path):
    p = make_raster(tmp_path / "c.tif", 512, 512, block=64, compress="deflate",
                    data=noise(3, 512, 512))
    size = p.stat().st_size
    with open(p, "r+b") as f:                                   # garbage in the tile data
        f.seek(size // 2)
        f.write(b"\x00\xff" * 4000)
    with pytest.raises(UsageError) as e:
        with open_raster(p, ReadOptions(workers=2)) as r:
            with iter_tile_batches(r, r.grid(tile_px=64).tiles, 4) as it:
                assert isinstance(it, ProcessTileBatches)
                pids = it.pids
                for _ in it:
                    pass
    assert isinstance(e.value, RasterReadError)
    assert "c.tif" in e.value.message and "near pixel window" in e.value.message
    assert "gdalinfo" in e.value.hint
    assert not any(_alive(pid) for pid in pids)
    assert not _shm_left()


DYING_READERS = """
import json, os, sys
from mapclip.engine.core.options import ReadOptions
from mapclip.engine.raster.reader import ReaderThreadError, open_raster
from mapclip.engine.raster.stream import iter_tile_batches
from mapclip.engine.raster.workers import SHM_PREFIX
got, out = 0, {}
with open_raster(sys.argv[1], ReadOptions(workers=2)) as r:
    it = iter_tile_batches(r, r.grid(tile_px=16).tiles, 4, prefetch=2)
    out["pids"] = it.pids
    try:
        for _ in it:
            got += 1
    except ReaderThreadError as e:
        out.update(message=e.message, hint=e.hint, option=e.option)
    out.update(batches=got, total=len(r.grid(tile_px=16).tiles) // 4)
out["shm"] = [n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}-{os.getpid()}-")]
print(json.dumps(out))
"""


def test_a_worker_that_dies_is_reported_with_its_exit_code(tmp_path):
    """Each reader process kills itself (SIGKILL) once it has read its second task (the
    named fault point reader.task, core/faults.py; in a child process, whose reader
    processes inherit the variable): the read stops before its end with an error naming
    the exit code, and no process or shared memory is left. (How many batches arrive
    first is not fixed: a result a reader had queued just before it was killed may be
    lost with it, so the consumer may notice the death at the first batch.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), MAPCLIP_FAULT="reader.task:2:kill")
    run = subprocess.run([sys.executable, "-c", DYING_READERS, str(_big(tmp_path))], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["batches"] < out["total"]                 # died mid-read
    assert "stopped unexpectedly" in out["message"] and "-9" in out["message"]
    assert "--read-workers 0" in out["hint"] and out["option"] == "read_workers"
    assert len(out["pids"]) == 2 and not any(_alive(pid) for pid in out["pids"])
    assert out["shm"] == []


# ------------------------------------------------------------ end to end --
def test_detect_reads_through_processes_with_the_same_result(tmp_path):
    from mapclip.engine.detect import DetectOptions, detect
    from tests.rigged import RED, RED_PROMPT, rigged_model
    data = noise(3, 256, 320, seed=3)
    data[:, 140:180, 200:240] = np.array(RED, np.uint8)[:, None, None]
    p = str(make_raster(tmp_path / "d.tif", data=data))
    rig = rigged_model()
    base = DetectOptions(tile_px=64, window=1, top_k=3, refine=False)
    res = [detect(p, [RED_PROMPT], rig, options=replace(base, read=ReadOptions(workers=w)))
           for w in (0, 2)]
    assert [b.pixel for b in res[1].boxes] == [b.pixel for b in res[0].boxes]
    assert [b.score for b in res[1].boxes] == [b.score for b in res[0].boxes]
    assert res[1].boxes[0].pixel == (192, 128, 256, 192)
    assert not _shm_left()


def test_cli_read_workers_and_compile_flags(tmp_path, capsys):
    import argparse

    from mapclip.engine.cli import main as cli_main
    from mapclip.engine.cli.detect import options_from_args, register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["detect", "r.tif", "--prompt", "a", "--model", "m", "--out", "o.gpkg",
                              "--read-workers", "3", "--compile"])
    o = options_from_args(args)
    assert o.read.workers == 3 and o.compile is True
    args = parser.parse_args(["detect", "r.tif", "--prompt", "a", "--model", "m", "--out", "o.gpkg"])
    assert options_from_args(args).read.workers == "auto"
    p = make_raster(tmp_path / "c.tif", 64, 64)
    code = cli_main(["detect", str(p), "--prompt", "a", "--model", "test-tiny",
                     "--out", str(tmp_path / "o.gpkg"), "--read-workers", "many"])
    err = capsys.readouterr().err
    assert code != 0 and "--read-workers" in err and "Traceback" not in err


def test_heap_trim_runs_at_most_every_interval():
    import sys

    from mapclip.engine.raster.memory import trim_heap
    ran = trim_heap(force=True)
    assert ran == sys.platform.startswith("linux")
    assert trim_heap() is False                 # within TRIM_INTERVAL_S of the last one


def test_index_builds_read_as_asked_and_get_the_same_rows(tmp_path, tiny_model, monkeypatch, capsys):
    """An index build takes this run's --read-workers (not the index's stored layout): reader
    processes and threads give the same index; a bad value is refused in the CLI's words."""
    from mapclip.engine.archive import build
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.store import open_index
    from mapclip.engine.cli import main as cli_main
    from mapclip.engine.core.options import IndexOptions
    from mapclip.engine.raster import stream
    p = make_raster(tmp_path / "r.tif", 192, 160, data=noise(3, 160, 192, seed=4), block=64)
    seen = []
    real = stream.resolve_workers
    monkeypatch.setattr(stream, "resolve_workers", lambda w, n, path: seen.append(w) or real(w, n, path))
    out = {}
    for w in (0, 1):
        opts = IndexOptions(tile_px=32, footprints=False, read=ReadOptions(workers=w))
        build_index([str(p)], tmp_path / f"ix{w}", tiny_model, opts)
        out[w] = open_index(tmp_path / f"ix{w}")
    assert seen == [0, 1]
    assert out[0].rows == out[1].rows > 0
    assert np.array_equal(out[0].embeddings(), out[1].embeddings())
    assert build.read_options(out[1].manifest["options"], 2).workers == 2
    code = cli_main(["index", str(p), "--model", "test-tiny", "--out", str(tmp_path / "bad"),
                     "--read-workers", "many"])
    err = capsys.readouterr().err
    assert code != 0 and "--read-workers" in err and "Traceback" not in err
