"""The MapCLIP Processing provider in real QGIS (offscreen): every algorithm through
``processing.run`` on small generated inputs, and ``qgis_process`` with the plugin
installed in a temporary profile."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
QGIS_PLUGINS = "/usr/share/qgis/python/plugins"
ALGORITHMS = ("detect", "heatmap", "count", "classify", "caption", "buildindex", "searchindex",
              "finetune",
              "boxtocaption", "masktobox", "deduplicate")


# ------------------------------------------------------------------ set-up --
def run(alg: str, params: dict, feedback=None) -> dict:
    import processing
    from qgis.core import QgsProcessingFeedback
    return processing.run(f"mapclip:{alg}", params, feedback=feedback or QgsProcessingFeedback())


def write_png(path: Path, rgb, size=(32, 32)) -> Path:
    from PIL import Image
    Image.new("RGB", size, tuple(int(v) for v in rgb)).save(path)
    return path


# ---------------------------------------------------------------- provider --
def test_provider_offers_every_algorithm_with_help_and_groups(provider):
    ids = {a.name() for a in provider.algorithms()}
    assert ids == set(ALGORITHMS)
    for alg in provider.algorithms():
        assert alg.shortHelpString(), alg.id()
        assert alg.group() and alg.groupId()
        assert alg.flags() & alg.FlagSupportsBatch and alg.flags() & alg.FlagCanCancel
        # every algorithm produces something the modeler can chain
        assert alg.destinationParameterDefinitions() or alg.outputDefinitions(), alg.id()
    assert provider.name() == "MapCLIP" and provider.id() == "mapclip"
    assert not provider.icon().isNull()


def coco_file(tmp_path: Path) -> Path:
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100},
                       {"id": 2, "file_name": "b.png", "width": 100, "height": 100},
                       {"id": 3, "file_name": "empty.png", "width": 100, "height": 100}],
            "categories": [{"id": 1, "name": "storage-tank"}, {"id": 2, "name": "airplane"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 40, 10, 10]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5]},
                            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [45, 45, 8, 8]}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_box_to_caption_writes_five_captions_per_annotated_image(provider, tmp_path):
    out = tmp_path / "captions.csv"
    res = run("boxtocaption", {"ANNOTATIONS": str(coco_file(tmp_path)), "FORMAT": 0, "SEED": 3,
                               "OUTPUT": str(out)})
    assert res["OUTPUT"] == str(out) and out.is_file()
    rows = list(csv.reader(out.open()))
    body = [r for r in rows if r and r[0] != "image"]
    assert len(body) == 10 and res["CAPTION_COUNT"] == 10 and res["IMAGE_COUNT"] == 2
    a_caps = [r[1] for r in body if r[0].endswith("a.png")]
    assert any("storage tank" in c for c in a_caps)  # names normalised
    assert not any(r[0].endswith("empty.png") for r in body)


def test_engine_error_becomes_processing_exception_with_fix(provider, tmp_path):
    from qgis.core import QgsProcessingException
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(QgsProcessingException) as err:
        run("boxtocaption", {"ANNOTATIONS": str(bad), "FORMAT": 0, "OUTPUT": str(tmp_path / "c.csv")})
    assert "Fix:" in str(err.value) and "bad.json" in str(err.value)
    assert not (tmp_path / "c.csv").exists()


def test_mask_to_box_boxes_and_chained_captions(provider, tmp_path):
    from PIL import Image
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((40, 40), np.uint8)
    m[2:6, 3:9] = 1      # building 6 x 4 at (3, 2)
    m[20:30, 20:25] = 2  # road 5 x 10 at (20, 20)
    m[35, 35] = 1        # one-pixel building, dropped by MIN_AREA
    Image.fromarray(m).save(masks / "tile.png")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"1": "building", "2": "road"}))
    out, caps = tmp_path / "boxes.json", tmp_path / "caps.csv"
    res = run("masktobox", {"MASKS": str(masks), "CLASSES": str(classes), "MIN_AREA": 2,
                            "IGNORE_INDEX": 0, "OUTPUT": str(out), "CAPTIONS": str(caps)})
    assert res["BOX_COUNT"] == 2
    coco = json.loads(out.read_text())
    boxes = sorted(tuple(a["bbox"]) for a in coco["annotations"])
    assert boxes == [(3, 2, 6, 4), (20, 20, 5, 10)]
    assert caps.is_file() and res["CAPTIONS"] == str(caps)


def caption_set(tmp_path: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    names = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20), (20, 220, 220),
               (220, 20, 220), (250, 250, 250), (5, 5, 5)]
    rows = ["image,caption"]
    for i in range(n):
        write_png(tmp_path / f"im{i}.png", np.clip(np.array(colours[i % 8]) + rng.integers(-5, 5, 3), 0, 255))
        rows.append(f"im{i}.png,a {names[i % 8]} square")
    data = tmp_path / "pairs.csv"
    data.write_text("\n".join(rows) + "\n")
    return data


def test_finetune_writes_a_loadable_best_model(provider, tmp_path):
    data = caption_set(tmp_path)
    out = tmp_path / "run"
    res = run("finetune", {"DATA": str(data), "MODEL": "test-tiny", "EPOCHS": 1, "BATCH_SIZE": 8,
                           "LR": 1e-4, "VAL_SPLIT": 0.25, "DEVICE": "cpu", "OUTPUT": str(out)})
    best = Path(res["BEST_MODEL"])
    assert best.parent == out and (best / "open_clip_config.json").is_file()
    assert 0.0 <= res["MEAN_RECALL"] <= 100.0
    assert (out / "metrics.jsonl").read_text().count('"type": "step"') >= 1


def test_finetune_recipe_pir_passes_the_recipe_and_refuses_data_without_labels(provider, tmp_path):
    from qgis.core import QgsProcessingException
    data = caption_set(tmp_path)
    cfg = json.loads((Path(__file__).parents[2] / "mapclip" / "engine" / "model" / "configs"
                      / "mapclip-tiny.json").read_text())
    cfg["pir_cfg"] = {"res_layers": [1, 1, 1, 1], "res_width": 8, "head_width": 64}
    (tmp_path / "pir-tiny.json").write_text(json.dumps(cfg))
    params = {"DATA": str(data), "MODEL": f"{tmp_path / 'pir-tiny.json'}:random", "RECIPE": 1,
              "EPOCHS": 1, "BATCH_SIZE": 8, "LR": 1e-3, "VAL_SPLIT": 0.0, "DEVICE": "cpu",
              "OUTPUT": str(tmp_path / "bare")}
    with pytest.raises(QgsProcessingException, match="scene class"):
        run("finetune", params)
    with pytest.raises(QgsProcessingException, match="file names have none"):   # im0.png: no CLASS_
        run("finetune", dict(params, PIR_LABELS=1))
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[0] + ",label"] + [f"{r},{'warm' if i % 2 else 'cool'}"
                                                       for i, r in enumerate(rows[1:])]) + "\n")
    res = run("finetune", dict(params, OUTPUT=str(tmp_path / "run")))
    meta = json.loads((Path(res["BEST_MODEL"]) / "open_clip_config.json").read_text())
    assert meta["mapclip"]["recipe"] == "pir" and "pir_cfg" in meta["model_cfg"]


def test_deduplicate_reports_and_moves_only_when_asked(provider, tmp_path, near_duplicate_folders):
    train, test = near_duplicate_folders
    report = tmp_path / "report.csv"
    res = run("deduplicate", {"FOLDER": str(train), "AGAINST": str(test), "OUTPUT": str(report)})
    assert res["GROUPS"] == 1 and res["DUPLICATES"] == 2  # a_copy (or a) and contaminated b
    assert report.is_file() and "b.png" in report.read_text()
    assert len(list(train.iterdir())) == 3  # nothing moved without a quarantine folder
    assert res["MANIFEST"] == ""
    quarantine = tmp_path / "quarantine"
    res = run("deduplicate", {"FOLDER": str(train), "AGAINST": str(test), "OUTPUT": str(report),
                              "MOVE_TO": str(quarantine)})
    assert sorted(p.name for p in train.iterdir()) in (["a.png"], ["a_copy.png"])
    assert Path(res["MANIFEST"]).is_file()
    from mapclip.engine.dedup.quarantine import undo_move
    undo_move(res["MANIFEST"])
    assert len(list(train.iterdir())) == 3


# ------------------------------------------------------------ qgis_process --
def qgis_process_exe() -> str:
    """Debian's ``qgis_process`` wrapper passes --noversioncheck (from /etc/default/qgis),
    which 3.22's executable refuses, so call the executable behind it where it exists."""
    return shutil.which("qgis_process.bin") or shutil.which("qgis_process") or "qgis_process"


