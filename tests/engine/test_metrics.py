"""The metrics the quality protocol reports, on cases small enough to work out by hand.

Every expected number is computed in the comment beside it, never copied from
a run: box IoU, the greedy matching (best score first, each true object once,
IoU >= the threshold), AP50, precision and recall, the share of boxes on an
object's centre, the NaN-skipping mean, the count-bias fit as the quality
protocol calls it, and recall@k with ties counted against the query.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mapclip.engine import count as ct
from mapclip.engine import quality as Q
from mapclip.engine.data.metrics import retrieval_metrics
from mapclip.engine.data import metrics as M

# four true objects in a row, 10 x 10 px each, 10 px apart
T0, T1, T2, T3 = (0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10), (60, 0, 70, 10)
TRUTH = [T0, T1, T2, T3]
# scored boxes, deliberately not in score order (the matching must sort them)
PREDS = [
    (0.5, (100, 100, 110, 110)),   # 5th: far from everything           -> false positive
    (0.9, T0),                     # 1st: exactly on T0                  -> true positive
    (0.7, T1),                     # 3rd: exactly on T1                  -> true positive
    (0.8, (0, 0, 10, 9)),          # 2nd: T0 again (IoU 0.9), T0 taken   -> false positive (duplicate)
    (0.6, (40, 0, 50, 5)),         # 4th: on T2 at IoU 50/100 = 0.5      -> true positive (at the threshold)
]                                  # T3 is never found


# ------------------------------------------------------------------ IoU --
def test_box_iou_by_hand():
    # overlap 5 x 10 = 50; union 100 + 100 - 50 = 150
    assert M.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    # half of the box: 50 / (100 + 50 - 50) = 0.5
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    assert M.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0      # touching edges share no area
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0            # empty boxes: no union, 0 not NaN


# ------------------------------------------------------------- matching --
def test_match_goes_best_score_first_and_takes_each_object_once():
    # in score order 0.9, 0.8, 0.7, 0.6, 0.5: hit, duplicate, hit, hit at IoU 0.5, miss
    assert M._match(PREDS, TRUTH, 0.5).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_match_at_exactly_the_threshold_counts_and_just_below_does_not():
    # IoU (0,0,10,5) vs T0 = 50 / 100 = 0.5; (0,0,10,4.9) = 49 / 100 = 0.49
    assert M._match([(1.0, (0, 0, 10, 5))], [T0], 0.5).tolist() == [1.0]
    assert M._match([(1.0, (0, 0, 10, 4.9))], [T0], 0.5).tolist() == [0.0]
    # the same box against a stricter threshold
    assert M._match([(1.0, (0, 0, 10, 5))], [T0], 0.51).tolist() == [0.0]


def test_match_gives_a_box_the_object_it_overlaps_most():
    a, b = (0, 0, 10, 10), (4, 0, 14, 10)
    # P = (3,0,13,10): with a, overlap 7 x 10 = 70, union 200 - 70 = 130 -> 0.538;
    # with b, overlap 9 x 10 = 90, union 200 - 90 = 110 -> 0.818: P takes b
    p = (3, 0, 13, 10)
    assert M.box_iou(p, a) == pytest.approx(70 / 130) and M.box_iou(p, b) == pytest.approx(90 / 110)
    # then a box exactly on a still finds a free a (hit); one exactly on b finds b taken
    # and a too far (IoU of b with a = 60 / 140 = 0.43 < 0.5) -> miss
    preds = [(0.9, p), (0.8, a), (0.7, b)]
    assert M._match(preds, [a, b], 0.5).tolist() == [1.0, 1.0, 0.0]


def test_match_keeps_the_given_order_among_equal_scores():
    # two boxes at the same score: the first given is matched first (a stable sort)
    far, on = (50, 50, 60, 60), T0
    assert M._match([(0.5, far), (0.5, on)], [T0], 0.5).tolist() == [0.0, 1.0]
    assert M._match([(0.5, on), (0.5, far)], [T0], 0.5).tolist() == [1.0, 0.0]


# ------------------------------------------------- AP, precision, recall --
def test_average_precision_by_hand():
    # hits in score order: 1 0 1 1 0, 4 true objects
    # cumulative hits 1 1 2 3 3 -> recall .25 .25 .5 .75 .75, precision 1 .5 .667 .75 .6
    # envelope (max to the right): 1 .75 .75 .75 .6
    # AP = .25 x 1 + 0 x .75 + .25 x .75 + .25 x .75 + 0 x .6 = .25 + .1875 + .1875 = .625
    assert M.average_precision(PREDS, TRUTH, 0.5) == pytest.approx(0.625)
    # precision 3 hits / 5 boxes = 0.6, recall 3 hits / 4 objects = 0.75
    assert M.precision_recall(PREDS, TRUTH, 0.5) == pytest.approx((0.6, 0.75))


def test_a_duplicate_detection_costs_precision_and_ap_but_no_recall():
    one = [(0.9, T0)]
    dup = [(0.9, T0), (0.8, T0)]
    # one box on T0 of 2 objects: precision 1/1, recall 1/2; AP = .5 x 1 = .5
    assert M.precision_recall(one, [T0, T1]) == pytest.approx((1.0, 0.5))
    assert M.average_precision(one, [T0, T1]) == pytest.approx(0.5)
    # the duplicate is a false positive: precision 1/2, recall still 1/2
    assert M.precision_recall(dup, [T0, T1]) == pytest.approx((0.5, 0.5))
    # ranks: hit (r .5, p 1), miss (r .5, p .5): envelope 1, .5; AP = .5 x 1 + 0 x .5 = .5
    assert M.average_precision(dup, [T0, T1]) == pytest.approx(0.5)
    # the looser box scored higher takes T0 (IoU .9) and the exact one is the duplicate: same .5
    assert M.average_precision([(0.9, T0), (0.95, (0, 0, 10, 9))], [T0, T1]) == pytest.approx(0.5)
    # a false positive ranked above the hit: miss (r 0, p 0), hit (r .5, p .5): envelope .5 .5,
    # AP = .5 x .5 = .25
    assert M.average_precision([(0.9, T0), (0.95, (50, 50, 60, 60))], [T0, T1]) == pytest.approx(0.25)


def test_ties_in_score_keep_the_given_order_in_ap():
    far = (50, 50, 60, 60)
    # miss then hit (r 0 p 0, r 1 p .5): envelope .5 .5 -> AP = 1 x .5 = .5
    assert M.average_precision([(0.5, far), (0.5, T0)], [T0]) == pytest.approx(0.5)
    # hit then miss: AP = 1 x 1 = 1
    assert M.average_precision([(0.5, T0), (0.5, far)], [T0]) == pytest.approx(1.0)


def test_every_object_found_once_and_nothing_else_is_perfect():
    preds = [(0.4, T3), (0.3, T2), (0.2, T1), (0.1, T0)]
    # recall .25 steps at precision 1: AP = 4 x .25 x 1 = 1
    assert M.average_precision(preds, TRUTH) == pytest.approx(1.0)
    assert M.precision_recall(preds, TRUTH) == (1.0, 1.0)


def test_no_predictions_and_no_truth():
    # nothing predicted: AP 0, precision and recall 0 (no division by zero)
    assert M.average_precision([], TRUTH) == 0.0
    assert M.precision_recall([], TRUTH) == (0.0, 0.0)
    # nothing to find: AP is undefined (NaN, left out of means), every box is a false positive
    assert math.isnan(M.average_precision(PREDS, []))
    assert M.precision_recall(PREDS, []) == (0.0, 0.0)
    assert math.isnan(M.average_precision([], []))
    assert M.precision_recall([], []) == (0.0, 0.0)


# ------------------------------------------------- the quality protocol --
def test_score_boxes_reports_the_same_numbers_and_the_counts():
    got = Q.score_boxes(PREDS, TRUTH)
    # the worked case above at the protocol's IoU 0.5
    assert Q.IOU == 0.5
    assert got == pytest.approx({"ap50": 0.625, "precision": 0.6, "recall": 0.75, "boxes": 5, "truth": 4})
    # a stricter IoU turns the box at exactly 0.5 into a miss: hits 1 0 1 0 0
    # recall .25 .25 .5 .5 .5, precision 1 .5 .667 .5 .4 -> envelope 1 .667 .667 .5 .4
    # AP = .25 x 1 + .25 x .667 = .4167; precision 2/5, recall 2/4
    strict = Q.score_boxes(PREDS, TRUTH, iou=0.6)
    assert strict["ap50"] == pytest.approx(0.25 + 0.25 * 2 / 3)
    assert (strict["precision"], strict["recall"]) == pytest.approx((0.4, 0.5))
    empty = Q.score_boxes([], TRUTH)
    assert empty == {"ap50": 0.0, "precision": 0.0, "recall": 0.0, "boxes": 0, "truth": 4}


def test_centre_precision_by_hand():
    truth = [(0, 0, 10, 10), (20, 20, 40, 40)]          # centres (5, 5) and (30, 30)
    boxes = [(0, 0, 6, 6),          # holds (5, 5)                    good
             (4, 4, 5, 5),          # (5, 5) on its corner counts     good
             (50, 50, 60, 60),      # holds no centre                 bad
             (25, 25, 35, 35)]      # holds (30, 30)                  good
    assert M.centre_precision(boxes, truth, k=3) == pytest.approx(2 / 3)     # good, good, bad
    assert M.centre_precision(boxes, truth, k=10) == pytest.approx(3 / 4)    # only 4 boxes: 3 / 4
    assert M.centre_precision(boxes, truth, k=1) == 1.0
    assert M.centre_precision([(0, 0, 40, 40)], truth) == 1.0                # two centres, one box: 1 / 1
    # a duplicate on the same object counts again: it is about the boxes, not the objects
    assert M.centre_precision([(0, 0, 6, 6), (1, 1, 7, 7)], truth) == 1.0
    assert M.centre_precision([], truth) == 0.0
    assert M.centre_precision(boxes, []) == 0.0                               # 0 good of 4


def test_mean_leaves_nan_out():
    per_class = {"ship": {"ap50": 0.5, "hit@10": 0.2}, "tank": {"ap50": 0.25, "hit@10": 0.4},
                 "none": {"ap50": float("nan"), "hit@10": 0.0}}
    assert Q.mean(per_class, "ap50") == pytest.approx(0.375)             # (.5 + .25) / 2, NaN left out
    assert Q.mean(per_class, "hit@10") == pytest.approx(0.2)             # (.2 + .4 + 0) / 3
    assert Q.mean({"water": 0.2, "trees": 0.4}) == pytest.approx(0.3)    # plain values: (.2 + .4) / 2
    assert Q.mean({}) == 0.0
    assert Q.mean({"none": {"ap50": float("nan")}}, "ap50") == 0.0


def test_calibrate_counting_fits_the_bias_on_the_calibration_chips(monkeypatch, tmp_path):
    """Two chips: one of 2 objects whose captions say "one" by 0.01, one of 1 object
    that says "one" by far. The fit lowers "one" to the grid's end, -0.05: the first
    chip now reads 2 (0.0 > 0.01 - 0.05), the second still 1 (1.0 - 0.05 > 0);
    nothing else improves the score (both exact already). Centred: the mean of
    (-0.05, 0 x 9) is -0.005, so "one" gets -0.045 and every other count +0.005."""
    rows = {"a.tif": (2, [0.01, 0.0] + [-1.0] * 8), "b.tif": (1, [1.0] + [-1.0] * 9)}
    asked = {}

    def chips(folder, seed, repeats, tag="count"):
        asked.update(folder=folder, seed=seed, repeats=repeats, tag=tag)
        return [(SimpleNamespace(path=p), "objects", k) for p, (k, _) in rows.items()]

    def count(path, name, lm, method, options):
        asked.setdefault("calls", []).append((path, name, lm, method, options.calibrate))
        return SimpleNamespace(prompt=SimpleNamespace(scores=np.array(rows[path][1])))

    monkeypatch.setattr(Q, "count_chips", chips)
    monkeypatch.setattr(ct, "count", count)
    bias = Q.calibrate_counting("LM", tmp_path)
    assert bias == pytest.approx((-0.045,) + (0.005,) * 9)
    # on its own chips (never the measured ones), from uncalibrated prompt scores
    assert asked["seed"] == Q.CALIBRATION_SEED != Q.COUNT_SEED
    assert asked["repeats"] == Q.CALIBRATION_REPEATS and asked["folder"] == tmp_path
    assert asked["calls"] == [("a.tif", "objects", "LM", "prompt", False),
                              ("b.tif", "objects", "LM", "prompt", False)]
    # the fitted bias counts both chips right: argmax of scores + bias
    assert [ct.argmax_count(np.array(s)[None], bias=bias)[0] for _, s in rows.values()] == [2, 1]


# ------------------------------------------------------------ retrieval --
def test_retrieval_partial_ties_by_hand_in_both_rules():
    # 3 images x 3 texts, text j describes image j
    sim = np.array([[0.9, 0.9, 0.1],
                    [0.5, 0.9, 0.2],
                    [0.1, 0.3, 0.3]])
    # image -> text, pessimistic (ties against the query): image 0's own 0.9 ties text 1 -> rank 1;
    # image 1's own 0.9 beats 0.5, 0.2 -> rank 0; image 2's own 0.3 ties text 1 -> rank 1
    # text -> image: text 0's image 0 (0.9) beats 0.5, 0.1 -> 0; text 1's image 1 (0.9) ties
    # image 0 -> 1; text 2's image 2 (0.3) beats 0.1, 0.2 -> 0
    pess = retrieval_metrics(sim, [0, 1, 2], ks=(1, 2), ties="pessimistic")
    assert pess["i2t_r1"] == pytest.approx(100 / 3)        # ranks 1 0 1: one of three at rank 0
    assert pess["i2t_r2"] == pytest.approx(100.0)          # all ranks < 2
    assert pess["t2i_r1"] == pytest.approx(200 / 3)        # ranks 0 1 0
    assert pess["t2i_r2"] == pytest.approx(100.0)
    assert pess["mean_recall"] == pytest.approx((100 / 3 + 100 + 200 / 3 + 100) / 4)   # 75
    # published order (ties in data order): image 0's own text 0 comes before text 1 -> rank 0;
    # image 2's own text 2 comes after text 1 -> rank 1; text 1's image 1 after image 0 -> 1
    order = retrieval_metrics(sim, [0, 1, 2], ks=(1, 2))
    assert order["i2t_r1"] == pytest.approx(200 / 3)       # ranks 0 0 1
    assert order["t2i_r1"] == pytest.approx(200 / 3)       # ranks 0 1 0
    assert order["mean_recall"] == pytest.approx((200 / 3 + 100 + 200 / 3 + 100) / 4)   # 83.33
    assert order["images"] == 3 and order["texts"] == 3


def test_retrieval_image_without_caption_is_out_of_i2t_but_a_candidate_in_t2i():
    # image 2 has no caption; it still competes for texts: text 0 ranks it first
    sim = np.array([[0.5, 0.1],
                    [0.2, 0.9],
                    [0.8, 0.0]])
    m = retrieval_metrics(sim, [0, 1], ks=(1, 2))
    # i2t over images 0 and 1: image 0's text 0 (0.5 > 0.1) rank 0, image 1's text 1 rank 0 -> 100
    assert m["i2t_r1"] == 100.0 and m["images"] == 2
    # t2i: text 0 -> images by score 2 (0.8), 0 (0.5): rank 1; text 1 -> image 1 first: rank 0
    assert m["t2i_r1"] == pytest.approx(50.0) and m["t2i_r2"] == 100.0
    assert m["mean_recall"] == pytest.approx((100 + 100 + 50 + 100) / 4)     # 87.5
