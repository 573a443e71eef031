"""Pixel windows and tile grids over a raster, as plain values.

Everything here is in *native raster pixels* (column, row, width, height),
and the raster's affine transform is the single source of georeferencing
truth: :meth:`Tile.bounds` maps a tile's pixel window through the transform
and nothing else, so map coordinates are exact (no rounding, no resampling).

Grid rules (:class:`TileGrid`):

* tiles are ``tile_px`` native pixels wide/high and placed every
  ``stride_px`` pixels (default: ``stride_px = tile_px``, no overlap);
* with ``align=True`` (default) the grid is anchored at the raster's pixel
  (0, 0): tile origins are multiples of the stride, so tiles fall on the
  raster's internal blocks whenever the stride divides the block size or is a
  multiple of it, and the same raster always gets the same tiles whatever the
  extent. The tiles then cover the area and may reach up to one stride
  outside it (never outside the raster). With ``align=False`` the grid starts
  at the area's corner and the last tile is shifted inward to end exactly on
  the area's edge;
* a tile that would cross the raster's edge is shifted inward so that it ends
  exactly on the edge: tiles are never padded past the raster and no part of
  the area is lost; a shifted tile that would coincide with its neighbour is
  dropped;
* a raster (axis) smaller than one tile gives one tile of the raster's size
  on that axis, read (resampled) to ``out_px`` like any other tile.

Tiles are listed row-major: ``index = r * n_cols + c``; ``col_starts`` and
``row_starts`` give the grid lines, so window-of-tiles code can address the
grid by (r, c) with :meth:`TileGrid.tile_at`.

The grid is lazy: only the grid lines are stored (memory proportional to the
number of tile columns plus rows, never to the pixel or tile count);
``grid.tiles`` is a :class:`TileSequence` that makes each :class:`Tile` as a
value when it is indexed or iterated, and ``len()`` still works. A tile
larger than the raster is clipped to the raster (read at the raster's size,
at least :data:`CLIP_TILE_PX`, not at the requested size), and a tile whose
output exceeds :data:`MAX_TILE_PX` is refused with a :class:`ValueError`
before anything is read.

GSD: a tile of ``tile_px`` *output* pixels at a target ground sampling
distance ``gsd`` (metres per pixel) covers ``round(tile_px * gsd / res_m)``
native pixels per axis, where ``res_m`` is the raster's native pixel size in
metres on that axis; :meth:`TileGrid.for_raster` does that conversion (see
:func:`engine.geo.gsd.native_tile_size`), and the tile's ``out_px`` stays
``tile_px``, so the reader resamples it on read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union, overload
from ..core.errors import UsageError
from .gsd import native_tile_size

SizeLike = Union[int, Tuple[int, int]]

#: the largest tile (output pixels per side) one read may make: a bigger tile is
#: refused before any read (a 20000-px tile is a 1.2 GB image)
MAX_TILE_PX = 8192
#: environment variable that raises or lowers :data:`MAX_TILE_PX`
MAX_TILE_ENV = "MAPCLIP_MAX_TILE_PX"
#: a tile larger than the raster is read at most this large (unless the raster is larger)
CLIP_TILE_PX = 1024


#: the most tiles, and the widest row of tiles (output pixels), one grid may hold by
#: default: detect and count keep per-tile and per-row state (heatmaps, tile strips),
#: so a raster declaring 10^6 x 10^6 pixels is refused up front, not after eating
#: the memory; the index streams and lifts the limit (``max_tiles=None``)
MAX_GRID_TILES = 250_000
MAX_ROW_PX = 1 << 18
MAX_GRID_ENV = "MAPCLIP_MAX_TILES"


def max_grid_tiles() -> int:
    try:
        return max(1, int(os.environ.get(MAX_GRID_ENV, MAX_GRID_TILES)))
    except ValueError:
        return MAX_GRID_TILES


def max_tile_px() -> int:
    try:
        return max(1, int(os.environ.get(MAX_TILE_ENV, MAX_TILE_PX)))
    except ValueError:
        return MAX_TILE_PX


@dataclass(frozen=True)
class PixelWindow:
    """A rectangle of native raster pixels: column, row, width, height."""

    col: int
    row: int
    width: int
    height: int

    @property
    def col_end(self) -> int:
        return self.col + self.width

    @property
    def row_end(self) -> int:
        return self.row + self.height

    def is_empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def intersection(self, other: "PixelWindow") -> "PixelWindow":
        """Overlap of two windows (width/height 0 when they do not overlap)."""
        c0, r0 = max(self.col, other.col), max(self.row, other.row)
        c1, r1 = min(self.col_end, other.col_end), min(self.row_end, other.row_end)
        return PixelWindow(c0, r0, max(0, c1 - c0), max(0, r1 - r0))

    def contains(self, other: "PixelWindow") -> bool:
        return (other.col >= self.col and other.row >= self.row
                and other.col_end <= self.col_end and other.row_end <= self.row_end)

    def bounds(self, transform) -> Tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of this window in the transform's CRS."""
        return window_bounds(transform, self.col, self.row, self.width, self.height)

    def to_rasterio(self):
        """The equivalent ``rasterio.windows.Window``."""
        from rasterio.windows import Window
        return Window(self.col, self.row, self.width, self.height)


