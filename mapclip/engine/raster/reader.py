"""Raster input: open a raster, read windows as 8-bit RGB, stream tile batches.

Reading never loads a whole raster. :func:`open_raster` opens the file once
to learn its shape, bands, nodata/masks and (for non-8-bit data) the stretch
to 8 bit; :meth:`RasterReader.read` reads one pixel window;
:func:`raster.stream.iter_tile_batches` streams tiles in batches, read ahead
of the consumer by background threads.

Georeferencing
    ``RasterInfo.transform`` (pixel -> CRS, an :class:`affine.Affine`) is the
    single source of truth; :meth:`engine.geo.tiling.Tile.bounds` maps windows
    through it exactly. Rasters with no georeferencing (a PNG/JPEG without a
    world file) get ``Affine(1, 0, 0, 0, -1, 0)``: x = column, y = -row, the
    way QGIS places such images, so results overlay the image there; ``crs``
    is None, ``georeferenced`` is False, and a :class:`RasterWarning` is
    issued (also kept in ``RasterReader.warnings`` for callers that show
    messages instead). Rotated or sheared geotransforms and GCP-only
    georeferencing are refused with a :class:`UsageError` telling the user to
    warp the raster north-up first (``gdalwarp in.tif out.tif``).

Bands (``ReadOptions.bands``, 1-based)
    Three bands -> R, G, B; one band -> repeated to grey RGB, except that a
    paletted band (colour table) expands to its colours. Default: the
    bands whose colour interpretation is red, green, blue; else the first
    three; a one- or two-band raster uses band 1 as grey (band 2 is usually
    alpha). Asking for a band that does not exist, or for 2 or more than 3
    bands, is a :class:`UsageError` naming how many bands the raster has.

Stretch to 8 bit (``ReadOptions.stretch``)
    ``"auto"``: uint8 data passes unchanged, anything else is stretched
    linearly between per-band percentiles (``percentiles``, default 2-98);
    ``"percentile"``: the same, for uint8 too; ``"minmax"``: between the
    per-band minimum and maximum; ``"none"``: values are clipped to 0-255.
    ``fixed_range=(lo, hi)`` overrides all of these with one fixed range.
    Statistics are computed ONCE per raster when it is opened, over valid
    pixels only (nodata, masked, alpha-transparent and NaN pixels excluded),
    from the smallest overview with at least ``STATS_MIN_SIDE`` pixels on its
    long side when the raster has overviews, else from an evenly spread
    sample of whole internal blocks (about ``STATS_SAMPLE_PX`` pixels),
    else (small rasters) from the whole raster.

Validity, skipping
    A pixel is invalid where all selected bands equal the nodata value, where
    the GDAL mask (internal mask, alpha band) is 0, or where a float band is
    NaN/inf. :func:`iter_tile_batches` skips tiles whose valid fraction is
    below ``min_valid`` and (``skip_empty``) tiles whose 8-bit image is all
    black or all white in every band (the fill of rasters that declare no
    nodata); a flat tile of any other value (calm water, a grey roof) is
    real content and is kept. Skipped tiles are counted in
    ``TileBatches.skipped`` and never yields them.

Resampling
    A tile whose native window differs from its ``out_px`` (GSD option, see
    :mod:`engine.geo.tiling`) is resampled on read by GDAL: ``average`` when
    shrinking, ``bilinear`` when enlarging.

Memory
    GDAL's block cache is process-wide and by default 5% of RAM; the reader
    lowers it to ``GDAL_CACHE_MB`` when it is larger and the user has not set
    ``GDAL_CACHEMAX``, so that streaming a huge raster does not fill memory
    with cached blocks.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
import numpy as np

from . import compat  # noqa: F401  (repairs affine before rasterio uses it)

import affine  # noqa: E402
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from ..core.errors import Cancelled, MapClipError, UsageError
from ..core.options import STRETCHES, ReadOptions
from ..geo.tiling import PixelWindow, Tile, TileGrid
from .remote import gdal_path, http_defaults, is_remote, open_env, remote_error


try:  # OpenCV interleaves bands into tiles fast; numpy is the fallback
    import cv2 as _cv2
except ImportError:  # pragma: no cover
    _cv2 = None


#: the most source pixels one read may touch (see RasterReader._check_read_size)
MAX_READ_PX = 1 << 28


#: reads of more source pixels than this, from the main thread, can be interrupted
LONG_READ_PX = 1 << 22


READ_LIMIT_ENV = "MAPCLIP_MAX_READ_PX"


def max_read_px() -> int:
    try:
        return max(1, int(os.environ.get(READ_LIMIT_ENV, MAX_READ_PX)))
    except ValueError:
        return MAX_READ_PX


#: cap on GDAL's block cache (MB) while the engine reads, unless GDAL_CACHEMAX is set
GDAL_CACHE_MB = 128


#: pixels read (per band) for the stretch statistics when sampling blocks
STATS_SAMPLE_PX = 4_000_000


#: smallest long side of an overview used for statistics
STATS_MIN_SIDE = 1024


#: transform given to rasters with no georeferencing: x = column, y = -row (as QGIS shows them)
PIXEL_TRANSFORM = affine.Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


class RasterWarning(UserWarning):
    """Something about a raster the user should know (no georeferencing, ...)."""


class RasterReadError(UsageError):
    """Reading a window failed in GDAL (a corrupt or truncated file, an I/O error)."""


class ReaderThreadError(MapClipError):
    """A reader thread failed for another reason (reported with its cause chained)."""


def gdal_message(exc: BaseException) -> str:
    """The most specific message in an exception's cause chain (GDAL's own text)."""
    msgs = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip()
        if text and "see previous exception" not in text.lower():
            msgs.append(text.splitlines()[0])
        exc = exc.__cause__ or exc.__context__
    return msgs[-1] if msgs else "unknown GDAL error"


@dataclass(frozen=True)
class RasterInfo:
    """What the engine knows about an opened raster."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: Optional[str]                  # WKT, None when the raster has no CRS
    transform: affine.Affine            # pixel -> CRS (see module doc for ungeoreferenced)
    nodata: Optional[float]
    georeferenced: bool
    block_shape: Tuple[int, int]        # (rows, cols)
    res: Tuple[float, float]            # (x, y) pixel size in CRS units, positive
    bands: Tuple[int, int, int] = (1, 2, 3)   # 1-based bands read as R, G, B
    overviews: Tuple[int, ...] = ()     # decimation factors of band 1's overviews
    driver: str = ""

    @property
    def bounds(self) -> Tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the whole raster in its CRS."""
        return PixelWindow(0, 0, self.width, self.height).bounds(self.transform)

    @property
    def window(self) -> PixelWindow:
        return PixelWindow(0, 0, self.width, self.height)


@dataclass(frozen=True)
class Stretch:
    """Per-band linear map to 8 bit, for the unique bands read (in that order)."""

    kind: str                            # "identity", "linear", "clip" or "palette"
    lo: Tuple[float, ...] = ()
    hi: Tuple[float, ...] = ()


# ----------------------------------------------------------------- opening --
def _usage_open_error(path: str, exc: Exception) -> UsageError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_remote(path):
        return remote_error(path, msg)
    return UsageError(f"cannot open {path} as a raster: {msg}",
                      "give a raster GDAL can read (GeoTIFF, JPEG2000, VRT, PNG, JPEG, ...); "
                      "check that the file is complete and readable (gdalinfo FILE)")


def _limit_gdal_cache() -> None:
    if "GDAL_CACHEMAX" in os.environ:
        return
    from rasterio.env import get_gdal_config, set_gdal_config
    try:
        current = int(get_gdal_config("GDAL_CACHEMAX") or 0)
    except (TypeError, ValueError):
        return
    cap = GDAL_CACHE_MB * 1024 * 1024
    if current > cap or current <= 0:
        set_gdal_config("GDAL_CACHEMAX", cap)


def open_dataset(path: str):
    """rasterio.open with every failure turned into a UsageError; remote rasters
    (raster/remote.py) with GDAL's HTTP retries."""
    from contextlib import nullcontext

    remote = is_remote(path)
    if remote:
        http_defaults()
        path = gdal_path(path)
    p = Path(path)
    if not p.exists() and "://" not in path and not path.startswith("/vsi"):
        raise UsageError(f"raster {path} does not exist", "check the path")
    if p.is_dir():
        raise UsageError(f"{path} is a folder, not a raster file", "give the path of a raster file")
    try:
        with warnings.catch_warnings(), open_env() if remote else nullcontext():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except (RasterioError, OSError) as exc:
        if not remote:
            raise _usage_open_error(path, exc) from None
    # GDAL remembers a URL that failed ("does not exist in the file system"): ask again,
    # past that cache, for the server's answer now (it may be back) and its real reason
    try:
        with warnings.catch_warnings(), open_env(CPL_VSIL_CURL_NON_CACHED=path):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except (RasterioError, OSError) as exc:
        raise _usage_open_error(path, exc) from None


