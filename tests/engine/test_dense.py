"""Dense (patch-level) features from a changed last ViT block, and the rigged model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import dense
from engine.encode import encode_images, encode_text, to_model_input
from engine.scoring import build_bank, score_embeddings
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


def test_on_device_conversion_matches_to_model_input_and_chunks_agree(tiny_model, monkeypatch):
    batch = torch.randint(0, 255, (5, 100, 90, 3), dtype=torch.uint8)
    ref = to_model_input(tiny_model, batch)
    assert torch.allclose(dense.resize_normalise(tiny_model, batch), ref, atol=1e-6)
    monkeypatch.setattr(dense, "MODEL_INPUT_CHUNK_BYTES", 100 * 90 * 3 * 4 * 2)  # 2 images a chunk
    assert torch.allclose(dense.model_input(tiny_model, batch), ref, atol=1e-6)


def test_dense_features_shape_norm_and_modes(tiny_model):
    batch = torch.randint(0, 255, (3, 80, 80, 3), dtype=torch.uint8).numpy()
    out = {m: dense.dense_features(tiny_model, batch, mode=m) for m in dense.ATTENTION_MODES}
    for m, f in out.items():
        assert f.shape == (3, 4, 4, 64), m
        assert torch.allclose(f.norm(dim=-1), torch.ones(3, 4, 4), atol=1e-5)
    assert not torch.allclose(out["qq"], out["vv"])
    assert not torch.allclose(dense.dense_features(tiny_model, batch, cls_weight=0.3), out["qq"])
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
