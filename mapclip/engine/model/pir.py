"""PIR's image tower: Vision Instruction Representation on a ViT (PIR-CLIP).

PIR (Pan et al., *PIR: Remote Sensing Image-Text Retrieval with Prior Instruction
Representation Learning*, arXiv:2405.10160; code github.com/jaychempan/PIR-CLIP) puts a
remote-sensing scene classifier (the *prior*, a ModifiedResNet whose pooled output has the
model's embedding width) beside the ViT. Its output, projected to the ViT's width, is the
*instruction token* y. After the ViT's patch embedding and ``ln_pre``:

- the belief matrix ``b = softmax(x·yᵀ)`` over the tokens says how much each token agrees
  with the prior;
- the tokens sorted by belief give index weights ``1/sqrt(i+1)``, where ``i`` is, as in the
  reference code, the position of the token that sorts to that place;
- the tokens become ``normalize(x·b + x·w)`` (normalised over the token axis, the reference's
  ``F.normalize`` default), y is put in front, and the blocks, ``ln_post``, token pooling
  (which now takes y's place) and the projection follow as in CLIP.

The text tower is CLIP's: the reference code has no separate Language Cycle Attention module,
its text side is open_clip's causal text transformer.

A model folder of a PIR model holds ``pir_cfg`` in its model config; ``build_model`` calls
:func:`add_prior` so that every command loads it like any other model. The state dict adds
``visual.prior.*`` (the scene classifier) and ``visual.prior_proj.*`` to CLIP's keys.
"""
from __future__ import annotations

from typing import Any, Dict

from ..core.errors import ModelError

#: the reference's PIR.json: an RN50-shaped prior (stage depths, stem width, head width)
PIR_DEFAULTS: Dict[str, Any] = {"res_layers": [3, 4, 6, 3], "res_width": 64, "head_width": 64}


def pir_config(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The model's ``pir_cfg`` with the reference's defaults filled in."""
    return dict(PIR_DEFAULTS, **(model_cfg.get("pir_cfg") or {}))


def build_prior(pir_cfg: Dict[str, Any], embed_dim: int, image_size: int):
    """The scene classifier's body: a ModifiedResNet pooled to ``embed_dim`` (random weights)."""
    from open_clip.modified_resnet import ModifiedResNet
    cfg = dict(PIR_DEFAULTS, **(pir_cfg or {}))
    width, layers = int(cfg["res_width"]), [int(n) for n in cfg["res_layers"]]
    if image_size % 32:
        raise ModelError(f"PIR's prior needs an input size divisible by 32, the model's is {image_size}",
                         "fine-tune a model whose image size is a multiple of 32 with --recipe pir")
    return ModifiedResNet(layers=layers, output_dim=int(embed_dim),
                          heads=width * 32 // int(cfg["head_width"]), image_size=int(image_size),
                          width=width)


def has_prior(model) -> bool:
    """Whether ``model``'s image tower is PIR's."""
    return getattr(getattr(model, "visual", None), "prior", None) is not None


def add_prior(model, pir_cfg: Dict[str, Any]):
    """Turn an open_clip CLIP with a ViT image tower into PIR-CLIP (new modules random)."""
    import torch
    from open_clip.transformer import VisionTransformer
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None:
        raise ModelError("PIR needs a CLIP with a ViT image tower that pools its class token",
                         "fine-tune a ViT model (e.g. remoteclip-vit-b-32) with --recipe pir")
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    embed_dim = int(visual.output_dim)
    visual.prior = build_prior(pir_cfg, embed_dim, int(size))
    visual.prior_proj = torch.nn.Linear(embed_dim, int(visual.transformer.width))
    visual.__class__ = _pir_class()
    return model


def instruct(x, y):
    """VIR's token selection: tokens ``x`` (B, L, W) instructed by the prior's token ``y``
    (B, 1, W); returns the reweighted tokens (B, L, W)."""
    import torch
    import torch.nn.functional as F
    belief = F.softmax(torch.matmul(x, y.transpose(-2, -1)).squeeze(-1), dim=-1)
    _, order = torch.sort(belief, dim=1, descending=True)
    index_weights = (1.0 / torch.sqrt(order + 1)).to(x.dtype)
    return F.normalize(x * belief.unsqueeze(-1) + x * index_weights.unsqueeze(-1), dim=1)


def __getattr__(name: str):
    if name == "PIRVisionTransformer":
        return _pir_class()
    raise AttributeError(name)


_CLASS = []


def _pir_class():
    """:class:`PIRVisionTransformer`, made on first use (importing this module needs no torch)."""
    if not _CLASS:
        from open_clip.transformer import VisionTransformer

        class PIRVisionTransformer(VisionTransformer):
            """open_clip's VisionTransformer with PIR's prior and instruction token."""

            def prior_token(self, image):
                """The prior's instruction token (B, 1, width)."""
                return self.prior_proj(self.prior(image)).unsqueeze(1)

            def forward(self, x):
                import torch
                y = self.prior_token(x)
                x = instruct(self._embeds(x), y)
                x = torch.cat([y.to(x.dtype), x], dim=1)
                x = self.transformer(x)
                pooled, tokens = self._pool(x)
                if self.proj is not None:
                    pooled = pooled @ self.proj
                if self.output_tokens:
                    return pooled, tokens
                return pooled

        PIRVisionTransformer.__module__ = __name__
        PIRVisionTransformer.__qualname__ = "PIRVisionTransformer"
        _CLASS.append(PIRVisionTransformer)
    return _CLASS[0]
