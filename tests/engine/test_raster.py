"""Raster input (engine/raster.py): opening, bands, stretch, nodata, extents, streaming."""
from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp

from mapclip.engine.raster import reader as R
from mapclip.engine.core.errors import Cancelled, UsageError
from mapclip.engine.core.jobs import Job
from mapclip.engine.raster.reader import (PIXEL_TRANSFORM, RasterReadError, RasterWarning, ReaderThreadError, open_raster)
from mapclip.engine.core.options import ReadOptions
from mapclip.engine.geo.extent import extent_to_window
from mapclip.engine.geo.gsd import native_tile_size, pixel_size_m
from mapclip.engine.raster.stream import iter_tile_batches
from mapclip.engine.geo.tiling import PixelWindow, Tile, TileGrid
from tests.raster_fixtures import (GEO_ORIGIN, GEO_RES, UTM_ORIGIN, make_raster, noise, plant)


def collect(it):
    tiles, arrays = [], []
    for ts, arr in it:
        tiles.extend(ts)
        arrays.extend(arr)
    return tiles, arrays


def reddest(tiles, arrays):
    score = [float(a[..., 0].astype(int).sum() - a[..., 1].astype(int).sum()) for a in arrays]
    return tiles[int(np.argmax(score))]


# ------------------------------------------------------------------ opening --
def test_info_of_a_projected_geotiff(tmp_path):
    p = make_raster(tmp_path / "a.tif", 300, 200, block=64)
    with open_raster(p) as r:
        info = r.info
        assert (info.width, info.height, info.count, info.dtype) == (300, 200, 3, "uint8")
        assert CRS.from_wkt(info.crs).to_epsg() == 32633
        assert info.transform == Affine(0.5, 0, 500000.0, 0, -0.5, 4000000.0)
        assert info.georeferenced and info.block_shape == (64, 64) and info.res == (0.5, 0.5)
        assert info.bounds == (500000.0, 3999900.0, 500150.0, 4000000.0)
        assert info.nodata is None and r.warnings == []


def test_read_returns_the_window_pixels(tmp_path):
    data = noise(3, 120, 130, seed=3)
    p = make_raster(tmp_path / "a.tif", data=data, block=32)
    with open_raster(p) as r:
        rgb, valid = r.read(PixelWindow(17, 9, 40, 30))
    assert rgb.dtype == np.uint8 and rgb.shape == (30, 40, 3)
    assert np.array_equal(rgb, data[:, 9:39, 17:57].transpose(1, 2, 0))
    assert valid.all()


@pytest.mark.parametrize("crs,origin,res", [("EPSG:32633", UTM_ORIGIN, 0.5),
                                            ("EPSG:4326", GEO_ORIGIN, GEO_RES)])
def test_planted_pattern_tile_has_exact_map_coordinates(tmp_path, crs, origin, res):
    data = noise(3, 256, 320, seed=5, low=60, high=120)
    plant(data, col=192, row=128, width=64, height=64)   # exactly one 64 px tile
    p = make_raster(tmp_path / "p.tif", data=data, crs=crs, block=64)
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 64)
        tiles, arrays = collect(iter_tile_batches(r, grid.tiles, 7))
        best = reddest(tiles, arrays)
        assert (best.col, best.row) == (192, 128)
        xmin, ymin, xmax, ymax = best.bounds(r.info.transform)
    assert xmin == pytest.approx(origin[0] + 192 * res, abs=1e-9)
    assert xmax == pytest.approx(origin[0] + 256 * res, abs=1e-9)
    assert ymax == pytest.approx(origin[1] - 128 * res, abs=1e-9)
    assert ymin == pytest.approx(origin[1] - 192 * res, abs=1e-9)
    if crs == "EPSG:32633":  # binary-exact in a metric grid
        assert (xmin, ymin, xmax, ymax) == (500096.0, 3999904.0, 500128.0, 3999936.0)


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as e:
        open_raster(tmp_path / "nope.tif")
    assert "does not exist" in e.value.message and e.value.hint


def test_unreadable_format_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("this is not a raster\n")
    with pytest.raises(UsageError) as e:
        open_raster(bad)
    assert "cannot open" in e.value.message and "GDAL" in e.value.hint
    with pytest.raises(UsageError):
        open_raster(tmp_path)  # a folder


