"""Hard-negative chips (engine.data.synthetic.chips.make_cover_chips): ground without its objects."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio

from mapclip.engine.data.synthetic.chips import make_cover_chips
from mapclip.engine.data.synthetic.scene import make_scene
from mapclip.engine.data.synthetic.truth import CLASS_VALUE, OBJECT_BASE
from mapclip.engine.core.errors import UsageError

COVERS = ("runway", "apron", "water", "bare-ground")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(str(tmp_path_factory.mktemp("cover") / "s.tif"), 1024, seed=1000)


def test_cover_chips_hold_their_cover_and_no_object(scene):
    chips = make_cover_chips(scene, COVERS, n=6, size=(64, 96), seed=3, min_cover=0.5)
    with rasterio.open(scene.path) as src:
        img = np.moveaxis(src.read(), 0, -1)
    by_cover = {c: [ch for ch in chips if ch.name.rsplit("_", 2)[-2] == c] for c in COVERS}
    assert all(len(v) == 6 for v in by_cover.values()), {c: len(v) for c, v in by_cover.items()}
    for cover, cs in by_cover.items():
        for ch in cs:
            s = ch.image.shape[0]
            assert 64 <= s <= 96 and ch.image.shape == (s, s, 3) and ch.mask.shape == (s, s)
            assert ch.boxes == [] and not (ch.mask >= OBJECT_BASE).any()
            assert (ch.mask == CLASS_VALUE[cover]).mean() >= 0.5
            # the pixels are the scene's at the chip's place
            assert np.array_equal(ch.image, img[ch.row:ch.row + s, ch.col:ch.col + s])
    # runway chips show the centre-line marks (near-white paint), the ground ships were confused with
    assert any((ch.image.min(axis=2) > 220).sum() >= 20 for ch in by_cover["runway"])
    again = make_cover_chips(scene, COVERS, n=6, size=(64, 96), seed=3, min_cover=0.5)
    assert [c.name for c in again] == [c.name for c in chips]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, chips))


def test_cover_chips_name_an_unknown_cover(scene):
    with pytest.raises(UsageError) as e:
        make_cover_chips(scene, ["runways"], n=1)
    assert "runways" in str(e.value) and "runway" in e.value.hint
