"""Drives the real QGIS desktop as a user would; run by `qgis --code drive_qgis.py SCENE.tif`.

tests/desktop/test_desktop.py starts QGIS on a virtual screen with MapCLIP
installed from its zip into a fresh profile, and this script inside it. It
finds widgets by the labels a user reads ("Model", "Prompts", "Run", ...),
clicks them, waits for the jobs, and records what it saw in
``$MAPCLIP_E2E_OUT/results.json`` (one entry per step: ok, details, error),
every message QGIS logged, and screenshots. Then it quits QGIS. The test
asserts on the results; this script asserts nothing itself, so one failing
step does not hide the others.
"""
import faulthandler
import json
import os
import shutil
import sys
import time
import traceback

OUT = os.environ["MAPCLIP_E2E_OUT"]
DATA = os.environ["MAPCLIP_E2E_DATA"]
_fault = open(os.path.join(OUT, "faulthandler.log"), "w")  # noqa: SIM115 (kept open for a crash)
faulthandler.enable(_fault, all_threads=True)

from qgis.core import (Qgis, QgsApplication, QgsMessageLog, QgsProject,  # noqa: E402
                       QgsRasterLayer, QgsVectorLayer)
from qgis.PyQt.QtCore import QPoint, Qt, QTimer  # noqa: E402
from qgis.PyQt.QtGui import QMouseEvent  # noqa: E402
from qgis.PyQt.QtCore import QEvent  # noqa: E402
from qgis.PyQt.QtWidgets import (QAbstractButton, QComboBox, QDoubleSpinBox,  # noqa: E402
                                 QFormLayout, QLabel, QLineEdit, QPlainTextEdit, QSpinBox,
                                 QTabWidget, QTextEdit)
from qgis.utils import iface  # noqa: E402

RESULTS = {"steps": {}, "log": [], "order": []}
APP = QgsApplication.instance()


def on_message(message, tag, level):
    RESULTS["log"].append([tag, int(level), message])


QgsApplication.messageLog().messageReceived.connect(on_message)


def save():
    with open(os.path.join(OUT, "results.json.part"), "w") as fh:
        json.dump(RESULTS, fh, indent=1, default=str)
    os.replace(os.path.join(OUT, "results.json.part"), os.path.join(OUT, "results.json"))


def pump(seconds=0.05):
    end = time.time() + seconds
    while time.time() < end:
        APP.processEvents()
        time.sleep(0.01)


def wait(predicate, timeout=180.0):
    end = time.time() + timeout
    while time.time() < end:
        APP.processEvents()
        if predicate():
            return True
        time.sleep(0.02)
    return False


def step(name):
    """Run the decorated function as one recorded step."""
    def deco(fn):
        RESULTS["order"].append(name)
        t0 = time.time()
        entry = {"ok": False}
        try:
            entry.update(fn() or {})
            entry["ok"] = True
        except Exception as exc:  # recorded, not raised: the next steps still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        entry["seconds"] = round(time.time() - t0, 2)
        RESULTS["steps"][name] = entry
        save()
        return fn
    return deco


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# --------------------------------------------------------------------------- #
# Finding widgets the way a user does: by the text they read.
# --------------------------------------------------------------------------- #
def visible(w):
    return w is not None and w.isVisible()


def field(root, label):
    """The widget beside the form label ``label`` under ``root``."""
    for form in root.findChildren(QFormLayout):
        for row in range(form.rowCount()):
            item = form.itemAt(row, QFormLayout.LabelRole)
            widget = item.widget() if item is not None else None
            if isinstance(widget, QLabel) and widget.text().replace("&", "") == label:
                fld = form.itemAt(row, QFormLayout.FieldRole)
                if fld is None:
                    continue
                if fld.widget() is not None:
                    return fld.widget()
                lay = fld.layout()  # a row of widgets: the first one
                for i in range(lay.count()):
                    if lay.itemAt(i).widget() is not None:
                        return lay.itemAt(i).widget()
    raise LookupError(f"no field labelled {label!r}")


def button(root, text):
    for b in root.findChildren(QAbstractButton):
        if b.text().replace("&", "") == text and b.isVisible():
            return b
    raise LookupError(f"no visible button {text!r}")


