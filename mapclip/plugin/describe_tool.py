"""The "Describe a place" map tool: click the map, get the tile around the point.

:class:`DescribePlaceTool` emits :attr:`DescribePlaceTool.place` with the
tile of the current raster layer centred on the clicked point (in the
layer's CRS), as :func:`tile_around` computes it; the dock captions that tile
(engine.caption.caption, through mapclip/plugin/tasks.py) and shows the caption.
"""
from __future__ import annotations

from typing import Callable, Optional

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsPointXY,
                       QgsProject, QgsRasterLayer, QgsRectangle)
from qgis.gui import QgsMapCanvas, QgsMapToolEmitPoint
from qgis.PyQt.QtCore import Qt, pyqtSignal


def tile_around(layer: QgsRasterLayer, point: QgsPointXY, point_crs: QgsCoordinateReferenceSystem,
                tile_px: int) -> QgsRectangle:
    """The square of ``tile_px`` layer pixels centred on ``point`` (given in ``point_crs``),
    in the layer's CRS, moved inside the layer where the layer is larger than it.
    ValueError when the point is not on the layer."""
    pt = QgsPointXY(point)
    if point_crs.isValid() and layer.crs().isValid() and point_crs != layer.crs():
        pt = QgsCoordinateTransform(point_crs, layer.crs(), QgsProject.instance()).transform(pt)
    ext = layer.extent()
    if not ext.contains(pt):
        raise ValueError(f"the point ({point.x():.6g}, {point.y():.6g}) is not on the layer "
                         f"{layer.name()}: click on the raster")
    half_w = tile_px * layer.rasterUnitsPerPixelX() / 2.0
    half_h = tile_px * layer.rasterUnitsPerPixelY() / 2.0
    cx = min(max(pt.x(), ext.xMinimum() + half_w), ext.xMaximum() - half_w) \
        if ext.width() > 2 * half_w else ext.center().x()
    cy = min(max(pt.y(), ext.yMinimum() + half_h), ext.yMaximum() - half_h) \
        if ext.height() > 2 * half_h else ext.center().y()
    rect = QgsRectangle(cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    return rect.intersect(ext)


class DescribePlaceTool(QgsMapToolEmitPoint):
    """On a left click, emits :attr:`place` (tile rectangle, its CRS, the layer) for the raster
    layer ``layer_of()`` and the tile size ``tile_px_of()``; :attr:`failed` (a message) when
    there is no raster layer or the click is off it."""

    place = pyqtSignal(QgsRectangle, QgsCoordinateReferenceSystem, QgsRasterLayer)
    failed = pyqtSignal(str)

    def __init__(self, canvas: QgsMapCanvas, layer_of: Callable[[], Optional[QgsRasterLayer]],
                 tile_px_of: Callable[[], int]):
        super().__init__(canvas)
        self.canvas_ = canvas
        self.layer_of = layer_of
        self.tile_px_of = tile_px_of
        self.setCursor(Qt.WhatsThisCursor)
        self.canvasClicked.connect(self._clicked)

    def _clicked(self, point: QgsPointXY, button) -> None:
        if button != Qt.LeftButton:
            return
        self.describe_at(QgsPointXY(point), self.canvas_.mapSettings().destinationCrs())

    def describe_at(self, point: QgsPointXY, crs: QgsCoordinateReferenceSystem) -> bool:
        """What a click does: emit the tile around ``point`` (in ``crs``); False if none."""
        layer = self.layer_of()
        if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            self.failed.emit("choose a raster layer (Layer) to describe a place of")
            return False
        try:
            rect = tile_around(layer, point, crs, int(self.tile_px_of()))
        except ValueError as exc:
            self.failed.emit(str(exc))
            return False
        self.place.emit(rect, layer.crs(), layer)
        return True


def write_caption(layer, fid: int, text: str, score: Optional[float] = None) -> bool:
    """Write a caption into feature ``fid`` of a result layer: the fields of
    engine.core.outputs.CAPTION_FIELDS (caption, caption_score), added when absent.
    ``score`` is the retrieval cosine (None: generated, left empty)."""
    import math

    from ..engine.core.outputs import CAPTION_FIELDS
    from .layers import fields_of
    if layer is None or not layer.isValid():
        return False
    provider = layer.dataProvider()
    missing = [f for f in fields_of(CAPTION_FIELDS) if layer.fields().indexOf(f.name()) < 0]
    if missing:
        if not provider.addAttributes(missing):
            return False
        layer.updateFields()
    (name, _), (score_name, _) = CAPTION_FIELDS
    values = {layer.fields().indexOf(name): text}
    if score is not None and not math.isnan(score):
        values[layer.fields().indexOf(score_name)] = float(score)
    ok = provider.changeAttributeValues({int(fid): values})
    layer.triggerRepaint()
    return bool(ok)
