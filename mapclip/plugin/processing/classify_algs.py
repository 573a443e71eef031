"""Processing algorithms for land-cover maps and captions: classify, caption.

They call ``engine.classify.classify`` and ``engine.caption.caption``, the
functions behind ``python -m engine classify`` and ``python -m engine
caption``, with the same options; an optional parameter left empty is the
engine's default.
"""
from __future__ import annotations

from dataclasses import replace

from qgis.core import (QgsFeature, QgsFeatureSink, QgsField, QgsProcessing,
                       QgsProcessingException, QgsProcessingParameterBoolean,
                       QgsProcessingParameterEnum, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString,
                       QgsProcessingParameterVectorDestination)
from qgis.PyQt.QtCore import QVariant

from ...engine.core.options import ATTENTION_MODES as ATTENTION_
from ...engine.core.options import CAPTION_METHODS as CAPTION_METHODS_
from ...engine.core.options import TEMPLATE_SETS, CaptionOptions, ClassifyOptions
from ...engine.core.outputs import CAPTION_FIELDS
from ..layers import crs_text
from .common import (TEMPLATES_LABEL, FeedbackBridge, cls_token_lambda_param, default_model, engine_errors,
                     get_model, optional_number, push_notes, raster_path, split_prompts)
from .search_algs import RasterSearchAlgorithm

C = ClassifyOptions()
CO = CaptionOptions()
ATTENTION_MODES, CAPTION_METHODS = list(ATTENTION_), list(CAPTION_METHODS_)


class ClassifyAlgorithm(RasterSearchAlgorithm):
    ALG_NAME = "classify"
    DISPLAY = "Land-cover map from class names"
    HELP = ("Gives every cell of a raster (or an area of it) the class whose words its image "
            "matches best: an open-vocabulary land-cover map, training-free, from the model's "
            "dense patch features. Output: a uint8 GeoTIFF (values 1..N the classes in the order "
            "typed, 0 unknown, 255 not scored) with a colour table and a QGIS style (.qml) with "
            "the class names as legend; optional per-class scores and polygons (class, mean "
            "score).<br>Same engine call as <code>python -m engine classify</code>; see "
            "docs/classify.md.")

    CLASSES, TILE, THRESHOLD, SMOOTHING, OVERLAP = "CLASSES", "TILE", "THRESHOLD", "SMOOTHING", "OVERLAP"
    ATTENTION, TEMPLATES, WITHIN = "ATTENTION", "TEMPLATES", "WITHIN"
    CLS_TOKEN_LAMBDA = "CLS_TOKEN_LAMBDA"
    OUTPUT, SCORES, POLYGONS = "OUTPUT", "SCORES", "POLYGONS"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_input_params()
        self.addParameter(QgsProcessingParameterString(
            self.CLASSES, "Classes (one per line, or separated by ;), e.g. water; forest; field",
            multiLine=True))
        self.add_common_params()
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.WITHIN, "Only within these polygons (empty: the whole area)",
            [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.TILE, "Tile size, px (empty: the model's)", QgsProcessingParameterNumber.Integer,
            optional=True, minValue=8))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, "Unknown below this score, 0..1 (empty: never unknown)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.SMOOTHING, "Smoothing, cells (0: none)", QgsProcessingParameterNumber.Double,
            defaultValue=C.smoothing, minValue=0.0, maxValue=64.0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.OVERLAP, "Tile overlap, share of a tile", QgsProcessingParameterNumber.Double,
            defaultValue=C.overlap, minValue=0.0, maxValue=0.49))
        self.add_advanced(QgsProcessingParameterEnum(
            self.ATTENTION, "Last block (ClearCLIP, SCLIP-style, SegEarth-OV q+k+v, SCLIP, kk, vv)",
            options=ATTENTION_MODES, defaultValue=ATTENTION_MODES.index(C.attention)))
        self.add_advanced(cls_token_lambda_param(self.CLS_TOKEN_LAMBDA))
        self.add_advanced(QgsProcessingParameterString(
            self.TEMPLATES, TEMPLATES_LABEL.format(", ".join(TEMPLATE_SETS)), optional=True))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Class map"))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.SCORES, "Scores per class", optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.POLYGONS, "Class polygons", QgsProcessing.TypeVectorPolygon, optional=True,
            createByDefault=False))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        classes = split_prompts(self.parameterAsString(parameters, self.CLASSES, context))
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        scores = (self.parameterAsOutputLayer(parameters, self.SCORES, context)
                  if parameters.get(self.SCORES) else None) or None
        polygons = (self.parameterAsOutputLayer(parameters, self.POLYGONS, context)
                    if parameters.get(self.POLYGONS) else None) or None
        threshold = optional_number(parameters.get(self.THRESHOLD))
        within = within_crs = None
        if parameters.get(self.WITHIN) not in (None, ""):
            import json
            source = self.parameterAsSource(parameters, self.WITHIN, context)
            if source is not None:  # selected features only, when the user asked for it
                within = [json.loads(f.geometry().asJson()) for f in source.getFeatures()
                          if f.hasGeometry() and not f.geometry().isEmpty()]
                within_crs = crs_text(source.sourceCrs())
        bridge = FeedbackBridge(feedback)
        with engine_errors():
            from ...engine.classify import classify, clean_classes
            clean_classes(classes)
            with self.raster_input(parameters, context, feedback) as (path, extent, crs, gsd):
                opts = replace(
                    ClassifyOptions(), tile_px=self.optional_int(parameters, self.TILE, context),
                    threshold=None if threshold in (None, "") else
                    self.parameterAsDouble(parameters, self.THRESHOLD, context),
                    smoothing=self.parameterAsDouble(parameters, self.SMOOTHING, context),
                    overlap=self.parameterAsDouble(parameters, self.OVERLAP, context),
                    attention=ATTENTION_MODES[self.parameterAsEnum(parameters, self.ATTENTION,
                                                                   context)],
                    cls_token_lambda=self.optional_float(parameters, self.CLS_TOKEN_LAMBDA, context),
                    templates=self.parameterAsString(parameters, self.TEMPLATES, context).strip()
                    or None,
                    batch_size=self.optional_int(parameters, self.BATCH_SIZE, context),
                    read=self.read_options(parameters, context, gsd), scores=bool(scores),
                    cache=self.use_cache(parameters, context))
                lm = self.model(parameters, context, feedback)
                result = classify(path, classes, lm, extent=extent, extent_crs=crs, options=opts,
                                  progress=bridge.progress, cancel=bridge, out=out,
                                  scores_out=scores, polygons_out=polygons, overwrite=True,
                                  within=within, within_crs=within_crs)
        push_notes(feedback, result.warnings)
        feedback.pushInfo(", ".join(f"{k}: {100 * v:.1f}%" for k, v in result.shares.items()))
        outputs = {self.OUTPUT: out}
        if scores:
            outputs[self.SCORES] = scores
        if polygons:
            outputs[self.POLYGONS] = polygons
        return outputs


