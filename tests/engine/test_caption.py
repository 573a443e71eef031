"""engine.caption and `python -m engine caption`: captions for places."""
from __future__ import annotations

import json

import pytest
import rasterio

from mapclip.engine.caption import caption, read_caption_bank
from mapclip.engine.cli import main as cli_main
from mapclip.engine.core.errors import UsageError
from mapclip.engine.core.options import CaptionOptions
from tests.raster_fixtures import make_raster, noise

BANK = ["water", "a forest", "buildings", "fields", "bare ground", "a road"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from mapclip.engine.data.synthetic.scene import make_scene
    d = tmp_path_factory.mktemp("caption")
    make_scene(str(d / "s.tif"), width=512, seed=9104, coco_path=None)
    return d / "s.tif"


def _pure_windows(mask_path, value, size=48, need=0.95, limit=3):
    """Map boxes of windows whose mask is almost all ``value``."""
    with rasterio.open(mask_path) as ds:
        m, tf = ds.read(1), ds.transform
    out = []
    for r in range(0, m.shape[0] - size, size):
        for c in range(0, m.shape[1] - size, size):
            if (m[r:r + size, c:c + size] == value).mean() >= need:
                x0, y1 = tf @ (c, r)
                x1, y0 = tf @ (c + size, r + size)
                out.append((x0, y0, x1, y1))
    return out[:limit]


def test_retrieval_names_the_land_cover_of_the_place(scene, one_torch_thread):
    from mapclip.engine.data.synthetic.truth import CLASS_VALUE
    mask = str(scene).replace(".tif", "_mask.tif")
    checked = 0
    for value, word in ((CLASS_VALUE["water"], "water"), (CLASS_VALUE["forest"], "a forest")):
        boxes = _pure_windows(mask, value)
        if not boxes:
            continue
        r = caption(str(scene), "demo", boxes, bank=BANK, options=CaptionOptions(top=3, device="cpu"))
        assert r.method == "retrieval" and r.bank_size == len(BANK)
        for place in r.places:
            assert place.best == word, place.to_json()
            cos = [c.cosine for c in place.captions]
            assert cos == sorted(cos, reverse=True) and len(cos) == 3
            checked += 1
    assert checked >= 2


def test_bank_files(tmp_path):
    (tmp_path / "lines.csv").write_text("water\nA  forest\nwater\n\n")
    assert read_caption_bank(tmp_path / "lines.csv") == ["water", "A forest"]
    (tmp_path / "b2c.csv").write_text("image,caption\na.png,two ships\na.png,a harbor\nb.png,two ships\n")
    assert read_caption_bank(tmp_path / "b2c.csv") == ["two ships", "a harbor"]
    (tmp_path / "rsicd.json").write_text(json.dumps({"images": [
        {"filename": "x.jpg", "sentences": [{"raw": "many planes"}, {"raw": "an airport"}]}]}))
    assert read_caption_bank(tmp_path / "rsicd.json") == ["many planes", "an airport"]
    (tmp_path / "empty.csv").write_text("caption\n\n")
    with pytest.raises(UsageError, match="no captions"):
        read_caption_bank(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00w")
    with pytest.raises(UsageError, match="UTF-8"):
        read_caption_bank(tmp_path / "bad.csv")
    with pytest.raises(UsageError, match="does not exist"):
        read_caption_bank(tmp_path / "none.csv")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(UsageError, match="unknown caption bank"):
        read_caption_bank(tmp_path / "x.xlsx")


def test_generation_with_a_coca_model(tmp_path, one_torch_thread):
    raster = str(make_raster(tmp_path / "r.tif", width=96, height=96, data=noise(3, 96, 96, seed=2)))
    from mapclip.engine.model.models import load_model
    lm = load_model("test-coca-tiny", device="cpu")
    for method in ("beam_search", "top_k", "top_p"):
        opts = CaptionOptions(method=method, max_length=6, seed=3)
        a = caption(raster, lm, [None], options=opts)
        b = caption(raster, lm, [None], options=opts)
        assert a.method == "generation" and a.places[0].best
        assert a.places[0].best == b.places[0].best          # seeded: the same text
    # a CLIP without a bank cannot describe; a CoCa with a bank ranks unless asked to generate
    with pytest.raises(UsageError, match="cannot generate"):
        caption(raster, "test-tiny", [None], options=CaptionOptions(device="cpu"))
    with pytest.raises(UsageError, match="not a CoCa"):
        caption(raster, "test-tiny", [None], bank=BANK, generate=True,
                options=CaptionOptions(device="cpu"))
    assert caption(raster, lm, [None], bank=BANK).method == "retrieval"


def test_cli_caption(scene, tmp_path, capsys, one_torch_thread):
    bank = tmp_path / "bank.csv"
    bank.write_text("\n".join(BANK))
    with rasterio.open(scene) as ds:
        b = ds.bounds
    box = f"{b.left},{b.top - 40},{b.left + 40},{b.top}"
    rc = cli_main(["caption", str(scene), "--box", box, "--box", box, "--model", "demo",
                   "--device", "cpu", "--bank", str(bank), "--top", "2", "--json"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["places"]) == 2 and info["places"][0]["caption"] in BANK
    assert len(info["places"][0]["captions"]) == 2
    rc = cli_main(["caption", str(scene), "--extent", "0,0,1,1", "--model", "demo", "--bank",
                   str(bank)])
    err = capsys.readouterr().err
    assert rc == 2 and "misses the raster" in err
    (tmp_path / "empty.txt").write_text("")
    rc = cli_main(["caption", str(scene), "--model", "demo", "--bank", str(tmp_path / "empty.txt")])
    assert rc == 2 and "no captions" in capsys.readouterr().err


def test_a_coca_checkpoint_loads_and_writes_the_same_captions(tmp_path, one_torch_thread):
    """A CoCa state dict (safetensors) loads through ARCH:CHECKPOINT like any CLIP's, strictly."""
    from safetensors.torch import save_file

    from mapclip.engine.caption import generate_captions
    from mapclip.engine.model.models import load_model
    lm = load_model("test-coca-tiny", device="cpu")
    ckpt = tmp_path / "coca.safetensors"
    save_file({k: v.contiguous() for k, v in lm.model.state_dict().items()}, str(ckpt))
    again = load_model(f"mapclip-coca-tiny:{ckpt}", device="cpu")
    img = noise(3, 64, 64, seed=9).transpose(1, 2, 0)[None]
    opts = CaptionOptions(max_length=8)
    assert generate_captions(again, img, opts) == generate_captions(lm, img, opts)


def test_sampling_never_draws_a_non_finite_logit(tmp_path, monkeypatch):
    """A decoder step that returns NaN or inf logits ends the caption instead of crashing
    torch.multinomial ("probability tensor contains either inf, nan or element < 0")."""
    from mapclip.engine import caption as C
    from mapclip.engine.model.models import load_model
    raster = str(make_raster(tmp_path / "r.tif", width=96, height=96, data=noise(3, 96, 96, seed=2)))
    lm = load_model("test-coca-tiny", device="cpu")
    real = C._next_logits
    calls = []

    def broken_first_step(model, x, tokens, latent, embs):
        # the first step: a random model may end its caption after any later one
        out = real(model, x, tokens, latent, embs)
        calls.append(1)
        if len(calls) == 1:
            out = out.clone()
            out[:, : out.shape[1] // 2] = float("nan")
            out[:, out.shape[1] // 2:] = float("inf")
        return out

    monkeypatch.setattr(C, "_next_logits", broken_first_step)
    for method in ("top_k", "top_p"):
        calls.clear()
        res = caption(raster, lm, [None], options=CaptionOptions(method=method, max_length=6, seed=3))
        assert res.method == "generation" and len(calls) == 1  # the broken step ended it
        assert isinstance(res.places[0].best, str)