@pytest.fixture(scope="module")
def qgis_profile(tmp_path_factory):
    """A QGIS settings folder whose default profile has MapCLIP installed (a symlink to
    the repository) and enabled, and the environment qgis_process needs to load it."""
    base = tmp_path_factory.mktemp("qgis-config")
    profile = base / "profiles" / "default"
    (profile / "python" / "plugins").mkdir(parents=True)
    (profile / "QGIS").mkdir()
    os.symlink(ROOT / "mapclip", profile / "python" / "plugins" / "mapclip")
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nmapclip=true\n")
    env = dict(os.environ, QGIS_CUSTOM_CONFIG_PATH=str(base), QT_QPA_PLATFORM="offscreen")
    # qgis_process runs the system python3: give it the venv's packages
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    # QGIS embeds Python without naming a program, so CPython finds its prefix from the
    # first python3 on PATH: that must be the system one QGIS was built for (not pyenv's)
    env["PATH"] = os.pathsep.join(["/usr/bin", env.get("PATH", "")])
    return env


def test_qgis_process_lists_the_provider(qgis_profile):
    proc = subprocess.run([qgis_process_exe(), "list"], env=qgis_profile, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip().startswith("mapclip:")]
    assert sorted(listed) == sorted(f"mapclip:{a}" for a in ALGORITHMS)


def test_qgis_process_runs_box_to_caption(qgis_profile, tmp_path):
    out = tmp_path / "captions.csv"
    proc = subprocess.run([qgis_process_exe(), "--json", "run", "mapclip:boxtocaption", "--",
                           f"ANNOTATIONS={coco_file(tmp_path)}", "FORMAT=0", "SEED=1",
                           f"OUTPUT={out}"],
                          env=qgis_profile, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]
    assert results["CAPTION_COUNT"] == 10 and results["OUTPUT"] == str(out)
    assert len(out.read_text().strip().splitlines()) == 11  # header + 10 captions


# ------------------------------------------------------------ rasters, models --
GREY, RED, BLUE = (128, 128, 128), (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="session")
def rigged_folder(tmp_path_factory):
    """The rigged model (tests/rigged.py) as a model folder: any algorithm loads it by path."""
    from tests.rigged import save_rigged_folder
    return str(save_rigged_folder(tmp_path_factory.mktemp("models") / "rigged"))


