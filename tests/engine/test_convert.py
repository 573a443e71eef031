"""Box-to-Caption (four formats, fixed seeds, wording) and Mask-to-Box (exact boxes)."""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapclip.engine.data.annotations import ImageAnnotation, ObjectBox
from mapclip.engine.cli import main as cli_main
from mapclip.engine.core.options import BoxCaptionOptions as CaptionOptions, MaskOptions
from mapclip.engine.data.box_caption import box_to_caption, caption_image
from mapclip.engine.data.mask_box import mask_regions, mask_to_box
from mapclip.engine.data.grammar import normalise_class_name, plural, with_count
from mapclip.engine.core.errors import Cancelled, UsageError

from .test_annotations import CLASSES, dota_lines, voc_xml, write_coco, write_image, yolo_lines

W, H = 100, 80   # central region: x in [25, 75], y in [20, 60]
S1 = [("plane", (40, 30, 60, 50)), ("plane", (45, 25, 55, 35)),       # centre
      ("storage-tank", (60, 50, 70, 60)),                             # centre (65, 55)
      ("storage-tank", (0, 0, 10, 10)), ("storage-tank", (85, 65, 95, 75))]  # outside
S2 = [("ship", (45, 35, 55, 45)), ("ship", (48, 38, 52, 42)), ("ship", (90, 5, 98, 12))]
SCENES = {"s1.png": S1, "s2.png": S2, "s3.png": []}

S2_CAPTIONS = ["There are 2 ships in the center of the image.",
               "There is a ship outside the center of the image.",
               "There are 3 ships in the image.",
               "An aerial image with 3 ships.",
               "A remote sensing image containing 3 ships."]
EXPECTED = {
    0: {"s1.png": ["There are 2 planes and a storage tank in the center of the image.",
                   "There are 2 storage tanks outside the center of the image.",
                   "There are 3 storage tanks in the image.",
                   "An aerial image with 2 planes and 3 storage tanks.",
                   "A remote sensing image containing 2 planes."],
        "s2.png": S2_CAPTIONS},
    7: {"s1.png": ["There are 2 planes and a storage tank in the center of the image.",
                   "There are 2 storage tanks outside the center of the image.",
                   "There are 2 planes in the image.",
                   "An aerial image with 2 planes and 3 storage tanks.",
                   "A remote sensing image containing 3 storage tanks and 2 planes."],
        "s2.png": S2_CAPTIONS},
}


def make_dataset(root: Path, fmt: str) -> Path:
    """The scenes in ``fmt`` under ``root``; images in root/images. Returns ANN."""
    images = root / "images"
    for name in SCENES:
        write_image(images, name)
    if fmt == "coco":
        return write_coco(root / "ann.json", [(n, W, H, objs) for n, objs in SCENES.items()])
    labels = root / "labels"
    labels.mkdir()
    for name, objs in SCENES.items():
        stem = Path(name).stem
        if fmt == "dota":
            (labels / f"{stem}.txt").write_text(dota_lines(objs))
        elif fmt == "yolo":
            (labels / f"{stem}.txt").write_text(yolo_lines(objs))
        else:
            (labels / f"{stem}.xml").write_text(voc_xml(name, objs))
    if fmt == "yolo":
        (labels / "classes.txt").write_text("\n".join(CLASSES))
    return labels


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "caption", "label"]
    out = {}
    for image, caption, _ in rows[1:]:
        out.setdefault(image, []).append(caption)
    return out


# ------------------------------------------------------------------ words --
@pytest.mark.parametrize("raw,norm,plur", [
    ("large-vehicle", "large vehicle", "large vehicles"),
    ("storage_tank", "storage tank", "storage tanks"),
    ("small-vehicle", "small vehicle", "small vehicles"),
    ("StorageTank", "storage tank", "storage tanks"),
    ("groundtrackfield", "ground track field", "ground track fields"),
    ("Expressway-Service-area", "expressway service area", "expressway service areas"),
    ("ferry", "ferry", "ferries"),
    ("box", "box", "boxes"),
    ("bus", "bus", "buses"),
    ("church", "church", "churches"),
    ("person", "person", "people"),
    ("chimney", "chimney", "chimneys"),
    ("aircraft", "aircraft", "aircraft"),
    ("overpass", "overpass", "overpasses"),
    ("bag-of-rice", "bag of rice", "bags of rice"),
    ("UAV", "UAV", "UAVs"),
])
def test_normalise_and_plural(raw, norm, plur):
    assert normalise_class_name(raw) == norm
    assert plural(raw, 1) == norm
    assert plural(raw, 2) == plur


