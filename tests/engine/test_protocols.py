"""The published tables' protocols: template ensembles by name or file, SegEarth-OV's
class-token weight as an option with the reference's default, and retrieval's image order
by file name as RemoteCLIP's retrieval.py reads its data."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mapclip.engine import evaluate
from mapclip.engine.classify import classify
from mapclip.engine.cli import main as cli_main
from mapclip.engine.core.errors import UsageError
from mapclip.engine.core.options import (ClassifyOptions, DetectOptions, check, cls_token_lambda_for)
from mapclip.engine.core.templates import TEMPLATE_SETS, read_template_file, template_strings
from mapclip.engine.detect import detect
from mapclip.engine.model.scoring import encode_prompts, resolve_templates
from tests.raster_fixtures import make_raster, noise
from tests.rigged import BLUE, GREY, RED


def _image(path, colour, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.full((64, 80, 3), GREY, np.uint8)
    arr[8:56, 16:64] = colour
    arr = np.clip(arr.astype(int) + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _cli(capsys, argv):
    rc = cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# --------------------------------------------------------------------------- #
# Template ensembles.
# --------------------------------------------------------------------------- #
def test_named_sets_are_the_references_ensembles():
    for name, temps in TEMPLATE_SETS.items():
        assert temps and all(t.count("{}") == 1 for t in temps), name
        assert len(set(temps)) == len(temps), name
    assert TEMPLATE_SETS["mapclip"] == TEMPLATE_SETS["remote-sensing"]
    # RS5M: 35 phrasings for each of three image words, "an" before "aerial"
    rs5m = TEMPLATE_SETS["rs5m"]
    assert len(rs5m) == 105
    for word in ("a remote sensing image", "an aerial image", "a satellite image"):
        kind = word.split(" ", 1)[1]
        assert sum(kind in t for t in rs5m) == 35 and sum(t.startswith(word + " of") for t in rs5m) == 15
    assert "a low resolution aerial image of a {}." in rs5m and "a aerial" not in " ".join(rs5m)
    # OpenAI: six image words, each bare, with "a" and with "the"
    openai = TEMPLATE_SETS["openai"]
    assert {t.split(" of ")[0] for t in openai} == {"satellite imagery", "aerial imagery", "satellite photo",
                                                    "aerial photo", "satellite view", "aerial view"}
    assert {t.split(" of ")[1] for t in openai} == {"{}.", "a {}.", "the {}."}
    assert "{} from above" in TEMPLATE_SETS["clip_benchmark"]
    distinct = {tuple(v) for k, v in TEMPLATE_SETS.items() if k != "remote-sensing"}
    assert len(distinct) == len(TEMPLATE_SETS) - 1


def test_template_file_one_per_line_and_its_errors(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# my ensemble\na drone photo of {}.\n\n  {} seen from orbit  \n")
    assert read_template_file(good) == ("a drone photo of {}.", "{} seen from orbit")
    assert template_strings(str(good)) == read_template_file(good)
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}.\na photo\n")
    with pytest.raises(UsageError) as err:
        template_strings(str(bad))
    assert "line 2" in err.value.message and "{}" in err.value.hint and err.value.option == "templates"
    cb = tmp_path / "cb.txt"
    cb.write_text("a sattelite image of {c}\n")
    with pytest.raises(UsageError) as err:
        template_strings(str(cb))
    assert "{c}" in err.value.hint
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(UsageError, match="holds no templates"):
        template_strings(str(empty))
    with pytest.raises(UsageError, match="does not exist"):
        template_strings(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="unknown prompt template set 'openia'"):
        template_strings("openia")
    # every options class checks a file as it checks a set name
    check(DetectOptions(templates=str(good)))
    with pytest.raises(UsageError) as err:
        check(ClassifyOptions(templates=str(bad)))
    assert err.value.option == "templates"


def test_default_stays_the_models_and_a_name_or_file_reaches_the_encoder(tmp_path, tiny_model):
    assert resolve_templates(None, tiny_model) == TEMPLATE_SETS["mapclip"]     # the preset's default
    f = tmp_path / "t.txt"
    f.write_text("a drone photo of {}.\n")
    for choice, temps in (("rs5m", TEMPLATE_SETS["rs5m"]), (str(f), ("a drone photo of {}.",))):
        got = encode_prompts(tiny_model, ["ships"], choice)
        want = encode_prompts(tiny_model, ["ships"], list(temps))
        assert np.allclose(got.numpy(), want.numpy(), atol=1e-6)
        assert not np.allclose(got.numpy(), encode_prompts(tiny_model, ["ships"], "raw").numpy(), atol=1e-4)


def test_raw_ensemble_mean_averages_the_text_towers_embeddings_as_georsclip_does(tiny_model):
    import torch
    import torch.nn.functional as F
    temps = list(TEMPLATE_SETS["rs5m"][:6])
    with torch.no_grad():
        tokens = tiny_model.tokenizer([t.replace("{}", "harbour") for t in temps]).to(tiny_model.device)
        emb = tiny_model.model.encode_text(tokens).float()
    want_raw = F.normalize(emb.mean(dim=0), dim=-1)                      # GeoRSCLIP's zeroshot_classifier
    want_each = F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1)  # CLIP's notebook
    raw = encode_prompts(tiny_model, ["harbour"], temps, mean="raw")[0]
    each = encode_prompts(tiny_model, ["harbour"], temps)[0]
    assert torch.allclose(raw, want_raw, atol=1e-5) and torch.allclose(each, want_each, atol=1e-5)
    assert not torch.allclose(raw, each, atol=1e-4)
    with pytest.raises(ValueError):
        encode_prompts(tiny_model, ["harbour"], temps, mean="median")


def test_eval_classify_takes_every_named_ensemble_and_a_file(tmp_path, rig_folder, capsys):
    data = tmp_path / "scenes"
    for i in range(2):
        _image(data / "red" / f"{i}.png", RED, seed=i)
        _image(data / "blue" / f"{i}.png", BLUE, seed=5 + i)
    names = tmp_path / "classes.txt"
    names.write_text("blue\tblue pool\nred\tred roof\n")
    base = ["eval", "classify", str(data), "--classes", str(names), "--model", str(rig_folder),
            "--device", "cpu", "--json"]
    for name in ("openai", "rs5m", "clip_benchmark", "mapclip"):
        rc, out, err = _cli(capsys, base + ["--templates", name])
        assert rc == 0, err
        res = json.loads(out)
        assert res["templates"] == list(TEMPLATE_SETS[name]) and res["top1"] == 100.0, name
    f = tmp_path / "mine.txt"
    f.write_text("a drone photo of {}.\nan orthophoto of {}.\n")
    rc, out, _ = _cli(capsys, base + ["--templates", str(f)])
    assert rc == 0 and json.loads(out)["templates"] == ["a drone photo of {}.", "an orthophoto of {}."]
    f.write_text("a drone photo of {}.\nan orthophoto\n")
    rc, _, err = _cli(capsys, base + ["--templates", str(f)])
    assert rc == 2 and "line 2" in err and "--templates" in err
    rc, out, _ = _cli(capsys, base + ["--templates", "rs5m", "--ensemble-mean", "raw"])
    assert rc == 0 and json.loads(out)["ensemble_mean"] == "raw"
    rc, _, err = _cli(capsys, base + ["--templates", "nonsense"])
    assert rc == 2 and "unknown prompt template set" in err and "rs5m" in err


# --------------------------------------------------------------------------- #
# SegEarth-OV's class-token weight.
# --------------------------------------------------------------------------- #
def test_class_token_weight_defaults_to_the_references_where_the_mode_is_named_after_it():
    assert cls_token_lambda_for("segearth") == -0.3
    assert cls_token_lambda_for("qq+kk+vv") == -0.3                 # the old name of the same mode
    assert all(cls_token_lambda_for(m) == 0.0 for m in ("clearclip", "sclip", "sclip-style", "kk", "vv"))
    assert cls_token_lambda_for("segearth", 0.0) == 0.0 and cls_token_lambda_for("clearclip", -0.5) == -0.5
    assert DetectOptions().cls_token_lambda is None and ClassifyOptions().cls_token_lambda is None
    with pytest.raises(UsageError) as err:
        check(DetectOptions(cls_token_lambda=20.0))
    assert err.value.option == "cls_token_lambda"


def test_detect_applies_the_segearth_default_and_the_weight_changes_the_heatmap(tmp_path, tiny_model):
    path = str(make_raster(tmp_path / "s.tif", width=128, height=128, data=noise(3, 128, 128, seed=4)))

    def heat(**kw):
        opts = DetectOptions(mode="dense", tile_px=64, attention="segearth", refine=False, cache=False, **kw)
        return detect(path, ["ships"], tiny_model, options=opts).heatmap

    default, ref, none, other = heat(), heat(cls_token_lambda=-0.3), heat(cls_token_lambda=0.0), \
        heat(cls_token_lambda=-1.0)
    assert np.array_equal(default, ref)
    assert not np.allclose(default, none, atol=1e-4) and not np.allclose(default, other, atol=1e-4)


def test_classify_applies_the_segearth_default(tmp_path, tiny_model, one_torch_thread):
    raster = str(make_raster(tmp_path / "c.tif", width=96, height=96, data=noise(3, 96, 96, seed=5)))

    def scores(**kw):
        opts = ClassifyOptions(attention="segearth", scores=True, cache=False, **kw)
        return classify(raster, ["water", "forest"], tiny_model, options=opts).scores

    default = scores()
    assert np.array_equal(default, scores(cls_token_lambda=-0.3))
    assert not np.allclose(default, scores(cls_token_lambda=0.0), atol=1e-4)


def test_cli_flag_sets_the_class_token_weight(tmp_path, capsys):
    import argparse

    from mapclip.engine.cli import classify as cli_classify
    from mapclip.engine.cli import detect as cli_detect
    for mod, argv in ((cli_detect, ["detect", "r.tif", "--prompt", "ships", "--out", "o.gpkg"]),
                      (cli_classify, ["classify", "r.tif", "--class", "water", "--out", "o.tif"])):
        parser = argparse.ArgumentParser()
        mod.register(parser.add_subparsers())
        args = parser.parse_args(argv + ["--cls-token-lambda", "-0.5"])
        assert mod.options_from_args(args).cls_token_lambda == -0.5
        assert mod.options_from_args(parser.parse_args(argv)).cls_token_lambda is None
        slide = mod.options_from_args(parser.parse_args(argv + ["--dense-input", "128", "--dense-slide"]))
        assert slide.dense_input_px == 128 and slide.dense_slide is True      # SegEarth-OV's sliding crops
    raster = make_raster(tmp_path / "r.tif", width=64, height=64)
    rc, _, err = _cli(capsys, ["detect", str(raster), "--prompt", "ships", "--model", "test-tiny",
                               "--mode", "dense", "--cls-token-lambda", "20", "--device", "cpu",
                               "--out", str(tmp_path / "o.gpkg")])
    assert rc == 2 and "--cls-token-lambda" in err


# --------------------------------------------------------------------------- #
# Retrieval: the image order decides ties.
# --------------------------------------------------------------------------- #
def _tied_set(tmp_path, captions):
    """Identical red pictures b.png and a.png (in that order in the data) and a blue c.png."""
    imgs = tmp_path / "images"
    pictures = {"b.png": RED, "a.png": RED, "c.png": BLUE}
    for name, colour in pictures.items():
        _image(imgs / name, colour, seed=1)
    entries = [{"filename": n, "split": "test", "sentences": [{"raw": c} for c in captions[n]]}
               for n in pictures]
    js = tmp_path / "dataset.json"
    js.write_text(json.dumps({"images": entries}))
    return js, imgs


def test_image_order_by_file_name_as_remoteclip_reads_it(tmp_path):
    caps = {"b.png": ["red roof b"], "a.png": ["red roof a1", "red roof a2"], "c.png": ["blue pool"]}
    js, imgs = _tied_set(tmp_path, caps)
    paths, captions, owner = evaluate.read_retrieval_data(str(js), str(imgs), order="name")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["a.png", "b.png", "c.png"]
    assert captions == ["red roof a1", "red roof a2", "red roof b", "blue pool"] and owner == [0, 0, 1, 2]
    paths, captions, owner = evaluate.read_retrieval_data(str(js), str(imgs), order="data")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["b.png", "a.png", "c.png"]
    assert captions == ["red roof b", "red roof a1", "red roof a2", "blue pool"] and owner == [0, 1, 1, 2]
    # one caption per image: RemoteCLIP's reader keeps the data's order
    js1, _ = _tied_set(tmp_path / "one", {"b.png": ["red roof"], "a.png": ["red roof"], "c.png": ["blue pool"]})
    paths, _, _ = evaluate.read_retrieval_data(str(js1), str(tmp_path / "one" / "images"), order="name")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["b.png", "a.png", "c.png"]
    with pytest.raises(UsageError) as err:
        evaluate.read_retrieval_data(str(js), str(imgs), order="random")
    assert err.value.option == "order"


def test_file_name_order_changes_tied_recall(tmp_path, rig_folder, capsys):
    """b.png and a.png are the same picture, so every caption scores them equally; the
    first in order wins the tie. By name a.png is first: its two captions hit, b's one
    misses (t2i R@1 3 of 4); in the data's order b.png is first (t2i R@1 2 of 4)."""
    caps = {"b.png": ["red roof b"], "a.png": ["red roof a1", "red roof a2"], "c.png": ["blue pool"]}
    js, imgs = _tied_set(tmp_path, caps)
    got = {}
    for order in ("name", "data"):
        rc, out, err = _cli(capsys, ["eval", "retrieval", str(js), "--images", str(imgs), "--model",
                                     str(rig_folder), "--device", "cpu", "--json", "--order", order])
        assert rc == 0, err
        got[order] = json.loads(out)
        assert got[order]["order"] == order
    assert got["name"]["t2i_r1"] == pytest.approx(75.0)
    assert got["data"]["t2i_r1"] == pytest.approx(50.0)
    rc, out, _ = _cli(capsys, ["eval", "retrieval", str(js), "--images", str(imgs), "--model",
                               str(rig_folder), "--device", "cpu", "--json"])
    assert json.loads(out)["t2i_r1"] == got["name"]["t2i_r1"]            # the default: RemoteCLIP's