def test_truncated_file_fails_with_a_clear_read_error(tmp_path):
    p = make_raster(tmp_path / "t.tif", 256, 256, block=64)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(UsageError) as e:   # RasterReadError, or refused at open
        with open_raster(p) as r:
            grid = TileGrid.for_raster(r.info, None, 64)
            collect(iter_tile_batches(r, grid.tiles, 4))
    assert "t.tif" in e.value.message and e.value.hint
    assert "previous exception" not in e.value.message


def test_rotated_geotransform_is_refused(tmp_path):
    rotated = Affine.translation(500000, 4000000) @ Affine.rotation(20) @ Affine.scale(0.5, -0.5)
    p = make_raster(tmp_path / "rot.tif", 64, 64, transform=rotated)
    with pytest.raises(UsageError) as e:
        open_raster(p)
    assert "rotated" in e.value.message and "gdalwarp" in e.value.hint


def test_ungeoreferenced_png_works_in_pixel_coordinates(tmp_path):
    p = make_raster(tmp_path / "img.png", 100, 80, crs=None, block=None, driver="PNG")
    with pytest.warns(RasterWarning, match="no georeferencing"):
        r = open_raster(p)
    with r:
        assert not r.info.georeferenced and r.info.crs is None
        assert r.info.transform == PIXEL_TRANSFORM and r.warnings
        t = Tile(0, 10, 20, 30, 40, 32)
        assert t.bounds(r.info.transform) == (10.0, -60.0, 40.0, -20.0)
        # an extent in those coordinates selects those pixels
        assert extent_to_window(r.info, (10, -60, 40, -20)) == PixelWindow(10, 20, 30, 40)
        with pytest.raises(UsageError, match="no CRS"):
            extent_to_window(r.info, (10, -60, 40, -20), "EPSG:4326")
        with pytest.raises(UsageError, match="no CRS"):
            native_tile_size(r.info, 64, 1.0)
        rgb, valid = r.read(PixelWindow(0, 0, 100, 80))
        assert rgb.shape == (80, 100, 3) and valid.all()


# -------------------------------------------------------------------- bands --
def test_default_bands_follow_colour_interpretation(tmp_path):
    data = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30, 40)])
    ci = [ColorInterp.undefined, ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    p = make_raster(tmp_path / "bgr.tif", data=data, colorinterp=ci, block=None)
    with open_raster(p) as r:
        assert r.bands == (4, 3, 2)
        rgb, _ = r.read(PixelWindow(0, 0, 8, 8))
    assert tuple(rgb[0, 0]) == (40, 30, 20)


def test_default_bands_are_the_first_three_without_colour_interpretation(tmp_path):
    data = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30, 40)])
    ci = [ColorInterp.undefined] * 4
    p = make_raster(tmp_path / "u.tif", data=data, colorinterp=ci, block=None)
    with open_raster(p) as r:
        assert r.bands == (1, 2, 3)
        with open_raster(p, ReadOptions(bands=[4, 1, 2])) as r2:
            assert tuple(r2.read(PixelWindow(0, 0, 4, 4))[0][1, 1]) == (40, 10, 20)


def test_one_band_is_repeated_to_grey(tmp_path):
    data = noise(1, 64, 64, seed=2)
    p = make_raster(tmp_path / "g.tif", data=data, block=None)
    with open_raster(p) as r:
        assert r.bands == (1, 1, 1)
        rgb, _ = r.read(PixelWindow(0, 0, 64, 64))
    assert np.array_equal(rgb[..., 0], data[0]) and np.array_equal(rgb[..., 2], data[0])
    p4 = make_raster(tmp_path / "four.tif", 32, 32, bands=4, block=None)
    with open_raster(p4, ReadOptions(bands=[3])) as r:
        assert r.bands == (3, 3, 3)


def test_paletted_band_expands_to_its_colours(tmp_path):
    data = (np.arange(32 * 32).reshape(1, 32, 32) % 3).astype(np.uint8)
    cmap = {0: (255, 0, 0, 255), 1: (0, 128, 0, 255), 2: (10, 20, 30, 255)}
    p = make_raster(tmp_path / "pal.tif", data=data, colormap=cmap, block=None)
    with open_raster(p) as r:
        rgb, _ = r.read(PixelWindow(0, 0, 32, 32))
        tiles, arrays = collect(iter_tile_batches(r, TileGrid.for_raster(r.info, None, 16).tiles, 4))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[0, 1]) == (0, 128, 0)
    assert tuple(rgb[0, 2]) == (10, 20, 30)
    assert np.array_equal(arrays[0], rgb[:16, :16])
    with open_raster(p, ReadOptions(bands=[1, 1, 1])) as r:   # explicit: raw indices as grey
        assert tuple(r.read(PixelWindow(0, 0, 4, 4))[0][0, 2]) == (2, 2, 2)


