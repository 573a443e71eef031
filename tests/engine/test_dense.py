"""Dense (patch-level) features from a changed last ViT block, and the rigged model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mapclip.engine.model import dense
from mapclip.engine.model.encode import encode_images, encode_text, to_model_input
from mapclip.engine.model.scoring import build_bank, score_embeddings
from tests.rigged import BLUE, BLUE_PROMPT, GREY, RED, RED_PROMPT, rigged_model, tiny_resnet


@pytest.fixture(scope="module")
def rig():
    return rigged_model()


def _grey(n=1, size=64):
    return np.full((n, size, size, 3), GREY, np.uint8)


def test_own_embedding_path_reproduces_open_clip_image_encoder(tiny_model):
    """dense runs the tower's pieces itself; with the normal last block it must equal encode_image."""
    lm = tiny_model
    batch = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    with torch.inference_mode():
        x = to_model_input(lm, batch)
        v = lm.model.visual
        tokens = dense._embed(v, x)
        for blk in v.transformer.resblocks:
            tokens = blk(tokens)
        ours = F.normalize(v.ln_post(tokens[:, 0]) @ v.proj, dim=-1)
    ref = encode_images(lm, batch)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_model_input_in_chunks_equals_one_pass_and_the_fine_tuning_arithmetic(tiny_model, monkeypatch):
    from mapclip.engine.model import encode
    batch = torch.randint(0, 255, (5, 100, 90, 3), dtype=torch.uint8)
    ref = to_model_input(tiny_model, batch)
    assert ref.shape == (5, 3, tiny_model.image_size, tiny_model.image_size)
    monkeypatch.setattr(encode, "MODEL_INPUT_CHUNK_BYTES", 100 * 90 * 3 * 4 * 2)  # 2 images a chunk
    assert torch.allclose(to_model_input(tiny_model, batch), ref, atol=1e-6)
    # by hand: 0-1, resized, normalised with the model's mean and std
    x = torch.nn.functional.interpolate(batch.permute(0, 3, 1, 2).float() / 255.0,
                                        size=(tiny_model.image_size,) * 2, mode="bilinear",
                                        antialias=True, align_corners=False)
    mean = torch.tensor(tiny_model.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.std).view(1, 3, 1, 1)
    assert torch.allclose(ref, (x - mean) / std, atol=1e-5)


def test_dense_features_shape_norm_and_modes(tiny_model):
    batch = torch.randint(0, 255, (3, 80, 80, 3), dtype=torch.uint8).numpy()
    out = {m: dense.dense_features(tiny_model, batch, mode=m) for m in dense.ATTENTION_MODES}
    for m, f in out.items():
        assert f.shape == (3, 4, 4, 64), m
        assert torch.allclose(f.norm(dim=-1), torch.ones(3, 4, 4), atol=1e-5)
    assert not torch.allclose(out["clearclip"], out["vv"])
    assert torch.equal(dense.dense_features(tiny_model, batch, mode="qq"), out["clearclip"])   # old name
    assert not torch.allclose(dense.dense_features(tiny_model, batch, cls_token_lambda=-0.3), out["clearclip"])
    with pytest.raises(ValueError):
        dense.dense_features(tiny_model, batch, mode="qk")
    assert dense.patch_grid(tiny_model) == 4


def test_open_clip_is_not_patched_by_dense(tiny_model):
    batch = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    before = encode_images(tiny_model, batch)
    dense.dense_features(tiny_model, batch)
    assert torch.equal(before, encode_images(tiny_model, batch))


def test_rigged_image_encoder_scores_planted_colours(rig):
    imgs = _grey(4)
    imgs[1, 16:32, 24:40] = RED
    imgs[2, 40:56, 8:24] = BLUE
    imgs[3] = np.random.default_rng(0).integers(1, 200, (64, 64, 3), dtype=np.uint8)  # noise
    bank = build_bank(rig, [RED_PROMPT, BLUE_PROMPT])
    probs, cos = score_embeddings(encode_images(rig, imgs), bank)
    assert probs[1, 0] > 0.99 and probs[2, 1] > 0.99
    assert probs[0].max() < 0.01 and probs[3].max() < 0.01   # grey and noise: background wins
    assert cos[1, 0] > cos[0, 0] + 0.5 and cos[2, 1] > cos[0, 1] + 0.5
    # a prompt without the planted words matches nothing
    other = encode_text(rig, ["forest"])
    assert float((encode_images(rig, imgs) @ other.T).abs().max()) < 1e-4