def scene(path: Path, red=(160, 64, 32, 32), blue=None, width=256, height=192) -> Path:
    """A grainy grey GeoTIFF (EPSG:32633, 0.5 m, origin 500000/4000000) with a red square at
    ``red`` = (col, row, w, h) (and a blue one where asked)."""
    from tests.raster_fixtures import make_raster
    grain = np.random.default_rng(0).integers(-12, 13, (height, width))
    data = np.empty((3, height, width), np.uint8)
    data[:] = (128 + grain).astype(np.uint8)  # grey with grain: not an "empty" tile
    for box, colour in ((red, RED), (blue, BLUE)):
        if box:
            c, r, w, h = box
            data[:, r:r + h, c:c + w] = np.array(colour, np.uint8)[:, None, None]
    return make_raster(path, width=width, height=height, data=data)


def map_xy(col: float, row: float):
    return 500000.0 + 0.5 * col, 4000000.0 - 0.5 * row


def test_build_and_search_index_by_text_and_location(provider, tmp_path, rigged_folder):
    from qgis.core import QgsVectorLayer
    raster = scene(tmp_path / "scene.tif")
    index = tmp_path / "index"
    res = run("buildindex", {"INPUT": [str(raster)], "MODEL": rigged_folder, "TILE": 64,
                             "OUTPUT": str(index)})
    assert res["ROWS"] == 12 and res["EMBEDDED"] == 12 and res["RASTERS"] == 1  # 4 x 3 tiles
    assert (index / "manifest.json").is_file()
    # the red square (cols 160-191, rows 64-95) lies in tile col 2, row 1
    out = tmp_path / "hits.gpkg"
    res = run("searchindex", {"INDEX": str(index), "TEXT": "red roof", "TOP_K": 3,
                              "OUTPUT": str(out)})
    layer = QgsVectorLayer(str(out), "hits", "ogr")
    assert layer.isValid() and layer.featureCount() == 3 == res["COUNT"]
    assert layer.crs().authid() == "EPSG:32633"
    from mapclip.engine.core.outputs import HIT_FIELDS, names
    assert [f.name() for f in layer.fields()][1:] == names(HIT_FIELDS)  # the CLI's fields
    best = min(layer.getFeatures(), key=lambda f: f["rank"])
    assert (best["px_col"], best["px_row"]) == (128, 64)
    x, y = map_xy(176, 80)
    assert best.geometry().boundingBox().contains(x, y)
    # more places like the one at the red square: its own tile first, no model needed
    res = run("searchindex", {"INDEX": str(index), "POINT": f"{x},{y} [EPSG:32633]", "TOP_K": 1,
                              "OUTPUT": "memory:"})
    hit = next(res["OUTPUT"].getFeatures())
    assert (hit["px_col"], hit["px_row"]) == (128, 64)


def test_search_index_needs_exactly_one_query(provider, tmp_path):
    from qgis.core import QgsProcessingException
    with pytest.raises(QgsProcessingException, match="exactly one query"):
        run("searchindex", {"INDEX": str(tmp_path), "OUTPUT": "memory:"})


def test_detect_puts_the_box_on_the_planted_square(provider, tmp_path, rigged_folder):
    from qgis.core import QgsRasterLayer, QgsVectorLayer
    raster = scene(tmp_path / "scene.tif")
    layer = QgsRasterLayer(str(raster), "scene")
    out = tmp_path / "boxes.gpkg"
    steps = []

    from qgis.core import QgsProcessingFeedback
    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(steps.append)
    res = run("detect", {"INPUT": layer, "PROMPTS": "red roof", "MODEL": rigged_folder,
                         "MODE": 0, "TILE": 32, "WINDOW": 2, "STRIDE": 1, "TOP_K": 1,
                         "DEVICE": "cpu", "OUTPUT": str(out)}, feedback)
    boxes = QgsVectorLayer(str(out), "boxes", "ogr")
    assert boxes.isValid() and boxes.featureCount() == 1 == res["COUNT"]
    assert boxes.crs().authid() == "EPSG:32633"
    assert [f.name() for f in boxes.fields()][1:] == ["prompt", "score", "cosine", "rank", "model"]
    box = next(boxes.getFeatures())
    assert box["prompt"] == "red roof" and box["rank"] == 1 and box["score"] > 0.5
    bb = box.geometry().boundingBox()
    assert bb.contains(*map_xy(176, 80))                       # the square's centre
    assert bb.width() <= 0.5 * 128 and bb.height() <= 0.5 * 128  # one window, not the scene
    assert steps and max(steps) == pytest.approx(100.0)


def _fill_alphas(layer):
    """The fill opacity (0..255) of every symbol a vector layer draws with."""
    from qgis.core import QgsRenderContext
    renderer = layer.renderer()
    symbols = renderer.symbols(QgsRenderContext())
    return [sl.fillColor().alpha() if sl.brushStyle() else 0
            for sym in symbols for sl in sym.symbolLayers() if hasattr(sl, "fillColor")]


