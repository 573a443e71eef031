"""Index search: text, image and location queries, negatives, exact vs approximate, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mapclip.engine.archive.build import build_index
from mapclip.engine.archive.search import ranked_rows, search, search_index
from mapclip.engine.archive import approx, store
from mapclip.engine.archive.store import open_index
from tests.index_factories import index_from_arrays
from mapclip.engine.core.options import IndexOptions, SearchOptions
from mapclip.engine.core.errors import ModelError, UsageError
from mapclip.engine.core.outputs import _pyogrio_raw
from tests.raster_fixtures import UTM_ORIGIN, UTM_RES, WGS84, make_raster
from tests.rigged import BLUE, BLUE_PROMPT, GREY, RED, RED_PROMPT, rigged_model, save_rigged_folder

TILE = 32
RED_AT = (96, 32)     # tile (col, row) in pixels that holds the red square
BLUE_AT = (32, 96)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Small batches and a 2-core machine shared with other work: one thread is faster."""
    import faiss
    f = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(f)


@pytest.fixture(scope="module")
def rigged():
    return rigged_model()


def planted_raster(path, seed=0):
    """Grey noise (low saturation) with a red square in one tile and a blue one in another."""
    rng = np.random.default_rng(seed)
    data = (np.array(GREY, np.int16)[:, None, None] + rng.integers(-12, 12, (1, 160, 192))).astype(np.uint8)
    data = np.repeat(data[:1], 3, axis=0)
    for (c, r), colour in ((RED_AT, RED), (BLUE_AT, BLUE)):
        data[:, r + 6:r + 26, c + 6:c + 26] = np.array(colour, np.uint8)[:, None, None]
    return make_raster(path, data=data)


@pytest.fixture(scope="module")
def rigged_index(tmp_path_factory, rigged):
    d = tmp_path_factory.mktemp("rigged")
    r = planted_raster(d / "scene.tif")
    build_index([r], d / "idx", rigged, IndexOptions(tile_px=TILE, batch_size=16))
    return d / "idx"


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tiny")
    a = make_raster(d / "utm.tif", 192, 128, seed=3)
    b = make_raster(d / "geo.tif", 96, 96, seed=4, crs=WGS84)
    build_index([a, b], d / "idx", tiny_model, IndexOptions(tile_px=TILE, batch_size=16))
    return d / "idx", a, b


def test_planted_pattern_is_the_top_hit_for_its_text(rigged_index, rigged):
    res = search(rigged_index, text=RED_PROMPT, model=rigged, options=SearchOptions(top_k=5))
    top = res.hits[0]
    assert res.method == "exact" and [h.rank for h in res.hits] == [1, 2, 3, 4, 5]
    assert (top.pixel[0], top.pixel[1]) == RED_AT and top.tile_px == TILE
    x0, y0 = UTM_ORIGIN
    assert top.bounds == (x0 + RED_AT[0] * UTM_RES, y0 - (RED_AT[1] + TILE) * UTM_RES,
                          x0 + (RED_AT[0] + TILE) * UTM_RES, y0 - RED_AT[1] * UTM_RES)
    assert top.score > res.hits[1].score + 0.1
    blue = search_index(rigged_index, text=BLUE_PROMPT, model=rigged)
    assert (blue[0].pixel[0], blue[0].pixel[1]) == BLUE_AT
    # the index's own model is the default (a model folder path, loaded by spec)


def test_negative_prompts_shift_the_score_exactly(rigged_index, rigged):
    from mapclip.engine.model.encode import encode_text
    opts = SearchOptions(top_k=30, negative=[BLUE_PROMPT], negative_weight=0.5)
    res = search(rigged_index, text=RED_PROMPT, model=rigged, options=opts)
    idx = open_index(rigged_index)
    emb = idx.embeddings().astype(np.float32)
    pos = encode_text(rigged, [RED_PROMPT])[0].numpy()
    neg = encode_text(rigged, [BLUE_PROMPT])[0].numpy()
    for h in res.hits:
        assert h.cosine == pytest.approx(float(emb[h.row] @ pos), abs=1e-5)
        assert h.score == pytest.approx(float(emb[h.row] @ pos - 0.5 * emb[h.row] @ neg), abs=1e-5)
    assert [h.score for h in res.hits] == sorted((h.score for h in res.hits), reverse=True)
    last = res.hits[-1]
    assert (last.pixel[0], last.pixel[1]) == BLUE_AT             # pushed to the bottom
    assert res.query["negative"] == [BLUE_PROMPT]


