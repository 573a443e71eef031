"""Interactive benchmark: one pass, many questions; and the CPU paths of the image tower.

Prints, in one run (nothing is asserted):

(a) the analyst's loop on the demo model: a synthetic scene (1536 px: 4,096 tiles of
    24 px, 3,969 windows), first prompt ("storage tanks", the pass over the raster),
    second prompt ("ships", from the kept embeddings), a mode switch (the same search
    as a heatmap), and the second prompt from disk (as a new process would); engine
    seconds and the ratio second / first beside its goal (<= 1/10, aim 1/50), and
    whether the cached answer equals an uncached run's boxes;
(b) the same loop on ViT-B-32 (QuickGELU, random weights) at 224 px tiles;
(c) the CPU paths of ViT-B-32's image tower side by side: model-only images/s in fp32,
    bf16 autocast, a bf16 copy of the weights (the engine's CPU path) and int8 dynamic
    quantisation of the linear layers; each one's least cosine to fp32 on probe images
    and whether the top-10 boxes of a search change; the fp32 figure as a share of this
    CPU's fp32 FLOP limit (FLOPs counted by torch's FLOP counter; the limit is cores x
    clock x FLOP per cycle, from /proc/cpuinfo, printed with its assumptions); and which
    path the engine picks here.

``--full`` makes (a) a 3072 px scene (16,384 tiles) and (b) 8960 px (1,600 tiles).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_RATIO = 1 / 10
AIM_RATIO = 1 / 50
GOAL_FP32_SHARE = 0.40
GOAL_FAST_PATH = 1.6


def _args(argv):
    p = argparse.ArgumentParser(prog="bench_interactive", add_help=False)
    p.add_argument("--full", action="store_true")
    p.add_argument("--only", default="a,b,c")
    args, _ = p.parse_known_args(argv)
    return args


def _boxes(res):
    return [(b.prompt, b.pixel, round(b.score, 6)) for b in res.boxes]


def _loop(label, raster, lm, opts, first, second):
    from dataclasses import replace

    from mapclip.engine.cache.store import CACHE
    from mapclip.engine.detect import detect
    CACHE.clear()
    detect(raster, [first], lm, options=replace(opts, cache=False, refine=False),
           extent=None)  # warm-up: model, text, code paths (the pass itself is measured below)
    CACHE.clear()
    runs = {}
    for name, prompt, o in (("first prompt", first, opts), ("second prompt", second, opts),
                            ("mode switch (heatmap)", second, replace(opts, heatmap=True))):
        t0 = time.perf_counter()
        res = detect(raster, [prompt], lm, options=o)
        runs[name] = (time.perf_counter() - t0, res)
    with CACHE._lock:
        CACHE._mem.clear()                      # as a new process: from disk
    t0 = time.perf_counter()
    res = detect(raster, [second], lm, options=opts)
    runs["second prompt, from disk"] = (time.perf_counter() - t0, res)
    fresh = detect(raster, [second], lm, options=replace(opts, cache=False))
    t_first = runs["first prompt"][0]
    print(f"{label}: {runs['first prompt'][1].tiles} tiles, {runs['first prompt'][1].windows} windows")
    for name, (sec, res) in runs.items():
        ratio = "" if name == "first prompt" else f"  {sec / t_first:.4f} of the first (1/{t_first / sec:.0f})"
        print(f"  {name:26s} {sec:8.3f} s  cache: {res.cache:9s}{ratio}")
    r = runs["second prompt"][0] / t_first
    print(f"  second / first {r:.4f} (goal <= {GOAL_RATIO:.2f}: {'met' if r <= GOAL_RATIO else 'NOT met'}; "
          f"aim <= {AIM_RATIO:.2f}: {'met' if r <= AIM_RATIO else 'not met'})")
    same = _boxes(runs["second prompt"][1]) == _boxes(fresh)
    print(f"  cached boxes equal an uncached run's: {'yes' if same else 'NO'} "
          f"({len(fresh.boxes)} boxes)")
    info = CACHE.info()
    print(f"  cache: {info['entries']} entries, {info['disk_mb']:.1f} MB on disk, "
          f"{info['memory_mb']:.1f} MB in memory")


def bench_demo(full: bool, tmp: Path) -> None:
    from mapclip.engine.core.options import DetectOptions
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.engine.model.models import load_model
    side = 3072 if full else 1536
    raster = str(tmp / f"scene_{side}.tif")
    make_scene(raster, width=side, seed=9008, mask_path=None, coco_path=None)
    lm = load_model("demo", device="cpu")
    _loop(f"(a) demo model, synthetic scene {side} px", raster, lm, DetectOptions(),
          "storage tanks", "ships")


def _vit_b32(auto: bool = True, visual=None):
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from mapclip.engine.model import architectures, models
    cfg = architectures.arch_config("ViT-B-32-quickgelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = architectures.build_model(cfg).eval().requires_grad_(False)
    if visual is not None:
        model.visual = visual
    return models.LoadedModel(model=model, tokenizer=SimpleTokenizer(), spec="ViT-B-32 (random)",
                              arch="ViT-B-32-quickgelu", image_size=224, mean=models.OPENAI_MEAN,
                              std=models.OPENAI_STD, embed_dim=512, device=torch.device("cpu"),
                              precision="fp32", model_cfg=cfg, auto_precision=auto)


def _scene(tmp: Path, side: int) -> str:
    from bench.fixtures import write_blockwise
    path = tmp / f"vit_{side}.tif"
    write_blockwise(path, side, side, block=512)
    return str(path)


def bench_vit(full: bool, tmp: Path) -> None:
    from mapclip.engine.core.options import DetectOptions
    from mapclip.engine.model import accel
    side = 8960 if full else 4480
    lm = _vit_b32()
    accel.prepare(lm)
    _loop(f"(b) ViT-B-32 (random weights), 224-px tiles, {side} px raster, image tower: "
          f"{accel.plan_for(lm).describe()}", _scene(tmp, side), lm,
          DetectOptions(tile_px=224, window=1, batch_size=32, top_k=10), "storage tanks", "ships")


def _cpu_flags():
    flags, mhz, vendor, family = set(), 0.0, "", 0
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "flags":
                flags = set(val.split())
            elif key == "cpu MHz":
                mhz = max(mhz, float(val))
            elif key == "vendor_id":
                vendor = val.strip()
            elif key == "cpu family":
                family = int(val)
    except OSError:
        pass
    return flags, mhz, vendor, family


def fp32_peak():
    """(GFLOP/s, how it was got): cores x clock x fp32 FLOP per cycle per core."""
    flags, mhz, vendor, family = _cpu_flags()
    if "avx512f" in flags and not (vendor == "AuthenticAMD" and family < 0x1A):
        per, why = 64, "AVX-512: two 512-bit FMA pipes (Intel server, AMD Zen 5)"
    elif "avx512f" in flags or ("avx2" in flags and "fma" in flags):
        per, why = 32, "two 256-bit FMA pipes (AVX2, or AVX-512 on AMD Zen 4's 256-bit datapath)"
    else:
        per, why = 16, "SSE-class arithmetic"
    cores = os.cpu_count() or 1
    ghz = mhz / 1000 if mhz else 2.0
    return cores * ghz * per, (f"{cores} cores x {ghz:.2f} GHz (cpu MHz in /proc/cpuinfo; boost "
                               f"clocks are higher) x {per} fp32 FLOP/cycle ({why})")


def bench_cpu_paths(tmp: Path) -> None:
    import torch
    import torch.nn.functional as F
    from mapclip.engine.core.options import DetectOptions
    from mapclip.engine.detect import detect
    from mapclip.engine.model import accel
    flags, _, vendor, family = _cpu_flags()
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni")
           if f in flags]
    print(f"(c) CPU paths of ViT-B-32's image tower, batch 32 at 224 px, {torch.get_num_threads()} "
          f"torch threads; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"instructions: {', '.join(isa) or 'none of AVX-512/AMX'}; oneDNN bf16: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    ref_lm = _vit_b32(auto=False)
    visual = ref_lm.model.visual
    gflop = accel.image_gflop(ref_lm)
    x = accel.probe_images(224, n=32, seed=11)
    bf16_copy = copy.deepcopy(visual).to(torch.bfloat16).eval()
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(visual), {torch.nn.Linear},
                                                  dtype=torch.qint8)

    def autocast(a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return visual(a)
    paths = {"fp32": lambda a: visual(a), "bf16 autocast": autocast,
             "bf16 weights (engine)": lambda a: bf16_copy(a.to(torch.bfloat16)), "int8 dynamic": int8}
    from mapclip.engine.data.synthetic.scene import make_scene
    raster = str(tmp / "paths_2240.tif")     # a scene with objects: noise ties every window
    make_scene(raster, width=2240, seed=9008, mask_path=None, coco_path=None)
    opts = DetectOptions(tile_px=224, window=1, batch_size=32, top_k=10, refine=False, cache=False)
    with torch.inference_mode():
        ref = visual(x).float()
    top_ref = None
    rates = {}
    for name, fn in paths.items():
        with torch.inference_mode():
            fn(x[:4])
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < 6.0 or n < 2:
                out = fn(x).float()
                n += 1
            rate = 32 * n / (time.perf_counter() - t0)
        rates[name] = rate
        cos = float(F.cosine_similarity(out, ref).min())
        if name == "fp32":
            lm = ref_lm
        elif name == "bf16 weights (engine)":
            lm = _vit_b32(auto=True)
        elif name == "int8 dynamic":
            lm = _vit_b32(auto=False, visual=int8)
        else:
            lm = None
        boxes = ""
        if lm is not None:
            top = [(p, px) for p, px, _ in _boxes(detect(raster, ["storage tanks"], lm, options=opts))]
            if top_ref is None:
                top_ref = top
            shared = sum(b in top_ref for b in top)
            boxes = (f"  top-10 boxes: {shared} of {len(top_ref)} the same, "
                     f"order {'same' if top == top_ref else 'changed'}")
        share = rate * gflop / fp32_peak()[0]
        print(f"  {name:22s} {rate:7.1f} img/s  {rate / rates['fp32']:5.2f}x fp32  least cosine "
              f"{cos:.6f}  ({share:.0%} of the fp32 FLOP limit){boxes}")
    peak, how = fp32_peak()
    fp32_share = rates["fp32"] * gflop / peak
    print(f"  ViT-B-32 image tower: {gflop:.2f} GFLOP per image; fp32 limit {peak:.0f} GFLOP/s = {how}")
    print(f"  fp32 model-only {rates['fp32'] * gflop:.0f} GFLOP/s = {fp32_share:.0%} of the limit "
          f"(goal >= {GOAL_FP32_SHARE:.0%}: {'met' if fp32_share >= GOAL_FP32_SHARE else 'NOT met'})")
    fast = rates["bf16 weights (engine)"] / rates["fp32"]
    print(f"  bf16 weights / fp32 {fast:.2f}x (goal >= {GOAL_FAST_PATH}x where agreement holds: "
          f"{'met' if fast >= GOAL_FAST_PATH else 'NOT met'})")
    auto = _vit_b32(auto=True)
    accel.prepare(auto)
    print(f"  the engine picks here: {accel.plan_for(auto).describe()} -- {accel.cpu_check(auto)}")
    bench_trained_bf16(tmp)


def bench_trained_bf16(tmp: Path) -> None:
    """Random weights score every window nearly alike, so their top-10 reorders under any
    rounding; the trained demo model says whether bf16 changes what a search finds."""
    from mapclip.engine.core.options import DetectOptions
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.engine.detect import detect
    from mapclip.engine.model import accel
    from mapclip.engine.model.models import load_model
    raster = str(tmp / "trained_1536.tif")
    make_scene(raster, width=1536, seed=9008, mask_path=None, coco_path=None)
    import torch
    fp32 = load_model("demo", device="cpu", precision="fp32")
    bf16 = load_model("demo", device="cpu", precision="fp32")

    class Bf16Tower(torch.nn.Module):   # the CPU path's bf16 copy, forced for the comparison
        def __init__(self, visual):
            super().__init__()
            self.inner = visual.to(torch.bfloat16)

        def forward(self, x):
            return self.inner(x.to(torch.bfloat16)).float()
    x = accel.probe_images(fp32.image_size)
    with torch.inference_mode():
        ref = fp32.model.visual(x)
        bf16.model.visual = Bf16Tower(bf16.model.visual)
        cos, same_probe = accel.agreement(ref, bf16.model.visual(x))
    opts = DetectOptions(cache=False, top_k=10)
    prompts = ["storage tanks", "ships", "airplanes"]
    a = detect(raster, prompts, fp32, options=opts)
    b = detect(raster, prompts, bf16, options=opts)
    for p in prompts:
        pa = [x.pixel for x in a.boxes if x.prompt == p]
        pb = [x.pixel for x in b.boxes if x.prompt == p]
        print(f"  trained demo model, bf16 image tower (probe: least cosine {cos:.6f}, same "
              f"top-10 {same_probe}): top-10 {p!r} boxes "
              f"{'same' if pa == pb else 'CHANGED'} ({sum(x in pa for x in pb)} of {len(pa)} shared)")


def run(argv) -> None:
    args = _args(argv)
    only = set(args.only.split(","))
    old = os.environ.get("MAPCLIP_CACHE")
    with tempfile.TemporaryDirectory(prefix="mapclip-bench-interactive-") as tmp:
        # the benchmark's own cache folder: it empties it, never the user's
        os.environ["MAPCLIP_CACHE"] = str(Path(tmp) / "cache")
        try:
            if "a" in only:
                bench_demo(args.full, Path(tmp))
            if "b" in only:
                bench_vit(args.full, Path(tmp))
            if "c" in only:
                bench_cpu_paths(Path(tmp))
        finally:
            if old is None:
                os.environ.pop("MAPCLIP_CACHE", None)
            else:
                os.environ["MAPCLIP_CACHE"] = old


if __name__ == "__main__":
    run(sys.argv[1:])
