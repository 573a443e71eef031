"""Tile grids and exact tile bounds (engine/tiling.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from affine import Affine

from mapclip.engine.geo.tiling import PixelWindow, Tile, TileGrid, axis_starts, tiles_of

UTM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)
GEO = Affine(1e-4, 0.0, 13.0, 0.0, -1e-4, 52.5)


def coverage(grid: TileGrid, width: int, height: int) -> np.ndarray:
    cov = np.zeros((height, width), np.int32)
    for t in grid.tiles:
        assert t.col >= 0 and t.row >= 0
        assert t.col + t.width <= width and t.row + t.height <= height, t
        cov[t.row:t.row + t.height, t.col:t.col + t.width] += 1
    return cov


def test_tile_bounds_projected_are_exact():
    t = Tile(0, col=128, row=64, width=64, height=64, out_px=64)
    assert t.bounds(UTM) == (500064.0, 3999936.0, 500096.0, 3999968.0)
    assert t.window().bounds(UTM) == t.bounds(UTM)


def test_tile_bounds_geographic():
    t = Tile(0, col=100, row=20, width=50, height=30, out_px=64)
    xmin, ymin, xmax, ymax = t.bounds(GEO)
    assert xmin == pytest.approx(13.01, abs=1e-12)
    assert xmax == pytest.approx(13.015, abs=1e-12)
    assert ymax == pytest.approx(52.498, abs=1e-12)
    assert ymin == pytest.approx(52.495, abs=1e-12)


def test_tile_bounds_south_up_is_ordered():
    south_up = Affine(2.0, 0.0, 100.0, 0.0, 2.0, 50.0)
    assert Tile(0, 1, 2, 3, 4, 3).bounds(south_up) == (102.0, 54.0, 108.0, 62.0)


def test_edge_tiles_shift_inward_and_cover_everything():
    grid = TileGrid(PixelWindow(0, 0, 300, 200), 64, raster_size=(300, 200))
    assert grid.col_starts == [0, 64, 128, 192, 236]
    assert grid.row_starts == [0, 64, 128, 136]
    assert (grid.n_cols, grid.n_rows, len(grid)) == (5, 4, 20)
    cov = coverage(grid, 300, 200)
    assert cov.min() >= 1
    # the last column/row of tiles ends exactly on the raster edge
    assert max(t.col + t.width for t in grid.tiles) == 300
    assert max(t.row + t.height for t in grid.tiles) == 200
    assert all(t.width == t.height == t.out_px == 64 for t in grid.tiles)


def test_tiles_are_row_major_and_addressable():
    grid = TileGrid(PixelWindow(0, 0, 300, 200), 64, raster_size=(300, 200))
    for i, t in enumerate(grid.tiles):
        assert t.index == i
    t = grid.tile_at(2, 3)
    assert (t.row, t.col) == (grid.row_starts[2], grid.col_starts[3])


def test_overlapping_stride():
    grid = TileGrid(PixelWindow(0, 0, 100, 64), 64, stride_px=32, raster_size=(100, 64))
    assert grid.col_starts == [0, 32, 36]
    assert grid.row_starts == [0]
    assert coverage(grid, 100, 64).min() >= 1


def test_raster_smaller_than_a_tile_gives_one_clipped_tile():
    grid = TileGrid(PixelWindow(0, 0, 50, 40), 64, raster_size=(50, 40), out_px=64)
    assert len(grid) == 1
    t = grid.tiles[0]
    assert (t.col, t.row, t.width, t.height, t.out_px) == (0, 0, 50, 40, 64)


def test_aligned_grid_is_anchored_at_raster_origin():
    area = PixelWindow(37, 70, 100, 60)
    grid = TileGrid(area, 32, raster_size=(300, 200), block_shape=(64, 64))
    assert grid.col_starts[0] == 32 and grid.row_starts[0] == 64
    assert all(c % 32 == 0 for c in grid.col_starts)
    assert grid.block_aligned
    # every tile lies inside one 64 px block
    for t in grid.tiles:
        assert t.col // 64 == (t.col + t.width - 1) // 64
        assert t.row // 64 == (t.row + t.height - 1) // 64
    cov = coverage(grid, 300, 200)
    assert cov[70:130, 37:137].min() >= 1
    assert not TileGrid(area, 48, raster_size=(300, 200), block_shape=(64, 64)).block_aligned


def test_unaligned_grid_stays_inside_the_area():
    area = PixelWindow(37, 70, 100, 60)
    grid = TileGrid(area, 32, raster_size=(300, 200), align=False)
    assert grid.col_starts[0] == 37 and grid.row_starts[0] == 70
    assert grid.col_starts[-1] + 32 == 137 and grid.row_starts[-1] + 32 == 130
    assert grid.covered() == area


@pytest.mark.parametrize("align", [True, False])
def test_grid_invariants_over_many_shapes(align):
    rng = np.random.default_rng(1)
    for _ in range(150):
        w, h = (int(v) for v in rng.integers(1, 260, 2))
        c0, r0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        aw, ah = int(rng.integers(1, w - c0 + 1)), int(rng.integers(1, h - r0 + 1))
        tile = int(rng.integers(1, 90))
        stride = int(rng.integers(1, tile + 1))
        grid = TileGrid(PixelWindow(c0, r0, aw, ah), tile, stride, raster_size=(w, h),
                        align=align)
        cov = coverage(grid, w, h)
        assert cov[r0:r0 + ah, c0:c0 + aw].min() >= 1, (w, h, c0, r0, aw, ah, tile, stride)
        assert len(set((t.col, t.row) for t in grid.tiles)) == len(grid)  # no duplicates
        assert all(t.width == min(tile, w) and t.height == min(tile, h) for t in grid.tiles)


def test_axis_starts_no_duplicate_when_edge_shift_coincides():
    starts, size = axis_starts(0, 128, 64, 64, 128)
    assert starts == [0, 64] and size == 64


def test_tiles_of_windows():
    tiles = tiles_of([PixelWindow(0, 0, 10, 10), PixelWindow(5, 5, 20, 20)], 32)
    assert [(t.index, t.col, t.width, t.out_px) for t in tiles] == [(0, 0, 10, 32), (1, 5, 20, 32)]
    assert tiles[1].resampled and not Tile(0, 0, 0, 32, 32, 32).resampled


def test_pixel_window_helpers():
    a = PixelWindow(0, 0, 10, 10)
    b = PixelWindow(5, 8, 10, 10)
    assert a.intersection(b) == PixelWindow(5, 8, 5, 2)
    assert a.intersection(PixelWindow(20, 20, 5, 5)).is_empty()
    assert a.contains(PixelWindow(2, 2, 8, 8)) and not a.contains(b)
    assert tuple(a.to_rasterio().flatten()) == (0, 0, 10, 10)


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError):
        TileGrid(PixelWindow(0, 0, 10, 10), 0)
    for tile, stride in itertools.product([8], [0, -1]):
        with pytest.raises(ValueError):
            TileGrid(PixelWindow(0, 0, 10, 10), tile, stride)