def set_value(widget, value):
    from qgis.gui import QgsFileWidget
    if isinstance(widget, QgsFileWidget):
        widget.setFilePath(str(value))
    elif isinstance(widget, QComboBox):
        idx = widget.findText(str(value))
        if idx < 0 and widget.isEditable():
            widget.setEditText(str(value))
        else:
            check(idx >= 0, f"{value!r} is not offered in the list")
            widget.setCurrentIndex(idx)
    elif isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        widget.setValue(value)
    elif isinstance(widget, QLineEdit):
        widget.setText(str(value))
    elif isinstance(widget, (QPlainTextEdit, QTextEdit)):
        widget.setPlainText(str(value))
    else:
        raise TypeError(f"cannot type into {type(widget).__name__}")


def fill(root, values):
    for label, value in values.items():
        set_value(field(root, label), value)


def click(b):
    check(b.isEnabled(), f"button {b.text()!r} is disabled")
    b.click()
    pump(0.05)


def tab(tabs: QTabWidget, text):
    for i in range(tabs.count()):
        if tabs.tabText(i).replace("&", "") == text:
            tabs.setCurrentIndex(i)
            pump(0.05)
            return
    raise LookupError(f"no tab {text!r}")


def screenshot(name):
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    wait(lambda: not canvas.isDrawing(), 30)
    pump(0.3)
    path = os.path.join(OUT, name)
    iface.mainWindow().grab().save(path)
    return path


def menu_action(text):
    for a in iface.mainWindow().findChildren(type(iface.actionPan())):
        if a.text().replace("&", "") == text:
            return a
    raise LookupError(f"no menu entry {text!r}")


def layers_named(part):
    return [l for l in QgsProject.instance().mapLayers().values() if part in l.name()]


def python_errors():
    """Python errors QGIS reported, and tracebacks anywhere in its log (a user's
    mistake is reported in words, without one)."""
    return [m for m in RESULTS["log"] if m[0] in ("Python error", "Python warning")
            or "Traceback" in m[2]]


# --------------------------------------------------------------------------- #
# The session.
# --------------------------------------------------------------------------- #
def quit_qgis():
    RESULTS["python_errors"] = python_errors()
    save()
    QgsProject.instance().clear()
    QgsProject.instance().setDirty(False)
    QTimer.singleShot(200, iface.actionExit().trigger)


# a hard stop, whatever happens below (the test waits for QGIS to exit)
QTimer.singleShot(int(os.environ.get("MAPCLIP_E2E_WATCHDOG", "840")) * 1000, lambda: os._exit(3))