@pytest.mark.parametrize("bands", [[5], [1, 2, 9], [0, 1, 2]])
def test_absent_band_names_the_band_count(tmp_path, bands):
    p = make_raster(tmp_path / "four.tif", 32, 32, bands=4, block=None)
    with pytest.raises(UsageError) as e:
        open_raster(p, ReadOptions(bands=bands))
    assert "4 band(s)" in e.value.message and "--bands" in e.value.hint


@pytest.mark.parametrize("bands", [[1, 2], [1, 2, 3, 4]])
def test_two_or_more_than_three_bands_are_refused(tmp_path, bands):
    p = make_raster(tmp_path / "four.tif", 32, 32, bands=4, block=None)
    with pytest.raises(UsageError) as e:
        open_raster(p, ReadOptions(bands=bands))
    assert "4 band(s)" in e.value.message


# ------------------------------------------------------------------ stretch --
def ramp16(height=100, width=100, lo=1000, hi=3000) -> np.ndarray:
    v = np.linspace(lo, hi, height * width).round().astype(np.uint16).reshape(height, width)
    return np.stack([v, v, v])


def test_uint16_is_stretched_by_percentiles(tmp_path):
    data = ramp16()
    p = make_raster(tmp_path / "u16.tif", data=data, dtype="uint16", block=None)
    with open_raster(p) as r:
        assert r.stretch.kind == "linear"
        lo, hi = r.stretch.lo[0], r.stretch.hi[0]
        assert lo == pytest.approx(1040, abs=2) and hi == pytest.approx(2960, abs=2)
        rgb, _ = r.read(PixelWindow(0, 0, 100, 100))
    flat = rgb[..., 0].ravel()
    assert flat[0] == 0 and flat[-1] == 255                 # clipped tails
    assert (np.diff(flat.astype(int)) >= 0).all()           # monotone
    mid = data[0].ravel()[5000]
    assert flat[5000] == int(np.floor((mid - lo) * 255 / (hi - lo) + 0.5))


def test_fixed_range_and_none_stretch(tmp_path):
    data = ramp16()
    p = make_raster(tmp_path / "u16.tif", data=data, dtype="uint16", block=None)
    with open_raster(p, ReadOptions(fixed_range=(1000, 3000))) as r:
        rgb, _ = r.read(PixelWindow(0, 0, 100, 100))
    v = data[0]
    expect = np.clip(np.floor((v.astype(float) - 1000) * 255 / 2000 + 0.5), 0, 255)
    assert np.array_equal(rgb[..., 1], expect.astype(np.uint8))
    small = (np.arange(64 * 64).reshape(1, 64, 64) % 300).astype(np.uint16).repeat(3, 0)
    p2 = make_raster(tmp_path / "small.tif", data=small, dtype="uint16", block=None)
    with open_raster(p2, ReadOptions(stretch="none")) as r:
        rgb, _ = r.read(PixelWindow(0, 0, 64, 64))
    assert np.array_equal(rgb[..., 0], np.minimum(small[0], 255).astype(np.uint8))
    with pytest.raises(UsageError):
        open_raster(p2, ReadOptions(stretch="gamma"))
    with pytest.raises(UsageError):
        open_raster(p2, ReadOptions(fixed_range=(5, 5)))


def test_stretch_statistics_exclude_nodata(tmp_path):
    data = ramp16(lo=1000, hi=2000)
    p = make_raster(tmp_path / "nd.tif", data=data, dtype="uint16", nodata=0,
                    nodata_box=(0, 0, 100, 50), block=None)
    with open_raster(p, ReadOptions(stretch="minmax")) as r:
        # half the raster is 0 = nodata: the minimum must come from real data
        assert r.stretch.lo[0] >= 1500 and r.stretch.hi[0] == 2000


