"""Engine results -> QGIS layers.

- Boxes: one polygon layer per prompt, named after the prompt, in the raster's
  CRS, fields prompt, score, cosine, rank, model, run_time; styled from
  ``mapclip/resources/styles/boxes.qml`` (graduated by score, score labels) with the
  classes recomputed for the run's scores, in the prompt's own colour, labelled
  "prompt #rank score". Written to a GeoPackage (the results' one beside the
  project, or the one the user names: :func:`results_place`), a new table per
  prompt and run.
- Heatmap: a single-band GeoTIFF per prompt with a pseudocolour ramp whose low
  end is transparent, so only high-scoring places tint the map.
- Archive hits: footprint polygons with the engine's hit fields (rank, score, raster, ...).
- Each run gets its own layer group at the top of the layer tree.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from qgis.core import (QgsColorRampShader, QgsCoordinateReferenceSystem, QgsFeature,
                       QgsField, QgsFields, QgsGeometry, QgsGraduatedSymbolRenderer,
                       QgsLayerTreeGroup, QgsMapLayer, QgsProject,
                       QgsRasterLayer, QgsRasterShader, QgsRectangle,
                       QgsSingleBandPseudoColorRenderer, QgsVectorFileWriter,
                       QgsVectorLayer)
from qgis.PyQt.QtCore import QDateTime, Qt, QVariant
from qgis.PyQt.QtGui import QColor

from ..engine.core import outputs
from . import log

STYLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "resources", "styles")
BOXES_STYLE = os.path.join(STYLES_DIR, "boxes.qml")
HITS_STYLE = os.path.join(STYLES_DIR, "hits.qml")
#: QGIS field types of the engine's field kinds (mapclip/engine/core/outputs.py)
QT_KINDS = {"str": QVariant.String, "float": QVariant.Double, "int": QVariant.Int,
            "datetime": QVariant.DateTime}
#: the fields of the engine's box files (CLI GeoPackage, Processing outputs)
ENGINE_BOX_FIELDS = outputs.BOX_FIELDS
#: the dock's box layers add when the run was made
BOX_FIELDS = ENGINE_BOX_FIELDS + (("run_time", "datetime"),)
#: heatmap ramp: (position 0..1 between the low cut and the maximum, colour, alpha)
HEAT_RAMP = ((0.0, "#2c7bb6", 0), (0.35, "#abd9e9", 110), (0.6, "#ffffbf", 160),
             (0.8, "#fdae61", 200), (1.0, "#d7191c", 230))
HEAT_LOW_QUANTILE = 0.5  # scores below the median are fully transparent
#: box outlines from the lowest to the highest score class; fills stay faint
BOX_RAMP = ("#ffd000", "#d7191c")
HIT_RAMP = ("#6baed6", "#08306b")
FILL_ALPHA = 40
#: each prompt of a run has its own colour, by its place in the run (a qualitative palette,
#: ColorBrewer Set1 without its yellow, which the map's light areas swallow)
PROMPT_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628",
                  "#f781bf", "#17becf")
#: the layer property holding the prompt's place in its run (its colour, kept when refilled)
PROMPT_INDEX = "mapclip/prompt_index"
#: box labels name their prompt, shortened: "ships #1 0.95"
LABEL_PROMPT_CHARS = 20
BOX_LABEL = (f"concat(if(length(\"prompt\") > {LABEL_PROMPT_CHARS}, "
             f"trim(left(\"prompt\", {LABEL_PROMPT_CHARS - 1})) || '…', \"prompt\"), "
             "' #', \"rank\", ' ', format_number(\"score\", 2))")


def prompt_ramp(index: int) -> Tuple[str, str]:
    """The outline ramp (lowest score class, highest) of the prompt at ``index`` in its run:
    a pale and a full shade of the prompt's own colour."""
    colour = QColor(PROMPT_COLOURS[int(index) % len(PROMPT_COLOURS)])
    return colour.lighter(160).name(), colour.name()


