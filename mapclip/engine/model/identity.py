"""Model identity: which weights a loaded model holds, as a fingerprint.

An index (engine.archive) records it to refuse mixing embedding spaces; the
embedding cache (engine.cache) keys passes by it, so a fine-tuned copy of a
model never answers from its parent's embeddings.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional


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
