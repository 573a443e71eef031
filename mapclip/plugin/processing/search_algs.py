"""Processing algorithms that search one raster by text: detect, heatmap, count.

They call ``engine.detect.detect`` and ``engine.count.count``, the functions
behind ``python -m engine detect`` and ``python -m engine count``, with the
same options. Defaults and choices come from engine.core.options (standard library
only, so the provider loads without torch); an option whose default depends on
the model (tile size, window, top-k, batch size) is an optional parameter left
empty, and the engine fills in the model's own default, as it does for the CLI.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Dict, List, Optional

from qgis.core import (QgsFeatureSink,
                       QgsFields, QgsProcessing, QgsProcessingException,
                       QgsProcessingLayerPostProcessorInterface, QgsVectorLayer,
                       QgsProcessingOutputNumber, QgsProcessingOutputString,
                       QgsProcessingParameterBoolean, QgsProcessingParameterDefinition,
                       QgsProcessingParameterEnum, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString,
                       QgsProcessingParameterVectorLayer,
                       QgsUnitTypes, QgsWkbTypes)

from ...engine.core.options import ATTENTION_MODES as ATTENTION_
from ...engine.core.options import COUNT_METHODS as COUNT_METHODS_
from ...engine.core.options import MERGES as MERGES_
from ...engine.core.options import MODES as MODES_
from ...engine.core.options import EXAMPLE_METHODS as EXAMPLE_METHODS_
from ...engine.core.options import TEMPLATE_SETS
from ...engine.core.options import CountOptions, DetectOptions
from ...engine.core import outputs
from ..layers import ENGINE_BOX_FIELDS, crs_text, engine_crs, feature, fields_of, style_boxes
from .common import (TEMPLATES_LABEL, FeedbackBridge, MapClipAlgorithm, cls_token_lambda_param, default_model,
                     engine_errors, error_text, get_model, optional_number, parse_bands, push_notes,
                     read_workers_param, read_workers_value, split_prompts)

D = DetectOptions()
MODES, MERGES, ATTENTION_MODES, COUNT_METHODS = (list(MODES_), list(MERGES_), list(ATTENTION_),
                                                 list(COUNT_METHODS_))
EXAMPLE_METHODS = list(EXAMPLE_METHODS_)


def box_fields() -> QgsFields:
    """The fields of a box layer: the same as the CLI's GeoPackage."""
    return fields_of(ENGINE_BOX_FIELDS)


class BoxesStyle(QgsProcessingLayerPostProcessorInterface):
    """Styles a boxes output as QGIS loads it, as the dock styles its boxes (boxes.qml:
    outlines graduated by score over a faint fill, so the objects stay visible)."""

    #: the context owns (and deletes) its post-processors, but would lose their Python half
    #: to the garbage collector: held here until the context has deleted them
    pending: List["BoxesStyle"] = []

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if isinstance(layer, QgsVectorLayer):
            style_boxes(layer)


def style_boxes_on_load(context, dest: str) -> None:
    """Give the sink ``dest`` the boxes' style when QGIS loads it on completion."""
    from qgis.PyQt import sip
    BoxesStyle.pending[:] = [p for p in BoxesStyle.pending if not sip.isdeleted(p)]
    if context.willLoadLayerOnCompletion(dest):
        post = BoxesStyle()
        BoxesStyle.pending.append(post)
        context.layerToLoadOnCompletionDetails(dest).setPostProcessor(post)


def write_boxes_to_sink(alg, parameters, context, key: str, boxes, crs: Optional[str],
                        model: str):
    """Create the sink ``key`` (styled as boxes when it is loaded) and add one polygon per
    engine box; returns (sink, dest_id)."""
    sink, dest = alg.parameterAsSink(parameters, key, context, box_fields(),
                                     QgsWkbTypes.Polygon, engine_crs(crs))
    if sink is None:
        raise QgsProcessingException(alg.invalidSinkError(parameters, key))
    style_boxes_on_load(context, dest)
    rows, bounds = outputs.box_rows(boxes, model)
    for row, b in zip(rows, bounds):
        sink.addFeature(feature(box_fields(), ENGINE_BOX_FIELDS, row, b), QgsFeatureSink.FastInsert)
    return sink, dest