def engine_crs(crs: Any) -> QgsCoordinateReferenceSystem:
    """A CRS as the engine reports it (WKT or AUTH:CODE; None = not georeferenced)."""
    if isinstance(crs, QgsCoordinateReferenceSystem):
        return crs
    out = QgsCoordinateReferenceSystem()
    if crs:
        text = str(crs)
        if re.match(r"^[A-Za-z]+:\d+$", text):
            out = QgsCoordinateReferenceSystem(text)
        else:
            out = QgsCoordinateReferenceSystem.fromWkt(text)
            if not out.isValid():
                out = QgsCoordinateReferenceSystem(text)
    return out


def crs_text(crs: QgsCoordinateReferenceSystem) -> Optional[str]:
    """A QGIS CRS as the engine takes it: an authid where there is one, else WKT (None: none)."""
    if crs is None or not crs.isValid():
        return None
    return crs.authid() or crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL)


def result_crs(result_crs_text: Optional[str], fallback: Any = None) -> QgsCoordinateReferenceSystem:
    """The CRS a result is in: the fallback (the raster layer's own CRS) when valid, else the WKT."""
    fb = engine_crs(fallback) if fallback is not None else QgsCoordinateReferenceSystem()
    if fb.isValid():
        return fb
    return engine_crs(result_crs_text)


def fields_of(spec) -> QgsFields:
    """QgsFields from the engine's (name, kind) pairs (mapclip/engine/core/outputs.py)."""
    fields = QgsFields()
    for name, kind in spec:
        fields.append(QgsField(name, QT_KINDS.get(kind, kind)))
    return fields


def feature(fields: QgsFields, spec, row, bounds) -> QgsFeature:
    """A polygon feature of an engine output row (engine.core.outputs.*_rows)."""
    feat = QgsFeature(fields)
    feat.setGeometry(rect_geometry(bounds))
    feat.setAttributes(outputs.values(spec, row))
    return feat


def rect_geometry(bounds: Sequence[float]) -> QgsGeometry:
    xmin, ymin, xmax, ymax = (float(v) for v in bounds)
    return QgsGeometry.fromRect(QgsRectangle(xmin, ymin, xmax, ymax))


def layer_name(prompt: str, suffix: str = "") -> str:
    name = " ".join(prompt.split())[:60] or "MapCLIP"
    return f"{name} {suffix}".strip()


def boxes_layer(boxes: Iterable[Any], prompt: str, model: str, crs: QgsCoordinateReferenceSystem,
                run_time: Optional[_dt.datetime] = None, index: int = 0) -> QgsVectorLayer:
    """A memory polygon layer of the boxes of one prompt, styled by score in the colour of
    the prompt's place ``index`` in its run."""
    layer = QgsVectorLayer("Polygon", layer_name(prompt), "memory")
    layer.setCrs(crs)
    layer.setCustomProperty(PROMPT_INDEX, int(index))
    layer.dataProvider().addAttributes(list(fields_of(BOX_FIELDS)))
    layer.updateFields()
    set_boxes(layer, boxes, model, run_time)
    return layer


def set_boxes(layer: QgsVectorLayer, boxes: Iterable[Any], model: str,
              run_time: Optional[_dt.datetime] = None) -> None:
    """Replace the features of a boxes layer (the preview during a search is updated in place)."""
    run_time = run_time or _dt.datetime.now(_dt.timezone.utc)
    provider = layer.dataProvider()
    provider.truncate()
    stamp = QDateTime(run_time.astimezone(_dt.timezone.utc).replace(tzinfo=None))
    stamp.setTimeSpec(Qt.UTC)
    rows, bounds = outputs.box_rows(boxes, model)
    spec = ENGINE_BOX_FIELDS + (("run_time", "datetime"),)
    provider.addFeatures([feature(layer.fields(), spec, dict(row, run_time=stamp), b)
                          for row, b in zip(rows, bounds)])
    layer.updateExtents()
    style_boxes(layer)


