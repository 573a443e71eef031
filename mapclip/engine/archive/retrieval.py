"""Image-text retrieval metrics as the remote-sensing retrieval papers report them.

Given a similarity matrix ``sim`` of shape (images, texts) and, for every text,
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
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
TIE_MODES = ("order", "pessimistic")
DEFAULT_TIES = "order"


def _stable_positions(sim: torch.Tensor) -> torch.Tensor:
    """0-based position of every column in its row's stable descending order."""
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    ar = torch.arange(sim.shape[1], device=sim.device).expand_as(order)
    pos.scatter_(1, order, ar)
    return pos


def _correct_mask(n_img: int, text_image: torch.Tensor) -> torch.Tensor:
    correct = torch.zeros(n_img, len(text_image), dtype=torch.bool, device=text_image.device)
    correct[text_image, torch.arange(len(text_image), device=text_image.device)] = True
    return correct


def _ranks_i2t(sim: torch.Tensor, text_image: torch.Tensor, ties: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image: the 0-based rank of its best-ranked correct caption."""
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


def _ranks_t2i(sim: torch.Tensor, text_image: torch.Tensor, ties: str) -> torch.Tensor:
    """Per caption: the 0-based rank of its own image."""
    n_txt = sim.shape[1]
    cols = torch.arange(n_txt, device=sim.device)
    if ties == "order":
        return _stable_positions(sim.t())[cols, text_image]
    own = sim[text_image, cols]  # (n_txt,)
    ahead = sim >= own[None, :]
    ahead[text_image, cols] = False
    return ahead.sum(dim=0)


def retrieval_metrics(sim: Union[np.ndarray, torch.Tensor],
                      text_image: Union[Sequence[int], np.ndarray, torch.Tensor],
                      ks: Sequence[int] = DEFAULT_KS, ties: str = DEFAULT_TIES) -> Dict[str, float]:
    """Recall@k (percent) both ways and mean recall for a (images, texts) similarity.

    ``text_image[j]`` is the index of the image that text ``j`` describes.
    ``ties`` is ``"order"`` (the published protocol) or ``"pessimistic"``
    (see the module doc). Returns ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
    ..., "mean_recall", "images", "texts"}``; images without any
    caption are left out of the image->text figures.
    """
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
