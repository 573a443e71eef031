"""The MapCLIP dock's shell: its tabs, shared state, Run/Cancel, status, the packages banner.

The MapCLIP dock: text search over a raster layer, and the archive tab.

Search tab: raster layer, model, prompts (several, one per line or separated by
";", with history), mode (boxes / heatmap / count), area (visible extent,
whole layer, selected polygons), an Advanced group (collapsed) whose values
are stored per model, Run / Cancel, progress and a status line, and the
results list (double-click zooms to a box).

Archive tab: build or open an index, query it by text or by clicking a place
on the map, hits as a layer and a list.

The dock only gathers plain values and hands them to an engine job in a
:class:`~.tasks.EngineTask`; layers are made in the task's ``finished()``.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

from qgis.gui import QgsDockWidget
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QHBoxLayout, QLabel, QPushButton, QTabWidget, QVBoxLayout, QWidget

from .. import layers, log, render, tasks
from ..deps import missing as deps_missing
from ..preview import SearchPreview
from ..settings import Settings
from .archive import ArchiveTab
from .describe import DescribePanel
from .marks_panel import MarksPanel
from .search_form import SearchForm
from .search_run import SearchRun


class MapClipDock(SearchForm, SearchRun, MarksPanel, ArchiveTab, DescribePanel, QgsDockWidget):
    """The search dock. ``run_finished(outcome)`` fires after every run ("done", "error", "cancelled")."""

    run_finished = pyqtSignal(str)
    #: the user asked, from the dock's banner, to install the missing packages
    install_requested = pyqtSignal()


    def __init__(self, iface, parent=None):
        super().__init__("MapCLIP", parent)
        self.setObjectName("MapClipDock")
        self.iface = iface
        self.settings = Settings()
        self.task: Optional[tasks.EngineTask] = None
        self.renderer: Optional[render.AsyncRender] = None
        self.last_layers: List[Any] = []
        self.last_result: Any = None
        self.last_count: Optional[str] = None
        self.last_request: Any = None
        self.pick_tool = None
        self.describe_tool = None
        self.last_caption: Optional[str] = None
        self._prev_tool = None
        self._temp_files: List[str] = []
        self._run_unit = "tiles"      # what the running job's progress counts
        self._status: QLabel = QLabel()
        self._preview: Optional[SearchPreview] = None   # the boxes so far of the search running
        self.tabs = QTabWidget()
        self.tabs.addTab(self._build_search_tab(), "Search")
        self.tabs.addTab(self._build_archive_tab(), "Archive")
        page = QWidget()
        box = QVBoxLayout(page)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self._build_deps_banner())
        box.addWidget(self.tabs, 1)
        box.addWidget(self._build_describe_box())
        self.setWidget(page)
        self._load_settings()
        self.refresh_deps()
        self._show_mark_counts()
        if self.canvas() is not None:     # the map's right-click menu: mark a place
            self.canvas().contextMenuAboutToShow.connect(self._canvas_menu)

    def _build_deps_banner(self) -> QWidget:
        self.deps_banner = QWidget()
        self.deps_banner.setObjectName("mapclipDepsBanner")
        row = QHBoxLayout(self.deps_banner)
        self.deps_label = QLabel()
        self.deps_label.setWordWrap(True)
        self.deps_install_button = QPushButton("Install…")
        self.deps_install_button.setObjectName("mapclipDockInstall")
        self.deps_install_button.clicked.connect(lambda _checked=False: self.install_requested.emit())
        row.addWidget(self.deps_label, 1)
        row.addWidget(self.deps_install_button)
        return self.deps_banner

    def _packages_ready(self) -> bool:
        """True when the engine's packages import; else say what is missing in the bar."""
        missing = deps_missing.missing_modules()
        if missing:
            log.bar_warning(self.iface, deps_missing.missing_message(missing))
        return not missing

    def refresh_deps(self) -> List[str]:
        """Show what is missing, with an Install button, at the top of the dock."""
        missing = deps_missing.missing_modules()
        self.deps_label.setText(deps_missing.missing_message(missing) if missing else "")
        self.deps_banner.setVisible(bool(missing))
        return missing

    def canvas(self):
        return self.iface.mapCanvas() if self.iface is not None else None

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setValue(0)

    def _refuse(self, text: str, bar: bool = True) -> bool:
        """A run that does not start: say why in the message bar and in the status line (no
        earlier run's result is left there to be taken for this one's). False."""
        if bar:
            log.bar_warning(self.iface, text)
        self.status_label.setText(f"Not started: {text}")
        self.progress.setValue(0)
        return False

    def cancel(self) -> None:
        if self.renderer is not None:
            self.renderer.cancel()
        if self.task is not None:
            self.task.cancel()
        self._status.setText("Cancelling…")

    def _cleanup_temp(self) -> None:
        for path in self._temp_files:
            try:
                os.remove(path)
            except OSError:
                pass
        self._temp_files = []

    # ------------------------------------------------------------- cleanup --
    def shutdown(self) -> None:
        """Stop what runs and release the map tool (plugin unload)."""
        if self.task is not None:
            self.task.on_done = self.task.on_error = self.task.on_cancel = None
            self.task.cancel()
            self.task = None
        if self.renderer is not None:
            self.renderer.cancel()
            self.renderer = None
        canvas = self.canvas()
        if canvas is not None:
            try:
                canvas.contextMenuAboutToShow.disconnect(self._canvas_menu)
            except (TypeError, RuntimeError):
                pass
        if canvas is not None and self.pick_tool is not None:
            if canvas.mapTool() is self.pick_tool:
                canvas.unsetMapTool(self.pick_tool)
            self.pick_tool.deleteLater()
            self.pick_tool = None
        if canvas is not None and self.describe_tool is not None:
            if canvas.mapTool() is self.describe_tool:
                canvas.unsetMapTool(self.describe_tool)
            self.describe_tool.deleteLater()
            self.describe_tool = None
        self._cleanup_temp()