def _update_classes(renderer: QgsGraduatedSymbolRenderer, layer: QgsVectorLayer, n: int,
                    ramp: Sequence[str] = BOX_RAMP) -> None:
    """Equal-interval classes over this layer's scores: strong outlines, faint fills."""
    from qgis.core import QgsClassificationEqualInterval, QgsGradientColorRamp
    renderer.setClassificationMethod(QgsClassificationEqualInterval())
    renderer.updateClasses(layer, n)
    renderer.updateColorRamp(QgsGradientColorRamp(QColor(ramp[0]), QColor(ramp[1])))
    for i, rng in enumerate(renderer.ranges()):
        symbol = rng.symbol().clone()
        colour = QColor(symbol.color())
        fill = QColor(colour)
        fill.setAlpha(FILL_ALPHA)
        sl = symbol.symbolLayer(0)
        if hasattr(sl, "setFillColor"):
            sl.setFillColor(fill)
            sl.setStrokeColor(colour)
        renderer.updateRangeSymbol(i, symbol)


def style_boxes(layer: QgsVectorLayer) -> None:
    """Apply boxes.qml, then spread its graduated classes over this layer's scores in its
    prompt's colour, and label each box with its prompt, rank and score."""
    from qgis.core import QgsVectorLayerSimpleLabeling
    index = int(layer.customProperty(PROMPT_INDEX, 0) or 0)    # the style file resets it
    if os.path.isfile(BOXES_STYLE):
        _, ok = layer.loadNamedStyle(BOXES_STYLE)
        if not ok:
            log.warning(f"could not load style {BOXES_STYLE}")
    renderer = layer.renderer()
    if isinstance(renderer, QgsGraduatedSymbolRenderer) and layer.featureCount():
        classes = max(1, min(5, len(renderer.ranges()) or 5, layer.featureCount()))
        _update_classes(renderer, layer, classes, prompt_ramp(index))
    layer.setCustomProperty(PROMPT_INDEX, index)
    labeling = layer.labeling()
    if isinstance(labeling, QgsVectorLayerSimpleLabeling) and layer.fields().indexOf("prompt") >= 0:
        settings = labeling.settings()
        settings.fieldName, settings.isExpression = BOX_LABEL, True
        layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.triggerRepaint()


def set_abstract(layer: QgsMapLayer, text: str) -> None:
    """Write ``text`` into the layer's metadata abstract (Layer Properties > Metadata)."""
    md = layer.metadata()
    md.setAbstract(text)
    layer.setMetadata(md)


def run_group(title: str, project: Optional[QgsProject] = None) -> QgsLayerTreeGroup:
    """A new layer group at the top of the tree for one run."""
    project = project or QgsProject.instance()
    return project.layerTreeRoot().insertGroup(0, title)


def add_to_group(layer: QgsMapLayer, group: Optional[QgsLayerTreeGroup],
                 project: Optional[QgsProject] = None) -> QgsMapLayer:
    project = project or QgsProject.instance()
    project.addMapLayer(layer, group is None)
    if group is not None:
        group.addLayer(layer)
    return layer


#: where results go while the project is unsaved: a folder of the QGIS profile
RESULTS_FOLDER = "mapclip-results"


def results_place(project: Optional[QgsProject] = None) -> Tuple[str, str]:
    """Where a run's results are kept: (the GeoPackage of its boxes, the folder of its rasters).

    Beside the saved project (``site.qgz`` -> ``site.mapclip.gpkg`` and ``site_mapclip/``);
    for an unsaved project, or one in a folder that cannot be written, the profile's
    ``mapclip-results/`` folder (``results.gpkg`` in it)."""
    from qgis.core import QgsApplication
    project = project or QgsProject.instance()
    path = project.fileName()
    if path and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        base = os.path.splitext(os.path.abspath(path))[0]
        return base + ".mapclip.gpkg", base + "_mapclip"
    folder = os.path.join(QgsApplication.qgisSettingsDirPath(), RESULTS_FOLDER)
    return os.path.join(folder, "results.gpkg"), folder