@pytest.mark.parametrize("alg, params", [
    ("detect", {"PROMPTS": "red roof", "TILE": 32, "WINDOW": 2, "STRIDE": 1, "TOP_K": 1}),
    ("count", {"OBJECT": "red roof", "METHOD": 1}),
])
def test_boxes_outputs_load_styled_so_the_objects_stay_visible(provider, tmp_path, rigged_folder,
                                                               alg, params):
    """Loaded on completion, the boxes get the dock's style (boxes.qml: graduated outlines over
    a faint fill), not QGIS's default opaque fill."""
    import processing
    from qgis.core import QgsGraduatedSymbolRenderer, QgsProject
    raster = scene(tmp_path / "scene.tif")
    out = tmp_path / f"{alg}.gpkg"
    res = processing.runAndLoadResults(f"mapclip:{alg}", dict(params, INPUT=str(raster),
                                                               MODEL=rigged_folder, OUTPUT=str(out)))
    loaded = [l for l in QgsProject.instance().mapLayers().values()
              if l.source().split("|")[0] == res["OUTPUT"] == str(out)]
    try:
        assert len(loaded) == 1 and loaded[0].featureCount() >= 1
        layer = loaded[0]
        assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
        assert layer.renderer().classAttribute() == "score"
        alphas = _fill_alphas(layer)
        assert alphas and max(alphas) <= 64            # outlines over a faint fill at most
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_search_index_takes_manifest_json_as_its_folder(provider, tmp_path, rigged_folder):
    from qgis.core import QgsProcessingException
    index = tmp_path / "index"
    run("buildindex", {"INPUT": [str(scene(tmp_path / "scene.tif"))], "MODEL": rigged_folder,
                       "TILE": 64, "OUTPUT": str(index)})
    res = run("searchindex", {"INDEX": str(index / "manifest.json"), "TEXT": "red roof",
                              "TOP_K": 1, "OUTPUT": "memory:"})
    assert res["COUNT"] == 1
    hit = next(res["OUTPUT"].getFeatures())
    assert (hit["px_col"], hit["px_row"]) == (128, 64)       # the red square's tile
    # another file, or a folder that is no index: said in Processing's terms, no command line
    for path, said in ((tmp_path / "scene.tif", "is a file, not an index folder"),
                       (tmp_path, "is not a MapCLIP index folder")):
        with pytest.raises(QgsProcessingException) as err:
            run("searchindex", {"INDEX": str(path), "TEXT": "red roof", "OUTPUT": "memory:"})
        text = str(err.value)
        assert said in text and "Fix: choose the" in text and "Index folder" in text
        assert "python -m" not in text and "--" not in text


def test_detect_in_an_extent_given_in_another_crs(provider, tmp_path, rigged_folder):
    """Extent in WGS84 around the left half: the red square (right half) is not found there."""
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject,
                           QgsRectangle)
    raster = scene(tmp_path / "scene.tif", blue=(16, 64, 32, 32))
    utm = QgsRectangle(*map_xy(0, 192), *map_xy(128, 0))
    tr = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:32633"),
                                QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    geo = tr.transformBoundingBox(utm)
    extent = f"{geo.xMinimum()},{geo.xMaximum()},{geo.yMinimum()},{geo.yMaximum()} [EPSG:4326]"
    res = run("detect", {"INPUT": str(raster), "PROMPTS": "red roof; blue pool",
                         "MODEL": rigged_folder, "TILE": 32, "TOP_K": 1, "EXTENT": extent,
                         "OUTPUT": "memory:"})
    feats = {f["prompt"]: f for f in res["OUTPUT"].getFeatures()}
    assert "blue pool" in feats
    assert feats["blue pool"].geometry().boundingBox().contains(*map_xy(32, 80))
    for f in feats.values():  # nothing outside the asked extent (WGS84 box, slightly wider)
        assert f.geometry().boundingBox().xMaximum() <= map_xy(140, 0)[0]


def test_heatmap_is_a_georeferenced_raster_hot_at_the_square(provider, tmp_path, rigged_folder):
    from qgis.core import QgsRasterLayer
    raster = scene(tmp_path / "scene.tif")
    out = tmp_path / "heat.tif"
    res = run("heatmap", {"INPUT": str(raster), "PROMPTS": "red roof", "MODEL": rigged_folder,
                          "TILE": 64, "OUTPUT": str(out)})
    assert res["OUTPUT"] == str(out)
    heat = QgsRasterLayer(str(out), "heat")
    assert heat.isValid() and heat.bandCount() == 1 and heat.crs().authid() == "EPSG:32633"
    import rasterio
    with rasterio.open(out) as ds:
        data = ds.read(1)
        row, col = np.unravel_index(np.nanargmax(data), data.shape)
        x, y = ds.xy(row, col)
    assert 500000 + 0.5 * 150 <= x <= 500000 + 0.5 * 202
    assert 4000000 - 0.5 * 106 <= y <= 4000000 - 0.5 * 54


def test_heatmap_never_writes_over_its_input(provider, tmp_path, rigged_folder):
    """The engine's output guard holds in Processing: the input raster is left untouched."""
    from qgis.core import QgsProcessingException
    raster = scene(tmp_path / "scene.tif")
    before = raster.read_bytes()
    with pytest.raises(QgsProcessingException) as err:
        run("heatmap", {"INPUT": str(raster), "PROMPTS": "red roof", "MODEL": rigged_folder,
                        "OUTPUT": str(raster)})
    assert "is also an input" in str(err.value) and "Fix:" in str(err.value)
    assert raster.read_bytes() == before


