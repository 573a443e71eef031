"""The MapCLIP Processing provider: id ``mapclip``, every engine capability as an algorithm.

The plugin adds it in ``initProcessing()`` (QGIS and ``qgis_process`` call that
for plugins with ``hasProcessingProvider=yes`` in metadata.txt), so the
algorithms show in the toolbox, batch mode, the graphical modeler and
``qgis_process run mapclip:<name>``.
"""
from __future__ import annotations

from typing import List

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .common import ICON_PATH


def algorithm_classes() -> List[type]:
    """Every algorithm the provider offers, in toolbox order."""
    from .archive_algs import BuildIndexAlgorithm, SearchIndexAlgorithm
    from .classify_algs import CaptionAlgorithm, ClassifyAlgorithm
    from .search_algs import CountAlgorithm, DetectAlgorithm, HeatmapAlgorithm
    from .training_algs import (BoxToCaptionAlgorithm, DeduplicateAlgorithm, FinetuneAlgorithm, MaskToBoxAlgorithm)
    return [DetectAlgorithm, HeatmapAlgorithm, CountAlgorithm, ClassifyAlgorithm, CaptionAlgorithm,
            BuildIndexAlgorithm,
            SearchIndexAlgorithm, FinetuneAlgorithm, BoxToCaptionAlgorithm, MaskToBoxAlgorithm,
            DeduplicateAlgorithm]


class MapClipProvider(QgsProcessingProvider):
    """Processing provider ``mapclip`` ("MapCLIP")."""

    def id(self) -> str:
        return "mapclip"

    def name(self) -> str:
        return "MapCLIP"

    def longName(self) -> str:  # noqa: N802 (QGIS's name)
        from ... import engine
        return f"MapCLIP {engine.__version__}"

    def icon(self) -> QIcon:
        return QIcon(ICON_PATH)

    def svgIconPath(self) -> str:  # noqa: N802
        return ICON_PATH

    def loadAlgorithms(self) -> None:  # noqa: N802
        for cls in algorithm_classes():
            self.addAlgorithm(cls())
