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
                       QgsMapSettings, QgsProject, QgsProviderRegistry, QgsRasterLayer,
                       QgsRectangle)
from qgis.PyQt.QtCore import QObject, QSize, pyqtSignal
from qgis.PyQt.QtGui import QColor, QImage, QPainter

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
    if not gsd or gsd <= 0:
        gsd = _native_gsd(layer, crs) or max(extent.width(), extent.height()) / 2048.0
    longest = max(extent.width(), extent.height()) / gsd
    if longest > max_px:
        gsd = max(extent.width(), extent.height()) / max_px
    width = max(1, int(math.ceil(extent.width() / gsd - 1e-6)))
    height = max(1, int(math.ceil(extent.height() / gsd - 1e-6)))
    # snap the extent to whole pixels so the geotransform is exact
    extent = QgsRectangle(extent.xMinimum(), extent.yMaximum() - height * gsd,
                          extent.xMinimum() + width * gsd, extent.yMaximum())
    return RenderPlan(extent, crs, width, height, gsd)


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


def image_to_geotiff(image: QImage, plan: RenderPlan, path: str) -> str:
    """Write a rendered ARGB image as an RGB GeoTIFF; transparent pixels become nodata (0)."""
    import numpy as np
    from osgeo import gdal
    img = image.convertToFormat(QImage.Format_RGBA8888)
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes() if hasattr(img, "sizeInBytes") else img.byteCount())
    arr = np.frombuffer(ptr, dtype=np.uint8).reshape(img.height(), img.bytesPerLine())
    arr = arr[:, : img.width() * 4].reshape(img.height(), img.width(), 4)
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


def render_to_geotiff(layer: QgsRasterLayer, plan: RenderPlan, path: Optional[str] = None) -> str:
    """Render ``layer`` for ``plan`` into a GeoTIFF, synchronously; returns the path."""
    path = path or temp_tiff()
    image = _blank_image(plan)
    painter = QPainter(image)
    try:
        job = QgsMapRendererCustomPainterJob(map_settings(layer, plan), painter)
        job.renderSynchronously()
    finally:
        painter.end()
    return image_to_geotiff(image, plan, path)


class AsyncRender(QObject):
    """Render in QGIS's render threads; ``done(path)`` or ``failed(message)`` on the main thread."""

    done = pyqtSignal(str)
    failed = pyqtSignal(str)

    def __init__(self, layer: QgsRasterLayer, plan: RenderPlan, path: Optional[str] = None,
                 parent: Optional[QObject] = None):
        super().__init__(parent)
        self.plan = plan
        self.path = path or temp_tiff()
        self.job = QgsMapRendererParallelJob(map_settings(layer, plan))
        self.job.finished.connect(self._finished)
        self._cancelled = False

    def start(self) -> None:
        self.job.start()

    def cancel(self) -> None:
        self._cancelled = True
        self.job.cancelWithoutBlocking()

    def _finished(self) -> None:
        if self._cancelled:
            self.failed.emit("cancelled")
            return
        try:
            image_to_geotiff(self.job.renderedImage(), self.plan, self.path)
        except Exception as exc:  # disk full, GDAL error
            self.failed.emit(f"could not write the rendered layer to {self.path}: {exc}")
            return
        self.done.emit(self.path)
