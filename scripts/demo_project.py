"""The demo's QGIS project (demo-output/demo.qgz), written with QGIS's own Python API.

    write_project(out, scene, class_map, boxes, heatmap, prompts, colours)

Layers, top to bottom: the detected boxes (outlines coloured by prompt,
labelled with prompt and score), one heatmap layer per prompt (a
pseudo-colour ramp over 0..1, half transparent; only the first is shown),
the class map (the scene's ground truth, each mask value a named, coloured
class; hidden) and the scene (RGB). Paths are stored relative to the
project, so the folder can be moved. ``qgis demo-output/demo.qgz`` opens it.

Needs the qgis Python bindings (Debian's python3-qgis; the project's venv
sees them). It starts an offscreen QgsApplication when none is running.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

Colour = Tuple[int, int, int]


def _app():
    """The running QgsApplication, or a new offscreen one (without a GUI)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="runtime-mapclip-"))
    from qgis.core import QgsApplication
    app = QgsApplication.instance()
    if app is None:
        app = QgsApplication([], False)
        app.initQgis()
        _app.keep = app  # type: ignore[attr-defined]  # alive for the process
    return app


def _class_renderer(layer, names: Dict[int, str], colours: Dict[int, Tuple[int, int, int, int]]):
    from qgis.core import QgsPalettedRasterRenderer
    from qgis.PyQt.QtGui import QColor
    classes = [QgsPalettedRasterRenderer.Class(v, QColor(*colours.get(v, (128, 128, 128, 255))), name)
               for v, name in sorted(names.items())]
    return QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)


def _heat_renderer(layer, band: int):
    from qgis.core import (QgsColorRampShader, QgsRasterShader, QgsSingleBandPseudoColorRenderer,
                           QgsStyle)
    ramp = QgsStyle.defaultStyle().colorRamp("Magma")
    shader = QgsColorRampShader(0.0, 1.0, ramp)
    shader.classifyColorRamp(9, band, layer.extent(), layer.dataProvider())
    raster_shader = QgsRasterShader()
    raster_shader.setRasterShaderFunction(shader)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), band, raster_shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    renderer.setOpacity(0.55)
    return renderer


def _box_renderer(prompts: Sequence[str], colours: Dict[str, Colour]):
    from qgis.core import QgsCategorizedSymbolRenderer, QgsFillSymbol, QgsRendererCategory
    cats = []
    for p in prompts:
        r, g, b = colours.get(p, (255, 0, 0))
        sym = QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": f"{r},{g},{b},255",
                                          "outline_width": "0.6", "outline_style": "solid"})
        cats.append(QgsRendererCategory(p, sym, p))
    return QgsCategorizedSymbolRenderer("prompt", cats)


def _box_labels(layer) -> None:
    from qgis.core import QgsPalLayerSettings, QgsTextFormat, QgsVectorLayerSimpleLabeling
    from qgis.PyQt.QtGui import QColor
    s = QgsPalLayerSettings()
    s.fieldName = "concat(\"prompt\", ' ', format_number(\"score\", 2))"
    s.isExpression = True
    fmt = QgsTextFormat()
    fmt.setColor(QColor(255, 255, 255))
    fmt.setSize(8)
    s.setFormat(fmt)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(s))
    layer.setLabelsEnabled(True)


def write_project(out, scene, class_map, boxes, heatmap, prompts: Sequence[str],
                  colours: Optional[Dict[str, Colour]] = None,
                  class_names: Optional[Dict[int, str]] = None,
                  class_colours: Optional[Dict[int, Tuple[int, int, int, int]]] = None,
                  land_cover: Optional[str] = None) -> Path:
    """Write the QGIS project ``out`` (.qgz) over the demo's files; return its path.

    ``land_cover``: the model's class map (engine.classify's GeoTIFF, styled by the
    .qml the engine wrote beside it), shown under the boxes.

    Raises RuntimeError naming the layer that QGIS could not open."""
    _app()
    try:  # QGIS's GDAL may be older than the one that wrote the GeoPackage: it warns, and reads it
        from osgeo import gdal
        gdal.PushErrorHandler("CPLQuietErrorHandler")
    except ImportError:  # pragma: no cover - python3-gdal comes with python3-qgis
        gdal = None
    try:
        return _write(out, scene, class_map, boxes, heatmap, prompts, colours, class_names,
                      class_colours, land_cover)
    finally:
        if gdal is not None:
            gdal.PopErrorHandler()


def _write(out, scene, class_map, boxes, heatmap, prompts, colours, class_names, class_colours,
           land_cover=None) -> Path:
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsVectorLayer
    out = Path(out).resolve()
    if class_names is None or class_colours is None:
        from mapclip.engine.data.synthetic.truth import MASK_CLASSES
        from mapclip.engine.data.synthetic.coco import _mask_colormap
        class_names = class_names or dict(MASK_CLASSES)
        class_colours = class_colours or _mask_colormap()
    colours = colours or {}
    project = QgsProject()
    project.setFileName(str(out))
    project.writeEntryBool("Paths", "/Absolute", False)

    def check(layer, what: str):
        if not layer.isValid():
            raise RuntimeError(f"QGIS could not open the {what} ({layer.source()})")
        return layer

    rgb = check(QgsRasterLayer(str(Path(scene).resolve()), "scene"), "scene")
    project.setCrs(rgb.crs() if rgb.crs().isValid() else QgsCoordinateReferenceSystem("EPSG:3857"))
    classes = check(QgsRasterLayer(str(Path(class_map).resolve()), "class map (ground truth)"), "class map")
    classes.setRenderer(_class_renderer(classes, class_names, class_colours))
    heats = []
    for band, prompt in enumerate(prompts, start=1):
        h = check(QgsRasterLayer(str(Path(heatmap).resolve()), f"heatmap: {prompt}"), "heatmap")
        h.setRenderer(_heat_renderer(h, band))
        heats.append(h)
    vec = check(QgsVectorLayer(f"{Path(boxes).resolve()}|layername=detections", "detections", "ogr"),
                "boxes")
    vec.setRenderer(_box_renderer(prompts, colours))
    _box_labels(vec)
    model_classes = []
    if land_cover:
        lc = check(QgsRasterLayer(str(Path(land_cover).resolve()), "land cover (the model's)"),
                   "land-cover map")
        lc.loadDefaultStyle()          # the .qml engine.classify wrote beside it
        model_classes = [lc]
    root = project.layerTreeRoot()
    for layer in [vec] + heats + model_classes + [classes, rgb]:  # first added: top of the tree
        project.addMapLayer(layer, False)
        root.addLayer(layer)
    for layer in heats[1:] + model_classes + [classes]:
        root.findLayer(layer.id()).setItemVisibilityChecked(False)
    view = project.viewSettings()
    from qgis.core import QgsReferencedRectangle
    view.setDefaultViewExtent(QgsReferencedRectangle(rgb.extent(), rgb.crs()))
    if not project.write(str(out)):
        raise RuntimeError(f"QGIS could not write {out}: {project.error()}")
    return out