def test_stretch_statistics_from_a_block_sample_of_a_large_raster(tmp_path, monkeypatch):
    data = ramp16(256, 256, 0, 4000)
    p = make_raster(tmp_path / "big.tif", data=data, dtype="uint16", block=32)
    monkeypatch.setattr(R, "STATS_SAMPLE_PX", 8 * 32 * 32)   # force sampling 8 of 64 blocks
    calls = []
    orig = R.RasterReader._read_raw

    def spy(self, ds, window, *a, **k):
        calls.append(window)
        return orig(self, ds, window, *a, **k)

    monkeypatch.setattr(R.RasterReader, "_read_raw", spy)
    with open_raster(p) as r:
        assert 0 < sum(w.width * w.height for w in calls) <= 12 * 32 * 32
        assert all(w.width == 32 and w.height == 32 for w in calls)
        assert r.stretch.lo[0] == pytest.approx(80, abs=150)
        assert r.stretch.hi[0] == pytest.approx(3920, abs=150)


def test_stretch_statistics_from_an_overview(tmp_path, monkeypatch):
    data = ramp16(256, 256, 0, 4000)
    p = make_raster(tmp_path / "ovr.tif", data=data, dtype="uint16", block=32, overviews=[2, 4])
    monkeypatch.setattr(R, "STATS_MIN_SIDE", 64)
    calls = []
    orig = R.RasterReader._read_raw

    def spy(self, ds, window, out_shape, *a, **k):
        calls.append(out_shape)
        return orig(self, ds, window, out_shape, *a, **k)

    monkeypatch.setattr(R.RasterReader, "_read_raw", spy)
    with open_raster(p) as r:
        assert calls == [(64, 64)]
        assert r.stretch.lo[0] == pytest.approx(80, abs=100)


def test_float_raster_with_nan_is_stretched_and_masked(tmp_path):
    data = np.linspace(0.0, 1.0, 3 * 64 * 64, dtype=np.float32).reshape(3, 64, 64)
    data[:, :32, :] = np.nan
    p = make_raster(tmp_path / "f.tif", data=data, dtype="float32", block=None)
    with open_raster(p) as r:
        rgb, valid = r.read(PixelWindow(0, 0, 64, 64))
        assert not valid[:32].any() and valid[32:].all()
        assert rgb[32:].max() == 255 and rgb[32:].min() == 0
        grid = TileGrid.for_raster(r.info, None, 32)
        it = iter_tile_batches(r, grid.tiles, 8)
        tiles, _ = collect(it)
    assert sorted(t.row for t in tiles) == [32, 32] and it.skipped == 2


# ------------------------------------------------------------------- nodata --
def test_nodata_tiles_are_skipped_and_counted(tmp_path):
    p = make_raster(tmp_path / "nd.tif", 256, 128, nodata=0, nodata_box=(0, 0, 128, 64),
                    block=64)
    with open_raster(p) as r:
        assert r.mask_mode == "nodata"
        grid = TileGrid.for_raster(r.info, None, 64)
        it = iter_tile_batches(r, grid.tiles, 3)
        tiles, _ = collect(it)
    assert it.skipped == 2 and it.yielded == 6 and it.done == 8 and it.total == 8
    assert {(t.col, t.row) for t in tiles}.isdisjoint({(0, 0), (64, 0)})


def test_min_valid_threshold(tmp_path):
    # the first tile is 3/8 nodata
    p = make_raster(tmp_path / "nd.tif", 128, 64, nodata=0, nodata_box=(0, 0, 24, 64), block=64)
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 64)
        kept = [len(collect(iter_tile_batches(r, grid.tiles, 4, min_valid=m))[0])
                for m in (0.5, 0.7)]
    assert kept == [2, 1]


def test_alpha_and_mask_areas_are_skipped(tmp_path):
    for kw in (dict(alpha_box=(0, 0, 64, 64)), dict(mask_box=(0, 0, 64, 64))):
        p = make_raster(tmp_path / "m.tif", 128, 64, block=64, **kw)
        with open_raster(p) as r:
            assert r.mask_mode == "gdal" and r.bands == (1, 2, 3)
            _, valid = r.read(PixelWindow(0, 0, 128, 64))
            assert not valid[:, :64].any() and valid[:, 64:].all()
            it = iter_tile_batches(r, TileGrid.for_raster(r.info, None, 64).tiles, 2)
            tiles, _ = collect(it)
        assert [t.col for t in tiles] == [64] and it.skipped == 1


