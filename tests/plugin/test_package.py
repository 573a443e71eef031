"""`python3 build.py package` makes a zip that installs as the QGIS plugin ``mapclip``."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOAD_SCRIPT = textwrap.dedent("""
    import sys
    from qgis.core import QgsApplication
    app = QgsApplication([], True)
    app.initQgis()
    from qgis.gui import QgsMapCanvas, QgsMessageBar
    from qgis.PyQt.QtWidgets import QMainWindow, QToolBar

    class Iface:
        def __init__(self):
            self.win = QMainWindow(); self.canvas = QgsMapCanvas(self.win)
            self.bar = QgsMessageBar(self.win); self.menu = []; self.docks = []
        def mainWindow(self): return self.win
        def mapCanvas(self): return self.canvas
        def messageBar(self): return self.bar
        def addToolBar(self, name):
            t = QToolBar(name, self.win); self.win.addToolBar(t); return t
        def addPluginToRasterMenu(self, name, action): self.menu.append(action)
        def removePluginRasterMenu(self, name, action): self.menu.remove(action)
        def addDockWidget(self, area, dock): self.docks.append(dock)
        def removeDockWidget(self, dock): self.docks.remove(dock)

    # the way QGIS itself finds, reads, starts and unloads plugins
    import os
    import qgis.utils
    iface = Iface()
    qgis.utils.iface = iface
    qgis.utils.plugin_paths = [os.path.dirname(sys.argv[1])]
    qgis.utils.updateAvailablePlugins()
    assert "mapclip" in qgis.utils.available_plugins, qgis.utils.available_plugins
    assert qgis.utils.pluginMetadata("mapclip", "name") == "MapCLIP"
    assert qgis.utils.pluginMetadata("mapclip", "hasProcessingProvider") == "yes"
    assert qgis.utils.loadPlugin("mapclip")
    assert qgis.utils.startPlugin("mapclip")
    import mapclip
    assert mapclip.__file__.startswith(sys.argv[1]), mapclip.__file__
    plugin = qgis.utils.plugins["mapclip"]
    assert iface.menu, "no menu entries"
    plugin.ensure_dock()
    from mapclip.engine.model.presets import PRESETS
    assert "remoteclip-vit-b-32" in PRESETS
    assert qgis.utils.unloadPlugin("mapclip")
    assert iface.menu == [] and iface.docks == []
    print("LOADED", type(plugin).__module__)
""")


def test_package_zip_installs_and_loads_in_qgis(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "build.py"), "package"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    version = next(l.split("=", 1)[1].strip()
                   for l in (ROOT / "mapclip" / "metadata.txt").read_text().splitlines()
                   if l.startswith("version="))
    zpath = ROOT / "dist" / f"mapclip-{version}.zip"
    assert zpath.is_file()
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
        assert all(n.startswith("mapclip/") for n in names)
        for needed in ("mapclip/__init__.py", "mapclip/metadata.txt", "mapclip/plugin/main.py",
                       "mapclip/plugin/dock/shell.py", "mapclip/engine/model/models.py",
                       "mapclip/resources/styles/boxes.qml", "mapclip/resources/icon.svg"):
            assert needed in names, needed
        assert not any("/tests/" in n or "__pycache__" in n or "/.venv/" in n or n.endswith(".pyc")
                       for n in names)
        plugins = tmp_path / "profile" / "python" / "plugins"
        plugins.mkdir(parents=True)
        zf.extractall(plugins)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONPATH=str(plugins),
               MAPCLIP_CACHE=str(tmp_path / "cache"))
    env.setdefault("XDG_RUNTIME_DIR", str(tmp_path))
    run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(plugins / "mapclip")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "LOADED mapclip.plugin.main" in run.stdout
