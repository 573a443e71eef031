"""One source of truth: the CLI, Processing and the dock ask the engine for the same search.

For the same model and no changes by the user, the three front ends build
DetectOptions that the engine resolves (engine.options.with_model_defaults) to
the same values; a default changed in one place reaches all three.
"""
from __future__ import annotations

import dataclasses

import pytest

pytestmark = pytest.mark.usefixtures("qgis_settings", "clean_project")


def cli_options(model: str, *flags: str):
    from mapclip.engine.cli import build_parser
    from mapclip.engine.cli.detect import options_from_args
    args = build_parser("detect").parse_args(
        ["detect", "scene.tif", "--prompt", "storage tanks", "--model", model, "--out", "b.gpkg",
         *flags])
    return options_from_args(args)


def processing_options(model: str, **params):
    from qgis.core import QgsProcessingContext
    from mapclip.plugin.processing.search_algs import DetectAlgorithm
    alg = DetectAlgorithm()
    alg.initAlgorithm()
    parameters = {d.name(): d.defaultValue() for d in alg.parameterDefinitions()}
    parameters.update({"MODEL": model, **params})
    return alg.detect_options(parameters, QgsProcessingContext(), heatmap=False,
                              top_k=alg.optional_int(parameters, "TOP_K", QgsProcessingContext()),
                              threshold=alg.optional_float(parameters, "THRESHOLD",
                                                           QgsProcessingContext()))


def dock_options(iface, model: str):
    from mapclip.plugin.dock.shell import MapClipDock
    dock = MapClipDock(iface, iface.main_window)
    try:
        dock.select_model(model)
        return dock.params().detect_options(model), dock
    finally:
        dock.shutdown()
        dock.deleteLater()


SEARCH_FIELDS = ("mode", "tile_px", "window", "stride", "batch_size", "top_k", "threshold",
                 "merge", "iou", "attention", "background", "overlap", "cls_token_lambda", "min_valid",
                 "refine", "refine_min", "templates", "cache")


def resolved(options, model: str):
    from mapclip.engine.model.presets import model_defaults
    from mapclip.engine.core.options import with_model_defaults
    o = with_model_defaults(options, model_defaults(model))
    return {k: getattr(o, k) for k in SEARCH_FIELDS}


@pytest.mark.parametrize("model", ["demo", "remoteclip-vit-l-14", "remoteclip-vit-b-32"])
def test_cli_processing_and_dock_ask_for_the_same_search(iface, mapclip, model):
    cli = resolved(cli_options(model), model)
    proc = resolved(processing_options(model), model)
    dock, _ = dock_options(iface, model)
    assert cli == proc == resolved(dock, model)


def test_the_demo_model_searches_with_its_own_tiles_everywhere(iface, mapclip):
    """The demo model's folder says 24 px tiles and a 0.3 threshold; every front end uses them."""
    for options in (cli_options("demo"), processing_options("demo"), dock_options(iface, "demo")[0]):
        r = resolved(options, "demo")
        assert (r["tile_px"], r["window"], r["threshold"], r["top_k"]) == (24, 2, 0.3, 15)
    # dense mode takes the model's dense tile and the dense threshold
    r = resolved(cli_options("demo", "--mode", "dense"), "demo")
    assert (r["tile_px"], r["threshold"]) == (64, 0.5)
    # the dock shows the model's values, not a copy of a generic default
    _, dock = dock_options(iface, "demo")
    assert dock.tile_spin.value() == 24 and abs(dock.threshold_spin.value() - 0.3) < 1e-9


def test_a_default_changed_once_reaches_every_front_end(iface, mapclip, monkeypatch):
    from mapclip.engine.core import options
    monkeypatch.setattr(options, "GENERIC_DEFAULTS",
                        dataclasses.replace(options.GENERIC_DEFAULTS, window=3, top_k=7))
    model = "remoteclip-vit-b-32"
    dock, _ = dock_options(iface, model)
    for o in (cli_options(model), processing_options(model), dock):
        r = resolved(o, model)
        assert (r["window"], r["top_k"]) == (3, 7)


def test_what_the_user_sets_wins_and_is_passed_on(iface, mapclip):
    model = "demo"
    assert resolved(cli_options(model, "--tile", "40"), model)["tile_px"] == 40
    assert resolved(processing_options(model, TILE=40), model)["tile_px"] == 40
    from mapclip.plugin.settings import model_defaults
    params = dataclasses.replace(model_defaults(model), tile_px=40, threshold=None)
    o = params.detect_options(model)
    assert o.tile_px == 40 and o.window is None
    assert resolved(o, model)["threshold"] == 0.0  # "off" in the dock where the model has one