def test_constant_fill_tiles_are_skipped_as_empty(tmp_path):
    p = make_raster(tmp_path / "z.tif", 192, 64, fill_box=(64, 0, 64, 64), fill_value=0, block=64)
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 64)
        it = iter_tile_batches(r, grid.tiles, 8)
        tiles, _ = collect(it)
        assert [t.col for t in tiles] == [0, 128] and it.skipped == 1
        kept, _ = collect(iter_tile_batches(r, grid.tiles, 8, skip_empty=False))
        assert len(kept) == 3


def test_flat_tiles_of_other_values_are_content_not_fill(tmp_path):
    """A uniform grey (or water-coloured) tile is real content: only 0/255 fill is empty."""
    p = make_raster(tmp_path / "g.tif", 192, 64, fill_box=(64, 0, 64, 64), fill_value=128, block=64)
    with open_raster(p) as r:
        it = iter_tile_batches(r, TileGrid.for_raster(r.info, None, 64).tiles, 8)
        tiles, _ = collect(it)
        assert [t.col for t in tiles] == [0, 64, 128] and it.skipped == 0


# ------------------------------------------------------------------- extent --
def test_extent_in_the_raster_crs_is_exact_and_clipped(tmp_path):
    p = make_raster(tmp_path / "a.tif", 300, 200, block=64)
    with open_raster(p) as r:
        info = r.info
    assert extent_to_window(info, None) == PixelWindow(0, 0, 300, 200)
    assert extent_to_window(info, (500010.0, 3999950.0, 500020.0, 3999990.0)) == \
        PixelWindow(20, 20, 20, 80)
    # partial pixels round outward
    assert extent_to_window(info, (500010.2, 3999950.0, 500019.9, 3999989.9)) == \
        PixelWindow(20, 20, 20, 80)
    # clipped to the raster
    assert extent_to_window(info, (499000.0, 3999950.0, 500020.0, 4001000.0)) == \
        PixelWindow(0, 0, 40, 100)


def test_extent_in_another_crs_is_transformed(tmp_path):
    from rasterio.warp import transform_bounds
    p = make_raster(tmp_path / "a.tif", 400, 400, block=64)
    with open_raster(p) as r:
        info = r.info
    target = PixelWindow(100, 120, 80, 60)
    utm_box = target.bounds(info.transform)
    geo_box = transform_bounds("EPSG:32633", "EPSG:4326", *utm_box, densify_pts=21)
    win = extent_to_window(info, geo_box, "EPSG:4326")
    assert win.contains(target)                      # the whole extent is covered
    assert win.width - target.width <= 4 and win.height - target.height <= 4
    assert abs(win.col - target.col) <= 2 and abs(win.row - target.row) <= 2


def test_projected_extent_on_a_geographic_raster(tmp_path):
    from rasterio.warp import transform_bounds
    p = make_raster(tmp_path / "g.tif", 300, 300, crs="EPSG:4326", block=64)
    with open_raster(p) as r:
        info = r.info
    target = PixelWindow(50, 60, 100, 80)
    geo_box = target.bounds(info.transform)
    utm_box = transform_bounds("EPSG:4326", "EPSG:32633", *geo_box, densify_pts=21)
    win = extent_to_window(info, utm_box, "EPSG:32633")
    assert win.contains(target)
    # the UTM box encloses the slightly rotated geographic rectangle (meridian
    # convergence about 1.6 degrees at 13 E), so it grows by a few pixels
    assert win.width - target.width <= 10 and win.height - target.height <= 10


def test_extent_that_misses_is_a_usage_error(tmp_path):
    p = make_raster(tmp_path / "a.tif", 100, 100, block=None)
    with open_raster(p) as r:
        info = r.info
    with pytest.raises(UsageError) as e:
        extent_to_window(info, (0.0, 0.0, 10.0, 10.0))
    assert "misses" in e.value.message and "500000" in e.value.message
    with pytest.raises(UsageError, match="misses"):
        extent_to_window(info, (2.0, 40.0, 2.1, 40.1), "EPSG:4326")
    with pytest.raises(UsageError, match="empty or inverted"):
        extent_to_window(info, (500050.0, 0.0, 500010.0, 1.0))
    with pytest.raises(UsageError, match="unknown extent CRS"):
        extent_to_window(info, (0.0, 0.0, 1.0, 1.0), "EPSG:999999")