def resolve_bands(count: int, colorinterp: Sequence, bands: Optional[Sequence[int]],
                  path: str = "raster") -> Tuple[int, int, int]:
    """The three 1-based bands read as R, G, B (see the module doc)."""
    if bands is not None:
        bands = [int(b) for b in bands]
        bad = [b for b in bands if b < 1 or b > count]
        if bad:
            raise UsageError(f"band {bad[0]} does not exist: {path} has {count} band(s)",
                             f"choose bands between 1 and {count}, e.g. --bands "
                             + (",".join(str(i) for i in range(1, min(count, 3) + 1))))
        if len(bands) == 1:
            return (bands[0],) * 3
        if len(bands) != 3:
            raise UsageError(f"{len(bands)} bands asked; give 1 band (grey) or 3 bands (R,G,B); "
                             f"{path} has {count} band(s)",
                             "e.g. --bands 1,2,3 or --bands 1")
        return tuple(bands)  # type: ignore[return-value]
    ci = list(colorinterp or [])
    try:
        return (ci.index(ColorInterp.red) + 1, ci.index(ColorInterp.green) + 1,
                ci.index(ColorInterp.blue) + 1)
    except ValueError:
        pass
    if count >= 3:
        return (1, 2, 3)
    return (1, 1, 1)


def _check_geotransform(ds, path: str) -> Tuple[affine.Affine, bool, Optional[str], List[str]]:
    """(transform, georeferenced, crs wkt, warnings) or a UsageError for rotated rasters."""
    t = ds.transform
    msgs: List[str] = []
    identity = (t.a, t.b, t.c, t.d, t.e, t.f) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    crs = ds.crs.to_wkt() if ds.crs else None
    if identity:
        gcps, _ = ds.gcps
        if gcps or ds.rpcs:
            raise UsageError(f"{path} is georeferenced by ground control points/RPCs, "
                             "not by a geotransform",
                             "warp it to a north-up raster first, e.g. gdalwarp "
                             "-t_srs EPSG:32633 in.tif out.tif")
        msgs.append(f"{path} has no georeferencing: working in pixel coordinates "
                    "(x = column, y = -row)")
        return PIXEL_TRANSFORM, False, None, msgs
    if t.b != 0.0 or t.d != 0.0:
        raise UsageError(f"{path} has a rotated or sheared geotransform, which is not supported",
                         "warp it to a north-up raster first: gdalwarp in.tif out_northup.tif")
    if t.a == 0.0 or t.e == 0.0:
        raise UsageError(f"{path} has a degenerate geotransform (zero pixel size)",
                         "fix its georeferencing (gdal_edit.py -a_ullr ...)")
    if crs is None:
        msgs.append(f"{path} has a geotransform but no CRS: coordinates are in its unknown CRS")
    return t, True, crs, msgs


