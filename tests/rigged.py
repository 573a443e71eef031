"""A real open_clip ViT with hand-set weights that responds to planted colours.

``rigged_model()`` returns an :class:`engine.model.models.LoadedModel` (CPU, fp32)
whose weights are set by hand, not trained, so that tests with "random"
models can still assert where things are found. It is a genuine open_clip
``CLIP`` (VisionTransformer + TextTransformer), so the ordinary image
encoder, dense mode (engine.model.dense, which replaces the last block's
attention) and the index all run through real open_clip code.

The planted patterns (use these in tests)
------------------------------------------
- **Saturated red** (RGB 255, 0, 0; e.g. a red square on a grey field)
  scores highest for any prompt containing the word **"red"**
  (``RED_PROMPT = "red roof"``).
- **Saturated blue** (RGB 0, 0, 255) scores highest for any prompt
  containing **"blue"** (``BLUE_PROMPT = "blue pool"``).
- Everything else (mid grey ``GREY = (128, 128, 128)``, greens, noise of low
  saturation) looks like the **background**: the content words of
  ``engine.core.options.DEFAULT_BACKGROUND_PROMPTS`` ("satellite", "grass",
  "trees", ...) map to it, so the background prompts win there.
- A prompt with none of those words (e.g. "forest") maps to an "other"
  direction that no image matches: cosine about 0 everywhere.

How the weights do it
---------------------
Image tower (64 px input, 8 px patches, an 8 x 8 patch grid, width 8, one
head, two blocks): ``conv1`` computes, per patch, the mean *redness*
``r = R - (G + B) / 2`` and *blueness* ``b = B - (R + G) / 2`` of the
normalised pixels into channels ``(r, -r, b, -b)``; the positional embedding
adds a constant ``(1, -1)`` in channels 4-5, and the class embedding
cancels it, so the class token starts at zero. ``ln_pre`` then turns each
patch into a unit direction in the (r, b, 1) plane. The first block is an
identity (zero output projections). In the last block ``v = V_GAIN * x``;
the class token queries with a bias ``q = e6`` and each patch's key is its
colour salience ``SALIENCE * (r + b)`` in channel 6, so the class token
attends to the red or blue patches of an image and the image embedding turns
red (blue) as soon as a few patches are, more so the larger their share.
``q = Q_GAIN * x`` makes ClearCLIP's q-q attention group patches of like
colour, so dense patch features stay local (use dense modes "clearclip" or "vv"
with this model; "kk" lets grey patches attend to coloured ones). ``proj`` sends
(r, b, 1) to embedding axes 0, 1, 2.

Text tower (real SimpleTokenizer, one block): the token embeddings of "red"
and "blue" point along the red/blue channels, the content words of the
background prompts along the constant channel, every other token is zero,
and the end-of-text token carries a weak "other" direction. The block
averages the tokens of a prompt into the end-of-text token (``k = 0`` under
the causal mask) and ``text_projection`` sends the channels to embedding
axes 0, 1, 2 and 3. ``logit_scale`` is ln(100).

``save_rigged_folder(path)`` writes it as a model folder, so the CLI and
subprocess tests can load it by path (``--model PATH``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import torch

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREY = (128, 128, 128)
RED_PROMPT = "red roof"
BLUE_PROMPT = "blue pool"

IMAGE_SIZE = 64
PATCH = 8
WIDTH = 8        # image tower width
TEXT_WIDTH = 8
EMBED = 8
CONTEXT = 16
Q_GAIN = 3.0
V_GAIN = 4.0
SALIENCE = 10.0
_STOP_WORDS = {"a", "an", "the", "of", "and", "with", "in", "on"}

RIGGED_CFG: Dict = {
    "embed_dim": EMBED,
    "quick_gelu": True,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": WIDTH, "head_width": WIDTH,
                   "patch_size": PATCH, "mlp_ratio": 1.0},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": TEXT_WIDTH,
                 "heads": 1, "layers": 1, "mlp_ratio": 1.0},
}


def _zero_block(block, keep_attention_output: bool) -> None:
    """Zero a residual block's MLP, and (unless kept) its attention output."""
    with torch.no_grad():
        for p in block.mlp.parameters():
            p.zero_()
        block.attn.in_proj_weight.zero_()
        block.attn.in_proj_bias.zero_()
        block.attn.out_proj.bias.zero_()
        if keep_attention_output:
            block.attn.out_proj.weight.copy_(torch.eye(block.attn.out_proj.weight.shape[0]))
        else:
            block.attn.out_proj.weight.zero_()


