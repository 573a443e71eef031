"""Search at scale (mapclip/engine/archive/ann.py): IVF-PQ chosen by size, vectors read from the
memory-mapped shards (never all loaded), exact re-ranking, the cached faiss file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.index_factories import index_folder_from_blocks, index_from_arrays
from mapclip.engine.archive import ann, approx
from mapclip.engine.archive.search import ranked_rows, search
from mapclip.engine.archive.store import Index, open_index

DIM = 32


def clustered(n: int, seed: int, topics: int = 64) -> np.ndarray:
    """Unit vectors around a few topics (like tile embeddings of an archive)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((topics, DIM)).astype(np.float32)
    x = centres[rng.integers(0, topics, n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def small_ivf(monkeypatch):
    """IVF-PQ from 3000 rows (not 10^6), with few lists, so the tests stay fast."""
    monkeypatch.setattr(ann, "IVF_MIN_ROWS", 3000)
    monkeypatch.setattr(ann, "IVF_MIN_LISTS", 16)
    monkeypatch.setattr(ann, "IVF_MIN_PROBE", 4)
    monkeypatch.setattr(ann, "IVF_MIN_CANDIDATES", 200)
    monkeypatch.setattr(approx, "APPROX_MIN_ROWS", 1000)


@pytest.fixture
def big(tmp_path):
    """An index folder of 6000 rows in 5 shards (uneven sizes)."""
    blocks = [clustered(n, seed) for seed, n in enumerate([1000, 1700, 300, 2000, 1000])]
    folder = index_folder_from_blocks(tmp_path / "idx", blocks, DIM)
    return folder, np.concatenate(blocks).astype(np.float16).astype(np.float32)


def test_choice_of_search_by_size_and_its_parameters():
    assert ann.describe(50_000, 512) == {"method": "exact"}
    assert ann.describe(500_000, 512) == {"method": "approx", "faiss": "PQ256x4fs"}
    d7 = ann.describe(10 ** 7, 512)
    assert d7["faiss"] == "IVF2048,PQ256x4fs" and d7["nprobe"] == 512
    assert ann.ivf_lists(10 ** 6) == 512 and ann.ivf_lists(10 ** 8) == 8192
    assert ann.ivf_lists(10 ** 9) == 16384 and ann.ivf_lists(10 ** 12) == ann.IVF_MAX_LISTS
    assert ann.ivf_candidates(100, 10 ** 7) == 2000 and ann.ivf_candidates(500, 10 ** 7) == 10000


def test_shard_store_reads_any_rows_from_the_shards(big):
    folder, emb = big
    idx = Index(folder)
    store = idx.store()
    rows = np.array([5999, 0, 2700, 2999, 3000, 2700, 1000, 999])   # across shards, repeats
    np.testing.assert_array_equal(store.vectors(rows), emb[rows])
    np.testing.assert_array_equal(store.tiles(rows)["tile"], rows)
    seen = np.concatenate([b for _, b in store.blocks(step=700)])
    np.testing.assert_array_equal(seen, emb)
    assert idx._emb is None                          # nothing was loaded whole
    with pytest.raises(IndexError):
        store.vectors([6000])


def test_ivf_search_recall_and_exact_scores_without_loading_the_vectors(big, small_ivf):
    folder, emb = big
    idx = Index(folder)
    qs = clustered(30, seed=7)
    truth, tscores = ann.exact_top_streaming(idx.store(), qs, 20)
    recalls = []
    for q, t in zip(qs, truth):
        rows, scores, method, params = ranked_rows(idx, q, 20, "auto")
        assert method == "approx" and params["faiss"].startswith("IVF") and params["nprobe"] >= 4
        assert np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, emb[rows] @ q, atol=1e-5)   # re-ranked exactly
        recalls.append(len(set(rows.tolist()) & set(t.tolist())) / 20)
    assert np.mean(recalls) >= 0.95
    assert idx._emb is None and idx._tiles is None   # the search read only the candidates
    # the streamed exact search is the in-memory one
    mem = index_from_arrays(emb)
    rows, scores = mem.exact_top(qs[3], 20)
    assert rows.tolist() == truth[3].tolist()
    np.testing.assert_allclose(scores, tscores[3], atol=1e-5)



def test_exact_method_above_the_cache_size_streams_the_shards(big, monkeypatch):
    """--method exact on an index whose float32 copy would not fit EXACT_CACHE_BYTES reads
    the shards block by block: the in-memory answer, with no vector set loaded whole."""
    from mapclip.engine.archive import store as S
    folder, emb = big
    q = clustered(1, seed=11)[0]
    want_rows, want_scores = index_from_arrays(emb).exact_top(q, 25)
    monkeypatch.setattr(S, "EXACT_CACHE_BYTES", emb.shape[0] * emb.shape[1] * 4 - 1)
    idx = Index(folder)
    rows, scores, method, _ = ranked_rows(idx, q, 25, "exact")
    assert method == "exact" and rows.tolist() == want_rows.tolist()
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert idx._emb is None and idx._emb32 is None


def test_search_through_the_engine_caches_the_ivf_file(big, small_ivf, capsys):
    folder, emb = big
    res = search(folder, like=(224 * 4321 + 100, -100))      # the tile of row 4321 is the query
    assert res.method == "approx" and res.hits[0].row == 4321 and res.hits[0].cosine > 0.999
    assert open_index(folder)._emb is None        # a --like query reads tiles, not every vector
    assert res.params["faiss"].startswith("IVF") and res.rows == 6000
    cached = list(folder.glob("ann-*.faiss"))
    assert len(cached) == 1 and open_index(folder).content_id in cached[0].name
    stamp = cached[0].stat().st_mtime_ns
    fresh = Index(folder)                          # a new session reads the file, no rebuild
    assert fresh.ivf().ntotal == 6000 and cached[0].stat().st_mtime_ns == stamp
    # the CLI's search is the same call
    from mapclip.engine.cli import main
    assert main(["search", str(folder), "--like", f"{224 * 10 + 5},-5", "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "approx" and out["hits"][0]["row"] == 10
    assert out["params"]["faiss"].startswith("IVF")


def test_damaged_shard_is_refused_when_the_ivf_index_is_built(big, small_ivf):
    folder, _ = big
    m = json.loads((folder / "manifest.json").read_text())
    path = folder / m["shards"][2]["emb"]
    bad = np.load(path)
    bad[7] = np.float16(3.0)
    np.save(path, bad)
    from mapclip.engine.core.errors import MapClipError
    idx = Index(folder)
    with pytest.raises(MapClipError, match="damaged.*not a unit vector"):
        ranked_rows(idx, clustered(1, 3)[0], 5, "auto")    # builds the IVF index: reads all
    assert not list(folder.glob("ann-*.faiss"))


def test_a_shard_damaged_after_the_ivf_index_was_built_is_refused(big, small_ivf):
    folder, emb = big
    q = emb[4321]
    rows, _, _, _ = ranked_rows(Index(folder), q, 5, "auto")     # builds and caches
    assert rows[0] == 4321
    m = json.loads((folder / "manifest.json").read_text())
    path = folder / m["shards"][3]["emb"]                              # rows 3000..4999
    bad = np.load(path)
    bad[4321 - 3000] = np.nan
    np.save(path, bad)
    from mapclip.engine.core.errors import MapClipError
    with pytest.raises(MapClipError, match="damaged"):
        ranked_rows(Index(folder), q, 5, "auto")
