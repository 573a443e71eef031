"""engine.model.accel: what runs where (selected by device), the CPU path unchanged in
fp32, batch sizes from free memory, and the text-embedding cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mapclip.engine.model import accel
from mapclip.engine.model.accel import TEXT_CACHE, Plan, TextCache, batch_from_memory, choose
from mapclip.engine.model.encode import encode_images, encode_text, to_model_input
from mapclip.engine.core.errors import UsageError
from mapclip.engine.core.options import DetectOptions, check
from mapclip.engine.model.scoring import encode_prompts


# -------------------------------------------------------------- selection --
def test_cpu_plan_is_plain_fp32_eager():
    for vit in (True, False):
        assert choose("cpu", "fp32", vit, compile=True) == Plan("cpu")
    assert choose("mps", "fp32", True) == Plan("mps")


def test_cuda_plan_autocasts_in_the_model_precision_and_honours_fp32():
    p = choose("cuda", "bf16", is_vit=True)
    assert p.autocast == "bf16" and not p.channels_last and not p.compile
    assert choose("cuda", "fp16", is_vit=True).autocast == "fp16"
    assert choose("cuda", "fp32", is_vit=True).autocast is None       # the user asked for fp32


def test_channels_last_only_for_convolutional_towers_on_cuda():
    assert choose("cuda", "bf16", is_vit=False).channels_last
    assert not choose("cuda", "bf16", is_vit=True).channels_last
    assert not choose("cpu", "fp32", is_vit=False).channels_last


def test_compile_is_opt_in_and_cuda_only(tiny_model):
    assert choose("cuda", "bf16", True, compile=True).compile
    assert not choose("cuda", "bf16", True).compile
    notes = accel.prepare(tiny_model, compile=True)
    assert notes and "CUDA only" in notes[0]
    assert accel.plan_for(tiny_model) == Plan("cpu")
    with pytest.raises(UsageError) as e:
        check(DetectOptions(compile="yes"))
    assert e.value.option == "compile"


@pytest.mark.parametrize("free,per,want", [
    (80 << 30, 2 << 20, 1024),          # an H100/H200 with a small model: capped
    (1 << 30, 2 << 20, 256),            # half of 1 GiB at 2 MiB per image
    (1 << 30, 3 << 20, 168),            # 170 -> a multiple of 8
    (20 << 20, 3 << 20, 3),             # under 8: not rounded to 0
    (0, 3 << 20, 1),                    # nothing free: still 1 (OOM halving takes over)
])
def test_batch_from_free_memory(free, per, want):
    assert batch_from_memory(free, per) == want


def test_no_auto_batch_off_cuda(tiny_model):
    called = []
    assert accel.auto_batch_size(tiny_model, mem_get_info=lambda d: called.append(d)) is None
    assert not called


# ------------------------------------------------------------ CPU = fp32 --
def test_cpu_image_path_equals_the_plain_model_exactly(tiny_model):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    with torch.inference_mode():
        x = to_model_input(tiny_model, batch)
        plain = torch.nn.functional.normalize(tiny_model.model.encode_image(x).float(), dim=-1)
        ours = encode_images(tiny_model, batch)
        direct = accel.encode_image(tiny_model, x)
    assert ours.dtype == torch.float32 and x.dtype == torch.float32
    assert torch.equal(ours, plain)
    assert torch.equal(direct, tiny_model.model.encode_image(x))
    conv = tiny_model.model.visual.conv1.weight               # no channels-last on the CPU
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_attention_report_names_the_fused_path(tiny_model):
    text = accel.attention_report(tiny_model)
    assert "scaled" in text or "convolutional" in text
    n_mha = sum(isinstance(m, torch.nn.MultiheadAttention) for m in tiny_model.model.visual.modules())
    if n_mha:
        assert f"{n_mha} nn.MultiheadAttention" in text


# ------------------------------------------------------------ text cache --
class _Counting:
    """Counts encode_text calls of a model (wraps the bound method)."""

    def __init__(self, lm, monkeypatch):
        self.calls = 0
        real = lm.model.encode_text

        def wrapped(tokens, *a, **kw):
            self.calls += 1
            return real(tokens, *a, **kw)
        monkeypatch.setattr(lm.model, "encode_text", wrapped)


def test_same_prompt_set_is_encoded_once(tiny_model, monkeypatch):
    TEXT_CACHE.clear()
    count = _Counting(tiny_model, monkeypatch)
    a = encode_text(tiny_model, ["a road", "a lake"])
    b = encode_text(tiny_model, ["a road", "a lake"])
    assert count.calls == 1 and torch.equal(a, b) and TEXT_CACHE.hits == 1
    with torch.inference_mode():
        b.zero_()                                              # callers get their own copy
    assert torch.equal(encode_text(tiny_model, ["a road", "a lake"]), a)
    encode_text(tiny_model, ["a lake", "a road"])              # another set (order matters)
    assert count.calls == 2


def test_a_new_prompt_beside_the_same_background_encodes_only_itself(tiny_model, monkeypatch):
    """A second search's prompts are one new prompt and the same background prompts: only
    the new prompt's templates go through the text tower, and the bank equals a fresh one."""
    from mapclip.engine.model.scoring import build_bank, resolve_templates
    TEXT_CACHE.clear()
    seen = []
    real = tiny_model.model.encode_text

    def wrapped(tokens, *a, **kw):
        seen.append(len(tokens))
        return real(tokens, *a, **kw)
    monkeypatch.setattr(tiny_model.model, "encode_text", wrapped)
    first = build_bank(tiny_model, ["storage tanks"])
    n_temps = len(resolve_templates(None, tiny_model))
    assert seen == [n_temps * (1 + len(first.background))]
    second = build_bank(tiny_model, ["ships"])
    assert seen[1:] == [n_temps] and second.background == first.background
    TEXT_CACHE.clear()
    fresh = build_bank(tiny_model, ["ships"])
    assert torch.allclose(second.text, fresh.text, atol=1e-6)
    assert build_bank(tiny_model, ["ships", "storage tanks"]).text.shape[0] == 2 + len(first.background)
    assert seen[-1] == n_temps                       # "storage tanks" was kept too


