"""Recall@k both ways and mean recall, on constructed similarity matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.retrieval import retrieval_metrics


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


def test_ties_count_against_the_query():
    m = retrieval_metrics(np.ones((4, 4)), [0, 1, 2, 3], ks=(1, 4))
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["i2t_r4"] == 100.0 and m["t2i_r4"] == 100.0


def test_image_without_caption_is_left_out_and_shapes_are_checked():
    sim = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    m = retrieval_metrics(sim, [0, 1], ks=(1,))
    assert m["images"] == 2 and m["i2t_r1"] == 100.0
    with pytest.raises(ValueError):
        retrieval_metrics(sim, [0, 1, 2])
    with pytest.raises(ValueError):
        retrieval_metrics(sim, [0, 5])
