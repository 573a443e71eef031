"""Caption dataset readers: CSV/TSV, JSONL, RSICD-style JSON; paths, merging, bad records."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mapclip.engine.data.captions import SkipReport, check_images, read_captions
from mapclip.engine.core.errors import UsageError


def _img(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((8, 8, 3), np.uint8)
    a[:] = colour
    Image.fromarray(a).save(path)
    return path


def _by_name(cs):
    return {os.path.basename(i.path): i for i in cs.items}


def test_csv_with_header_relative_paths_and_several_captions(tmp_path, monkeypatch):
    _img(tmp_path / "data" / "imgs" / "a.png")
    _img(tmp_path / "data" / "imgs" / "b.png")
    (tmp_path / "data" / "caps.csv").write_text(
        "filepath,caption,split\n"
        "imgs/a.png,a red roof,train\n"
        "imgs/a.png,  red   building ,train\n"
        "imgs/a.png,a red roof,train\n"          # duplicate caption: kept once
        "imgs/b.png,\"a field, green\",val\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)                  # relative to the file, not the cwd
    cs = read_captions(tmp_path / "data" / "caps.csv")
    items = _by_name(cs)
    assert items["a.png"].captions == ["a red roof", "red building"]
    assert items["a.png"].split == "train" and items["b.png"].split == "val"
    assert items["b.png"].captions == ["a field, green"]
    assert os.path.isabs(items["a.png"].path) and os.path.isfile(items["a.png"].path)
    assert cs.skipped.total == 0 and cs.n_captions == 3


def test_csv_caption_columns_and_headerless_tsv(tmp_path):
    _img(tmp_path / "x.png")
    _img(tmp_path / "y.png")
    (tmp_path / "wide.csv").write_text("image,caption_1,caption_2,caption_3\n"
                                       "x.png,one,two,\n", encoding="utf-8")
    cs = read_captions(tmp_path / "wide.csv")
    assert cs.items[0].captions == ["one", "two"]
    assert cs.skipped.counts["empty_caption"] == 1
    (tmp_path / "plain.tsv").write_text("x.png\ta plane\ny.png\ta ship\n", encoding="utf-8")
    cs = read_captions(tmp_path / "plain.tsv")
    assert {os.path.basename(i.path): i.captions for i in cs.items} == {
        "x.png": ["a plane"], "y.png": ["a ship"]}


def test_jsonl_caption_lists_and_raw_dicts(tmp_path):
    _img(tmp_path / "p" / "x.png")
    _img(tmp_path / "p" / "y.png")
    lines = [{"image": "p/x.png", "captions": ["a lake", {"raw": "blue water"}]},
             {"filepath": "p/y.png", "text": "a road"},
             "not an object",
             {"image": "p/zz.png", "caption": "missing"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n{broken\n",
                                      encoding="utf-8")
    cs = read_captions(tmp_path / "d.jsonl")
    items = _by_name(cs)
    assert items["x.png"].captions == ["a lake", "blue water"]
    assert items["y.png"].captions == ["a road"]
    assert cs.skipped.counts["bad_record"] == 2 and cs.skipped.counts["missing_image"] == 1
    assert any("zz.png" in e for e in cs.skipped.examples)


def test_rsicd_layout_with_splits_and_image_root(tmp_path):
    _img(tmp_path / "RSICD_images" / "airport_1.jpg")
    _img(tmp_path / "RSICD_images" / "beach_2.jpg")
    data = {"dataset": "rsicd", "images": [
        {"filename": "airport_1.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "many planes are parked.", "tokens": []},
                       {"raw": "an airport with runways."}, {"raw": "   "}]},
        {"filename": "beach_2.jpg", "imgid": 1, "split": "test",
         "sentences": [{"raw": "waves on a beach."}]},
        {"filename": "gone.jpg", "split": "val", "sentences": [{"raw": "x"}]}]}
    (tmp_path / "dataset_rsicd.json").write_text(json.dumps(data), encoding="utf-8")
    cs = read_captions(tmp_path / "dataset_rsicd.json", image_root=tmp_path / "RSICD_images")
    items = _by_name(cs)
    assert items["airport_1.jpg"].captions == ["many planes are parked.", "an airport with runways."]
    assert items["airport_1.jpg"].split == "train" and items["beach_2.jpg"].split == "test"
    assert cs.skipped.counts["empty_caption"] == 1 and cs.skipped.counts["missing_image"] == 1
    with pytest.raises(UsageError) as err:
        read_captions(tmp_path / "dataset_rsicd.json", image_root=tmp_path / "RSICD_images", strict=True)
    assert "empty caption" in err.value.message or "missing image" in err.value.message
    # without image_root the paths resolve against the JSON's folder: all missing
    cs = read_captions(tmp_path / "dataset_rsicd.json")
    assert not cs.items and cs.skipped.counts["missing_image"] == 3


def test_several_files_merge_and_bad_files_are_usage_errors(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "one.csv").write_text("a.png,first\n", encoding="utf-8")
    (tmp_path / "two.jsonl").write_text(json.dumps({"image": "a.png", "caption": "second"}) + "\n",
                                        encoding="utf-8")
    cs = read_captions([tmp_path / "one.csv", tmp_path / "two.jsonl"])
    assert len(cs.items) == 1 and cs.items[0].captions == ["first", "second"]
    with pytest.raises(UsageError, match="does not exist"):
        read_captions(tmp_path / "nope.csv")
    (tmp_path / "x.parquet").write_text("", encoding="utf-8")
    with pytest.raises(UsageError, match="unknown caption file type"):
        read_captions(tmp_path / "x.parquet")
    (tmp_path / "bad.json").write_text("{\"x\": 1}", encoding="utf-8")
    with pytest.raises(UsageError, match="no 'images' list"):
        read_captions(tmp_path / "bad.json")


def test_check_images_counts_unreadable_files(tmp_path):
    _img(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "c.csv").write_text("ok.png,fine\nbroken.png,broken\n", encoding="utf-8")
    cs = read_captions(tmp_path / "c.csv")
    assert len(cs.items) == 2
    keep = check_images(cs.items, cs.skipped)
    assert [os.path.basename(i.path) for i in keep] == ["ok.png"]
    assert cs.skipped.counts["unreadable_image"] == 1
    with pytest.raises(UsageError, match="unreadable image"):
        check_images(cs.items, SkipReport(), strict=True)