@pytest.mark.parametrize("name,n,text", [
    ("airplane", 1, "an airplane"), ("storage-tank", 1, "a storage tank"),
    ("overpass", 1, "an overpass"), ("unit", 1, "a unit"), ("hour", 1, "an hour"),
    ("SUV", 1, "an SUV"), ("UAV", 1, "a UAV"),
    ("ship", 3, "3 ships"), ("ship", 10, "10 ships"), ("ship", 11, "many ships"),
    ("ferry", 0, "no ferries"),
])
def test_with_count(name, n, text):
    assert with_count(name, n) == text


def test_vague_quantity_above_ten_uses_both_words_by_seed():
    seen = {with_count("small-vehicle", 25, random.Random(s)) for s in range(20)}
    assert seen == {"many small vehicles", "a lot of small vehicles"}


# --------------------------------------------------------- box-to-caption --
@pytest.mark.parametrize("fmt", ["coco", "dota", "yolo", "voc"])
@pytest.mark.parametrize("seed", [0, 7])
def test_b2c_expected_captions_every_format(tmp_path, fmt, seed):
    ann = make_dataset(tmp_path, fmt)
    out = tmp_path / "out" / "captions.csv"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    res = box_to_caption(ann, out, CaptionOptions(format=fmt, images_dir=str(tmp_path / "images"),
                                                  seed=seed))
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*")
             if p.is_file() and p != out}
    assert after == before                                  # inputs untouched
    got = read_csv(out)
    want = {f"../images/{k}": v for k, v in EXPECTED[seed].items()}
    assert got == want
    assert res.empty == ["s3.png"]
    assert (res.images, res.captioned, res.captions, res.objects) == (3, 2, 10, 8)
    assert res.categories == ["plane", "ship", "storage tank"]


def test_captions_readable_by_the_finetune_reader(tmp_path):
    from mapclip.engine.data.captions import read_captions
    ann = make_dataset(tmp_path, "coco")
    out = tmp_path / "caps.csv"
    box_to_caption(ann, out, CaptionOptions(format="coco", images_dir=str(tmp_path / "images")))
    cs = read_captions(out)
    by_name = {Path(i.path).name: i.captions for i in cs.items}
    assert by_name == EXPECTED[0]
    # each image's scene class (its most numerous class): the labels --recipe pir trains with
    assert {Path(i.path).name: i.label for i in cs.items} == {"s1.png": "storage tank", "s2.png": "ship"}
    assert all(Path(i.path).is_file() for i in cs.items)


def test_jsonl_output(tmp_path):
    ann = make_dataset(tmp_path, "coco")
    out = tmp_path / "caps.jsonl"
    box_to_caption(ann, out, CaptionOptions(format="coco", images_dir=str(tmp_path / "images")))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in recs if r["image"] == "images/s2.png"] == S2_CAPTIONS
    assert {r["label"] for r in recs if r["image"] == "images/s2.png"} == {"ship"}


def test_seed_and_order_independence():
    rng = random.Random(1)
    cats = ["plane", "ship", "harbor", "small-vehicle", "bridge"]
    images = []
    for k in range(30):
        objs = [ObjectBox(rng.choice(cats), (x, y, x + 4, y + 4))
                for x, y in ((rng.uniform(0, 90), rng.uniform(0, 70)) for _ in range(rng.randint(1, 30)))]
        images.append(ImageAnnotation(f"im{k}.png", f"im{k}.png", W, H, objs))
    a = {im.name: caption_image(im, seed=3) for im in images}
    b = {im.name: caption_image(im, seed=3) for im in reversed(images)}
    c = {im.name: caption_image(im, seed=4) for im in images}
    assert a == b
    assert a != c


