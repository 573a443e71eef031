"""The plugin loads in a real QGIS through classFactory, and unload() leaves nothing behind."""
from __future__ import annotations

import pytest
from qgis.core import QgsApplication
from qgis.PyQt import sip

from .conftest import process_deletes


@pytest.fixture
def plugin(iface, mapclip, qgis_settings):
    p = mapclip.classFactory(iface)
    yield p
    if p.toolbar is not None:  # a failing test must not leak into the next
        p.unload()


def test_class_factory_returns_plugin_with_qgis_entry_points(plugin, mapclip):
    assert type(plugin).__name__ == "MapClipPlugin"
    assert type(plugin).__module__ == "mapclip.plugin.main"
    for name in ("initGui", "unload", "initProcessing"):
        assert callable(getattr(plugin, name))


def test_init_gui_adds_menu_toolbar_and_provider_then_unload_removes_all(plugin, iface):
    plugin.initGui()
    menu_actions = iface.menus.get(("raster", "&MapCLIP"), [])
    labels = [a.text() for a in menu_actions]
    assert "MapCLIP search" in labels
    assert any(l.startswith("Fine-tune") for l in labels)
    assert any(l.startswith("Convert") for l in labels)
    assert any(l.startswith("De-duplicate") for l in labels)
    assert "Models…" in labels
    assert len(iface.live_toolbars()) == 1
    assert iface.live_toolbars()[0].actions()
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("mapclip") is not None

    plugin.dock_action.trigger()           # open the dock
    assert len(iface.docks) == 1 and iface.docks[0].isVisibleTo(iface.main_window)
    assert plugin.dock_action.isChecked()
    dock = iface.docks[0]
    actions = list(plugin.actions)

    plugin.unload()
    process_deletes()
    assert iface.menus == {}
    assert iface.docks == [] and sip.isdeleted(dock)
    assert iface.live_toolbars() == []
    assert iface.toolbar_icons == []
    assert all(sip.isdeleted(a) for a in actions)
    assert registry.providerById("mapclip") is None
    assert plugin.actions == [] and plugin.dock is None


def test_init_gui_and_unload_twice_in_a_row(plugin, iface, mapclip):
    plugin.initGui()
    plugin.unload()
    again = mapclip.classFactory(iface)
    again.initGui()
    again.dock_action.trigger()
    again.unload()
    process_deletes()
    assert iface.menus == {} and iface.docks == [] and iface.live_toolbars() == []
    assert QgsApplication.processingRegistry().providerById("mapclip") is None


def test_missing_dependency_is_named_in_the_message_bar_with_an_install_offer(
        plugin, iface, monkeypatch):
    from mapclip.plugin.deps import missing as deps_missing
    monkeypatch.setattr(deps_missing, "missing_modules", lambda required=None: ["torch", "rasterio"])
    plugin.initGui()
    texts = iface.bar_texts()
    assert any("torch" in t and "rasterio" in t and "MapCLIP" in t for t in texts), texts
    from qgis.PyQt.QtWidgets import QPushButton
    buttons = [b for b in iface.bar.findChildren(QPushButton) if b.objectName() == "mapclipInstallDeps"]
    assert buttons, "the message bar offers to install"
    # the plugin still works: its dock opens
    plugin.dock_action.trigger()
    assert plugin.dock is not None
    plugin.unload()


def test_no_message_when_dependencies_are_present(plugin, iface):
    from mapclip.plugin.deps.missing import missing_modules
    assert missing_modules() == []      # this venv has them all
    plugin.initGui()
    assert not any("needs Python packages" in t for t in iface.bar_texts())
    plugin.unload()


def test_fine_tune_menu_entry_opens_the_dialog_from_plugin_dialogs(plugin, iface):
    plugin.initGui()
    action = next(a for a in plugin.actions if a.text().startswith("Fine-tune"))
    action.trigger()
    dlg = plugin.dialogs.get("finetune")
    assert dlg is not None and type(dlg).__module__ == "mapclip.plugin.dialogs.finetune_dialog"
    assert dlg.isVisible()
    plugin.unload()
    process_deletes()
    assert sip.isdeleted(dlg)


# --------------------------------------------------------------------------- #
# Installing missing dependencies: the failure messages (the pip command: test_installer.py)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("output, words", [
    ("ERROR: ProxyError('Cannot connect to proxy.')", "proxy"),
    ("WARNING: Retrying ... Failed to establish a new connection: [Errno -3] "
     "Temporary failure in name resolution", "no network"),
    ("ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied: '/opt'",
     "permissions"),
    ("something odd\nthe last line", "exit code 1"),
])
def test_pip_failures_are_explained(mapclip, output, words):
    from mapclip.plugin.deps.failures import explain_failure
    assert words in explain_failure(output, 1)