def _rig_image_tower(visual, mean, std) -> None:
    with torch.no_grad():
        w = torch.zeros_like(visual.conv1.weight)  # (WIDTH, 3, P, P)
        n = PATCH * PATCH
        # redness r = R - (G + B) / 2 and blueness b = B - (R + G) / 2, patch means
        w[0, 0], w[0, 1], w[0, 2] = 1.0 / n, -0.5 / n, -0.5 / n
        w[2, 2], w[2, 0], w[2, 1] = 1.0 / n, -0.5 / n, -0.5 / n
        w[1], w[3] = -w[0], -w[2]
        visual.conv1.weight.copy_(w)
        const = torch.zeros(WIDTH)
        const[4], const[5] = 1.0, -1.0
        visual.positional_embedding.copy_(const.expand_as(visual.positional_embedding))
        visual.class_embedding.copy_(-const)
        for ln in (visual.ln_pre, visual.ln_post):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        blocks = visual.transformer.resblocks
        for blk in blocks:
            _zero_block(blk, keep_attention_output=False)
            blk.ln_1.weight.fill_(1.0), blk.ln_1.bias.zero_()
            blk.ln_2.weight.fill_(1.0), blk.ln_2.bias.zero_()
        last = blocks[-1]
        _zero_block(last, keep_attention_output=True)
        eye = torch.eye(WIDTH)
        last.attn.in_proj_weight[:WIDTH].copy_(Q_GAIN * eye)           # q = Q_GAIN * x
        last.attn.in_proj_weight[2 * WIDTH:].copy_(V_GAIN * eye)       # v = V_GAIN * x
        # The class token (x = 0) asks with q = e6 (a bias); each patch answers with
        # k = SALIENCE * (r + b) in channel 6, so the class token attends to coloured
        # patches. Patches never hold channel 6, so q-q attention is unchanged by it.
        last.attn.in_proj_bias[6] = 1.0
        last.attn.in_proj_weight[WIDTH + 6, 0] = SALIENCE * math.sqrt(WIDTH)
        last.attn.in_proj_weight[WIDTH + 6, 2] = SALIENCE * math.sqrt(WIDTH)
        proj = torch.zeros_like(visual.proj)  # (WIDTH, EMBED)
        proj[0, 0], proj[2, 1], proj[4, 2] = 1.0, 1.0, 1.0
        visual.proj.copy_(proj)


def _token_ids(tokenizer, words) -> List[int]:
    ids: List[int] = []
    for word in words:
        ids.extend(tokenizer.encode(word))
    return ids


def _rig_text_tower(model, tokenizer) -> None:
    from mapclip.engine.core.options import DEFAULT_BACKGROUND_PROMPTS
    with torch.no_grad():
        emb = torch.zeros_like(model.token_embedding.weight)  # (vocab, TEXT_WIDTH)
        red, blue, bg, other = (torch.zeros(TEXT_WIDTH) for _ in range(4))
        red[0], red[1] = 1.0, -1.0
        blue[2], blue[3] = 1.0, -1.0
        bg[4], bg[5] = 1.0, -1.0
        other[6], other[7] = 0.05, -0.05
        bg_words = {w for p in DEFAULT_BACKGROUND_PROMPTS for w in p.lower().split()} - _STOP_WORDS
        for i in _token_ids(tokenizer, sorted(bg_words)):
            emb[i] = bg
        for i in _token_ids(tokenizer, ["red", "reds"]):
            emb[i] = red
        for i in _token_ids(tokenizer, ["blue", "blues"]):
            emb[i] = blue
        emb[tokenizer.eot_token_id] = other
        model.token_embedding.weight.copy_(emb)
        model.positional_embedding.zero_()
        for blk in model.transformer.resblocks:
            _zero_block(blk, keep_attention_output=True)
            blk.ln_1.weight.fill_(1.0), blk.ln_1.bias.zero_()
            blk.ln_1.weight[6:].fill_(0.2)  # the "other" direction stays weak beside real words
            blk.ln_2.weight.fill_(1.0), blk.ln_2.bias.zero_()
            blk.attn.in_proj_weight[2 * TEXT_WIDTH:].copy_(V_GAIN * torch.eye(TEXT_WIDTH))
        model.ln_final.weight.fill_(1.0)
        model.ln_final.bias.zero_()
        tp = torch.zeros_like(model.text_projection)  # (TEXT_WIDTH, EMBED)
        tp[0, 0], tp[2, 1], tp[4, 2], tp[6, 3] = 1.0, 1.0, 1.0, 1.0
        model.text_projection.copy_(tp)
        model.logit_scale.fill_(math.log(100.0))


def rigged_model():
    """The rigged model as a LoadedModel on the CPU in fp32 (see module doc)."""
    from open_clip.tokenizer import SimpleTokenizer

    from mapclip.engine.model.architectures import build_model
    from mapclip.engine.model.models import OPENAI_MEAN, OPENAI_STD, LoadedModel
    torch.manual_seed(0)
    model = build_model(RIGGED_CFG)
    tokenizer = SimpleTokenizer(context_length=CONTEXT)
    _rig_image_tower(model.visual, OPENAI_MEAN, OPENAI_STD)
    _rig_text_tower(model, tokenizer)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, spec="rigged", arch="mapclip-rigged",
                       image_size=IMAGE_SIZE, mean=OPENAI_MEAN, std=OPENAI_STD, embed_dim=EMBED,
                       device=torch.device("cpu"), precision="fp32", model_cfg=dict(RIGGED_CFG),
                       templates="raw")  # its token weights answer the words of raw prompts


def save_rigged_folder(folder) -> Path:
    """Write the rigged model as a model folder that ``load_model(str(folder))`` reads."""
    from mapclip.engine.model.models import OPENAI_MEAN, OPENAI_STD, save_model_folder
    lm = rigged_model()
    return save_model_folder(lm.model, RIGGED_CFG, Path(folder), "mapclip-rigged",
                             mean=OPENAI_MEAN, std=OPENAI_STD, extra={"templates": "raw"})


def tiny_resnet():
    """A small random open_clip ModifiedResNet as a LoadedModel (for fallbacks: no patch tokens)."""
    from open_clip.tokenizer import SimpleTokenizer

    from mapclip.engine.model.architectures import build_model
    from mapclip.engine.model.models import OPENAI_MEAN, OPENAI_STD, LoadedModel
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    torch.manual_seed(0)
    model = build_model(cfg).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=SimpleTokenizer(context_length=CONTEXT),
                       spec="rn-tiny", arch="rn-tiny", image_size=64, mean=OPENAI_MEAN,
                       std=OPENAI_STD, embed_dim=32, device=torch.device("cpu"), precision="fp32",
                       model_cfg=cfg)