def test_counting_captions_state_true_counts():
    """Every count in captions 3-5 is the image's true count of that class."""
    rng = random.Random(5)
    cats = ["plane", "ship", "harbor", "small-vehicle", "storage-tank"]
    for k in range(40):
        objs = [ObjectBox(rng.choice(cats), (x, y, x + 2, y + 2))
                for x, y in ((rng.uniform(0, 90), rng.uniform(0, 70)) for _ in range(rng.randint(1, 25)))]
        counts = {}
        for o in objs:
            counts[normalise_class_name(o.category)] = counts.get(normalise_class_name(o.category), 0) + 1
        caps = caption_image(ImageAnnotation(f"x{k}.png", "", W, H, objs), seed=k)
        assert len(caps) == 5
        for cap in caps[2:]:
            named = 0
            for cls, n in counts.items():
                words = with_count(cls, n) if n <= 10 else None
                if n > 10:
                    hit = re.search(rf"(many|a lot of) {re.escape(plural(cls, n))}\b", cap)
                else:
                    hit = re.search(rf"(?<![\w-]){re.escape(words)}\b", cap)
                named += bool(hit)
            assert 1 <= named <= 3, cap


def test_centre_region_bounds_are_inclusive():
    inside = ImageAnnotation("c.png", "", W, H, [ObjectBox("ship", (20, 15, 30, 25))])   # centre (25, 20)
    outside = ImageAnnotation("d.png", "", W, H, [ObjectBox("ship", (20, 14, 30, 24))])  # centre (25, 19)
    assert caption_image(inside)[0] == "There is a ship in the center of the image."
    assert caption_image(inside)[1] == "There is nothing outside the center of the image."
    assert caption_image(outside)[0] == "There is nothing in the center of the image."


def test_skip_difficult(tmp_path):
    (tmp_path / "a.xml").write_text(voc_xml("a.png", S2, difficult={2}))
    out = tmp_path / "c.csv"
    box_to_caption(tmp_path / "a.xml", out, CaptionOptions(format="voc", include_difficult=False))
    assert read_csv(out)["a.png"][2] == "There are 2 ships in the image."


def test_b2c_refuses_existing_output_and_cancels_cleanly(tmp_path):
    ann = make_dataset(tmp_path, "coco")
    out = tmp_path / "c.csv"
    out.write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        box_to_caption(ann, out, CaptionOptions(images_dir=str(tmp_path / "images")))
    assert out.read_text() == "keep me"

    class Stop:
        def is_set(self):
            return True
    out2 = tmp_path / "d.csv"
    with pytest.raises(Cancelled):
        box_to_caption(ann, out2, CaptionOptions(images_dir=str(tmp_path / "images")), cancel=Stop())
    assert not out2.exists() and not list(tmp_path.glob(".d.*"))


