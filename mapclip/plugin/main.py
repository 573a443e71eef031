"""MapClipPlugin: what QGIS loads (classFactory), its menu, toolbar, dock and provider.

- Menu *Raster > MapCLIP*: the search dock, Fine-tune…, Convert annotations…,
  De-duplicate images…, Models…, Install dependencies…; a "MapCLIP" toolbar with the
  dock toggle.
- The Processing provider is registered in :meth:`initProcessing` (QGIS calls
  it on its own for ``qgis_process``, where there is no ``iface``).
- Missing torch/open_clip/rasterio: the plugin loads anyway, the message bar
  names what is missing and offers to install it (see :mod:`.deps`).
- :meth:`unload` removes everything it added: actions, menu entries, the
  toolbar, the dock, the provider, running tasks and the map tool.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict, List, Optional, Tuple

from qgis.core import Qgis
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction, QProgressBar

from ..engine.cache.store import CACHE
from ..engine.core.errors import MapClipError
from . import log, runtime, tasks
from .deps import activate as deps_activate
from .deps import installer as deps_installer
from .deps import missing as deps_missing
from .deps import plan as deps_plan
from .dock.shell import MapClipDock
from .settings import Settings

MENU = "&MapCLIP"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ICON = os.path.join(ROOT, "resources", "icon.svg")
#: menu entry -> (module in mapclip/plugin/dialogs, dialog class)
DIALOGS: Dict[str, Tuple[str, str]] = {
    "finetune": ("finetune_dialog", "FinetuneDialog"),
    "convert": ("convert_dialog", "ConvertDialog"),
    "dedup": ("dedup_dialog", "DedupDialog"),
    "models": ("model_manager", "ModelManagerDialog"),
}
#: "Try the demo": a synthetic scene with a tank farm, airplanes and ships, and what to search
DEMO_SEED, DEMO_SIZE, DEMO_PROMPT = 3, 1024, "storage tanks"
DIALOG_LABELS = {"finetune": "Fine-tune a model…", "convert": "Convert annotations…",
                 "dedup": "De-duplicate images…", "models": "Models…"}


def dialog_class(key: str):
    """The dialog class for ``key`` from mapclip/plugin/dialogs."""
    module_name, name = DIALOGS[key]
    return getattr(importlib.import_module(f"{__package__}.dialogs.{module_name}"), name)


class MapClipPlugin:
    """The object QGIS holds for the plugin."""

    def __init__(self, iface):
        self.iface = iface
        self.actions: List[QAction] = []
        self.menu_actions: List[QAction] = []
        self.toolbar = None
        self.dock = None
        self.dock_action: Optional[QAction] = None
        self.provider = None
        self.missing: List[str] = []
        self.deps_item = None
        self.installer = None
        self.dialogs: Dict[str, Any] = {}
        deps_activate.add_deps_path()
        runtime.block_triton()

    # ------------------------------------------------------------ Processing --
    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        if self.provider is not None:
            return
        try:
            from .processing import add_provider
        except ImportError as exc:
            log.warning(f"the Processing provider is not available: {exc}")
            return
        try:
            self.provider = add_provider()
        except Exception as exc:  # a broken provider must not stop the plugin
            log.bar_error(self.iface, "registering the MapCLIP Processing provider failed", exc)

    # ------------------------------------------------------------------- GUI --
    def _action(self, text: str, slot, menu: bool = True, checkable: bool = False) -> QAction:
        action = QAction(QIcon(ICON), text, self.iface.mainWindow())
        action.setCheckable(checkable)
        action.setObjectName("mapclip_" + "".join(c for c in text.lower() if c.isalnum()))
        (action.toggled if checkable else action.triggered).connect(slot)
        self.actions.append(action)
        if menu:
            self.iface.addPluginToRasterMenu(MENU, action)
            self.menu_actions.append(action)
        return action

    def initGui(self) -> None:  # noqa: N802 (QGIS's name)
        self.initProcessing()
        self.toolbar = self.iface.addToolBar("MapCLIP")
        self.toolbar.setObjectName("MapCLIPToolbar")
        self.dock_action = self._action("MapCLIP search", self.toggle_dock, checkable=True)
        self.dock_action.setToolTip("search the map by text (MapCLIP)")
        self.toolbar.addAction(self.dock_action)
        for key in ("finetune", "convert", "dedup", "models"):
            self._action(DIALOG_LABELS[key], lambda _=False, k=key: self.open_dialog(k))
        self._action("Try the demo", self.try_demo)
        self._action("Kept embeddings…", self.manage_cache)
        self._action("Install dependencies…", self.install_deps)
        self.check_deps()

    def manage_cache(self) -> bool:
        """Say where the kept embeddings are and how big (engine.cache), and empty them on
        request: what `python -m engine cache info|clear` does, without a terminal.
        True when they were emptied."""
        from qgis.PyQt.QtWidgets import QMessageBox
        info = CACHE.info()
        text = (f"MapCLIP keeps each searched area's embeddings so that later prompts, and the same "
                f"search as a heatmap, need no new pass over the raster.\n\n"
                f"On disk: {info['entries']} kept passes, {info['disk_mb']:.1f} MB of "
                f"{info['disk_limit_mb']:.0f} MB, in {info['folder']}\n"
                f"In this QGIS session: {info['memory_entries']} passes, {info['memory_mb']:.1f} MB "
                f"of {info['memory_limit_mb']:.0f} MB.\n\n"
                "Empty them? Later searches embed their areas again. (Advanced > Reuse embeddings "
                "in the search dock turns keeping them off.)")
        box = QMessageBox(QMessageBox.Question, "MapCLIP: kept embeddings", text,
                          QMessageBox.Yes | QMessageBox.No, self.iface.mainWindow())
        box.setDefaultButton(QMessageBox.No)
        box.button(QMessageBox.Yes).setText("Empty")
        box.button(QMessageBox.No).setText("Keep")
        if box.exec_() != QMessageBox.Yes:
            return False
        removed = CACHE.clear()
        log.bar_success(self.iface, f"removed {removed} kept embedding passes from {info['folder']}")
        return True

    def check_deps(self) -> List[str]:
        """Say in the message bar what is missing, with an Install button."""
        self.missing = deps_missing.missing_modules()
        if self.missing:
            self.deps_item = deps_installer.offer_install(self.iface, self.missing, self.install_deps)
        return self.missing

    # ------------------------------------------------------------------ dock --
    def ensure_dock(self):
        if self.dock is None:
            self.dock = MapClipDock(self.iface, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._dock_visibility)
            self.dock.install_requested.connect(self.install_deps)
        return self.dock

    def toggle_dock(self, on: bool) -> None:
        if on:
            try:
                dock = self.ensure_dock()
            except Exception as exc:  # the dock must never take the toolbar down with it
                self._dock_visibility(False)
                log.bar_error(self.iface, "the MapCLIP dock could not open", exc)
                return
            dock.refresh_deps()
            dock.show()
            dock.raise_()
        elif self.dock is not None:
            self.dock.hide()

    def _dock_visibility(self, visible: bool) -> None:
        if self.dock_action is not None and self.dock_action.isChecked() != visible:
            self.dock_action.blockSignals(True)
            self.dock_action.setChecked(visible)
            self.dock_action.blockSignals(False)

    # --------------------------------------------------------------- dialogs --
    def open_dialog(self, key: str):
        dlg = self.dialogs.get(key)
        if dlg is None:
            cls = dialog_class(key)
            kwargs = {}
            if key == "finetune":
                kwargs["on_model_ready"] = self.add_model
            dlg = cls(self.iface, self.iface.mainWindow(), **kwargs)
            self.dialogs[key] = dlg
            if hasattr(dlg, "models_changed"):
                dlg.models_changed.connect(self._models_changed)
        dlg.show()
        dlg.raise_()
        return dlg

    def _models_changed(self) -> None:
        if self.dock is not None:
            self.dock.refresh_models()

    def add_model(self, spec: str, label: Optional[str] = None) -> None:
        """Add a model (the fine-tune result) to the dock's picker."""
        Settings().add_custom_model(spec, label)
        if self.dock is not None:
            self.dock.refresh_models()
            self.dock.select_model(spec)
        log.bar_success(self.iface, f"model {label or spec} added to the MapCLIP dock")

    # ------------------------------------------------------------------ demo --
    def try_demo(self):
        """Make a synthetic scene, add it to the map and set the dock up for the demo model.

        The scene (engine.data.synthetic, seed DEMO_SEED) is written once into the
        profile and reused; the dock gets the demo model, a suggested prompt
        and the whole layer as the area, so Run shows a search working.
        """
        from qgis.core import QgsApplication, QgsRasterLayer, QgsProject
        folder = os.path.join(QgsApplication.qgisSettingsDirPath(), "mapclip-demo")
        path = os.path.join(folder, f"scene-{DEMO_SEED}.tif")

        def job(progress, cancel):
            from ..engine.data.synthetic.scene import make_scene
            if not os.path.isfile(path):
                os.makedirs(folder, exist_ok=True)
                make_scene(path, width=DEMO_SIZE, seed=DEMO_SEED, mask_path=None, coco_path=None,
                           progress=progress, cancel=cancel)
            return path

        def done(scene_path):
            layer = QgsRasterLayer(scene_path, "MapCLIP demo scene")
            QgsProject.instance().addMapLayer(layer)
            self.iface.mapCanvas().setExtent(layer.extent())
            self.iface.mapCanvas().refresh()
            if self.dock_action is not None:
                self.dock_action.setChecked(True)
            dock = self.ensure_dock()
            dock.show_demo(layer, DEMO_PROMPT)

        task = tasks.EngineTask("MapCLIP: demo scene", job, on_done=done, iface=self.iface)
        tasks.start(task)
        return task

    # ---------------------------------------------------------- dependencies --
    def install_deps(self) -> None:
        """pip install the engine's packages into the plugin's folder (QProcess)."""
        if self.installer is not None:
            return
        try:
            plan = deps_plan.pip_plan()
        except MapClipError as exc:       # no QGIS Python to run pip with: how to do it by hand
            log.bar_error(self.iface, "installing MapCLIP's packages failed", exc)
            return
        log.info("running: " + " ".join(plan.command()))
        bar = self.iface.messageBar()
        if self.deps_item is not None:
            try:
                bar.popWidget(self.deps_item)
            except Exception:
                pass
            self.deps_item = None
        item = bar.createMessage("MapCLIP", plan.summary())
        progress = QProgressBar(item)
        progress.setRange(0, 0)  # busy until pip gives a measure
        item.layout().addWidget(progress)
        bar.pushWidget(item, Qgis.Info, 0)
        self.installer = deps_installer.PipInstaller(plan)

        def progressed(fraction: float, text: str) -> None:
            item.setText(text)
            if fraction < 0:
                progress.setRange(0, 0)
            else:
                progress.setRange(0, 1000)
                progress.setValue(int(round(fraction * 1000)))

        def finished(ok: bool, message: str) -> None:
            try:
                bar.popWidget(item)
            except Exception:
                pass
            self.installer = None
            if ok:
                self.missing = deps_missing.missing_modules()
                if self.dock is not None:
                    self.dock.refresh_deps()
                log.bar_success(self.iface, f"MapCLIP's packages: {message}", seconds=0)
            else:
                log.bar_error(self.iface, f"installing MapCLIP's packages failed: {message}")

        self.installer.progress.connect(progressed)
        self.installer.finished.connect(finished)
        self.installer.start()

    # ---------------------------------------------------------------- unload --
    def unload(self) -> None:
        tasks.cancel_all()
        tasks.forget_models()  # the weights are freed with the plugin
        if self.installer is not None:
            self.installer.cancel()
            self.installer = None
        for dlg in self.dialogs.values():
            try:
                dlg.close()
                dlg.deleteLater()
            except RuntimeError:
                pass
        self.dialogs.clear()
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        for action in self.menu_actions:
            self.iface.removePluginRasterMenu(MENU, action)
        if self.toolbar is not None:
            for action in self.actions:
                self.toolbar.removeAction(action)
            self.toolbar.deleteLater()
            self.toolbar = None
        for action in self.actions:
            action.deleteLater()
        self.actions, self.menu_actions = [], []
        self.dock_action = None
        if self.provider is not None:
            try:
                from .processing import remove_provider
                remove_provider(self.provider)
            except ImportError:
                pass
            self.provider = None