def session():
    SCENE = sys.argv[-1] if sys.argv and sys.argv[-1].endswith(".tif") else os.path.join(DATA, "scene.tif")
    STATE = {}


    @step("start")
    def _start():
        from qgis import utils
        scene = [l for l in QgsProject.instance().mapLayers().values() if isinstance(l, QgsRasterLayer)]
        if not scene:
            layer = iface.addRasterLayer(SCENE, "scene")
            scene = [layer]
        STATE["scene"] = scene[0]
        iface.mapCanvas().setExtent(scene[0].extent())
        check("mapclip" in utils.plugins, f"MapCLIP is not loaded; loaded: {sorted(utils.plugins)}")
        deps = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "mapclip-deps")
        return {"plugins": sorted(utils.plugins), "deps_dir": deps,
                "deps_index": sys.path.index(deps) if deps in sys.path else -1,
                "sys_path_head": sys.path[:6], "triton_blocked": sys.modules.get("triton", 0) is None,
                "profile": QgsApplication.qgisSettingsDirPath(), "sys_executable": sys.executable,
                "first_python_on_path": shutil.which("python3")}


    def dock():
        from qgis import utils
        return utils.plugins["mapclip"].dock


    @step("open_dock")
    def _open_dock():
        actions = [a for a in iface.mainWindow().findChildren(type(iface.actionPan()))
                   if a.objectName() == "mapclip_mapclipsearch"]
        check(actions, "no MapCLIP search action in the toolbar")
        actions[0].trigger()
        check(wait(lambda: visible(dock()), 10), "the dock did not open")
        d = dock()
        d.run_finished.connect(lambda outcome: STATE.setdefault("outcomes", []).append(outcome))
        return {"title": d.windowTitle(), "banner_visible": d.deps_banner.isVisible()}


    def run_search(values, expect="done", timeout=240):
        d = dock()
        tab(d.tabs, "Search")
        fill(d, values)
        before = set(QgsProject.instance().mapLayers())
        STATE["outcomes"] = []
        click(button(d, "Run"))
        check(wait(lambda: STATE["outcomes"], timeout), f"no outcome within {timeout} s "
              f"(status: {d.status_label.text()})")
        outcome = STATE["outcomes"][-1]
        added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
        info = {"outcome": outcome, "status": d.status_label.text(),
                "added": [l.name() for l in added]}
        check(outcome == expect, f"outcome {outcome}, expected {expect}: {info}")
        return info, added


    def layer_boxes(layer):
        """(rank, score, xmin, ymin, xmax, ymax) of a result layer's features, best first."""
        rows = []
        for f in layer.getFeatures():
            bb = f.geometry().boundingBox()
            names = f.fields().names()
            rows.append([int(f["rank"]) if "rank" in names else 0,
                         float(f["score"]) if "score" in names else 0.0,
                         bb.xMinimum(), bb.yMinimum(), bb.xMaximum(), bb.yMaximum()])
        return sorted(rows, key=lambda r: (r[0], -r[1]))


    def request_options():
        req = dock().last_request
        o = req.options
        return {k: getattr(o, k, None) for k in ("mode", "tile_px", "window", "top_k", "threshold",
                                                  "batch_size")}


    @step("search_boxes")
    def _boxes():
        # the scene's 1,764 tiles make "auto" read with reader processes on a machine of 2 or
        # more cores: seen here, inside QGIS (its own program is not a Python interpreter)
        from mapclip.engine.raster import workers as W
        started = []
        real_init = W.ProcessTileBatches.__init__

        def spy(self, *a, **k):
            started.append(a[3] if len(a) > 3 else k.get("workers"))
            return real_init(self, *a, **k)
        W.ProcessTileBatches.__init__ = spy
        try:
            info, added = run_search({"Model": "demo", "Prompts": "storage tanks", "Mode": "Boxes",
                                      "Area": "Whole layer"})
        finally:
            W.ProcessTileBatches.__init__ = real_init
        import multiprocessing
        info["reader_processes"] = started
        info["children_left"] = [c.name for c in multiprocessing.active_children()]
        if (os.cpu_count() or 1) >= 2:
            check(started and all(n >= 1 for n in started),
                  f"the search did not read with reader processes: {started}")
        check(not any(n.startswith("mapclip-reader") for n in info["children_left"]),
              f"reader processes left behind: {info['children_left']}")
        boxes = [l for l in added if isinstance(l, QgsVectorLayer)]
        check(len(boxes) == 1, f"one boxes layer expected, got {info['added']}")
        layer = boxes[0]
        renderer = layer.renderer().type() if layer.renderer() else None
        info.update(features=layer.featureCount(), renderer=renderer, request=request_options(),
                    fields=[f.name() for f in layer.fields()], crs=layer.crs().authid(),
                    results_rows=dock().results.topLevelItemCount(), boxes=layer_boxes(layer))
        check(layer.featureCount() >= 1, "no boxes")
        check(renderer == "graduatedSymbol", f"boxes are not styled by score ({renderer})")
        info["screenshot"] = screenshot("desktop-boxes.png")
        result = dock().last_result
        info.update(cache=result.cache, engine_seconds=round(result.seconds, 3))
        STATE["first_engine_seconds"] = info["engine_seconds"]
        check(result.cache == "computed", f"the first search was not kept for later prompts: {info}")
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda_build"] = torch.version.cuda
        info["torch_file"] = torch.__file__
        with open("/proc/self/maps") as fh:
            info["libllvm_loaded"] = sorted({line.split()[-1] for line in fh if "libLLVM" in line})
        info["triton_blocked"] = sys.modules.get("triton", 0) is None
        return info


    @step("describe")
    def _describe():
        """Describe the best box of the search above with the demo captioning model: the
        caption shows in the dock and lands in the box layer's caption field."""
        d = dock()
        tab(d.tabs, "Search")
        check(d.results.topLevelItemCount() >= 1, "no result row to describe")
        item = d.results.topLevelItem(0)
        d.results.setCurrentItem(item)
        layer = next(lyr for lyr in QgsProject.instance().mapLayers().values()
                     if isinstance(lyr, QgsVectorLayer) and lyr.name() == "storage tanks")
        fill(d, {"Model": "demo-captioner"})
        STATE["outcomes"] = []
        click(button(d, "Describe"))
        check(wait(lambda: STATE["outcomes"], 180), f"no outcome (status: {d.status_label.text()})")
        text = d.caption_view.text()
        rank = int(item.text(0))
        stored = [f["caption"] for f in layer.getFeatures() if int(f["rank"]) == rank]
        info = {"outcome": STATE["outcomes"][-1], "caption": text, "status": d.status_label.text(),
                "row_caption": item.text(3), "layer_caption": stored}
        fill(d, {"Model": "demo"})
        check(info["outcome"] == "done" and text, f"no caption: {info}")
        check(stored == [text] and item.text(3) == text, f"the caption is not in the row/layer: {info}")
        return info


    @step("second_prompt")
    def _second_prompt():
        """Another prompt on the same area: answered from the embeddings the first search
        kept (no pass over the raster), boxes on the map in a fraction of the first's time."""
        t0 = time.perf_counter()
        info, added = run_search({"Mode": "Boxes", "Prompts": "ships"})
        info["seconds_to_boxes"] = round(time.perf_counter() - t0, 3)
        result = dock().last_result
        info.update(from_cache=result.from_cache, cache=result.cache,
                    engine_seconds=round(result.seconds, 3), boxes=len(result.boxes),
                    first_engine_seconds=STATE.get("first_engine_seconds"))
        ships = [l for l in added if isinstance(l, QgsVectorLayer) and l.name() == "ships"]
        if ships:
            info["ship_boxes"] = layer_boxes(ships[0])
            info["crs"] = ships[0].crs().authid()
        check(result.from_cache and "from the kept embeddings" in info["status"],
              f"the second prompt made another pass: {info}")
        check(any(isinstance(l, QgsVectorLayer) and l.name() == "ships" for l in added),
              f"no ships layer: {info}")
        info["screenshot"] = screenshot("desktop-second-prompt.png")
        return info


    @step("mark_examples")
    def _mark_examples():
        """Mark two results of the ships search ("Yes, like this" on the best box, "Not this"
        on the last): each mark refreshes the ranking from the kept embeddings."""
        from mapclip.plugin import marks
        from mapclip.plugin.dock.widgets import ROLE_BOUNDS
        d = dock()
        tab(d.tabs, "Search")

        def rows():
            return [[d.results.topLevelItem(i).text(1), float(d.results.topLevelItem(i).text(2)),
                     *d.results.topLevelItem(i).data(0, ROLE_BOUNDS)]
                    for i in range(d.results.topLevelItemCount())]

        info = {"before": rows(), "refreshes": []}
        check(len(info["before"]) >= 2, f"too few results to mark: {info}")
        for positive, row in ((True, 0), (False, d.results.topLevelItemCount() - 1)):
            item = d.results.topLevelItem(row)
            info["refreshes"].append({"positive": positive, "marked": item.data(0, ROLE_BOUNDS)})
            STATE["outcomes"] = []
            t0 = time.perf_counter()
            check(d.mark_item(item, positive), f"the mark did not refresh the search: {d.status_label.text()}")
            check(wait(lambda: STATE["outcomes"], 120), "no outcome after the mark")
            info["refreshes"][-1].update(outcome=STATE["outcomes"][-1], rows=rows(),
                                         seconds=round(time.perf_counter() - t0, 3),
                                         from_cache=d.last_result.from_cache,
                                         status=d.status_label.text())
        layer = marks.examples_layer(create=False)
        info["marks"] = marks.counts(layer)
        info["examples_layer"] = layer.name() if layer else None
        info["screenshot"] = screenshot("desktop-marks.png")
        d.examples_check.setChecked(False)        # the later steps search without the marks
        check(all(r["outcome"] == "done" and r["from_cache"] for r in info["refreshes"]),
              f"a refresh failed or read the raster again: {info}")
        return info


    @step("search_heatmap")
    def _heatmap():
        info, added = run_search({"Mode": "Heatmap (and boxes)", "Prompts": "storage tanks"})
        info["from_cache"] = dock().last_result.from_cache   # a mode switch: the same pass
        check(info["from_cache"], f"the heatmap made another pass: {info}")
        heat = [l for l in added if isinstance(l, QgsRasterLayer)]
        check(len(heat) == 1, f"one heatmap layer expected: {info['added']}")
        info["heatmap_renderer"] = heat[0].renderer().type()
        info["heatmap_valid"] = heat[0].isValid()
        check(heat[0].isValid() and heat[0].renderer().type() == "singlebandpseudocolor",
              "the heatmap is not a styled raster")
        return info


    @step("count")
    def _count():
        info, added = run_search({"Mode": "Count", "Prompts": "storage tanks"})
        check(len(added) == 1, f"one count layer expected: {info['added']}")
        layer = added[0]
        from qgis.core import QgsRenderContext
        sym = layer.renderer().symbols(QgsRenderContext()) if layer.renderer() else []
        fills = [s.color().alpha() for s in sym]
        result = dock().last_result
        info.update(layer=layer.name(), features=layer.featureCount(),
                    renderer=layer.renderer().type(), fill_alpha=fills,
                    labels=bool(layer.labelsEnabled()),
                    counts={m: getattr(result, m).count for m in ("prompt", "dense")
                            if getattr(result, m, None) is not None},
                    count_boxes=layer_boxes(layer))
        check(all(a < 255 for a in fills), f"the count layer hides the map (fill alpha {fills})")
        info["screenshot"] = screenshot("desktop-count.png")
        return info


    @step("land_cover")
    def _classes():
        info, added = run_search({"Mode": "Classes (land-cover map)",
                                  "Prompts": "water; forest; farmland; urban; bare ground"})
        check(len(added) == 1 and isinstance(added[0], QgsRasterLayer), f"one class map: {info}")
        layer = added[0]
        info["renderer"] = layer.renderer().type()
        info["legend"] = [c.label for c in layer.renderer().classes()] \
            if hasattr(layer.renderer(), "classes") else []
        check(info["renderer"] == "paletted" and "water" in info["legend"],
              f"the class map has no class legend: {info}")
        info["screenshot"] = screenshot("desktop-classes.png")
        QgsProject.instance().removeMapLayer(layer)
        return info

    @step("cancel")
    def _cancel():
        d = dock()
        tab(d.tabs, "Search")
        fill(d, {"Mode": "Boxes", "Prompts": "airplanes; ships; storage tanks"})
        d.advanced.setCollapsed(False)
        fill(d, {"Tile size": 16, "Window": 1})
        before = set(QgsProject.instance().mapLayers())
        STATE["outcomes"] = []
        click(button(d, "Run"))
        check(wait(lambda: d.task is not None and d.task.done_units > 0, 120), "the search did not start")
        click(button(d, "Cancel"))
        check(wait(lambda: STATE["outcomes"], 60), "cancel did not finish the run")
        added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
        info = {"outcome": STATE["outcomes"][-1], "status": d.status_label.text(), "added": len(added),
                "added_names": [l.name() for l in added]}
        # what was found before the click may stay, as one layer named partial; nothing else
        check(info["outcome"] == "cancelled" and len(added) <= 1
              and all("partial" in l.name() for l in added), f"cancel left {info}")
        for layer in added:
            QgsProject.instance().removeMapLayer(layer)
        click(button(d, "Defaults for this model"))
        info["tile_after_reset"] = d.tile_spin.value()
        d.advanced.setCollapsed(True)
        return info


    @step("try_the_demo")
    def _try_demo():
        d = dock()
        menu_action("Try the demo").trigger()
        check(wait(lambda: layers_named("MapCLIP demo scene"), 120), "no demo scene was added")
        check(d.current_model() == "demo" and d.prompt_combo.currentText() == "storage tanks",
              "the dock is not set up for the demo")
        info, added = run_search({})
        boxes = [l for l in added if isinstance(l, QgsVectorLayer)]
        check(boxes and boxes[0].featureCount() >= 1, f"the demo found nothing: {info}")
        info["features"] = boxes[0].featureCount()
        for layer in layers_named("MapCLIP demo scene"):
            QgsProject.instance().removeMapLayer(layer)
        d.layer_combo.setLayer(STATE["scene"])
        return info

    @step("error_empty_prompt")
    def _empty_prompt():
        d = dock()
        fill(d, {"Prompts": ""})
        bar = iface.messageBar()
        n = len(RESULTS["log"])
        click(button(d, "Run"))
        pump(0.3)
        said = [m[2] for m in RESULTS["log"][n:]]
        check(d.task is None, "a task started without a prompt")
        check(any("type what to look for" in m for m in said), f"no clear message: {said}")
        bar.clearWidgets()
        return {"messages": said}


    @step("error_bad_bands")
    def _bad_bands():
        d = dock()
        d.advanced.setCollapsed(False)
        fill(d, {"Bands": "7,8,9"})
        try:
            info, _ = run_search({"Prompts": "storage tanks", "Mode": "Boxes"}, expect="error")
        finally:
            fill(d, {"Bands": ""})
            d.advanced.setCollapsed(True)
        check("band 7" in info["status"] and "Traceback" not in info["status"],
              f"unclear error: {info['status']}")
        iface.messageBar().clearWidgets()
        return info


    @step("error_missing_checkpoint")
    def _missing_model():
        d = dock()
        spec = os.path.join(DATA, "no-such-model", "RemoteCLIP-ViT-B-32.pt")
        d.add_model(f"ViT-B-32-quickgelu:{spec}", "missing checkpoint")
        try:
            info, _ = run_search({"Prompts": "storage tanks"}, expect="error")
        finally:
            d.remove_current_model()
            d.select_model("demo")
        check("does not exist" in info["status"], f"unclear error: {info['status']}")
        iface.messageBar().clearWidgets()
        return info


    def archive_job(click_what, timeout=240):
        d = dock()
        STATE["outcomes"] = []
        before = set(QgsProject.instance().mapLayers())
        click_what()
        check(wait(lambda: STATE["outcomes"], timeout), f"archive job did not finish: "
              f"{d.archive_status.text()}")
        added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
        return {"outcome": STATE["outcomes"][-1], "archive_status": d.archive_status.text(),
                "search_status": d.status_label.text(), "added": [l.name() for l in added]}


    @step("archive_build")
    def _archive_build():
        d = dock()
        tab(d.tabs, "Archive")
        fill(d, {"Index": os.path.join(OUT, "index"), "Sources": os.path.join(DATA, "archive")})
        info = archive_job(lambda: click(button(d, "Build index")))
        check(info["outcome"] == "done", f"index build: {info}")
        check(os.path.isfile(os.path.join(OUT, "index", "manifest.json")), "no manifest.json written")
        return info


    @step("archive_search_button")
    def _archive_search():
        d = dock()
        tab(d.tabs, "Archive")
        fill(d, {"Query": "storage tanks"})
        search_status_before = d.status_label.text()
        info = archive_job(lambda: click(button(d, "Search")))
        check(info["outcome"] == "done" and info["added"], f"search: {info}")
        check(d.status_label.text() == search_status_before,
              "the archive job wrote into the Search tab's status line")
        info["hits"] = d.archive_results.topLevelItemCount()
        layers = [l for l in QgsProject.instance().mapLayers().values()
                  if isinstance(l, QgsVectorLayer) and l.name() in info["added"]]
        if layers:
            feats = sorted(layers[0].getFeatures(), key=lambda f: -float(f["score"]))
            info["hit_rows"] = [{"source": str(f["source"]) if "source" in f.fields().names() else "",
                                 "score": float(f["score"]),
                                 "bounds": [f.geometry().boundingBox().xMinimum(),
                                            f.geometry().boundingBox().yMinimum(),
                                            f.geometry().boundingBox().xMaximum(),
                                            f.geometry().boundingBox().yMaximum()]}
                                for f in feats]
            info["hits_crs"] = layers[0].crs().authid()
        return info


    @step("archive_map_tool")
    def _archive_pick():
        d = dock()
        canvas = iface.mapCanvas()
        indexed = QgsRasterLayer(os.path.join(DATA, "archive", "s11.tif"), "indexed")
        canvas.setExtent(indexed.extent())  # a place inside an indexed raster
        canvas.refresh()
        wait(lambda: not canvas.isDrawing(), 30)
        before = canvas.extent()
        centre = QPoint(canvas.width() // 2, canvas.height() // 2)

        def pick():
            click(button(d, "More like a place…"))
            vp = canvas.viewport()
            for kind in (QEvent.MouseButtonPress, QEvent.MouseButtonRelease):
                ev = QMouseEvent(kind, centre, Qt.LeftButton, Qt.LeftButton, Qt.NoModifier)
                APP.sendEvent(vp, ev)
            pump(0.2)

        info = archive_job(pick)
        pump(0.5)
        after = canvas.extent()
        info["extent_moved"] = abs(before.center().x() - after.center().x()) + \
            abs(before.center().y() - after.center().y())
        info["tool_restored"] = canvas.mapTool() is not d.pick_tool
        check(info["outcome"] == "done" and info["added"], f"like search: {info}")
        check(info["extent_moved"] < 1e-6 * max(1.0, before.width()), "the map moved after the click")
        info["screenshot"] = screenshot("desktop-archive.png")
        return info



    @step("archive_stac")
    def _archive_stac():
        """Sources: a STAC catalogue's URL (three COGs served over loopback by the test)."""
        d = dock()
        tab(d.tabs, "Archive")
        fill(d, {"Index": os.path.join(OUT, "stac_index"), "Sources": os.environ["MAPCLIP_E2E_STAC"]})
        info = archive_job(lambda: click(button(d, "Build index")))
        check(info["outcome"] == "done", f"STAC index build: {info}")
        with open(os.path.join(OUT, "stac_index", "manifest.json")) as fh:
            info["indexed"] = [r["path"] for r in json.load(fh)["rasters"]]
        fill(d, {"Query": "storage tanks"})
        before = set(QgsProject.instance().mapLayers())
        found = archive_job(lambda: click(button(d, "Search")))
        check(found["outcome"] == "done" and found["added"], f"STAC search: {found}")
        # this search's hits layer (an earlier archive search left one of the same name)
        layer = next(QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before
                     if isinstance(QgsProject.instance().mapLayer(i), QgsVectorLayer))
        feats = sorted(layer.getFeatures(), key=lambda f: int(f["rank"]))
        info["hits"] = [{"raster": str(f["raster"]),
                         "bounds": [f.geometry().boundingBox().xMinimum(), f.geometry().boundingBox().yMinimum(),
                                    f.geometry().boundingBox().xMaximum(), f.geometry().boundingBox().yMaximum()]}
                        for f in feats]
        info["hits_crs"] = layer.crs().authid()
        QgsProject.instance().removeMapLayer(layer)
        return info



    def dialog_job(dlg, timeout=300):
        done = []
        dlg.job_finished.connect(lambda *_: done.append("done"))
        click(dlg.run_button)
        check(wait(lambda: dlg.task is not None and dlg.task.is_finished, timeout),
              f"{dlg.windowTitle()}: the job did not finish ({dlg.status.text()})")
        return {"outcome": dlg.task.outcome, "status": dlg.status.text(), "error": dlg.last_error}


    @step("dialog_convert")
    def _convert():
        from qgis import utils
        menu_action("Convert annotations…").trigger()
        dlg = utils.plugins["mapclip"].dialogs["convert"]
        check(wait(lambda: dlg.isVisible(), 10), "the convert dialog did not open")
        out = os.path.join(OUT, "captions.csv")
        fill(dlg, {"Format": "coco", "Annotations": os.path.join(DATA, "scene_boxes.json"),
                   "Images folder": DATA, "Captions file": out})
        info = dialog_job(dlg)
        check(info["outcome"] == "done" and os.path.isfile(out), f"convert: {info}")
        dlg.close()
        return info


    @step("dialog_dedup")
    def _dedup():
        from qgis import utils
        menu_action("De-duplicate images…").trigger()
        dlg = utils.plugins["mapclip"].dialogs["dedup"]
        check(wait(lambda: dlg.isVisible(), 10), "the dedup dialog did not open")
        dlg.folders.addItem(os.path.join(DATA, "dups"))
        info = dialog_job(dlg)
        info["groups"] = len(dlg.result.groups) if dlg.result is not None else None
        check(info["outcome"] == "done" and info["groups"] == 1, f"dedup: {info}")
        dlg.close()
        return info


    @step("dialog_finetune")
    def _finetune():
        from qgis import utils
        menu_action("Fine-tune a model…").trigger()
        dlg = utils.plugins["mapclip"].dialogs["finetune"]
        check(wait(lambda: dlg.isVisible(), 10), "the fine-tune dialog did not open")
        models = [dlg.model.itemText(i) for i in range(dlg.model.count())]
        fill(dlg, {"Image-caption file": os.path.join(DATA, "chips", "captions.csv"),
                   "Base model": "demo", "Epochs": 1, "Batch size": 4, "Validation fraction": 0.25,
                   "Output folder": os.path.join(OUT, "finetuned")})
        info = dialog_job(dlg, timeout=300)
        info["model_choices"] = models
        check(info["outcome"] == "done", f"finetune: {info}")
        check(not any(m.startswith("test-") for m in models), f"development models offered: {models}")
        dlg.close()
        return info


    @step("processing_toolbox")
    def _processing():
        import processing
        scene = STATE["scene"]
        out = os.path.join(OUT, "processing_boxes.gpkg")
        dlg = processing.createAlgorithmDialog("mapclip:detect", {
            "INPUT": scene.id(), "PROMPTS": "storage tanks", "MODEL": "demo", "OUTPUT": out})
        check(dlg is not None, "no dialog for mapclip:detect")
        dlg.show()
        pump(0.3)
        labels = [w.text() for w in dlg.findChildren(QLabel) if w.isVisible()]
        pump(0.3)
        finished = []
        dlg.algorithmFinished.connect(lambda ok, res: finished.append((ok, res)))
        before = set(QgsProject.instance().mapLayers())
        dlg.runAlgorithm()
        check(wait(lambda: finished, 240), "the Processing algorithm did not finish")
        ok, res = finished[-1]
        pump(0.5)
        added = [QgsProject.instance().mapLayer(i).name()
                 for i in set(QgsProject.instance().mapLayers()) - before]
        info = {"ok": bool(ok), "result_keys": sorted(res), "added": added,
                "file": os.path.isfile(out), "long_labels": [t for t in labels if len(t) > 48]}
        dlg.close()
        check(ok and os.path.isfile(out), f"processing: {info}")
        return info


    @step("small_screen")
    def _small_screen():
        """A 1600 x 1000 main window with Advanced open: the dock stays inside it, Run and
        Describe are in view, and the results list keeps a useful height."""
        d = dock()
        tab(d.tabs, "Search")
        win = iface.mainWindow()
        win.showNormal()
        win.resize(1600, 1000)
        d.advanced.setCollapsed(False)
        pump(0.5)

        def in_view(w):
            return w.isVisible() and w.visibleRegion().boundingRect().height() == w.height()
        info = {"window_height": win.height(), "dock_height": d.height(),
                "dock_hint": d.sizeHint().height(), "results_height": d.results.height(),
                "run_visible": in_view(button(d, "Run")),
                "describe_visible": in_view(button(d, "Describe")),
                "screenshot": screenshot("desktop-small-screen.png")}
        d.advanced.setCollapsed(True)
        pump(0.2)
        return info


    @step("unload")
    def _unload():
        from qgis import utils
        from qgis.PyQt.QtWidgets import QDockWidget
        from qgis.PyQt.QtCore import QCoreApplication
        ok = utils.unloadPlugin("mapclip")
        check(ok, "unloading MapCLIP failed")
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        pump(0.3)
        left = [w.objectName() for w in iface.mainWindow().findChildren(QDockWidget)
                if w.objectName() == "MapClipDock"]
        check(not left, "the dock is still there after unloading")
        return {}




try:
    session()
    RESULTS["finished"] = True
except BaseException:  # noqa: BLE001 - recorded for the test, then QGIS quits
    RESULTS["fatal"] = traceback.format_exc()
finally:
    quit_qgis()