def test_b2c_progress_reports_every_image(tmp_path):
    ann = make_dataset(tmp_path, "coco")
    seen = []
    box_to_caption(ann, tmp_path / "c.csv", CaptionOptions(images_dir=str(tmp_path / "images")),
                   progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (3, 3)


# ------------------------------------------------------------ mask-to-box --
def constructed_mask() -> np.ndarray:
    m = np.zeros((20, 30), np.uint8)
    m[0:4, 0:5] = 1            # touches the top and left edges
    m[4:6, 5:7] = 1            # touches the block above only diagonally: same region
    m[10:17, 10:17] = 2        # a ring ...
    m[12:15, 12:15] = 0        # ... with a hole ...
    m[13, 13] = 2              # ... holding an island of the same class
    m[10:17, 17:20] = 3        # another class touching the ring: its own box
    m[18:20, 28:30] = 1        # 4 px in the bottom-right corner
    m[8, 25] = 1               # a single pixel
    m[0:2, 20:23] = 255        # void, ignored
    m[19, 0] = 7               # not in the classes
    return m


CONSTRUCTED_BOXES = {  # class -> [(bbox, area)]
    1: [((0, 0, 7, 6), 24), ((25, 8, 1, 1), 1), ((28, 18, 2, 2), 4)],
    # a ring with a same-class island in its hole: two regions, the ring's area its own
    2: [((10, 10, 7, 7), 40), ((13, 13, 1, 1), 1)],
    3: [((17, 10, 3, 7), 21)],
}


def test_mask_regions_exact():
    regions = mask_regions(constructed_mask(), classes=[1, 2, 3], ignore_index=255)
    got = {}
    for r in regions:
        got.setdefault(r.class_index, []).append((r.bbox, r.area))
    assert got == CONSTRUCTED_BOXES


def test_touching_same_class_regions_merge_and_holes_make_no_region():
    m = np.zeros((10, 10), np.uint8)
    m[1:4, 1:4] = 1
    m[1:4, 4:7] = 1            # side by side: one region
    m[6:9, 1:9] = 1
    m[7, 4] = 0                # a hole: still one region
    boxes = sorted(r.bbox for r in mask_regions(m, ignore_index=0))
    assert boxes == [(1, 1, 6, 3), (1, 6, 8, 3)]


def test_mask_regions_match_an_independent_reference():
    """Random blobby masks: regions == 8-connected components of each class's
    pixels (scipy), boxes and pixel areas: islands in holes are their own regions."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    for trial in range(15):
        noise = ndimage.gaussian_filter(rng.random((48, 64)), 1.5)
        m = np.digitize(noise, np.quantile(noise, [0.35, 0.6, 0.8])).astype(np.uint8)
        want = []
        for v in np.unique(m):
            b = m == v
            lab, n = ndimage.label(b, structure=np.ones((3, 3)))
            for k, sl in enumerate(ndimage.find_objects(lab), 1):
                ys, xs = sl
                area = int(np.count_nonzero(b[sl] & (lab[sl] == k)))
                want.append((int(v), (xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start), area))
        got = [(r.class_index, r.bbox, r.area) for r in mask_regions(m)]
        assert sorted(got) == sorted(want), trial


def write_mask(path: Path, m: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)
    return path


def test_mask_to_box_coco_output(tmp_path):
    masks = tmp_path / "masks"
    write_mask(masks / "a.png", constructed_mask())
    write_mask(masks / "b.tif", np.full((5, 6), 3, np.uint8))
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"0": "background", "1": "building", "2": "storage-tank",
                                   "3": "ship", "255": "void"}))
    out = tmp_path / "boxes.json"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in masks.iterdir()}
    res = mask_to_box(masks, classes, out, MaskOptions(ignore_index=255, min_area=2,
                                                       keep_background=True))
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in masks.iterdir()}
    assert before == after
    coco = json.loads(out.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["a.png", "b.tif"]
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(30, 20), (6, 5)]
    got = sorted((a["image_id"], a["category_id"], tuple(a["bbox"]), a["area"])
                 for a in coco["annotations"])
    # class 0 (background, kept on request) is the region around everything plus the
    # pixels in the ring's hole, a region of their own
    zero = int(np.count_nonzero(constructed_mask() == 0))
    hole = [((12, 12, 3, 3), 8)]
    want = ([(1, 0, (0, 0, 30, 20), zero - hole[0][1])] + [(1, 0, b, a) for b, a in hole]
            + [(1, c, b, a) for c, boxes in CONSTRUCTED_BOXES.items() for b, a in boxes if a >= 2]
            + [(2, 3, (0, 0, 6, 5), 30)])
    assert got == sorted(want)
    assert {c["id"]: c["name"] for c in coco["categories"]} == {
        0: "background", 1: "building", 2: "storage-tank", 3: "ship"}
    # under --min-area 2: the single pixel and the 1-px island in the ring's hole
    assert res.dropped_small == 2 and res.unknown_values == {7: 1}
    assert res.per_class == {"background": 2, "building": 2, "ship": 2, "storage-tank": 1}


def test_mask_to_box_ignore_background_and_chain_captions(tmp_path):
    masks = tmp_path / "masks"
    m = np.zeros((80, 100), np.uint8)
    m[35:45, 45:55] = 1                     # centre
    m[0:10, 0:10] = 1                       # corner
    write_mask(masks / "s.png", m)
    images = tmp_path / "images"
    write_image(images, "s.jpg")
    out, caps = tmp_path / "boxes.json", tmp_path / "caps.csv"
    res = mask_to_box(masks, {"1": "storage_tank"}, out,
                      MaskOptions(ignore_index=0, images_dir=str(images), captions=str(caps)))
    coco = json.loads(out.read_text())
    assert coco["images"][0]["file_name"] == "s.jpg"
    assert sorted(a["bbox"] for a in coco["annotations"]) == [[0, 0, 10, 10], [45, 35, 10, 10]]
    assert read_csv(caps) == {"images/s.jpg": [
        "There is a storage tank in the center of the image.",
        "There is a storage tank outside the center of the image.",
        "There are 2 storage tanks in the image.",
        "An aerial image with 2 storage tanks.",
        "A remote sensing image containing 2 storage tanks."]}
    assert res.captions.captions == 5


def test_mask_to_box_bad_input(tmp_path):
    masks = tmp_path / "masks"
    write_mask(masks / "a.png", np.zeros((4, 4), np.uint8))
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(UsageError, match="not valid JSON"):
        mask_to_box(masks, bad, tmp_path / "o.json")
    with pytest.raises(UsageError, match="classes file not found"):
        mask_to_box(masks, tmp_path / "none.json", tmp_path / "o.json")
    with pytest.raises(UsageError, match="masks not found"):
        mask_to_box(tmp_path / "nomasks", {"1": "a"}, tmp_path / "o.json")
    Image.new("RGB", (4, 4)).save(masks / "rgb.png")
    with pytest.raises(UsageError, match="not a single-band"):
        mask_to_box(masks, {"1": "a"}, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


# -------------------------------------------------------------------- CLI --
def test_cli_b2c(tmp_path, capsys):
    ann = make_dataset(tmp_path, "yolo")
    out = tmp_path / "c.csv"
    rc = cli_main(["convert", "b2c", "--annotations", str(ann), "--format", "yolo",
                   "--images", str(tmp_path / "images"), "--out", str(out), "--json"])
    cap = capsys.readouterr()
    assert rc == 0
    res = json.loads(cap.out)
    assert res["captions"] == 10 and res["empty"] == ["s3.png"]
    assert "s3.png" in cap.err and "no captions" in cap.err
    assert read_csv(out) == {f"images/{k}": v for k, v in EXPECTED[0].items()}
    # the same again is refused; --overwrite replaces
    assert cli_main(["convert", "b2c", "--annotations", str(ann), "--format", "yolo",
                     "--images", str(tmp_path / "images"), "--out", str(out)]) == 2
    assert cli_main(["convert", "b2c", "--annotations", str(ann), "--format", "yolo",
                     "--images", str(tmp_path / "images"), "--out", str(out), "--overwrite",
                     "--seed", "7"]) == 0
    assert read_csv(out) == {f"images/{k}": v for k, v in EXPECTED[7].items()}


def test_cli_m2b(tmp_path, capsys):
    masks = tmp_path / "masks"
    write_mask(masks / "a.png", constructed_mask())
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["background", "building", "tank", "ship"]))
    out = tmp_path / "b.json"
    rc = cli_main(["convert", "m2b", "--masks", str(masks), "--classes", str(classes),
                   "--out", str(out), "--min-area", "2", "--json"])
    cap = capsys.readouterr()
    assert rc == 0
    res = json.loads(cap.out)
    # the class named background is skipped without --ignore-index; the 1-px island
    # in the ring's hole and the single pixel fall under --min-area
    assert res["boxes"] == 4 and res["dropped_small"] == 2
    assert json.loads(out.read_text())["categories"][0]["name"] == "building"
    assert "not in the classes" in cap.err   # 7 and 255


@pytest.mark.parametrize("argv,match", [
    (["convert", "b2c", "--annotations", "MISSING.json", "--format", "coco", "--out", "o.csv"],
     "annotations not found"),
    (["convert", "b2c", "--annotations", "ANN", "--format", "kitti", "--out", "o.csv"],
     "unknown annotation format"),
    (["convert", "b2c", "--annotations", "BAD", "--format", "coco", "--out", "o.csv"],
     "not valid JSON"),
    (["convert", "b2c", "--annotations", "ANN", "--format", "coco", "--out", "o.txt"],
     "unknown caption file type"),
    (["convert", "m2b", "--masks", "MISSING", "--classes", "BAD", "--out", "b.json"],
     "not valid JSON"),
])
def test_cli_bad_input_exit_2_one_line(tmp_path, capsys, argv, match):
    ann = make_dataset(tmp_path, "coco")
    (tmp_path / "bad.json").write_text('{"images": [')
    subst = {"ANN": str(ann), "BAD": str(tmp_path / "bad.json"),
             "MISSING.json": str(tmp_path / "missing.json"), "MISSING": str(tmp_path / "missing"),
             "o.csv": str(tmp_path / "o.csv"), "o.txt": str(tmp_path / "o.txt"),
             "b.json": str(tmp_path / "b.json")}
    rc = cli_main([subst.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0]
    assert "Traceback" not in err
