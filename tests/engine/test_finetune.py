"""Fine-tuning with the tiny model on generated image-caption pairs."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mapclip.engine import finetune as ft
from mapclip.engine.cli import main as cli_main
from mapclip.engine.core.errors import Cancelled, UsageError
from mapclip.engine.model.models import load_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "white": (245, 245, 245), "black": (10, 10, 10),
           "cyan": (30, 220, 220), "magenta": (220, 30, 220)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_pairs(folder: Path, names=tuple(COLOURS), size: int = 40) -> Path:
    """Solid-colour squares with a cross of another shade, captioned by colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for name in names:
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = COLOURS[name]
        a[size // 2 - 2:size // 2 + 2, :] = np.array(COLOURS[name]) // 2
        Image.fromarray(a).save(folder / f"{name}.png")
        rows.append(f"{name}.png,a {name} square")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "captions.csv"


def opts(data, out, **kw) -> ft.FinetuneOptions:
    base = dict(model="test-tiny", data=str(data), out=str(out), epochs=2, batch_size=4, lr=1e-3,
                val_split=0.0, workers=0, device="cpu", warmup=0.1)
    base.update(kw)
    return ft.FinetuneOptions(**base)


def read_metrics(run_dir: Path):
    return [json.loads(l) for l in (run_dir / ft.METRICS_FILE).read_text().splitlines()]


def state_model(run_dir: Path):
    return torch.load(str(run_dir / ft.STATE_FILE), map_location="cpu", weights_only=True)


def test_loss_goes_down_recall_goes_up_and_best_loads(tmp_path):
    data = make_pairs(tmp_path / "data")
    seen = []
    steps = []
    result = ft.finetune(opts(data, tmp_path / "run", epochs=6), progress=lambda d, t: steps.append((d, t)),
                         on_metrics=seen.append)
    epochs = [r for r in read_metrics(tmp_path / "run") if r["type"] == "epoch"]
    assert len(epochs) == 6
    assert np.mean([e["loss"] for e in epochs[-2:]]) < np.mean([e["loss"] for e in epochs[:2]])
    assert result.metrics_after["mean_recall"] > result.metrics_before["mean_recall"]
    assert result.metrics_after["i2t_r1"] > result.metrics_before["i2t_r1"]
    assert result.steps == 12 and steps[-1] == (12, 12)
    assert seen == read_metrics(tmp_path / "run")          # callback gets what the log holds
    assert {r["type"] for r in seen} == {"step", "epoch", "eval"}
    assert all(r["lr"] > 0 for r in seen if r["type"] == "step")
    # best/ is a model folder whose weights reproduce the best recall
    lm = load_model(result.best_path, device="cpu")
    assert lm.arch == "mapclip-tiny" and lm.image_size == 64
    again = ft.evaluate_model(lm, str(data))
    assert again["mean_recall"] == pytest.approx(result.best_mean_recall)
    run = json.loads((tmp_path / "run" / ft.RUN_FILE).read_text())
    assert run["status"] == "finished" and run["result"]["best_epoch"] == result.best_epoch


def test_resume_after_cancel_equals_uninterrupted_run(tmp_path):
    data = make_pairs(tmp_path / "data")
    whole = ft.finetune(opts(data, tmp_path / "whole", accum=2, batch_size=2))

    cancel = threading.Event()

    def stop_after_epoch_1(record):
        if record["type"] == "eval" and record["epoch"] == 1:
            cancel.set()   # noticed at the first step of epoch 2

    with pytest.raises(Cancelled):
        ft.finetune(opts(data, tmp_path / "cut", accum=2, batch_size=2), cancel=cancel,
                    on_metrics=stop_after_epoch_1)
    run = json.loads((tmp_path / "cut" / ft.RUN_FILE).read_text())
    assert run["status"] == "running" and run["epochs_done"] == 1
    assert not list((tmp_path / "cut").glob("*.part"))
    with pytest.raises(UsageError, match="--resume"):
        ft.finetune(opts(data, tmp_path / "cut", accum=2, batch_size=2))
    # resumed with decoding in a worker process: batches must not depend on it
    resumed = ft.finetune(opts(data, tmp_path / "cut", accum=2, batch_size=2, resume=True, workers=1))
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 1
    a, b = state_model(tmp_path / "whole"), state_model(tmp_path / "cut")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["step"] == b["step"] == whole.steps
    # the log holds each record once, as in the uninterrupted run
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "step_samples_per_s")} for r in rs]
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(tmp_path / "whole"))
    assert resumed.metrics_after == whole.metrics_after
    with pytest.raises(UsageError, match="finished"):
        ft.finetune(opts(data, tmp_path / "cut", accum=2, batch_size=2, resume=True))


