"""Model presets, spec resolution, checkpoint loading and the `models` command."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine import models
from engine.cli import main as cli_main
from engine.encode import encode_images, encode_text
from engine.errors import ModelError, UsageError


def test_registry_has_required_presets_with_quickgelu_for_openai_descendants():
    p = models.PRESETS
    for name in ("remoteclip-rn50", "remoteclip-vit-b-32", "remoteclip-vit-l-14",
                 "georsclip-vit-b-32", "skyclip-vit-l-14", "openai-vit-b-32", "openai-vit-l-14", "demo"):
        assert name in p, name
    assert p["remoteclip-vit-b-32"].arch == "ViT-B-32-quickgelu"
    assert p["remoteclip-rn50"].arch == "RN50-quickgelu"
    assert p["remoteclip-vit-l-14"].arch == "ViT-L-14-quickgelu"
    assert p["remoteclip-vit-b-32"].repo == "chendelong/RemoteCLIP"
    assert p["remoteclip-vit-b-32"].filename == "RemoteCLIP-ViT-B-32.pt"
    assert models.DEFAULT_MODEL in p


def test_tiny_model_loads_seeded_and_encodes(tiny_model):
    assert tiny_model.embed_dim == 64 and tiny_model.image_size == 64
    assert tiny_model.device.type == "cpu" and tiny_model.precision == "fp32"
    again = models.load_model("test-tiny", device="cpu")
    for (k, a), (_, b) in zip(tiny_model.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    t = encode_text(tiny_model, ["storage tanks", "a harbor with ships"])
    assert t.shape == (2, 64)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    img = encode_images(tiny_model, torch.randint(0, 255, (3, 100, 80, 3), dtype=torch.uint8).numpy())
    assert img.shape == (3, 64) and not torch.isnan(img).any()


def test_remoteclip_preset_loads_from_cached_checkpoint_in_real_layout(_isolated_cache):
    """The real preset path: a ViT-B-32-quickgelu state dict saved as RemoteCLIP-ViT-B-32.pt."""
    preset = models.PRESETS["remoteclip-vit-b-32"]
    dest = models.hf_cache_path(preset.repo, preset.filename)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    src = models.build_model(models.arch_config("ViT-B-32-quickgelu"))
    torch.save(src.state_dict(), dest)
    assert models.preset_available(preset)
    lm = models.load_model("remoteclip-vit-b-32", device="cpu")
    assert lm.arch == "ViT-B-32-quickgelu" and lm.embed_dim == 512 and lm.image_size == 224
    assert lm.model_cfg.get("quick_gelu") is True
    assert torch.equal(lm.model.visual.conv1.weight, src.visual.conv1.weight)
    dest.unlink()


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path, tiny_model):
    ckpt = tmp_path / "tiny.pt"
    sd = dict(tiny_model.model.state_dict())
    sd["extra.weight"] = torch.zeros(2)
    del sd["logit_scale"]
    torch.save(sd, ckpt)
    with pytest.raises(ModelError) as err:
        models.load_model(f"mapclip-tiny:{ckpt}", device="cpu")
    assert "missing" in err.value.message and "logit_scale" in err.value.message
    assert "unexpected" in err.value.message and "extra.weight" in err.value.message
    with pytest.raises(ModelError) as err:
        models.load_model(f"ViT-B-32-quickgelu:{ckpt}", device="cpu")
    assert "does not match architecture ViT-B-32-quickgelu" in err.value.message


def test_wrapped_and_prefixed_checkpoints_and_safetensors_load(tmp_path, tiny_model):
    from safetensors.torch import save_file
    sd = tiny_model.model.state_dict()
    wrapped = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for path in (wrapped, st):
        lm = models.load_model(f"mapclip-tiny:{path}", device="cpu")
        assert torch.equal(lm.model.logit_scale, tiny_model.model.logit_scale)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_in_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Evil()}, bad)
    with pytest.raises(ModelError) as err:
        models.load_model(f"mapclip-tiny:{bad}", device="cpu")
    assert "weights_only" in err.value.hint


def test_bad_specs_get_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="needs its architecture"):
        p = tmp_path / "x.pt"
        p.write_bytes(b"0")
        models.resolve(str(p))
    with pytest.raises(UsageError, match="does not exist"):
        models.resolve("ViT-B-32:/no/such/file.pt")
    with pytest.raises(UsageError, match="unknown model"):
        models.resolve("not-a-model")
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        models.resolve("NoSuchArch:openai")
    with pytest.raises(UsageError, match="no model"):
        models.resolve("  ")


def test_download_failure_names_the_file_and_the_folder(tmp_path):
    dest = tmp_path / "cache" / "RemoteCLIP-ViT-B-32.pt"
    with pytest.raises(ModelError) as err:
        models.download("http://127.0.0.1:9/RemoteCLIP-ViT-B-32.pt", dest, timeout=2)
    assert "RemoteCLIP-ViT-B-32.pt" in err.value.message
    assert str(dest) in err.value.hint
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_missing_hub_file_offline_reports_cache_path():
    with pytest.raises(ModelError) as err:
        models.load_model("georsclip-vit-b-32", device="cpu")
    assert "RS5M_ViT-B-32.pt" in err.value.hint and "MAPCLIP_CACHE" in err.value.hint


def test_model_folder_round_trip(tmp_path, tiny_model):
    folder = models.save_model_folder(tiny_model.model, tiny_model.model_cfg, tmp_path / "run" / "best",
                                      arch="mapclip-tiny", extra={"note": "test"})
    meta = json.loads((folder / models.MODEL_CONFIG_FILE).read_text())
    assert meta["mapclip"]["arch"] == "mapclip-tiny" and "model_cfg" in meta
    assert oct((folder / models.MODEL_WEIGHTS_FILE).stat().st_mode & 0o777) == "0o644"
    lm = models.load_model(str(folder), device="cpu")
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    assert torch.allclose(encode_images(lm, x), encode_images(tiny_model, x), atol=1e-6)
    assert lm.arch == "mapclip-tiny"


def test_device_and_precision_resolution():
    dev = models.resolve_device("cpu")
    assert dev.type == "cpu" and models.resolve_precision(dev) == "fp32"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            models.resolve_device("cuda")
    with pytest.raises(UsageError):
        models.resolve_precision(dev, "fp8")


def test_cli_models_lists_presets_and_checks_one(capsys):
    assert cli_main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {p["name"]: p for p in out["presets"]}
    assert "chendelong/RemoteCLIP" in names["remoteclip-vit-b-32"]["loads_from"]
    assert names["test-tiny"]["available"] is True
    assert cli_main(["models", "--check", "test-tiny", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embed_dim"] == 64 and info["device"] == "cpu" and info["precision"] == "fp32"


def test_cli_error_is_one_line_with_fix_and_exit_code_2():
    r = subprocess.run([sys.executable, "-m", "engine", "models", "--check", "nope-model"],
                       capture_output=True, text=True, cwd=models.RESOURCES_DIR.parent)
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown model 'nope-model'")
    assert "fix:" in r.stderr and "Traceback" not in r.stderr


def test_arch_random_is_a_seeded_random_init():
    a = models.load_model("mapclip-tiny:random", device="cpu")
    b = models.load_model("mapclip-tiny:random", device="cpu")
    assert a.arch == "mapclip-tiny" and a.embed_dim == 64
    assert torch.equal(a.model.visual.conv1.weight, b.model.visual.conv1.weight)


def test_cli_runs_a_command_without_importing_the_others():
    """`dedup`/`convert` start without torch: only the command being run is built."""
    code = ("import sys; from engine.cli import main; "
            "rc = main(['models', '--help']) if False else None; "
            "from engine.cli import build_parser; build_parser('dedup'); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=models.RESOURCES_DIR.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_image_file_queries_are_resized_on_the_short_side_and_centre_cropped(tmp_path, tiny_model):
    """An image query goes through the references' evaluation transform
    (open_clip's image_transform: Resize(short side) + CenterCrop), not a squash."""
    import numpy as np
    import open_clip
    from PIL import Image

    from engine.encode import encode_image_files
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, size=(60, 100, 3), dtype=np.uint8)   # 100 x 60, landscape
    arr[:, :20] = 0                                                 # edges that a crop drops
    path = tmp_path / "query.png"
    Image.fromarray(arr).save(path)
    ours = encode_image_files(tiny_model, [str(path)])[0]
    ref_tf = open_clip.image_transform(tiny_model.image_size, is_train=False,
                                       mean=tiny_model.mean, std=tiny_model.std)
    with torch.no_grad():
        ref = tiny_model.model.encode_image(ref_tf(Image.open(path)).unsqueeze(0))
    ref = torch.nn.functional.normalize(ref.float(), dim=-1)[0]
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=0) > 0.9999
    squashed = encode_images(tiny_model, np.array(Image.fromarray(arr).resize(
        (tiny_model.image_size, tiny_model.image_size), Image.BICUBIC))[None])[0]
    assert torch.nn.functional.cosine_similarity(squashed, ref, dim=0) < 0.9999
