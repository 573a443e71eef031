"""Where the engine reads a layer from: its file, or a GeoTIFF QGIS renders first.

File-based rasters (GDAL provider on a path, a VRT file, a GDAL connection
string such as ``GPKG:file.gpkg:table``) are read by the engine from their
source. Everything else (XYZ/WMS/WMTS basemaps, the virtual raster provider,
in-memory rasters) is rendered by QGIS for the chosen area at the chosen GSD
into a temporary RGB GeoTIFF, georeferenced with the rendered extent and CRS,
and the engine searches that file.

Rendering: :func:`render_to_geotiff` renders synchronously (custom-painter job
into a QImage; safe on the main thread and in a QgsTask for local layers);
:class:`AsyncRender` runs a :class:`QgsMapRendererParallelJob` so network
basemaps render without blocking the GUI.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform,
                       QgsMapRendererCustomPainterJob, QgsMapRendererParallelJob,
                       QgsMapSettings, QgsPointXY, QgsProject, QgsProviderRegistry, QgsRasterLayer,
                       QgsRectangle, QgsUnitTypes)
from qgis.PyQt.QtCore import QObject, QSize, pyqtSignal
from qgis.PyQt.QtGui import QColor, QImage, QPainter

from ..engine.core.errors import MapClipError


class RenderError(MapClipError):
    """A layer QGIS rendered to nothing: the message names the source and the reason."""

#: largest side of a rendered image, in pixels; a larger request raises the GSD
MAX_RENDER_PX = 8192
#: providers of web maps (tiles, services): searching "the whole layer" makes no sense
SERVICE_PROVIDERS = ("wms", "wcs", "arcgismapserver")
#: GDAL prefixes that name something other than a local file but that the engine
#: (rasterio/GDAL) still opens directly
_GDAL_READABLE_PREFIXES = ("/vsizip/", "/vsigzip/", "/vsitar/", "/vsis3/", "/vsicurl/",
                           "/vsiaz/", "/vsigs/", "GPKG:", "NETCDF:", "HDF5:", "HDF4_SDS:")


def raster_source(layer: QgsRasterLayer) -> Optional[str]:
    """The path/GDAL name the engine can open for ``layer``, or None if QGIS must render it."""
    if layer is None or not layer.isValid() or layer.providerType() != "gdal":
        return None
    source = layer.source()
    parts = QgsProviderRegistry.instance().decodeUri("gdal", source)
    path = parts.get("path") or source
    if parts.get("layerName") and os.path.isfile(path):
        # a table in a container (GeoPackage raster): GDAL's own naming
        return f"GPKG:{path}:{parts['layerName']}" if path.lower().endswith(".gpkg") else source
    if os.path.isfile(path):
        return path
    if source.startswith(_GDAL_READABLE_PREFIXES):
        return source
    return None  # e.g. WMS/TMS XML strings, in-memory GDAL datasets


@dataclass
class RenderPlan:
    """What to render: the extent in ``crs`` and the output size."""

    extent: QgsRectangle
    crs: QgsCoordinateReferenceSystem
    width: int
    height: int
    gsd: float  # map units per pixel actually used
    ground_gsd: Optional[float] = None  # the same in metres on the ground, at the centre

    def transform(self) -> Tuple[float, float, float, float, float, float]:
        """GDAL geotransform of the rendered image."""
        return (self.extent.xMinimum(), self.extent.width() / self.width, 0.0,
                self.extent.yMaximum(), 0.0, -self.extent.height() / self.height)


def render_crs(layer: QgsRasterLayer, extent_crs: QgsCoordinateReferenceSystem) -> QgsCoordinateReferenceSystem:
    """A projected CRS to render in: the layer's, else the map's, else Web Mercator."""
    for crs in (layer.crs(), extent_crs):
        if crs is not None and crs.isValid() and not crs.isGeographic():
            return crs
    return QgsCoordinateReferenceSystem("EPSG:3857")


def plan_render(layer: QgsRasterLayer, extent: Optional[QgsRectangle],
                extent_crs: Optional[QgsCoordinateReferenceSystem], gsd: Optional[float],
                max_px: int = MAX_RENDER_PX) -> RenderPlan:
    """Work out the extent (in a projected CRS) and pixel size to render ``layer`` at."""
    extent_crs = extent_crs if extent_crs is not None and extent_crs.isValid() else layer.crs()
    if (extent is None or extent.isEmpty()) and layer.providerType() in SERVICE_PROVIDERS:
        raise ValueError(f"{layer.name()} is a web map without a whole-layer extent to search: "
                         f"choose the visible map extent or selected polygons as the area")
    if extent is None or extent.isEmpty():
        extent = layer.extent()
        extent_crs = layer.crs()
    crs = render_crs(layer, extent_crs)
    if extent_crs != crs:
        tr = QgsCoordinateTransform(extent_crs, crs, QgsProject.instance())
        extent = tr.transformBoundingBox(extent)
    if layer.crs().isValid():  # do not render beyond the layer itself
        lyr_ext = QgsCoordinateTransform(layer.crs(), crs, QgsProject.instance()) \
            .transformBoundingBox(layer.extent()) if layer.crs() != crs else layer.extent()
        clipped = extent.intersect(lyr_ext)
        if not clipped.isEmpty():
            extent = clipped
    if extent.isEmpty() or extent.width() <= 0 or extent.height() <= 0:
        raise ValueError("the search area does not overlap the layer")
    per_metre = units_per_metre(crs, extent)
    if gsd and gsd > 0:
        gsd = gsd * per_metre         # the GSD asked is metres on the ground
    else:
        gsd = _native_gsd(layer, crs) or max(extent.width(), extent.height()) / 2048.0
    longest = max(extent.width(), extent.height()) / gsd
    if longest > max_px:
        gsd = max(extent.width(), extent.height()) / max_px
    width = max(1, int(math.ceil(extent.width() / gsd - 1e-6)))
    height = max(1, int(math.ceil(extent.height() / gsd - 1e-6)))
    # snap the extent to whole pixels so the geotransform is exact
    extent = QgsRectangle(extent.xMinimum(), extent.yMaximum() - height * gsd,
                          extent.xMinimum() + width * gsd, extent.yMaximum())
    return RenderPlan(extent, crs, width, height, gsd, gsd / per_metre)


def units_per_metre(crs: QgsCoordinateReferenceSystem, extent: QgsRectangle) -> float:
    """CRS units per metre on the ground at the centre of ``extent``: Web Mercator's
    metres are 1/cos(latitude) ground metres (EPSG:3857 is not metres); other
    projected CRSs by their linear unit (feet, ...)."""
    factor = QgsUnitTypes.fromUnitToUnitFactor(QgsUnitTypes.DistanceMeters, crs.mapUnits())
    if "+proj=merc" in crs.toProj():
        wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
        centre = QgsCoordinateTransform(crs, wgs84, QgsProject.instance()).transform(
            QgsPointXY(extent.center()))
        factor /= max(1e-6, math.cos(math.radians(centre.y())))
    return factor


def _native_gsd(layer: QgsRasterLayer, crs: QgsCoordinateReferenceSystem) -> Optional[float]:
    """The layer's own pixel size in ``crs`` units, where it has one (not XYZ/WMS)."""
    if layer.providerType() in ("wms", "wcs") or layer.width() <= 0 or not layer.crs().isValid():
        return None
    ext = layer.extent()
    if layer.crs() != crs:
        ext = QgsCoordinateTransform(layer.crs(), crs, QgsProject.instance()).transformBoundingBox(ext)
    return ext.width() / max(1, layer.width())