def window_bounds(transform, col: float, row: float, width: float, height: float
                  ) -> Tuple[float, float, float, float]:
    """Map bounds of a pixel rectangle through an affine transform.

    Uses the coefficients directly (x = a*col + b*row + c, y = d*col + e*row + f)
    over the four corners, so it is exact for north-up and south-up rasters
    and correct for any affine transform.
    """
    a, b, c, d, e, f = (transform.a, transform.b, transform.c,
                        transform.d, transform.e, transform.f)
    xs, ys = [], []
    for cc, rr in ((col, row), (col + width, row), (col, row + height),
                   (col + width, row + height)):
        xs.append(a * cc + b * rr + c)
        ys.append(d * cc + e * rr + f)
    return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class Tile:
    """One tile: a native pixel window and the square size it is read to."""

    index: int
    col: int
    row: int
    width: int
    height: int
    out_px: int

    def window(self) -> PixelWindow:
        return PixelWindow(self.col, self.row, self.width, self.height)

    def bounds(self, transform) -> Tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in the raster's CRS, exact from the transform."""
        return window_bounds(transform, self.col, self.row, self.width, self.height)

    @property
    def resampled(self) -> bool:
        return self.width != self.out_px or self.height != self.out_px


def _pair(v: SizeLike, name: str) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        w, h = int(v[0]), int(v[1])
    else:
        w = h = int(v)
    if w <= 0 or h <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return w, h


def axis_starts(start: int, length: int, tile: int, stride: int, limit: int,
                block: Optional[int] = None, align: bool = True) -> Tuple[List[int], int]:
    """Tile origins along one axis and the tile size used on it.

    ``[start, start + length)`` is the area on an axis of ``limit`` pixels.
    Returns (origins, size): size is ``min(tile, limit)``; every origin lies
    in ``[0, limit - size]``; together the tiles cover the area.
    ``block`` is accepted for symmetry with the grid (alignment comes from
    anchoring at multiples of the stride, see the module doc).
    """
    del block  # alignment is implied by anchoring the grid at stride multiples
    if length <= 0:
        return [], 0
    size = min(tile, limit)
    if size == limit:
        return [0], size
    end = start + length
    if align:
        p = start - start % stride
        last = limit - size
    else:
        p = start
        last = max(0, min(limit, end) - size) if end - start >= size else min(start, limit - size)
        last = min(last, limit - size)
    out: List[int] = []
    while True:
        q = max(0, min(p, last))
        if not out or q != out[-1]:
            out.append(q)
        if p + size >= end or q >= last:
            break
        p += stride
    return out, size