def test_cancel_stops_within_one_step(tmp_path):
    data = make_pairs(tmp_path / "data")
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        if done >= 1:
            cancel.set()

    with pytest.raises(Cancelled):
        ft.finetune(opts(data, tmp_path / "run", epochs=3), progress=progress, cancel=cancel)
    assert max(calls) == 1
    assert not (tmp_path / "run" / ft.STATE_FILE).exists() and not (tmp_path / "run" / "best").exists()


def test_bad_data_skipped_and_counted_or_strict_error(tmp_path):
    data = make_pairs(tmp_path / "data", names=("red", "green", "blue", "yellow"))
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG but not really")
    with open(data, "a", encoding="utf-8") as fh:
        fh.write("missing.png,a missing image\nbroken.png,a broken image\nred.png,\n")
    result = ft.finetune(opts(data, tmp_path / "run", epochs=1))
    c = result.skipped.counts
    assert c["missing_image"] == 1 and c["unreadable_image"] == 1 and c["empty_caption"] == 1
    assert result.train_images == 4 and result.skipped.total == 3
    assert result.to_json()["skipped"]["counts"]["unreadable_image"] == 1
    with pytest.raises(UsageError, match="bad data"):
        ft.finetune(opts(data, tmp_path / "strict", epochs=1, strict=True))
    empty = tmp_path / "empty.csv"
    empty.write_text("nothing.png,a caption\n", encoding="utf-8")
    with pytest.raises(UsageError, match="no usable image-caption pairs"):
        ft.finetune(opts(empty, tmp_path / "run_empty"))


def test_file_broken_after_the_check_is_dropped_from_its_batch_not_fatal(tmp_path):
    make_pairs(tmp_path, names=("red", "green"))
    plan = [(str(tmp_path / "red.png"), "a red square", 1), (str(tmp_path / "gone.png"), "x", 2),
            (str(tmp_path / "green.png"), "a green square", None)]
    images, captions, positions, failed = ft.collate([ft.PairDataset(plan, 16, (0.5, 1.0))[i]
                                                      for i in range(3)])
    assert images.shape == (2, 16, 16, 3) and images.dtype == torch.uint8
    assert captions == ["a red square", "a green square"] and positions == [0, 2]
    assert len(failed) == 1 and "gone.png" in failed[0]


def test_augmentation_is_a_function_of_its_seed():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    a = ft.augment(im, 24, np.random.default_rng(5))
    b = ft.augment(im, 24, np.random.default_rng(5))
    assert a.shape == (24, 24, 3) and np.array_equal(a, b)
    assert any(not np.array_equal(a, ft.augment(im, 24, np.random.default_rng(s))) for s in range(6, 9))


def test_run_dir_refusals(tmp_path):
    data = make_pairs(tmp_path / "data", names=("red", "green", "blue"))
    ft.finetune(opts(data, tmp_path / "run", epochs=1))
    with pytest.raises(UsageError, match="finished run"):
        ft.finetune(opts(data, tmp_path / "run", epochs=1))
    with pytest.raises(UsageError, match="other settings") as err:
        ft.finetune(opts(data, tmp_path / "run", epochs=1, lr=5e-4, resume=True))
    assert "lr" in err.value.message
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not an empty folder"):
        ft.finetune(opts(data, other))
    with pytest.raises(UsageError, match="no run to resume"):
        ft.finetune(opts(data, tmp_path / "fresh", resume=True))
    assert not (tmp_path / "fresh").exists()         # refused before it began: no folder left


