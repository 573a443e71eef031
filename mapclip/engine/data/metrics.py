"""What is measured, once: detections, retrieval and class maps against their truth.

Detections (the quality protocol, engine.quality): :func:`box_iou`, the greedy
matching of scored boxes to true boxes (:func:`_match`: best score first, each
true object once, IoU >= the threshold), :func:`average_precision` (VOC/COCO
all-point AP), :func:`precision_recall` and :func:`centre_precision` (the
share of the best boxes on an object's centre).

Class maps (engine.classify.compare_to_mask): :func:`mask_agreement`, pixel
accuracy, per-class IoU and mIoU against a reference mask.

Image-text retrieval (engine.evaluate, engine.finetune): :func:`retrieval_metrics`,
as the remote-sensing retrieval papers report it. Given a similarity matrix ``sim`` of shape (images, texts) and, for every text,
the index of the image it describes, :func:`retrieval_metrics` returns
recall@1/5/10 in percent for both directions and their mean ("mR"):

- image -> text: an image query counts as found at k if *any* of its captions
  ranks in the top k texts (RSICD/UCM/RSITMD have five captions per image);
- text -> image: a caption query counts as found at k if its one image ranks
  in the top k images;
- mean recall: the mean of the six numbers.

Ties (``ties=``):

- ``"order"`` (the default) ranks the candidates by a stable descending sort,
  so a candidate scoring exactly the same as the correct one is ahead of it
  only if it comes first in the data. This is how RemoteCLIP's evaluation
  (CLIP_benchmark's ``recall_at_k``, a ``torch.topk``) and GaLR/AMFMN (an
  ``argsort``) count: a tie is broken by sort order, not against the query.
  Numbers are comparable with the published tables. (``torch.topk``'s own
  order among equal scores is unspecified; the stable sort makes ours
  deterministic.) Real caption sets repeat a lot (RSICD's test split has 5,465
  captions of which 3,331 are distinct), so ties are common.
- ``"pessimistic"`` counts every tie against the query: a constant model
  scores near chance, never 100 %. Use it to audit a model whose scores
  collapse; it is lower than the published protocol on data with repeated
  captions.

NumPy only at import; torch is imported by :func:`retrieval_metrics` when called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------- #
# Detections.
# --------------------------------------------------------------------------- #
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def average_precision(preds: Sequence[Tuple[float, Sequence[float]]], truth: Sequence[Sequence[float]],
                      iou: float = 0.5) -> float:
    """VOC/COCO-style AP (all-point interpolation) of scored boxes against truth boxes.

    ``preds``: (score, (x0, y0, x1, y1)); ``truth``: boxes. Predictions are
    matched best score first, each truth box at most once, at IoU >= ``iou``.
    """
    if not truth:
        return float("nan")
    tp = _match(preds, truth, iou)
    if not len(tp):
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / len(truth)
    precision = ctp / np.arange(1, len(tp) + 1)
    # precision envelope, then the area under the recall steps
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    r_prev, ap = 0.0, 0.0
    for r, p in zip(recall, precision):
        ap += (r - r_prev) * p
        r_prev = r
    return float(ap)


def precision_recall(preds: Sequence[Tuple[float, Sequence[float]]], truth: Sequence[Sequence[float]],
                     iou: float = 0.5) -> Tuple[float, float]:
    """(precision, recall) of all ``preds`` against ``truth`` at IoU >= ``iou``."""
    tp = _match(preds, truth, iou)
    hits = float(np.sum(tp)) if len(tp) else 0.0
    return (hits / len(tp) if len(tp) else 0.0, hits / len(truth) if truth else 0.0)


def _match(preds, truth, iou: float) -> np.ndarray:
    order = sorted(range(len(preds)), key=lambda i: -float(preds[i][0]))
    used = [False] * len(truth)
    tp = np.zeros(len(order), np.float64)
    for k, i in enumerate(order):
        box = preds[i][1]
        best, best_j = iou, -1
        for j, t in enumerate(truth):
            if not used[j]:
                v = box_iou(box, t)
                if v >= best:
                    best, best_j = v, j
        if best_j >= 0:
            used[best_j] = True
            tp[k] = 1.0
    return tp


def centre_precision(boxes: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], k: int = 10) -> float:
    """Share of the first ``k`` boxes (best first) that hold the centre of a true object."""
    cs = [((t[0] + t[2]) / 2, (t[1] + t[3]) / 2) for t in truth]
    top = list(boxes)[:k]
    good = sum(1 for b in top if any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for x, y in cs))
    return good / len(top) if top else 0.0


# --------------------------------------------------------------------------- #
# Class maps.
# --------------------------------------------------------------------------- #

def mask_agreement(class_map: np.ndarray, transform, mask: np.ndarray, mask_transform,
                   values: Sequence[Sequence[int]], names: Sequence[str], nodata: int) -> Dict[str, Any]:
    """Pixel accuracy, per-class IoU and mIoU of a class map (value i + 1 = ``names[i]``,
    ``nodata`` = not scored; affine ``transform``) against a reference ``mask``
    (affine ``mask_transform``).

    ``values[i]`` lists the mask values that are class ``names[i]``. The
    comparison is at the mask's own pixels: each pixel takes the class of the
    cell holding its centre. Pixels whose mask value is in no list, and pixels
    the map left unscored, are not counted; other map values (unknown) count as
    wrong. Classes absent from both are left out of the mean.
    """
    h, w = mask.shape
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    mtf = mask_transform
    xs = mtf.a * cols + mtf.b * rows + mtf.c
    ys = mtf.d * cols + mtf.e * rows + mtf.f
    inv = ~transform
    ci = np.floor(inv.a * xs + inv.b * ys + inv.c).astype(np.int64)
    ri = np.floor(inv.d * xs + inv.e * ys + inv.f).astype(np.int64)
    inside = (ci >= 0) & (ri >= 0) & (ci < class_map.shape[1]) & (ri < class_map.shape[0])
    pred = np.full(mask.shape, nodata, np.uint8)
    pred[inside] = class_map[ri[inside], ci[inside]]
    truth = np.zeros(mask.shape, np.uint8)
    for i, vals in enumerate(values, start=1):
        truth[np.isin(mask, list(vals))] = i
    valid = (truth > 0) & (pred != nodata)
    t, p = truth[valid], pred[valid]
    out: Dict[str, Any] = {"pixels": int(valid.sum()),
                           "pixel_accuracy": float((t == p).mean()) if len(t) else 0.0}
    ious = {}
    for i, n in enumerate(names, start=1):
        inter = int(((t == i) & (p == i)).sum())
        union = int(((t == i) | (p == i)).sum())
        if union:
            ious[n] = inter / union
    out["iou"] = ious
    out["miou"] = float(np.mean(list(ious.values()))) if ious else 0.0
    return out


# --------------------------------------------------------------------------- #
# Image-text retrieval.
# --------------------------------------------------------------------------- #
DEFAULT_KS = (1, 5, 10)
TIE_MODES = ("order", "pessimistic")
DEFAULT_TIES = "order"


def _stable_positions(sim: "torch.Tensor") -> "torch.Tensor":
    """0-based position of every column in its row's stable descending order."""
    import torch
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    ar = torch.arange(sim.shape[1], device=sim.device).expand_as(order)
    pos.scatter_(1, order, ar)
    return pos