def test_count_reports_each_method_and_dense_boxes(provider, tmp_path, rigged_folder):
    raster = scene(tmp_path / "scene.tif", blue=(16, 16, 24, 24))
    raster2 = scene(tmp_path / "two.tif", red=(32, 32, 24, 24), blue=None)
    res = run("count", {"INPUT": str(raster), "OBJECT": "red roof", "MODEL": rigged_folder,
                        "METHOD": 2, "OUTPUT": "memory:"})
    assert res["COUNT_DENSE"] == 1 == res["COUNT"] and 0 <= res["COUNT_PROMPT"] <= 10
    assert res["SUMMARY"].startswith("count: 1 red roof (dense method")
    assert "also run: " in res["SUMMARY"] and "(prompt method" in res["SUMMARY"]
    boxes = list(res["OUTPUT"].getFeatures())
    assert len(boxes) == 1 and boxes[0]["object"] == "red roof"
    assert boxes[0].geometry().boundingBox().contains(*map_xy(176, 80))
    res = run("count", {"INPUT": str(raster2), "OBJECT": "red roof", "MODEL": rigged_folder,
                        "METHOD": 1})
    assert res["COUNT_DENSE"] == 1 == res["COUNT"] and res["COUNT_PROMPT"] == -1 and "OUTPUT" not in res
    res = run("count", {"INPUT": str(raster2), "OBJECT": "red roof", "MODEL": rigged_folder,
                        "METHOD": 0})
    assert res["COUNT"] == res["COUNT_PROMPT"] >= 0 and res["COUNT_DENSE"] == -1
    assert res["SUMMARY"].startswith(f"count: {res['COUNT']} red roof") and "dense" not in res["SUMMARY"]


def test_count_outputs_say_minus_one_only_for_a_method_not_run(provider, tmp_path, rigged_folder):
    from qgis.core import QgsApplication, QgsProcessingException
    alg = QgsApplication.processingRegistry().algorithmById("mapclip:count")
    described = {o.name(): o.description() for o in alg.outputDefinitions()}
    for method in ("prompt", "dense"):
        assert f"-1 when the {method} method did not run" in described[f"COUNT_{method.upper()}"]
    assert "dense method's when both ran" in described["COUNT"]
    # the boxes output with the prompt method (no boxes): refused, in Processing's terms
    with pytest.raises(QgsProcessingException) as err:
        run("count", {"INPUT": str(scene(tmp_path / "s.tif")), "OBJECT": "red roof",
                      "MODEL": rigged_folder, "METHOD": 0, "OUTPUT": "memory:"})
    assert "OUTPUT holds the dense method's boxes" in str(err.value)
    assert "Fix: add METHOD dense or both" in str(err.value) and "--" not in str(err.value)


def test_detect_refuses_empty_prompt_and_non_file_layer(provider, tmp_path):
    from qgis.core import QgsProcessingException, QgsRasterLayer
    raster = scene(tmp_path / "scene.tif")
    with pytest.raises(QgsProcessingException, match="no prompt"):
        run("detect", {"INPUT": str(raster), "PROMPTS": " ; ", "MODEL": "test-tiny",
                       "OUTPUT": "memory:"})
    wms = QgsRasterLayer("type=xyz&url=file:///nowhere/{z}/{x}/{y}.png", "basemap", "wms")
    from mapclip.plugin.processing.common import raster_path
    with pytest.raises(QgsProcessingException, match="not a raster file"):
        raster_path(wms)


def test_detect_prompt_templates_parameter(provider, tmp_path, rigged_folder):
    from qgis.core import QgsProcessingException
    raster = scene(tmp_path / "scene.tif")
    base = {"INPUT": str(raster), "PROMPTS": "red roof", "MODEL": rigged_folder, "MODE": 0, "TILE": 32,
            "WINDOW": 2, "TOP_K": 1, "DEVICE": "cpu"}
    res = run("detect", dict(base, TEMPLATES="raw", OUTPUT=str(tmp_path / "a.gpkg")))
    assert res["COUNT"] == 1
    with pytest.raises(QgsProcessingException, match="template"):
        run("detect", dict(base, TEMPLATES="nonsense", OUTPUT=str(tmp_path / "b.gpkg")))


def test_heatmap_class_token_weight_and_template_file_parameters(provider, tmp_path, rigged_folder):
    """CLS_TOKEN_LAMBDA reaches the dense pass (empty: the segearth mode's -0.3), and TEMPLATES
    takes a named ensemble or a template file, as the command line does."""
    import rasterio
    from qgis.core import QgsProcessingException
    from mapclip.engine.core.options import ATTENTION_MODES
    raster = scene(tmp_path / "scene.tif")
    base = {"INPUT": str(raster), "PROMPTS": "red roof", "MODEL": rigged_folder, "MODE": 1, "TILE": 64,
            "DEVICE": "cpu", "CACHE": False, "ATTENTION": list(ATTENTION_MODES).index("segearth")}

    def heat(name, **kw):
        run("heatmap", dict(base, OUTPUT=str(tmp_path / name), **kw))
        with rasterio.open(tmp_path / name) as ds:
            return ds.read(1)
    default, ref, none = heat("d.tif"), heat("r.tif", CLS_TOKEN_LAMBDA=-0.3), heat("n.tif", CLS_TOKEN_LAMBDA=0.0)
    assert np.array_equal(default, ref) and not np.array_equal(default, none)
    temps = tmp_path / "templates.txt"
    temps.write_text("a drone photo of {}.\n")
    assert heat("f.tif", TEMPLATES=str(temps)).shape == default.shape
    assert heat("o.tif", TEMPLATES="rs5m").shape == default.shape
    temps.write_text("a drone photo\n")
    with pytest.raises(QgsProcessingException, match="line 1"):
        heat("b.tif", TEMPLATES=str(temps))


