"""Processing algorithms for the archive index: build (or append to) an index, search it.

They call the engine functions behind ``python -m engine index`` and
``python -m engine search``.
"""
from __future__ import annotations

from typing import Any, Dict, List

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsFeatureSink, QgsField,
                       QgsFields, QgsGeometry, QgsProcessing, QgsProcessingException,
                       QgsProcessingOutputNumber, QgsProcessingParameterDefinition,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile,
                       QgsProcessingParameterFolderDestination,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterNumber,
                       QgsProcessingParameterPoint, QgsProcessingParameterString, QgsRectangle,
                       QgsWkbTypes)
from qgis.PyQt.QtCore import QVariant

from .common import (FeedbackBridge, MapClipAlgorithm, default_model, engine_errors, get_model,
                     optional_number, raster_path, split_prompts)

#: mirror engine.index defaults (tests/plugin/test_processing.py checks them)
INDEX_DEFAULTS = {"tile_px": 224, "top_k": 20}


class BuildIndexAlgorithm(MapClipAlgorithm):
    ALG_NAME = "buildindex"
    DISPLAY = "Build archive index"
    GROUP = "archive"
    HELP = ""

    def initAlgorithm(self, config=None):  # noqa: N802
        pass

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        raise NotImplementedError


class SearchIndexAlgorithm(MapClipAlgorithm):
    ALG_NAME = "searchindex"
    DISPLAY = "Search archive index"
    GROUP = "archive"
    HELP = ""

    def initAlgorithm(self, config=None):  # noqa: N802
        pass

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        raise NotImplementedError
