"""engine.detect: geometry, edges, nodata, extents, prompts, merging, cancel, OOM, outputs."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mapclip.engine.geo.boxes import iou_one
from mapclip.engine.detect import DetectOptions, detect, write_boxes, write_heatmap
from mapclip.engine.core.errors import Cancelled, MapClipError, UsageError
from mapclip.engine.core.options import ReadOptions
from tests.raster_fixtures import GEO_ORIGIN, GEO_RES, UTM33, UTM_ORIGIN, UTM_RES, WGS84, make_raster, noise
from tests.rigged import BLUE, BLUE_PROMPT, RED, RED_PROMPT, rigged_model, tiny_resnet

GEOMETRY = {UTM33: (UTM_ORIGIN, UTM_RES), WGS84: (GEO_ORIGIN, GEO_RES)}


@pytest.fixture(scope="module")
def rig():
    return rigged_model()


def scene(path, width=320, height=256, squares=(), crs=UTM33, dtype="uint8", seed=3, **kw):
    """Noise raster with colour squares (col, row, size, rgb) painted in."""
    data = noise(3, height, width, seed=seed).astype(np.float64)
    for col, row, size, rgb in squares:
        for b in range(3):
            data[b, row:row + size, col:col + size] = rgb[b]
    if dtype == "uint16":
        data = data * 16 + 100
    return str(make_raster(path, data=data.astype(dtype), crs=crs, dtype=dtype, **kw))


def expected_bounds(crs, pixel):
    (x0, y0), res = GEOMETRY[crs]
    c0, r0, c1, r1 = pixel
    return (x0 + c0 * res, y0 - r1 * res, x0 + c1 * res, y0 - r0 * res)


def run(path, model, **kw):
    extent = kw.pop("extent", None)
    extent_crs = kw.pop("extent_crs", None)
    kw.setdefault("refine", False)  # window/component geometry; fitting has its own tests
    return detect(path, kw.pop("prompts", [RED_PROMPT]), model, extent=extent,
                  extent_crs=extent_crs, options=DetectOptions(**kw))


@pytest.mark.parametrize("crs", [UTM33, WGS84])
def test_window_mode_top_box_is_the_planted_tile_at_exact_map_coordinates(tmp_path, rig, crs):
    path = scene(tmp_path / "s.tif", squares=[(200, 140, 40, RED)], crs=crs)
    res = run(path, rig, tile_px=64, window=1, top_k=3)
    top = res.boxes[0]
    assert top.prompt == RED_PROMPT and top.rank == 1 and top.score > 0.99
    assert top.pixel == (192, 128, 256, 192)
    assert top.bounds == pytest.approx(expected_bounds(crs, top.pixel), abs=1e-9)
    assert all(b.score < 0.01 for b in res.boxes[1:])
    assert res.tiles == 20 and res.windows == 20 and res.skipped == 0 and res.mode == "window"
    assert res.crs and ("32633" in res.crs or "4326" in res.crs or "WGS" in res.crs)


@pytest.mark.parametrize("crs", [UTM33, WGS84])
def test_dense_mode_box_hugs_the_planted_square(tmp_path, rig, crs):
    path = scene(tmp_path / "s.tif", width=384, height=256, squares=[(230, 90, 40, RED)], crs=crs)
    res = run(path, rig, mode="dense", tile_px=64)
    assert res.mode == "dense" and len(res.boxes) == 1
    box = res.boxes[0]
    cell = 64 / 16  # 8 x 8 patches, upsampled x2, over a 64-px tile
    assert np.allclose(box.pixel, (230, 90, 270, 130), atol=cell)
    assert box.bounds == pytest.approx(expected_bounds(crs, box.pixel), abs=1e-9)
    assert box.score > 0.9 and box.cosine > 0.5
    heat = res.heatmap[0]
    assert heat.shape == (256 // 4, 384 // 4)
    assert np.nanmax(heat) > 0.9 and np.nanmedian(heat) < 0.01
    # the heatmap transform maps the hot cells onto the square
    r, c = np.unravel_index(np.nanargmax(heat), heat.shape)
    t = res.heatmap_transform
    x, y = t.c + t.a * (c + 0.5), t.f + t.e * (r + 0.5)
    (x0, y0), rs = GEOMETRY[crs]
    assert 230 - cell <= (x - x0) / rs <= 270 + cell and 90 - cell <= (y0 - y) / rs <= 130 + cell


def test_windows_at_raster_edges_are_flush_and_inside(tmp_path, rig):
    path = scene(tmp_path / "e.tif", width=300, height=200, squares=[(284, 184, 16, RED)])
    one = run(path, rig, tile_px=64, window=1, top_k=50)
    assert one.boxes[0].pixel == (236, 136, 300, 200)
    two = run(path, rig, tile_px=64, window=2, top_k=50)
    assert two.boxes[0].pixel == (172, 72, 300, 200)
    for res in (one, two):
        assert all(0 <= b.pixel[0] < b.pixel[2] <= 300 and 0 <= b.pixel[1] < b.pixel[3] <= 200
                   for b in res.boxes)
    # window mode heatmap: one cell per base tile over the raster, NaN-free
    assert two.heatmap.shape == (1, 4, 5)
    assert two.heatmap_transform.a == 64 * UTM_RES and two.heatmap_transform.c == UTM_ORIGIN[0]
    assert not np.isnan(two.heatmap).any()
    assert two.heatmap[0, 3, 4] == pytest.approx(two.boxes[0].score)


def test_nms_keeps_windows_apart_and_union_gives_one_box_for_a_large_object(tmp_path, rig):
    path = scene(tmp_path / "u.tif", width=320, height=320, squares=[(100, 110, 100, RED)])
    square = np.array([100, 110, 200, 210], float)
    nms = run(path, rig, tile_px=32, window=2, threshold=0.5)
    boxes = np.array([b.pixel for b in nms.boxes], float)
    assert len(boxes) > 1  # the object is larger than a window
    for i in range(len(boxes)):  # kept windows never overlap one another
        for j in range(i):
            assert iou_one(boxes[i], boxes[j:j + 1])[0] == 0
    assert all(iou_one(square, b[None])[0] > 0 for b in boxes)
    union = run(path, rig, tile_px=32, window=2, threshold=0.5, merge="union")
    assert len(union.boxes) == 1
    u = np.array(union.boxes[0].pixel, float)
    assert iou_one(square, u[None])[0] > 0.5
    assert union.boxes[0].score == nms.boxes[0].score


def test_several_prompts_compete_and_each_finds_its_colour(tmp_path, rig):
    path = scene(tmp_path / "m.tif", squares=[(10, 10, 40, RED), (200, 140, 40, BLUE)])
    res = run(path, rig, tile_px=64, window=1, prompts=[RED_PROMPT, BLUE_PROMPT], threshold=0.5)
    by = {b.prompt: b for b in res.boxes}
    assert set(by) == {RED_PROMPT, BLUE_PROMPT} and len(res.boxes) == 2
    assert by[RED_PROMPT].pixel == (0, 0, 64, 64)
    assert by[BLUE_PROMPT].pixel == (192, 128, 256, 192)
    assert res.heatmap.shape[0] == 2 and res.prompts == [RED_PROMPT, BLUE_PROMPT]


def test_nodata_tiles_are_skipped_not_scored(tmp_path, rig):
    sq = [(200, 140, 40, RED)]
    masked = scene(tmp_path / "n.tif", squares=sq, mask_box=(192, 128, 64, 64))
    res = run(masked, rig, tile_px=64, window=1, top_k=50)
    assert res.skipped == 1 and res.windows == 19
    assert all(b.score < 0.5 for b in res.boxes)
    assert all(b.pixel != (192, 128, 256, 192) for b in res.boxes)
    assert np.isnan(res.heatmap[0, 2, 3]) and np.isfinite(res.heatmap[0, 0, 0])
    # a nodata value works the same way, in both modes
    nod = scene(tmp_path / "v.tif", squares=sq, nodata=0, nodata_box=(0, 0, 160, 128))
    res = run(nod, rig, tile_px=64, window=1, top_k=50)
    assert res.skipped == 4 and res.boxes[0].pixel == (192, 128, 256, 192)
    assert np.isnan(res.heatmap[0, :2, :2]).all() and np.isfinite(res.heatmap[0, 2:, :]).all()
    dense = run(nod, rig, mode="dense", tile_px=64)
    assert dense.skipped >= 1 and len(dense.boxes) == 1
    assert np.isnan(dense.heatmap[0, :8, :8]).all()            # cells of pixels 0..32
    assert np.isfinite(dense.heatmap[0, 40:, :]).all()


def test_extent_in_another_crs_limits_the_search(tmp_path, rig):
    from rasterio.warp import transform_bounds
    path = scene(tmp_path / "x.tif", width=384, height=256,
                 squares=[(20, 20, 30, RED), (270, 140, 30, RED)])
    (x0, y0), rs = GEOMETRY[UTM33]
    # the right half of the raster, given in EPSG:4326
    utm = (x0 + 192 * rs, y0 - 256 * rs, x0 + 384 * rs, y0)
    ext = transform_bounds(UTM33, WGS84, *utm)
    res = run(path, rig, tile_px=64, window=1, threshold=0.5, extent=ext, extent_crs=WGS84)
    assert [b.pixel for b in res.boxes] == [(256, 128, 320, 192)]
    assert res.tiles < 24
    with pytest.raises(UsageError) as err:
        run(path, rig, extent=(0.0, 0.0, 1.0, 1.0), extent_crs=WGS84)
    assert "misses" in err.value.message


def test_uint16_raster_is_stretched_and_searched(tmp_path, rig):
    path = scene(tmp_path / "u16.tif", squares=[(200, 140, 40, RED)], dtype="uint16")
    res = run(path, rig, tile_px=64, window=1)
    assert res.boxes[0].pixel == (192, 128, 256, 192) and res.boxes[0].score > 0.99


def test_gsd_resamples_tiles_on_read(tmp_path, rig):
    path = scene(tmp_path / "g.tif", width=512, height=256, squares=[(300, 40, 60, RED)])
    res = run(path, rig, tile_px=64, window=1, read=ReadOptions(gsd=1.0))  # 0.5 m native
    assert res.boxes[0].pixel == (256, 0, 384, 128)  # a 64-px tile covers 128 native px
    assert res.tiles == 8


def test_progress_per_batch_and_cancel_within_one_batch(tmp_path, rig):
    path = scene(tmp_path / "p.tif", width=256, height=256)
    calls = []
    res = detect(path, [RED_PROMPT], rig, options=DetectOptions(tile_px=32, window=2, batch_size=8),
                 progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] == res.windows == 7 * 7
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert len({d for d, _ in calls}) >= 49 // 8
    for mode in ("window", "dense"):
        stop = threading.Event()
        seen = []

        def progress(done, total):
            seen.append(done)
            if done > 0:
                stop.set()
        with pytest.raises(Cancelled):
            detect(path, [RED_PROMPT], rig, progress=progress, cancel=stop,
                   options=DetectOptions(mode=mode, tile_px=32, window=2, batch_size=8))
        assert len([d for d in seen if d > 0]) == 1, mode


def test_cuda_out_of_memory_halves_the_batch_then_gives_up_clearly(tmp_path, rig, monkeypatch):
    path = scene(tmp_path / "o.tif", width=192, height=128, squares=[(70, 10, 40, RED)])
    ref = run(path, rig, tile_px=64, window=1, batch_size=8)
    real = rig.model.encode_image

    def small_only(x, *a, **k):
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, *a, **k)
    monkeypatch.setattr(rig.model, "encode_image", small_only)
    res = run(path, rig, tile_px=64, window=1, batch_size=8, cache=False)  # encode again
    assert [b.pixel for b in res.boxes] == [b.pixel for b in ref.boxes]
    assert res.boxes[0].pixel == (64, 0, 128, 64)
    assert any("batch of 2" in w for w in res.warnings)

    def never(x, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(rig.model, "encode_image", never)
    with pytest.raises(MapClipError) as err:
        run(path, rig, tile_px=64, window=1, batch_size=8, cache=False)
    assert "out of memory" in err.value.message and "--device cpu" in err.value.hint


def test_resnet_in_dense_mode_falls_back_to_windows_with_a_warning(tmp_path):
    path = scene(tmp_path / "r.tif", width=128, height=128)
    res = run(path, tiny_resnet(), mode="dense", tile_px=64, window=1)
    assert res.mode == "window" and res.windows == 4
    assert any("window mode instead" in w for w in res.warnings)


def test_ungeoreferenced_image_works_in_pixel_coordinates_with_a_warning(tmp_path, rig):
    path = scene(tmp_path / "plain.tif", squares=[(200, 140, 40, RED)], crs=None)
    res = run(path, rig, tile_px=64, window=1)
    assert res.crs is None and any("georeferenc" in w for w in res.warnings)
    assert res.boxes[0].pixel == (192, 128, 256, 192)
    assert res.boxes[0].bounds == (192.0, -192.0, 256.0, -128.0)


def test_write_boxes_and_heatmap_in_the_rasters_crs(tmp_path, rig):
    import pyogrio
    import rasterio
    path = scene(tmp_path / "w.tif", squares=[(200, 140, 40, RED)])
    res = run(path, rig, tile_px=64, window=1, top_k=3)
    for name in ("b.gpkg", "b.geojson"):
        out = write_boxes(res, tmp_path / name)
        info = pyogrio.read_info(out)
        assert list(info["fields"]) == ["prompt", "score", "cosine", "rank", "model"]
        assert info["features"] == 3 and info["crs"] == "EPSG:32633"
        from pyogrio.raw import read
        meta, _, geom, fields = read(out)
        assert list(fields[0]) == [RED_PROMPT] * 3 and list(fields[3]) == [1, 2, 3]
        assert list(fields[4]) == ["rigged"] * 3
        with pytest.raises(UsageError):
            write_boxes(res, out)  # exists
        write_boxes(res, out, overwrite=True)
    assert pyogrio.read_info(tmp_path / "b.gpkg")["total_bounds"] == pytest.approx(
        tuple(np.array([b.bounds for b in res.boxes]).min(0)[:2])
        + tuple(np.array([b.bounds for b in res.boxes]).max(0)[2:]))
    h = write_heatmap(res, tmp_path / "h.tif")
    with rasterio.open(h) as ds:
        assert ds.count == 1 and ds.crs.to_epsg() == 32633
        assert ds.transform == res.heatmap_transform
        assert ds.descriptions[0] == RED_PROMPT
        assert np.allclose(ds.read(1), res.heatmap[0], equal_nan=True)
    with pytest.raises(UsageError):
        write_boxes(res, tmp_path / "b.shp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.geojson", "b.gpkg", "h.tif", "w.tif"]


def test_bad_input_is_a_usage_error_naming_the_fix(tmp_path, rig):
    path = scene(tmp_path / "ok.tif", width=128, height=128)
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    cases = [
        (lambda: run(str(tmp_path / "missing.tif"), rig), "does not exist"),
        (lambda: run(str(text), rig), "cannot open"),
        (lambda: run(path, rig, prompts=["  "]), "empty prompt"),
        (lambda: run(path, rig, prompts=[]), "empty prompt"),
        (lambda: run(path, rig, read=ReadOptions(bands=[1, 2, 3, 4])), "band 4 does not exist"),
        (lambda: run(path, rig, extent=(0, 0, 1, 1)), "misses the raster"),
        (lambda: run(path, rig, mode="boxes"), "unknown mode"),
        (lambda: run(path, rig, threshold=2.0), "threshold"),
    ]
    for fn, words in cases:
        with pytest.raises(UsageError) as err:
            fn()
        assert words in err.value.message, err.value.message
        assert err.value.hint and err.value.exit_code == 2


def test_raster_smaller_than_a_tile_is_one_resampled_tile(tmp_path, rig):
    path = scene(tmp_path / "tiny.tif", width=50, height=40, squares=[(10, 10, 20, RED)], block=None)
    win = run(path, rig, tile_px=64, window=2)
    assert win.tiles == 1 and win.windows == 1 and win.boxes[0].pixel == (0, 0, 50, 40)
    assert win.heatmap.shape == (1, 1, 1) and win.heatmap_transform.a == 50 * UTM_RES
    dense = run(path, rig, mode="dense", tile_px=64)
    (c0, r0, c1, r1), = [b.pixel for b in dense.boxes]
    assert c0 <= 12 and r0 <= 12 and c1 >= 28 and r1 >= 28 and c1 <= 50 and r1 <= 40


def test_stride_in_tiles_with_a_flush_last_window(tmp_path, rig):
    path = scene(tmp_path / "st.tif", width=320, height=256, squares=[(280, 10, 30, RED)])
    res = run(path, rig, tile_px=64, window=2, stride=2, top_k=50)
    # 5 x 4 tiles: window columns start at tiles 0, 2 and 3 (flush), rows at 0 and 2
    assert res.windows == 3 * 2
    assert all(b.pixel[0] in (0, 128, 192) and b.pixel[1] in (0, 128) for b in res.boxes)
    assert all((b.pixel[2] - b.pixel[0], b.pixel[3] - b.pixel[1]) == (128, 128) for b in res.boxes)
    assert res.boxes[0].pixel == (192, 0, 320, 128)


@pytest.mark.parametrize("slide", [False, True])
def test_dense_mode_at_a_larger_input_with_interpolated_positions_or_sliding_crops(tmp_path, rig, slide):
    """A 128-px tile fed at 128 px (16 x 16 patches of the 64-px model), not squeezed to 64."""
    path = scene(tmp_path / "s.tif", width=384, height=256, squares=[(230, 90, 40, RED)])
    res = run(path, rig, mode="dense", tile_px=128, dense_input_px=128, dense_slide=slide)
    assert res.mode == "dense" and len(res.boxes) == 1
    cell = 128 / 32   # 16 x 16 patches, upsampled x2, over a 128-px tile
    assert res.heatmap[0].shape == (256 // 4, 384 // 4)
    assert np.allclose(res.boxes[0].pixel, (230, 90, 270, 130), atol=cell)
    with pytest.raises(UsageError) as err:
        run(path, rig, mode="dense", tile_px=128, dense_input_px=100)
    assert "multiple" in err.value.message and err.value.option == "dense_input_px"


def test_detect_prompts_go_through_the_template_option(tmp_path, tiny_model):
    path = scene(tmp_path / "s.tif", width=128, height=128)
    raw = run(path, tiny_model, prompts=["ships"], mode="dense", tile_px=64, templates="raw")
    ens = run(path, tiny_model, prompts=["ships"], mode="dense", tile_px=64)      # the model's: remote-sensing
    one = run(path, tiny_model, prompts=["ships"], mode="dense", tile_px=64, templates="a photo of {}")
    assert not np.allclose(raw.heatmap, ens.heatmap) and not np.allclose(raw.heatmap, one.heatmap)
    with pytest.raises(UsageError) as err:
        run(path, tiny_model, prompts=["ships"], templates="nonsense")
    assert err.value.option == "templates"


@pytest.mark.parametrize("mode", ["window", "dense"])
def test_refine_fits_the_box_to_the_object_inside_the_window(tmp_path, rig, mode):
    path = scene(tmp_path / "r.tif", width=384, height=256, squares=[(150, 70, 44, RED)])
    square = np.array([150, 70, 194, 114], float)  # over 15 % of a 96-px window: fitted
    raw = run(path, rig, mode=mode, tile_px=48, window=2, top_k=1, refine=False)
    fit = run(path, rig, mode=mode, tile_px=48, window=2, top_k=1, refine=True)
    assert raw.refined == 0 and fit.refined == 1
    before = iou_one(square, np.array([raw.boxes[0].pixel], float))[0]
    after = iou_one(square, np.array([fit.boxes[0].pixel], float))[0]
    assert after > 0.6
    if mode == "window":  # a dense component already hugs a lone square; a window does not
        assert after > before + 0.2
    b = fit.boxes[0]
    assert b.score == raw.boxes[0].score and b.rank == 1
    assert b.bounds == pytest.approx(expected_bounds(UTM33, b.pixel), abs=1e-9)
    assert fit.to_json()["refined"] == 1


def test_refine_keeps_windows_with_no_object_inside(tmp_path, rig):
    # windows inside a red square larger than them hold no object of their own size to fit to
    path = scene(tmp_path / "k.tif", width=320, height=320, squares=[(60, 60, 200, RED)])
    raw = run(path, rig, tile_px=32, window=1, top_k=50, threshold=0.5)
    fit = run(path, rig, tile_px=32, window=1, top_k=50, threshold=0.5, refine=True)
    inner = [b.pixel for b in raw.boxes if 96 <= b.pixel[0] and b.pixel[2] <= 224
             and 96 <= b.pixel[1] and b.pixel[3] <= 224]
    assert inner and all(p in [b.pixel for b in fit.boxes] for p in inner)


@pytest.mark.parametrize("bad", [dict(refine_min=1.5), dict(refine_min=-0.1), dict(refine="yes")])
def test_refine_options_are_checked(tmp_path, rig, bad):
    path = scene(tmp_path / "b.tif")
    with pytest.raises(UsageError) as e:
        run(path, rig, tile_px=64, **bad)
    assert e.value.option == next(iter(bad))
