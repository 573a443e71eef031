"""Model presets, spec resolution, checkpoint loading and the `models` command."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mapclip.engine.model import architectures, checkpoints, hub, models, presets, specs
from mapclip.engine.cli import main as cli_main
from mapclip.engine.model.encode import encode_images, encode_text
from mapclip.engine.core.errors import ModelError, UsageError


def test_registry_has_required_presets_with_quickgelu_for_openai_descendants():
    p = presets.PRESETS
    for name in ("remoteclip-rn50", "remoteclip-vit-b-32", "remoteclip-vit-l-14",
                 "georsclip-vit-b-32", "skyclip-vit-l-14", "openai-vit-b-32", "openai-vit-l-14", "demo"):
        assert name in p, name
    assert p["remoteclip-vit-b-32"].arch == "ViT-B-32-quickgelu"
    assert p["remoteclip-rn50"].arch == "RN50-quickgelu"
    assert p["remoteclip-vit-l-14"].arch == "ViT-L-14-quickgelu"
    assert p["remoteclip-vit-b-32"].repo == "chendelong/RemoteCLIP"
    assert p["remoteclip-vit-b-32"].filename == "RemoteCLIP-ViT-B-32.pt"
    assert presets.DEFAULT_MODEL in p


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
    preset = presets.PRESETS["remoteclip-vit-b-32"]
    dest = hub.hf_cache_path(preset.repo, preset.filename)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    src = architectures.build_model(architectures.arch_config("ViT-B-32-quickgelu"))
    torch.save(src.state_dict(), dest)
    assert hub.preset_available(preset)
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


def test_bad_specs_get_clear_errors(tmp_path, tiny_model):
    p = tmp_path / "x.pt"   # a name that is no published checkpoint's: activation unknown
    torch.save(tiny_model.model.state_dict(), p)
    with pytest.raises(UsageError, match="needs its architecture") as err:
        specs.resolve(str(p))
    assert "its weights are mapclip-tiny" in err.value.message and f"mapclip-tiny:{p}" in err.value.hint
    with pytest.raises(UsageError, match="does not exist"):
        specs.resolve("ViT-B-32:/no/such/file.pt")
    with pytest.raises(UsageError, match="unknown model"):
        specs.resolve("not-a-model")
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        specs.resolve("NoSuchArch:openai")
    with pytest.raises(UsageError, match="no model"):
        specs.resolve("  ")


def test_download_failure_names_the_file_and_the_folder(tmp_path):
    dest = tmp_path / "cache" / "RemoteCLIP-ViT-B-32.pt"
    with pytest.raises(ModelError) as err:
        hub.download("http://127.0.0.1:9/RemoteCLIP-ViT-B-32.pt", dest, timeout=2)
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
    meta = json.loads((folder / presets.MODEL_CONFIG_FILE).read_text())
    assert meta["mapclip"]["arch"] == "mapclip-tiny" and "model_cfg" in meta
    assert oct((folder / presets.MODEL_WEIGHTS_FILE).stat().st_mode & 0o777) == "0o644"
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
    assert names["demo"]["available"] is True
    assert "test-tiny" not in names  # the project's test model is not offered to users
    assert names["demo"]["defaults"]["tile_px"] == 24  # the model's own search defaults
    assert cli_main(["models", "--check", "test-tiny", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embed_dim"] == 64 and info["device"] == "cpu" and info["precision"] == "fp32"


def test_cli_error_is_one_line_with_fix_and_exit_code_2():
    r = subprocess.run([sys.executable, "-m", "engine", "models", "--check", "nope-model"],
                       capture_output=True, text=True, cwd=presets.RESOURCES_DIR.parent)
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
    code = ("import sys; from mapclip.engine.cli import main; "
            "rc = main(['models', '--help']) if False else None; "
            "from mapclip.engine.cli import build_parser; build_parser('dedup'); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=presets.RESOURCES_DIR.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_image_file_queries_are_resized_on_the_short_side_and_centre_cropped(tmp_path, tiny_model):
    """An image query goes through the references' evaluation transform
    (open_clip's image_transform: Resize(short side) + CenterCrop), not a squash."""
    import numpy as np
    import open_clip
    from PIL import Image

    from mapclip.engine.model.encode import encode_image_files
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


# --------------------------------------------------------------------------- #
# Published checkpoints load with the architecture they were trained in.
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def remoteclip_b32_file(tmp_path_factory):
    """A seeded ViT-B-32 state dict saved under RemoteCLIP's published file name."""
    folder = tmp_path_factory.mktemp("remoteclip")
    torch.manual_seed(5)
    src = architectures.build_model(architectures.arch_config("ViT-B-32-quickgelu"))
    path = folder / "RemoteCLIP-ViT-B-32.pt"
    torch.save(src.state_dict(), path)
    return path


def _reference_quickgelu_embedding(path, image):
    """open_clip's own ViT-B-32-quickgelu with the file's weights (the model RemoteCLIP trained)."""
    import open_clip
    ref = open_clip.create_model("ViT-B-32-quickgelu")
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.eval()
    with torch.no_grad():
        return torch.nn.functional.normalize(ref.encode_image(image), dim=-1)


def test_published_checkpoint_loads_right_by_path_alone_or_with_a_plain_architecture(remoteclip_b32_file):
    import warnings as w
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    ref = _reference_quickgelu_embedding(remoteclip_b32_file, image)
    alone = models.load_model(str(remoteclip_b32_file), device="cpu")
    assert alone.arch == "ViT-B-32-quickgelu" and alone.model_cfg.get("quick_gelu") is True
    with torch.no_grad():
        got = torch.nn.functional.normalize(alone.model.encode_image(image), dim=-1)
    assert torch.allclose(got, ref, atol=1e-6)
    del alone
    # RemoteCLIP's README spelling: the plain name, corrected with a warning naming both
    with pytest.warns(checkpoints.CheckpointWarning) as rec:
        plain = models.load_model(f"ViT-B-32:{remoteclip_b32_file}", device="cpu")
    msg = str(rec[0].message)
    assert "ViT-B-32-quickgelu" in msg and "not ViT-B-32" in msg and "RemoteCLIP" in msg
    with torch.no_grad():
        got = torch.nn.functional.normalize(plain.model.encode_image(image), dim=-1)
    assert torch.allclose(got, ref, atol=1e-6)
    del plain
    # the right name loads without a warning
    with w.catch_warnings():
        w.simplefilter("error", checkpoints.CheckpointWarning)
        specs.resolve(f"ViT-B-32-quickgelu:{remoteclip_b32_file}")
    # an architecture the shapes contradict is refused, with the right one in the fix
    with pytest.raises(ModelError) as err:
        specs.resolve(f"ViT-B-16:{remoteclip_b32_file}")
    assert "holds ViT-B-32 weights, not ViT-B-16" in err.value.message
    assert f"ViT-B-32-quickgelu:{remoteclip_b32_file}" in err.value.hint
    # the same weights under a name no one published: the activation is asked for
    mine = remoteclip_b32_file.with_name("mine.pt")
    mine.symlink_to(remoteclip_b32_file)
    with pytest.raises(UsageError, match="needs its architecture: its weights are ViT-B-32") as err:
        specs.resolve(str(mine))
    assert f"ViT-B-32-quickgelu:{mine}" in err.value.hint and f"ViT-B-32:{mine}" in err.value.hint


def test_recognise_checkpoint_names():
    from pathlib import Path
    r = checkpoints.recognise_checkpoint
    assert r(Path("RemoteCLIP-RN50.pt")).quick_gelu and r(Path("RemoteCLIP-RN50.pt")).family == "RemoteCLIP"
    assert r(Path("ckpt/RS5M_ViT-L-14.pt")).quick_gelu
    assert not r(Path("RS5M_ViT-H-14.pt")).quick_gelu
    sky = r(Path("/x/SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS/epoch_20.pt"))
    assert sky.family == "SkyCLIP" and sky.quick_gelu and sky.arch == "ViT-L-14"
    assert not r(Path("/x/SkyCLIP_ViT_B32_top50pct/epoch_20.pt")).quick_gelu
    assert r(Path("ViT-L-14.pt")).family == "OpenAI CLIP"
    assert r(Path("/h/models--timm--vit_base_patch32_clip_224.openai/snapshots/abc/"
                  "open_clip_pytorch_model.bin")).family == "OpenAI CLIP"
    assert r(Path("/x/epoch_20.pt")) is None and r(Path("my-model.pt")) is None


def test_skyclip_is_quickgelu_from_the_authors_bucket_and_its_training_checkpoint_loads(tmp_path, tiny_model):
    p = presets.PRESETS["skyclip-vit-l-14"]
    assert p.arch == "ViT-L-14-quickgelu" and architectures.arch_config(p.arch).get("quick_gelu")
    assert p.source == "url-zip" and p.filename == "epoch_20.pt"
    assert p.url.startswith("https://opendatasharing.s3.us-west-2.amazonaws.com/SkyScript/ckpt/")
    # the authors' layout: a zipped training checkpoint, "module."-prefixed state dict
    # plus optimizer state, in a folder named for the model
    sd = tiny_model.model.state_dict()
    ckpt = {"epoch": 20, "name": "SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS",
            "state_dict": {f"module.{k}": v.clone() for k, v in sd.items()},
            "optimizer": {"state": {0: {"step": torch.tensor(100.0), "exp_avg": torch.zeros(3),
                                        "exp_avg_sq": torch.zeros(3)}},
                          "param_groups": [{"lr": 3e-9, "betas": (0.9, 0.98), "eps": 1e-6,
                                            "weight_decay": 1.0, "params": [0]}]}}
    folder = tmp_path / "SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS"
    folder.mkdir()
    torch.save(ckpt, folder / "epoch_20.pt")
    lm = models.load_model(str(folder / "epoch_20.pt"), device="cpu")
    assert lm.arch == "mapclip-tiny" and lm.model_cfg["quick_gelu"] is True
    assert torch.equal(lm.model.visual.conv1.weight, tiny_model.model.visual.conv1.weight)
    # an explicit GELU variant of the architecture is corrected to QuickGELU
    gelu_cfg = dict(architectures.arch_config("mapclip-tiny"), quick_gelu=False)
    monkey_name = "mapclip-tiny-gelu-test"
    import open_clip
    open_clip.factory._MODEL_CONFIGS[monkey_name] = gelu_cfg
    try:
        with pytest.warns(checkpoints.CheckpointWarning, match="SkyCLIP checkpoint trained with QuickGELU"):
            fixed = specs.resolve(f"{monkey_name}:{folder / 'epoch_20.pt'}")
    finally:
        del open_clip.factory._MODEL_CONFIGS[monkey_name]
    assert fixed.model_cfg["quick_gelu"] is True
    # ... and the preset's download: the zip from a bucket, served locally
    import io
    import zipfile

    from tests.hubserver import HubServer
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(folder / "epoch_20.pt", "SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS/epoch_20.pt")
    with HubServer({"/ckpt/SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS.zip": buf.getvalue()}) as srv:
        url = srv.url + "/ckpt/SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS.zip"
        seen = []
        path = hub.download_zip_member(url, "epoch_20.pt", progress=lambda d, t: seen.append((d, t)))
    assert path.name == "epoch_20.pt" and seen and seen[-1][0] == seen[-1][1] == len(buf.getvalue())
    assert not list(path.parent.glob("*.zip"))
    assert checkpoints.read_state_dict(path).keys() == sd.keys()


# --------------------------------------------------------------------------- #
# Downloads through huggingface_hub, against a local server that acts as the hub.
# --------------------------------------------------------------------------- #
def test_hub_download_uses_hf_endpoint_progress_cache_resume_and_offline(monkeypatch, tiny_model, tmp_path,
                                                                       _isolated_cache):
    import io

    from tests.hubserver import HubServer
    buf = io.BytesIO()
    torch.save(tiny_model.model.state_dict(), buf)
    body = buf.getvalue()
    other = b"x" * 5000
    with HubServer({"chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt": body,
                    "chendelong/RemoteCLIP/partial.bin": other},
                   drop={"chendelong/RemoteCLIP/partial.bin": 2000}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        seen = []
        path = hub.hf_download("chendelong/RemoteCLIP", "RemoteCLIP-ViT-B-32.pt",
                                  progress=lambda d, t: seen.append((d, t)))
        assert path.read_bytes() == body
        assert str(path).startswith(str(_isolated_cache / "models" / "hub"))   # the hub cache layout
        assert "models--chendelong--RemoteCLIP" in str(path) and "snapshots" in str(path)
        assert seen and seen[-1] == (len(body), len(body))
        assert ("GET", "/chendelong/RemoteCLIP/resolve/main/RemoteCLIP-ViT-B-32.pt", "") in srv.requests
        # resume: a connection that drops after 2000 bytes is continued with a Range request
        # (huggingface_hub resumes from whole chunks: make them small)
        from huggingface_hub import constants as hf_constants
        monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 500)
        part = hub.hf_download("chendelong/RemoteCLIP", "partial.bin")
        assert part.read_bytes() == other
        assert ("GET", "/chendelong/RemoteCLIP/resolve/main/partial.bin", "bytes=2000-") in srv.requests
    # offline: a cached file still resolves, a missing one fails clearly
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub.hf_download("chendelong/RemoteCLIP", "RemoteCLIP-ViT-B-32.pt").read_bytes() == body
    with pytest.raises(ModelError) as err:
        hub.hf_download("chendelong/RemoteCLIP", "RemoteCLIP-ViT-L-14.pt")
    assert "offline" in err.value.message and "RemoteCLIP-ViT-L-14.pt" in err.value.message
    assert str(hub.hf_cache_path("chendelong/RemoteCLIP", "RemoteCLIP-ViT-L-14.pt")) in err.value.hint
    # no network, offline mode not set: a hub that cannot be reached is said at once (one
    # connection attempt, no retries), the cached file still resolves, the path stays whole
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in hub._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    real = hub.hub_unreachable
    monkeypatch.setattr(hub, "hub_unreachable", lambda url, **kw: calls.append(url) or real(url, **kw))
    assert hub.hf_download("chendelong/RemoteCLIP", "RemoteCLIP-ViT-B-32.pt").read_bytes() == body
    import huggingface_hub
    asked = []
    real_download = huggingface_hub.hf_hub_download

    def recording(*a, **kw):
        asked.append(kw.get("local_files_only"))
        return real_download(*a, **kw)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    with pytest.raises(ModelError) as err:
        hub.hf_download("chendelong/RemoteCLIP", "RemoteCLIP-ViT-L-14.pt")
    assert asked == [True]                  # the cache only: no download and its retries
    assert "127.0.0.1:9 cannot be reached" in err.value.message and calls == ["http://127.0.0.1:9"] * 2
    assert str(hub.hf_cache_path("chendelong/RemoteCLIP", "RemoteCLIP-ViT-L-14.pt")) in err.value.hint


def test_hf_hub_model_folder_downloads_from_a_mirror(monkeypatch, tmp_path, tiny_model):
    from tests.hubserver import HubServer
    folder = models.save_model_folder(tiny_model.model, tiny_model.model_cfg, tmp_path / "m", "mapclip-tiny")
    files = {f"org/tiny/{n}": (folder / n).read_bytes()
             for n in (presets.MODEL_CONFIG_FILE, presets.MODEL_WEIGHTS_FILE)}
    with HubServer(files) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        lm = models.load_model("hf-hub:org/tiny", device="cpu")
    assert torch.equal(lm.model.logit_scale, tiny_model.model.logit_scale)


def test_prompts_go_through_the_template_ensemble(tiny_model):
    """A prompt is put into every template of the remote-sensing ensemble, the filled
    templates are encoded, normalised, averaged and normalised again; "raw" is the
    prompt as typed; detect's prompt bank uses the model's default set."""
    from mapclip.engine.model import scoring
    assert tiny_model.templates == scoring.DEFAULT_TEMPLATES == "remote-sensing"
    temps = scoring.TEMPLATE_SETS["remote-sensing"]
    assert len(temps) >= 5 and all("{}" in t for t in temps)
    got = scoring.encode_prompts(tiny_model, ["storage tanks", "ships"])
    for i, p in enumerate(["storage tanks", "ships"]):
        each = encode_text(tiny_model, [t.replace("{}", p) for t in temps])
        want = torch.nn.functional.normalize(each.mean(dim=0), dim=-1)
        assert torch.allclose(got[i], want, atol=1e-6)
    raw = scoring.encode_prompts(tiny_model, ["ships"], "raw")
    assert torch.allclose(raw, encode_text(tiny_model, ["ships"]), atol=1e-6)
    assert not torch.allclose(raw[0], got[1], atol=1e-3)
    bank = scoring.build_bank(tiny_model, ["ships"], ["water"])
    assert torch.allclose(bank.text, scoring.encode_prompts(tiny_model, ["ships", "water"]), atol=1e-6)
    one = scoring.encode_prompts(tiny_model, ["ships"], ["an aerial photo of {}"])
    assert torch.allclose(one, encode_text(tiny_model, ["an aerial photo of ships"]), atol=1e-6)
    with pytest.raises(UsageError, match="unknown prompt template set"):
        scoring.encode_prompts(tiny_model, ["ships"], "nope")
    assert presets.PRESETS["demo"].templates == "raw"          # trained on raw captions
    assert presets.PRESETS["remoteclip-vit-b-32"].templates == "remote-sensing"


def test_checkpoint_choice_for_the_add_checkpoint_dialogs(remoteclip_b32_file, tmp_path):
    c = specs.checkpoint_choice(str(remoteclip_b32_file))
    assert c.spec == str(remoteclip_b32_file) and not c.choices
    assert "RemoteCLIP" in c.label and "ViT-B-32-quickgelu" in c.label
    mine = tmp_path / "mine.pt"
    mine.symlink_to(remoteclip_b32_file)
    c = specs.checkpoint_choice(str(mine))
    assert c.spec is None and c.choices == [f"ViT-B-32-quickgelu:{mine}", f"ViT-B-32:{mine}"]
    junk = tmp_path / "junk.pt"
    torch.save({"w": torch.zeros(3)}, junk)
    c = specs.checkpoint_choice(str(junk))
    assert c.spec is None and not c.choices and "needs its architecture" in c.note


def test_plain_url_download_resumes_an_interrupted_transfer(tmp_path):
    from tests.hubserver import HubServer
    body = bytes(range(256)) * 40
    dest = tmp_path / "cache" / "big.zip"
    with HubServer({"/ckpt/big.zip": body}, drop={"/ckpt/big.zip": 3000}) as srv:
        with pytest.raises(ModelError) as err:
            hub.download(srv.url + "/ckpt/big.zip", dest, timeout=5)
        assert "big.zip" in err.value.message and str(dest) in err.value.hint
        part = dest.with_name("big.zip.part")
        assert not dest.exists() and 0 < part.stat().st_size <= 3000    # kept for the next try
        have = part.stat().st_size
        hub.download(srv.url + "/ckpt/big.zip", dest, timeout=5)
        assert ("GET", "/ckpt/big.zip", f"bytes={have}-") in srv.requests
    assert dest.read_bytes() == body and not part.exists()


def test_openai_torchscript_release_gets_a_clear_error(tmp_path, tiny_model):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x * 2
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")          # torch.load never sees it (it would dispatch to torch.jit.load)
        with pytest.raises(ModelError) as err:
            models.load_model(str(path), device="cpu")
    assert "TorchScript" in err.value.message and "openai-vit-b-32" in err.value.hint
