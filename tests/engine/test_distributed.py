"""Index builds on Ray (mapclip/engine/archive/distributed.py): a local cluster, a worker killed on
purpose, a driver interrupted; the result equals a build in one process."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray   # build.py installs it (requirements.txt)

from mapclip.engine.archive import distributed
from mapclip.engine.archive.build import build_index
from mapclip.engine.archive.search import search_index
from mapclip.engine.archive.store import Index, open_index
from mapclip.engine.core.options import IndexOptions
from mapclip.engine.core.errors import Cancelled, UsageError
from mapclip.engine.core.options import check
from tests.interrupt import StopAfter
from tests.raster_fixtures import WGS84, make_raster

OPTS = dict(scales=[32, 48], batch_size=4, commit_tiles=5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster: 2 CPUs, no GPU, no dashboard; shut down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 << 20,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    a = make_raster(src / "a.tif", 160, 128, seed=1)
    b = make_raster(src / "b.tif", 96, 96, seed=2, crs=WGS84)
    c = make_raster(src / "c.tif", 128, 64, seed=3)
    return [a, b, c]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rasters, tiny_model):
    """The same rasters indexed in this process."""
    out = tmp_path_factory.mktemp("one") / "idx"
    build_index(rasters, out, tiny_model, IndexOptions(**OPTS))
    return Index(out)


def _keys(index):
    t = index.tiles()
    paths = {rid: r["path"] for rid, r in index.rasters.items()}
    return [(paths[int(r)], int(p), int(i)) for r, p, i in zip(t["raster"], t["tile_px"], t["tile"])]


def assert_same_index(got, want):
    """Same rows in the same order (raster, tile size, tile number, window, bounds),
    embeddings equal within float16 rounding, each tile once, none missing."""
    keys = _keys(got)
    assert len(keys) == len(set(keys)), "a tile is stored twice"
    assert keys == _keys(want)
    for f in ("col", "row", "width", "height", "xmin", "ymin", "xmax", "ymax"):
        np.testing.assert_array_equal(got.tiles()[f], want.tiles()[f])
    np.testing.assert_allclose(got.embeddings().astype(np.float32),
                               want.embeddings().astype(np.float32), atol=2e-3, rtol=0)
    for r in got.manifest["rasters"]:
        assert r["complete"]
        for s, g in r["grids"].items():
            assert r["progress"][s] == g["tiles"]        # every window of every size was read


def test_ray_build_with_a_killed_worker_equals_the_single_process_build(
        cluster, rasters, reference, tiny_model, tmp_path, monkeypatch):
    # one worker kills itself (SIGKILL) at its second batch, mid-chunk: the named fault
    # point ray.batch (core/faults.py), once among all workers and their restarts
    marker = tmp_path / "worker-died"
    monkeypatch.setenv("MAPCLIP_FAULT", "ray.batch:2:kill")
    monkeypatch.setenv("MAPCLIP_FAULT_MARK", str(marker))
    out = tmp_path / "idx"
    info = build_index(rasters, out, tiny_model, IndexOptions(**OPTS, ray="local", ray_workers=2))
    assert int(marker.read_text()) != os.getpid()    # one worker (not the driver) died mid-build
    assert info.rows == reference.rows == info.embedded
    assert info.added == [str(r) for r in rasters]
    got = Index(out)
    got.verify()
    assert_same_index(got, reference)
    # one shard per chunk of commit_tiles windows, each written by a worker, all in the manifest
    m = got.manifest
    assert {p.name for p in (out / "shards").iterdir()} == \
        {n.split("/")[1] for s in m["shards"] for n in (s["emb"], s["tiles"])}
    assert all(s["next_tile"] - s["first_tile"] <= OPTS["commit_tiles"] for s in m["shards"])
    # the same search from both, through the call the dock's Archive tab makes
    # (mapclip/plugin/dock/archive.py: search_index(open_index(folder), text=..., model=...))
    hits_a = search_index(open_index(out), text="fields", model=tiny_model)
    hits_b = search_index(reference, text="fields", model=tiny_model)
    assert [(h.raster, h.tile_px, h.tile) for h in hits_a] == \
        [(h.raster, h.tile_px, h.tile) for h in hits_b]
    np.testing.assert_allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-3)


def test_interrupted_ray_driver_resumes_from_its_committed_shards(
        cluster, rasters, reference, tiny_model, tmp_path):
    out = tmp_path / "idx"
    stop = StopAfter(12)
    opts = IndexOptions(**OPTS, ray="local", ray_workers=2)
    with pytest.raises(Cancelled):
        build_index(rasters, out, tiny_model, opts, progress=stop.progress, cancel=stop)
    m = json.loads((out / "manifest.json").read_text())
    committed = sum(s["rows"] for s in m["shards"])
    assert 0 < committed < reference.rows
    assert not any(r["complete"] for r in m["rasters"])
    # a leftover of a chunk that finished after the driver stopped: no manifest names it
    (out / "shards" / "999999.emb.npy").write_bytes(b"half")
    calls = []
    info = build_index(rasters, out, tiny_model, opts, progress=lambda d, t: calls.append((d, t)))
    assert info.embedded == reference.rows - committed     # nothing embedded twice
    assert str(rasters[0]) in info.resumed
    assert not (out / "shards" / "999999.emb.npy").exists()
    assert calls[-1][0] == calls[-1][1]
    assert_same_index(Index(out), reference)
    # and a finished index is left alone, with or without Ray
    again = build_index(rasters, out, tiny_model, opts)
    assert again.embedded == 0 and len(again.unchanged) == 3


def test_cli_index_on_ray(cluster, rasters, reference, tmp_path, capsys):
    from mapclip.engine.cli import main as cli_main
    out = tmp_path / "idx"
    code = cli_main(["index", *map(str, rasters), "--out", str(out), "--model", "test-tiny",
                     "--device", "cpu", "--scales", "32,48", "--batch-size", "4",
                     "--commit-tiles", "7", "--ray", "--ray-workers", "1", "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == reference.rows and info["embedded"] == reference.rows
    assert_same_index(Index(out), reference)
    # --ray before the rasters would swallow the first one as its address
    code = cli_main(["index", "--ray", str(rasters[0]), str(rasters[1]), "--out", str(tmp_path / "x"),
                     "--model", "test-tiny"])
    err = capsys.readouterr().err
    assert code != 0 and "put --ray after the rasters" in err


def test_ray_options_are_checked():
    with pytest.raises(UsageError) as e:
        check(IndexOptions(ray_workers=2))
    assert e.value.option == "ray_workers" and "--ray" in e.value.hint
    with pytest.raises(UsageError) as e:
        check(IndexOptions(ray="host name:6379"))
    assert e.value.option == "ray"
    with pytest.raises(UsageError) as e:
        check(IndexOptions(ray="auto", ray_workers=0))
    assert e.value.option == "ray_workers"
    check(IndexOptions(ray="auto", ray_workers=3))
    # a head that answers nothing is refused at once, not after minutes of retries
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(UsageError, match=f"no Ray cluster answers at 127.0.0.1:{free}") as e:
        distributed.check_reachable(f"127.0.0.1:{free}")
    assert e.value.option == "ray"
    with pytest.raises(UsageError, match="not HOST:PORT"):
        distributed.check_reachable("headnode")
    distributed.check_reachable("auto")


def test_default_workers_one_per_gpu_else_per_cpu():
    o = IndexOptions(ray="auto")
    assert distributed.default_workers(o, {"CPU": 8.0}) == (8, 0)
    assert distributed.default_workers(o, {"CPU": 32.0, "GPU": 4.0}) == (4, 1)
    assert distributed.default_workers(IndexOptions(ray="auto", device="cpu"),
                                       {"CPU": 6.0, "GPU": 2.0}) == (6, 0)
    assert distributed.default_workers(IndexOptions(ray="auto", ray_workers=2),
                                       {"CPU": 6.0, "GPU": 4.0}) == (2, 1)


def test_a_worker_with_other_model_weights_is_refused(cluster, rasters, tmp_path):
    """A node whose model file differs from the driver's stops the build with the
    engine's message; nothing of it reaches the index."""
    from mapclip.engine.core.errors import ModelError
    from mapclip.engine.model.models import load_model
    from tests.rigged import save_rigged_folder
    folder = save_rigged_folder(tmp_path / "model")
    lm = load_model(str(folder), device="cpu")
    tiny = load_model("test-tiny", device="cpu")
    from mapclip.engine.model.models import save_model_folder
    save_model_folder(tiny.model, tiny.model_cfg, folder, arch=tiny.arch)   # "another node's" file
    out = tmp_path / "idx"
    with pytest.raises(ModelError, match="other weights than the driver's"):
        build_index(rasters[:1], out, lm, IndexOptions(tile_px=32, ray="local", ray_workers=1))
    assert not out.exists()          # a new index that failed before its first commit is removed