# ---------------------------------------------------------------------- GSD --
def test_gsd_sets_native_tile_size_and_resamples(tmp_path):
    data = noise(3, 128, 256, seed=9)
    p = make_raster(tmp_path / "a.tif", data=data, block=64)   # 0.5 m pixels
    with open_raster(p) as r:
        assert native_tile_size(r.info, 64, 1.0) == (128, 128)
        grid = TileGrid.for_raster(r.info, None, 64, gsd=1.0)
        assert [(t.col, t.width, t.out_px) for t in grid.tiles] == [(0, 128, 64), (128, 128, 64)]
        tiles, arrays = collect(iter_tile_batches(r, grid.tiles, 4))
    t, a = tiles[1], arrays[1]
    assert a.shape == (64, 64, 3)
    native = data[:, 0:128, 128:256].astype(np.float64)
    mean = native.reshape(3, 64, 2, 64, 2).mean(axis=(2, 4)).transpose(1, 2, 0)
    assert np.abs(a - mean).max() <= 1.0                         # 2x2 average
    assert t.bounds(r.info.transform) == (500064.0, 3999936.0, 500128.0, 4000000.0)


def test_reader_grid_applies_the_gsd_option(tmp_path):
    p = make_raster(tmp_path / "a.tif", 256, 128, block=64)
    with open_raster(p, ReadOptions(gsd=2.0)) as r:
        grid = r.grid(tile_px=32)
        assert [(t.col, t.width, t.height, t.out_px) for t in grid.tiles[:2]] == \
            [(0, 128, 128, 32), (128, 128, 128, 32)]
        _, arrays = collect(iter_tile_batches(r, grid.tiles, 4))
        assert [a.shape for a in arrays] == [(32, 32, 3)] * 2
    with open_raster(p) as r:
        assert r.grid(tile_px=32).tiles[0].width == 32


def test_pixel_size_in_metres_for_geographic_rasters(tmp_path):
    p = make_raster(tmp_path / "g.tif", 64, 64, crs="EPSG:4326", block=None)
    with open_raster(p) as r:
        mx, my = pixel_size_m(r.info)
    # 1e-4 degree at 52.5 N: about 6.8 m east-west, 11.1 m north-south
    assert mx == pytest.approx(6.80, abs=0.05) and my == pytest.approx(11.13, abs=0.05)


# ---------------------------------------------------------------- streaming --
def test_batches_match_per_tile_reads_and_keep_order(tmp_path):
    data = noise(3, 200, 300, seed=4)
    p = make_raster(tmp_path / "a.tif", data=data, block=64)
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 48, stride_px=40)
        sizes = []
        it = iter_tile_batches(r, grid.tiles, 5, workers=3, prefetch=2)
        tiles, arrays = [], []
        for ts, arr in it:   # keep every array: buffers must not be reused under us
            sizes.append(len(ts))
            tiles.extend(ts)
            arrays.append(arr)
        arrays = np.concatenate(arrays)
    assert [t.index for t in tiles] == list(range(len(grid)))
    assert max(sizes) == 5
    for t, a in zip(tiles, arrays):
        assert np.array_equal(a, data[:, t.row:t.row + 48, t.col:t.col + 48].transpose(1, 2, 0))


def test_reads_are_grouped_per_tile_row(tmp_path, monkeypatch):
    p = make_raster(tmp_path / "a.tif", 256, 128, block=64)
    calls = []
    orig = R.RasterReader._read_raw

    def spy(self, ds, window, *a, **k):
        calls.append(window)
        return orig(self, ds, window, *a, **k)

    with open_raster(p) as r:
        monkeypatch.setattr(R.RasterReader, "_read_raw", spy)
        grid = TileGrid.for_raster(r.info, None, 32)
        tiles, _ = collect(iter_tile_batches(r, grid.tiles, 8, workers=1))
    assert len(tiles) == 32
    assert len(calls) == 4                               # one read per 8 tiles in a row
    assert all(w.width == 256 and w.height == 32 and w.col == 0 for w in calls)


def test_cancel_stops_within_one_batch(tmp_path):
    p = make_raster(tmp_path / "a.tif", 256, 256, block=64)
    cancel = threading.Event()
    job = Job(cancel=cancel)
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 32)
        it = iter_tile_batches(r, grid.tiles, 4, job=job)
        next(it)
        cancel.set()
        with pytest.raises(Cancelled):
            next(it)
        assert it._pool is None and it.done == 4     # threads stopped, nothing more consumed