def test_installer_reports_a_failed_pip_run_clearly(mapclip, qtbot, tmp_path):
    """A real QProcess running a stand-in for pip that fails like a machine without network."""
    import sys
    from mapclip.plugin.deps.installer import PipInstaller
    from mapclip.plugin.deps.plan import PipPlan
    fake = tmp_path / "fakepip.py"
    fake.write_text("import sys\nprint('Collecting torch==2.14.1')\n"
                    "print('ERROR: Failed to establish a new connection: Network is unreachable')\n"
                    "sys.exit(1)\n")
    plan = PipPlan(sys.executable, [str(fake)], str(tmp_path / "deps"), False)
    inst = PipInstaller(plan)
    steps, results = [], []
    inst.step.connect(lambda n, line: steps.append(line))
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.start()
    qtbot.waitUntil(lambda: bool(results), timeout=20000)
    ok, msg = results[0]
    assert not ok and "no network" in msg
    assert steps[-1] == "collecting torch==2.14.1 (requirements so far: 1)"


def test_fine_tune_result_is_offered_in_the_dock_model_picker(plugin, iface, tmp_path):
    plugin.initGui()
    plugin.dock_action.trigger()
    folder = tmp_path / "run" / "best"
    plugin.add_model(str(folder), "harbour (fine-tuned)")
    dock = plugin.dock
    assert dock.current_model() == str(folder)
    assert dock.model_combo.currentText() == "harbour (fine-tuned)"
    from mapclip.plugin.settings import Settings
    assert Settings().custom_models()[-1] == {"label": "harbour (fine-tuned)", "spec": str(folder)}
    assert any("harbour" in t for t in iface.bar_texts())
    plugin.unload()


def test_model_manager_changes_refresh_the_dock_picker(plugin, iface, tmp_path):
    plugin.initGui()
    plugin.dock_action.trigger()
    dlg = plugin.open_dialog("models")
    assert type(dlg).__name__ == "ModelManagerDialog"
    from mapclip.plugin.settings import Settings
    Settings().add_custom_model(str(tmp_path / "m"), "my model")
    dlg.models_changed.emit()
    combo = plugin.dock.model_combo
    assert combo.findData(str(tmp_path / "m")) >= 0
    plugin.unload()


def test_install_button_runs_pip_and_shows_its_failure_in_the_message_bar(plugin, iface, monkeypatch,
                                                                          qtbot, tmp_path):
    import sys
    from qgis.PyQt.QtWidgets import QPushButton
    from mapclip.plugin.deps.plan import PipPlan
    from mapclip.plugin.deps import missing as deps_missing
    from mapclip.plugin.deps import plan as deps_plan
    fake = tmp_path / "fakepip.py"
    fake.write_text("import sys\nprint('Collecting torch')\n"
                    "print(\"ERROR: ProxyError('Cannot connect to proxy.')\")\nsys.exit(1)\n")
    monkeypatch.setattr(deps_missing, "missing_modules", lambda required=None: ["torch"])
    monkeypatch.setattr(deps_plan, "pip_plan",
                        lambda **kw: PipPlan(sys.executable, [str(fake)], str(tmp_path / "d"), False))
    plugin.initGui()
    button = next(b for b in iface.bar.findChildren(QPushButton)
                  if b.objectName() == "mapclipInstallDeps")
    button.click()
    assert plugin.installer is not None
    qtbot.waitUntil(lambda: plugin.installer is None, timeout=20000)
    texts = iface.bar_texts()
    assert any("installing MapCLIP's packages failed" in t and "proxy" in t for t in texts), texts
    plugin.unload()


def test_the_menu_shows_and_empties_the_kept_embeddings(plugin, iface, monkeypatch):
    """Plugins > MapCLIP > Kept embeddings…: where, how many, how big; Empty removes them,
    Keep does not (what `python -m engine cache info|clear` does, without a terminal)."""
    import numpy as np
    from qgis.PyQt.QtWidgets import QMessageBox
    from mapclip.engine.cache.store import CACHE
    plugin.initGui()
    labels = [a.text() for a in iface.menus.get(("raster", "&MapCLIP"), [])]
    assert "Kept embeddings…" in labels
    key = {"format": 0, "kind": "test", "n": 1}
    assert CACHE.put(key, {"values": np.ones((4, 8), np.float32)}, {"skipped": 0})
    shown, answer = [], [QMessageBox.No]

    def fake_exec(box):
        shown.append(box.text())
        return answer[0]
    monkeypatch.setattr(QMessageBox, "exec_", fake_exec)
    assert plugin.manage_cache() is False and CACHE.info()["entries"] == 1
    assert "1 kept passes" in shown[-1] and str(CACHE.folder) in shown[-1]
    answer[0] = QMessageBox.Yes
    assert plugin.manage_cache() is True
    assert CACHE.info()["entries"] == 0 and CACHE.get(key) is None