class RasterSearchAlgorithm(MapClipAlgorithm):
    """Parameters shared by detect, heatmap and count: raster, model, area, reading."""

    INPUT, MODEL, EXTENT, GSD, BANDS = "INPUT", "MODEL", "EXTENT", "GSD", "BANDS"
    DEVICE, BATCH_SIZE, READ_WORKERS, CACHE = "DEVICE", "BATCH_SIZE", "READ_WORKERS", "CACHE"

    def add_input_params(self) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))

    def add_common_params(self) -> None:
        model = QgsProcessingParameterString(self.MODEL, "Model", defaultValue=default_model())
        self.addParameter(model)
        self.addParameter(QgsProcessingParameterExtent(
            self.EXTENT, "Area (empty: the whole raster)", optional=True))
        self.add_advanced(QgsProcessingParameterNumber(
            self.GSD, "Read at GSD, metres on the ground per pixel (empty: native; basemaps "
                      "in EPSG:3857 are rendered at it, converted to map units at the area's latitude)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0))
        self.add_advanced(QgsProcessingParameterString(
            self.BANDS, "Bands, e.g. 4,3,2 (empty: RGB)", optional=True))
        self.add_advanced(QgsProcessingParameterString(
            self.DEVICE, "Device (empty: best available)", optional=True))
        self.add_advanced(QgsProcessingParameterNumber(
            self.BATCH_SIZE, "Batch size (empty: the model's)", QgsProcessingParameterNumber.Integer,
            optional=True, minValue=1))
        self.addParameter(read_workers_param(self.READ_WORKERS))   # advanced already
        self.add_advanced(QgsProcessingParameterBoolean(
            self.CACHE, "Reuse embeddings (a later run on the same area and model skips the "
            "pass over the raster)", defaultValue=D.cache))

    def use_cache(self, parameters, context) -> bool:
        return self.parameterAsBool(parameters, self.CACHE, context)

    def add_advanced(self, param) -> None:
        param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(param)

    # -- reading parameters back ------------------------------------------
    def area(self, parameters, context):
        """(extent tuple or None, extent CRS string or None)."""
        if parameters.get(self.EXTENT) in (None, ""):
            return None, None
        rect = self.parameterAsExtent(parameters, self.EXTENT, context)
        if rect is None or rect.isNull() or rect.isEmpty():
            return None, None
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()), crs_text(crs)

    @contextmanager
    def raster_input(self, parameters, context, feedback):
        """(path, extent, extent CRS, GSD) for the engine, from the INPUT layer.

        A file-based layer is read from its file. Any other layer (XYZ/WMS
        basemaps, virtual rasters) is rendered by QGIS for the area at the GSD
        into a temporary GeoTIFF first, as the dock does (mapclip/plugin/render.py);
        the file is removed afterwards.
        """
        from .. import render
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException("no raster layer given\nFix: choose a raster layer or file")
        extent, extent_crs = self.area(parameters, context)
        gsd = self.gsd(parameters, context)
        source = render.raster_source(layer)
        if source is not None:
            yield source, extent, extent_crs, gsd
            return
        rect = crs = None
        if extent is not None:
            rect = self.parameterAsExtent(parameters, self.EXTENT, context)
            crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        try:
            plan = render.plan_render(layer, rect, crs, gsd)
        except ValueError as exc:
            raise QgsProcessingException(f"{exc}\nFix: give an area (EXTENT) to render the layer "
                                         f"for") from exc
        feedback.pushInfo(f"'{layer.name()}' is not a file: rendering {plan.width} x {plan.height} px "
                          f"at {plan.gsd:.3g} {QgsUnitTypes.toAbbreviatedString(plan.crs.mapUnits())}/px "
                          f"({plan.crs.authid()}; {plan.ground_gsd:.3g} m on the ground) first")
        try:
            path = render.render_to_geotiff(layer, plan)
        except render.RenderError as exc:     # a dead tile server is no silent success
            raise QgsProcessingException(error_text(exc)) from None
        try:
            yield path, None, None, None
        finally:
            for leftover in (path, path + ".aux.xml"):
                if os.path.exists(leftover):
                    os.remove(leftover)

    def gsd(self, parameters, context) -> Optional[float]:
        if optional_number(parameters.get(self.GSD)) in (None, ""):
            return None
        return self.parameterAsDouble(parameters, self.GSD, context) or None

    def read_options(self, parameters, context, gsd=None):
        from ...engine.core.options import ReadOptions
        bands = parse_bands(self.parameterAsString(parameters, self.BANDS, context))
        return ReadOptions(bands=bands, gsd=gsd or None,
                           workers=read_workers_value(self, parameters, self.READ_WORKERS, context))

    def model(self, parameters, context, feedback):
        spec = self.parameterAsString(parameters, self.MODEL, context).strip() or default_model()
        device = self.parameterAsString(parameters, self.DEVICE, context).strip() or None
        return get_model(spec, device=device, feedback=feedback)


class DetectBase(RasterSearchAlgorithm):
    """detect and heatmap: prompts, mode, tiles, windows, scores."""

    PROMPTS, MODE, TILE, WINDOW, STRIDE = "PROMPTS", "MODE", "TILE", "WINDOW", "STRIDE"
    TOP_K, THRESHOLD, MERGE, BACKGROUND = "TOP_K", "THRESHOLD", "MERGE", "BACKGROUND"
    IOU, ATTENTION, TEMPLATES, COMPILE = "IOU", "ATTENTION", "TEMPLATES", "COMPILE"
    EXAMPLES, EXAMPLES_METHOD = "EXAMPLES", "EXAMPLES_METHOD"
    CLS_TOKEN_LAMBDA = "CLS_TOKEN_LAMBDA"
    DEFAULT_MODE = D.mode

    def add_detect_params(self) -> None:
        self.add_input_params()
        self.addParameter(QgsProcessingParameterString(
            self.PROMPTS, "Prompts (one per line, or separated by ;)", multiLine=True))
        self.add_common_params()
        self.addParameter(QgsProcessingParameterEnum(
            self.MODE, "Mode", options=MODES, defaultValue=MODES.index(self.DEFAULT_MODE)))
        self.addParameter(QgsProcessingParameterNumber(
            self.TILE, "Tile size, px (empty: the model's)", QgsProcessingParameterNumber.Integer,
            optional=True, minValue=8))
        self.addParameter(QgsProcessingParameterNumber(
            self.WINDOW, "Window, tiles (empty: the model's)", QgsProcessingParameterNumber.Integer,
            optional=True, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(
            self.STRIDE, "Stride, tiles", QgsProcessingParameterNumber.Integer,
            defaultValue=D.stride, minValue=1))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.EXAMPLES, "Examples (marks with a label field)",
            [QgsProcessing.TypeVectorPoint, QgsProcessing.TypeVectorPolygon], optional=True))
        self.add_advanced(QgsProcessingParameterEnum(
            self.EXAMPLES_METHOD, "How examples refine the search", options=EXAMPLE_METHODS,
            defaultValue=EXAMPLE_METHODS.index(D.examples_method)))
        self.add_advanced(QgsProcessingParameterEnum(
            self.MERGE, "Merge overlapping windows", options=MERGES,
            defaultValue=MERGES.index(D.merge)))
        self.add_advanced(QgsProcessingParameterNumber(
            self.IOU, "Same object above IoU (0: any overlap)",
            QgsProcessingParameterNumber.Double, defaultValue=D.iou, minValue=0.0, maxValue=1.0))
        self.add_advanced(QgsProcessingParameterEnum(
            self.ATTENTION, "Dense mode: last block (ClearCLIP, SCLIP-style, SegEarth-OV q+k+v, SCLIP, kk, vv)", options=ATTENTION_MODES,
            defaultValue=ATTENTION_MODES.index(D.attention)))
        self.add_advanced(cls_token_lambda_param(self.CLS_TOKEN_LAMBDA))
        self.add_advanced(QgsProcessingParameterString(
            self.BACKGROUND, "Background prompts (; separated; empty: generic set)", optional=True))
        self.add_advanced(QgsProcessingParameterString(
            self.TEMPLATES, TEMPLATES_LABEL.format(", ".join(TEMPLATE_SETS)), optional=True))
        self.add_advanced(QgsProcessingParameterBoolean(
            self.COMPILE, "CUDA: compile the model (torch.compile; slower first run, then cached)",
            defaultValue=D.compile))

    def prompts(self, parameters, context) -> List[str]:
        prompts = split_prompts(self.parameterAsString(parameters, self.PROMPTS, context))
        if not prompts:
            raise QgsProcessingException("no prompt given\nFix: type what to look for, "
                                         "e.g. 'storage tanks'")
        return prompts

    def examples(self, parameters, context):
        """(examples, CRS WKT) of the EXAMPLES layer, or (None, None) when none is given."""
        layer = self.parameterAsVectorLayer(parameters, self.EXAMPLES, context)
        if layer is None:
            return None, None
        from ..marks import read_layer
        try:
            return read_layer(layer)
        except ValueError as exc:
            raise QgsProcessingException(f"EXAMPLES: {exc}") from None

    def detect_options(self, parameters, context, heatmap: bool, top_k=None, threshold=None,
                       gsd=None) -> DetectOptions:
        """DetectOptions from the parameters; empty ones stay None (the model's default)."""
        changes: Dict[str, Any] = dict(
            mode=MODES[self.parameterAsEnum(parameters, self.MODE, context)],
            tile_px=self.optional_int(parameters, self.TILE, context),
            window=self.optional_int(parameters, self.WINDOW, context),
            stride=self.parameterAsInt(parameters, self.STRIDE, context),
            batch_size=self.optional_int(parameters, self.BATCH_SIZE, context),
            merge=MERGES[self.parameterAsEnum(parameters, self.MERGE, context)],
            iou=self.parameterAsDouble(parameters, self.IOU, context),
            attention=ATTENTION_MODES[self.parameterAsEnum(parameters, self.ATTENTION, context)],
            cls_token_lambda=self.optional_float(parameters, self.CLS_TOKEN_LAMBDA, context),
            read=self.read_options(parameters, context, gsd),
            device=self.parameterAsString(parameters, self.DEVICE, context).strip() or None,
            compile=self.parameterAsBool(parameters, self.COMPILE, context),
            cache=self.use_cache(parameters, context),
            examples_method=EXAMPLE_METHODS[self.parameterAsEnum(parameters, self.EXAMPLES_METHOD, context)],
            top_k=top_k, threshold=threshold, heatmap=heatmap)
        background = split_prompts(self.parameterAsString(parameters, self.BACKGROUND, context))
        if background:
            changes["background"] = tuple(background)
        templates = self.parameterAsString(parameters, self.TEMPLATES, context).strip()
        if templates:
            changes["templates"] = templates
        return replace(D, **changes)

    def run_detect(self, parameters, context, feedback, heatmap: bool, top_k=None, threshold=None,
                   outputs=()):
        """Run detect; ``outputs`` (parameter, path) are checked first by the engine's
        output guard (never an input of the run, writable)."""
        prompts = self.prompts(parameters, context)
        examples, examples_crs = self.examples(parameters, context)
        with engine_errors(), self.raster_input(parameters, context, feedback) as (
                path, extent, extent_crs, gsd):
            from ...engine.core.jobs import check_outputs
            from ...engine.raster.reader import raster_files
            check_outputs(list(outputs), [("INPUT", f) for f in raster_files(path)], overwrite=True)
            from ...engine.detect import detect
            options = self.detect_options(parameters, context, heatmap, top_k, threshold, gsd)
            lm = self.model(parameters, context, feedback)
            bridge = FeedbackBridge(feedback)
            feedback.pushInfo(f"Scoring {path} for {prompts} ({options.mode} mode)")
            result = detect(path, prompts, lm, extent=extent, extent_crs=extent_crs,
                            options=options, progress=bridge.progress, cancel=bridge,
                            examples=examples, examples_crs=examples_crs)
        if feedback.isCanceled():
            raise QgsProcessingException("Cancelled: nothing was written.")
        push_notes(feedback, getattr(result, "warnings", []))
        feedback.pushInfo(f"{result.tiles} tiles, {getattr(result, 'windows', 0)} windows, "
                          f"{len(result.boxes)} boxes in {result.seconds:.1f} s on {result.device}"
                          + ("; embeddings from the cache" if result.from_cache else ""))
        return result


