"""Annotation readers: COCO, DOTA, YOLO and Pascal VOC into one in-memory form."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mapclip.engine.data.annotations import read_annotations
from mapclip.engine.core.errors import UsageError

# one scene in every format: image 100 x 80 px, boxes (x0, y0, x1, y1)
SCENE = [("plane", (40, 30, 60, 50)), ("storage-tank", (0, 0, 10, 10)),
         ("ship", (85, 65, 95, 75))]
W, H = 100, 80
CLASSES = ["plane", "ship", "storage-tank"]


def write_image(folder: Path, name: str, size=(W, H)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    Image.new("RGB", size, (10, 20, 30)).save(p)
    return p


def write_coco(path: Path, images) -> Path:
    """images: [(file_name, width, height, [(cls, box)])]"""
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    ids = {n: i + 1 for i, n in enumerate(CLASSES)}
    data = {"images": [], "annotations": [], "categories": cats}
    for k, (name, w, h, objs) in enumerate(images, 1):
        data["images"].append({"id": k, "file_name": name, "width": w, "height": h})
        for cls, (x0, y0, x1, y1) in objs:
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": k,
                                        "category_id": ids[cls],
                                        "bbox": [x0, y0, x1 - x0, y1 - y0]})
    path.write_text(json.dumps(data))
    return path


def dota_lines(objs, difficult=()) -> str:
    lines = ["imagesource:GoogleEarth", "gsd:0.5"]
    for i, (cls, (x0, y0, x1, y1)) in enumerate(objs):
        lines.append(f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1} {cls} {1 if i in difficult else 0}")
    return "\n".join(lines) + "\n"


def yolo_lines(objs, w=W, h=H) -> str:
    out = []
    for cls, (x0, y0, x1, y1) in objs:
        out.append(f"{CLASSES.index(cls)} {(x0 + x1) / 2 / w} {(y0 + y1) / 2 / h} "
                   f"{(x1 - x0) / w} {(y1 - y0) / h}")
    return "\n".join(out) + "\n"


def voc_xml(name, objs, w=W, h=H, difficult=()) -> str:
    parts = [f"<annotation><filename>{name}</filename>"
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
    for i, (cls, (x0, y0, x1, y1)) in enumerate(objs):
        parts.append(f"<object><name>{cls}</name><difficult>{1 if i in difficult else 0}"
                     f"</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                     f"<ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def boxes_of(aset):
    return {im.name: sorted((o.category, tuple(round(v, 6) for v in o.bbox)) for o in im.objects)
            for im in aset.images}


EXPECTED = sorted((c, tuple(float(v) for v in b)) for c, b in SCENE)


def test_coco(tmp_path):
    ann = write_coco(tmp_path / "ann.json", [("a.png", W, H, SCENE), ("empty.png", W, H, [])])
    aset = read_annotations(ann, "coco")
    assert boxes_of(aset) == {"a.png": EXPECTED, "empty.png": []}
    assert (aset.images[0].width, aset.images[0].height) == (W, H)
    assert aset.images[0].path == str(tmp_path / "a.png")  # resolved against the JSON's folder
    assert aset.categories == sorted(CLASSES)


def test_dota_folder_with_header_difficult_and_image_sizes(tmp_path):
    labels = tmp_path / "labelTxt"
    labels.mkdir()
    (labels / "a.txt").write_text(dota_lines(SCENE, difficult={2}))
    images = tmp_path / "images"
    write_image(images, "a.png")
    write_image(images, "unlabelled.png", (50, 40))
    aset = read_annotations(labels, "dota", images)
    assert boxes_of(aset) == {"a.png": EXPECTED, "unlabelled.png": []}
    a = aset.images[0]
    assert (a.width, a.height) == (W, H)
    assert [o.difficult for o in a.objects] == [False, False, True]
    assert (aset.images[1].width, aset.images[1].height) == (50, 40)


def test_dota_rotated_box_takes_corner_extent(tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("10 20 30 10 40 30 20 40 ship 0\n")
    aset = read_annotations(f, "dota", resolve=False)
    assert aset.images[0].objects[0].bbox == (10.0, 10.0, 40.0, 40.0)
    assert aset.images[0].name == "r.png"


def test_dota_without_size_is_a_clear_error(tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("10 20 30 10 40 30 20 40 ship 0\n")
    with pytest.raises(UsageError, match="no size for image 'r.png'") as exc:
        read_annotations(f, "dota")
    assert "--images" in exc.value.hint


def test_yolo_classes_txt_and_pixel_boxes(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (labels / "a.txt").write_text(yolo_lines(SCENE))
    images = tmp_path / "images"
    write_image(images, "a.jpg")
    aset = read_annotations(labels, "yolo", images)
    assert boxes_of(aset) == {"a.jpg": EXPECTED}
    assert aset.images[0].path == str(images / "a.jpg")


def test_yolo_names_from_data_yaml_map_and_polygon_lines(tmp_path):
    (tmp_path / "data.yaml").write_text("path: .\nnames:\n  0: plane\n  1: ship\n  2: storage-tank\n")
    labels = tmp_path / "labels"
    labels.mkdir()
    # an OBB / segmentation line: class then polygon points
    (labels / "a.txt").write_text("1 0.1 0.25 0.3 0.125 0.4 0.375 0.2 0.5\n")
    images = tmp_path / "images"
    write_image(images, "a.png")
    aset = read_annotations(labels, "yolo", images)
    assert boxes_of(aset) == {"a.png": [("ship", (10.0, 10.0, 40.0, 40.0))]}


def test_yolo_needs_image_sizes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UsageError, match="no size for image") as exc:
        read_annotations(f, "yolo")
    assert "--images" in exc.value.hint


def test_voc(tmp_path):
    (tmp_path / "a.xml").write_text(voc_xml("a.jpg", SCENE, difficult={0}))
    (tmp_path / "b.xml").write_text(voc_xml("b.jpg", []))
    aset = read_annotations(tmp_path, "voc")
    assert boxes_of(aset) == {"a.jpg": EXPECTED, "b.jpg": []}
    assert aset.images[0].objects[0].difficult is True


@pytest.mark.parametrize("fmt,content,match", [
    ("coco", "{not json", "not valid JSON"),
    ("coco", '{"foo": 1}', "no 'images' list"),
    ("voc", "<annotation><object>", "not valid XML"),
    ("dota", "1 2 3 4 plane\n", "expected 8 coordinates"),
    ("yolo", "0 0.5 x 0.1 0.1\n", "not a number"),
])
def test_bad_files_are_usage_errors(tmp_path, fmt, content, match):
    suffix = {"coco": ".json", "voc": ".xml"}.get(fmt, ".txt")
    f = tmp_path / f"bad{suffix}"
    f.write_text(content)
    with pytest.raises(UsageError, match=match):
        read_annotations(f, fmt, resolve=False)


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(UsageError, match="unknown annotation format"):
        read_annotations(tmp_path, "kitti")
    with pytest.raises(UsageError, match="annotations not found"):
        read_annotations(tmp_path / "nope.json", "coco")
