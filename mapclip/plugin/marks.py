"""Marked examples in QGIS: the "MapCLIP examples" layer and reading any point or polygon
layer as examples (engine.data.examples: a ``label`` field, 1 = "Yes, like this",
0 = "Not this").

The dock adds marks from its results list and from the map's right-click menu; a search
in window mode refines its ranking with them from the kept embeddings (engine.detect,
``examples=``); Processing's detect and heatmap algorithms take the same layer (EXAMPLES).
The layer is an ordinary editable layer: delete a mark, change its label, save it to a file.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from qgis.core import (QgsCategorizedSymbolRenderer, QgsCoordinateReferenceSystem,
                       QgsCoordinateTransform, QgsFeature, QgsField, QgsGeometry, QgsMarkerSymbol,
                       QgsPointXY, QgsProject, QgsRendererCategory, QgsVectorLayer)
from qgis.PyQt.QtCore import QVariant

from ..engine.core.errors import UsageError
from ..engine.data.examples import LABEL_FIELD, Example, label_field, label_of, parse_label

#: the name of the layer the dock keeps marks in, and its labels' words
LAYER_NAME = "MapCLIP examples"
WORDS = {True: "Yes, like this", False: "Not this"}
COLOURS = {True: "#1a9850", False: "#d73027"}
LAYER_PROPERTY = "mapclip/examples"
#: the layer property naming the raster the last mark was made on (the fine-tune dialog's default)
RASTER_PROPERTY = "mapclip/examples-raster"


def examples_layer(create: bool = True) -> Optional[QgsVectorLayer]:
    """The project's examples layer (made, styled and added on first use when ``create``)."""
    for layer in QgsProject.instance().mapLayers().values():
        if isinstance(layer, QgsVectorLayer) and layer.customProperty(LAYER_PROPERTY):
            return layer
    if not create:
        return None
    crs = QgsProject.instance().crs()
    uri = f"Point?crs={crs.authid()}" if crs.isValid() and crs.authid() else "Point"
    layer = QgsVectorLayer(uri, LAYER_NAME, "memory")
    layer.dataProvider().addAttributes([QgsField(LABEL_FIELD, QVariant.Int),
                                        QgsField("prompt", QVariant.String),
                                        QgsField("caption", QVariant.String)])
    layer.updateFields()
    layer.setCustomProperty(LAYER_PROPERTY, True)
    cats = []
    for value in (True, False):
        symbol = QgsMarkerSymbol.createSimple({"name": "circle" if value else "cross2",
                                               "color": COLOURS[value], "size": "4",
                                               "outline_color": "white" if value else COLOURS[value],
                                               "outline_width": "0.6"})
        cats.append(QgsRendererCategory(int(value), symbol, WORDS[value]))
    layer.setRenderer(QgsCategorizedSymbolRenderer(LABEL_FIELD, cats))
    QgsProject.instance().addMapLayer(layer)
    return layer


def add_mark(point: QgsPointXY, crs: QgsCoordinateReferenceSystem, positive: bool,
             prompt: str = "", raster: str = "") -> QgsVectorLayer:
    """A mark at ``point`` (in ``crs``) in the examples layer, made on ``raster`` (a file);
    the layer."""
    layer = examples_layer()
    if raster:
        layer.setCustomProperty(RASTER_PROPERTY, raster)
    if crs.isValid() and layer.crs().isValid() and crs != layer.crs():
        point = QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transform(point)
    f = QgsFeature(layer.fields())
    f.setGeometry(QgsGeometry.fromPointXY(point))
    f.setAttribute(LABEL_FIELD, int(bool(positive)))
    f.setAttribute("prompt", prompt)
    layer.dataProvider().addFeatures([f])
    layer.updateExtents()
    layer.triggerRepaint()
    return layer


def read_layer(layer: QgsVectorLayer) -> Tuple[List[Example], Optional[str]]:
    """The examples of a point or polygon layer (centroids) and its CRS as WKT.

    Raises ValueError naming the problem and the fix (no ``label`` field, a label that is
    neither 1/true nor 0/false)."""
    source = f"layer '{layer.name()}'"
    out: List[Example] = []
    try:
        field = label_field([f.name() for f in layer.fields()], source)
        for f in layer.getFeatures():
            geom = f.geometry()
            if geom is None or geom.isEmpty():
                continue
            c = geom.centroid().asPoint()
            out.append(Example(float(c.x()), float(c.y()), label_of(f[field], source, f.id())))
    except UsageError as exc:
        raise ValueError(f"{exc.message}\nFix: {exc.hint}") from None
    crs = layer.crs()
    return out, (crs.toWkt() if crs.isValid() else None)


def refined_text(examples) -> str:
    """What marks did to a search, in the dock's words: "refined by N yes / M not"."""
    yes = sum(1 for e in examples if e.positive)
    return f"refined by {yes} yes / {len(examples) - yes} not"


def counts(layer: Optional[QgsVectorLayer]) -> Tuple[int, int]:
    """(positives, negatives) in ``layer`` (labels that parse); (0, 0) without one."""
    if layer is None:
        return 0, 0
    try:
        field = label_field([f.name() for f in layer.fields()], layer.name())
    except UsageError:
        return 0, 0
    labels = [parse_label(f[field]) for f in layer.getFeatures()]
    return sum(1 for v in labels if v is True), sum(1 for v in labels if v is False)


def marked_raster(layer: QgsVectorLayer) -> str:
    """The raster file the layer's last mark was made on ('' when unknown)."""
    return str(layer.customProperty(RASTER_PROPERTY) or "")


def save_layer(layer: QgsVectorLayer, path: str) -> str:
    """The layer written to a GeoPackage at ``path`` (for the engine, which reads files)."""
    from qgis.core import QgsCoordinateTransformContext, QgsVectorFileWriter
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    opts.layerName = "marks"
    err = QgsVectorFileWriter.writeAsVectorFormatV3(layer, path, QgsCoordinateTransformContext(), opts)
    if err[0] != QgsVectorFileWriter.NoError:
        raise OSError(f"cannot write the marks to {path}: {err[1]}")
    return path