def _slug(text: str, default: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")[:40] or default


def _stamp(run_time: Optional[_dt.datetime]) -> str:
    return (run_time or _dt.datetime.now(_dt.timezone.utc)).astimezone().strftime("%Y%m%d_%H%M%S")


def unique_path(folder: str, stem: str, ext: str) -> str:
    """A new file ``folder/stem.ext`` (``stem_2.ext``, ... when taken); the folder is made."""
    os.makedirs(folder, exist_ok=True)
    path, n = os.path.join(folder, stem + ext), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{stem}_{n}{ext}")
    return path


def gpkg_tables(path: str) -> List[str]:
    """The tables of the GeoPackage ``path`` (none when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    from osgeo import ogr
    ds = ogr.Open(path)
    if ds is None:
        return []
    return [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())]


def save_gpkg(layer: QgsVectorLayer, path: str, table: Optional[str] = None) -> QgsVectorLayer:
    """Write ``layer`` into the GeoPackage ``path`` as a new table (``table``, or the layer's
    name; ``_2``, ... added when taken: an earlier run's table is never overwritten); return
    the saved layer."""
    base = (table or _slug(layer.name(), "boxes")).lower()
    taken = {t.lower() for t in gpkg_tables(path)}
    table, n = base, 1
    while table in taken:
        n += 1
        table = f"{base}_{n}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    opts.layerName = table
    opts.actionOnExistingFile = (QgsVectorFileWriter.CreateOrOverwriteLayer if os.path.exists(path)
                                 else QgsVectorFileWriter.CreateOrOverwriteFile)
    ctx = QgsProject.instance().transformContext()
    res = QgsVectorFileWriter.writeAsVectorFormatV3(layer, path, ctx, opts) \
        if hasattr(QgsVectorFileWriter, "writeAsVectorFormatV3") \
        else QgsVectorFileWriter.writeAsVectorFormatV2(layer, path, ctx, opts)
    if res[0] != QgsVectorFileWriter.NoError:
        raise OSError(f"could not write {path}: {res[1]}")
    saved = QgsVectorLayer(f"{path}|layername={table}", layer.name(), "ogr")
    saved.setRenderer(layer.renderer().clone())
    saved.setLabeling(layer.labeling().clone() if layer.labeling() else None)
    saved.setLabelsEnabled(layer.labelsEnabled())
    saved.setMetadata(layer.metadata())
    saved.setCustomProperty(PROMPT_INDEX, layer.customProperty(PROMPT_INDEX, 0))
    return saved


# --------------------------------------------------------------------------- #
# Heatmaps
# --------------------------------------------------------------------------- #
def style_heatmap(layer: QgsRasterLayer, low: float, high: float, band: int = 1) -> None:
    """Singleband pseudocolour of ``band``, transparent below ``low`` and warm toward ``high``."""
    if not high > low:
        high = low + 1e-6
    shader_fn = QgsColorRampShader(low, high)
    shader_fn.setColorRampType(QgsColorRampShader.Interpolated)
    items = []
    for pos, colour, alpha in HEAT_RAMP:
        c = QColor(colour)
        c.setAlpha(alpha)
        value = low + pos * (high - low)
        items.append(QgsColorRampShader.ColorRampItem(value, c, f"{value:.3f}"))
    shader_fn.setColorRampItemList(items)
    shader_fn.setClip(False)
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(shader_fn)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), band, shader)
    renderer.setClassificationMin(low)
    renderer.setClassificationMax(high)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


def heatmap_layers(result: Any, prompts: Sequence[str],
                   crs: Optional[QgsCoordinateReferenceSystem] = None,
                   folder: Optional[str] = None) -> List[QgsRasterLayer]:
    """One styled raster layer per prompt, all reading band i of the one heatmap GeoTIFF
    the engine writes (engine.core.outputs.write_heatmap_tif: atomic, band names = prompts)."""
    import numpy as np
    path = unique_path(folder or results_place()[1], f"heatmap_{_slug('_'.join(prompts), 'run')}_"
                       f"{_stamp(None)}", ".tif")
    heat = np.asarray(result.heatmap, dtype="float32")
    outputs.write_heatmap_tif(heat, result.heatmap_transform, result.crs, list(prompts), path)
    made = []
    for i, prompt in enumerate(list(prompts)[: heat.shape[0]]):
        layer = QgsRasterLayer(path, layer_name(prompt, "(heatmap)"), "gdal")
        if crs is not None and crs.isValid() and not layer.crs().isValid():
            layer.setCrs(crs)
        finite = heat[i][np.isfinite(heat[i])].astype("float64")
        low, high = ((float(np.quantile(finite, HEAT_LOW_QUANTILE)), float(finite.max()))
                     if finite.size else (0.0, 1.0))
        style_heatmap(layer, low, high, band=i + 1)
        made.append(layer)
    return made


# --------------------------------------------------------------------------- #
# Detect / count / archive results -> layers in a run group
# --------------------------------------------------------------------------- #
def add_detect_result(result: Any, prompts: Sequence[str], model: str,
                      crs: Optional[QgsCoordinateReferenceSystem] = None,
                      gpkg: Optional[str] = None, boxes: bool = True, heatmap: bool = False,
                      project: Optional[QgsProject] = None,
                      run_time: Optional[_dt.datetime] = None,
                      folder: Optional[str] = None) -> Tuple[QgsLayerTreeGroup, List[QgsMapLayer]]:
    """Add one run's layers (boxes per prompt, heatmaps on request) in a new group. The boxes
    are written to the GeoPackage ``gpkg`` (one new table per prompt and run) and loaded
    from it, memory layers without one; heatmaps go to ``folder``."""
    project = project or QgsProject.instance()
    run_time = run_time or _dt.datetime.now(_dt.timezone.utc)
    crs = result_crs(getattr(result, "crs", None), crs)
    title = f"MapCLIP {run_time.astimezone().strftime('%H:%M:%S')}: {'; '.join(prompts)[:50]}"
    made: List[QgsMapLayer] = []
    if boxes:
        for index, prompt in enumerate(prompts):
            own = [b for b in result.boxes if b.prompt == prompt]
            layer = boxes_layer(own, prompt, model, crs, run_time, index)
            set_abstract(layer, f"MapCLIP boxes for '{prompt}', model {model}, "
                                f"{len(own)} boxes, {result.tiles} tiles in {result.seconds:.1f} s "
                                f"on {result.device}.")
            if gpkg:
                layer = save_gpkg(layer, gpkg, f"{_slug(prompt, 'boxes')}_{_stamp(run_time)}")
            made.append(layer)
    heat = getattr(result, "heatmap", None)
    if heatmap and heat is not None and getattr(result, "heatmap_transform", None) is not None:
        made.extend(heatmap_layers(result, prompts, crs, folder))
    group = run_group(title, project)
    for layer in made:
        add_to_group(layer, group, project)
    return group, made


def classes_layer(result: Any, crs: Optional[QgsCoordinateReferenceSystem] = None) -> QgsRasterLayer:
    """The class map the engine wrote (engine.classify), styled by the .qml the engine wrote
    beside it: a paletted layer whose legend names the classes."""
    layer = QgsRasterLayer(result.out, layer_name("; ".join(result.classes), "(classes)"), "gdal")
    if crs is not None and crs.isValid() and not layer.crs().isValid():
        layer.setCrs(crs)
    if result.style_out and os.path.isfile(result.style_out):
        layer.loadNamedStyle(result.style_out)
    shares = ", ".join(f"{name} {share:.0%}" for name, share in result.shares.items() if share > 0)
    set_abstract(layer, f"MapCLIP land-cover map ({result.method}) with {result.model}: {shares}.")
    layer.triggerRepaint()
    return layer


def count_text(result: Any) -> str:
    """'prompt: 12, dense: 9' from an engine CountResult (the count per method)."""
    parts = []
    for method in ("prompt", "dense"):
        part = getattr(result, method, None)
        if part is not None:
            parts.append(f"{method}: {part.count}")
    return ", ".join(parts) if parts else str(getattr(result, "count", result))


def count_layer(result: Any, model: str, crs: Optional[QgsCoordinateReferenceSystem] = None,
                run_time: Optional[_dt.datetime] = None) -> QgsVectorLayer:
    """The counted objects (dense boxes) or, for prompt-only counts, the counted area.

    The count per method is in the layer name and in its metadata abstract.
    """
    text = count_text(result)
    name = getattr(result, "object", "objects")
    boxes = list(getattr(result, "boxes", []) or [])
    crs = result_crs(getattr(result, "crs", None), crs)
    dense = getattr(result, "dense", None)
    if boxes and dense is not None:
        layer = QgsVectorLayer("Polygon", name, "memory")
        layer.setCrs(crs)
        layer.dataProvider().addAttributes(list(fields_of(outputs.COUNT_FIELDS)))
        layer.updateFields()
        rows, bounds = outputs.count_rows(dense.boxes, name, model)
        layer.dataProvider().addFeatures([feature(layer.fields(), outputs.COUNT_FIELDS, r, b)
                                          for r, b in zip(rows, bounds)])
        layer.updateExtents()
        style_boxes(layer)
    else:
        layer = QgsVectorLayer("Polygon", name, "memory")
        layer.setCrs(crs)
        layer.dataProvider().addAttributes(list(fields_of(
            (("object", QVariant.String), ("count", QVariant.Int), ("model", QVariant.String)))))
        layer.updateFields()
        extent = getattr(result, "extent", None)
        if extent is not None:
            feat = QgsFeature(layer.fields())
            feat.setGeometry(rect_geometry(extent))
            feat.setAttributes([name, int(getattr(result, "count", 0)), model])
            layer.dataProvider().addFeatures([feat])
            layer.updateExtents()
        style_counted_area(layer, f"{name}: {text}")
    layer.setName(f"{name} (count {text})")
    set_abstract(layer, f"MapCLIP count of '{name}' with {model}: {text}. "
                        f"{getattr(result, 'summary', lambda: '')()}")
    return layer


def style_counted_area(layer: QgsVectorLayer, label: str) -> None:
    """The counted area: an outline with no fill (the map stays visible), labelled with the count."""
    from qgis.core import (QgsFillSymbol, QgsPalLayerSettings, QgsSingleSymbolRenderer,
                           QgsTextFormat, QgsVectorLayerSimpleLabeling)
    symbol = QgsFillSymbol.createSimple({"color": "0,0,0,0", "style": "no",
                                         "outline_color": BOX_RAMP[1], "outline_width": "0.8",
                                         "outline_style": "dash"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    settings = QgsPalLayerSettings()
    settings.fieldName = "'" + label.replace("'", "''") + "'"
    settings.isExpression = True
    fmt = QgsTextFormat()
    fmt.setSize(11)
    fmt.setColor(QColor(BOX_RAMP[1]))
    buffer = fmt.buffer()
    buffer.setEnabled(True)
    fmt.setBuffer(buffer)
    settings.setFormat(fmt)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def hits_layer(hits: Sequence[Any], query: str, model: str) -> QgsVectorLayer:
    """Archive-search hits as footprint polygons with the engine's hit fields
    (engine.core.outputs.HIT_FIELDS), in the CRS the CLI writes them in: the rasters'
    shared CRS, else WGS84 (engine.core.outputs.output_crs)."""
    crs_text_ = outputs.output_crs(getattr(h, "crs", None) for h in hits)
    layer = QgsVectorLayer("Polygon", layer_name(query, "(archive)"), "memory")
    layer.setCrs(engine_crs(crs_text_))
    provider = layer.dataProvider()
    provider.addAttributes(list(fields_of(outputs.HIT_FIELDS)))
    layer.updateFields()
    rows, bounds = outputs.hit_rows(hits, model, outputs.hit_query({"text": query}), crs_text_)
    provider.addFeatures([feature(layer.fields(), outputs.HIT_FIELDS, r, b)
                          for r, b in zip(rows, bounds)])
    layer.updateExtents()
    if os.path.isfile(HITS_STYLE):
        layer.loadNamedStyle(HITS_STYLE)
        renderer = layer.renderer()
        if isinstance(renderer, QgsGraduatedSymbolRenderer) and layer.featureCount():
            _update_classes(renderer, layer, max(1, min(5, layer.featureCount())), HIT_RAMP)
    return layer


def hit_bounds(hit: Any, layer: QgsVectorLayer) -> Optional[Sequence[float]]:
    """The bounds of ``hit`` in ``layer``'s CRS (see :func:`hits_layer`)."""
    if layer.crs().authid() == "EPSG:4326" and getattr(hit, "wgs84", None) is not None:
        crs = getattr(hit, "crs", None)
        if crs is None or engine_crs(crs) != layer.crs():
            return hit.wgs84
    return getattr(hit, "bounds", None)
