#!/usr/bin/env python3
"""Render the MapCLIP dock beside a map canvas after a real search, to a PNG.

    .venv/bin/python scripts/screenshot.py [--out resources/screenshot.png]
        [--model demo] [--prompt "storage tanks"] [--size 1024] [--seed 3]
        [--tile 64] [--top-k 10] [--threshold 0.3]

It draws a synthetic scene (engine.synthetic), opens it in a map canvas, runs
the search through the dock and its QgsTask exactly as a user would (model,
prompt, whole layer, boxes), shows the resulting layer over the scene, and
grabs the window offscreen (QWidget.grab). With no demo model in
resources/models/demo it falls back to the tiny test model (the boxes are
then not meaningful, the picture of the UI is).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="runtime-mapclip-"))


def import_plugin_package():
    """Import the repository as package ``mapclip`` (as QGIS does), whatever its folder name."""
    if "mapclip" not in sys.modules:
        holder = Path(tempfile.mkdtemp(prefix="mapclip-pkg-"))
        os.symlink(ROOT, holder / "mapclip")
        sys.path.insert(0, str(holder))
    import mapclip
    return mapclip


def wait(app, predicate, timeout: float = 600.0) -> bool:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            return False
        app.processEvents()
        time.sleep(0.01)
    return True


def fill_extent(ext, width: int, height: int):
    """The centred part of ``ext`` with the canvas's aspect ratio (no blank bands)."""
    from qgis.core import QgsRectangle
    if width <= 0 or height <= 0:
        return ext
    want = width / height
    if ext.width() / ext.height() > want:
        w = ext.height() * want
        x0 = ext.center().x() - w / 2
        return QgsRectangle(x0, ext.yMinimum(), x0 + w, ext.yMaximum())
    h = ext.width() / want
    y0 = ext.center().y() - h / 2
    return QgsRectangle(ext.xMinimum(), y0, ext.xMaximum(), y0 + h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "resources" / "screenshot.png"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompt", default="storage tanks")
    ap.add_argument("--size", type=int, default=1024, help="scene size in pixels")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--tile", type=int, default=64, help="tile size in pixels (dock: Advanced)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.3,
                    help="minimum score of a box (test-tiny: ignored)")
    args = ap.parse_args(argv)

    from qgis.core import QgsApplication
    profile = tempfile.mkdtemp(prefix="mapclip-shot-profile-")
    app = QgsApplication([], True, profile)
    app.initQgis()
    import_plugin_package()

    from qgis.core import QgsProject, QgsRasterLayer
    from qgis.gui import QgsMapCanvas, QgsMessageBar
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtWidgets import QMainWindow

    from mapclip.engine.models import PRESETS, preset_available
    from mapclip.engine.synthetic import make_scene
    from mapclip.plugin.dock import MapClipDock

    model = args.model
    if model in PRESETS and not preset_available(PRESETS[model]):
        print(f"[screenshot] model {model} is not available here; using test-tiny", file=sys.stderr)
        model = "test-tiny"

    work = Path(tempfile.mkdtemp(prefix="mapclip-shot-"))
    scene = work / "scene.tif"
    make_scene(str(scene), args.size, seed=args.seed, mask_path=None, coco_path=None)

    class Iface:
        def __init__(self, window, canvas):
            self.window, self.canvas = window, canvas
            self.bar = QgsMessageBar()

        def mainWindow(self):  # noqa: N802
            return self.window

        def mapCanvas(self):  # noqa: N802
            return self.canvas

        def messageBar(self):  # noqa: N802
            return self.bar

    window = QMainWindow()
    window.setWindowTitle("MapCLIP")
    canvas = QgsMapCanvas(window)
    canvas.setCanvasColor(Qt.white)
    window.setCentralWidget(canvas)
    iface = Iface(window, canvas)

    raster = QgsRasterLayer(str(scene), "synthetic scene", "gdal")
    QgsProject.instance().addMapLayer(raster)
    canvas.setDestinationCrs(raster.crs())
    canvas.setLayers([raster])
    canvas.setExtent(raster.extent())

    dock = MapClipDock(iface, window)
    window.addDockWidget(Qt.RightDockWidgetArea, dock)
    window.resize(1320, 820)
    window.show()
    dock.layer_combo.setLayer(raster)
    dock.select_model(model)
    dock.prompt_combo.setEditText(args.prompt)
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("boxes"))
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
    dock.tile_spin.setValue(args.tile)
    dock.topk_spin.setValue(args.top_k)
    if model != "test-tiny":
        dock.threshold_spin.setValue(args.threshold)

    outcomes = []
    dock.run_finished.connect(outcomes.append)
    if not dock.run():
        print("[screenshot] the search did not start", file=sys.stderr)
        return 1
    if not wait(app, lambda: bool(outcomes)) or outcomes[0] != "done":
        print(f"[screenshot] the search ended with {outcomes}: {dock.status_label.text()}",
              file=sys.stderr)
        return 1

    canvas.setLayers(list(dock.last_layers) + [raster])
    canvas.setExtent(fill_extent(raster.extent(), canvas.width(), canvas.height()))
    drawn = []
    canvas.mapCanvasRefreshed.connect(lambda: drawn.append(True))
    canvas.refresh()
    wait(app, lambda: bool(drawn) and not canvas.isDrawing(), timeout=120)
    app.processEvents()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(out)):
        print(f"[screenshot] could not write {out}", file=sys.stderr)
        return 1
    print(f"[screenshot] wrote {out} ({model}, '{args.prompt}', "
          f"{len(dock.last_result.boxes)} boxes)")
    dock.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
