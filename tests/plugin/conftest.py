"""Plugin tests run in a real QGIS: one offscreen QgsApplication for the session.

The plugin is imported as the package ``mapclip`` (the repository's mapclip/
folder, laid out as QGIS installs it); the engine is ``mapclip.engine`` here as
in the CLI's and the engine tests' imports.
:class:`IfaceStub` stands in for QGIS's ``iface``: its main window, map canvas
and message bar are real widgets, and everything a plugin adds through it
(docks, toolbar icons, toolbars, menu entries) is tracked, so tests can assert
that ``unload()`` leaves nothing behind.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="runtime-mapclip-"))

ROOT = Path(__file__).resolve().parents[2]

from qgis.core import QgsApplication  # noqa: E402

_APP = QgsApplication.instance()
if _APP is None:
    from qgis.PyQt.QtCore import QSettings
    _PROFILE = tempfile.mkdtemp(prefix="mapclip-qgis-profile-")
    # settings go to the temporary profile, never to the user's QGIS settings
    QSettings.setDefaultFormat(QSettings.IniFormat)
    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, _PROFILE)
    QgsApplication.setOrganizationName("MapCLIPTests")
    QgsApplication.setApplicationName("MapCLIPTests")
    _APP = QgsApplication([], True, _PROFILE)
    _APP.initQgis()


def _import_mapclip():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import mapclip
    assert Path(mapclip.__file__).resolve().parent == ROOT / "mapclip", mapclip.__file__
    return mapclip


_import_mapclip()

from qgis.core import QgsProject  # noqa: E402
from qgis.gui import QgsMapCanvas, QgsMessageBar  # noqa: E402
from qgis.PyQt.QtCore import QCoreApplication, QEvent  # noqa: E402
from qgis.PyQt.QtWidgets import QMainWindow, QToolBar  # noqa: E402


@pytest.fixture(scope="session")
def qgis_app():
    """The session's QgsApplication (offscreen, initialised)."""
    return _APP


@pytest.fixture(scope="session")
def qapp(qgis_app):
    """pytest-qt's application is QGIS's."""
    return qgis_app


@pytest.fixture(scope="session")
def mapclip():
    """The plugin package ``mapclip``."""
    return _import_mapclip()


def process_deletes() -> None:
    """Run deleteLater()s and queued events now."""
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    QCoreApplication.processEvents()


class IfaceStub:
    """A QGIS interface with real widgets that records what a plugin adds."""

    def __init__(self):
        self.main_window = QMainWindow()
        self.canvas = QgsMapCanvas(self.main_window)
        self.canvas.resize(600, 400)
        self.main_window.setCentralWidget(self.canvas)
        self.bar = QgsMessageBar(self.main_window)
        self.docks = []
        self.toolbar_icons = []
        self.toolbars = []
        self.menus = {}          # (menu kind, menu name) -> [actions]
        self.plugin_toolbar = QToolBar("Plugins", self.main_window)
        self.main_window.addToolBar(self.plugin_toolbar)
        self._active = None

    # -- what plugins call -----------------------------------------------
    def mainWindow(self):  # noqa: N802
        return self.main_window

    def mapCanvas(self):  # noqa: N802
        return self.canvas

    def messageBar(self):  # noqa: N802
        return self.bar

    def activeLayer(self):  # noqa: N802
        return self._active

    def setActiveLayer(self, layer):  # noqa: N802
        self._active = layer

    def addDockWidget(self, area, dock):  # noqa: N802
        self.main_window.addDockWidget(area, dock)
        self.docks.append(dock)

    def removeDockWidget(self, dock):  # noqa: N802
        self.main_window.removeDockWidget(dock)
        if dock in self.docks:
            self.docks.remove(dock)

    def addToolBarIcon(self, action):  # noqa: N802
        self.plugin_toolbar.addAction(action)
        self.toolbar_icons.append(action)

    def removeToolBarIcon(self, action):  # noqa: N802
        self.plugin_toolbar.removeAction(action)
        if action in self.toolbar_icons:
            self.toolbar_icons.remove(action)

    def addToolBar(self, name):  # noqa: N802
        toolbar = QToolBar(name, self.main_window)
        self.main_window.addToolBar(toolbar)
        self.toolbars.append(toolbar)
        return toolbar

    def _add_menu(self, kind, name, action):
        self.menus.setdefault((kind, name), []).append(action)

    def _remove_menu(self, kind, name, action):
        actions = self.menus.get((kind, name), [])
        if action in actions:
            actions.remove(action)
        if not actions:
            self.menus.pop((kind, name), None)

    def addPluginToMenu(self, name, action):  # noqa: N802
        self._add_menu("plugins", name, action)

    def removePluginMenu(self, name, action):  # noqa: N802
        self._remove_menu("plugins", name, action)

    def addPluginToRasterMenu(self, name, action):  # noqa: N802
        self._add_menu("raster", name, action)

    def removePluginRasterMenu(self, name, action):  # noqa: N802
        self._remove_menu("raster", name, action)

    # -- what tests look at ------------------------------------------------
    def live_toolbars(self):
        from qgis.PyQt import sip
        return [t for t in self.toolbars if not sip.isdeleted(t)]

    def bar_texts(self):
        """Title and text of every message-bar item (newest last)."""
        out = []
        for item in self.bar.items():
            out.append(f"{item.title()} {item.text()}".strip())
        return out

    def close(self):
        self.bar.clearWidgets()
        self.canvas.setLayers([])
        self.main_window.close()
        self.main_window.deleteLater()
        process_deletes()


