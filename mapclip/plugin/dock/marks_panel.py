"""The Search tab's marks: "Yes, like this" / "Not this" on a result or a place on the map,
kept in the MapCLIP examples layer (plugin.marks), and the search refreshed with them from
the kept embeddings (engine.detect ``examples=``, window mode)."""
from __future__ import annotations

from typing import List, Optional, Tuple

from qgis.core import QgsCoordinateReferenceSystem, QgsPointXY, QgsProject
from qgis.PyQt.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QMenu, QTreeWidgetItem

from .. import log, marks, tasks
from .widgets import ROLE_BOUNDS, ROLE_CRS


class MarksPanel:
    """Marks on results and on the map (a part of :class:`~.shell.MapClipDock`)."""

    def _build_marks_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.examples_check = QCheckBox("Refine with marked examples")
        self.examples_check.setToolTip(
            "right-click a result or a place on the map: \"Yes, like this\" or \"Not this\"; "
            f"marks are kept in the '{marks.LAYER_NAME}' layer (edit or save it like any layer) "
            "and refine window-mode searches from the kept embeddings")
        self.examples_check.toggled.connect(lambda *_: self._show_mark_counts())
        self.marks_label = QLabel("")
        row.addWidget(self.examples_check)
        row.addWidget(self.marks_label, 1)
        return row

    def _show_mark_counts(self) -> None:
        yes, no = marks.counts(marks.examples_layer(create=False))
        self.marks_label.setText(f"{yes} yes · {no} not" if yes or no else "no marks yet")

    # ----------------------------------------------------------- marking --
    def _add_mark_actions(self, menu: QMenu, at, archive: bool = False) -> None:
        """"Yes, like this" / "Not this" in ``menu``; ``at()`` gives (point, crs) or None;
        ``archive``: the mark refreshes the Archive tab's search instead of the Search tab's."""
        for positive in (True, False):
            menu.addAction(f"MapCLIP: {marks.WORDS[positive]}",
                           lambda positive=positive: self._mark(at(), positive, archive))

    def _item_place(self, item: QTreeWidgetItem) -> Optional[Tuple[QgsPointXY, QgsCoordinateReferenceSystem]]:
        bounds, crs = item.data(0, ROLE_BOUNDS), item.data(0, ROLE_CRS)
        if not bounds:
            return None
        x0, y0, x1, y1 = (float(v) for v in bounds)
        if not isinstance(crs, QgsCoordinateReferenceSystem):
            crs = QgsCoordinateReferenceSystem()
        return QgsPointXY((x0 + x1) / 2, (y0 + y1) / 2), crs

    def mark_item(self, item: QTreeWidgetItem, positive: bool) -> bool:
        """Mark a result row (its box's or hit's centre); the search it came from (the Search
        or the Archive tab's) refreshes with the marks."""
        return self._mark(self._item_place(item), positive, item.treeWidget() is self.archive_results)

    def mark_place(self, point: QgsPointXY, crs: QgsCoordinateReferenceSystem, positive: bool) -> bool:
        """Mark a place on the map (``point`` in ``crs``); the search refreshes with the marks."""
        return self._mark((point, crs), positive)

    def _mark(self, place, positive: bool, archive: bool = False) -> bool:
        if place is None:
            log.bar_warning(self.iface, "this result has no place to mark")
            return False
        point, crs = place
        prompts = self.prompts()
        req = self.last_request
        raster = req.raster if isinstance(req, tasks.DetectRequest) and req.raster not in self._temp_files else ""
        marks.add_mark(point, crs, positive, "; ".join(prompts), raster)
        self.examples_check.setChecked(True)
        self._show_mark_counts()
        if archive:
            return self.task is None and self.search_archive()
        return self.refine_from_marks()

    def _canvas_menu(self, menu: QMenu, event) -> None:
        """The map's right-click menu: mark the clicked place."""
        canvas = self.canvas()
        if canvas is None:
            return
        crs = canvas.mapSettings().destinationCrs()
        point = QgsPointXY(event.mapPoint())
        menu.addSeparator()
        self._add_mark_actions(menu, lambda: (point, crs), archive=self.tabs.currentIndex() == 1)

    # ---------------------------------------------------------- refining --
    def refine_from_marks(self) -> bool:
        """Run the last window-mode search again with the marks (its embeddings are kept, so
        no pixel is read again); its earlier layers leave the map (their tables stay in the
        GeoPackage). False when there is nothing to refresh or a job runs."""
        req = self.last_request
        if self.task is not None or not isinstance(req, tasks.DetectRequest):
            return False
        old = [layer.id() for layer in self.last_layers if layer is not None]
        started = self.run()
        if started and old:
            _remove_layers(old)
        return started

    def marked_examples(self, window_mode: bool) -> Tuple[Optional[List], Optional[str]]:
        """(examples, their CRS as WKT) for a search about to start, or (None, None) when
        "Refine with marked examples" is off, there are no marks, or the search is not in
        window mode (said in the status line). Raises ValueError for a layer that cannot be
        read (the dock's words)."""
        layer = marks.examples_layer(create=False)
        if not self.examples_check.isChecked() or layer is None or not layer.featureCount():
            return None, None
        if not window_mode:
            log.bar_warning(self.iface, "marked examples refine window-mode searches only: the "
                                        "search ran without them (Method: window to use them)")
            return None, None
        return marks.read_layer(layer)


def _remove_layers(ids: List[str]) -> None:
    """Take layers off the map, and the run groups they leave empty."""
    project = QgsProject.instance()
    root = project.layerTreeRoot()
    groups = []
    for i in ids:
        node = root.findLayer(i)
        if node is not None and node.parent() is not None and node.parent() is not root:
            groups.append(node.parent())
    project.removeMapLayers([i for i in ids if project.mapLayer(i)])
    for g in groups:
        if not g.children() and g.parent() is not None:
            g.parent().removeChildNode(g)