def test_rigged_dense_features_localise_the_red_square(rig):
    img = _grey()
    img[0, 16:32, 40:56] = RED            # patches (row 2-3, col 5-6) of the 8 x 8 grid
    feats = dense.dense_features(rig, img)
    text = encode_text(rig, [RED_PROMPT])
    sim = dense.similarity_maps(feats, text)[0, 0]
    red = torch.zeros(8, 8, dtype=torch.bool)
    red[2:4, 5:7] = True
    assert sim[red].min() > 0.8
    assert sim[~red].max() < 0.0


def test_changed_last_block_is_what_keeps_patches_local(rig):
    """With the model's own last block (residual + global mixing), grey patches turn red."""
    img = _grey()
    img[0, 0:16, 0:16] = RED
    text = encode_text(rig, [RED_PROMPT])
    with torch.inference_mode():
        v = rig.model.visual
        x = dense._embed(v, to_model_input(rig, img))
        for blk in v.transformer.resblocks:
            x = blk(x)
        plain = F.normalize(v.ln_post(x[:, 1:]) @ v.proj, dim=-1).reshape(1, 8, 8, -1)
    ours = dense.dense_features(rig, img)
    plain_sim = dense.similarity_maps(plain, text)[0, 0]
    our_sim = dense.similarity_maps(ours, text)[0, 0]
    assert plain_sim[5:, 5:].min() > our_sim[5:, 5:].max() + 0.3


def test_resnet_is_reported_unsupported():
    lm = tiny_resnet()
    reason = dense.dense_unsupported(lm)
    assert reason and "not a ViT" in reason
    with pytest.raises(ValueError):
        dense.dense_features(lm, _grey())


