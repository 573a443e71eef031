"""Counting: RemoteCount captions and argmax, heatmap components, plurals, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from affine import Affine

from mapclip.engine import count as ct
from mapclip.engine.core.errors import UsageError
from mapclip.engine.core.outputs import _pyogrio_raw
from tests.raster_fixtures import UTM_ORIGIN, UTM_RES, make_raster
from tests.rigged import GREY, RED, rigged_model, save_rigged_folder

SQUARES = [(10, 10), (100, 20), (60, 90)]   # (col, row) of 12-px red squares


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rigged():
    return rigged_model()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    grey = GREY[0] + np.random.default_rng(0).integers(-10, 10, (1, 128, 192))
    data = np.repeat(grey, 3, axis=0).astype(np.uint8)      # grey noise: no tile is constant
    for c, r in SQUARES:
        data[:, r:r + 12, c:c + 12] = np.array(RED, np.uint8)[:, None, None]
    return make_raster(tmp_path_factory.mktemp("count") / "scene.tif", data=data)


# ----------------------------------------------------------------- words --
def test_plurals_articles_and_counts_read_right():
    assert ct.counted("ships", 1) == "1 ship" and ct.counted("ship", 3) == "3 ships"
    assert ct.counted("storage tanks", 36) == "36 storage tanks"      # digits, never "many"
    assert ct.plural("box", 2) == "boxes" and ct.plural("ferry", 2) == "ferries"
    assert ct.plural("person", 4) == "people" and ct.plural("storage tank", 2) == "storage tanks"
    for many, one in (("ships", "ship"), ("ferries", "ferry"), ("boxes", "box"), ("people", "person"),
                      ("buses", "bus"), ("houses", "house"), ("storage tanks", "storage tank"),
                      ("piles of sand", "pile of sand"), ("sheep", "sheep"), ("bus", "bus"),
                      ("glass", "glass"), ("airplane", "airplane")):
        assert ct.singular(many) == one, many


def test_remotecount_captions_in_words_and_digits():
    caps = ct.count_captions("ships")
    assert caps["words"][0] == "there is one ship in the image"
    assert caps["words"][2] == "there are three ships in the image"
    assert caps["words"][9] == "there are ten ships in the image"
    assert caps["digits"][0] == "there is 1 ship in the image"
    assert caps["digits"][6] == "there are 7 ships in the image"
    assert len(caps["words"]) == len(caps["digits"]) == 10
    assert ct.caption("ferry", 0) == "there are no ferries in the image"
    assert ct.caption("person", 2, "words") == "there are two people in the image"
    with pytest.raises(UsageError):
        ct.count_captions("  ")


def test_argmax_over_both_variants_smaller_count_on_ties():
    sims = np.zeros((2, 10))
    sims[0, 3], sims[1, 3] = 0.30, 0.10      # four: mean 0.20
    sims[0, 5], sims[1, 5] = 0.05, 0.30      # six: mean 0.175
    n, scores = ct.argmax_count(sims)
    assert n == 4 and scores[3] == pytest.approx(0.2) and scores.shape == (10,)
    tie = np.full((2, 10), 0.1)
    assert ct.argmax_count(tie)[0] == 1
    zero_best = np.array([[0.3] + [0.1] * 9] * 2)
    assert ct.argmax_count(zero_best, list(range(10)))[0] == 0


# ------------------------------------------------------------ components --
def test_heatmap_components_are_counted_exactly_with_map_boxes():
    heat = np.zeros((20, 30), np.float32)
    heat[2:5, 3:7] = 0.9            # object 1: 3 x 4 cells
    heat[10:12, 20:29] = 0.7        # object 2
    heat[15, 2] = 0.8               # a one-cell speck
    heat[16:19, 10:13] = 0.4        # below the threshold
    heat[0, 29] = np.nan            # unscored cells never count
    tf = Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0)   # 2 map units per cell
    boxes = ct.heatmap_count(heat, tf, threshold=0.5)
    assert len(boxes) == 3
    assert [b.score for b in boxes] == pytest.approx([0.9, 0.8, 0.7])
    assert boxes[0].bounds == (1006.0, 4990.0, 1014.0, 4996.0) and boxes[0].area == 12
    assert len(ct.heatmap_count(heat, tf, threshold=0.5, min_area=2)) == 2
    assert len(ct.heatmap_count(heat, tf, threshold=0.3)) == 4
    assert ct.heatmap_count(np.zeros((4, 4)), tf, threshold=0.5) == []


# ------------------------------------------------------------ end to end --
def images_show_three(monkeypatch) -> dict:
    """Stub encoders: every image embeds as the captions for three do; returns what they saw
    (``prompts``: the captions encoded, ``shapes``: the image batches)."""
    from mapclip.engine.model import encode as enc
    seen = {}

    def fake_text(lm, prompts, batch_size=256, cache=True):
        seen["prompts"] = list(prompts)
        out = torch.zeros(len(prompts), 4)
        for i, p in enumerate(prompts):
            out[i, 0 if (" three " in p or " 3 " in p) else 1] = 1.0
        return out

    def fake_images(lm, batch):
        seen.setdefault("shapes", []).append(tuple(batch.shape))
        e = torch.zeros(len(batch), 4)
        e[:, 0] = 1.0
        return e

    monkeypatch.setattr(enc, "encode_text", fake_text)
    monkeypatch.setattr(enc, "encode_images", fake_images)
    return seen


def test_prompt_count_plumbing_picks_the_caption_that_matches(scene, rigged, monkeypatch):
    """Stub encoders: the image embedding equals the text embedding of the captions
    for three; the count must come back as 3, from both variants."""
    seen = images_show_three(monkeypatch)
    res = ct.count(str(scene), "ships", rigged, method="prompt")
    assert res.count == 3 and res.prompt.count == 3 and res.method == "prompt"
    assert res.prompt.by_variant == {"words": 3, "digits": 3} and res.dense is None
    assert seen["prompts"][:10] == ct.count_captions("ship")["words"]
    assert seen["prompts"][10:] == ct.count_captions("ship")["digits"]
    assert seen["shapes"] == [(1, 64, 64, 3)]            # the extent as one model-size image
    assert res.summary() == ("count: 3 ships (prompt method: RemoteCount captions, "
                             "the area as one image, 1 to 10)")
    # per tile: 6 tiles of 64 px, each "three", with the zero caption added
    res = ct.count(str(scene), "ship", rigged, method="prompt", options=ct.CountOptions(tile_px=64))
    assert res.prompt.counts[0] == 0 and len(res.prompt.tiles) == 6
    assert res.prompt.count == 18 and all(t["count"] == 3 for t in res.prompt.tiles)
    assert res.summary().startswith("count: 18 ships (prompt method: RemoteCount captions, summed over 6 tiles)")


def test_dense_count_finds_each_planted_object(scene, rigged):
    res = ct.count(str(scene), "red roofs", rigged, method="both")
    assert res.method == "both" and res.dense.count == 3 and res.count == 3
    assert res.prompt is not None and res.dense.method == "dense" and res.prompt.method == "prompt"
    x0, y0 = UTM_ORIGIN
    for c, r in SQUARES:          # every square lies in exactly one box
        cx, cy = x0 + (c + 6) * UTM_RES, y0 - (r + 6) * UTM_RES
        inside = [b for b in res.dense.boxes
                  if b.bounds[0] <= cx <= b.bounds[2] and b.bounds[1] <= cy <= b.bounds[3]]
        assert len(inside) == 1
    assert res.summary().startswith("count: 3 red roofs (dense method: heatmap peaks >= 0.5); "
                                    "also run: ") and res.dense.peaks
    assert f"also run: {ct.counted('red roof', res.prompt.count)} (prompt method" in res.summary()
    # an extent around one square counts one
    c, r = SQUARES[1]
    ext = (x0 + (c - 8) * UTM_RES, y0 - (r + 20) * UTM_RES, x0 + (c + 20) * UTM_RES, y0 - (r - 8) * UTM_RES)
    one = ct.count(str(scene), "red roof", rigged, extent=ext, method="dense")
    assert one.dense.count == 1 and one.summary().startswith("count: 1 red roof (dense method")
    assert "also run" not in one.summary()


def test_bad_count_input(scene, rigged):
    with pytest.raises(UsageError, match="object"):
        ct.count(str(scene), " ", rigged)
    with pytest.raises(UsageError, match="method"):
        ct.count(str(scene), "ship", rigged, method="guess")
    with pytest.raises(UsageError, match="misses the raster"):
        ct.count(str(scene), "ship", rigged, extent=(0, 0, 1, 1))
    with pytest.raises(UsageError, match="threshold"):
        ct.count(str(scene), "ship", rigged, method="dense", options=ct.CountOptions(threshold=3))


def test_dense_count_refuses_a_model_without_patch_features(scene, rigged, monkeypatch):
    """The dense method counts the dense pass's heatmap; a model that cannot give one (no
    ViT patch tokens) is refused with the prompt method as the fix, before any tile is read."""
    from mapclip.engine.model import dense
    monkeypatch.setattr(dense, "dense_unsupported", lambda lm: "RN50 is not a ViT")
    with pytest.raises(UsageError, match="RN50 is not a ViT") as err:
        ct.count(str(scene), "red roof", rigged, method="dense")
    assert err.value.option == "method" and "--method prompt" in err.value.hint


def test_cli_count_contract(scene, tmp_path, capsys):
    from mapclip.engine.cli import main
    raw = _pyogrio_raw()
    spec = str(save_rigged_folder(tmp_path / "model"))
    out = tmp_path / "roofs.gpkg"
    assert main(["count", str(scene), "--object", "red roof", "--model", spec, "--method", "both",
                 "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "both" and info["dense"]["count"] == 3 and info["count"] == 3
    assert info["prompt"]["method"] == "prompt" and len(info["prompt"]["captions"]["digits"]) == 10
    assert len(info["dense"]["boxes"]) == 3 and info["out"] == str(out)
    meta, _, geom, fields = raw.read(str(out))
    assert len(geom) == 3 and meta["crs"] == "EPSG:32633"
    assert list(fields[list(meta["fields"]).index("object")]) == ["red roof"] * 3
    assert main(["count", str(scene), "--object", "red roof", "--model", spec, "--out",
                 str(tmp_path / "x.gpkg")]) == 2                      # prompt method has no boxes
    assert "--method dense" in capsys.readouterr().err
    assert main(["count", str(scene), "--object", "red roof", "--model", spec]) == 0
    assert capsys.readouterr().out.startswith("count: ")
    assert main(["count", str(scene), "--object", "red roof", "--model", spec, "--method", "dense",
                 "--no-peaks", "--no-calibrate", "--json"]) == 0
    blobs = json.loads(capsys.readouterr().out)["dense"]
    assert blobs["count"] == 3 and blobs["peaks"] is False
    assert main(["count", str(scene), "--object", "red roof", "--model", spec, "--method", "dense",
                 "--peak-distance", "0"]) == 2
    assert "--peak-distance" in capsys.readouterr().err


def _result(prompt_count=None, dense_count=None, tiles=0):
    prompt = (ct.PromptCount(count=prompt_count, counts=list(ct.COUNT_RANGE), scores=[0.0] * 10,
                             by_variant={}, captions={}, tiles=[{"count": 0}] * tiles)
              if prompt_count is not None else None)
    dense = (ct.DenseCount(count=dense_count, threshold=0.5, min_area=1, boxes=[], peaks=True)
             if dense_count is not None else None)
    method = "both" if prompt and dense else ("prompt" if prompt else "dense")
    return ct.CountResult(object="storage tanks", method=method, prompt=prompt, dense=dense,
                          crs=None, model="m", device="cpu", seconds=0.0)


def test_summary_says_which_method_gives_the_count_in_digits():
    both = _result(prompt_count=1, dense_count=53)
    assert both.count == 53 and both.counted_by == "dense"
    assert both.summary() == ("count: 53 storage tanks (dense method: heatmap peaks >= 0.5); "
                              "also run: 1 storage tank (prompt method: RemoteCount captions, "
                              "the area as one image, 1 to 10)")
    tiled = _result(prompt_count=18, tiles=6)
    assert tiled.counted_by == "prompt" and "many" not in tiled.summary()
    assert tiled.summary() == ("count: 18 storage tanks (prompt method: RemoteCount captions, "
                               "summed over 6 tiles)")
    assert tiled.to_json()["summary"] == tiled.summary() and tiled.to_json()["count"] == 18


def test_cli_prints_the_count_as_a_number_as_json_does(scene, tmp_path, capsys, monkeypatch):
    """18 objects over 6 tiles: the text line says 18, as the JSON does (not "many ships")."""
    from mapclip.engine.cli import main
    images_show_three(monkeypatch)
    spec = str(save_rigged_folder(tmp_path / "model"))
    args = ["count", str(scene), "--object", "ships", "--model", spec, "--tile", "64", "--no-cache"]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 18
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("count: 18 ships (prompt method") and "many" not in out


# ----------------------------------------------------------- calibration --
def test_fit_count_bias_corrects_a_model_that_favours_one_count():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(1, 11), 6)
    scores = rng.normal(0, 0.002, (len(truth), 10))
    scores[np.arange(len(truth)), truth - 1] += 0.02   # the right caption scores a little higher
    scores[:, 3] += 0.05                               # but "four" always wins
    raw = np.arange(1, 11)[np.argmax(scores, axis=1)]
    assert (raw == 4).all()
    bias = ct.fit_count_bias(scores, truth)
    assert len(bias) == 10 and abs(sum(bias)) < 1e-3 and bias[3] == min(bias)
    got = np.array([ct.argmax_count(s, bias=bias)[0] for s in scores])
    assert (got == truth).mean() > 0.9
    with pytest.raises(ValueError):
        ct.fit_count_bias(scores, truth[:-1])


def test_prompt_count_adds_the_models_count_bias_unless_told_not_to(scene, rigged, monkeypatch):
    """Stub encoders make "three" win by a little; a calibration that favours "seven" turns it."""
    from dataclasses import replace

    from mapclip.engine.model import encode as enc

    def fake_text(lm, prompts, batch_size=256, cache=True):
        out = torch.zeros(len(prompts), 4)
        for i, p in enumerate(prompts):
            out[i, 0 if (" three " in p or " 3 " in p) else 1] = 1.0
        return out

    def fake_images(lm, batch):
        e = torch.zeros(len(batch), 4)
        e[:, 0], e[:, 1] = 0.6, 0.5   # cosine 0.6 for "three", 0.5 for every other count
        return e

    monkeypatch.setattr(enc, "encode_text", fake_text)
    monkeypatch.setattr(enc, "encode_images", fake_images)
    bias = tuple(0.2 if n == 7 else 0.0 for n in range(1, 11))
    monkeypatch.setattr(rigged, "defaults", replace(rigged.defaults, count_bias=bias))
    cal = ct.count(str(scene), "ships", rigged, method="prompt")
    assert cal.count == 7 and cal.prompt.calibrated and cal.prompt.to_json()["calibrated"]
    raw = ct.count(str(scene), "ships", rigged, method="prompt", options=ct.CountOptions(calibrate=False))
    assert raw.count == 3 and not raw.prompt.calibrated


def test_model_defaults_read_a_count_bias_of_ten_numbers_only():
    from mapclip.engine.core.options import ModelDefaults
    good = ModelDefaults.from_json({"tile_px": 24, "count_bias": [0.01] * 10})
    assert good.count_bias == (0.01,) * 10 and good.to_json(weight_bound=True)["count_bias"] == [0.01] * 10
    assert good.to_json() == {"tile_px": 24}   # what fine-tuning copies: not the calibration
    for bad in ([0.01] * 9, "0.1", [0.01] * 9 + ["x"], [0.01] * 9 + [float("nan")]):
        assert ModelDefaults.from_json({"count_bias": bad}).count_bias is None


@pytest.mark.parametrize("bad", [dict(calibrate="no"), dict(peaks=1), dict(peak_distance=0)])
def test_count_options_are_checked(scene, rigged, bad):
    with pytest.raises(UsageError) as e:
        ct.count(str(scene), "ship", rigged, options=ct.CountOptions(**bad))
    assert e.value.option == next(iter(bad))


def test_dense_count_separates_touching_objects_by_their_peaks():
    heat = np.zeros((12, 20), np.float32)
    yy, xx = np.mgrid[0:12, 0:20]
    for cx in (5, 10, 15):           # three bumps in a row that touch above 0.5
        heat = np.maximum(heat, np.exp(-((xx - cx) ** 2 + (yy - 6) ** 2) / 8.0))
    tf = Affine(2.0, 0, 100.0, 0, -2.0, 200.0)
    blobs = ct.heatmap_count(heat, tf, 0.5)
    peaks = ct.heatmap_count(heat, tf, 0.5, peaks=True, peak_distance=2)
    assert len(blobs) == 1 and len(peaks) == 3
    centres = sorted((b.bounds[0] + b.bounds[2]) / 2 for b in peaks)
    assert centres == pytest.approx([100 + 2 * 5.5, 100 + 2 * 10.5, 100 + 2 * 15.5], abs=2.5)
    # peaks closer than the distance are one object
    assert len(ct.heatmap_count(heat, tf, 0.5, peaks=True, peak_distance=11)) == 1