class TileGrid:
    """Grid of tiles over a :class:`PixelWindow` (see the module doc for the rules).

    ``area``: the pixel window to cover; ``tile_px``/``stride_px``: native
    pixels, an int or (width, height); ``raster_size``: (width, height) of the
    raster in pixels (default: the area's far corner); ``out_px``: the square
    size tiles are read to (default: the native tile size, i.e. no
    resampling; for non-square native tiles the larger side);
    ``block_shape``: (rows, cols) of the raster's internal blocks, used only
    to report :attr:`block_aligned`; ``align``: anchor the grid at raster
    pixel (0, 0).
    """

    def __init__(self, area: PixelWindow, tile_px: SizeLike, stride_px: Optional[SizeLike] = None,
                 raster_size: Optional[Tuple[int, int]] = None, out_px: Optional[int] = None,
                 block_shape: Optional[Tuple[int, int]] = None, align: bool = True):
        tw, th = _pair(tile_px, "tile_px")
        sw, sh = _pair(stride_px if stride_px is not None else (tw, th), "stride_px")
        if raster_size is None:
            raster_size = (area.col_end, area.row_end)
        rw, rh = int(raster_size[0]), int(raster_size[1])
        area = area.intersection(PixelWindow(0, 0, rw, rh))
        self.area = area
        self.raster_size = (rw, rh)
        self.block_shape = tuple(block_shape) if block_shape else None
        self.align = align
        self.stride = (sw, sh)
        self.col_starts, self.tile_width = axis_starts(area.col, area.width, tw, sw, rw, align=align)
        self.row_starts, self.tile_height = axis_starts(area.row, area.height, th, sh, rh, align=align)
        self.out_px = int(out_px) if out_px else max(self.tile_width, self.tile_height, 1)
        limit = max_tile_px()
        if self.out_px > limit:
            raise ValueError(f"a tile of {self.out_px} x {self.out_px} output pixels is larger "
                             f"than the {limit}-px limit")
        self.n_cols = len(self.col_starts)
        self.n_rows = len(self.row_starts)
        self.tiles: TileSequence = TileSequence(self.col_starts, self.row_starts,
                                                self.tile_width, self.tile_height, self.out_px)

    @classmethod
    def for_raster(cls, info, area: Optional[PixelWindow], tile_px: int,
                   stride_px: Optional[int] = None, gsd: Optional[float] = None,
                   align: bool = True, max_tiles: Optional[int] = -1) -> "TileGrid":
        """Grid for a :class:`engine.raster.reader.RasterInfo`.

        Without ``gsd``, ``tile_px``/``stride_px`` are native pixels and tiles
        are read unresampled. With ``gsd`` (metres per pixel) they are
        *output* pixels: each tile covers ``round(tile_px * gsd / res_m)``
        native pixels and is resampled to ``tile_px`` on read.
        """
        if int(tile_px) <= 0 or (stride_px is not None and int(stride_px) <= 0):
            raise UsageError(f"tile size {tile_px} and stride {stride_px} must be positive",
                             "use e.g. --tile 224")
        try:
            grid = cls._for_raster(info, area, tile_px, stride_px, gsd, align, native_tile_size)
        except ValueError as exc:
            raise UsageError(f"cannot cut {info.width} x {info.height} px into tiles of "
                             f"{tile_px} px: {exc}",
                             f"use a smaller --tile (at most {max_tile_px()} output pixels), "
                             "or a coarser --gsd") from None
        limit = max_grid_tiles() if max_tiles == -1 else max_tiles
        if limit is not None:
            row_px = grid.n_cols * grid.out_px
            if len(grid) > limit or (max_tiles == -1 and row_px > MAX_ROW_PX
                                     and grid.n_cols > 1):
                raise UsageError(
                    f"the area is {grid.area.width} x {grid.area.height} px: {grid.n_cols} x "
                    f"{grid.n_rows} = {len(grid)} tiles of {tile_px} px, more than one run "
                    f"holds in memory (at most {limit} tiles and rows of at most "
                    f"{MAX_ROW_PX} px)",
                    "work on part of it with --extent, use a coarser --gsd or a larger "
                    f"--tile, or index it (python -m engine index streams any size); "
                    f"{MAX_GRID_ENV} raises the tile limit")
        return grid

    @classmethod
    def _for_raster(cls, info, area, tile_px, stride_px, gsd, align, native_tile_size):
        if area is None:
            area = PixelWindow(0, 0, info.width, info.height)
        stride_px = stride_px or tile_px
        if gsd:
            native = native_tile_size(info, tile_px, gsd)
            nstride = native_tile_size(info, stride_px, gsd)
            out = tile_px
        else:
            native, nstride, out = (tile_px, tile_px), (stride_px, stride_px), None
        if out is None and (min(tile_px, info.width) != tile_px
                            or min(tile_px, info.height) != tile_px):
            # raster smaller than a tile on an axis: the tile is clipped to the raster and
            # read at the requested size, but never larger than the raster (or
            # CLIP_TILE_PX), so a huge --tile costs no more memory than the raster itself
            out = min(int(tile_px), max(info.width, info.height, CLIP_TILE_PX))
        return cls(area, native, nstride, raster_size=(info.width, info.height),
                   out_px=out, block_shape=info.block_shape, align=align)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)

    def tile_at(self, r: int, c: int) -> Tile:
        return self.tiles[r * self.n_cols + c]

    @property
    def block_aligned(self) -> bool:
        """True when every tile origin (except edge-shifted ones) lies on a block
        boundary or inside one block line, i.e. reads never straddle blocks
        needlessly."""
        if not self.block_shape:
            return False
        bh, bw = self.block_shape
        sw, sh = self.stride
        return ((bw % sw == 0 or sw % bw == 0) and (bh % sh == 0 or sh % bh == 0)
                and self.align)

    def covered(self) -> PixelWindow:
        """The pixel window the tiles cover together."""
        if not self.tiles:
            return PixelWindow(self.area.col, self.area.row, 0, 0)
        c0, r0 = self.col_starts[0], self.row_starts[0]
        return PixelWindow(c0, r0, self.col_starts[-1] + self.tile_width - c0,
                           self.row_starts[-1] + self.tile_height - r0)