def test_image_query_and_bad_queries(rigged_index, rigged, tmp_path):
    from PIL import Image
    png = tmp_path / "red.png"
    Image.new("RGB", (40, 40), RED).save(png)
    hits = search_index(rigged_index, image=str(png), model=rigged)
    assert (hits[0].pixel[0], hits[0].pixel[1]) == RED_AT
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(UsageError, match="cannot read image"):
        search(rigged_index, image=str(junk), model=rigged)
    with pytest.raises(UsageError, match="does not exist"):
        search(rigged_index, image=str(tmp_path / "none.png"), model=rigged)
    with pytest.raises(UsageError, match="is a folder, not an image file"):
        search(rigged_index, image=str(tmp_path), model=rigged)
    # a float32 GeoTIFF (PIL cannot decode it) is read through the raster reader
    red = np.random.default_rng(0).random((3, 40, 40)).astype(np.float32)
    geo = make_raster(tmp_path / "red32.tif", width=40, height=40, data=red, dtype="float32")
    with pytest.raises(Exception):
        from PIL import Image as _I
        _I.open(geo).convert("RGB")
    res = search(rigged_index, image=str(geo), model=rigged)
    assert res.hits and all(np.isfinite(h.score) for h in res.hits)
    with pytest.raises(UsageError, match="empty query"):
        search(rigged_index, text="   ", model=rigged)
    with pytest.raises(UsageError, match="exactly one query"):
        search(rigged_index, model=rigged)
    with pytest.raises(UsageError, match="exactly one query"):
        search(rigged_index, text="x", like=(1, 2), model=rigged)


def test_a_query_model_from_another_space_is_refused(rigged_index, tiny_model):
    with pytest.raises(ModelError) as err:
        search(rigged_index, text="roof", model=tiny_model)
    assert "rigged" in err.value.message and "test-tiny" in err.value.message


def test_like_finds_its_own_tile_first_in_any_crs(tiny_index):
    folder, utm, geo = tiny_index
    idx = open_index(folder)
    x0, y0 = UTM_ORIGIN
    # inside tile (col 64, row 32) of the UTM raster
    x, y = x0 + 80 * UTM_RES, y0 - 40 * UTM_RES
    res = search(idx, like=(x, y), like_crs="EPSG:32633")
    top = res.hits[0]
    assert top.raster == str(utm) and (top.pixel[0], top.pixel[1]) == (64, 32)
    assert top.score == pytest.approx(1.0, abs=2e-3) and res.query["row"] == top.row
    # the same place given in lon/lat
    from rasterio.warp import transform
    lon, lat = transform("EPSG:32633", "EPSG:4326", [x], [y])
    again = search(idx, like=f"{lon[0]},{lat[0]}", like_crs="EPSG:4326")
    assert again.hits[0].row == top.row
    # a point in the geographic raster, in its own CRS
    g = search(idx, like=(13.0 + 50e-4, 52.5 - 10e-4), like_crs=WGS84).hits[0]
    assert g.raster == str(geo) and (g.pixel[0], g.pixel[1]) == (32, 0)
    assert g.wgs84 == pytest.approx(g.bounds)
    with pytest.raises(UsageError, match="outside every indexed tile"):
        search(idx, like=(x0 - 100, y0), like_crs="EPSG:32633")
    with pytest.raises(UsageError, match="several CRS"):
        search(idx, like=(x, y))
    with pytest.raises(UsageError, match="not a point"):
        search(idx, like="12;x")


def test_approximate_search_agrees_with_exact_on_random_data(monkeypatch):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20000, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx = index_from_arrays(emb)
    recalls = []
    for _ in range(20):
        q = rng.standard_normal(64).astype(np.float32)
        q /= np.linalg.norm(q)
        exact, es, m1, _ = ranked_rows(idx, q, 10, "exact")
        approx, as_, m2, params = ranked_rows(idx, q, 10, "approx")
        assert (m1, m2) == ("exact", "approx") and params["faiss"] == "PQ32x4fs"
        assert np.all(np.diff(as_) <= 0)
        recalls.append(len(set(exact) & set(approx)) / 10)
    assert np.mean(recalls) >= 0.95
    # the re-ranked scores are exact scores
    np.testing.assert_allclose(as_, emb[approx].astype(np.float16).astype(np.float32) @ q, atol=1e-5)
    # above the float32 cache size, exact search streams the float16 values block by block:
    # same answer, no float32 copy
    monkeypatch.setattr(store, "EXACT_CACHE_BYTES", 0)
    big = index_from_arrays(emb)
    rows16, s16, _, _ = ranked_rows(big, q, 10, "exact")
    assert list(rows16) == list(exact) and big._emb32 is None
    np.testing.assert_allclose(s16, es, atol=1e-5)