def test_a_run_still_training_refuses_a_second_trainer_then_a_killed_one_resumes(tmp_path):
    """A trainer (the CLI, another process) frozen right after it saved epoch 1 (the
    named fault point finetune.epoch, core/faults.py, action stop): a --resume meanwhile
    is refused, naming --resume, nothing trained twice. Killed there (kill -9), its lock
    is stale and taken over: the resumed run continues at epoch 2 and ends with the
    weights, optimizer state and log of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    data = make_pairs(tmp_path / "data", names=("red", "green", "blue", "white"))
    run = tmp_path / "run"
    o = opts(data, run, batch_size=2)
    argv = ["finetune", "--model", o.model, "--data", str(data), "--out", str(run),
            "--epochs", str(o.epochs), "--batch-size", str(o.batch_size), "--lr", str(o.lr),
            "--val-split", str(o.val_split), "--workers", str(o.workers), "--device", o.device,
            "--warmup", str(o.warmup)]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1",
               MAPCLIP_FAULT="finetune.epoch:1:stop")
    with open(tmp_path / "trainer.err", "w") as err:
        trainer = subprocess.Popen([sys.executable, "-m", "engine", *argv], cwd=root, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        _, status = os.waitpid(trainer.pid, os.WUNTRACED)      # until it stops itself
        assert os.WIFSTOPPED(status), (status, (tmp_path / "trainer.err").read_text())
        assert (run / ft.LOCK).read_text().strip() == str(trainer.pid)   # it holds the run
        assert json.loads((run / ft.RUN_FILE).read_text())["epochs_done"] == 1
        before = (run / ft.METRICS_FILE).read_text()
        with pytest.raises(UsageError) as e:
            ft.finetune(opts(data, run, batch_size=2, resume=True))
        assert "still training" in e.value.message and str(trainer.pid) in e.value.message
        assert "--resume" in e.value.hint
        assert (run / ft.METRICS_FILE).read_text() == before and (run / ft.LOCK).exists()
    finally:
        trainer.kill()
        trainer.wait()
    assert trainer.returncode == -signal.SIGKILL
    assert (run / ft.LOCK).exists()                   # a kill -9 cannot release its lock
    result = ft.finetune(opts(data, run, batch_size=2, resume=True))
    assert result.resumed_from_epoch == 1 and result.epochs_run == 1
    assert not (run / ft.LOCK).exists()
    whole = ft.finetune(opts(data, tmp_path / "whole", batch_size=2))
    a, b = state_model(tmp_path / "whole"), state_model(run)
    assert a["step"] == b["step"] == whole.steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["optimizer"]["state"][pid][name]), (pid, name)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "step_samples_per_s")}
                        for r in rs]   # noqa: E731
    assert strip(read_metrics(run)) == strip(read_metrics(tmp_path / "whole"))
    assert result.metrics_after == whole.metrics_after


class _NotATensor:
    pass


def test_training_state_is_untrusted_input(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": ft.STATE_FORMAT, "payload": _NotATensor()}, str(path))
    with pytest.raises(UsageError, match="cannot read training state"):
        ft.load_state(path)                       # weights_only refuses the pickled object
    torch.save({"format": ft.STATE_FORMAT, "model": {}}, str(path))
    with pytest.raises(UsageError, match="not a MapCLIP training state"):
        ft.load_state(path)


def test_freeze_and_unlock_last_choose_trainable_parameters(tiny_model):
    import copy
    model = copy.deepcopy(tiny_model.model)
    counts = ft.set_trainable(model, "text", 0)
    assert counts["text"] == 0 and counts["vision"] > 0
    assert not model.token_embedding.weight.requires_grad and model.logit_scale.requires_grad
    ft.set_trainable(model, "none", 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight" in trainable
    assert "transformer.resblocks.1.attn.in_proj_weight" in trainable
    assert not any(".resblocks.0." in n for n in trainable)
    assert {"visual.proj", "visual.ln_post.weight", "text_projection", "ln_final.weight",
            "logit_scale"} <= trainable
    assert not {"visual.conv1.weight", "token_embedding.weight", "visual.class_embedding"} & trainable
    opt = ft.make_optimizer(model, 1e-3, 0.2)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.visual.proj) in decayed and id(model.logit_scale) not in decayed
    assert id(model.visual.ln_post.weight) not in decayed


def test_frozen_text_tower_is_unchanged_after_training(tmp_path, tiny_model):
    data = make_pairs(tmp_path / "data", names=("red", "green", "blue", "yellow"))
    result = ft.finetune(opts(data, tmp_path / "run", epochs=1, freeze="text"))
    trained = load_model(result.best_path, device="cpu").model.state_dict()
    base = tiny_model.model.state_dict()
    assert torch.equal(trained["transformer.resblocks.0.attn.in_proj_weight"],
                       base["transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(trained["token_embedding.weight"], base["token_embedding.weight"])
    assert not torch.equal(trained["visual.conv1.weight"], base["visual.conv1.weight"])


def test_accumulated_micro_batches_equal_one_large_batch(tiny_model):
    import copy
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    tokens = tiny_model.tokenizer(["a red roof", "a blue lake", "green fields", "a grey road"])
    after = []
    for micro in ([(images, tokens)], [(images[:2], tokens[:2]), (images[2:], tokens[2:])]):
        model = copy.deepcopy(tiny_model.model).train()
        ft.set_trainable(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        loss = ft.train_step(model, opt, micro)
        after.append((loss, {k: v.clone() for k, v in model.state_dict().items()}))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-5)
    for k, v in after[0][1].items():
        assert torch.allclose(v, after[1][1][k], atol=1e-6, rtol=1e-4), k
    assert not torch.equal(after[0][1]["visual.proj"], tiny_model.model.state_dict()["visual.proj"])


def test_schedule_loss_and_temperature_clamp(tiny_model):
    lrs = [ft.lr_at(s, 20, 1.0, 4) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.05
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    low = ft.contrastive_loss(x, x, torch.tensor(np.log(100.0)))
    high = ft.contrastive_loss(x, x.roll(1, 0), torch.tensor(np.log(100.0)))
    assert low < high
    import copy
    model = copy.deepcopy(tiny_model.model).train()
    ft.set_trainable(model)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    opt = torch.optim.SGD([model.logit_scale], lr=0.0)
    ft.train_step(model, opt, [(torch.randn(2, 3, 64, 64), tiny_model.tokenizer(["a", "b"]))])
    assert float(model.logit_scale.detach()) == pytest.approx(np.log(100.0))


def test_random_init_specs(tmp_path):
    a = ft.load_base_model("mapclip-tiny:random", seed=3, device="cpu")
    b = ft.load_base_model("mapclip-tiny:random", seed=3, device="cpu")
    c = ft.load_base_model("mapclip-tiny:random", seed=4, device="cpu")
    assert a.arch == "mapclip-tiny" and a.image_size == 64 and a.precision == "fp32"
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)
    cfg = json.loads((Path(ft.__file__).parents[1] / "model" / "configs" / "mapclip-tiny.json").read_text())
    cfg["vision_cfg"]["image_size"] = 32
    cfg["vision_cfg"]["patch_size"] = 8
    (tmp_path / "small.json").write_text(json.dumps(cfg))
    d = ft.load_base_model(f"{tmp_path / 'small.json'}:random", device="cpu")
    assert d.arch == "small" and d.image_size == 32 and d.model.visual.conv1.kernel_size == (8, 8)
    with pytest.raises(UsageError, match="does not exist"):
        ft.load_base_model(f"{tmp_path / 'nope.json'}:random", device="cpu")


def test_split_uses_named_splits_else_seeded_fraction():
    from mapclip.engine.data.captions import CaptionItem
    items = [CaptionItem(f"{i}.png", ["c"], s) for i, s in enumerate(["train", "train", "val", "test", None])]
    train, ev, name = ft.split_items(items, 0.5, 0)
    assert name == "val" and [i.path for i in ev] == ["2.png"]
    assert [i.path for i in train] == ["0.png", "1.png", "4.png"]       # test never trains
    plain = [CaptionItem(f"{i}.png", ["c"]) for i in range(10)]
    tr, ev, name = ft.split_items(plain, 0.2, 1)
    assert name == "val" and len(ev) == 2 and len(tr) == 8 and not {i.path for i in tr} & {i.path for i in ev}
    assert ft.split_items(plain, 0.2, 1)[1] == ev                         # seeded
    assert ft.split_items(plain, 0.0, 1)[2] == "train"


def test_cli_json_contract_and_usage_error(tmp_path, capsys):
    data = make_pairs(tmp_path / "data", names=("red", "green", "blue"))
    argv = ["finetune", "--model", "test-tiny", "--data", str(data), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "3", "--lr", "1e-3", "--val-split", "0", "--workers", "0",
            "--device", "cpu", "--json"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)
    for key in ("best_path", "metrics_before", "metrics_after", "samples_per_s", "skipped", "steps"):
        assert key in obj, key
    assert obj["steps"] == 1 and Path(obj["best_path"], "open_clip_config.json").is_file()
    assert "mean_recall" in obj["metrics_after"] and obj["skipped"]["total"] == 0
    assert cli_main(argv) == 2                          # finished run, no --resume
    err = capsys.readouterr().err
    assert "finished run" in err and "fix:" in err


def test_cli_crop_scale_reaches_the_run_and_bad_values_are_usage_errors(tmp_path, capsys):
    data = make_pairs(tmp_path / "data", names=("red", "green"))
    run_dir = tmp_path / "run"
    base = ["finetune", "--model", "test-tiny", "--data", str(data), "--out", str(run_dir),
            "--epochs", "1", "--batch-size", "2", "--val-split", "0", "--workers", "0", "--device", "cpu"]
    assert cli_main(base + ["--crop-scale", "0.8,1"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"]["crop_scale"] == [0.8, 1.0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(base[:-2] + ["--out", str(tmp_path / "r2"), "--crop-scale", "1.5,0.2"])
    assert exc.value.code == 2
    assert "crop scale" in capsys.readouterr().err
