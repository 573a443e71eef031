"""Processing algorithms for the archive index: build (or append to) an index, search it.

They call ``engine.archive.build.build_index`` and ``engine.archive.search.search``, the
functions behind ``python -m engine index`` and ``python -m engine search``.
An index is a folder (see docs/index.md); building into an existing index
appends new rasters, finishes an interrupted build and re-embeds changed ones.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from qgis.core import (QgsFeatureSink, QgsFields, QgsProcessing, QgsProcessingException,
                       QgsProcessingOutputNumber, QgsProcessingParameterBoolean,
                       QgsProcessingParameterDefinition, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFile, QgsProcessingParameterFolderDestination,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterNumber,
                       QgsProcessingParameterPoint, QgsProcessingParameterString, QgsWkbTypes)

from .common import (FeedbackBridge, MapClipAlgorithm, default_model, engine_errors, get_model, optional_number, parse_bands, raster_path,
                     push_notes, read_workers_param, read_workers_value, split_prompts)
from ...engine.core import outputs
from ..layers import crs_text, engine_crs, feature, fields_of

from ...engine.core.options import SearchOptions
WGS84 = "EPSG:4326"


def _advanced(param):
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def _optional_int(alg, parameters, key, context) -> Optional[int]:
    if optional_number(parameters.get(key)) in (None, ""):
        return None
    return alg.parameterAsInt(parameters, key, context)


class BuildIndexAlgorithm(MapClipAlgorithm):
    ALG_NAME = "buildindex"
    DISPLAY = "Build archive index"
    GROUP = "archive"
    HELP = ("Embeds every tile of the given rasters (and of every raster under the folder) "
            "with a CLIP model into an index folder that <i>Search archive index</i> queries "
            "by text, example image or location.<br>Building into an existing index appends "
            "new rasters, finishes an interrupted build where it stopped (no tile twice, none "
            "missed) and re-embeds rasters whose checksum changed. An index holds one model's "
            "embeddings: appending with another model is refused.<br>Tile size (empty: the "
            "model's input size), several scales, stride and GSD are fixed when the index is "
            "created.<br>STAC: a static catalogue (catalog.json, a file or URL) or a STAC "
            "API's search URL (https://.../search, or its landing page); its items' visual COG "
            "assets are indexed as URLs, filtered by the WGS84 box, dates and collections "
            "(sent to the API with the search).<br>Same engine call as "
            "<code>python -m engine index</code>.")

    INPUT, FOLDER, MODEL, TILE, SCALES, STRIDE, GSD = "INPUT", "FOLDER", "MODEL", "TILE", "SCALES", "STRIDE", "GSD"
    BANDS, DEVICE, BATCH_SIZE, REINDEX, OUTPUT = "BANDS", "DEVICE", "BATCH_SIZE", "REINDEX", "OUTPUT"
    READ_WORKERS = "READ_WORKERS"
    STAC, STAC_ASSET, STAC_BBOX = "STAC", "STAC_ASSET", "STAC_BBOX"
    STAC_DATETIME, STAC_COLLECTIONS = "STAC_DATETIME", "STAC_COLLECTIONS"
    ROWS, EMBEDDED, RASTERS = "ROWS", "EMBEDDED", "RASTERS"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.INPUT, "Raster layers", QgsProcessing.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterFile(
            self.FOLDER, "Folder of rasters (searched recursively)",
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.STAC, "STAC catalogue or STAC API search URL", optional=True))
        for key, label in ((self.STAC_ASSET, "STAC asset key (empty: the visual one)"),
                           (self.STAC_BBOX, "STAC items within W,S,E,N (WGS84)"),
                           (self.STAC_DATETIME, "STAC items of a date or range, e.g. "
                                                "2024-06-01/2024-08-31"),
                           (self.STAC_COLLECTIONS, "STAC collections, comma-separated")):
            self.addParameter(_advanced(QgsProcessingParameterString(key, label, optional=True)))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Model", defaultValue=default_model()))
        self.addParameter(QgsProcessingParameterNumber(
            self.TILE, "Tile size, px (empty: the model's input size)",
            QgsProcessingParameterNumber.Integer, optional=True, minValue=8))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.SCALES, "Several tile sizes, px (e.g. 224,448; replaces the tile size)", optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.STRIDE, "Stride, px (empty: no overlap)", QgsProcessingParameterNumber.Integer,
            optional=True, minValue=1)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.GSD, "Ground sampling distance to read at, m/px (empty: native)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0)))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.BANDS, "Bands, e.g. 1,2,3 (empty: RGB by colour interpretation)", optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.DEVICE, "Device (empty: best available)", optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.BATCH_SIZE, "Batch size (empty: the model's)", QgsProcessingParameterNumber.Integer,
            optional=True, minValue=1)))
        self.addParameter(read_workers_param(self.READ_WORKERS))
        self.addParameter(_advanced(QgsProcessingParameterBoolean(
            self.REINDEX, "Re-embed the given rasters even when unchanged", defaultValue=False)))
        self.addParameter(QgsProcessingParameterFolderDestination(
            self.OUTPUT, "Index folder (new, or an existing index to append to)"))
        self.addOutput(QgsProcessingOutputNumber(self.ROWS, "Tiles in the index"))
        self.addOutput(QgsProcessingOutputNumber(self.EMBEDDED, "Tiles embedded by this run"))
        self.addOutput(QgsProcessingOutputNumber(self.RASTERS, "Rasters in the index"))

    def sources(self, parameters, context) -> List[str]:
        layers = self.parameterAsLayerList(parameters, self.INPUT, context) or []
        sources = [raster_path(layer) for layer in layers]
        folder = self.parameterAsFile(parameters, self.FOLDER, context)
        if folder:
            sources.append(folder)
        stac = self.parameterAsString(parameters, self.STAC, context).strip()
        if stac:      # the items' COG assets (engine.raster.stac), as `index --stac` finds them
            from ...engine.raster.stac import parse_bbox, stac_sources
            text = {k: self.parameterAsString(parameters, k, context).strip()
                    for k in (self.STAC_ASSET, self.STAC_BBOX, self.STAC_DATETIME,
                              self.STAC_COLLECTIONS)}
            collections = [c.strip() for c in text[self.STAC_COLLECTIONS].split(",") if c.strip()]
            hrefs, self.stac_notes = stac_sources(stac, text[self.STAC_ASSET] or None,
                                                  parse_bbox(text[self.STAC_BBOX]),
                                                  text[self.STAC_DATETIME] or None, collections)
            sources.extend(hrefs)
        if not sources:
            raise QgsProcessingException("no rasters given\nFix: choose raster layers, a folder "
                                         "of rasters or a STAC catalogue or search")
        return sources

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsString(parameters, self.OUTPUT, context)
        self.stac_notes: List[str] = []
        with engine_errors():
            sources = self.sources(parameters, context)
        push_notes(feedback, self.stac_notes)
        scales_text = self.parameterAsString(parameters, self.SCALES, context).strip()
        try:
            scales = [int(s) for s in scales_text.replace(";", ",").split(",") if s.strip()] or None
        except ValueError as exc:
            raise QgsProcessingException(f"scales '{scales_text}' are not pixel sizes\n"
                                         f"Fix: give sizes such as 224,448") from exc
        gsd = None
        if optional_number(parameters.get(self.GSD)) not in (None, ""):
            gsd = self.parameterAsDouble(parameters, self.GSD, context) or None
        device = self.parameterAsString(parameters, self.DEVICE, context).strip() or None
        with engine_errors():
            from ...engine.core.options import IndexOptions
            from ...engine.archive.build import build_index
            from ...engine.core.options import ReadOptions
            bands = parse_bands(self.parameterAsString(parameters, self.BANDS, context))
            workers = read_workers_value(self, parameters, self.READ_WORKERS, context)
            options = IndexOptions(
                tile_px=_optional_int(self, parameters, self.TILE, context), scales=scales,
                stride_px=_optional_int(self, parameters, self.STRIDE, context), gsd=gsd,
                read=ReadOptions(bands=bands, workers=workers) if bands or workers != "auto" else None,
                batch_size=self.optional_int(parameters, self.BATCH_SIZE, context),
                reindex=self.parameterAsBool(parameters, self.REINDEX, context), device=device)
            spec = self.parameterAsString(parameters, self.MODEL, context).strip() or default_model()
            lm = get_model(spec, device, feedback)
            bridge = FeedbackBridge(feedback)
            info = build_index(sources, out, lm, options, progress=bridge.progress, cancel=bridge)
        feedback.pushInfo(f"{info.embedded} tiles embedded ({info.skipped} empty skipped); the "
                          f"index holds {info.rows} tiles of {info.rasters} rasters")
        push_notes(feedback, info.warnings)
        for label, items in (("added", info.added), ("resumed", info.resumed),
                             ("replaced", info.replaced), ("unchanged", info.unchanged)):
            if items:
                feedback.pushInfo(f"{label}: {', '.join(items)}")
        return {self.OUTPUT: info.path, self.ROWS: info.rows, self.EMBEDDED: info.embedded,
                self.RASTERS: info.rasters}


def hit_fields() -> QgsFields:
    """The CLI's hit fields (engine.core.outputs.HIT_FIELDS)."""
    return fields_of(outputs.HIT_FIELDS)


