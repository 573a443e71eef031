"""Index at scale: Ray build throughput, and IVF-PQ search over 10^6 / 10^7 stored vectors.

Prints (nothing is asserted):

(r) build tiles/s of the same index in one process, and on a local Ray
    cluster with 1 and 2 model workers (mapclip/engine/archive/distributed.py), with their
    ratios to the single process: ViT-B-32 QuickGELU with random weights
    (saved as a model folder, so the workers load it by path), 224-px tiles,
    a generated 3-band uint8 GeoTIFF. Times are whole builds: Ray's start and
    each worker's model load included.
(s) search at scale over a real index folder of synthetic 512-d float16
    vectors (written in the index format, shards of 2^18 rows, read through
    memory maps): the size of what stays on disk and in memory, the time to
    build the IVF-PQ index, and per query the full ranking as `search` runs
    it (engine.archive.search.ranked_rows, method auto: IVF-PQ candidates + exact
    re-rank from the memory-mapped shards): p50/p95 latency and recall@100
    against exact (engine.archive.ann.exact_top_streaming), for two kinds of query:
    "like" (held-out vectors from the same distribution: --like / --image
    queries) and "text" (directions with cosine ~0.3 to their topic: text
    queries sit that far from image embeddings in CLIP models).

    The vectors: 4096 topics (scene types x places) whose centres share a
    mean direction (CLIP embeddings are anisotropic), spread over a
    64-dimensional subspace with a decaying spectrum; each vector is its
    topic's centre plus within-topic variation in that subspace plus a
    little isotropic noise, normalised. The printed statistics (cosine of
    random pairs, of the top-1 and top-100 neighbours) say what that gives.

Default: (r) on a 1344 x 1344 raster (36 tiles), (s) at 10^6 vectors (1 GB of
float16 on disk); ``--full``: (r) on 2688 x 2688 (144 tiles) and (s) at 10^6
and 10^7 (10 GB on disk; 40 min on 2 loaded cores: 13 min writing the
vectors, 22 min the IVF-PQ build). Options: ``--full``, ``--sizes 1e6,1e7``, ``--queries N``,
``--only r,s``, ``--tmp DIR`` (where the index folders go; default the
system's temporary folder).
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

DIM = 512
TOPICS = 4096
RANK = 64
SHARD_ROWS = 1 << 18


def _args(argv):
    p = argparse.ArgumentParser(prog="bench_index_scale", add_help=False)
    p.add_argument("--full", action="store_true")
    p.add_argument("--sizes", default=None)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--only", default="r,s")
    p.add_argument("--tmp", default=None)
    args, _ = p.parse_known_args(argv)
    return args


def _pct(values, q):
    import numpy as np
    return float(np.percentile(np.asarray(values) * 1e3, q))


# --------------------------------------------------------------------------- #
# (r) Ray build throughput
# --------------------------------------------------------------------------- #
def bench_ray(args, tmp: Path) -> None:
    import ray
    import torch

    from bench.bench_detect import _vit_b32
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.store import Index
    from mapclip.engine.core.options import IndexOptions
    from mapclip.engine.model.models import save_model_folder
    from tests.raster_fixtures import write_blockwise

    lm = _vit_b32("cpu")
    folder = save_model_folder(lm.model.float(), lm.model_cfg, tmp / "vit-b-32-random",
                               arch="ViT-B-32-quickgelu")
    side = 2688 if args.full else 1344
    raster = write_blockwise(tmp / "scene.tif", side, side, block=512)
    n_tiles = (side // 224) ** 2
    print(f"(r) build: {side} x {side} uint8 GeoTIFF, {n_tiles} tiles of 224 px, ViT-B-32 "
          f"(random weights, a model folder), batch 16, commit every 16 tiles, CPU; "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()} in this process",
          flush=True)
    opts = dict(tile_px=224, batch_size=16, commit_tiles=16, device="cpu", footprints=False)
    t0 = time.perf_counter()
    one = build_index([raster], tmp / "one", str(folder), IndexOptions(**opts))
    base = one.embedded / (time.perf_counter() - t0)
    print(f"    one process   : {one.embedded} tiles in {one.embedded / base:6.1f} s = "
          f"{base:6.2f} tiles/s (model load included)", flush=True)
    for workers in (1, 2):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 << 20)
        try:
            t0 = time.perf_counter()
            info = build_index([raster], tmp / f"ray{workers}", str(folder),
                                  IndexOptions(**opts, ray="local", ray_workers=workers))
            rate = info.embedded / (time.perf_counter() - t0)
        finally:
            ray.shutdown()
        same = Index(tmp / f"ray{workers}").rows == Index(tmp / "one").rows
        print(f"    Ray, {workers} worker{'s' if workers > 1 else ' '}: {info.embedded} tiles in "
              f"{info.embedded / rate:6.1f} s = {rate:6.2f} tiles/s, ratio to one process "
              f"{rate / base:.2f} (same rows: {same}; each worker 1 CPU thread)", flush=True)


# --------------------------------------------------------------------------- #
# (s) search at scale
# --------------------------------------------------------------------------- #
class Space:
    """The synthetic embedding distribution (see the module's docstring)."""

    def __init__(self, seed: int = 0):
        import numpy as np
        rng = np.random.default_rng(seed)
        self.mean = rng.standard_normal(DIM).astype(np.float32)
        self.mean /= np.linalg.norm(self.mean)
        basis = rng.standard_normal((RANK, DIM)).astype(np.float32)
        self.basis = np.linalg.qr(basis.T)[0].T.astype(np.float32)          # (RANK, DIM) orthonormal
        self.spectrum = (np.arange(1, RANK + 1) ** -0.5).astype(np.float32)
        c = (rng.standard_normal((TOPICS, RANK)).astype(np.float32) * self.spectrum) @ self.basis
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        c = 0.7 * self.mean + c
        self.centres = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)

    def sample(self, m: int, seed: int):
        import numpy as np
        rng = np.random.default_rng(seed)
        topic = rng.integers(0, TOPICS, m)
        v = (rng.standard_normal((m, RANK)).astype(np.float32) * self.spectrum) @ self.basis
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        x = self.centres[topic] + 0.45 * v
        x += rng.standard_normal((m, DIM)).astype(np.float32) * (0.12 / np.sqrt(DIM))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def text_queries(self, m: int, seed: int):
        """Unit vectors at cosine ~0.3 from a topic's centre (the modality gap)."""
        import numpy as np
        rng = np.random.default_rng(seed)
        c = self.centres[rng.integers(0, TOPICS, m)]
        g = rng.standard_normal((m, DIM)).astype(np.float32)
        g -= (g * c).sum(1, keepdims=True) * c
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        q = 0.3 * c + np.sqrt(1 - 0.09) * g
        return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _nice(n: int) -> str:
    e = len(str(n)) - 1
    return f"10^{e}" if n == 10 ** e else f"{n:,}"


