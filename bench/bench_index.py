"""Index benchmark: build throughput, and query latency / recall, exact vs approximate.

Prints (nothing is asserted):

(a) index build tiles/s from disk to committed shards (ViT-B-32 QuickGELU,
    random weights, 224-px tiles, no overlap, a generated 3-band uint8
    GeoTIFF tiled 512 px) and model-only tiles/s for the same model and
    batch (random uint8 batches already in memory), and their ratio;
(b) query latency p50/p95 over stored random unit 512-d vectors (float16,
    as the index stores them) for 1e5 and 1e6 rows: exact search (one
    matrix product, the engine's code path) and approximate search (faiss
    PQ fast-scan + exact re-ranking, engine.archive.search.ranked_rows), with
    recall@100 of approximate against exact, the faiss parameters and the
    time to build the faiss index. Latency is the ranking only (the query
    vector is given; encoding a text query is one model call more).

Default: (a) on a 2240 x 2240 raster (100 tiles), (b) exact and approximate
at 1e5 and exact only at 1e6 (building the 1e6 faiss index takes minutes on
2 cores); ``--full``: (a) on 4480 x 4480 (400 tiles) and the approximate
index at 1e6 too. Options: ``--full``, ``--batch N``, ``--queries N``,
``--threads N`` (torch and faiss threads), ``--only a,b``, ``--device``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _args(argv):
    p = argparse.ArgumentParser(prog="bench_index", add_help=False)
    p.add_argument("--full", action="store_true")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", default="a,b")
    p.add_argument("--device", default=None)
    args, _ = p.parse_known_args(argv)
    return args


def _pct(values, q):
    import numpy as np
    return float(np.percentile(np.asarray(values) * 1e3, q))


def bench_build(args, tmp: Path) -> None:
    import numpy as np
    import torch

    from bench.bench_detect import _vit_b32
    from mapclip.engine.archive.approx import APPROX_MIN_ROWS, approx_factory
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.search import ranked_rows
    from tests.index_factories import index_from_arrays
    from mapclip.engine.core.options import IndexOptions
    from mapclip.engine.model.encode import encode_images
    from bench.fixtures import write_blockwise

    lm = _vit_b32(args.device)
    side = 4480 if args.full else 2240
    raster = write_blockwise(tmp / "scene.tif", side, side, block=512)
    n_tiles = (side // 224) ** 2
    where = (f"GPU {torch.cuda.get_device_name(0)}" if lm.device.type == "cuda" else
             f"NO GPU: CPU, {torch.get_num_threads()} torch threads")
    print(f"(a) build: {side} x {side} uint8 GeoTIFF (512-px blocks), {n_tiles} tiles of 224 px, "
          f"ViT-B-32 (random weights), batch {args.batch}, {lm.precision}, {where}", flush=True)
    warm = np.random.default_rng(0).integers(0, 255, (args.batch, 224, 224, 3), dtype=np.uint8)
    encode_images(lm, warm)
    t0 = time.perf_counter()
    info = build_index([raster], tmp / "idx", lm, IndexOptions(tile_px=224, batch_size=args.batch),
                          progress=None)
    build_s = time.perf_counter() - t0
    # model-only: the same number of tiles, same batch, already in memory
    done = 0
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    while done < info.embedded:
        b = min(args.batch, info.embedded - done)
        encode_images(lm, warm[:b]).cpu()
        done += b
    model_s = time.perf_counter() - t0
    e2e = info.embedded / build_s
    mo = info.embedded / model_s
    print(f"    index build: {info.embedded} tiles in {build_s:.2f} s = {e2e:.1f} tiles/s "
          f"(incl. model identity, checksum, {info.shards} shard commit(s), footprints.gpkg)")
    print(f"    model only : {info.embedded} tiles in {model_s:.2f} s = {mo:.1f} tiles/s")
    print(f"    ratio build / model-only: {e2e / mo:.2f}   goal >= 0.60 (on a GPU) "
          f"[{'met' if e2e / mo >= 0.6 else 'NOT met'}]", flush=True)


def _random_unit(n: int, d: int, seed: int):
    import numpy as np
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float16)
    step = 100_000
    for i in range(0, n, step):
        x = rng.standard_normal((min(step, n - i), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[i:i + len(x)] = x
    return out


def bench_query(args) -> None:
    import numpy as np

    from mapclip.engine.archive.approx import APPROX_MIN_ROWS, approx_factory
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.search import ranked_rows
    from tests.index_factories import index_from_arrays
    from mapclip.engine.core.options import IndexOptions
    d, k = 512, 100
    sizes = [(100_000, True), (1_000_000, bool(args.full))]
    print(f"(b) query latency over random unit {d}-d vectors stored as float16, top-{k}; "
          f"{args.queries} random unit queries; exact/approx threshold "
          f"{APPROX_MIN_ROWS} rows; approximate index {approx_factory(d)} + exact re-rank",
          flush=True)
    for n, with_approx in sizes:
        emb = _random_unit(n, d, seed=n)
        idx = index_from_arrays(emb)
        rng = np.random.default_rng(1)
        qs = rng.standard_normal((args.queries, d)).astype(np.float32)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        n_exact = args.queries if n <= 100_000 else min(args.queries, 20)
        ex_t, ex_rows = [], []
        ranked_rows(idx, qs[0], k, "exact")                         # warm (float32 copy etc.)
        for q in qs[:n_exact]:
            t0 = time.perf_counter()
            rows, _, _, _ = ranked_rows(idx, q, k, "exact")
            ex_t.append(time.perf_counter() - t0)
            ex_rows.append(rows)
        print(f"    {n:>9,} rows  exact : p50 {_pct(ex_t, 50):7.1f} ms  p95 {_pct(ex_t, 95):7.1f} ms "
              f"({n_exact} queries)", flush=True)
        if not with_approx:
            print(f"    {n:>9,} rows  approx: not run (building the faiss index takes minutes "
                  f"here; run with --full)", flush=True)
            continue
        t0 = time.perf_counter()
        idx.approx()
        build_s = time.perf_counter() - t0
        ap_t, recalls = [], []
        for i, q in enumerate(qs):
            t0 = time.perf_counter()
            rows, _, _, params = ranked_rows(idx, q, k, "approx")
            ap_t.append(time.perf_counter() - t0)
            if i < n_exact:
                recalls.append(len(set(rows.tolist()) & set(ex_rows[i].tolist())) / k)
        print(f"    {n:>9,} rows  approx: p50 {_pct(ap_t, 50):7.1f} ms  p95 {_pct(ap_t, 95):7.1f} ms  "
              f"recall@{k} vs exact {np.mean(recalls):.3f}  "
              f"(faiss {params['faiss']}, {params['candidates']} candidates re-ranked; "
              f"faiss index built in {build_s:.1f} s)", flush=True)
        del idx, emb


def run(argv) -> None:
    args = _args(argv)
    import faiss
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"index benchmark ({'--full' if args.full else 'default sizes; --full for 1e6 approximate'}); "
          f"torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}, "
          f"load average {load:.1f} on {os.cpu_count()} cores", flush=True)
    only = set(args.only.split(","))
    if "a" in only:
        tmp = Path(tempfile.mkdtemp(prefix="mapclip-bench-index-"))
        try:
            bench_build(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "b" in only:
        bench_query(args)


if __name__ == "__main__":
    run(sys.argv[1:])