def map_settings(layer: QgsRasterLayer, plan: RenderPlan) -> QgsMapSettings:
    ms = QgsMapSettings()
    ms.setLayers([layer])
    ms.setDestinationCrs(plan.crs)
    ms.setExtent(plan.extent)
    ms.setOutputSize(QSize(plan.width, plan.height))
    ms.setBackgroundColor(QColor(0, 0, 0, 0))
    ms.setOutputDpi(96)
    ms.setTransformContext(QgsProject.instance().transformContext())
    ms.setFlag(QgsMapSettings.Antialiasing, False)
    ms.setFlag(QgsMapSettings.DrawLabeling, False)
    return ms


def _blank_image(plan: RenderPlan) -> QImage:
    image = QImage(plan.width, plan.height, QImage.Format_ARGB32)
    image.fill(QColor(0, 0, 0, 0))
    return image


def _rgba(image: QImage):
    """(the RGBA8888 image, its pixels as a (H, W, 4) uint8 view of it)."""
    import numpy as np
    img = image.convertToFormat(QImage.Format_RGBA8888)
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes() if hasattr(img, "sizeInBytes") else img.byteCount())
    arr = np.frombuffer(ptr, dtype=np.uint8).reshape(img.height(), img.bytesPerLine())
    return img, arr[:, : img.width() * 4].reshape(img.height(), img.width(), 4)


def image_to_geotiff(image: QImage, plan: RenderPlan, path: str) -> str:
    """Write a rendered ARGB image as an RGB GeoTIFF; transparent pixels become nodata (0)."""
    from osgeo import gdal
    img, arr = _rgba(image)
    rgb, alpha = arr[..., :3].copy(), arr[..., 3]
    rgb[alpha == 0] = 0
    ds = gdal.GetDriverByName("GTiff").Create(path, img.width(), img.height(), 3, gdal.GDT_Byte,
                                              ["TILED=YES", "COMPRESS=DEFLATE", "PHOTOMETRIC=RGB"])
    ds.SetGeoTransform(plan.transform())
    ds.SetProjection(plan.crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL))
    for i in range(3):
        band = ds.GetRasterBand(i + 1)
        band.WriteArray(rgb[..., i])
        band.SetNoDataValue(0)
    ds.FlushCache()
    ds = None
    return path


