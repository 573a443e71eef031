"""PIR (--recipe pir) against PIR-CLIP's published code (tests/fixtures/pir_reference, see its
SOURCE.md) on shared seeded random weights: the modules' outputs and the loss within 1e-5, one
training step's gradients within 1e-4; then the recipe's refusals and its prior checkpoint."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mapclip.engine.core.errors import UsageError
from mapclip.engine.data.captions import read_captions
from mapclip.engine.finetune import pir as pir_recipe
from mapclip.engine.finetune.train import affiliation_loss, recipe_loss, train_step
from mapclip.engine.model.architectures import build_model
from mapclip.engine.model.pir import has_prior, instruct
from tests.fixtures.pir_reference import loss as ref_loss
from tests.fixtures.pir_reference import model as ref_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the reference hard-codes its prior projection as Linear(512, 768): embedding 512, ViT width
#: 768; everything else small (one block per tower, a 16-wide prior, 128 px, 4 x 4 patches)
VISION = {"image_size": 128, "layers": 1, "width": 768, "patch_size": 32, "head_width": 64}
PRIOR = {"res_layers": [1, 1, 1, 1], "res_width": 16, "head_width": 64}
TEXT = {"context_length": 12, "vocab_size": 300, "width": 64, "heads": 2, "layers": 1}


def reference_and_ours(seed: int = 0):
    torch.manual_seed(seed)
    ref = ref_model.CLIP(512, dict(VISION, res_layers=PRIOR["res_layers"], res_width=PRIOR["res_width"],
                                   output_tokens=True),  # as its PIR.json
                         dict(TEXT))
    with torch.no_grad():  # the reference leaves the text projection uninitialised (torch.empty)
        ref.text_projection.normal_(std=TEXT["width"] ** -0.5)
        ref.positional_embedding.normal_(std=0.01)
    ours = build_model({"embed_dim": 512, "vision_cfg": dict(VISION), "text_cfg": dict(TEXT),
                        "pir_cfg": dict(PRIOR)})
    renamed = {}
    for k, v in ref.state_dict().items():
        k = k.replace("res_visual.", "visual.prior.", 1) if k.startswith("res_visual.") else k
        k = k.replace("vision_proj_res.", "visual.prior_proj.", 1) if k.startswith("vision_proj_res.") else k
        renamed[k] = v
    assert set(renamed) == set(ours.state_dict())          # the same modules, key for key
    ours.load_state_dict(renamed, strict=True)
    return ref.float(), ours.float()


def inputs(batch: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 128, 128, generator=g)
    tokens = torch.randint(1, TEXT["vocab_size"], (batch, TEXT["context_length"]), generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0][:batch])
    return images, tokens, labels


def reference_loss(ref, images, tokens, labels):
    img = ref.encode_image(images, normalize=True)
    txt = ref.encode_text(tokens, normalize=True)
    parts = ref_loss.ClipLoss(is_aff_loss=True)(img, txt, labels, ref.logit_scale.exp(), output_dict=True)
    return parts, img, txt


def test_modules_and_loss_equal_the_reference():
    ref, ours = reference_and_ours()
    ref.eval(), ours.eval()
    images, tokens, labels = inputs()
    with torch.no_grad():
        # the prior (the scene classifier's body) and its instruction token
        y_ref = ref.vision_proj_res(ref.res_visual(images)).unsqueeze(1)
        y = ours.visual.prior_token(images)
        assert torch.allclose(y, y_ref, atol=1e-5, rtol=0)
        # VIR: the tokens the reference's ViT feeds its blocks
        x = ours.visual._embeds(images)
        belief = torch.softmax(torch.matmul(x, y.transpose(-2, -1)).squeeze(), dim=-1)
        _, order = torch.sort(belief, dim=1, descending=True)
        by_hand = torch.nn.functional.normalize(x * belief[..., None]
                                                + x / torch.sqrt(order[..., None] + 1.0))
        assert torch.allclose(instruct(x, y), by_hand, atol=1e-6, rtol=0)
        # the towers and the loss
        parts, img_ref, txt_ref = reference_loss(ref, images, tokens, labels)
        img = ours.encode_image(images, normalize=True)
        txt = ours.encode_text(tokens, normalize=True)
        assert (img - img_ref).abs().max() <= 1e-5
        assert (txt - txt_ref).abs().max() <= 1e-5
        cal = affiliation_loss(img, txt, labels, ours.logit_scale)
        assert abs(float(cal) - float(parts["affiliation_loss"])) <= 1e-5
        total = recipe_loss(img, txt, ours.logit_scale, labels, 1.0)
        assert abs(float(total) - float(sum(parts.values()).detach())) <= 1e-5
        assert float(parts["affiliation_loss"]) > 0 and float(total) > float(cal)


def test_one_training_step_has_the_reference_gradients():
    ref, ours = reference_and_ours(seed=3)
    ref.train(), ours.train()                           # batch norm of the prior on batch statistics
    images, tokens, labels = inputs(seed=4)
    parts, _, _ = reference_loss(ref, images, tokens, labels)
    sum(parts.values()).backward()
    img = ours.encode_image(images, normalize=True)
    txt = ours.encode_text(tokens, normalize=True)
    recipe_loss(img, txt, ours.logit_scale, labels, 1.0).backward()
    ref_grads = {k.replace("res_visual.", "visual.prior.").replace("vision_proj_res.", "visual.prior_proj."): p.grad
                 for k, p in ref.named_parameters()}
    worst = 0.0
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name]
        assert p.grad is not None and g_ref is not None, name
        scale = max(1.0, float(g_ref.abs().max()))
        worst = max(worst, float((p.grad - g_ref).abs().max()) / scale)
    assert worst <= 1e-4
    # the prior and its projection do learn from the retrieval loss
    assert float(ours.visual.prior.attnpool.c_proj.weight.grad.abs().max()) > 0
    assert float(ours.visual.prior_proj.weight.grad.abs().max()) > 0


def test_the_engine_step_takes_the_reference_step():
    """train_step (SGD, one micro-batch) moves every weight as the reference's gradients say."""
    ref, ours = reference_and_ours(seed=5)
    ref.train(), ours.train()
    images, tokens, labels = inputs(seed=6)
    parts, _, _ = reference_loss(ref, images, tokens, labels)
    sum(parts.values()).backward()
    before = {k: v.detach().clone() for k, v in ours.named_parameters()}
    lr = 0.5
    loss = train_step(ours, torch.optim.SGD(ours.parameters(), lr=lr), [(images, tokens, labels)],
                      cal_weight=1.0)
    assert abs(loss - float(sum(parts.values()).detach())) <= 1e-5
    ref_grads = {k.replace("res_visual.", "visual.prior.").replace("vision_proj_res.", "visual.prior_proj."): p.grad
                 for k, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        if name == "logit_scale":
            continue                                        # clamped after the step, as CLIP does
        step = (before[name] - p.detach()) / lr
        assert (step - ref_grads[name]).abs().max() <= 1e-4 * max(1.0, float(ref_grads[name].abs().max())), name


def test_a_single_image_encodes_and_the_batch_does_not_change_a_row():
    _, ours = reference_and_ours()
    ours.eval()
    images, _, _ = inputs()
    with torch.no_grad():
        one = ours.encode_image(images[:1])
        many = ours.encode_image(images)
    assert one.shape == (1, 512)
    assert torch.allclose(one[0], many[0], atol=1e-5)


def test_labels_come_from_the_caption_file_and_their_absence_is_refused(tmp_path):
    from PIL import Image
    for n in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{n}.png")
    (tmp_path / "with.csv").write_text("image,caption,class\na.png,x,harbour\nb.png,y,forest\n"
                                       "c.png,z,harbour\n")
    items = read_captions(str(tmp_path / "with.csv")).items
    assert [i.label for i in items] == ["harbour", "forest", "harbour"]
    assert pir_recipe.scene_classes(items) == ["forest", "harbour"]
    (tmp_path / "with.jsonl").write_text('{"image": "a.png", "caption": "x", "label": "beach"}\n')
    assert read_captions(str(tmp_path / "with.jsonl")).items[0].label == "beach"
    (tmp_path / "without.csv").write_text("image,caption\na.png,x\nb.png,y\n")
    with pytest.raises(UsageError) as err:
        pir_recipe.scene_classes(read_captions(str(tmp_path / "without.csv")).items)
    assert "scene class" in str(err.value) and "`label`" in err.value.hint
    # PIR-CLIP's own rule: the file name's part before the first "_"
    for n in ("airport_1", "airport_2", "beach_10"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{n}.png")
    (tmp_path / "named.csv").write_text("image,caption\nairport_1.png,x\nairport_2.png,y\nbeach_10.png,z\n")
    named = read_captions(str(tmp_path / "named.csv")).items
    assert pir_recipe.scene_classes(named, "filename") == ["airport", "beach"]
    assert [pir_recipe.scene_label(i, "filename") for i in named] == ["airport", "airport", "beach"]
    with pytest.raises(UsageError, match="file names have none") as err:
        pir_recipe.scene_classes(items, "filename")                    # a.png, b.png, c.png
    assert "CLASS_N" in err.value.hint
    (tmp_path / "one.csv").write_text("image,caption,label\na.png,x,harbour\nb.png,y,harbour\n")
    with pytest.raises(UsageError, match="at least two scene classes"):
        pir_recipe.scene_classes(read_captions(str(tmp_path / "one.csv")).items)


def test_the_prior_file_round_trips_and_a_wrong_one_is_refused(tmp_path):
    _, ours = reference_and_ours()
    head = torch.nn.Linear(512, 3)
    path = pir_recipe.save_prior(tmp_path / pir_recipe.PRIOR_FILE, ours.visual.prior, head,
                                 ["a", "b", "c"], dict(PRIOR), 75.0)
    meta = pir_recipe.prior_metadata(str(path))
    assert meta == {"pir_cfg": PRIOR, "classes": ["a", "b", "c"], "accuracy": 75.0}
    _, other = reference_and_ours(seed=9)
    assert not torch.equal(other.visual.prior.attnpool.c_proj.weight, ours.visual.prior.attnpool.c_proj.weight)
    pir_recipe.load_prior(str(tmp_path), other.visual.prior)          # the run folder finds the file
    for (k, a), b in zip(ours.visual.prior.state_dict().items(), other.visual.prior.state_dict().values()):
        assert torch.equal(a, b), k
    # PIR-CLIP's own checkpoint layout (res_visual.*), read with weights_only
    sd = {f"res_visual.{k}": v for k, v in ours.visual.prior.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "pir.pt")
    pir_recipe.load_prior(str(tmp_path / "pir.pt"), copy.deepcopy(other.visual.prior))
    small = build_model({"embed_dim": 512, "vision_cfg": dict(VISION), "text_cfg": dict(TEXT),
                         "pir_cfg": dict(PRIOR, res_width=8)})
    with pytest.raises(UsageError, match="does not fit this model"):
        pir_recipe.load_prior(str(path), small.visual.prior)
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "clip.pt")
    with pytest.raises(UsageError, match="holds no scene-classifier weights"):
        pir_recipe.load_prior(str(tmp_path / "clip.pt"), small.visual.prior)
    with pytest.raises(UsageError, match="does not exist"):
        pir_recipe.load_prior(str(tmp_path / "nope.safetensors"), small.visual.prior)
    assert has_prior(ours) and not has_prior(build_model({"embed_dim": 512, "vision_cfg": dict(VISION),
                                                          "text_cfg": dict(TEXT)}))
    assert json.loads(json.dumps(meta))  # plain JSON, as the run folder records it
    assert np.isfinite(meta["accuracy"])


# --------------------------------------------------------------------------- #
# The recipe end to end: train, then detect, index and search with the model folder.
# --------------------------------------------------------------------------- #
COLOURS = {"red": (220, 30, 30), "orange": (230, 120, 20), "blue": (30, 40, 220),
           "cyan": (30, 200, 220), "green": (30, 200, 40), "olive": (120, 140, 30)}
SCENES = {"red": "warm", "orange": "warm", "blue": "water", "cyan": "water", "green": "field",
          "olive": "field"}


def labelled_pairs(folder: Path, labels: bool = True) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption" + (",label" if labels else "")]
    for name, colour in COLOURS.items():
        a = np.zeros((40, 40, 3), np.uint8)
        a[:] = colour
        a[18:22] = np.array(colour) // 2
        Image.fromarray(a).save(folder / f"{name}.png")
        rows.append(f"{name}.png,a {name} square" + (f",{SCENES[name]}" if labels else ""))
    (folder / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "captions.csv"


def tiny_pir_config(path: Path) -> str:
    """The tiny test ViT with a small prior (the reference's RN50 shape is the default)."""
    from mapclip.engine.model.architectures import CONFIG_DIR
    cfg = json.loads((CONFIG_DIR / "mapclip-tiny.json").read_text())
    cfg["pir_cfg"] = {"res_layers": [1, 1, 1, 1], "res_width": 8, "head_width": 64}
    path.write_text(json.dumps(cfg))
    return f"{path}:random"


def test_cli_recipe_pir_trains_and_its_model_detects_and_searches(tmp_path, capsys):
    from mapclip.engine.cli import main
    from mapclip.engine.model.models import load_model
    from tests.raster_fixtures import make_raster
    data = labelled_pairs(tmp_path / "data")
    spec = tiny_pir_config(tmp_path / "pir-tiny.json")
    run = tmp_path / "run"
    argv = ["finetune", "--model", spec, "--recipe", "pir", "--data", str(data), "--out", str(run),
            "--epochs", "1", "--batch-size", "3", "--lr", "1e-3", "--val-split", "0", "--workers", "0",
            "--pir-prior-epochs", "1", "--device", "cpu", "--json"]
    assert main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["recipe"] == "pir" and obj["steps"] == 2
    assert obj["prior"]["classes"] == ["field", "warm", "water"]
    assert Path(obj["prior"]["file"]) == run / pir_recipe.PRIOR_FILE
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records][:2] == ["prior", "eval"]      # the first stage, then training
    best = obj["best_path"]
    meta = json.loads(Path(best, "open_clip_config.json").read_text())
    assert meta["model_cfg"]["pir_cfg"]["res_width"] == 8 and meta["mapclip"]["recipe"] == "pir"
    lm = load_model(best, device="cpu")
    assert has_prior(lm.model)
    trained = dict(lm.model.state_dict())
    from mapclip.engine.finetune import load_base_model
    raw = load_base_model(spec, seed=0, device="cpu").model.state_dict()   # the same init, untrained
    assert not torch.equal(trained["visual.prior.attnpool.c_proj.weight"],
                           raw["visual.prior.attnpool.c_proj.weight"])
    # detect (window mode; dense mode falls back to it, saying why) and an index searched
    raster = make_raster(tmp_path / "r.tif", 96, 64)
    for mode in ("window", "dense"):
        assert main(["detect", str(raster), "--prompt", "a red square", "--model", best, "--tile", "32",
                     "--mode", mode, "--out", str(tmp_path / f"{mode}.gpkg"), "--json",
                     "--device", "cpu"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (tmp_path / f"{mode}.gpkg").is_file()
        assert any("PIR model" in w for w in out["warnings"]) == (mode == "dense")
    assert main(["index", str(raster), "--model", best, "--tile", "32", "--out",
                 str(tmp_path / "idx"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--text", "a red square", "--model", best,
                 "--top-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["rank"] for h in hits] == [1, 2]
    # the prior of this run reused: no first stage; without labels the recipe is refused
    argv2 = argv[:argv.index("--out") + 1] + [str(tmp_path / "run2")] + argv[argv.index("--out") + 2:]
    assert main(argv2 + ["--pir-prior", str(run / pir_recipe.PRIOR_FILE)]) == 0
    obj2 = json.loads(capsys.readouterr().out)
    assert obj2["prior"]["file"] == str(run / pir_recipe.PRIOR_FILE) and "accuracy" not in obj2["prior"]
    assert "prior" not in {json.loads(x)["type"] for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()}
    bare = labelled_pairs(tmp_path / "bare", labels=False)
    argv3 = [bare if a == str(data) else a for a in argv]
    argv3 = [str(a) for a in argv3]
    argv3[argv3.index("--out") + 1] = str(tmp_path / "run3")
    assert main(argv3) == 2
    err = capsys.readouterr().err
    assert "scene class" in err and "label" in err and "--recipe clip" in err


def test_a_pir_run_cancelled_and_resumed_equals_one_that_ran_through(tmp_path):
    """accum 2: the affiliation loss sees the labels of the whole contrastive batch."""
    import threading
    from mapclip.engine import finetune as ft
    from mapclip.engine.core.errors import Cancelled
    data = labelled_pairs(tmp_path / "data")
    spec = tiny_pir_config(tmp_path / "pir-tiny.json")

    def opts(out, **kw):
        return ft.FinetuneOptions(model=spec, data=str(data), out=str(tmp_path / out), epochs=2,
                                  batch_size=2, accum=2, lr=1e-3, val_split=0.0, workers=0,
                                  device="cpu", recipe="pir", pir_prior_epochs=1, **kw)
    whole = ft.finetune(opts("whole"))
    cancel = threading.Event()

    def stop_after_epoch_1(record):
        if record["type"] == "eval" and record["epoch"] == 1:
            cancel.set()
    with pytest.raises(Cancelled):
        ft.finetune(opts("cut"), cancel=cancel, on_metrics=stop_after_epoch_1)
    with pytest.raises(UsageError, match="recipe: 'pir' -> None"):   # the recipe is part of the run
        ft.finetune(ft.FinetuneOptions(**dict(opts("cut", resume=True).__dict__, recipe="clip",
                                              weight_decay=0.5)))
    resumed = ft.finetune(ft.options_from_run(tmp_path / "cut", device="cpu", workers=0))
    assert resumed.resumed_from_epoch == 1 and resumed.recipe == "pir"
    a = torch.load(str(tmp_path / "whole" / ft.STATE_FILE), weights_only=True)["model"]
    b = torch.load(str(tmp_path / "cut" / ft.STATE_FILE), weights_only=True)["model"]
    assert a.keys() == b.keys() and any(k.startswith("visual.prior.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics_after == whole.metrics_after
