"""Recall@k both ways and mean recall, on constructed similarity matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mapclip.engine.data.metrics import retrieval_metrics


def test_perfect_diagonal_scores_100_everywhere():
    m = retrieval_metrics(np.eye(12), list(range(12)))
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"):
        assert m[key] == 100.0, key
    assert m["images"] == 12 and m["texts"] == 12


def test_hand_computed_ranks_one_caption_per_image():
    # 12 images, 12 texts; text j belongs to image j. Image i ranks its own
    # text at 0-based position r_i (scores decreasing with column distance).
    n = 12
    ranks = [0, 1, 2, 4, 5, 9, 10, 11, 0, 3, 6, 7]
    sim = torch.zeros(n, n)
    for i, r in enumerate(ranks):
        others = [j for j in range(n) if j != i]
        order = others[:r] + [i] + others[r:]        # positions 0..n-1 in descending score
        for pos, j in enumerate(order):
            sim[i, j] = float(n - pos)
    m = retrieval_metrics(sim, list(range(n)))
    assert m["i2t_r1"] == pytest.approx(100 * 2 / 12)      # ranks 0, 0
    assert m["i2t_r5"] == pytest.approx(100 * 6 / 12)      # ranks < 5: 0,1,2,4,0,3
    assert m["i2t_r10"] == pytest.approx(100 * 10 / 12)    # all but 10 and 11
    # text -> image on the transpose: same construction, so same numbers
    mt = retrieval_metrics(sim.t().contiguous(), list(range(n)))
    assert mt["t2i_r1"] == pytest.approx(m["i2t_r1"])
    assert mt["t2i_r5"] == pytest.approx(m["i2t_r5"])
    assert mt["t2i_r10"] == pytest.approx(m["i2t_r10"])
    expected_mean = np.mean([m["i2t_r1"], m["i2t_r5"], m["i2t_r10"], m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]])
    assert m["mean_recall"] == pytest.approx(expected_mean)


def test_several_captions_image_found_if_any_caption_is_in_top_k():
    # 2 images x 4 texts; texts 0,1 -> image 0, texts 2,3 -> image 1
    sim = np.array([[0.1, 0.9, 0.8, 0.7],     # image 0: own caption 1 is top-1
                    [0.9, 0.8, 0.1, 0.2]])    # image 1: own captions rank 3rd/4th
    m = retrieval_metrics(sim, [0, 0, 1, 1], ks=(1, 3))
    assert m["i2t_r1"] == 50.0          # image 0 yes, image 1 no
    assert m["i2t_r3"] == 100.0         # image 1's caption 3 is third
    # text -> image: text0 prefers image1 (wrong), text1 image0 (0.9 > 0.8, right),
    # text2 image0 (0.8 > 0.1, wrong), text3 image0 (0.7 > 0.2, wrong)
    assert m["t2i_r1"] == 25.0
    assert m["t2i_r3"] == 100.0
    assert m["images"] == 2 and m["texts"] == 4


def test_pessimistic_ties_count_against_the_query():
    m = retrieval_metrics(np.ones((4, 4)), [0, 1, 2, 3], ks=(1, 4), ties="pessimistic")
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["i2t_r4"] == 100.0 and m["t2i_r4"] == 100.0


def _reference_recall(sim, text_image, k):
    """Recall@k written from the published protocol: rank every candidate by a
    stable descending sort (ties in data order), a query is found if a correct
    item is among the first k (CLIP_benchmark's recall_at_k, GaLR/AMFMN)."""
    sim = np.asarray(sim, dtype=np.float64)
    n_img, n_txt = sim.shape
    i2t = []
    for i in range(n_img):
        own = [j for j in range(n_txt) if text_image[j] == i]
        if not own:
            continue
        order = sorted(range(n_txt), key=lambda j: -sim[i, j])   # Python's sort is stable
        i2t.append(any(j in own for j in order[:k]))
    t2i = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: -sim[i, j])
        t2i.append(text_image[j] in order[:k])
    return 100.0 * np.mean(i2t), 100.0 * np.mean(t2i)


def test_default_ties_follow_the_published_sort_order():
    # all scores equal: the first item in data order wins every tie
    m = retrieval_metrics(np.ones((4, 4)), [0, 1, 2, 3], ks=(1, 4))
    assert m["i2t_r1"] == 25.0 and m["t2i_r1"] == 25.0       # only image/caption 0
    assert m["i2t_r4"] == 100.0 and m["t2i_r4"] == 100.0
    # repeated captions: images 0 and 1 share an identical caption text, so the
    # captions' columns are equal; the pessimistic rule fails both, the published
    # protocol finds image 0 (its caption comes first) and, for image 1, its
    # second, unique caption
    sim = np.array([[0.9, 0.9, 0.2, 0.1],
                    [0.5, 0.5, 0.4, 0.1],
                    [0.1, 0.1, 0.3, 0.8]])
    owner = [0, 1, 1, 2]
    order = retrieval_metrics(sim, owner, ks=(1, 2))
    pess = retrieval_metrics(sim, owner, ks=(1, 2), ties="pessimistic")
    assert order["i2t_r1"] == pytest.approx(100 * 2 / 3)    # image 0 (tie won) and image 2
    assert pess["i2t_r1"] == pytest.approx(100 * 1 / 3)     # only image 2
    with pytest.raises(ValueError, match="tie rule"):
        retrieval_metrics(sim, owner, ties="optimistic")


def test_default_ties_equal_an_independent_reference_on_random_tied_matrices():
    rng = np.random.default_rng(7)
    for trial in range(20):
        n_img = int(rng.integers(2, 9))
        owner = [int(v) for v in rng.integers(0, n_img, size=int(rng.integers(n_img, 3 * n_img)))]
        sim = rng.integers(0, 4, size=(n_img, len(owner))).astype(np.float32)   # many ties
        for k in (1, 2, 5):
            m = retrieval_metrics(sim, owner, ks=(k,))
            ref_i2t, ref_t2i = _reference_recall(sim, owner, k)
            assert m[f"i2t_r{k}"] == pytest.approx(ref_i2t), (trial, k)
            assert m[f"t2i_r{k}"] == pytest.approx(ref_t2i), (trial, k)


def test_image_without_caption_is_left_out_and_shapes_are_checked():
    sim = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    m = retrieval_metrics(sim, [0, 1], ks=(1,))
    assert m["images"] == 2 and m["i2t_r1"] == 100.0
    with pytest.raises(ValueError):
        retrieval_metrics(sim, [0, 1, 2])
    with pytest.raises(ValueError):
        retrieval_metrics(sim, [0, 5])
