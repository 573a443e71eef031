"""Synthetic scenes: seeded, georeferenced, with ground truth that matches the pixels."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import rasterio

from mapclip.engine.data.synthetic.chips import make_chips, write_chips
from mapclip.engine.data.synthetic.coco import read_truth
from mapclip.engine.data.synthetic.scene import make_chip, make_scene
from mapclip.engine.data.synthetic.truth import CLASS_VALUE, OBJECT_BASE, OBJECT_CLASSES
from mapclip.engine.core.errors import UsageError


def _digest(path) -> str:
    with rasterio.open(path) as src:
        return hashlib.sha256(src.read().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    return make_scene(str(d / "scene.tif"), 1536, 1280, seed=4)


def test_same_seed_same_pixels_other_seed_differs(tmp_path, scene):
    again = make_scene(str(tmp_path / "again.tif"), 1536, 1280, seed=4)
    other = make_scene(str(tmp_path / "other.tif"), 1536, 1280, seed=5)
    assert _digest(again.path) == _digest(scene.path)
    assert _digest(again.mask_path) == _digest(scene.mask_path)
    assert [b.pixel for b in again.boxes] == [b.pixel for b in scene.boxes]
    assert _digest(other.path) != _digest(scene.path)


def test_georeferencing_and_layout(scene):
    with rasterio.open(scene.path) as src:
        assert (src.width, src.height, src.count) == (1536, 1280, 3)
        assert src.crs.to_epsg() == 32633
        assert src.transform.to_gdal() == (500000.0, 0.5, 0.0, 5300000.0, 0.0, -0.5)
        assert src.block_shapes[0] == (512, 512)
        assert src.dtypes[0] == "uint8"
    with rasterio.open(scene.mask_path) as m:
        assert m.transform.to_gdal() == (500000.0, 0.5, 0.0, 5300000.0, 0.0, -0.5)
        assert m.crs.to_epsg() == 32633
    # map boxes follow the pixel boxes through the transform
    b = scene.boxes[0]
    c0, r0, c1, r1 = b.pixel
    assert b.bounds == pytest.approx((500000 + 0.5 * c0, 5300000 - 0.5 * r1,
                                      500000 + 0.5 * c1, 5300000 - 0.5 * r0))


def test_other_crs_and_gsd(tmp_path):
    t = make_scene(str(tmp_path / "a.tif"), 256, seed=1, gsd=2.0, crs="EPSG:32618",
                   origin=(300000.0, 4500000.0), mask_path=None, coco_path=None)
    with rasterio.open(t.path) as src:
        assert src.crs.to_epsg() == 32618
        assert src.transform.to_gdal() == (300000.0, 2.0, 0.0, 4500000.0, 0.0, -2.0)
    assert t.mask_path is None and t.coco_path is None


def test_boxes_inside_and_tight_on_the_mask(scene):
    with rasterio.open(scene.mask_path) as m:
        mask = m.read(1)
    assert scene.boxes
    for b in scene.boxes:
        c0, r0, c1, r1 = b.pixel
        assert 0 < c0 < c1 < scene.width and 0 < r0 < r1 < scene.height
        value = CLASS_VALUE[b.cls]
        sub = mask[r0:r1, c0:c1] == value
        # tight: every edge row/column of the box holds a pixel of the object
        assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
        assert sub.sum() == b.area
    # every object pixel in the mask belongs to some box
    total = sum(b.area for b in scene.boxes)
    assert int((mask >= OBJECT_BASE).sum()) == total


def test_coco_json_round_trip(scene):
    data = json.loads(open(scene.coco_path).read())
    assert {c["name"] for c in data["categories"]} == set(OBJECT_CLASSES)
    assert data["images"][0]["width"] == 1536
    assert len(data["annotations"]) == len(scene.boxes)
    back = read_truth(scene.coco_path)
    assert [(b.cls, b.pixel) for b in back] == [(b.cls, tuple(b.pixel)) for b in scene.boxes]


def test_class_coverage_and_context(scene):
    counts = scene.counts()
    assert all(counts[c] > 0 for c in OBJECT_CLASSES), counts
    with rasterio.open(scene.mask_path) as m:
        mask = m.read(1)
    present = set(np.unique(mask).tolist())
    for lc in ("water", "forest", "field", "road", "urban", "runway", "apron"):
        assert CLASS_VALUE[lc] in present, lc
    # context: ships sit on water, airplanes on the apron, tanks on bare ground
    for cls, ground in (("ship", "water"), ("airplane", "apron"), ("storage-tank", "bare-ground"),
                        ("vehicle", "road")):
        for b in scene.of(cls):
            c0, r0, c1, r1 = b.pixel
            ring = np.concatenate([mask[r0 - 1, c0:c1], mask[r1, c0:c1], mask[r0:r1, c0 - 1], mask[r0:r1, c1]])
            land = ring[ring < OBJECT_BASE]
            assert land.size and np.bincount(land).argmax() == CLASS_VALUE[ground], (cls, b)


def test_objects_look_like_their_class(scene):
    with rasterio.open(scene.path) as src:
        img = np.moveaxis(src.read(), 0, -1).astype(int)
    with rasterio.open(scene.mask_path) as m:
        mask = m.read(1)
    tanks = img[mask == CLASS_VALUE["storage-tank"]].mean(axis=0)
    assert tanks.min() > 150                        # light discs
    pools = img[mask == CLASS_VALUE["swimming-pool"]].mean(axis=0)
    assert pools[2] > pools[0] + 40                 # blue-cyan
    water = img[mask == CLASS_VALUE["water"]].mean(axis=0)
    assert water[2] > water[0]
    ships = scene.of("ship")
    assert all(max(b.pixel[2] - b.pixel[0], b.pixel[3] - b.pixel[1]) >
               1.5 * min(b.pixel[2] - b.pixel[0], b.pixel[3] - b.pixel[1]) for b in ships
               if abs(((b.angle + 45) % 90) - 45) < 20)   # elongated when near axis-aligned


def test_chips_carry_their_boxes(scene, tmp_path):
    chips = make_chips(scene, size=(64, 128), n_object=28, n_random=6, n_near=7, seed=1)
    assert len(chips) == 41
    # near chips sit beside an object: some hold no object at all (context without it)
    assert sum(not c.boxes for c in chips[28:35]) >= 1
    classes_seen = set()
    for ch in chips:
        s = ch.image.shape[0]
        assert ch.image.shape == (s, s, 3) and ch.mask.shape == (s, s) and 64 <= s <= 128
        for cls, (x0, y0, x1, y1) in ch.boxes:
            classes_seen.add(cls)
            assert 0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s
            assert (ch.mask[y0:y1, x0:x1] == CLASS_VALUE[cls]).any()
    assert classes_seen == set(OBJECT_CLASSES)
    paths = write_chips(chips, str(tmp_path / "chips"))
    coco = json.loads(open(paths["boxes"]).read())
    assert len(coco["images"]) == 41
    assert len(coco["annotations"]) == sum(len(c.boxes) for c in chips)
    assert json.loads(open(paths["classes"]).read())["1"] == "water"


@pytest.mark.parametrize("cls,n", [("storage-tank", 1), ("ship", 4), ("airplane", 3), ("vehicle", 10)])
def test_counting_chip_has_exactly_n(tmp_path, cls, n):
    t = make_chip(str(tmp_path / "c.tif"), cls, n, size=128, seed=n)
    assert len(t.boxes) == n and all(b.cls == cls for b in t.boxes)
    with rasterio.open(t.mask_path) as m:
        mask = m.read(1)
    assert int((mask == CLASS_VALUE[cls]).sum()) == sum(b.area for b in t.boxes)


def test_bad_input(tmp_path):
    with pytest.raises(UsageError):
        make_scene(str(tmp_path / "x.tif"), 8, seed=0)
    with pytest.raises(UsageError):
        make_chip(str(tmp_path / "y.tif"), "unicorn", 2)
    t = make_scene(str(tmp_path / "z.tif"), 64, seed=0)
    with pytest.raises(UsageError):
        make_scene(t.path, 64, seed=0)          # exists: refused without overwrite
    make_scene(t.path, 64, seed=0, overwrite=True)


def test_large_scene_streams(tmp_path):
    """A size that runs quickly; the writer goes strip by strip (progress per strip)."""
    seen = []
    t = make_scene(str(tmp_path / "big.tif"), 3000, 1100, seed=9, compress="none",
                   progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (3, 3)
    assert len(t.boxes) > 20
    with rasterio.open(t.path) as src:
        assert (src.width, src.height) == (3000, 1100)


def test_cancel_leaves_no_output(tmp_path):
    from mapclip.engine.core.errors import Cancelled

    class StopAfterFirst:
        def __init__(self):
            self.calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 1

    with pytest.raises(Cancelled):
        make_scene(str(tmp_path / "c.tif"), 1100, 1100, seed=2, cancel=StopAfterFirst())
    assert list(tmp_path.iterdir()) == []
