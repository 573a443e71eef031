"""De-duplication: the segment index against brute force on random 64-bit hashes.

Times finding every pair within the Hamming distance among N random 64-bit
hashes (with planted near-duplicates at distances 0..D+1) with the segment
index (``engine.dedup.segments.find_pairs``) and with a numpy brute force over all
N(N-1)/2 pairs (``engine.dedup.segments.brute_force_pairs``) in the same run, checks
that both find the same pairs and prints both times and their ratio. Also
times hashing of image files (p-Hash, from disk) for scale.

Sizes: by default 50,000 hashes (about a minute of brute force on a free
2-core CPU); ``--full`` uses 100,000, the size the issue asks for (about four
times the brute-force time); ``--n N`` any size; ``--distance D`` (default 1).
"""
from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _planted(n: int, d: int, seed: int = 0):
    rng = random.Random(seed)
    hashes = [rng.getrandbits(64) for _ in range(n)]
    n_near = max(1, n // 100)
    for k in range(n_near):
        h = hashes[rng.randrange(n)]
        for b in rng.sample(range(64), k % (d + 2)):     # distances 0 .. d+1
            h ^= 1 << b
        hashes.append(h)
    return hashes, n_near


def _hash_files(count: int = 200) -> float:
    import numpy as np
    from PIL import Image
    from mapclip.engine.dedup.hashing import phash_file
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for k in range(count):
            p = Path(tmp) / f"{k}.png"
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(p)
            paths.append(p)
        t0 = time.perf_counter()
        for p in paths:
            phash_file(p)
        return count / (time.perf_counter() - t0)


def run(argv) -> None:
    ap = argparse.ArgumentParser(prog="bench dedup", add_help=False)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--distance", type=int, default=1)
    ap.add_argument("--full", action="store_true")
    args, _ = ap.parse_known_args(list(argv))
    n = args.n or (100000 if args.full else 50000)
    d = args.distance
    from mapclip.engine.dedup.segments import brute_force_pairs, find_pairs
    print(f"machine: {_cpu()}, CPU only (no GPU used)")
    size = "--n" if args.n else ("--full" if args.full else "default; --full for 100000")
    print(f"size: {n} hashes ({size})")
    hashes, planted = _planted(n, d)
    print(f"{len(hashes)} random 64-bit hashes ({planted} planted near-duplicates at "
          f"distances 0..{d + 1}), max distance {d}, {d + 1} segments")
    t0 = time.perf_counter()
    seg = find_pairs(hashes, d)
    t_seg = time.perf_counter() - t0
    print(f"segment index: {t_seg:.3f} s, {len(seg)} pairs", flush=True)
    t0 = time.perf_counter()
    brute = brute_force_pairs(hashes, d)
    t_brute = time.perf_counter() - t0
    pairs = len(hashes) * (len(hashes) - 1) // 2
    print(f"brute force (numpy, {pairs / 1e9:.2f} G pairs): {t_brute:.1f} s, {len(brute)} pairs "
          f"({pairs / t_brute / 1e6:.0f} M pairs/s)")
    print(f"speed-up: {t_brute / t_seg:.0f}x; results agree: {'yes' if seg == brute else 'NO'}")
    rate = _hash_files()
    print(f"p-Hash of 256x256 PNG files (decode + hash, one thread): {rate:.0f} images/s")
