"""`python -m engine detect`: the command-line contract (JSON, outputs, errors, exit codes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mapclip.engine.cli import main as cli_main
from tests.raster_fixtures import UTM_ORIGIN, UTM_RES, make_raster, noise
from tests.rigged import RED, RED_PROMPT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JSON_KEYS = {"tiles", "windows", "boxes", "seconds", "tiles_per_s", "device", "precision", "model"}


@pytest.fixture
def raster(tmp_path):
    data = noise(3, 192, 256, seed=5)
    data[:, 140:180, 200:240] = np.array(RED, np.uint8)[:, None, None]
    return str(make_raster(tmp_path / "scene.tif", data=data))


def _run(argv, capsys):
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_and_vector_file_contract(tmp_path, raster, rig_folder, capsys):
    import pyogrio
    out = tmp_path / "boxes.gpkg"
    heat = tmp_path / "heat.tif"
    code, stdout, _ = _run(["detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder,
                            "--tile", "64", "--window", "1", "--top-k", "2", "--out", str(out),
                            "--heatmap", str(heat), "--device", "cpu", "--json", "--no-refine"],
                           capsys)
    assert code == 0
    info = json.loads(stdout)
    assert info["refined"] == 0
    assert JSON_KEYS <= set(info)
    assert info["tiles"] == 12 and info["windows"] == 12 and info["device"] == "cpu"
    assert info["precision"] == "fp32" and info["model"] == rig_folder
    top = info["boxes"][0]
    assert top["pixel"] == [192, 128, 256, 192] and top["rank"] == 1 and top["score"] > 0.99
    assert top["bounds"] == [UTM_ORIGIN[0] + 192 * UTM_RES, UTM_ORIGIN[1] - 192 * UTM_RES,
                             UTM_ORIGIN[0] + 256 * UTM_RES, UTM_ORIGIN[1] - 128 * UTM_RES]
    meta = pyogrio.read_info(out)
    assert meta["crs"] == "EPSG:32633" and meta["features"] == 2
    assert list(meta["fields"]) == ["prompt", "score", "cosine", "rank", "model"]
    assert meta["geometry_type"] == "Polygon"
    assert heat.exists()


def test_boxes_are_fitted_to_the_object_by_default_and_refine_min_is_checked(
        tmp_path, raster, rig_folder, capsys):
    code, stdout, _ = _run(["detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder,
                            "--tile", "64", "--window", "1", "--top-k", "1",
                            "--out", str(tmp_path / "b.gpkg"), "--device", "cpu", "--json"], capsys)
    assert code == 0
    info = json.loads(stdout)
    assert info["refined"] == 1
    c0, r0, c1, r1 = info["boxes"][0]["pixel"]   # the planted square is 200..240 x 140..180
    assert abs(c0 - 200) <= 3 and abs(r0 - 140) <= 3 and abs(c1 - 240) <= 3 and abs(r1 - 180) <= 3
    code, _, err = _run(["detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder,
                         "--refine-min", "2", "--out", str(tmp_path / "c.gpkg")], capsys)
    assert code != 0 and "--refine-min" in err and "0 to 1" in err


def test_geojson_dense_mode_and_text_summary(tmp_path, raster, rig_folder, capsys):
    import pyogrio
    out = tmp_path / "boxes.geojson"
    code, stdout, _ = _run(["detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder,
                            "--mode", "dense", "--tile", "64", "--out", str(out)], capsys)
    assert code == 0 and "1 boxes" in stdout and str(out) in stdout
    assert pyogrio.read_info(out)["features"] == 1
    x0, y0, x1, y1 = pyogrio.read_info(out)["total_bounds"]
    assert abs(x0 - (UTM_ORIGIN[0] + 200 * UTM_RES)) <= 4 * UTM_RES
    assert abs(y1 - (UTM_ORIGIN[1] - 140 * UTM_RES)) <= 4 * UTM_RES


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("not_raster", "cannot open"),
    ("empty_prompt", "empty prompt"),
    ("bands", "band 4 does not exist"),
    ("extent", "misses the raster"),
    ("exists", "already exists"),
    ("format", "unknown format"),
    ("extent_syntax", "not 4 comma-separated numbers"),
])
def test_bad_input_exits_2_with_one_line_and_fix_and_no_output(tmp_path, raster, rig_folder,
                                                              capsys, case, words):
    out = tmp_path / "out.gpkg"
    heat = tmp_path / "heat.tif"
    argv = ["detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder, "--tile", "64",
            "--out", str(out), "--heatmap", str(heat)]
    if case == "missing":
        argv[1] = str(tmp_path / "nope.tif")
    elif case == "not_raster":
        bad = tmp_path / "bad.tif"
        bad.write_bytes(b"GIF89a not really")
        argv[1] = str(bad)
    elif case == "empty_prompt":
        argv[3] = "   "
    elif case == "bands":
        argv += ["--bands", "1,2,3,4"]
    elif case == "extent":
        argv += ["--extent", "0,0,10,10", "--extent-crs", "EPSG:4326"]
    elif case == "exists":
        out.write_text("keep me")
    elif case == "format":
        argv[argv.index("--out") + 1] = str(tmp_path / "out.shp")
    elif case == "extent_syntax":
        argv += ["--extent", "1,2,3"]
    code, stdout, stderr = _run(argv, capsys)
    assert code == 2
    lines = [l for l in stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert lines[0].startswith("error:") and words in lines[0]
    assert lines[1].startswith("  fix:")
    assert "Traceback" not in stderr and stdout == ""
    assert not heat.exists()
    if case == "exists":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_overwrite_replaces_outputs(tmp_path, raster, rig_folder, capsys):
    out = tmp_path / "b.geojson"
    out.write_text("old")
    code, _, _ = _run(["detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder, "--tile", "64",
                       "--window", "1", "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and json.loads(out.read_text())["type"] == "FeatureCollection"


def test_subprocess_stdout_is_exactly_one_json_object(tmp_path, raster, rig_folder):
    out = tmp_path / "b.gpkg"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "engine", "detect", raster, "--prompt", RED_PROMPT,
                           "--prompt", "blue pool", "--model", rig_folder, "--tile", "64",
                           "--out", str(out), "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert JSON_KEYS <= set(info) and info["prompts"] == [RED_PROMPT, "blue pool"]
    assert {b["prompt"] for b in info["boxes"]} == {RED_PROMPT, "blue pool"}
    assert out.exists()


def test_a_second_cli_run_reuses_the_first_runs_embeddings_from_disk(tmp_path, raster, rig_folder):
    """Two separate processes: the second prompt is answered from $MAPCLIP_CACHE/embeddings,
    with the boxes an uncached run gives; `cache info` / `cache clear` show and empty it."""
    env = dict(os.environ, PYTHONPATH=ROOT)

    def cli(*argv):
        proc = subprocess.run([sys.executable, "-m", "engine", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def detect(name, *extra):
        out = cli("detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder, "--tile", "64",
                  "--window", "1", "--out", str(tmp_path / name), "--device", "cpu", "--json",
                  "--no-refine", *extra)
        return json.loads(out)

    first = detect("a.gpkg")
    assert first["cache"] == "computed" and first["from_cache"] is False
    info = json.loads(cli("cache", "info", "--json"))
    assert info["entries"] == 1 and info["folder"].startswith(os.environ["MAPCLIP_CACHE"])
    second = detect("b.gpkg", "--prompt", "blue pool")
    assert second["cache"] == "disk" and second["from_cache"] is True
    fresh = detect("c.gpkg", "--prompt", "blue pool", "--no-cache")
    assert fresh["cache"] == "off"
    assert [(b["prompt"], b["pixel"], b["score"]) for b in second["boxes"]] == \
        [(b["prompt"], b["pixel"], b["score"]) for b in fresh["boxes"]]
    assert second["boxes"][0]["pixel"] == [192, 128, 256, 192]
    assert "removed 1 cached" in cli("cache", "clear")
    assert json.loads(cli("cache", "info", "--json"))["entries"] == 0