# --------------------------------------------------------------------------- #
# Each mode pinned against an implementation written from the papers' equations.
# --------------------------------------------------------------------------- #
def _reference_dense(lm, x, mode, lam=0.0):
    """Patch and class features of a normalised input x (B, 3, H, W), from the equations.

    Patch embedding as a matrix product over unfolded patches; position
    embeddings resized bicubically by (g + 0.1) / n (ClearCLIP / SegEarth-OV,
    after DINO); blocks 1..L-1 unchanged; in block L, with y = LN1(x) and per
    head q, k, v = y W + b, A(a) = softmax(a a^T / sqrt(d_head)):
      ClearCLIP   O = A(q) v                       (no residual, no FFN)
      SCLIP-style O = (A(q) + A(k)) v              (no residual, no FFN)
      SCLIP       x' = x + (A(q) + A(k)) v W_o;  O = x' + FFN(LN2(x'))
      SegEarth-OV O = (A(q) + A(k) + A(v)) v       (no residual, no FFN)
    then LN_post and the projection; SegEarth-OV's score is
    cos(patch, t) + lam * cos(cls, t), i.e. feature normalise(patch) + lam * normalise(cls).
    """
    import math
    v = lm.model.visual
    b, _, H, W = x.shape
    conv = v.conv1.weight
    p = conv.shape[-1]
    gh, gw = H // p, W // p
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, -1)
    tok = patches @ conv.reshape(conv.shape[0], -1).T
    z = torch.cat([v.class_embedding.view(1, 1, -1).expand(b, 1, -1), tok], dim=1)
    pos = v.positional_embedding
    n = int(math.isqrt(pos.shape[0] - 1))
    if (gh, gw) != (n, n):
        grid = F.interpolate(pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2),
                             scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                             align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    z = v.ln_pre(z + pos)
    for blk in v.transformer.resblocks[:-1]:
        z = blk(z)
    last = v.transformer.resblocks[-1]
    d = z.shape[-1]
    h = last.attn.num_heads
    y = last.ln_1(z)
    wq, wk, wv = last.attn.in_proj_weight.split(d)
    bq, bk, bv = last.attn.in_proj_bias.split(d)

    def heads(t):
        return t.reshape(b, -1, h, d // h).transpose(1, 2)

    q, k, val = heads(y @ wq.T + bq), heads(y @ wk.T + bk), heads(y @ wv.T + bv)

    def A(a):
        return torch.softmax(a @ a.transpose(-1, -2) / math.sqrt(d // h), dim=-1)

    attn = {"clearclip": A(q), "sclip-style": A(q) + A(k), "sclip": A(q) + A(k),
            "segearth": A(q) + A(k) + A(val), "kk": A(k), "vv": A(val)}[mode]
    o = (attn @ val).transpose(1, 2).reshape(b, -1, d) @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    if mode == "sclip":
        z1 = z + o
        o = z1 + last.mlp(last.ln_2(z1))
    f = v.ln_post(o) @ v.proj
    return F.normalize(f[:, 1:], dim=-1) + lam * F.normalize(f[:, :1], dim=-1)


@pytest.mark.parametrize("mode", list(dense.ATTENTION_MODES))
def test_each_mode_equals_the_papers_equations(tiny_model, mode):
    torch.manual_seed(11)
    batch = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref = _reference_dense(tiny_model, to_model_input(tiny_model, batch), mode)
    ours = dense.dense_features(tiny_model, batch, mode=mode).reshape(2, -1, ref.shape[-1])
    assert torch.allclose(ours, ref, atol=1e-5), mode


def test_segearth_class_token_correction_is_lambda_cos_cls_text(tiny_model):
    torch.manual_seed(12)
    batch = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8)
    text = F.normalize(torch.randn(5, tiny_model.embed_dim), dim=-1)
    with torch.no_grad():
        x = to_model_input(tiny_model, batch)
        plain = _reference_dense(tiny_model, x, "segearth")
        cls_only = _reference_dense(tiny_model, x, "segearth", lam=1.0) - plain
    want = plain @ text.T - 0.3 * (cls_only @ text.T)      # lambda = -0.3 (SegEarth-OV's configs)
    got = dense.similarity_maps(dense.dense_features(tiny_model, batch, mode="segearth", cls_token_lambda=-0.3), text)
    assert torch.allclose(got.reshape(1, 5, -1).transpose(1, 2), want, atol=1e-5)
    # not the old formula (raw class token subtracted from raw patches)
    assert not torch.allclose(got.reshape(1, 5, -1).transpose(1, 2), plain @ text.T, atol=1e-3)


def test_any_multiple_of_the_patch_with_interpolated_positions(tiny_model):
    torch.manual_seed(13)
    batch = torch.randint(0, 255, (1, 96, 128, 3), dtype=torch.uint8)
    for size in (128, 96):                          # 8 x 8 and 6 x 6 grids of a 64 px (4 x 4) model
        f = dense.dense_features(tiny_model, batch, mode="segearth", input_size=size)
        assert f.shape == (1, size // 16, size // 16, tiny_model.embed_dim)
        with torch.no_grad():
            ref = _reference_dense(tiny_model, to_model_input(tiny_model, batch, size), "segearth")
        assert torch.allclose(f.reshape(1, -1, ref.shape[-1]), ref, atol=1e-5), size
    # the model's own size is untouched by interpolation
    assert torch.equal(dense.interpolate_positions(tiny_model.model.visual.positional_embedding, 4, 4),
                       tiny_model.model.visual.positional_embedding)
    with pytest.raises(ValueError, match="multiple of the 16 px patch"):
        dense.dense_features(tiny_model, batch, input_size=100)


def test_sliding_crops_average_the_crops_scores(tiny_model):
    torch.manual_seed(14)
    batch = torch.randint(0, 255, (1, 128, 128, 3), dtype=torch.uint8)
    f = dense.dense_features(tiny_model, batch, mode="clearclip", input_size=128, crop=64, stride=32)
    assert f.shape == (1, 8, 8, tiny_model.embed_dim)
    x = to_model_input(tiny_model, batch, 128)
    acc = torch.zeros(1, 8, 8, tiny_model.embed_dim)
    cnt = torch.zeros(8, 8, 1)
    with torch.no_grad():
        for y0 in (0, 32, 64):
            for x0 in (0, 32, 64):
                r = _reference_dense(tiny_model, x[:, :, y0:y0 + 64, x0:x0 + 64], "clearclip").reshape(1, 4, 4, -1)
                acc[:, y0 // 16:y0 // 16 + 4, x0 // 16:x0 // 16 + 4] += r
                cnt[y0 // 16:y0 // 16 + 4, x0 // 16:x0 // 16 + 4] += 1
    assert torch.allclose(f, acc / cnt, atol=1e-5)