class DetectAlgorithm(DetectBase):
    ALG_NAME = "detect"
    DISPLAY = "Detect objects by text (boxes)"
    HELP = ("Scores a raster with a CLIP model against one or more text prompts and writes the "
            "best-scoring places as boxes (fields prompt, score, cosine, rank, model) in the "
            "raster's CRS.<br><br>"
            "<b>Window mode</b> slides windows of k x k tiles (stride in tiles) and merges "
            "overlapping high-scoring windows into one box per object. <b>Dense mode</b> makes "
            "one pass per tile with patch-level similarity and boxes thresholded components of "
            "the heatmap.<br>A single prompt is scored against generic background prompts; "
            "several prompts compete with each other. <i>score</i> is the softmax, <i>cosine</i> "
            "the raw similarity.<br><b>Examples</b> (window mode): points or polygons with a "
            "<i>label</i> field, 1 = like this, 0 = not this (e.g. the dock's MapCLIP examples "
            "layer) refine the ranking.<br>Same engine call as <code>python -m engine detect</code>.")

    OUTPUT, COUNT = "OUTPUT", "COUNT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_detect_params()
        self.addParameter(QgsProcessingParameterNumber(
            self.TOP_K, "Boxes per prompt (empty: the model's)", QgsProcessingParameterNumber.Integer,
            optional=True, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, "Score threshold (empty: the model's)", QgsProcessingParameterNumber.Double,
            optional=True, minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.OUTPUT, "Boxes", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(self.COUNT, "Number of boxes"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        top_k = self.optional_int(parameters, self.TOP_K, context)
        threshold = self.optional_float(parameters, self.THRESHOLD, context)
        result = self.run_detect(parameters, context, feedback, heatmap=False, top_k=top_k,
                                 threshold=threshold)
        _, dest = write_boxes_to_sink(self, parameters, context, self.OUTPUT, result.boxes,
                                      result.crs, result.model)
        return {self.OUTPUT: dest, self.COUNT: len(result.boxes)}


class HeatmapAlgorithm(DetectBase):
    ALG_NAME = "heatmap"
    DISPLAY = "Text heatmap"
    DEFAULT_MODE = "dense"
    HELP = ("Scores a raster against text prompts and writes a heatmap GeoTIFF, one band per "
            "prompt (scores 0..1), in the raster's CRS. Dense mode (the default here) gives "
            "patch-level detail in one pass per tile; window mode gives one value per window "
            "step.<br>Same engine call as <code>python -m engine detect --heatmap</code>.")

    OUTPUT = "OUTPUT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_detect_params()
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Heatmap"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        result = self.run_detect(parameters, context, feedback, heatmap=True,
                                 outputs=[(self.OUTPUT, out)])
        with engine_errors():
            from ...engine.detect import write_heatmap
            if result.heatmap is None:
                raise QgsProcessingException("the engine returned no heatmap for this raster\n"
                                             "Fix: try dense mode or a smaller tile size")
            write_heatmap(result, out, overwrite=True)
        return {self.OUTPUT: out}


def count_fields() -> QgsFields:
    """Fields of the dense count's object boxes: the CLI's (engine.core.outputs.COUNT_FIELDS)."""
    return fields_of(outputs.COUNT_FIELDS)


class CountAlgorithm(RasterSearchAlgorithm):
    ALG_NAME = "count"
    DISPLAY = "Count objects"
    HELP = ("Counts objects of one kind in a raster (or an area of it).<br>"
            "<b>prompt</b>: RemoteCLIP's RemoteCount protocol, captions 'there are {n} {objects} "
            "in the image' for n = 1..10 (words and digits), the best caption is the count; "
            "over the whole area as one image, or per tile and summed when a tile size is "
            "given.<br><b>dense</b>: connected components of the dense heatmap above a "
            "threshold, with their boxes (the optional output layer).<br><b>both</b> runs both. "
            "COUNT is the count: the dense method's when both ran (it localises its objects), "
            "else the one method's. COUNT_PROMPT and COUNT_DENSE give each method's number, -1 "
            "for a method that did not run; SUMMARY says which method's number is the count "
            "('count: 3 ships (dense method: ...)').<br>"
            "Same engine call as <code>python -m engine count</code>.")

    OBJECT, METHOD, TILE, THRESHOLD, MIN_AREA = "OBJECT", "METHOD", "TILE", "THRESHOLD", "MIN_AREA"
    OUTPUT, COUNT, SUMMARY = "OUTPUT", "COUNT", "SUMMARY"
    COUNT_PROMPT, COUNT_DENSE = "COUNT_PROMPT", "COUNT_DENSE"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_input_params()
        self.addParameter(QgsProcessingParameterString(self.OBJECT, "Object name, e.g. airplane"))
        self.add_common_params()
        self.addParameter(QgsProcessingParameterEnum(self.METHOD, "Method", options=COUNT_METHODS,
                                                     defaultValue=0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.TILE, "Prompt method: count per tile of this size, px (empty: the area as one image)",
            QgsProcessingParameterNumber.Integer, optional=True, minValue=8))
        self.add_advanced(QgsProcessingParameterNumber(
            self.THRESHOLD, "Dense method: heatmap threshold (empty: the engine's default)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0, maxValue=1.0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.MIN_AREA, "Dense method: smallest component, heatmap cells",
            QgsProcessingParameterNumber.Integer, defaultValue=CountOptions().min_area, minValue=1))
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.OUTPUT, "Counted objects (dense method)", QgsProcessing.TypeVectorPolygon,
            optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber(
            self.COUNT, "Count (the dense method's when both ran, else the method run)"))
        self.addOutput(QgsProcessingOutputNumber(
            self.COUNT_PROMPT, "Count by the prompt method (-1 when the prompt method did not run)"))
        self.addOutput(QgsProcessingOutputNumber(
            self.COUNT_DENSE, "Count by the dense method (-1 when the dense method did not run)"))
        self.addOutput(QgsProcessingOutputString(
            self.SUMMARY, "Summary (which method's number is the count, and each method's)"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        name = self.parameterAsString(parameters, self.OBJECT, context).strip()
        method = COUNT_METHODS[self.parameterAsEnum(parameters, self.METHOD, context)]
        boxes = parameters.get(self.OUTPUT) not in (None, "")
        if boxes:
            with engine_errors():
                from ...engine.count import check_boxes_output
                check_boxes_output(method)
        with engine_errors(), self.raster_input(parameters, context, feedback) as (
                path, extent, extent_crs, gsd):
            from ...engine.count import count
            options = replace(
                CountOptions(), min_area=self.parameterAsInt(parameters, self.MIN_AREA, context),
                batch_size=self.optional_int(parameters, self.BATCH_SIZE, context),
                read=self.read_options(parameters, context, gsd),
                tile_px=self.optional_int(parameters, self.TILE, context),
                threshold=self.optional_float(parameters, self.THRESHOLD, context),
                device=self.parameterAsString(parameters, self.DEVICE, context).strip() or None,
                cache=self.use_cache(parameters, context))
            lm = self.model(parameters, context, feedback)
            bridge = FeedbackBridge(feedback)
            result = count(path, name, lm, extent=extent, extent_crs=extent_crs, method=method,
                           options=options, progress=bridge.progress, cancel=bridge)
        push_notes(feedback, result.warnings)
        summary = result.summary()
        feedback.pushInfo(summary)
        out = {self.COUNT: result.count,
               self.COUNT_PROMPT: result.prompt.count if result.prompt is not None else -1,
               self.COUNT_DENSE: result.dense.count if result.dense is not None else -1,
               self.SUMMARY: summary}
        if boxes:
            sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, count_fields(),
                                              QgsWkbTypes.Polygon, engine_crs(result.crs))
            if sink is not None:
                style_boxes_on_load(context, dest)
                from ...engine.count import singular
                rows, bounds = outputs.count_rows(result.boxes, singular(result.object), result.model)
                for row, b in zip(rows, bounds):
                    sink.addFeature(feature(count_fields(), outputs.COUNT_FIELDS, row, b),
                                    QgsFeatureSink.FastInsert)
                out[self.OUTPUT] = dest
        return out
