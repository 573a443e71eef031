"""Index building: format, resume after interruption, append, replace, refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mapclip.engine.archive.build import build_index
from mapclip.engine.archive.search import search
from mapclip.engine.archive.format import FORMAT_VERSION, LOCK, content_id, file_checksum, read_manifest
from mapclip.engine.archive.store import open_index
from mapclip.engine.core.options import IndexOptions
from mapclip.engine.core.outputs import _pyogrio_raw
from mapclip.engine.core.errors import Cancelled, MapClipError, ModelError, UsageError
from tests.interrupt import StopAfter
from tests.raster_fixtures import UTM_ORIGIN, UTM_RES, WGS84, make_raster

OPTS = dict(tile_px=32, batch_size=4, commit_tiles=6)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def rasters(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = make_raster(src / "a.tif", 160, 128, seed=1)
    b = make_raster(src / "b.tif", 96, 96, seed=2, crs=WGS84)
    return a, b


def shard_files(folder):
    return sorted(p.name for p in (folder / "shards").iterdir())


def test_build_writes_documented_format_readable_without_mapclip(tmp_path, rasters, tiny_model):
    a, b = rasters
    calls = []
    info = build_index([a, b], tmp_path / "idx", tiny_model, IndexOptions(**OPTS),
                          progress=lambda d, t: calls.append((d, t)))
    # 160x128 in 32-px tiles: 5 x 4; 96x96: 3 x 3
    assert info.rows == 20 + 9 and info.embedded == 29 and info.rasters == 2
    assert info.added == [str(a), str(b)] and not info.resumed and not info.unchanged
    assert calls[-1] == (29, 29)
    folder = tmp_path / "idx"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["format"] == "mapclip-index" and m["version"] == FORMAT_VERSION
    assert m["model"]["spec"] == "test-tiny" and m["model"]["embed_dim"] == 64
    assert m["model"]["image_size"] == 64 and len(m["model"]["probe_text"]) == 64
    assert m["options"]["scales"] == [32] and m["options"]["stride_px"] == 32
    assert [r["path"] for r in m["rasters"]] == [str(a), str(b)]
    assert all(r["checksum"].startswith("fast1:") and r["complete"] for r in m["rasters"])
    # shards: plain .npy (no pickles), float16 unit vectors, structured tile records
    emb = np.concatenate([np.load(folder / s["emb"], allow_pickle=False) for s in m["shards"]])
    tiles = np.concatenate([np.load(folder / s["tiles"], allow_pickle=False) for s in m["shards"]])
    assert emb.dtype == np.float16 and emb.shape == (29, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    first = tiles[tiles["raster"] == m["rasters"][0]["id"]]
    t = first[(first["col"] == 64) & (first["row"] == 32)][0]
    x0, y0 = UTM_ORIGIN
    assert (t["xmin"], t["ymax"]) == (x0 + 64 * UTM_RES, y0 - 32 * UTM_RES)
    assert (t["xmax"], t["ymin"]) == (x0 + 96 * UTM_RES, y0 - 64 * UTM_RES)
    assert 14.9 < t["lon_min"] < 15.1 and 36 < t["lat_min"] < 36.2   # UTM 33N, 4000 km north
    geo = tiles[tiles["raster"] == m["rasters"][1]["id"]]
    np.testing.assert_allclose(geo["lon_min"], geo["xmin"], atol=1e-9)
    np.testing.assert_allclose(geo["lat_max"], geo["ymax"], atol=1e-9)
    # footprints.gpkg: one polygon per row, in WGS84 (two CRSs in the index)
    raw = _pyogrio_raw()
    meta, _, geom, fields = raw.read(str(folder / "footprints.gpkg"), layer="tiles")
    assert len(geom) == 29 and meta["crs"] == "EPSG:4326"
    names = list(meta["fields"])
    assert list(fields[names.index("row_id")]) == list(range(29))
    assert m["footprints"]["content"] == content_id(m)


def test_interrupted_build_resumes_to_the_index_built_in_one_go(tmp_path, rasters, tiny_model):
    a, b = rasters
    full = build_index([a, b], tmp_path / "full", tiny_model, IndexOptions(**OPTS))
    part = tmp_path / "part"
    stop = StopAfter(12)   # three batches of four tiles, then cancel
    with pytest.raises(Cancelled):
        build_index([a, b], part, tiny_model, IndexOptions(**OPTS), progress=stop.progress,
                       cancel=stop)
    m = read_manifest(part)
    done_rows = sum(s["rows"] for s in m["shards"])
    assert done_rows == 12 and not m["rasters"][0]["complete"]   # the batches seen were committed
    assert m["rasters"][0]["progress"] == {"32": 12}
    # leftovers of a crash in the middle of a commit are ignored and cleaned
    (part / "shards" / "999999.emb.npy").write_bytes(b"half a shard")
    (part / "manifest.json.part").write_text("{")
    again = build_index([a, b], part, tiny_model, IndexOptions(batch_size=3, commit_tiles=5))
    assert again.resumed == [str(a), str(b)] and again.embedded == full.rows - done_rows
    A, B = open_index(tmp_path / "full"), open_index(part)
    assert A.rows == B.rows == 29
    assert A.tiles().tobytes() == B.tiles().tobytes()          # same tiles, same order, none twice
    np.testing.assert_allclose(A.embeddings().astype(np.float32), B.embeddings().astype(np.float32),
                               atol=2e-3)
    mb = read_manifest(part)
    named = {os.path.basename(s[k]) for s in mb["shards"] for k in ("emb", "tiles")}
    assert set(shard_files(part)) == named and not (part / "manifest.json.part").exists()


def test_append_skips_unchanged_and_replaces_changed_rasters(tmp_path, rasters, tiny_model):
    a, b = rasters
    out = tmp_path / "idx"
    build_index([a], out, tiny_model, IndexOptions(**OPTS))
    before = open_index(out).embeddings().copy()
    info = build_index([tmp_path / "src"], out, tiny_model)          # a folder: a and b
    assert info.unchanged == [str(a)] and info.added == [str(b)] and info.embedded == 9
    idx = open_index(out)
    assert idx.rows == 29 and np.array_equal(idx.embeddings()[:20], before)
    # b changes on disk: its rows are replaced, a's kept, nothing left over
    make_raster(b, 96, 96, seed=7, crs=WGS84)
    st = os.stat(b)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    info = build_index([b], out, tiny_model)
    assert info.replaced == [str(b)] and info.embedded == 9
    idx = open_index(out)
    assert idx.rows == 29 and np.array_equal(idx.embeddings()[:20], before)
    rid_b = [r["id"] for r in idx.manifest["rasters"] if r["path"] == str(b)][0]
    assert (idx.tiles()["raster"] == rid_b).sum() == 9
    assert len(shard_files(out)) == 2 * len(idx.manifest["shards"])
    # --reindex re-embeds even an unchanged raster
    assert build_index([a], out, tiny_model, IndexOptions(reindex=True)).replaced == [str(a)]


def test_several_scales_and_stride(tmp_path, rasters, tiny_model):
    a, _ = rasters
    info = build_index([a], tmp_path / "idx", tiny_model,
                          IndexOptions(scales=[32, 64], stride_px=16, batch_size=8))
    tiles = open_index(tmp_path / "idx").tiles()
    # 32-px tiles every 16 px: 9 x 7; 64-px tiles every 32 px: 4 x 3
    assert (tiles["tile_px"] == 32).sum() == 63 and (tiles["tile_px"] == 64).sum() == 12
    assert info.rows == 75 and info.scales == [32, 64]
    assert sorted(set(tiles[tiles["tile_px"] == 64]["col"])) == [0, 32, 64, 96]


def test_gsd_tiles_cover_ground_distance(tmp_path, rasters, tiny_model):
    a, _ = rasters                       # 0.5 m pixels
    build_index([a], tmp_path / "idx", tiny_model, IndexOptions(tile_px=32, gsd=1.0))
    idx = open_index(tmp_path / "idx")
    tiles = idx.tiles()
    # 32 output px at 1 m = 64 native px: 160 x 128 gives 3 x 2 tiles (the last column shifted in)
    assert len(tiles) == 6 and set(tiles["width"]) == {64} and set(tiles["tile_px"]) == {32}
    assert sorted(set(tiles["col"])) == [0, 64, 96]
    assert idx.manifest["options"]["gsd"] == 1.0
    assert idx.manifest["rasters"][0]["grids"]["32"]["out_px"] == 32


def test_refuses_another_model_other_options_and_foreign_folders(tmp_path, rasters, tiny_model):
    from tests.rigged import rigged_model
    a, b = rasters
    out = tmp_path / "idx"
    build_index([a], out, tiny_model, IndexOptions(**OPTS))
    with pytest.raises(ModelError) as err:
        build_index([b], out, rigged_model())
    assert "test-tiny" in err.value.message and "rigged" in err.value.message
    with pytest.raises(UsageError, match="tile sizes"):
        build_index([b], out, tiny_model, IndexOptions(tile_px=64))
    assert open_index(out).rows == 20            # nothing changed by the refusals
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not a MapCLIP index"):
        build_index([a], foreign, tiny_model)
    with pytest.raises(UsageError, match="not a MapCLIP index"):
        open_index(foreign)


def test_a_failed_new_build_leaves_nothing_behind(tmp_path, rasters, tiny_model):
    a, _ = rasters
    bad = tmp_path / "src" / "broken.tif"
    bad.write_bytes(b"not a raster at all")
    with pytest.raises(UsageError, match="broken.tif"):
        build_index([a, bad], tmp_path / "idx", tiny_model, IndexOptions(**OPTS))
    assert not (tmp_path / "idx").exists()
    with pytest.raises(UsageError, match="does not exist"):
        build_index([tmp_path / "nope.tif"], tmp_path / "idx", tiny_model)


def test_corrupt_manifest_and_shards_are_reported(tmp_path, rasters, tiny_model):
    a, _ = rasters
    out = tmp_path / "idx"
    build_index([a], out, tiny_model, IndexOptions(**OPTS))
    m = read_manifest(out)
    shard = out / m["shards"][0]["emb"]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(MapClipError, match="damaged"):
        open_index(out).embeddings()
    (out / "manifest.json").write_text('{"format": "mapclip-index", "version": 1, "model"')
    with pytest.raises(MapClipError, match="damaged") as err:
        open_index(out)
    assert "not valid JSON" in err.value.message and err.value.hint
    (out / "manifest.json").write_text(json.dumps({"format": "mapclip-index", "version": 99}))
    with pytest.raises(MapClipError, match="version 99"):
        open_index(out)


def test_empty_tiles_are_skipped_and_an_empty_index_says_so(tmp_path, tiny_model):
    flat = make_raster(tmp_path / "flat.tif", 64, 64, data=np.full((3, 64, 64), 0, np.uint8))
    info = build_index([flat], tmp_path / "idx", tiny_model, IndexOptions(tile_px=32))
    assert info.rows == 0 and info.skipped == 4
    with pytest.raises(UsageError, match="empty"):
        search(tmp_path / "idx", text="ships", model=tiny_model)


def test_a_live_writer_lock_is_respected(tmp_path, rasters, tiny_model):
    a, _ = rasters
    out = tmp_path / "idx"
    build_index([a], out, tiny_model, IndexOptions(**OPTS))
    (out / LOCK).write_text(str(os.getppid()))
    with pytest.raises(UsageError, match="being written"):
        build_index([a], out, tiny_model)
    (out / LOCK).write_text("999999999")          # a dead writer: taken over
    assert build_index([a], out, tiny_model).unchanged == [str(a)]


def test_checksum_sees_content_size_and_time():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.bin")
        with open(p, "wb") as f:
            f.write(os.urandom(3 << 20))
        c1 = file_checksum(p)
        assert file_checksum(p) == c1
        st = os.stat(p)
        with open(p, "r+b") as f:
            f.seek(10)
            f.write(b"X")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file_checksum(p) != c1                      # header byte changed
        with open(p, "ab") as f:
            f.write(b"more")
        assert file_checksum(p) != c1


def test_cli_index_contract(tmp_path, rasters, capsys, monkeypatch):
    from mapclip.engine.cli import main
    a, b = rasters
    out = tmp_path / "idx"
    assert main(["index", str(tmp_path / "src"), "--model", "test-tiny", "--out", str(out),
                 "--tile", "32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)                 # exactly one JSON object
    assert info["rows"] == 29 and info["embedded"] == 29 and info["model"] == "test-tiny"
    for key in ("rasters", "shards", "skipped", "added", "resumed", "replaced", "unchanged",
                "seconds", "tiles_per_s", "device", "precision", "embed_dim", "scales"):
        assert key in info
    assert main(["index", str(a), "--out", str(out), "--tile", "64"]) == 2   # other tile size
    assert "tile sizes" in capsys.readouterr().err
    # without --model: the index's own model; nothing left to do
    assert main(["index", str(a), "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["unchanged"] == [str(a)] and again["embedded"] == 0
    # a new index without --model: the default preset (offline and not downloaded: its fix)
    monkeypatch.setenv("MAPCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["index", str(a), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "RemoteCLIP-ViT-B-32" in err and "fix:" in err and not (tmp_path / "new").exists()


def test_plain_images_give_one_note_on_georeferencing_and_no_python_warning(tmp_path, tiny_model):
    """Sixteen PNGs without georeferencing: no warning per image and opening (they read as
    crashes in QGIS's Python log), one note on the build naming the count."""
    import warnings

    from PIL import Image
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src / f"im{i:02d}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = build_index(src, tmp_path / "idx", tiny_model, IndexOptions(**OPTS))
    assert [str(w.message) for w in caught] == []
    assert info.rows == 16
    notes = [n for n in info.warnings if "georeferencing" in n]
    assert len(notes) == 1 and notes[0].startswith("16 images have no georeferencing: im00.png, ")
    assert "and 11 more" in notes[0] and "im15.png" not in notes[0]
    # a georeferenced raster beside them is not named
    make_raster(src / "geo.tif", 32, 32, seed=3)
    info = build_index(src, tmp_path / "idx", tiny_model, IndexOptions(**OPTS))
    assert [n for n in info.warnings if "georeferencing" in n] == [notes[0]]