class CaptionAlgorithm(RasterSearchAlgorithm):
    ALG_NAME = "caption"
    DISPLAY = "Caption boxes"
    HELP = ("Describes each box of a polygon layer in words: the box is read from the raster as "
            "one image and gets the best caption of a caption bank (any CLIP model; a CSV with one "
            "caption a line or a caption column, an RSICD-style JSON, or Box-to-Caption output), "
            "or a caption written by a CoCa model when no bank is given. The output is the box "
            "layer with the field <b>caption</b> (and caption_score, the cosine; empty when "
            "generated).<br>Same engine call as <code>python -m engine caption --box</code>; see "
            "docs/caption.md.")

    BOXES, BANK, TOP_FIELD, GENERATE, METHOD, FIELD = "BOXES", "BANK", "TOP", "GENERATE", "METHOD", "FIELD"
    OUTPUT = "OUTPUT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.BOXES, "Boxes", [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Model",
                                                       defaultValue=default_model()))
        self.addParameter(QgsProcessingParameterFile(
            self.BANK, "Caption bank (empty: the model writes captions; CoCa only)",
            optional=True, fileFilter="Caption banks (*.csv *.tsv *.txt *.json *.jsonl)"))
        self.addParameter(QgsProcessingParameterString(self.FIELD, "Caption field",
                                                       defaultValue=CAPTION_FIELDS[0][0]))
        self.add_advanced(QgsProcessingParameterBoolean(
            self.GENERATE, "Generate with the model even with a bank (CoCa)", defaultValue=False))
        self.add_advanced(QgsProcessingParameterEnum(
            self.METHOD, "Generation: beam search or sampling", options=CAPTION_METHODS,
            defaultValue=CAPTION_METHODS.index(CO.method)))
        self.add_advanced(QgsProcessingParameterString(
            self.DEVICE, "Device (empty: best available)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Captioned boxes",
                                                            QgsProcessing.TypeVectorPolygon))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        path = raster_path(layer)
        source = self.parameterAsSource(parameters, self.BOXES, context)
        if source is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, self.BOXES))
        name = self.parameterAsString(parameters, self.FIELD, context).strip() or CAPTION_FIELDS[0][0]
        bank = self.parameterAsFile(parameters, self.BANK, context) or None
        feats = list(source.getFeatures())
        fields = source.fields()
        out_fields = type(fields)(fields)

        kinds = {"str": QVariant.String, "float": QVariant.Double}
        for (_, kind), fname in zip(CAPTION_FIELDS, (name, f"{name}_score")):
            ftype = kinds[kind]
            if out_fields.indexOf(fname) < 0:
                out_fields.append(QgsField(fname, ftype))
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, out_fields,
                                          source.wkbType(), source.sourceCrs())
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        places = []
        for f in feats:
            g = f.geometry()
            if g is None or g.isEmpty():
                raise QgsProcessingException(f"box {f.id()} has no geometry\nFix: remove it or "
                                             "draw it")
            r = g.boundingBox()
            places.append((r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum()))
        bridge = FeedbackBridge(feedback)
        result = None
        if places:
            with engine_errors():
                from ...engine.caption import caption, read_caption_bank
                texts = read_caption_bank(bank) if bank else None
                opts = replace(CaptionOptions(), top=1, method=CAPTION_METHODS[
                    self.parameterAsEnum(parameters, self.METHOD, context)])
                device = self.parameterAsString(parameters, self.DEVICE, context).strip() or None
                spec = self.parameterAsString(parameters, self.MODEL, context).strip() or default_model()
                lm = get_model(spec, device=device, feedback=feedback)
                result = caption(path, lm, places, extent_crs=crs_text(source.sourceCrs()),
                                 bank=texts, options=opts,
                                 generate=True if self.parameterAsBoolean(
                                     parameters, self.GENERATE, context) else None,
                                 progress=bridge.progress, cancel=bridge)
        i_cap, i_score = out_fields.indexOf(name), out_fields.indexOf(f"{name}_score")
        for k, f in enumerate(feats):
            out = QgsFeature(out_fields)
            out.setGeometry(f.geometry())
            attrs = list(f.attributes()) + [None] * (len(out_fields) - len(f.attributes()))
            best = result.places[k].captions[0] if result and result.places[k].captions else None
            attrs[i_cap] = best.text if best else None
            attrs[i_score] = None if best is None or best.cosine != best.cosine else float(best.cosine)
            out.setAttributes(attrs)
            sink.addFeature(out, QgsFeatureSink.FastInsert)
        return {self.OUTPUT: dest}
