"""Model identity: which weights a loaded model holds, as a fingerprint, and
which embedding space it embeds into.

An index (engine.archive) records a model's identity in its manifest
(engine.model.space.model_identity: the fingerprint, the embeddings of
:data:`PROBE_TEXT` and :func:`probe_image`) to refuse mixing embedding spaces
(:func:`same_space`); the embedding cache
(engine.cache) keys passes by the fingerprint, so a fine-tuned copy of a
model never answers from its parent's embeddings.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional

import numpy as np


def weights_version(lm) -> Optional[int]:
    """Sum of the parameters' in-place update counters (None for inference tensors)."""
    try:
        return sum(int(p._version) for p in lm.model.parameters())
    except (RuntimeError, AttributeError):
        return None


#: weight precisions a fingerprint is kept for, finest first
FINGERPRINT_DTYPES = ("fp32", "bf16", "fp16")


def weights_fingerprint(lm) -> Dict[str, str]:
    """SHA-256 of the model's weights (every parameter and buffer, by name), per
    precision: ``fp32`` when all floating tensors are fp32, and ``bf16``/``fp16``
    with every fp32 tensor rounded to that type the way a model loaded at that
    precision is (tensors already in it kept), so that an index built in fp32
    recognises the same weights loaded in bf16 or fp16 on a GPU, also when some
    layers stay fp32 there. Two models with any weight different (a fine-tuned
    copy) never share a fingerprint. Cached on the loaded model until a weight
    changes in place (a training step)."""
    import torch
    cached = getattr(lm, "_mapclip_fingerprint", None)
    version = weights_version(lm)
    if cached is not None and cached[0] == version:
        return dict(cached[1])
    tensors = sorted(lm.model.state_dict().items(), key=lambda kv: kv[0])
    floats = {t.dtype for _, t in tensors if t.is_floating_point()}
    wide = {torch.float32, torch.float64}
    out: Dict[str, str] = {}
    for key, cast in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if not floats <= (wide | ({cast} if cast is not None else set())):
            continue   # some tensor is already in another reduced precision
        h = hashlib.sha256()
        for name, t in tensors:
            t = t.detach()
            if cast is not None and t.dtype in wide:
                t = t.to(cast)
            t = t.cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.numel()}|{t.dtype}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[key] = h.hexdigest()
    try:
        lm._mapclip_fingerprint = (version, dict(out))
    except AttributeError:  # pragma: no cover - a frozen object
        pass
    return out


def same_weights(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[bool]:
    """Whether two identities have the same weights by fingerprint: True/False at
    the finest precision both recorded; None when they share none (an index
    written before fingerprints, or bf16 against fp16 weights)."""
    fa, fb = a.get("weights") or {}, b.get("weights") or {}
    if not isinstance(fa, dict) or not isinstance(fb, dict):
        return None
    for key in FINGERPRINT_DTYPES:
        if key in fa and key in fb:
            return fa[key] == fb[key]
    return None


# --------------------------------------------------------------------------- #
# The embedding space: which space vectors live in.
# --------------------------------------------------------------------------- #
#: a query model is the index's model when both probe embeddings agree this well
SAME_SPACE_COSINE = 0.99
#: the fixed text whose embedding identifies a space (with :func:`probe_image`'s)
PROBE_TEXT = "an aerial image of a city with roads, buildings, fields and a river"


def probe_image(size: int) -> np.ndarray:
    """A fixed, smooth RGB test image (1, size, size, 3) uint8."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(6.0 * (x + y))], axis=-1)
    return (img * 255).round().astype(np.uint8)[None]


def describe_model(m: Dict[str, Any]) -> str:
    return f"{m.get('spec') or m.get('model')!r} ({m.get('arch')}, {m.get('embed_dim')}-d)"


def same_space(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """True when two model identities embed into the same space: the same weights
    by fingerprint (:func:`weights_fingerprint`) where both have one, and the
    probe embeddings agree. A fine-tuned copy of a model has probes close to its
    parent's but other weights: it is not the same space."""
    if int(a.get("embed_dim", -1)) != int(b.get("embed_dim", -2)):
        return False
    if same_weights(a, b) is False:
        return False
    for key in ("probe_text", "probe_image"):
        u, v = np.asarray(a.get(key) or [], np.float64), np.asarray(b.get(key) or [], np.float64)
        if u.shape != v.shape or u.size == 0:
            return False
        cos = float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))
        if cos < SAME_SPACE_COSINE:
            return False
    return True

