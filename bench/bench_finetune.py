"""Fine-tuning throughput: training samples/s for ViT-B/32, and the decode+augment pipeline.

The model is ViT-B-32-quickgelu at random initialisation (no download), the
batches synthetic (random pixels, random captions), and each step the real
engine step (:func:`engine.finetune.train_step`: forward under autocast on
CUDA, symmetric InfoNCE, backward, AdamW, temperature clamp). Default sizes:
on a GPU batch 128 x 20 steps; on the CPU batch 8 x 3 steps (``--full``:
batch 32 x 10 on the CPU, batch 256 x 30 on a GPU). Options: ``--batch N``,
``--steps N``, ``--accum N``, ``--device D``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCH = "ViT-B-32-quickgelu"


def _args(argv):
    p = argparse.ArgumentParser(prog="bench_finetune", add_help=False)
    p.add_argument("--full", action="store_true")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--device", default=None)
    return p.parse_known_args(argv)[0]


def bench_training(device: torch.device, batch: int, steps: int, accum: int) -> None:
    from mapclip.engine import finetune as ft
    from mapclip.engine.model.architectures import arch_config, build_model
    from mapclip.engine.model.models import make_tokenizer
    from mapclip.engine.model.specs import Resolved
    cfg = arch_config(ARCH)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    ft.set_trainable(model)
    opt = ft.make_optimizer(model, 1e-5, 0.2)
    amp = ft.resolve_amp(device, None)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    tok = make_tokenizer(Resolved(ARCH, cfg, {}, None))
    words = ["airplane", "runway", "storage", "tank", "harbor", "ship", "field", "road", "river",
             "forest", "building", "parking", "lot", "bridge", "residential", "area"]
    rng = np.random.default_rng(0)
    size = int(cfg["vision_cfg"]["image_size"])

    def micro_batch():
        captions = [" ".join(rng.choice(words, size=8)) for _ in range(batch)]
        x = torch.randn(batch, 3, size, size, device=device)
        return x, tok(captions).to(device)

    micro = [micro_batch() for _ in range(accum)]
    ft.train_step(model, opt, micro, amp, scaler)  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        ft.train_step(model, opt, micro, amp, scaler)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    n = batch * accum * steps
    prec = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads), no GPU"
    print(f"training {ARCH} on {where}, {prec}: batch {batch} x accum {accum}, {steps} steps: "
          f"{n / dt:.1f} samples/s ({dt / steps:.2f} s/step)")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB")


def bench_pipeline(n: int = 64, size: int = 224) -> None:
    """PIL decode + RemoteCLIP augmentation in the main process (one worker's rate)."""
    from PIL import Image
    from mapclip.engine.finetune import load_image
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(n):
            p = Path(tmp) / f"chip{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(p, quality=90)
            paths.append(str(p))
        t0 = time.perf_counter()
        for i, p in enumerate(paths):
            load_image(p, size, seed=i)
        dt = time.perf_counter() - t0
    print(f"decode + augment (256 px JPEG -> {size} px, PIL, one process): {n / dt:.0f} images/s")


def run(argv) -> None:
    a = _args(argv)
    from mapclip.engine.model.models import resolve_device
    device = resolve_device(a.device)
    if device.type == "cuda":
        batch, steps = (256, 30) if a.full else (128, 20)
    else:
        batch, steps = (32, 10) if a.full else (8, 3)
        print(f"no GPU at hand: measuring on the CPU ({'full' if a.full else 'default small'} size)")
    batch, steps = a.batch or batch, a.steps or steps
    bench_training(device, batch, steps, a.accum)
    bench_pipeline()


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    run(sys.argv[1:])
