"""The best boxes so far while a long search runs, in one layer updated in place.

engine.detect calls its ``preview`` every few seconds during a pass over the
raster; the task hands the boxes to the main thread (EngineTask.previewed) and
the dock shows them here: one memory layer, created on the first preview and
refilled on each later one. When the search ends the finished result replaces
it; when the user cancels, the layer is kept, named and described as partial.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from qgis.core import QgsProject, QgsVectorLayer

from . import layers


class SearchPreview:
    def __init__(self, prompts: Sequence[str], model: str, crs, project: Optional[QgsProject] = None):
        self.prompts = list(prompts)
        self.model = model
        self.crs = crs
        self.project = project or QgsProject.instance()
        self.layer: Optional[QgsVectorLayer] = None
        self.boxes = 0
        self.done = self.total = 0

    def _name(self, what: str) -> str:
        return layers.layer_name("; ".join(self.prompts)[:50], f"({what})")

    def show(self, boxes: Sequence[Any], done: int, total: int) -> None:
        self.boxes, self.done, self.total = len(boxes), int(done), int(total)
        if self.layer is None:
            self.layer = layers.boxes_layer(boxes, self.prompts[0], self.model, self.crs)
            self.project.addMapLayer(self.layer)
        else:
            layers.set_boxes(self.layer, boxes, self.model)
        self.layer.setName(self._name(f"so far: {done} of {total} windows"))
        self.layer.triggerRepaint()

    def discard(self) -> None:
        """The finished result replaces the preview."""
        if self.layer is not None and self.project.mapLayer(self.layer.id()) is not None:
            self.project.removeMapLayer(self.layer.id())
        self.layer = None

    def keep_partial(self) -> int:
        """Cancelled: keep what was found, named and described as partial; the box count."""
        if self.layer is None or self.project.mapLayer(self.layer.id()) is None:
            return 0
        self.layer.setName(self._name(f"partial: cancelled after {self.done} of {self.total} windows"))
        layers.set_abstract(self.layer, f"MapCLIP boxes for {'; '.join(self.prompts)!r} found before "
                                        f"the search was cancelled ({self.done} of {self.total} "
                                        f"windows scored, boxes not fitted), model {self.model}.")
        n = self.boxes
        self.layer = None
        return n