def temp_tiff(prefix: str = "mapclip-render-") -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".tif")
    os.close(fd)
    return path


def layer_source_text(layer: QgsRasterLayer) -> str:
    """How an error names a layer: its name and where it comes from (a service's URL)."""
    source = layer.source()
    try:
        parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), source)
        source = parts.get("url") or parts.get("path") or source
    except Exception:  # noqa: BLE001 - a provider without URI decoding: the raw source
        pass
    return f"'{layer.name()}' ({source})"


class NetworkErrors:
    """The requests that failed while a layer rendered (an XYZ/WMS provider reports a
    dead server there, not as a render-job error): ``with NetworkErrors() as net: ...``;
    ``net.messages``: "reason (URL)", one per reason."""

    def __init__(self):
        self.failed: dict = {}

    def _finished(self, reply) -> None:
        if reply.error() != 0:
            self.failed.setdefault(reply.errorString(), reply.request().url().toString())

    def __enter__(self) -> "NetworkErrors":
        from qgis.core import QgsNetworkAccessManager
        QgsNetworkAccessManager.instance().finished.connect(self._finished)
        return self

    def __exit__(self, *exc) -> None:
        from qgis.core import QgsNetworkAccessManager
        from qgis.PyQt.QtCore import QCoreApplication
        QCoreApplication.processEvents()      # replies finished in render threads
        QgsNetworkAccessManager.instance().finished.disconnect(self._finished)

    @property
    def messages(self) -> list:
        return [f"{reason} ({url})" for reason, url in self.failed.items()]


def empty_render_error(layer: QgsRasterLayer, image: QImage, job_errors=(),
                       logged=()) -> Optional[RenderError]:
    """A RenderError when ``image`` holds no pixel at all (all transparent), with the
    reasons the render job and the provider gave; None when something was drawn
    (a basemap drawn from QGIS's tile cache while the server is down is fine)."""
    img, arr = _rgba(image)          # img owns the pixels arr views
    if arr[..., 3].any():
        return None
    reasons = [" ".join(str(e.message).split()) for e in job_errors if str(e.message).strip()]
    provider = layer.dataProvider()
    if provider is not None and not provider.error().isEmpty():
        reasons.append(" ".join(provider.error().summary().split()))
    reasons += [" ".join(m.split()) for m in logged][:3]
    reason = "; ".join(dict.fromkeys(reasons)) or "the layer drew nothing in this area"
    return RenderError(f"rendering {layer_source_text(layer)} gave no data: {reason}",
                       "check that the server answers (open the layer in QGIS and look at the "
                       "Log Messages panel) and that the area lies within the layer's coverage")


def render_to_geotiff(layer: QgsRasterLayer, plan: RenderPlan, path: Optional[str] = None) -> str:
    """Render ``layer`` for ``plan`` into a GeoTIFF, synchronously; returns the path.
    A render that drew nothing raises :class:`RenderError` (nothing is written)."""
    image = _blank_image(plan)
    painter = QPainter(image)
    try:
        with NetworkErrors() as net:
            job = QgsMapRendererCustomPainterJob(map_settings(layer, plan), painter)
            job.renderSynchronously()
    finally:
        painter.end()
    error = empty_render_error(layer, image, job.errors(), net.messages)
    if error is not None:
        raise error
    return image_to_geotiff(image, plan, path or temp_tiff())


class AsyncRender(QObject):
    """Render in QGIS's render threads; ``done(path)`` or ``failed(message)`` on the main thread."""

    done = pyqtSignal(str)
    failed = pyqtSignal(str)

    def __init__(self, layer: QgsRasterLayer, plan: RenderPlan, path: Optional[str] = None,
                 parent: Optional[QObject] = None):
        super().__init__(parent)
        self.plan = plan
        self.layer = layer
        self.path = path or temp_tiff()
        self.job = QgsMapRendererParallelJob(map_settings(layer, plan))
        self.job.finished.connect(self._finished)
        self._cancelled = False

    def start(self) -> None:
        self.net = NetworkErrors().__enter__()     # closed when the job finishes
        self.job.start()

    def cancel(self) -> None:
        self._cancelled = True
        self.job.cancelWithoutBlocking()

    def _finished(self) -> None:
        self.net.__exit__(None, None, None)
        if self._cancelled:
            self.failed.emit("cancelled")
            return
        image = self.job.renderedImage()
        error = empty_render_error(self.layer, image, self.job.errors(), self.net.messages)
        if error is not None:
            self.failed.emit(f"{error}\nFix: {error.hint}" if error.hint else str(error))
            return
        try:
            image_to_geotiff(image, self.plan, self.path)
        except Exception as exc:  # disk full, GDAL error
            self.failed.emit(f"could not write the rendered layer to {self.path}: {exc}")
            return
        self.done.emit(self.path)