def test_auto_method_threshold_and_the_cached_faiss_index(tiny_index, tiny_model, monkeypatch, tmp_path):
    import shutil
    folder, utm, geo = tiny_index
    work = tmp_path / "idx"
    shutil.copytree(folder, work)
    monkeypatch.setattr(approx, "APPROX_MIN_TRAIN", 16)
    assert search(work, text="fields", model=tiny_model).method == "exact"
    assert not list(work.glob("approx-*.faiss"))
    monkeypatch.setattr(approx, "APPROX_MIN_ROWS", 10)
    res = search(work, text="fields", model=tiny_model)
    assert res.method == "approx" and res.params["candidates"] == open_index(work).rows
    cached = list(work.glob("approx-*.faiss"))
    assert len(cached) == 1 and open_index(work).content_id in cached[0].name
    stamp = cached[0].stat().st_mtime_ns
    search(work, text="roads", model=tiny_model)
    assert cached[0].stat().st_mtime_ns == stamp                  # reused, not rebuilt
    opened = open_index(work)
    assert open_index(work) is opened                            # kept open while unchanged
    extra = make_raster(tmp_path / "extra.tif", 64, 64, seed=9)
    build_index([extra], work, tiny_model)
    assert open_index(work) is not opened and open_index(work).rows == opened.rows + 4
    res = search(work, text="fields", model=tiny_model)
    now = list(work.glob("approx-*.faiss"))
    assert len(now) == 1 and now != cached                          # rebuilt for the new content
    assert res.rows == open_index(work).rows


def test_cli_search_contract(rigged_index, tmp_path, capsys):
    from mapclip.engine.cli import main
    raw = _pyogrio_raw()
    spec = str(save_rigged_folder(tmp_path / "rigged-model"))
    out = tmp_path / "hits.gpkg"
    argv = ["search", str(rigged_index), "--text", RED_PROMPT, "--model", spec, "--top-k", "3",
            "--out", str(out), "--json"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "exact" and info["query"]["text"] == RED_PROMPT
    assert [h["rank"] for h in info["hits"]] == [1, 2, 3] and info["out"] == str(out)
    assert info["hits"][0]["pixel"][:2] == list(RED_AT) and info["hits"][0]["crs"] == "EPSG:32633"
    meta, _, geom, fields = raw.read(str(out))
    assert len(geom) == 3 and meta["crs"] == "EPSG:32633"
    assert list(fields[list(meta["fields"]).index("rank")]) == [1, 2, 3]
    assert main(argv) == 2                                         # exists: refused
    assert "already exists" in capsys.readouterr().err
    assert main(["search", str(rigged_index), "--like", "500050,3999980"]) == 0   # no model needed
    assert "#1 score" in (text := capsys.readouterr().out) and "col 96 row 32" in text.splitlines()[1]
    assert main(["search", str(tmp_path / "nowhere"), "--text", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:                          # two queries at once: argparse
        main(["search", str(rigged_index), "--text", "x", "--image", "a.png"])
    assert ex.value.code == 2
    # --like beside --text marks a place "like this"; one outside every tile is said
    assert main(["search", str(rigged_index), "--text", "x", "--like", "1,2", "--model", spec]) == 2
    assert "none of the 1 marked places lies on an indexed tile" in capsys.readouterr().err


def test_text_queries_go_through_the_prompt_templates(tiny_index, tiny_model):
    from mapclip.engine.model.scoring import encode_prompts
    folder = tiny_index[0]
    emb = open_index(folder).embeddings().astype(np.float32)
    for templates in (None, "raw", "a photo of {}"):
        res = search(folder, text="storage tanks", model=tiny_model,
                        options=SearchOptions(top_k=3, templates=templates))
        q = encode_prompts(tiny_model, ["storage tanks"], templates)[0].numpy()
        want = np.sort(emb @ q)[::-1][:3]
        assert np.allclose([h.score for h in res.hits], want, atol=1e-4), templates
    with pytest.raises(UsageError) as err:
        search(folder, text="storage tanks", model=tiny_model, options=SearchOptions(templates="bogus"))
    assert err.value.option == "templates"
