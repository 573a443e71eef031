"""Image-text retrieval metrics as the remote-sensing retrieval papers report them.

Given a similarity matrix ``sim`` of shape (images, texts) and, for every text,
the index of the image it describes, :func:`retrieval_metrics` returns
recall@1/5/10 in percent for both directions and their mean ("mR"):

- image -> text: an image query counts as found at k if *any* of its captions
  ranks in the top k texts (RSICD/UCM/RSITMD have five captions per image);
- text -> image: a caption query counts as found at k if its one image ranks
  in the top k images;
- mean recall: the mean of the six numbers.

Ties are broken against the query: an item scoring exactly the same as the
correct one is ranked ahead of it. A constant model therefore scores near
chance, never a perfect 100 %.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)


def _ranks_i2t(sim: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """Per image: how many *wrong* captions score >= its best correct caption."""
    n_img, n_txt = sim.shape
    correct = torch.zeros(n_img, n_txt, dtype=torch.bool, device=sim.device)
    correct[text_image, torch.arange(n_txt, device=sim.device)] = True
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
    best = torch.where(correct, sim, neg_inf).max(dim=1).values  # (n_img,)
    wrong_ahead = (~correct) & (sim >= best[:, None])
    ranks = wrong_ahead.sum(dim=1)
    # an image with no caption can never be found
    has_caption = correct.any(dim=1)
    return torch.where(has_caption, ranks, torch.full_like(ranks, n_txt + 1)), has_caption


def _ranks_t2i(sim: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """Per caption: how many other images score >= its own image."""
    n_txt = sim.shape[1]
    cols = torch.arange(n_txt, device=sim.device)
    own = sim[text_image, cols]  # (n_txt,)
    ahead = sim >= own[None, :]
    ahead[text_image, cols] = False
    return ahead.sum(dim=0)


def retrieval_metrics(sim: Union[np.ndarray, torch.Tensor],
                      text_image: Union[Sequence[int], np.ndarray, torch.Tensor],
                      ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """Recall@k (percent) both ways and mean recall for a (images, texts) similarity.

    ``text_image[j]`` is the index of the image that text ``j`` describes.
    Returns ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "mean_recall",
    "images", "texts"}``; images without any caption are left out of the
    image->text figures.
    """
    s = torch.as_tensor(np.asarray(sim) if not isinstance(sim, torch.Tensor) else sim).float()
    if s.ndim != 2:
        raise ValueError(f"similarity must be 2-D (images, texts), got shape {tuple(s.shape)}")
    t = torch.as_tensor(np.asarray(text_image, dtype=np.int64) if not isinstance(text_image, torch.Tensor)
                        else text_image).long().to(s.device)
    if t.shape != (s.shape[1],):
        raise ValueError(f"text_image needs one image index per text ({s.shape[1]}), got {tuple(t.shape)}")
    if s.shape[1] and (t.min() < 0 or t.max() >= s.shape[0]):
        raise ValueError("text_image holds an image index out of range")
    i2t_rank, has_caption = _ranks_i2t(s, t)
    i2t_rank = i2t_rank[has_caption]
    t2i_rank = _ranks_t2i(s, t)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean()) if len(i2t_rank) else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean()) if len(t2i_rank) else 0.0
    out["mean_recall"] = float(np.mean([out[f"i2t_r{k}"] for k in ks] + [out[f"t2i_r{k}"] for k in ks]))
    out["images"] = int(has_caption.sum())
    out["texts"] = int(s.shape[1])
    return out