@pytest.fixture
def iface(qgis_app):
    stub = IfaceStub()
    yield stub
    stub.close()


@pytest.fixture
def clean_project(qgis_app):
    """An empty project before and after the test."""
    QgsProject.instance().clear()
    yield QgsProject.instance()
    QgsProject.instance().clear()


@pytest.fixture
def qgis_settings(qgis_app):
    """MapCLIP's settings group emptied before and after the test."""
    from qgis.core import QgsSettings
    QgsSettings().remove("mapclip")
    yield QgsSettings()
    QgsSettings().remove("mapclip")


def make_geotiff(path, width=256, height=256, origin=(500000.0, 4000000.0), gsd=1.0,
                 epsg=32633, squares=((96, 64, 32, "red"),)):
    """A grey RGB GeoTIFF with coloured squares (col, row, size, colour); returns path.

    Red and blue squares are what tests.rigged.rigged_model() responds to.
    """
    import numpy as np
    from osgeo import gdal, osr
    rgb = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    # grey with a little unsaturated texture (a uniform tile counts as empty)
    grey = np.random.default_rng(0).integers(118, 139, size=(height, width), dtype=np.uint8)
    arr = np.repeat(grey[None], 3, axis=0)
    for col, row, size, colour in squares:
        for b, v in enumerate(rgb[colour]):
            arr[b, row:row + size, col:col + size] = v
    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 3, gdal.GDT_Byte,
                                              ["TILED=YES", "PHOTOMETRIC=RGB"])
    ds.SetGeoTransform((origin[0], gsd, 0.0, origin[1], 0.0, -gsd))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    ds.SetProjection(srs.ExportToWkt())
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(arr[b])
    ds.FlushCache()
    ds = None
    return str(path)


WEB_MERCATOR_HALF = 20037508.342789244


def make_xyz_tiles(folder, z=16, x=35000, y=22000, squares=((64, 96, 40, "red"),)):
    """One 256 px XYZ tile (grey, coloured squares at col, row, size) under folder/z/x/y.png.

    Returns (the QGIS "wms" provider URI of a file:// XYZ source, the tile's
    extent in EPSG:3857): a basemap QGIS treats as non-file, without network.
    """
    import os
    from qgis.core import QgsRectangle
    from qgis.PyQt.QtGui import QColor, QImage, QPainter
    rgb = {"red": QColor(255, 0, 0), "blue": QColor(0, 0, 255)}
    os.makedirs(os.path.join(folder, str(z), str(x)), exist_ok=True)
    img = QImage(256, 256, QImage.Format_RGB32)
    img.fill(QColor(128, 128, 128))
    painter = QPainter(img)
    for col, row, size, colour in squares:
        painter.fillRect(col, row, size, size, rgb[colour])
    painter.end()
    img.save(os.path.join(folder, str(z), str(x), f"{y}.png"))
    url = "file://" + os.path.abspath(folder) + "/{z}/{x}/{y}.png"
    size = 2 * WEB_MERCATOR_HALF / 2 ** z
    xmin, ymax = -WEB_MERCATOR_HALF + x * size, WEB_MERCATOR_HALF - y * size
    return f"type=xyz&url={url}&zmin={z}&zmax={z}", QgsRectangle(xmin, ymax - size, xmin + size, ymax)


@pytest.fixture
def near_duplicate_folders(tmp_path):
    """train/: a, a copy of a, b; test/: a copy of b (for de-duplication runs)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(1)
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    a = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    b = (np.add.outer(np.arange(48), np.arange(48))[..., None] * [2, 1, 3] % 255).astype(np.uint8)
    Image.fromarray(a).save(train / "a.png")
    Image.fromarray(a).save(train / "a_copy.png")
    Image.fromarray(b).save(train / "b.png")
    Image.fromarray(b).save(test / "b_test.png")
    return train, test


# ------------------------------------------------------------------ Processing --
QGIS_PLUGINS = "/usr/share/qgis/python/plugins"


@pytest.fixture(scope="session")
def _processing(qgis_app, mapclip):
    """Processing initialised once (conftest gives QGIS and the package ``mapclip``)."""
    if QGIS_PLUGINS not in sys.path:
        sys.path.append(QGIS_PLUGINS)
    from processing.core.Processing import Processing
    Processing.initialize()
    return True


@pytest.fixture
def provider(_processing):
    """The MapCLIP provider, registered for one test and removed after it (plugin tests
    check that the plugin's unload leaves no provider behind)."""
    from qgis.core import QgsApplication
    from mapclip.plugin.processing import add_provider, remove_provider
    existing = QgsApplication.processingRegistry().providerById("mapclip")
    if existing is not None:
        yield existing
        return
    added = add_provider()
    yield added
    remove_provider(added)
