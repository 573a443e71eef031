"""`python -m engine eval`: retrieval, zero-shot classification and RemoteCount, end to end
on tiny synthetic datasets made here, with the rigged model (red/blue answer their words)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapclip.engine.cli import main as cli_main
from tests.rigged import BLUE, GREY, RED


def _image(path, colour, size=(80, 64), seed=0):
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), GREY, np.uint8)
    arr[8:56, 16:64] = colour
    arr = np.clip(arr.astype(int) + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _run(capsys, argv):
    rc = cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_classify_folder_per_class_with_class_name_file(tmp_path, rig_folder, capsys):
    data = tmp_path / "scenes"
    for i in range(3):
        _image(data / "c1" / f"{i}.png", RED, seed=i)
        _image(data / "c2" / f"{i}.jpg", BLUE, seed=10 + i)
    names = tmp_path / "classes.txt"
    names.write_text("c1\tred roof\nc2\tblue pool\n")
    rc, out, _ = _run(capsys, ["eval", "classify", str(data), "--model", str(rig_folder),
                               "--classes", str(names), "--device", "cpu", "--json"])
    assert rc == 0
    res = json.loads(out)
    assert res["top1"] == 100.0 and res["classes"] == 2 and res["images"] == 6
    assert res["per_class_top1"] == {"red roof": 100.0, "blue pool": 100.0}
    assert res["templates"] == ["{}"]   # the rigged model's own default: raw
    # without the name file the folder names are meaningless to the model: chance or worse
    rc, out, _ = _run(capsys, ["eval", "classify", str(data), "--model", str(rig_folder),
                               "--device", "cpu", "--json"])
    assert json.loads(out)["top1"] < 100.0
    rc, _, err = _run(capsys, ["eval", "classify", str(tmp_path / "nope"), "--model", str(rig_folder)])
    assert rc == 2 and "does not exist" in err


def test_eval_retrieval_json_and_csv_with_repeated_captions(tmp_path, rig_folder, capsys):
    imgs = tmp_path / "images"
    entries = []
    for i, (colour, caps) in enumerate([(RED, ["red roof", "a red roof"]), (BLUE, ["blue pool", "a blue pool"]),
                                        (RED, ["red roof", "red roofs"])]):   # "red roof" repeats: a tie
        _image(imgs / f"{i}.png", colour, seed=i % 2)       # images 0 and 2 are the same picture
        entries.append({"filename": f"{i}.png", "split": "test", "sentences": [{"raw": c} for c in caps]})
    entries.append({"filename": "unused.png", "split": "train", "sentences": [{"raw": "x"}]})
    js = tmp_path / "dataset_rs.json"
    js.write_text(json.dumps({"images": entries}))
    rc, out, _ = _run(capsys, ["eval", "retrieval", str(js), "--images", str(imgs), "--model", str(rig_folder),
                               "--device", "cpu", "--json"])
    assert rc == 0
    order = json.loads(out)
    assert order["images"] == 3 and order["texts"] == 6 and order["distinct_captions"] == 5
    assert order["ties"] == "order"
    rc, out, _ = _run(capsys, ["eval", "retrieval", str(js), "--images", str(imgs), "--model", str(rig_folder),
                               "--device", "cpu", "--json", "--ties", "pessimistic"])
    pess = json.loads(out)
    # images 0 and 2 are identical and share a caption: ties, which the pessimistic rule counts as misses
    assert order["t2i_r1"] > pess["t2i_r1"] and order["i2t_r1"] > pess["i2t_r1"]
    assert order["i2t_r10"] == 100.0 and order["t2i_r10"] == 100.0
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text("filepath,caption\n" + "".join(
        f"images/{e['filename']},{s['raw']}\n" for e in entries[:3] for s in e["sentences"]))
    rc, out, _ = _run(capsys, ["eval", "retrieval", str(csv_path), "--model", str(rig_folder),
                               "--device", "cpu", "--json"])
    from_csv = json.loads(out)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "mean_recall"):
        assert from_csv[key] == pytest.approx(order[key]), key
    rc, out, _ = _run(capsys, ["eval", "retrieval", str(js), "--images", str(imgs), "--model", str(rig_folder),
                               "--device", "cpu"])
    assert "mean recall" in out and "ties: order" in out


def _count_data(tmp_path, truth):
    """A RemoteCount CSV (image,object,count) over red-square images, rows in ``truth``'s order."""
    rows = []
    for name, n in truth.items():
        _image(tmp_path / name, RED, seed=int(name[1]))
        rows.append(f"{name},red roof,{n}")
    data = tmp_path / "count.csv"
    data.write_text("image,object,count\n" + "\n".join(rows) + "\n")
    return data


def test_eval_count_remotecount_protocol(tmp_path, rig_folder, capsys):
    truth = {"c0.png": 1, "c1.png": 2, "c2.png": 3}      # what the file says, kept here
    data = _count_data(tmp_path, truth)
    rc, out, _ = _run(capsys, ["eval", "count", str(data), "--model", str(rig_folder), "--device", "cpu", "--json"])
    assert rc == 0
    res = json.loads(out)
    preds = {Path(p["image"]).name: p["predicted"] for p in res["predictions"]}
    assert res["images"] == 3 and set(preds) == set(truth) and all(1 <= p <= 10 for p in preds.values())
    # the truth each row reports is the file's, and the scores are from the file's truth
    assert {Path(p["image"]).name: p["count"] for p in res["predictions"]} == truth
    assert res["top1"] == pytest.approx(100 * np.mean([preds[k] == n for k, n in truth.items()]))
    assert res["mae"] == pytest.approx(np.mean([abs(preds[k] - n) for k, n in truth.items()]))
    bad = tmp_path / "bad.csv"
    bad.write_text("image,object,count\nc0.png,red roof,many\n")
    rc, _, err = _run(capsys, ["eval", "count", str(bad), "--model", str(rig_folder), "--device", "cpu"])
    assert rc == 2 and "integer count" in err


def test_eval_count_scores_known_predictions_against_the_file_by_hand(tmp_path, rig_folder, capsys,
                                                                       monkeypatch):
    """The model's answers are fixed (3, 2, 5 in the file's order), so MAE and top-1
    follow from the file alone: truth 1, 2, 3 -> errors 2, 0, 2 -> MAE 4/3;
    one of three exact -> top-1 33.3 %."""
    from mapclip.engine import count as ct
    data = _count_data(tmp_path, {"c2.png": 1, "c0.png": 2, "c1.png": 3})   # not in name order
    answers = iter((3, 2, 5))
    monkeypatch.setattr(ct, "argmax_count", lambda sims, counts=None, bias=None: (next(answers), None))
    rc, out, _ = _run(capsys, ["eval", "count", str(data), "--model", str(rig_folder), "--device", "cpu", "--json"])
    assert rc == 0
    res = json.loads(out)
    assert res["mae"] == pytest.approx(4 / 3)
    assert res["top1"] == pytest.approx(100 / 3)
    assert [(Path(p["image"]).name, p["count"], p["predicted"]) for p in res["predictions"]] == \
        [("c2.png", 1, 3), ("c0.png", 2, 2), ("c1.png", 3, 5)]