def test_option_errors_are_worded_for_each_front_end(mapclip):
    from mapclip.engine.cli import flag
    from mapclip.engine.core.errors import UsageError, worded
    from mapclip.engine.core.options import DetectOptions, check
    from mapclip.plugin.settings import FIELD_LABELS
    with pytest.raises(UsageError) as err:
        check(DetectOptions(tile_px=0))
    assert err.value.option == "tile_px"
    cli_msg, cli_fix = worded(err.value, flag)
    dock_msg, dock_fix = worded(err.value, FIELD_LABELS.get)
    assert cli_msg.startswith("--tile ") and "--tile" in cli_fix
    assert dock_msg.startswith("Tile size ") and "--" not in dock_msg + dock_fix
    from mapclip.plugin.processing.common import error_text
    text = error_text(err.value)
    assert text.startswith("TILE ") and "--" not in text


def test_reader_processes_and_compile_are_set_alike_from_every_front_end(iface, mapclip):
    """--read-workers / READ_WORKERS / "Reader processes" and --compile / COMPILE /
    "Compile (CUDA)" reach the same engine options; a bad reader count is refused in
    each front end's words."""
    from mapclip.engine.cli import flag
    from mapclip.engine.core.errors import UsageError, worded
    from mapclip.engine.core.options import check
    from mapclip.plugin.dock.shell import MapClipDock
    from mapclip.plugin.processing.common import error_text
    from mapclip.plugin.settings import FIELD_LABELS
    model = "demo"
    dock = MapClipDock(iface, iface.main_window)
    try:
        dock.select_model(model)
        default_dock = dock.params().detect_options(model)
        assert dock.readers_spin.text() == "auto" and not dock.compile_check.isChecked()
        dock.readers_spin.setValue(0)
        dock.compile_check.setChecked(True)
        set_dock = dock.params().detect_options(model)
        dock.save_settings()
        dock.readers_spin.setValue(3)
        dock.select_model(model)                     # the model's remembered values come back
        assert dock.readers_spin.value() == 0 and dock.compile_check.isChecked()
    finally:
        dock.shutdown()
        dock.deleteLater()
    for o in (cli_options(model), processing_options(model), default_dock):
        assert (o.read.workers, o.compile) == ("auto", False)
    for o in (cli_options(model, "--read-workers", "0", "--compile"),
              processing_options(model, READ_WORKERS="0", COMPILE=True), set_dock):
        assert (o.read.workers, o.compile) == (0, True)
    assert processing_options(model, READ_WORKERS=" 3 ").read.workers == 3
    with pytest.raises(UsageError) as err:
        check(processing_options(model, READ_WORKERS="many"))
    assert err.value.option == "read_workers"
    assert error_text(err.value).startswith("READ_WORKERS ")
    assert worded(err.value, FIELD_LABELS.get)[0].startswith("Reader processes ")
    assert worded(err.value, flag)[0].startswith("--read-workers ")


def test_reusing_embeddings_is_on_by_default_and_turned_off_alike_from_every_front_end(iface, mapclip):
    """--no-cache / CACHE / "Reuse embeddings": on unless the user turns it off; the dock
    remembers the choice per model; count options follow the dock's setting too."""
    from mapclip.plugin.dock.shell import MapClipDock
    model = "demo"
    dock = MapClipDock(iface, iface.main_window)
    try:
        dock.select_model(model)
        assert dock.cache_check.isChecked()
        on = dock.params().detect_options(model)
        dock.cache_check.setChecked(False)
        off = dock.params().detect_options(model)
        assert dock.params().count_options(model).cache is False
        dock.save_settings()
        dock.cache_check.setChecked(True)
        dock.select_model(model)
        assert not dock.cache_check.isChecked()
    finally:
        dock.shutdown()
        dock.deleteLater()
    assert cli_options(model).cache and processing_options(model).cache and on.cache
    for o in (cli_options(model, "--no-cache"), processing_options(model, CACHE=False), off):
        assert o.cache is False


def test_the_demo_model_finds_the_same_boxes_from_the_cli_processing_and_the_dock(
        iface, mapclip, tmp_path, provider):
    """Not only the same options: the same boxes, from three real runs on one scene."""
    import processing
    from qgis.core import QgsProcessingFeedback
    from mapclip.engine.detect import detect
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.plugin import tasks
    scene = tmp_path / "scene.tif"
    make_scene(str(scene), width=256, seed=3, mask_path=None, coco_path=None)
    lm = tasks.get_model("demo", "cpu")

    def boxes(options):
        res = detect(str(scene), ["storage tanks"], lm, options=options)
        return [(b.rank, round(b.score, 5), tuple(round(v, 3) for v in b.bounds)) for b in res.boxes]

    cli = boxes(cli_options("demo"))
    dock, _ = dock_options(iface, "demo")
    assert boxes(dock) == cli
    out = processing.run("mapclip:detect", {"INPUT": str(scene), "PROMPTS": "storage tanks",
                                            "MODEL": "demo", "OUTPUT": "memory:"},
                         feedback=QgsProcessingFeedback())["OUTPUT"]
    got = sorted((f["rank"], round(f["score"], 5)) for f in out.getFeatures())
    assert got == [(r, s) for r, s, _ in cli]