# ------------------------------------------------------- cancel, modeler --
class CancelOnFirstProgress:
    """A feedback that presses Cancel as soon as the engine reports progress."""

    def __new__(cls):
        from qgis.core import QgsProcessingFeedback
        feedback = QgsProcessingFeedback()
        feedback.progressChanged.connect(lambda p: feedback.cancel() if p > 0 else None)
        return feedback


def test_cancel_stops_detect_and_writes_nothing(provider, tmp_path, rigged_folder):
    from qgis.core import QgsProcessingException
    raster = scene(tmp_path / "scene.tif")
    out = tmp_path / "boxes.gpkg"
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        run("detect", {"INPUT": str(raster), "PROMPTS": "red roof", "MODEL": rigged_folder,
                       "TILE": 16, "BATCH_SIZE": 4, "OUTPUT": str(out)}, CancelOnFirstProgress())
    assert not out.exists()


def test_algorithms_chain_in_a_model(provider, tmp_path):
    """Mask-to-Box's COCO output feeds Box-to-Caption inside a graphical-modeler model."""
    from PIL import Image
    from qgis.core import (QgsProcessingContext, QgsProcessingFeedback, QgsProcessingModelAlgorithm,
                           QgsProcessingModelChildAlgorithm, QgsProcessingModelChildParameterSource,
                           QgsProcessingModelOutput, QgsProcessingModelParameter,
                           QgsProcessingParameterFile)
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((40, 40), np.uint8)
    m[15:25, 15:25] = 1
    Image.fromarray(m).save(masks / "tile.png")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"1": "storage-tank"}))

    model = QgsProcessingModelAlgorithm("masks to captions", "test")
    for name, behavior in (("masks", QgsProcessingParameterFile.Folder),
                           ("classes", QgsProcessingParameterFile.File)):
        model.addModelParameter(QgsProcessingParameterFile(name, name, behavior=behavior),
                                QgsProcessingModelParameter(name))
    m2b = QgsProcessingModelChildAlgorithm("mapclip:masktobox")
    m2b.setChildId("m2b")
    m2b.addParameterSources("MASKS", [QgsProcessingModelChildParameterSource.fromModelParameter("masks")])
    m2b.addParameterSources("CLASSES", [QgsProcessingModelChildParameterSource.fromModelParameter("classes")])
    # the modeler's dialog fills these with the defaults; a model built in code names them
    m2b.addParameterSources("IGNORE_INDEX", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    m2b.addParameterSources("MIN_AREA", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    model.addChildAlgorithm(m2b)
    b2c = QgsProcessingModelChildAlgorithm("mapclip:boxtocaption")
    b2c.setChildId("b2c")
    b2c.addParameterSources("ANNOTATIONS", [QgsProcessingModelChildParameterSource.fromChildOutput("m2b", "OUTPUT")])
    b2c.addParameterSources("FORMAT", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    b2c.addParameterSources("SEED", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    out = QgsProcessingModelOutput("captions")
    out.setChildOutputName("OUTPUT")
    b2c.setModelOutputs({"captions": out})
    model.addChildAlgorithm(b2c)
    ok, errors = model.validate()
    assert ok, errors
    captions = tmp_path / "captions.csv"
    context = QgsProcessingContext()
    results, ok = model.run({"masks": str(masks), "classes": str(classes),
                             "b2c:captions": str(captions)}, context, QgsProcessingFeedback())
    assert ok
    rows = [r for r in csv.reader(captions.open()) if r and r[0] != "image"]
    assert len(rows) == 5 and rows[0][0].endswith("tile.png")
    # one object in the centre: caption 1 and the three counting captions name it
    assert sum("storage tank" in r[1] for r in rows) == 4


def test_detect_renders_a_non_file_basemap_for_the_area(provider, tmp_path, rigged_folder,
                                                         monkeypatch):
    """An XYZ layer (file:// tiles, so no network) is rendered for the extent, then searched;
    the box lands on the tile's red square, in the render CRS (EPSG:3857)."""
    from qgis.core import QgsRasterLayer
    from .conftest import make_xyz_tiles
    uri, tile = make_xyz_tiles(str(tmp_path / "tiles"))  # red square at px 64..104, 96..136
    xyz = QgsRasterLayer(uri, "basemap", "wms")
    assert xyz.isValid()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the render goes
    extent = f"{tile.xMinimum()},{tile.xMaximum()},{tile.yMinimum()},{tile.yMaximum()} [EPSG:3857]"
    px = tile.width() / 256
    import math
    lat = math.atan(math.sinh(tile.center().y() / 6378137.0))
    res = run("detect", {"INPUT": xyz, "PROMPTS": "red roof", "MODEL": rigged_folder, "TILE": 32,   # GSD: ground metres
                         "TOP_K": 1, "EXTENT": extent, "GSD": px * math.cos(lat), "OUTPUT": "memory:"})
    layer = res["OUTPUT"]
    assert layer.crs().authid() == "EPSG:3857" and layer.featureCount() == 1
    bb = next(layer.getFeatures()).geometry().boundingBox()
    assert bb.contains(tile.xMinimum() + 84 * px, tile.yMaximum() - 116 * px)
    assert list(scratch.iterdir()) == []  # the rendered GeoTIFF is removed
    from qgis.core import QgsProcessingException
    with pytest.raises(QgsProcessingException, match="web map"):  # whole layer of a web map
        run("detect", {"INPUT": xyz, "PROMPTS": "red roof", "MODEL": rigged_folder,
                       "OUTPUT": "memory:"})
    # the same tiles from a dead server: an error naming it and why, no empty result
    from tests.rangeserver import dead_port
    url = f"http://127.0.0.1:{dead_port()}/{{z}}/{{x}}/{{y}}.png"
    dead = QgsRasterLayer(uri.split("&url=")[0] + f"&url={url}&zmin=16&zmax=16", "dead", "wms")
    with pytest.raises(QgsProcessingException, match=r"'dead' \(http://127.0.0.1:\d+/.*gave no data: "
                                                     r"Connection refused.*\nFix: check that the server"):
        run("detect", {"INPUT": dead, "PROMPTS": "red roof", "MODEL": rigged_folder, "TILE": 32,
                       "EXTENT": extent, "OUTPUT": "memory:"})
    assert list(scratch.iterdir()) == []


NO_TORCH_SCRIPT = r"""
import os, sys, tempfile
for name in ("torch", "open_clip", "rasterio", "torchvision"):
    sys.modules[name] = None          # as if not installed in QGIS's Python
holder = tempfile.mkdtemp()
os.symlink(sys.argv[1], os.path.join(holder, "mapclip"))
sys.path.insert(0, holder)
sys.path.append("/usr/share/qgis/python/plugins")
from qgis.core import QgsApplication, QgsProcessingException
app = QgsApplication([], False)
app.initQgis()
from processing.core.Processing import Processing
Processing.initialize()
import processing
from mapclip.plugin.processing import add_provider
provider = add_provider()
print("ALGORITHMS", len(provider.algorithms()))
try:
    processing.run("mapclip:detect", {"INPUT": sys.argv[2], "PROMPTS": "ships",
                                      "MODEL": "test-tiny", "OUTPUT": "memory:"})
except QgsProcessingException as exc:
    print("ERROR", str(exc).replace("\n", " | "))
"""


def test_provider_loads_without_torch_and_says_what_is_missing(tmp_path):
    raster = scene(tmp_path / "scene.tif")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(ROOT / "mapclip"), str(raster)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert f"ALGORITHMS {len(ALGORITHMS)}" in proc.stdout, proc.stderr[-2000:]
    error = [l for l in proc.stdout.splitlines() if l.startswith("ERROR")]
    assert error and "needs the Python package" in error[0] and "Fix:" in error[0], proc.stdout


def test_classify_writes_a_paletted_class_map_with_the_class_legend(provider, tmp_path):
    from qgis.core import QgsRasterLayer, QgsVectorLayer
    raster = scene(tmp_path / "scene.tif")
    out, polys = tmp_path / "classes.tif", tmp_path / "classes.gpkg"
    res = run("classify", {"INPUT": str(raster), "CLASSES": "water; forest\nfield",
                           "MODEL": "test-tiny", "DEVICE": "cpu", "OUTPUT": str(out),
                           "POLYGONS": str(polys)})
    assert res["OUTPUT"] == str(out) and res["POLYGONS"] == str(polys)
    layer = QgsRasterLayer(str(out), "classes")
    assert layer.isValid() and layer.crs().authid() == "EPSG:32633"
    assert layer.renderer().type() == "paletted"          # the .qml beside it was loaded
    labels = [c.label for c in layer.renderer().classes()]
    assert labels == ["unknown", "water", "forest", "field"]
    vec = QgsVectorLayer(str(polys), "polys")
    assert vec.isValid() and vec.featureCount() > 0
    assert {f["class"] for f in vec.getFeatures()} <= {"water", "forest", "field"}
    # only within the selected polygon: the other cells are not scored
    from qgis.core import QgsFeature, QgsGeometry, QgsProcessingFeatureSourceDefinition, QgsProject, QgsRectangle
    areas = QgsVectorLayer("Polygon?crs=EPSG:32633", "areas", "memory")
    for c0, r0 in ((20, 20), (150, 100)):
        f = QgsFeature(areas.fields())
        x0, y1 = map_xy(c0 + 0.3, r0 + 0.3)
        x1, y0 = map_xy(c0 + 60.3, r0 + 60.3)
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(x0, y0, x1, y1)))
        areas.dataProvider().addFeature(f)
    QgsProject.instance().addMapLayer(areas)
    areas.selectByIds([next(areas.getFeatures()).id()])
    try:
        run("classify", {"INPUT": str(raster), "CLASSES": "water; forest", "MODEL": "test-tiny",
                         "DEVICE": "cpu", "OUTPUT": str(tmp_path / "within.tif"),
                         "WITHIN": QgsProcessingFeatureSourceDefinition(areas.id(), True)})
    finally:
        QgsProject.instance().removeMapLayer(areas.id())
    import rasterio
    with rasterio.open(tmp_path / "within.tif") as ds:
        m, tf = ds.read(1), ds.transform
    scored = np.argwhere(m != 255)
    assert len(scored) > 0
    xs = [(tf @ (c + 0.5, r + 0.5))[0] for r, c in scored]
    assert max(xs) < map_xy(81, 0)[0]           # only the first (selected) square
    from qgis.core import QgsProcessingException
    with pytest.raises(QgsProcessingException, match="only one class"):
        run("classify", {"INPUT": str(raster), "CLASSES": "water", "MODEL": "test-tiny",
                         "DEVICE": "cpu", "OUTPUT": str(tmp_path / "one.tif")})
    assert not (tmp_path / "one.tif").exists()


def test_caption_adds_a_caption_field_to_boxes(provider, tmp_path):
    from qgis.core import QgsFeature, QgsGeometry, QgsRectangle, QgsVectorLayer
    raster = scene(tmp_path / "scene.tif")
    boxes = QgsVectorLayer("Polygon?crs=EPSG:32633&field=name:string", "boxes", "memory")
    for name, (c, r) in (("a", (160, 64)), ("b", (10, 10))):
        f = QgsFeature(boxes.fields())
        x0, y1 = map_xy(c, r)
        x1, y0 = map_xy(c + 32, r + 32)
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(x0, y0, x1, y1)))
        f.setAttributes([name])
        boxes.dataProvider().addFeature(f)
    bank = tmp_path / "bank.csv"
    bank.write_text("caption\na red roof\ngrey ground\nwater\n")
    res = run("caption", {"INPUT": str(raster), "BOXES": boxes, "MODEL": "test-tiny",
                          "DEVICE": "cpu", "BANK": str(bank), "OUTPUT": "memory:"})
    out = res["OUTPUT"]
    out = out if isinstance(out, QgsVectorLayer) else QgsVectorLayer(out, "out")
    feats = list(out.getFeatures())
    assert [f["name"] for f in feats] == ["a", "b"]
    assert all(f["caption"] in ("a red roof", "grey ground", "water") for f in feats)
    assert all(-1.0 <= f["caption_score"] <= 1.0 for f in feats)