def test_cancel_interrupts_a_wait_for_a_slow_read(tmp_path, monkeypatch):
    p = make_raster(tmp_path / "a.tif", 128, 128, block=64)
    orig = R.RasterReader._read_group

    def slow(self, *a, **k):
        time.sleep(0.3)
        return orig(self, *a, **k)

    monkeypatch.setattr(R.RasterReader, "_read_group", slow)
    cancel = threading.Event()
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 64)
        it = iter_tile_batches(r, grid.tiles, 1, job=Job(cancel=cancel), workers=1, prefetch=1)
        threading.Timer(0.05, cancel.set).start()
        with pytest.raises(Cancelled):
            next(it)
        assert it.yielded == 0


def test_reader_thread_errors_surface_in_the_consumer(tmp_path, monkeypatch):
    p = make_raster(tmp_path / "a.tif", 128, 128, block=64)
    orig = R.RasterReader._read_group

    def boom(self, ds, tiles, i, j, *a, **k):
        if tiles[i].row >= 64:
            raise ValueError("disk on fire")
        return orig(self, ds, tiles, i, j, *a, **k)

    monkeypatch.setattr(R.RasterReader, "_read_group", boom)
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 64)
        it = iter_tile_batches(r, grid.tiles, 2, workers=2)
        first, _ = next(it)
        assert [t.row for t in first] == [0, 0]
        with pytest.raises(ReaderThreadError) as e:
            next(it)
        assert "disk on fire" in e.value.message and "row=64" in e.value.message
        assert isinstance(e.value.__cause__, ValueError)
        assert it._pool is None


def test_read_ahead_is_bounded(tmp_path):
    p = make_raster(tmp_path / "a.tif", 256, 256, block=64)
    with open_raster(p) as r:
        grid = TileGrid.for_raster(r.info, None, 16)          # 256 tiles
        it = iter_tile_batches(r, grid.tiles, 4, prefetch=2, workers=2)
        consumed = 0
        for _ in it:
            consumed += 1
            time.sleep(0.001)
            assert it._next_submit - consumed <= 2             # at most 2 batches ahead
        assert consumed == 64


def test_reader_is_thread_safe(tmp_path):
    data = noise(3, 256, 256, seed=8)
    p = make_raster(tmp_path / "a.tif", data=data, block=32)
    errors = []
    with open_raster(p) as r:
        def work(k):
            for i in range(20):
                c, rr = (k * 37 + i * 11) % 200, (k * 53 + i * 7) % 200
                rgb, _ = r.read(PixelWindow(c, rr, 50, 50))
                if not np.array_equal(rgb, data[:, rr:rr + 50, c:c + 50].transpose(1, 2, 0)):
                    errors.append((k, i))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(r._handles) >= 2
    assert errors == [] and r._handles == []


def test_window_outside_the_raster_is_refused(tmp_path):
    p = make_raster(tmp_path / "a.tif", 64, 64, block=None)
    with open_raster(p) as r:
        with pytest.raises(ValueError):
            r.read(PixelWindow(40, 40, 32, 32))
        with pytest.raises(ValueError):
            iter_tile_batches(r, [Tile(0, 40, 40, 32, 32, 32)], 4)


def test_gdal_cache_is_capped(tmp_path, monkeypatch):
    from rasterio.env import get_gdal_config, set_gdal_config
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    before = get_gdal_config("GDAL_CACHEMAX")
    try:
        set_gdal_config("GDAL_CACHEMAX", 4 * 1024 ** 3)
        with open_raster(make_raster(tmp_path / "a.tif", 32, 32, block=None)):
            assert int(get_gdal_config("GDAL_CACHEMAX")) == R.GDAL_CACHE_MB * 1024 * 1024
    finally:
        set_gdal_config("GDAL_CACHEMAX", before)


def test_affine_is_usable():
    # rasterio.transform and dataset.res rely on these operations
    t = Affine(0.5, 0, 10.0, 0, -0.5, 20.0)
    assert t @ (2, 2) == (11.0, 19.0) and (~t).a == 2.0 and t.determinant == -0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rasterio.transform.from_origin(10.0, 20.0, 0.5, 0.5) == t