class SearchIndexAlgorithm(MapClipAlgorithm):
    ALG_NAME = "searchindex"
    DISPLAY = "Search archive index"
    GROUP = "archive"
    HELP = ("Ranks the tiles of an index (built by <i>Build archive index</i>) for one query: "
            "a <b>text</b> ('a quarry'), an example <b>image</b> file, or a <b>point</b> (more "
            "places like the tile under it; needs no model). Negative prompts push tiles that "
            "look like them down. The best tiles come out as polygons with rank, score, cosine "
            "and raster, in the rasters' CRS (WGS84 when they differ).<br>Exact search for "
            "small indexes, approximate (faiss) above 100 000 tiles.<br>"
            "Same engine call as <code>python -m engine search</code>.")

    INDEX, TEXT, IMAGE, POINT, NEGATIVE = "INDEX", "TEXT", "IMAGE", "POINT", "NEGATIVE"
    MODEL, TOP_K, DEVICE, OUTPUT, COUNT = "MODEL", "TOP_K", "DEVICE", "OUTPUT", "COUNT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.INDEX, "Index folder",
                                                     behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterString(self.TEXT, "Text query", optional=True))
        self.addParameter(QgsProcessingParameterFile(self.IMAGE, "Example image query",
                                                     optional=True))
        self.addParameter(QgsProcessingParameterPoint(self.POINT, "Location query (tiles like "
                                                      "the one here)", optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.NEGATIVE, "Negative prompts (separated by ;)", optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.TOP_K, "Number of results", QgsProcessingParameterNumber.Integer,
            defaultValue=SearchOptions().top_k, minValue=1))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.MODEL, "Model (empty: the index's own)", optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.DEVICE, "Device (empty: best available)", optional=True)))
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.OUTPUT, "Search results", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(self.COUNT, "Number of results"))

    def query(self, parameters, context) -> Dict[str, Any]:
        text = self.parameterAsString(parameters, self.TEXT, context).strip() or None
        image = self.parameterAsFile(parameters, self.IMAGE, context) or None
        like = like_crs = None
        if parameters.get(self.POINT) not in (None, ""):
            point = self.parameterAsPoint(parameters, self.POINT, context)
            crs = self.parameterAsPointCrs(parameters, self.POINT, context)
            like = (point.x(), point.y())
            like_crs = crs_text(crs)
        given = [k for k, v in (("text", text), ("image", image), ("point", like)) if v]
        if len(given) != 1:
            raise QgsProcessingException(
                f"give exactly one query, got {len(given)} ({', '.join(given) or 'none'})\n"
                f"Fix: fill in one of text, example image or location")
        return {"text": text, "image": image, "like": like, "like_crs": like_crs}

    def index_folder(self, parameters, context) -> str:
        """The INDEX folder; a manifest.json chosen in it means the folder (the file
        dialog shows files, and the manifest is the file that makes a folder an index)."""
        from ...engine.archive.format import MANIFEST
        path = self.parameterAsFile(parameters, self.INDEX, context)
        if os.path.isfile(path):
            if os.path.basename(path) == MANIFEST:
                return os.path.dirname(path)
            raise QgsProcessingException(
                f"{path} is a file, not an index folder\nFix: choose the index folder (the one "
                f"'{BuildIndexAlgorithm.DISPLAY}' wrote, holding {MANIFEST}) as Index folder")
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            what = "is not a MapCLIP index folder (it holds no" if os.path.isdir(path) else "does not exist (no"
            raise QgsProcessingException(
                f"{path} {what} {MANIFEST})\nFix: choose the folder '{BuildIndexAlgorithm.DISPLAY}' "
                "wrote as Index folder, or build an index there")
        return path

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        query = self.query(parameters, context)
        index = self.index_folder(parameters, context)
        device = self.parameterAsString(parameters, self.DEVICE, context).strip() or None
        with engine_errors():
            from ...engine.archive.search import search
            options = SearchOptions(
                top_k=self.parameterAsInt(parameters, self.TOP_K, context),
                negative=split_prompts(self.parameterAsString(parameters, self.NEGATIVE, context)),
                device=device)
            spec = self.parameterAsString(parameters, self.MODEL, context).strip()
            model = get_model(spec, device, feedback) if spec and query["like"] is None else None
            bridge = FeedbackBridge(feedback)
            result = search(index, model=model, options=options, progress=bridge.progress,
                            cancel=bridge, **query)
        feedback.pushInfo(f"{len(result.hits)} results from {result.rows} tiles "
                          f"({result.method} search, {result.seconds * 1000:.0f} ms)")
        crs = outputs.output_crs(h.crs for h in result.hits)
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, hit_fields(),
                                          QgsWkbTypes.Polygon, engine_crs(crs))
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        rows, bounds = outputs.hit_rows(result.hits, result.model, outputs.hit_query(result.query), crs)
        for row, b in zip(rows, bounds):
            sink.addFeature(feature(hit_fields(), outputs.HIT_FIELDS, row, b),
                            QgsFeatureSink.FastInsert)
        return {self.OUTPUT: dest, self.COUNT: len(result.hits)}
