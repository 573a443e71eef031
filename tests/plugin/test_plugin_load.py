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
    from mapclip.plugin import deps
    monkeypatch.setattr(deps, "missing_modules", lambda required=None: ["torch", "rasterio"])
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
    from mapclip.plugin import deps
    assert deps.missing_modules() == []      # this venv has them all
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