class TileSequence(Sequence):
    """The tiles of a grid, made on demand (row-major); supports ``len``,
    indexing (negative too), slicing (a contiguous slice is again a lazy
    TileSequence, a stepped one a list) and iteration. Tiles keep their index
    in the whole grid."""

    def __init__(self, col_starts: Sequence[int], row_starts: Sequence[int], width: int,
                 height: int, out_px: int, start: int = 0, stop: Optional[int] = None):
        self._cols, self._rows = col_starts, row_starts
        self._w, self._h, self._out = width, height, out_px
        total = len(col_starts) * len(row_starts)
        self._start = max(0, min(int(start), total))
        self._stop = total if stop is None else max(self._start, min(int(stop), total))
        self._n = self._stop - self._start

    def __len__(self) -> int:
        return self._n

    def _tile(self, k: int) -> Tile:
        i = self._start + k
        r, c = divmod(i, len(self._cols))
        return Tile(i, self._cols[c], self._rows[r], self._w, self._h, self._out)

    @overload
    def __getitem__(self, i: int) -> Tile: ...

    @overload
    def __getitem__(self, i: slice) -> List[Tile]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(self._n)
            if step == 1:
                return TileSequence(self._cols, self._rows, self._w, self._h, self._out,
                                    self._start + a, self._start + max(a, b))
            return [self._tile(k) for k in range(a, b, step)]
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"tile {i} of {self._n}")
        return self._tile(i)

    def __iter__(self) -> Iterator[Tile]:
        for k in range(self._n):
            yield self._tile(k)

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, TileSequence)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"TileSequence({self._n} tiles)"


def tiles_of(windows: Sequence[PixelWindow], out_px: int) -> List[Tile]:
    """Tiles for arbitrary pixel windows (e.g. k x k windows of a base grid)."""
    return [Tile(i, w.col, w.row, w.width, w.height, int(out_px)) for i, w in enumerate(windows)]
