"""A map tool for "more like this": click a place, get the point and the map CRS."""
from __future__ import annotations

from qgis.core import QgsCoordinateReferenceSystem, QgsPointXY
from qgis.gui import QgsMapCanvas, QgsMapToolEmitPoint
from qgis.PyQt.QtCore import Qt, pyqtSignal


class PickPlaceTool(QgsMapToolEmitPoint):
    """Emits :attr:`picked` (point in map CRS, map CRS) on a left click."""

    picked = pyqtSignal(QgsPointXY, QgsCoordinateReferenceSystem)

    def __init__(self, canvas: QgsMapCanvas):
        super().__init__(canvas)
        self.canvas_ = canvas
        self.setCursor(Qt.CrossCursor)
        self.canvasClicked.connect(self._clicked)

    def _clicked(self, point: QgsPointXY, button) -> None:
        if button == Qt.LeftButton:
            self.picked.emit(QgsPointXY(point), self.canvas_.mapSettings().destinationCrs())