def _correct_mask(n_img: int, text_image: "torch.Tensor") -> "torch.Tensor":
    import torch
    correct = torch.zeros(n_img, len(text_image), dtype=torch.bool, device=text_image.device)
    correct[text_image, torch.arange(len(text_image), device=text_image.device)] = True
    return correct


def _ranks_i2t(sim: "torch.Tensor", text_image: "torch.Tensor", ties: str) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Per image: the 0-based rank of its best-ranked correct caption."""
    import torch
    n_img, n_txt = sim.shape
    correct = _correct_mask(n_img, text_image)
    has_caption = correct.any(dim=1)
    if ties == "order":
        pos = _stable_positions(sim)
        big = torch.full_like(pos, n_txt + 1)
        ranks = torch.where(correct, pos, big).min(dim=1).values
        return ranks, has_caption
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
    best = torch.where(correct, sim, neg_inf).max(dim=1).values  # (n_img,)
    wrong_ahead = (~correct) & (sim >= best[:, None])
    ranks = wrong_ahead.sum(dim=1)
    # an image with no caption can never be found
    return torch.where(has_caption, ranks, torch.full_like(ranks, n_txt + 1)), has_caption


def _ranks_t2i(sim: "torch.Tensor", text_image: "torch.Tensor", ties: str) -> "torch.Tensor":
    """Per caption: the 0-based rank of its own image."""
    import torch
    n_txt = sim.shape[1]
    cols = torch.arange(n_txt, device=sim.device)
    if ties == "order":
        return _stable_positions(sim.t())[cols, text_image]
    own = sim[text_image, cols]  # (n_txt,)
    ahead = sim >= own[None, :]
    ahead[text_image, cols] = False
    return ahead.sum(dim=0)


def retrieval_metrics(sim: Union[np.ndarray, "torch.Tensor"],
                      text_image: Union[Sequence[int], np.ndarray, "torch.Tensor"],
                      ks: Sequence[int] = DEFAULT_KS, ties: str = DEFAULT_TIES) -> Dict[str, float]:
    """Recall@k (percent) both ways and mean recall for a (images, texts) similarity.

    ``text_image[j]`` is the index of the image that text ``j`` describes.
    ``ties`` is ``"order"`` (the published protocol) or ``"pessimistic"``
    (see the module doc). Returns ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
    ..., "mean_recall", "images", "texts"}``; images without any
    caption are left out of the image->text figures.
    """
    import torch
    if ties not in TIE_MODES:
        raise ValueError(f"unknown tie rule {ties!r}; use one of {TIE_MODES}")
    s = torch.as_tensor(np.asarray(sim) if not isinstance(sim, torch.Tensor) else sim).float()
    if s.ndim != 2:
        raise ValueError(f"similarity must be 2-D (images, texts), got shape {tuple(s.shape)}")
    t = torch.as_tensor(np.asarray(text_image, dtype=np.int64) if not isinstance(text_image, torch.Tensor)
                        else text_image).long().to(s.device)
    if t.shape != (s.shape[1],):
        raise ValueError(f"text_image needs one image index per text ({s.shape[1]}), got {tuple(t.shape)}")
    if s.shape[1] and (t.min() < 0 or t.max() >= s.shape[0]):
        raise ValueError("text_image holds an image index out of range")
    i2t_rank, has_caption = _ranks_i2t(s, t, ties)
    i2t_rank = i2t_rank[has_caption]
    t2i_rank = _ranks_t2i(s, t, ties)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean()) if len(i2t_rank) else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean()) if len(t2i_rank) else 0.0
    out["mean_recall"] = float(np.mean([out[f"i2t_r{k}"] for k in ks] + [out[f"t2i_r{k}"] for k in ks]))
    out["images"] = int(has_caption.sum())
    out["texts"] = int(s.shape[1])
    return out