def bench_search(args, tmp: Path) -> None:
    import faiss
    import numpy as np

    from mapclip.engine.archive import ann
    from mapclip.engine.archive.search import ranked_rows
    from mapclip.engine.archive.store import Index
    from tests.index_factories import index_folder_from_blocks

    sizes = ([int(float(s)) for s in args.sizes.split(",")] if args.sizes else
             [10 ** 6, 10 ** 7] if args.full else [10 ** 6])
    k = 100
    space = Space(0)
    print(f"(s) search over synthetic {DIM}-d unit vectors stored as float16 shards, top-{k}; "
          f"{args.queries} 'like' + {args.queries} 'text' queries; method auto "
          f"(IVF-PQ from {ann.IVF_MIN_ROWS:,} rows); faiss threads {faiss.omp_get_max_threads()}",
          flush=True)
    like_q = space.sample(args.queries, seed=10 ** 9)
    text_q = space.text_queries(args.queries, seed=10 ** 9 + 1)
    queries = np.concatenate([like_q, text_q])
    for n in sizes:
        folder = tmp / f"idx-{n}"
        t0 = time.perf_counter()

        def blocks():
            for i, a in enumerate(range(0, n, SHARD_ROWS)):
                yield space.sample(min(SHARD_ROWS, n - a), seed=i + 1)
        index_folder_from_blocks(folder, blocks(), DIM)
        gen_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in (folder / "shards").glob("*.emb.npy"))
        idx = Index(folder)
        t0 = time.perf_counter()
        truth, tscores = ann.exact_top_streaming(idx.store(), queries, k)
        exact_s = (time.perf_counter() - t0) / len(queries)
        sample = idx.store().vectors(np.arange(0, n, max(1, n // 2000)))
        pair = float(np.mean(np.sum(sample[:-1] * sample[1:], axis=1)))
        print(f"    {_nice(n):>6} vectors: written in {gen_s:.0f} s ({disk / 1e9:.2f} GB of float16 "
              f"vectors on disk); cosine of random pairs {pair:.2f}; exact scan "
              f"{exact_s * 1e3:.0f} ms per query (streamed)", flush=True)
        t0 = time.perf_counter()
        fi = idx.ivf()
        build_s = time.perf_counter() - t0
        ivf = faiss.extract_index_ivf(fi)
        cache = ann.cache_path(idx)
        codes = cache.stat().st_size if cache and cache.is_file() else 0
        print(f"           IVF-PQ {ann.ivf_factory(DIM, n)} built in {build_s:.0f} s; in memory "
              f"{codes / 1e9:.2f} GB (codes, ids, centroids; the cache file) vs "
              f"{disk / 1e9:.2f} GB of vectors left on disk; nprobe {ivf.nprobe}, "
              f"{ann.ivf_candidates(k, n)} candidates re-ranked", flush=True)
        assert idx._emb is None          # searching never loads every vector
        ranked_rows(idx, queries[0], k, "auto")        # warm
        for name, sl in (("like", slice(0, args.queries)), ("text", slice(args.queries, None))):
            times, recalls = [], []
            for qi in range(len(queries))[sl]:
                t0 = time.perf_counter()
                rows, _, method, _ = ranked_rows(idx, queries[qi], k, "auto")
                times.append(time.perf_counter() - t0)
                recalls.append(len(set(rows.tolist()) & set(truth[qi].tolist())) / k)
            top = tscores[sl]
            print(f"           {name} queries: p50 {_pct(times, 50):6.1f} ms  p95 {_pct(times, 95):6.1f} ms  "
                  f"recall@{k} vs exact {np.mean(recalls):.3f} (min {np.min(recalls):.2f}); "
                  f"exact top-1 / top-{k} cosine {top[:, 0].mean():.2f} / {top[:, -1].mean():.2f} "
                  f"[{method}]", flush=True)
        assert idx._emb is None
        del idx, fi
        shutil.rmtree(folder, ignore_errors=True)


def run(argv) -> None:
    args = _args(argv)
    import faiss
    import torch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"index-at-scale benchmark ({'--full' if args.full else 'default sizes; --full for 10^7'}); "
          f"torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}, "
          f"load average {load:.1f} on {os.cpu_count()} cores", flush=True)
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="mapclip-bench-scale-", dir=args.tmp))
    try:
        if "r" in only:
            bench_ray(args, tmp)
        if "s" in only:
            bench_search(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run(sys.argv[1:])