class RasterReader:
    """An opened raster: info, band choice, stretch, and thread-safe window reads.

    Use as a context manager (or call :meth:`close`). Every thread that reads
    gets its own rasterio dataset handle (rasterio handles are not
    thread-safe); all are closed by :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, options: Optional[ReadOptions] = None):
        self.path = gdal_path(path)      # a URL as /vsicurl/ (raster/remote.py)
        self.options = options or ReadOptions()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._handles: list = []
        self._closed = False
        _limit_gdal_cache()
        ds = open_dataset(self.path)
        try:
            self._setup(ds)
        except BaseException:
            ds.close()
            raise
        self._local.ds = ds
        self._handles.append(ds)

    # -- setup --
    def _setup(self, ds) -> None:
        opts = self.options
        path = self.path
        transform, geo, crs, msgs = _check_geotransform(ds, path)
        bands = resolve_bands(ds.count, ds.colorinterp, opts.bands, path)
        self.bands = bands
        self.unique_bands: Tuple[int, ...] = tuple(dict.fromkeys(bands))
        self.band_slot = tuple(self.unique_bands.index(b) for b in bands)
        dtypes = {ds.dtypes[b - 1] for b in self.unique_bands}
        self.dtype = np.dtype(ds.dtypes[self.unique_bands[0] - 1] if len(dtypes) == 1 else "float32")
        blocks = ds.block_shapes[0] if ds.block_shapes else (1, ds.width)
        nodata = ds.nodata
        self.info = RasterInfo(
            path=path, width=ds.width, height=ds.height, count=ds.count,
            dtype=str(np.dtype(ds.dtypes[bands[0] - 1])), crs=crs, transform=transform,
            nodata=None if nodata is None else float(nodata), georeferenced=geo,
            block_shape=(int(blocks[0]), int(blocks[1])),
            res=(abs(transform.a), abs(transform.e)), bands=bands,
            overviews=tuple(ds.overviews(1)), driver=ds.driver)
        self.warnings: List[str] = list(msgs)
        for m in msgs:
            warnings.warn(m, RasterWarning, stacklevel=4)
        # validity source
        flags = [set(ds.mask_flag_enums[b - 1]) for b in self.unique_bands]
        is_float = self.dtype.kind == "f"
        if all(f == {MaskFlags.all_valid} for f in flags):
            self.mask_mode = "none"
        elif all(f == {MaskFlags.nodata} for f in flags) and nodata is not None:
            self.mask_mode = "nodata"
        else:  # internal mask, alpha band, per-band masks
            self.mask_mode = "gdal"
        if nodata is None:
            self.nodata = None
        elif is_float:
            self.nodata = float(nodata)
        elif np.iinfo(self.dtype).min <= nodata <= np.iinfo(self.dtype).max:
            self.nodata = self.dtype.type(nodata)
        else:  # a nodata value the data type cannot hold matches no pixel
            self.nodata = None
            if self.mask_mode == "nodata":
                self.mask_mode = "none"
        self.palette = self._palette(ds, opts)
        if self.palette is not None:
            # one paletted band expands to the three colour planes of its colour table
            self.band_slot = (0, 1, 2)
            self.stretch = Stretch("palette")
            self._lut = None
        else:
            self.stretch = self._make_stretch(ds)
            self._lut = self._make_lut()

    def _palette(self, ds, opts: ReadOptions) -> Optional[np.ndarray]:
        """(3, N) uint8 colour table for a one-band paletted raster read by default."""
        b = self.unique_bands[0]
        if (len(self.unique_bands) != 1 or self.dtype.kind != "u" or self.dtype.itemsize > 2
                or ds.colorinterp[b - 1] != ColorInterp.palette
                or (opts.bands is not None and len(opts.bands) == 3)):
            return None
        try:
            cmap = ds.colormap(b)
        except ValueError:
            return None
        n = int(np.iinfo(self.dtype).max) + 1
        table = np.zeros((3, n), np.uint8)
        for idx, rgba in cmap.items():
            if 0 <= idx < n:
                table[:, idx] = rgba[:3]
        return table

    def _make_stretch(self, ds) -> Stretch:
        o = self.options
        kind = (o.stretch or "auto").lower()
        if kind not in STRETCHES:
            raise UsageError(f"unknown stretch {o.stretch!r}", f"use one of {', '.join(STRETCHES)}")
        n = len(self.unique_bands)
        if o.fixed_range is not None:
            lo, hi = float(o.fixed_range[0]), float(o.fixed_range[1])
            if not hi > lo:
                raise UsageError(f"fixed range {lo}..{hi} is empty", "give min < max")
            return Stretch("linear", (lo,) * n, (hi,) * n)
        if kind == "none" or (kind == "auto" and self.dtype == np.uint8):
            return Stretch("identity" if self.dtype == np.uint8 else "clip")
        p = (0.0, 100.0) if kind == "minmax" else tuple(float(v) for v in o.percentiles)
        if not (0.0 <= p[0] < p[1] <= 100.0):
            raise UsageError(f"percentiles {p} are not 0 <= low < high <= 100", "e.g. 2,98")
        sample, valid = self._stats_sample(ds)
        lo, hi = [], []
        for k in range(n):
            v = sample[k][valid] if valid is not None else sample[k].ravel()
            if v.dtype.kind == "f":
                v = v[np.isfinite(v)]
            if v.size == 0:
                l, h = 0.0, 255.0
            else:
                l, h = _percentiles(v, p)
            if h <= l:
                h = l + 1.0
            lo.append(l)
            hi.append(h)
        return Stretch("linear", tuple(lo), tuple(hi))

    def _stats_sample(self, ds) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(bands, ...) sample for the statistics and its validity mask (or None)."""
        w, h = ds.width, ds.height
        ovr = ds.overviews(self.unique_bands[0])
        if ovr:
            usable = [f for f in ovr if max(w, h) / f >= STATS_MIN_SIDE] or [min(ovr)]
            f = max(usable)
            shape = (max(1, round(h / f)), max(1, round(w / f)))
            raw, valid = self._read_raw(ds, PixelWindow(0, 0, w, h), shape, Resampling.nearest)
            return raw.reshape(len(self.unique_bands), -1), \
                None if valid is None else valid.reshape(-1)
        if w * h <= STATS_SAMPLE_PX:
            raw, valid = self._read_raw(ds, PixelWindow(0, 0, w, h), None)
            return raw.reshape(len(self.unique_bands), -1), \
                None if valid is None else valid.reshape(-1)
        bh, bw = self.info.block_shape
        bw, bh = min(bw, w), min(bh, h)
        n_bc, n_br = math.ceil(w / bw), math.ceil(h / bh)
        k = max(1, min(n_bc * n_br, STATS_SAMPLE_PX // max(1, bw * bh)))
        kc = min(n_bc, max(1, math.ceil(math.sqrt(k))))
        kr = min(n_br, max(1, math.ceil(k / kc)))
        raws, valids = [], []
        for r in np.unique(np.linspace(0, n_br - 1, kr).round().astype(int)):
            for c in np.unique(np.linspace(0, n_bc - 1, kc).round().astype(int)):
                win = PixelWindow(int(c) * bw, int(r) * bh, min(bw, w - int(c) * bw),
                                  min(bh, h - int(r) * bh))
                raw, valid = self._read_raw(ds, win, None)
                raws.append(raw.reshape(len(self.unique_bands), -1))
                if valid is not None:
                    valids.append(valid.reshape(-1))
        return np.concatenate(raws, axis=1), (np.concatenate(valids) if valids else None)

    def _make_lut(self) -> Optional[np.ndarray]:
        """Per-band lookup table to uint8 for 8/16-bit integer data (fast path)."""
        s = self.stretch
        if s.kind == "identity" or self.dtype.kind not in "ui" or self.dtype.itemsize > 2:
            return None
        info = np.iinfo(self.dtype)
        values = np.arange(info.min, info.max + 1, dtype=np.float64)
        luts = []
        for k in range(len(self.unique_bands)):
            if s.kind == "clip":
                y = values
            else:
                y = (values - s.lo[k]) * (255.0 / (s.hi[k] - s.lo[k]))
            luts.append(np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8))
        return np.stack(luts)

    def grid(self, area: Optional[PixelWindow] = None, tile_px: int = 224,
             stride_px: Optional[int] = None, align: bool = True) -> TileGrid:
        """Tile grid over ``area`` (default: the whole raster) honouring ``options.gsd``.

        Without a GSD, ``tile_px``/``stride_px`` are native pixels; with one
        they are output pixels (see :meth:`engine.geo.tiling.TileGrid.for_raster`).
        """
        return TileGrid.for_raster(self.info, area, tile_px, stride_px,
                                   gsd=self.options.gsd, align=align)

    # -- handles --
    def _dataset(self):
        ds = getattr(self._local, "ds", None)
        if ds is None:
            if self._closed:
                raise RuntimeError("raster reader is closed")
            ds = open_dataset(self.path)
            self._local.ds = ds
            with self._lock:
                self._handles.append(ds)
        return ds

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
        for ds in handles:
            try:
                ds.close()
            except Exception:  # pragma: no cover - closing must not raise
                pass
        self._local = threading.local()

    def __enter__(self) -> "RasterReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --
    def _check_window(self, window: PixelWindow) -> None:
        if window.is_empty() or not self.info.window.contains(window):
            raise ValueError(f"window {window} is not inside the raster "
                             f"({self.info.width} x {self.info.height} px)")

    def _read_interruptible(self, window: PixelWindow, out_shape, cancel):
        """:meth:`_read_raw` in a daemon thread with its own dataset handle; the
        caller polls, so KeyboardInterrupt and ``cancel`` end the wait (GDAL
        finishes the abandoned read in the background and closes its handle)."""
        box: dict = {}

        def work() -> None:
            try:
                ds = open_dataset(self.path)
                try:
                    box["value"] = self._read_raw(ds, window, out_shape)
                finally:
                    ds.close()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        t = threading.Thread(target=work, name="mapclip-long-read", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            if cancel is not None and cancel.is_set():
                raise Cancelled()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _check_read_size(self, window: PixelWindow, out_shape: Optional[Tuple[int, int]]) -> None:
        """Refuse, before GDAL starts, one read that would touch more than
        :func:`max_read_px` source pixels: such a read (a whole huge raster shrunk
        to one image) runs for minutes inside GDAL where Ctrl-C cannot stop it.
        Overviews count: a read served from an overview touches fewer pixels."""
        limit = max_read_px()
        px = window.width * window.height
        if px <= limit:
            return
        factor = 1
        if out_shape is not None:
            shrink = min(window.width / max(1, out_shape[1]), window.height / max(1, out_shape[0]))
            try:
                ovr = self._dataset().overviews(self.unique_bands[0])
            except Exception:  # noqa: BLE001
                ovr = []
            usable = [f for f in ovr if f <= shrink]
            factor = max(usable) if usable else 1
        if px / (factor * factor) > limit:
            raise UsageError(
                f"reading {window.width} x {window.height} px of {self.path} as one image is "
                f"too large ({px / 1e6:.0f} Mpx, the limit is {limit / 1e6:.0f} Mpx): it would "
                "take minutes and could not be interrupted",
                "work per tile (count: --tile PX), on a smaller --extent, or build overviews "
                f"first (gdaladdo {self.path}); {READ_LIMIT_ENV} raises the limit")

    def _read_raw(self, ds, window: PixelWindow, out_shape: Optional[Tuple[int, int]],
                  resampling: Optional[Resampling] = None, scratch: Optional["Scratch"] = None
                  ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Unique bands (n, h, w) in the raster's dtype, and validity (h, w) or None.

        With ``scratch`` the bands are read into a reused per-thread buffer
        (valid until the next read by that thread).
        """
        win = window.to_rasterio()
        n = len(self.unique_bands)
        h, w = window.height, window.width
        resample = {}
        if out_shape is not None and tuple(out_shape) != (h, w):
            if resampling is None:
                shrink = out_shape[0] * out_shape[1] < w * h
                resampling = Resampling.average if shrink else Resampling.bilinear
            h, w = int(out_shape[0]), int(out_shape[1])
            resample = dict(out_shape=(n, h, w), resampling=resampling)
        if scratch is not None:
            buf = scratch.get("raw", (n, h, w), self.dtype)
            raw = ds.read(list(self.unique_bands), window=win, out=buf,
                          resampling=resample.get("resampling", Resampling.nearest))
        else:
            raw = ds.read(list(self.unique_bands), window=win, out_dtype=self.dtype, **resample)
        kw = resample
        valid = None
        mode = self.mask_mode
        if mode == "gdal":
            mkw = {}
            if kw:
                mkw = dict(out_shape=kw["out_shape"][1:], resampling=Resampling.nearest)
            valid = None
            for b in self.unique_bands:
                m = ds.read_masks(b, window=win, **mkw) > 0
                valid = m if valid is None else (valid & m)
        elif mode == "nodata":
            nd = self.nodata
            if isinstance(nd, float) and math.isnan(nd):
                valid = ~np.isnan(raw).all(axis=0)
            else:
                valid = (raw != nd).any(axis=0)
        if self.dtype.kind == "f":
            finite = np.isfinite(raw).all(axis=0)
            valid = finite if valid is None else (valid & finite)
        return raw, valid

    def _to_rgb(self, raw: np.ndarray) -> np.ndarray:
        """(n, h, w) raw unique bands -> new (h, w, 3) uint8 RGB."""
        conv = self._to_uint8(raw)
        out = np.empty(conv.shape[1:] + (3,), np.uint8)
        for c, slot in enumerate(self.band_slot):
            out[..., c] = conv[slot]
        return out

    def read(self, window: PixelWindow, out_shape: Optional[Tuple[int, int]] = None,
             cancel=None) -> Tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB and (H, W) bool validity for a native pixel window.

        ``out_shape`` (rows, cols) resamples on read (average when shrinking,
        bilinear when enlarging). Safe to call from any thread. A long read
        (more than :data:`LONG_READ_PX` source pixels) made from the main thread
        runs in a helper thread while the caller waits in short steps, so Ctrl-C
        and ``cancel`` (anything with ``is_set()``) stop the wait at once.
        """
        self._check_window(window)
        self._check_read_size(window, out_shape)
        try:
            if (window.width * window.height > LONG_READ_PX
                    and threading.current_thread() is threading.main_thread()):
                raw, valid = self._read_interruptible(window, out_shape, cancel)
            else:
                raw, valid = self._read_raw(self._dataset(), window, out_shape)
        except RasterioError as exc:
            raise RasterReadError(f"reading {self.path} at {window} failed: {gdal_message(exc)}",
                                  "check that the file is complete and readable "
                                  "(gdalinfo -checksum FILE)") from exc
        rgb = self._to_rgb(raw)
        if valid is None:
            valid = np.ones(rgb.shape[:2], bool)
        return rgb, valid

    # -- batches (used by TileBatches from worker threads) --
    def _read_group(self, ds, tiles: Sequence[Tile], i: int, j: int, out: np.ndarray,
                    valid_frac: np.ndarray, scratch: Optional["Scratch"] = None) -> None:
        """Read tiles[i:j] (one run from :func:`_group_end`) with one GDAL call.

        The run's super-window is read band-sequential, converted to 8 bit,
        and each output channel is cut for all tiles of the run at once
        (a strided view when the tiles are evenly spaced), so the per-tile
        Python work is nil and the pixels are copied once after GDAL.
        """
        t0 = tiles[i]
        S = t0.out_px
        c0 = t0.col
        c1 = tiles[j - 1].col + t0.width
        win = PixelWindow(c0, t0.row, c1 - c0, t0.height)
        self._check_window(win)
        out_shape = (S, int(round((c1 - c0) * S / t0.width))) if t0.resampled else None
        raw, valid = self._read_raw(ds, win, out_shape, scratch=scratch)
        conv = self._to_uint8(raw, scratch)
        offs = [((t.col - c0) * S) // t0.width for t in tiles[i:j]]
        planes = [conv[slot] for slot in self.band_slot]
        if _cv2 is not None:
            # OpenCV interleaves the three planes of each tile straight into the
            # batch (several times faster than numpy's strided channel writes)
            for m, off in enumerate(offs):
                _cv2.merge([p[:, off:off + S] for p in planes], dst=out[i + m])
        else:  # pragma: no cover - OpenCV is a dependency; numpy fallback
            k = j - i
            steps = {b - a for a, b in zip(offs, offs[1:])}
            for c, src in enumerate(planes):
                if k > 1 and len(steps) == 1:
                    view = np.lib.stride_tricks.as_strided(
                        src[:, offs[0]:], shape=(k, S, S),
                        strides=((offs[1] - offs[0]) * src.strides[1],) + src.strides,
                        writeable=False)
                    out[i:j, :, :, c] = view
                else:
                    for m, off in enumerate(offs):
                        out[i + m, :, :, c] = src[:, off:off + S]
        if valid is None:
            valid_frac[i:j] = 1.0
        else:
            area = float(S * S)
            for m, off in enumerate(offs):
                valid_frac[i + m] = np.count_nonzero(valid[:, off:off + S]) / area

    def _to_uint8(self, raw: np.ndarray, scratch: Optional["Scratch"] = None) -> np.ndarray:
        """(n, h, w) raw unique bands -> (n, h, w) uint8 by the stretch (no copy for uint8)."""
        s = self.stretch
        if s.kind == "identity":
            return raw
        n, h, w = raw.shape
        if s.kind == "palette":
            conv = scratch.get("u8", (3, h, w), np.uint8) if scratch is not None \
                else np.empty((3, h, w), np.uint8)
            for k in range(3):
                np.take(self.palette[k], raw[0], out=conv[k])
            return conv
        conv = scratch.get("u8", (n, h, w), np.uint8) if scratch is not None \
            else np.empty((n, h, w), np.uint8)
        if self._lut is not None:
            off = -np.iinfo(self.dtype).min
            for k in range(n):
                idx = raw[k] if off == 0 else raw[k].astype(np.int32) + off
                np.take(self._lut[k], idx, out=conv[k])
            return conv
        for k in range(n):
            x = raw[k].astype(np.float32, copy=False)
            if s.kind == "clip":
                y = x + np.float32(0.5)
            else:
                scale = np.float32(255.0 / (s.hi[k] - s.lo[k]))
                y = (x - np.float32(s.lo[k])) * scale + np.float32(0.5)
            np.nan_to_num(y, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            np.clip(y, 0, 255, out=y)
            conv[k] = y
        return conv


def _percentiles(v: np.ndarray, p: Tuple[float, float]) -> Tuple[float, float]:
    """Low/high percentiles of a 1-D sample (histogram for 8/16-bit integers)."""
    if v.dtype.kind in "ui" and v.dtype.itemsize <= 2:
        off = -int(np.iinfo(v.dtype).min)
        counts = np.bincount((v.astype(np.int64) + off) if off else v, minlength=1)
        cdf = np.cumsum(counts)
        total = cdf[-1]
        lo = int(np.searchsorted(cdf, total * p[0] / 100.0, side="left")) - off
        hi = int(np.searchsorted(cdf, total * p[1] / 100.0, side="left")) - off
        if p[0] == 0.0:
            lo = int(np.flatnonzero(counts)[0]) - off
        return float(lo), float(hi)
    lo, hi = np.percentile(v, p)
    return float(lo), float(hi)


def open_raster(path: str | os.PathLike, options: Optional[ReadOptions] = None,
                quiet: bool = False) -> RasterReader:
    """Open a raster for reading (a :class:`RasterReader`; use it as a context manager).

    ``quiet``: RasterWarnings are not emitted, only kept in ``reader.warnings``
    (for engine calls that return them with their result)."""
    if not quiet:
        return RasterReader(path, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RasterWarning)
        return RasterReader(path, options)


def raster_files(path: str | os.PathLike) -> List[str]:
    """Every file GDAL reads for ``path`` (a VRT's sources, a world file, an
    .aux.xml, overviews), VRTs followed to the bottom (a VRT of VRTs), for the
    output guard: none of them may be an output. None for a remote raster."""
    if is_remote(path):
        return []
    files: List[str] = []
    todo = [os.path.abspath(os.fspath(path))]
    while todo:
        f = todo.pop()
        if f in files:
            continue  # a VRT that names itself, or a source shared by two VRTs
        files.append(f)
        if f != files[0] and not f.lower().endswith(".vrt"):
            continue  # only the raster itself and VRTs name further files
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with rasterio.open(f) as ds:
                    todo.extend(reversed([os.path.abspath(x) for x in ds.files or []]))
        except Exception:  # noqa: BLE001 - an unreadable raster is reported by its reader
            pass
    return files

class Scratch:
    """Per-thread reusable buffers (avoid page-faulting fresh memory per read)."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        need = int(np.prod(shape)) * dtype.itemsize
        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < need:
            buf = np.empty(need, np.uint8)
            self._bufs[name] = buf
        return buf[:need].view(dtype).reshape(shape)
