"""The demo (scripts/demo.py) and its QGIS project (scripts/demo_project.py), in a real QGIS."""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from mapclip.engine.data.synthetic.scene import make_scene
from mapclip.engine.data.synthetic.truth import MASK_CLASSES, SceneTruth
from mapclip.engine.geo.boxes import pixel_to_bounds
from mapclip.engine.detect import Box, DetectResult, write_boxes, write_heatmap
from tests.plugin import conftest as _qgis_session  # noqa: F401  (one offscreen QgsApplication)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

PROMPTS = ["ships", "airplanes"]


def _result(truth: SceneTruth) -> DetectResult:
    tf = truth.affine
    boxes = [Box(p, 0.9 - i / 10, 0.3, 1, pixel_to_bounds(tf, px), px)
             for i, (p, px) in enumerate([("ships", (10, 10, 40, 40)), ("airplanes", (100, 60, 160, 120))])]
    heat = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    return DetectResult(boxes=boxes, crs="EPSG:32633", heatmap=heat, heatmap_transform=tf * Affine.scale(16),
                        tiles=1, windows=1, skipped=0, seconds=0.1, device="cpu", precision="fp32",
                        model="demo", prompts=list(PROMPTS))


def test_demo_project_loads_in_qgis_with_valid_styled_layers(tmp_path):
    from qgis.core import QgsProject
    from demo_project import write_project
    truth = make_scene(str(tmp_path / "scene.tif"), 256, seed=11)
    res = _result(truth)
    gpkg = write_boxes(res, tmp_path / "detections.gpkg")
    heat = write_heatmap(res, tmp_path / "heatmap.tif")
    from mapclip.engine.classify import classify
    land = classify(truth.path, ["water", "forest", "farmland"], "demo", out=str(tmp_path / "classes.tif"))
    qgz = write_project(tmp_path / "demo.qgz", truth.path, truth.mask_path, gpkg, heat, PROMPTS,
                        colours={"ships": (0, 230, 255), "airplanes": (255, 60, 200)},
                        land_cover=land.out)
    project = QgsProject()
    assert project.read(str(qgz)), project.error()
    layers = {layer.name(): layer for layer in project.mapLayers().values()}
    assert set(layers) == {"scene", "detections", "heatmap: ships", "heatmap: airplanes",
                           "class map (ground truth)", "land cover (the model's)"}
    model_classes = layers["land cover (the model's)"].renderer()
    assert model_classes.type() == "paletted"
    assert {"water", "forest", "farmland"} <= {c.label for c in model_classes.classes()}
    assert all(layer.isValid() for layer in layers.values())
    det = layers["detections"]
    assert det.featureCount() == 2 and det.renderer().type() == "categorizedSymbol"
    assert [c.value() for c in det.renderer().categories()] == PROMPTS
    assert det.labelsEnabled()
    for band, prompt in enumerate(PROMPTS, start=1):
        r = layers[f"heatmap: {prompt}"].renderer()
        assert r.type() == "singlebandpseudocolor" and r.band() == band
        assert (r.classificationMin(), r.classificationMax()) == (0.0, 1.0)
    classes = layers["class map (ground truth)"].renderer()
    assert classes.type() == "paletted"
    assert {c.label for c in classes.classes()} == set(MASK_CLASSES.values())
    assert layers["scene"].renderer().type() == "multibandcolor"
    # relative paths: the folder can move
    with zipfile.ZipFile(qgz) as z:
        qgs = z.read([n for n in z.namelist() if n.endswith(".qgs")][0]).decode()
    assert "./scene.tif" in qgs and str(tmp_path) not in qgs
    # the first heatmap is shown, the others and the class map are not
    root = project.layerTreeRoot()
    assert root.findLayer(layers["heatmap: ships"].id()).isVisible()
    assert not root.findLayer(layers["heatmap: airplanes"].id()).isVisible()


def test_demo_project_names_a_layer_qgis_cannot_open(tmp_path):
    from demo_project import write_project
    truth = make_scene(str(tmp_path / "scene.tif"), 128, seed=12)
    with pytest.raises(RuntimeError, match="heatmap"):
        write_project(tmp_path / "demo.qgz", truth.path, truth.mask_path, tmp_path / "none.gpkg",
                      tmp_path / "missing.tif", PROMPTS)
    assert not (tmp_path / "demo.qgz").exists()


def test_demo_runs_with_the_models_defaults_and_prints_the_protocols_table(tmp_path, capsys):
    import demo
    assert demo.main(["--out", str(tmp_path), "--size", "256", "--seed", "4216", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "AP50" in text and "precision" in text and "recall" in text
    for p in demo.PROMPTS:
        assert any(line.strip().startswith(p) for line in text.splitlines())
    # the model's own tile (24 px): a 256-px scene is 11 x 11 tiles
    assert "121 tiles" in text
    assert (tmp_path / "demo.qgz").exists() and (tmp_path / "detections.png").exists()
    assert f"qgis {tmp_path / 'demo.qgz'}" in text
