"""What the command line prints in words: map coordinates, defaults, help."""
from __future__ import annotations

import json
import re

import pytest

from mapclip.engine.cli import main, map_bounds
from tests.raster_fixtures import WGS84, make_raster

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_map_bounds_print_whole_metres_to_the_cm_and_degrees_to_7_decimals():
    assert map_bounds((500000.0, 5299966.25, 500128.0, 5300000.0), "EPSG:32633") == \
        "500000.00, 5299966.25, 500128.00, 5300000.00"
    assert map_bounds((13.4012345678, 52.5, 13.42, 52.51), WGS84) == \
        "13.4012346, 52.5000000, 13.4200000, 52.5100000"
    assert map_bounds((0, -64, 32, -32), None) == "0.00, -64.00, 32.00, -32.00"   # pixels


@pytest.mark.parametrize("crs, decimals", [("EPSG:32633", 2), (WGS84, 7)])
def test_cli_detect_prints_box_bounds_with_every_digit(tmp_path, capsys, crs, decimals):
    kw = {} if crs != WGS84 else {"origin": (13.4, 52.5), "res": 1e-5}
    raster = make_raster(tmp_path / "r.tif", 64, 64, crs=crs, **kw)
    args = ["detect", str(raster), "--prompt", "a roof", "--model", "test-tiny", "--tile", "32",
            "--out", str(tmp_path / "b.gpkg"), "--no-cache"]
    assert main(args) == 0
    out = capsys.readouterr().out
    printed = re.findall(r"bounds (.*)", out)
    assert printed and "e+" not in out
    assert main(args + ["--overwrite", "--json"]) == 0
    boxes = json.loads(capsys.readouterr().out)["boxes"]
    for text, box in zip(printed, boxes):
        values = [float(v) for v in text.split(", ")]
        assert all(len(v.split(".")[1]) == decimals for v in text.split(", "))
        assert values == pytest.approx(box["bounds"], abs=10 ** -decimals)


@pytest.mark.parametrize("command", [["detect", "r.tif", "--prompt", "a", "--out", "b.gpkg"],
                                     ["count", "r.tif", "--object", "a"],
                                     ["classify", "r.tif", "--class", "a", "--out", "c.tif"],
                                     ["caption", "r.tif"],
                                     ["finetune", "--data", "c.csv", "--out", "run"]])
def test_model_defaults_to_the_preset_the_help_calls_default(command, capsys):
    from mapclip.engine.cli import build_parser
    from mapclip.engine.model.presets import DEFAULT_MODEL, PRESETS
    assert "the default" in PRESETS[DEFAULT_MODEL].description
    parser = build_parser()
    assert parser.parse_args(command).model == DEFAULT_MODEL
    with pytest.raises(SystemExit):
        build_parser(command[0]).parse_args([command[0], "--help"])
    assert f"default {DEFAULT_MODEL}" in " ".join(capsys.readouterr().out.split())


def test_index_takes_the_index_model_when_adding_else_the_default(tmp_path, capsys, monkeypatch):
    from mapclip.engine.cli import build_parser
    from mapclip.engine.cli import index as cli_index
    from mapclip.engine.model.presets import DEFAULT_MODEL
    raster = make_raster(tmp_path / "r.tif", 64, 64)
    assert main(["index", str(raster), "--model", "test-tiny", "--tile", "32", "--out",
                 str(tmp_path / "old")]) == 0
    seen = []
    monkeypatch.setattr("mapclip.engine.archive.build.build_index",
                        lambda sources, out, model, *a, **k: seen.append(model) or 1 / 0)
    for out in ("old", "new"):
        args = build_parser("index").parse_args(["index", str(raster), "--out", str(tmp_path / out)])
        with pytest.raises(ZeroDivisionError):
            cli_index.run(args)
    assert seen == ["test-tiny", DEFAULT_MODEL]


def _help(command: str, capsys) -> str:
    from mapclip.engine.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["detect", "classify", "caption", "count"])
def test_bands_help_names_the_order_it_reads(command, capsys):
    text = _help(command, capsys)
    assert "--bands R,G,B" in text and "B,G,R" not in text


def test_classify_tile_help_reads_as_one_sentence(capsys):
    text = _help("classify", capsys)
    tile = text[text.index("--tile PX "):text.index("--overlap F ")]
    assert tile.count("default:") == 1 and tile.count("(") == tile.count(")") == 1


def test_engine_messages_name_flags_that_exist():
    from mapclip.engine.classify import clean_classes
    from mapclip.engine.cli import build_parser
    from mapclip.engine.core.errors import UsageError, flag, renamed, worded
    detect_flags = build_parser("detect")._subparsers._group_actions[0].choices["detect"]._option_string_actions
    assert flag("dense_input_px") in detect_flags            # --dense-input, not --dense-input-px
    # m2b's --classes stays itself on the command line (classify's flag is --class)
    assert renamed("check the --classes path", flag) == "check the --classes path"
    assert renamed("give --class twice", lambda o: {"classes": "Classes"}.get(o)) == "give Classes twice"
    with pytest.raises(UsageError) as err:
        clean_classes(["water", "unknown"])
    assert "use --threshold" in worded(err.value, flag)[1]