def test_templates_are_part_of_the_key(tiny_model, monkeypatch):
    TEXT_CACHE.clear()
    count = _Counting(tiny_model, monkeypatch)
    raw = encode_prompts(tiny_model, ["tanks"], "raw")
    rs = encode_prompts(tiny_model, ["tanks"], "remote-sensing")
    assert count.calls == 2 and not torch.equal(raw, rs)
    assert torch.equal(encode_prompts(tiny_model, ["tanks"], "raw"), raw)
    assert count.calls == 2


def test_changed_weights_miss_the_cache(tiny_model):
    TEXT_CACHE.clear()
    before = encode_text(tiny_model, ["a farm"])
    p = next(tiny_model.model.transformer.parameters())
    with torch.no_grad():
        p.add_(0.5)
    try:
        after = encode_text(tiny_model, ["a farm"])
        assert not torch.equal(before, after)
    finally:
        with torch.no_grad():
            p.sub_(0.5)


def test_cache_is_lru_bounded(tiny_model):
    cache = TextCache(size=2)
    e = torch.ones(1, 4)
    for i in range(3):
        cache.put(tiny_model, [f"p{i}"], e * i)
    assert len(cache) == 2
    assert cache.get(tiny_model, ["p0"]) is None               # evicted, oldest
    assert torch.equal(cache.get(tiny_model, ["p2"]), e * 2)


# ------------------------------------------------------------- the CPU path --
def _vit_b32(auto: bool = True):
    """ViT-B-32 (QuickGELU) with seeded random weights, as load_model gives it on the CPU."""
    from open_clip.tokenizer import SimpleTokenizer
    from mapclip.engine.model import architectures, models
    cfg = architectures.arch_config("ViT-B-32-quickgelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = architectures.build_model(cfg).eval().requires_grad_(False)
    return models.LoadedModel(model=model, tokenizer=SimpleTokenizer(), spec="vit-b-32-random",
                              arch="ViT-B-32-quickgelu", image_size=224, mean=models.OPENAI_MEAN,
                              std=models.OPENAI_STD, embed_dim=512, device=torch.device("cpu"),
                              precision="fp32", model_cfg=cfg, auto_precision=auto)


@pytest.fixture(scope="module")
def vit_b32():
    return _vit_b32()


def test_the_cpu_path_runs_a_large_image_tower_in_bf16_only_where_it_agrees_with_fp32(vit_b32, monkeypatch):
    monkeypatch.delenv(accel.CPU_PATH_ENV, raising=False)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    copy, facts = accel.cpu_path(vit_b32)
    assert facts["gflop"] > accel.CPU_BF16_MIN_GFLOP
    if not native:         # a CPU without bf16 arithmetic keeps fp32 and says why
        assert copy is None and "no native bf16" in facts["reason"]
        return
    assert copy is not None and facts["path"] == "bf16"
    assert facts["cosine"] >= accel.CPU_AGREEMENT and facts["same_top10"]
    x = accel.probe_images(224, n=6, seed=7)                # images the check did not see
    with torch.inference_mode():
        ref = vit_b32.model.visual(x)
        got = copy(x.to(torch.bfloat16)).float()
    cos, _ = accel.agreement(ref, got)
    assert got.dtype == torch.float32 and cos >= accel.CPU_AGREEMENT
    # a stricter agreement than bf16 can give: fp32 stays, with the measured cosine
    monkeypatch.setattr(accel, "CPU_AGREEMENT", 1.0)
    copy, facts = accel.cpu_path(vit_b32)
    assert copy is None and "disagrees" in facts["reason"] and facts["cosine"] < 1.0


def test_the_cpu_path_leaves_small_models_asked_precisions_and_the_override_at_fp32(tiny_model, monkeypatch):
    monkeypatch.delenv(accel.CPU_PATH_ENV, raising=False)
    import dataclasses
    tiny = accel.cpu_path(dataclasses.replace(tiny_model, auto_precision=True))   # fields only
    assert tiny[0] is None and "small model" in tiny[1]["reason"]
    assert accel.cpu_path(_vit_b32(auto=False))[1]["reason"] == "fp32 asked"   # --precision fp32
    monkeypatch.setenv(accel.CPU_PATH_ENV, "fp32")
    assert accel.cpu_path(_vit_b32())[0] is None


def test_the_cpu_path_follows_weights_changed_in_place():
    lm = _vit_b32()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not accel.plan_for(lm).cpu_bf16
        return
    assert accel.plan_for(lm).cpu_bf16 and "bf16 image tower" in accel.plan_for(lm).describe()
    x = accel.probe_images(224, n=2, seed=3)
    before = accel.encode_image(lm, x)
    with torch.no_grad():
        lm.model.visual.proj.mul_(-1.0)      # a training step that flips every embedding
    after = accel.encode_image(lm, x)
    assert torch.nn.functional.cosine_similarity(before, after).max() < -0.99
