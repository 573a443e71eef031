"""Box arithmetic: suppression, union merging, heatmap components, pixel -> map."""
from __future__ import annotations

import numpy as np
from affine import Affine

from mapclip.engine.geo.boxes import heatmap_components, iou_one, nms, pixel_to_bounds, union_merge


def _sliding(k=2, n=4, tile=10):
    """All k x k windows (stride 1 tile) over an n x n grid, as pixel boxes."""
    out = []
    for r in range(n - k + 1):
        for c in range(n - k + 1):
            out.append([c * tile, r * tile, (c + k) * tile, (r + k) * tile])
    return np.array(out, dtype=float)


def test_iou_of_identical_disjoint_and_half_overlapping_boxes():
    a = np.array([0, 0, 10, 10.0])
    got = iou_one(a, np.array([[0, 0, 10, 10], [10, 0, 20, 10], [5, 0, 15, 10]], float))
    assert np.allclose(got, [1.0, 0.0, 50 / 150])


def test_nms_default_keeps_one_box_per_object_even_for_diagonal_neighbours():
    boxes = _sliding()
    scores = np.zeros(len(boxes))
    scores[4] = 0.9   # centre window
    scores[0] = 0.8   # diagonal neighbour: IoU 1/7, still the same object
    scores[8] = 0.7   # the other diagonal
    keep = nms(boxes, scores)
    assert keep[0] == 4
    assert 0 not in keep and 8 not in keep  # every window overlaps the centre one
    assert len(keep) == 1


def test_nms_with_iou_threshold_keeps_weakly_overlapping_boxes_and_max_keep():
    boxes = _sliding()
    scores = np.arange(len(boxes), dtype=float)
    keep = nms(boxes, scores, iou=0.2)
    assert keep[0] == len(boxes) - 1
    # windows overlapping the best by IoU <= 0.2 survive (e.g. the far corner)
    assert 0 in keep
    assert len(nms(boxes, scores, iou=0.2, max_keep=2)) == 2


def test_nms_breaks_saturated_ties_by_tiebreak():
    boxes = np.array([[0, 0, 10, 10], [100, 0, 110, 10]], float)
    scores = np.array([1.0, 1.0])
    assert list(nms(boxes, scores, tiebreak=np.array([0.2, 0.7]))) == [1, 0]
    assert list(nms(boxes, scores, tiebreak=np.array([0.9, 0.7]))) == [0, 1]


def test_union_merge_grows_the_best_window_over_strong_neighbours_only():
    boxes = np.array([[0, 0, 20, 20], [10, 0, 30, 20], [0, 10, 20, 30], [200, 200, 220, 220]], float)
    scores = np.array([0.9, 0.85, 0.2, 0.95])
    merged, sc, seeds = union_merge(boxes, scores, ratio=0.8)
    assert list(seeds) == [3, 0]
    assert np.allclose(merged[0], [200, 200, 220, 220])
    # window 1 is strong (0.85 >= 0.8 * 0.9): merged; window 2 is weak: suppressed, not merged
    assert np.allclose(merged[1], [0, 0, 30, 20])
    assert np.allclose(sc, [0.95, 0.9])


def test_heatmap_components_boxes_peaks_and_nan():
    heat = np.zeros((10, 12), np.float32)
    heat[2:4, 3:6] = 0.8
    heat[3, 4] = 0.95
    heat[7:9, 9:12] = 0.6
    heat[0, 0] = np.nan
    comps = heatmap_components(heat, 0.5)
    assert [c.box for c in comps] == [(3, 2, 6, 4), (9, 7, 12, 9)]
    assert comps[0].peak == np.float32(0.95) and comps[0].peak_cell == (3, 4)
    assert comps[0].area == 6 and comps[1].area == 6
    assert heatmap_components(heat, 0.99) == []
    assert len(heatmap_components(heat, 0.5, min_area=7)) == 0


def test_pixel_to_bounds_projected_and_geographic_transforms():
    utm = Affine(0.5, 0, 500000, 0, -0.5, 4000000)
    assert pixel_to_bounds(utm, (10, 20, 30, 60)) == (500005.0, 3999970.0, 500015.0, 3999990.0)
    geo = Affine(1e-4, 0, 13.0, 0, -1e-4, 52.5)
    b = pixel_to_bounds(geo, (0, 0, 100, 50))
    assert np.allclose(b, (13.0, 52.495, 13.01, 52.5))
    # a south-up transform still gives xmin < xmax and ymin < ymax
    south = Affine(1, 0, 0, 0, 1, 0)
    assert pixel_to_bounds(south, (1, 2, 3, 5)) == (1.0, 2.0, 3.0, 5.0)


def test_heatmap_peaks_split_a_blob_and_keep_plateaus_and_lone_blobs_whole():
    from mapclip.engine.geo.boxes import heatmap_peaks
    heat = np.zeros((10, 30), np.float32)
    heat[3:7, 2:14] = 0.6            # one blob with two peaks 8 cells apart
    heat[4, 4] = heat[4, 11] = 0.9
    heat[2:5, 20:24] = 0.7           # a flat plateau: one object
    heat[0, 29] = np.nan
    comps = heatmap_peaks(heat, 0.5, min_distance=2)
    assert len(comps) == 3
    two = sorted((c for c in comps if c.box[0] < 15), key=lambda c: c.box[0])
    assert [c.peak_cell for c in two] == [(4, 4), (4, 11)]
    assert two[0].box[2] <= two[1].box[0] and sum(c.area for c in two) == 48
    flat = [c for c in comps if c.box[0] >= 20][0]
    assert flat.box == (20, 2, 24, 5) and flat.area == 12
    assert heatmap_peaks(heat, 0.95) == []