def test_a_second_detect_or_a_heatmap_on_the_same_area_reuses_the_embeddings(provider, tmp_path,
                                                                             rigged_folder):
    """Processing runs share the engine's embedding cache: the second prompt and the switch
    to a heatmap skip the pass over the raster (and say so); CACHE off does not."""
    from qgis.core import QgsProcessingFeedback, QgsRasterLayer, QgsVectorLayer

    class Log(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.lines = []

        def pushInfo(self, info):  # noqa: N802
            self.lines.append(info)
            super().pushInfo(info)

    raster = scene(tmp_path / "scene.tif")
    layer = QgsRasterLayer(str(raster), "scene")
    common = {"INPUT": layer, "MODEL": rigged_folder, "MODE": 0, "TILE": 32, "WINDOW": 2,
              "STRIDE": 1, "DEVICE": "cpu"}
    cached = "embeddings from the cache"

    def detect(prompt, out, **extra):
        log = Log()
        res = run("detect", {**common, "PROMPTS": prompt, "TOP_K": 1, "OUTPUT": str(tmp_path / out),
                             **extra}, log)
        return res, log
    first, log = detect("blue pool", "a.gpkg")
    assert not any(cached in line for line in log.lines)
    second, log = detect("red roof", "b.gpkg")
    assert any(cached in line for line in log.lines)
    box = next(QgsVectorLayer(str(tmp_path / "b.gpkg"), "b", "ogr").getFeatures())
    assert box.geometry().boundingBox().contains(*map_xy(176, 80))
    _, log = detect("red roof", "c.gpkg", CACHE=False)
    assert not any(cached in line for line in log.lines)
    c = next(QgsVectorLayer(str(tmp_path / "c.gpkg"), "c", "ogr").getFeatures())
    assert c.geometry().boundingBox() == box.geometry().boundingBox() and c["score"] == box["score"]
    heat = Log()
    run("heatmap", {**common, "PROMPTS": "red roof", "OUTPUT": str(tmp_path / "h.tif")}, heat)
    assert any(cached in line for line in heat.lines)


def test_build_index_takes_a_stac_api_search_with_its_filters(provider, tmp_path, rigged_folder):
    """The STAC parameters reach the same engine call as `index --stac`: the filters go to
    the API's search, every page is read, the items' COGs are indexed as URLs; a bad box is
    named by its parameter."""
    from urllib.parse import parse_qsl, urlsplit

    from qgis.core import QgsProcessingException

    from tests.engine.test_remote import _stac_api
    from tests.rangeserver import RangeServer, write_cog
    from tests.raster_fixtures import noise
    www = tmp_path / "www"
    for seed, name in enumerate(("scene_cog.tif", "other_cog.tif", "third_cog.tif")):
        write_cog(www / name, noise(3, 128, 128, seed=seed))
    with RangeServer(www) as server:
        _stac_api(www, server.url, page_size=1)
        res = run("buildindex", {"STAC": f"{server.url}/search", "STAC_COLLECTIONS": "summer,winter",
                                 "STAC_BBOX": "14,35,16,37", "STAC_DATETIME": "2024-06-01/2024-12-31",
                                 "MODEL": rigged_folder, "TILE": 64, "OUTPUT": str(tmp_path / "idx")})
        searches = [dict(parse_qsl(urlsplit(p).query)) for m, p, _ in server.requests
                    if m == "GET" and urlsplit(p).path == "/search"]
        with pytest.raises(QgsProcessingException) as err:
            run("buildindex", {"STAC": f"{server.url}/search", "STAC_BBOX": "14,35,16",
                               "MODEL": rigged_folder, "OUTPUT": str(tmp_path / "idx2")})
    assert res["RASTERS"] == 2 and res["ROWS"] == 8                     # the summer's two COGs
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert sorted(r["path"] for r in manifest["rasters"]) == sorted(
        f"/vsicurl/{server.url}/{n}" for n in ("scene_cog.tif", "other_cog.tif"))
    assert [s.get("token") for s in searches] == [None, "1"]
    assert all(s["collections"] == "summer,winter" and s["bbox"] == "14.0,35.0,16.0,37.0"
               and s["datetime"].startswith("2024-06-01T00:00:00Z/2024-12-31T23:59:59")
               for s in searches)
    assert str(err.value).startswith("STAC_BBOX '14,35,16' is not a WGS84 box")
    assert not (tmp_path / "idx2").exists()
