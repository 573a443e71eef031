"""Reliability: bad files, bad options, read-only outputs, outputs that are inputs,
kill -9 and resume, symlinks, huge declared rasters, damaged indexes and
malformed annotations, each through the real command line in a child process.

For every refused case the contract is: the exit code, exactly one ``error:``
and one ``fix:`` line, no traceback, no output (nor temporary file) left, and
every input byte-identical. The children are started together in a thread
pool (they mostly wait on imports), with tiny rasters and the rigged model.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.raster_fixtures import make_raster, noise
from tests.rigged import RED, RED_PROMPT, save_rigged_folder

ROOT = Path(__file__).resolve().parents[2]
#: a child's own peak resident memory (VmHWM) is printed on stderr at exit
PEAK_WRAPPER = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('PEAK_KB ' + line.split()[1] + '\\n')\n"
    "atexit.register(_peak)\n"
    "from mapclip.engine.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")
#: peak memory a refused huge-raster run may reach (torch and the model included)
PEAK_LIMIT_KB = 1_400_000
HUGE = 1_000_000
#: batches a streaming index of the huge raster reads before it is stopped
HUGE_BATCHES = 200


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MAPCLIP_CACHE"] = str(tmp / "cache")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _popen(args, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Run:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out = rc, out
        lines = err.splitlines()
        self.peak_kb = next((int(ln.split()[1]) for ln in lines if ln.startswith("PEAK_KB")), 0)
        self.err = "\n".join(ln for ln in lines if not ln.startswith("PEAK_KB"))

    def refused(self, code: int, *words: str) -> None:
        errors = [ln for ln in self.err.splitlines() if ln.startswith("error:")]
        fixes = [ln for ln in self.err.splitlines() if ln.strip().startswith("fix:")]
        assert self.rc == code, (self.rc, self.err)
        assert len(errors) == 1 and len(fixes) == 1, self.err
        assert "Traceback" not in self.err, self.err
        for w in words:
            assert w in errors[0], (w, errors[0])


def _cli(args, cwd: Path, env: dict, timeout: float = 240) -> Run:
    p = _popen(args, cwd, env)
    out, err = p.communicate(timeout=timeout)
    return Run(p.returncode, out, err)


def _digest(folder: Path) -> dict:
    """Every file under ``folder`` (links as their targets' names) -> sha256."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _readonly_dir(tmp: Path) -> Path:
    """A folder no file can be created in: chmod 555, or (as root, who ignores
    modes) a path below /proc/self, which refuses new files to everyone."""
    d = tmp / "readonly"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").touch()
    except OSError:
        return d
    (d / "probe").unlink()
    d.chmod(0o755)
    return Path("/proc/self/mapclip-readonly")


def _huge_vrt(path: Path, small: Path) -> Path:
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{c}</ColorInterp><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{small}</SourceFilename><SourceBand>{b}</SourceBand>'
        '<SrcRect xOff="0" yOff="0" xSize="64" ySize="64"/><DstRect xOff="0" yOff="0" '
        'xSize="64" ySize="64"/></SimpleSource></VRTRasterBand>'
        for b, c in ((1, "Red"), (2, "Green"), (3, "Blue")))
    path.write_text(f'<VRTDataset rasterXSize="{HUGE}" rasterYSize="{HUGE}"><SRS>EPSG:32633</SRS>'
                    '<GeoTransform>500000, 0.5, 0, 4000000, 0, -0.5</GeoTransform>'
                    f'{bands}</VRTDataset>')
    return path


def _image(path: Path, seed: int, flip: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    a = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a[::-1] if flip else a).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs for every family, and their digests before anything runs."""
    tmp = tmp_path_factory.mktemp("reliability")
    data = noise(3, 96, 128, seed=3)
    data[:, 40:70, 60:100] = np.array(RED, np.uint8)[:, None, None]
    w = {"tmp": tmp, "env": _env(tmp)}
    (tmp / "in").mkdir()
    w["raster"] = make_raster(tmp / "in" / "scene.tif", width=128, height=96, data=data)
    (tmp / "in" / "notraster.tif").write_bytes(b"not a raster at all" * 10)
    w["model"] = save_rigged_folder(tmp / "models" / "rigged")
    _huge_vrt(tmp / "in" / "huge.vrt", w["raster"])
    # annotations and masks
    ann = tmp / "in" / "ann"
    _image(ann / "images" / "a.png", 1)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 48, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 1, "name": "ship"}]}
    (ann / "missing_cat.json").write_text(json.dumps(coco))
    coco["annotations"][0].update(category_id=1, bbox=[1, 1, -4, 5])
    (ann / "negative.json").write_text(json.dumps(coco))
    coco["annotations"][0].update(bbox=[900, 900, 5, 5])
    (ann / "outside.json").write_text(json.dumps(coco))
    coco["categories"][0]["name"] = ""
    coco["annotations"][0].update(bbox=[1, 1, 5, 5])
    (ann / "empty_name.json").write_text(json.dumps(coco))
    for name, line in (("range", "0 1.5 0.5 0.2 0.2"), ("nan", "0 nan 0.5 0.2 0.2"),
                       ("frac", "0.7 0.5 0.5 0.2 0.2"), ("size", "0 0.5 0.5 -0.2 0.2")):
        (ann / "yolo" / name).mkdir(parents=True)
        (ann / "yolo" / name / "a.txt").write_text(line + "\n")
    masks = tmp / "in" / "masks"
    masks.mkdir()
    Image.fromarray(np.pad(np.ones((8, 8), np.uint8), 28)).save(masks / "a.png")
    (masks / "classes.json").write_text(json.dumps({"0": "background", "1": "building"}))
    (tmp / "in" / "bare_classes.json").write_text(json.dumps("building"))
    # dedup: an image and a symlink to it; a folder and a symlink to the folder
    _image(tmp / "in" / "s1" / "z.png", 7)
    os.symlink("z.png", tmp / "in" / "s1" / "0link.png")
    _image(tmp / "in" / "s2" / "a.png", 8)
    _image(tmp / "in" / "s2" / "b.png", 9)
    os.symlink("s2", tmp / "in" / "s2link")
    (tmp / "in" / "random.pt").write_bytes(np.random.default_rng(4).bytes(4096))
    # records that would be read silently wrong: ids shared, a quote left open, a null
    # sentence, a sentence as a string, a Latin-1 CSV, counts outside RemoteCount's 1..10
    two = {"images": [{"id": 1, "file_name": "a.png", "width": 48, "height": 48},
                      {"id": 1, "file_name": "b.png", "width": 48, "height": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
           "categories": [{"id": 1, "name": "ship"}]}
    (ann / "same_image_id.json").write_text(json.dumps(two))
    two["images"].pop()
    two["categories"].append({"id": 1, "name": "tank"})
    (ann / "same_category_id.json").write_text(json.dumps(two))
    (tmp / "in" / "open_quote.csv").write_text('ships in a harbour\n"oil tanks by a road\n'
                                               'a river\nbare land\n')
    ev = tmp / "in" / "eval"
    _image(ev / "a.png", 1)
    for name, images in (("ints", [1, 2, 3]), ("no_filename", [{"sentences": [{"raw": "x"}]}]),
                         ("null_sentence", [{"filename": "a.png", "split": "test",
                                             "sentences": [{"raw": None}]}]),
                         ("string_sentences", [{"filename": "a.png", "split": "test",
                                                "sentences": "a ship"}])):
        (ev / f"{name}.json").write_text(json.dumps({"images": images}))
    (ev / "latin1.csv").write_bytes("filepath,caption\na.png,un caf\xe9\n".encode("latin-1"))
    for n in (0, 57, -3):
        (ev / f"count{n}.csv").write_text(f"image,object,count\na.png,car,3\na.png,car,{n}\n")
    w["ro"] = _readonly_dir(tmp)
    w["digest"] = _digest(tmp / "in")
    return w


def _outs(tmp: Path) -> Path:
    d = tmp / f"out-{random.random():.9f}"
    d.mkdir()
    return d


def _assert_empty(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert left == [], left


# refused cases: (name, argv with placeholders, exit code, words in the error line)
CASES = [
    ("bad_file", ["detect", "{in}/notraster.tif", "--prompt", "x", "--model", "{model}",
                  "--out", "{out}/b.gpkg"], 2, ["cannot open"]),
    ("heatmap_is_input", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                          "--out", "{out}/b.gpkg", "--heatmap", "{in}/scene.tif", "--overwrite"],
     2, ["also an input"]),
    ("heatmap_is_vrt_source", ["detect", "{in}/huge.vrt", "--prompt", "x", "--model", "{model}",
                               "--out", "{out}/b.gpkg", "--heatmap", "{in}/scene.tif",
                               "--overwrite"], 2, ["also an input"]),
    ("m2b_out_is_classes", ["convert", "m2b", "--masks", "{in}/masks", "--classes",
                            "{in}/masks/classes.json", "--out", "{in}/masks/classes.json",
                            "--overwrite"], 2, ["also an input"]),
    ("readonly_detect", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                         "--out", "{ro}/b.gpkg"], 2, ["cannot write"]),
    ("readonly_heatmap", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                          "--out", "{out}/b.gpkg", "--heatmap", "{ro}/h.tif"], 2, ["cannot write"]),
    ("readonly_count", ["count", "{in}/scene.tif", "--object", "x", "--model", "{model}",
                        "--method", "dense", "--out", "{ro}/c.gpkg"], 2, ["cannot write"]),
    ("readonly_index", ["index", "{in}/scene.tif", "--model", "{model}", "--out", "{ro}/idx"],
     2, ["cannot write"]),
    ("readonly_dedup", ["dedup", "{in}/s2", "--out", "{ro}/r.csv", "--no-cache"], 2,
     ["cannot write"]),
    ("readonly_m2b_captions", ["convert", "m2b", "--masks", "{in}/masks", "--classes",
                               "{in}/masks/classes.json", "--out", "{out}/b.json",
                               "--captions", "{ro}/c.csv"], 2, ["cannot write"]),
    ("readonly_finetune", ["finetune", "--model", "{model}", "--data", "{in}/ann/negative.json",
                           "--out", "{ro}/run"], 2, ["cannot write"]),
    ("bad_option_iou", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                        "--out", "{out}/b.gpkg", "--iou", "2"], 2, ["iou"]),
    ("bad_option_tile", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                         "--out", "{out}/b.gpkg", "--tile", "0"], 2, []),
    ("bad_option_background", ["detect", "{in}/scene.tif", "--prompt", "x", "--model",
                               "{model}", "--out", "{out}/b.gpkg", "--background", ""], 2,
     ["background"]),
    ("bad_option_negative_weight", ["search", "{in}", "--text", "x", "--negative", "y",
                                    "--negative-weight", "nan"], 2, ["negative"]),
    ("bad_option_gsd", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                        "--out", "{out}/b.gpkg", "--gsd", "0"], 2, ["gsd"]),
    ("bad_option_index_tile", ["index", "{in}/scene.tif", "--model", "{model}", "--out",
                               "{out}/idx", "--tile", "0"], 2, ["tile"]),
    ("bad_option_dense_tile", ["count", "{in}/scene.tif", "--object", "x", "--model", "{model}",
                               "--method", "dense", "--dense-tile", "0"], 2, ["dense-tile"]),
    ("huge_detect", ["detect", "{in}/huge.vrt", "--prompt", "x", "--model", "{model}",
                     "--out", "{out}/b.gpkg"], 2, ["tiles"]),
    ("huge_count", ["count", "{in}/huge.vrt", "--object", "x", "--model", "{model}"], 2,
     ["too large"]),
    ("huge_tile", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                   "--out", "{out}/b.gpkg", "--tile", "100000", "--window", "1", "--gsd", "0.001"],
     2, ["tile"]),
    ("coco_missing_category", ["convert", "b2c", "--annotations", "{in}/ann/missing_cat.json",
                               "--format", "coco", "--out", "{out}/c.csv"], 2, ["category_id 99"]),
    ("coco_negative_box", ["convert", "b2c", "--annotations", "{in}/ann/negative.json",
                           "--format", "coco", "--out", "{out}/c.csv"], 2, ["no area"]),
    ("coco_outside_box", ["convert", "b2c", "--annotations", "{in}/ann/outside.json",
                          "--format", "coco", "--out", "{out}/c.csv"], 2, ["outside"]),
    ("coco_empty_name", ["convert", "b2c", "--annotations", "{in}/ann/empty_name.json",
                         "--format", "coco", "--out", "{out}/c.csv"], 2, ["no name"]),
    ("yolo_range", ["convert", "b2c", "--annotations", "{in}/ann/yolo/range", "--format", "yolo",
                    "--images", "{in}/ann/images", "--out", "{out}/c.csv"], 2, ["outside 0..1"]),
    ("yolo_nan", ["convert", "b2c", "--annotations", "{in}/ann/yolo/nan", "--format", "yolo",
                  "--images", "{in}/ann/images", "--out", "{out}/c.csv"], 2, ["finite"]),
    ("yolo_fraction_class", ["convert", "b2c", "--annotations", "{in}/ann/yolo/frac", "--format",
                             "yolo", "--images", "{in}/ann/images", "--out", "{out}/c.csv"], 2,
     ["class index"]),
    ("yolo_negative_size", ["convert", "b2c", "--annotations", "{in}/ann/yolo/size", "--format",
                            "yolo", "--images", "{in}/ann/images", "--out", "{out}/c.csv"], 2,
     ["positive"]),
    ("m2b_bare_string_classes", ["convert", "m2b", "--masks", "{in}/masks", "--classes",
                                 "{in}/bare_classes.json", "--out", "{out}/b.json"], 2,
     ["classes must map"]),
    ("m2b_mask_size", ["convert", "m2b", "--masks", "{in}/masks", "--classes",
                       "{in}/masks/classes.json", "--images", "{in}/ann/images",
                       "--out", "{out}/b.json"], 2, ["64 x 64"]),
    ("dedup_quarantine_inside", ["dedup", "{in}/s2", "--out", "{out}/r.csv", "--move-to",
                                 "{in}/s2/q", "--no-cache"], 2, ["overlaps"]),
    ("dedup_quarantine_parent", ["dedup", "{in}/s2", "--out", "{out}/r.csv", "--move-to",
                                 "{in}", "--no-cache"], 2, ["overlaps"]),
    ("dedup_cache_is_report", ["dedup", "{in}/s2", "--out", "{out}/r.csv", "--cache",
                               "{out}/r.csv"], 2, ["same file"]),
    ("dedup_cache_is_an_image", ["dedup", "{in}/s2", "--out", "{out}/r.csv", "--cache",
                                 "{in}/s2/a.png"], 2, ["input"]),
    ("read_workers_too_many", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                               "--out", "{out}/b.gpkg", "--read-workers", "1000"], 2,
     ["--read-workers 1000", "more than"]),
    ("random_bytes_checkpoint", ["detect", "{in}/scene.tif", "--prompt", "x", "--model",
                                 "mapclip-tiny:{in}/random.pt", "--out", "{out}/b.gpkg"], 2,
     ["is not a checkpoint"]),
    ("background_is_the_prompt", ["detect", "{in}/scene.tif", "--prompt", "tanks", "--model",
                                  "{model}", "--out", "{out}/b.gpkg", "--background", " Tanks "], 2,
     ["--background", "'Tanks'", "is also a prompt"]),
    ("coco_images_share_an_id", ["convert", "b2c", "--annotations", "{in}/ann/same_image_id.json",
                                 "--format", "coco", "--out", "{out}/c.csv"], 2,
     ["two images share id 1", "a.png", "b.png"]),
    ("coco_categories_share_an_id", ["convert", "b2c", "--annotations",
                                     "{in}/ann/same_category_id.json", "--format", "coco",
                                     "--out", "{out}/c.csv"], 2,
     ["two categories share id 1", "ship", "tank"]),
    ("caption_bank_open_quote", ["caption", "{in}/scene.tif", "--model", "{model}", "--bank",
                                 "{in}/open_quote.csv"], 2, ["line 2", "quote"]),
    ("eval_images_not_objects", ["eval", "retrieval", "{in}/eval/ints.json", "--model", "{model}"],
     2, ["images[0] is int 1"]),
    ("eval_image_without_filename", ["eval", "retrieval", "{in}/eval/no_filename.json", "--model",
                                     "{model}"], 2, ["images[0] has no filename"]),
    ("eval_null_sentence", ["eval", "retrieval", "{in}/eval/null_sentence.json", "--model",
                            "{model}"], 2, ["sentences[0]", "NoneType", "not a caption"]),
    ("eval_sentences_a_string", ["eval", "retrieval", "{in}/eval/string_sentences.json",
                                 "--model", "{model}"], 2, ["'sentences' is str, not a list"]),
    ("eval_latin1_csv", ["eval", "retrieval", "{in}/eval/latin1.csv", "--model", "{model}"], 2,
     ["not UTF-8"]),
    ("eval_count_0", ["eval", "count", "{in}/eval/count0.csv", "--model", "{model}"], 2,
     ["line 3", "count 0", "1 to 10"]),
    ("eval_count_57", ["eval", "count", "{in}/eval/count57.csv", "--model", "{model}"], 2,
     ["line 3", "count 57"]),
    ("eval_count_negative", ["eval", "count", "{in}/eval/count-3.csv", "--model", "{model}"], 2,
     ["line 3", "count -3"]),
    ("huge_dense_input", ["detect", "{in}/scene.tif", "--prompt", "x", "--model", "{model}",
                          "--out", "{out}/b.gpkg", "--mode", "dense", "--dense-input", "8192"], 2,
     ["--dense-input 8192 px", "GB for each tile"]),
    ("dedup_against_itself", ["dedup", "{in}/s2", "--against", "{in}/s2link", "--out",
                              "{out}/r.csv", "--no-cache"], 2, ["overlaps"]),
]


@pytest.fixture(scope="module")
def refused_runs(world):
    """All refused cases, run in parallel; name -> (Run, output folder)."""
    tmp = world["tmp"]
    jobs = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, argv, _, _ in CASES:
            out = _outs(tmp)
            args = [a.format(**{"in": tmp / "in", "model": world["model"], "out": out,
                                "ro": world["ro"]}) for a in argv]
            jobs[name] = (pool.submit(_cli, args, tmp, world["env"]), out)
        return {name: (f.result(), out) for name, (f, out) in jobs.items()}


@pytest.mark.parametrize("name,code,words", [(c[0], c[2], c[3]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_refused_cleanly(world, refused_runs, name, code, words):
    run, out = refused_runs[name]
    run.refused(code, *words)
    _assert_empty(out)
    assert _digest(world["tmp"] / "in") == world["digest"]
    if name.startswith("huge"):
        assert 0 < run.peak_kb < PEAK_LIMIT_KB, run.peak_kb


def test_huge_raster_index_streams_in_bounded_memory(world, tmp_path):
    """The index streams any size: after HUGE_BATCHES batches of a 10^6 x 10^6 px raster
    its peak memory is still bounded, and a SIGTERM there (the named fault point
    read.batch, core/faults.py) stops it like Ctrl-C, keeping the shards committed so far."""
    env = dict(world["env"], MAPCLIP_FAULT=f"read.batch:{HUGE_BATCHES}:term")
    run = _cli(["index", world["tmp"] / "in" / "huge.vrt", "--model", world["model"],
                "--out", tmp_path / "idx", "--commit-tiles", "64"], world["tmp"], env)
    assert run.rc == 130 and "Traceback" not in run.err, run.err
    assert "interrupt" in run.err or "cancel" in run.err, run.err
    assert 0 < run.peak_kb < PEAK_LIMIT_KB, run.peak_kb
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert not m["rasters"][0]["complete"]         # stopped mid-raster, its progress kept
    assert 0 < sum(int(v) for v in m["rasters"][0]["progress"].values())


def test_symlinks_never_move_a_kept_image_or_pair_an_image_with_itself(world, tmp_path):
    src = tmp_path / "data"
    import shutil
    shutil.copytree(world["tmp"] / "in" / "s1", src / "s1", symlinks=True)
    shutil.copytree(world["tmp"] / "in" / "s2", src / "s2", symlinks=True)
    os.symlink("s2", src / "s2link")
    before = _digest(src)
    env = world["env"]
    r1 = _cli(["dedup", src / "s1", "--out", tmp_path / "r1.csv", "--move-to", tmp_path / "q1",
               "--no-cache", "--json"], tmp_path, env)
    r2 = _cli(["dedup", src / "s2", src / "s2link", "--out", tmp_path / "r2.csv", "--move-to",
               tmp_path / "q2", "--no-cache", "--json"], tmp_path, env)
    assert r1.rc == 0 and r2.rc == 0, (r1.err, r2.err)
    one, two = json.loads(r1.out), json.loads(r2.out)
    assert one["images"] == 1 and one["move"]["moved"] == 0
    assert two["images"] == 2 and two["pairs"] == 0 and two["move"]["moved"] == 0
    assert _digest(src) == before


def test_kill_during_cross_filesystem_move_then_rerun_and_undo_restore_everything(world, tmp_path):
    """Moves to another filesystem are copy-verify-then-delete. Killed (kill -9) with
    its 4th copy written but not yet verified (the named fault point dedup.copy,
    core/faults.py): 3 files moved, the 4th still in place beside its partial copy.
    The move run again moves only the 4 left, removes that copy and ends as an
    uninterrupted move ends; undoing both manifests puts every file back byte-identical."""
    shm = Path("/dev/shm")
    cross = shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev
    if not cross:
        shm = tmp_path / "same-fs"   # still exercises the journal and the verification
    data = tmp_path / "data"
    data.mkdir()
    big = (np.random.default_rng(1).random((300, 300, 3)) * 255).astype(np.uint8)
    for k in range(8):
        Image.fromarray(big).save(data / f"{k}.png")          # 7 duplicates of one image
    before = _digest(data)
    q = shm / f"mapclip-q-{os.getpid()}-{random.randrange(10**9)}"
    env = world["env"]
    move = ["dedup", data, "--out", tmp_path / "r.csv", "--move-to", q, "--no-cache", "--json",
            "--overwrite"]
    try:
        # on one filesystem a move is a rename: stop after the 3rd instead
        fault = "dedup.copy:4:kill" if cross else "dedup.moved:3:kill"
        killed = _cli(move, tmp_path, dict(env, MAPCLIP_FAULT=fault))
        assert killed.rc == -9, killed.err
        quarantined = sorted(x for x in q.rglob("*.png") if x.is_file())
        parts = [x for x in q.rglob("*") if x.name.endswith(".part")]
        assert len(quarantined) == 3 and len(list(data.glob("*.png"))) == 5
        assert len(parts) == (1 if cross else 0), parts
        first = _cli(move, tmp_path, env)                   # the same move again
        assert first.rc == 0, first.err
        res = json.loads(first.out)["move"]
        assert res["moved"] == 4 and res["removed_partial"] == [str(x) for x in parts]
        assert len(list(data.glob("*.png"))) == 1          # as an uninterrupted move leaves it
        assert len([x for x in q.rglob("*.png") if x.is_file()]) == 7
        for manifest in sorted(q.glob("manifest-*.json"), reverse=True):
            undo = _cli(["dedup", "--undo", manifest], tmp_path, env)
            assert undo.rc == 0, undo.err
        assert _digest(data) == before
        assert not [x for x in [*data.rglob("*"), *q.rglob("*")] if ".part" in x.name]
    finally:
        import shutil
        shutil.rmtree(q, ignore_errors=True)


def test_undo_refuses_a_quarantined_file_that_is_not_the_one_moved(tmp_path):
    from mapclip.engine.dedup import duplicates as dedup, quarantine
    from mapclip.engine.core.errors import UsageError
    data = tmp_path / "data"
    for k in range(3):
        _image(data / f"{k}.png", 5)
    res = dedup.find_duplicates([data], tmp_path / "r.csv",
                                options=dedup.DedupOptions(cache=None))
    moved = quarantine.move_duplicates(res, tmp_path / "q")
    assert moved.moved == 2
    m = json.loads(Path(moved.manifest).read_text())
    victim = Path(m["moves"][0]["to"])
    victim.write_bytes(victim.read_bytes()[:100])           # a truncated copy
    with pytest.raises(UsageError, match="not the file that was moved"):
        quarantine.undo_move(moved.manifest)
    assert victim.exists() and not Path(m["moves"][1]["from"]).exists()   # nothing moved


def test_safe_move_across_filesystems_verifies_before_deleting(tmp_path, monkeypatch):
    import errno as _errno
    from mapclip.engine.dedup import quarantine as dedup
    from mapclip.engine.core.errors import UsageError
    src = _image(tmp_path / "a.png", 3)
    body = src.read_bytes()
    real_rename = os.rename

    def exdev(a, b):
        raise OSError(_errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(dedup.os, "rename", exdev)
    with pytest.raises(UsageError, match="does not match"):
        dedup.safe_move(src, tmp_path / "q" / "a.png", size=len(body), sha="0" * 64)
    assert src.read_bytes() == body and not list((tmp_path / "q").iterdir())
    dedup.safe_move(src, tmp_path / "q" / "a.png", size=len(body),
                    sha=hashlib.sha256(body).hexdigest())
    assert not src.exists() and (tmp_path / "q" / "a.png").read_bytes() == body
    monkeypatch.setattr(dedup.os, "rename", real_rename)


def _boxes(path: Path):
    import pyogrio.raw
    meta, _, geom, fields = pyogrio.raw.read(str(path))
    return [bytes(g) for g in geom], [list(map(str, f)) for f in fields]


def test_kill_9_then_rerun_or_resume_equals_uninterrupted(world, tmp_path, capsys, monkeypatch,
                                                           one_torch_thread):
    """detect killed (SIGKILL) with an output complete under its temporary name, and
    index killed after its second shard commit (named fault points, core/faults.py):
    detect run again removes the temporary file and gives the uninterrupted run's
    boxes; the index resumes after the killed run's commits, embeds only the rest,
    and equals the uninterrupted index, row for row."""
    from mapclip.engine.archive.store import Index
    env = world["env"]
    detect = ["detect", world["raster"], "--prompt", RED_PROMPT, "--model", world["model"],
              "--tile", "32", "--window", "2", "--heatmap", "{d}/h.tif", "--out", "{d}/b.gpkg"]
    index = ["index", world["raster"], "--model", world["model"], "--tile", "16",
             "--commit-tiles", "5", "--batch-size", "4", "--out", "{d}/idx", "--json"]
    dirs = {k: tmp_path / k for k in ("ref", "killed")}
    for d in dirs.values():
        d.mkdir()
    fill = lambda argv, d: [str(a).format(d=d) for a in argv]   # noqa: E731
    faults = {"detect": "output.rename:1:kill", "index": "index.commit:2:kill"}
    with ThreadPoolExecutor(4) as pool:
        victims = [pool.submit(_cli, fill(argv, dirs["killed"]), tmp_path,
                               dict(env, MAPCLIP_FAULT=faults[argv[0]])) for argv in (detect, index)]
        # the uninterrupted runs meanwhile, through the same command line in this process
        monkeypatch.setenv("MAPCLIP_CACHE", env["MAPCLIP_CACHE"])
        monkeypatch.chdir(tmp_path)
        refs = [_main(fill(argv, dirs["ref"]), capsys) for argv in (detect, index)]
        assert [r.rc for r in refs] == [0, 0], [r.err for r in refs]
        assert [f.result().rc for f in victims] == [-9, -9], [f.result().err for f in victims]
        killed = dirs["killed"]
        # detect died with one output written under its temporary name, none in place
        left = sorted(p.name for p in killed.iterdir() if p.name != "idx")
        assert len(left) == 1 and left[0].endswith(".part"), left
        # the index died after two commits: some rows on disk, not all
        m = json.loads((killed / "idx" / "manifest.json").read_text())
        committed = sum(int(s["rows"]) for s in m["shards"])
        assert len(m["shards"]) == 2 and 0 < committed and not m["rasters"][0]["complete"]
        again = [pool.submit(_cli, fill(detect, killed) + ["--overwrite"], tmp_path, env),
                 pool.submit(_cli, fill(index, killed), tmp_path, env)]
        assert all(f.result().rc == 0 for f in again), [f.result().err for f in again]
    ref = dirs["ref"]
    assert _boxes(killed / "b.gpkg") == _boxes(ref / "b.gpkg")
    assert sorted(p.name for p in killed.iterdir()) == ["b.gpkg", "h.tif", "idx"]
    a, b = Index(ref / "idx"), Index(killed / "idx")
    assert committed < a.rows
    resumed = json.loads(again[1].result().out)
    assert resumed["resumed"] == [str(world["raster"])]
    assert resumed["embedded"] == a.rows - committed        # nothing embedded twice
    assert a.rows == b.rows > 0
    assert np.array_equal(a.embeddings(), b.embeddings())
    cols = ["tile_px", "tile", "col", "row", "width", "height"]
    assert all(np.array_equal(a.tiles()[c], b.tiles()[c]) for c in cols)
    assert _digest(world["tmp"] / "in") == world["digest"]


def test_damaged_index_refused_for_search_and_append(world, tmp_path):
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.core.options import IndexOptions
    from mapclip.engine.model.models import load_model
    idx = tmp_path / "idx"
    env = world["env"]
    build_index([world["raster"]], idx, load_model(str(world["model"]), device="cpu"),
                   IndexOptions(tile_px=32, footprints=False))
    m = json.loads((idx / "manifest.json").read_text())
    shard = idx / m["shards"][0]["emb"]
    arr = np.load(shard)
    garbage = np.frombuffer(np.random.default_rng(0).bytes(arr.nbytes), np.float16)
    np.save(shard, garbage.reshape(arr.shape))
    before = _digest(idx)
    argvs = {"search": ["search", idx, "--text", "a red roof"],
             "append": ["index", world["raster"], world["tmp"] / "in" / "huge.vrt", "--out", idx],
             "readonly": ["search", idx, "--text", "a red roof", "--out",
                          world["ro"] / "hits.gpkg"],
             "inside": ["search", idx, "--text", "a red roof", "--out", idx / "hits.gpkg"]}
    with ThreadPoolExecutor(4) as pool:
        runs = {k: pool.submit(_cli, a, tmp_path, env) for k, a in argvs.items()}
        runs = {k: f.result() for k, f in runs.items()}
    runs["search"].refused(1, "damaged")
    runs["append"].refused(1, "damaged")
    runs["readonly"].refused(2, "cannot write")
    runs["inside"].refused(2, "inside")
    assert _digest(idx) == before       # no shard committed by the refused append


def test_stale_temporary_output_of_a_killed_run_is_removed_by_the_next(tmp_path):
    """A temporary file a killed writer left (its process is gone) is removed the
    next time the same output is written; one of a live process is kept."""
    from mapclip.engine.core.jobs import TEMP_TAG, atomic_path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".b.{TEMP_TAG}{dead.pid}-abcd.gpkg.part"
    stale.write_bytes(b"half a geopackage")
    (tmp_path / (stale.name + "-journal")).write_bytes(b"j")
    live = tmp_path / f".b.{TEMP_TAG}{os.getppid()}-abcd.gpkg.part"
    live.write_bytes(b"being written")
    with atomic_path(tmp_path / "b.gpkg") as tmp:
        tmp.write_bytes(b"done")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["b.gpkg", live.name]), names


def test_output_guard_rules(tmp_path):
    from mapclip.engine.core.errors import UsageError
    from mapclip.engine.core.jobs import check_outputs
    a = tmp_path / "a.tif"
    a.write_bytes(b"x")
    os.symlink(a, tmp_path / "link.tif")
    os.link(a, tmp_path / "hard.tif")
    for out in (a, tmp_path / "link.tif", tmp_path / "hard.tif", tmp_path / "sub" / ".." / "a.tif"):
        with pytest.raises(UsageError, match="also an input"):
            check_outputs([("--out", out)], [("raster", a)], overwrite=True)
    with pytest.raises(UsageError, match="name the same file"):
        check_outputs([("--out", tmp_path / "o.gpkg"), ("--heatmap", tmp_path / "o.gpkg")])
    with pytest.raises(UsageError, match="inside"):
        check_outputs([("--out", tmp_path / "idx" / "x.gpkg")], sealed=[("the index", tmp_path / "idx")])
    assert check_outputs([("--out", tmp_path / "new" / "deeper" / "o.gpkg")])
    assert not (tmp_path / "new").exists()      # the guard creates nothing


def test_a_fine_tuned_copy_is_not_the_same_model_for_append_or_search(tmp_path, tiny_model):
    """Model identity is a fingerprint of the weights: a copy with one slightly
    changed weight (close enough that its probe embeddings agree, so the probes
    alone accepted it) is refused for index append and for search; the same
    weights cast to bf16 (a GPU run) are recognised."""
    import copy
    from types import SimpleNamespace

    import torch

    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.search import search
    from mapclip.engine.archive.format import read_manifest
    from mapclip.engine.model.identity import same_space, same_weights, weights_fingerprint
    from mapclip.engine.model.space import model_identity
    from mapclip.engine.core.options import IndexOptions
    from mapclip.engine.core.errors import ModelError
    a = make_raster(tmp_path / "a.tif", width=64, height=64, data=noise(3, 64, 64, seed=2))
    b = make_raster(tmp_path / "b.tif", width=64, height=64, data=noise(3, 64, 64, seed=4))
    out = tmp_path / "idx"
    build_index([a], out, tiny_model, IndexOptions(tile_px=32, footprints=False))
    tuned = copy.deepcopy(tiny_model)
    tuned.__dict__.pop("_mapclip_fingerprint", None)
    with torch.no_grad():
        p = next(p for n, p in tuned.model.named_parameters() if n.endswith("text_projection"))
        p.add_(1e-4 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    ident = model_identity(tuned)
    probes_only = {k: v for k, v in ident.items() if k != "weights"}
    assert same_space(read_manifest(out)["model"], probes_only)   # the old check passed
    before = _digest(out)
    with pytest.raises(ModelError, match="different embedding space"):
        build_index([b], out, tuned, IndexOptions(footprints=False))
    with pytest.raises(ModelError, match="not comparable"):
        search(out, text="a red roof", model=tuned)
    assert _digest(out) == before
    half = SimpleNamespace(model=copy.deepcopy(tiny_model.model).to(torch.bfloat16))
    assert weights_fingerprint(half) == {"bf16": weights_fingerprint(tiny_model)["bf16"]}
    assert same_weights(read_manifest(out)["model"], {"weights": weights_fingerprint(half)})
    # fp16 with some layers kept in fp32 (as open_clip casts for CUDA) is the same model too
    mixed = copy.deepcopy(tiny_model.model)
    for mod in mixed.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.half()
    fp = weights_fingerprint(SimpleNamespace(model=mixed))
    assert fp == {"fp16": weights_fingerprint(tiny_model)["fp16"]}
    tuned_fp = weights_fingerprint(tuned)
    assert all(tuned_fp[k] != v for k, v in weights_fingerprint(tiny_model).items())


def test_the_system_pyproj_finds_its_data_in_the_venv(tmp_path):
    """Cause of the "PROJ data directory not found" warning every command printed:
    a venv with system site packages has no share/proj for Debian's pyproj.
    build.py links it; then importing pyproj (as pyogrio does) is silent."""

    import build
    system = "/usr/bin/python3"
    probe = ("import warnings; warnings.simplefilter('always')\n"
             "import pyproj, pyproj.datadir; print(pyproj.datadir.get_data_dir())")
    venv = tmp_path / "venv"
    subprocess.run([system, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    bare = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                          text=True)
    assert "PROJ data directory not found" in bare.stderr      # the cause, reproduced
    assert build.link_system_proj_data(venv)
    fixed = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                           text=True)
    assert fixed.returncode == 0 and "PROJ" not in fixed.stderr, fixed.stderr
    assert fixed.stdout.strip() == str(venv / "share" / "proj")
    assert not build.link_system_proj_data(venv)                # idempotent


def _interrupted_run(tmp_path: Path):
    """A fine-tuning run of 2 epochs on four images, cancelled after its first:
    (its options, the caption rows, the caption file)."""
    import threading

    from mapclip.engine import finetune as ft
    from mapclip.engine.core.errors import Cancelled
    data = tmp_path / "data"
    rows = ["image,caption"]
    for k, name in enumerate(("red", "green", "blue", "white")):
        _image(data / f"{name}.png", k)
        rows.append(f"{name}.png,a {name} square")
    captions = data / "captions.csv"
    captions.write_text("\n".join(rows) + "\n")
    o = dict(model="test-tiny", data=str(captions), out=str(tmp_path / "run"), epochs=2,
             batch_size=2, val_split=0.0, workers=0, device="cpu")
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        ft.finetune(ft.FinetuneOptions(**o), cancel=cancel,
                    on_metrics=lambda r: cancel.set() if r["type"] == "eval" and r.get("epoch") == 1
                    else None)
    return o, rows, captions


def test_resume_after_the_caption_file_changed_is_refused(tmp_path, one_torch_thread):
    from mapclip.engine import finetune as ft
    from mapclip.engine.core.errors import UsageError
    o, rows, captions = _interrupted_run(tmp_path)
    captions.write_text("\n".join(rows[:-1] + ["white.png,a black square"]) + "\n")
    state = _digest(tmp_path / "run")
    with pytest.raises(UsageError, match="changed since the run"):
        ft.finetune(ft.FinetuneOptions(**o, resume=True))
    assert _digest(tmp_path / "run") == state
    captions.write_text("\n".join(rows) + "\n")          # restored: the run resumes
    assert ft.finetune(ft.FinetuneOptions(**o, resume=True)).resumed_from_epoch == 1


def test_search_hits_are_never_written_over_an_indexed_raster(tmp_path, tiny_model):
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.search import search, write_hits
    from mapclip.engine.core.options import IndexOptions
    from mapclip.engine.core.errors import UsageError
    a = make_raster(tmp_path / "a.tif", width=64, height=64, data=noise(3, 64, 64, seed=2))
    body = a.read_bytes()
    build_index([a], tmp_path / "idx", tiny_model, IndexOptions(tile_px=32, footprints=False))
    res = search(tmp_path / "idx", text="a field", model=tiny_model)
    os.symlink(a, tmp_path / "link.gpkg")      # a link to the raster, named like an output
    with pytest.raises(UsageError, match="also an input"):
        write_hits(res, tmp_path / "link.gpkg", overwrite=True)
    assert a.read_bytes() == body


SLOW_READ = """
import os, signal, sys, time
# Ctrl-C as in a terminal, even when the suite itself was started in the background
# (a shell starts background jobs with SIGINT ignored, and Python then installs no handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
from mapclip.engine.raster import reader as raster
from mapclip.engine.geo.tiling import PixelWindow
def slow(self, ds, window, out_shape, *a, **k):
    os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C while the read is under way
    time.sleep(120)
raster.RasterReader._read_raw = slow
raster.LONG_READ_PX = 1
r = raster.open_raster(sys.argv[1])
print("reading", flush=True)
try:
    r.read(PixelWindow(0, 0, 64, 64), out_shape=(8, 8))
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_a_long_read_stops_on_ctrl_c_and_on_cancel(world, tmp_path, monkeypatch):
    """A long single read (a whole extent shrunk to one image) runs in a helper
    thread: Ctrl-C and the cancel flag, given while it reads (a read of 120 s), end it
    at once, where they used to wait for GDAL to finish."""
    import threading

    from mapclip.engine.raster import reader as raster
    from mapclip.engine.core.errors import Cancelled
    from mapclip.engine.geo.tiling import PixelWindow
    p = subprocess.Popen([sys.executable, "-c", SLOW_READ, str(world["raster"])], cwd=tmp_path,
                         env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out, err = p.communicate(timeout=60)
    assert out.split() == ["reading", "interrupted"] and p.returncode == 0, err
    cancel = threading.Event()
    monkeypatch.setattr(raster, "LONG_READ_PX", 1)
    monkeypatch.setattr(raster.RasterReader, "_read_raw",
                        lambda self, ds, *a, **k: (cancel.set(), time.sleep(120)))
    t0 = time.perf_counter()
    with raster.open_raster(str(world["raster"])) as r, pytest.raises(Cancelled):
        r.read(PixelWindow(0, 0, 64, 64), out_shape=(8, 8), cancel=cancel)
    assert time.perf_counter() - t0 < 60          # not the read's 120 s


def test_tile_grids_are_lazy_clipped_and_bounded():
    """Nothing proportional to the pixel or tile count is built: a grid over
    10^6 x 10^6 px (61 million tiles) costs a few MB and gives any tile on
    demand; a tile larger than the raster is clipped; too large a tile or (for
    detect and count) too many tiles is refused before any read."""
    import tracemalloc
    from types import SimpleNamespace

    from mapclip.engine.core.errors import UsageError
    from mapclip.engine.geo.tiling import CLIP_TILE_PX, TileGrid, TileSequence
    info = SimpleNamespace(width=HUGE, height=HUGE, block_shape=(256, 256))
    tracemalloc.start()
    grid = TileGrid.for_raster(info, None, 128, max_tiles=None)
    batch = grid.tiles[len(grid) - 5:]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8_000_000, peak
    assert len(grid) == 7813 ** 2 and isinstance(batch, TileSequence) and len(batch) == 5
    last = grid.tiles[-1]
    assert (last.index, last.col, last.row) == (len(grid) - 1, HUGE - 128, HUGE - 128)
    assert grid.tile_at(2, 3) == grid.tiles[2 * grid.n_cols + 3]
    first = list(zip(range(3), grid))
    assert [t.col for _, t in first] == [0, 128, 256] and grid.tiles[1:3] == [t for _, t in first[1:]]
    with pytest.raises(UsageError, match="tiles"):
        TileGrid.for_raster(info, None, 128)                    # detect and count: refused
    small = SimpleNamespace(width=1024, height=1024, block_shape=(256, 256))
    for tile in (20_000, 100_000):
        g = TileGrid.for_raster(small, None, tile)
        assert len(g) == 1 and g.out_px == CLIP_TILE_PX and g.tile_width == 1024
    mid = SimpleNamespace(width=20_000, height=20_000, block_shape=(256, 256))
    with pytest.raises(UsageError, match="smaller --tile"):
        TileGrid.for_raster(mid, None, 10_000)
    with pytest.raises(UsageError, match="positive"):
        TileGrid.for_raster(small, None, 0)


class _Pickled:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_checkpoint_error_is_one_clean_complete_line(tmp_path, world):
    """torch's refusal of a pickled checkpoint is long, multi-line and coloured;
    the error keeps its first sentences whole, without terminal codes."""
    import torch

    from mapclip.engine.core.errors import reason
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Pickled()}, bad)
    run = _cli(["detect", world["raster"], "--prompt", "x", "--model", f"mapclip-tiny:{bad}",
                "--out", tmp_path / "b.gpkg"], tmp_path, world["env"])
    run.refused(2, "cannot read checkpoint")
    line = next(ln for ln in run.err.splitlines() if ln.startswith("error:"))
    assert "\x1b" not in run.err and line.rstrip().endswith((".", ")", "..."))
    long = Exception("The first part of the message. \x1b[1mSecond\x1b[0m part, " + "word " * 80)
    assert reason(long, 60) == "The first part of the message."
    assert reason(Exception("a " * 100), 30).endswith(" ...") and "\x1b" not in reason(long)


# ------------------------------------------------ outputs that are inputs, any depth --
def _vrt(path: Path, source: Path) -> Path:
    """A one-band VRT of ``source`` (64 x 64), its source named relative to the VRT."""
    path.write_text(
        '<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>EPSG:32633</SRS>'
        '<GeoTransform>500000, 0.5, 0, 4000000, 0, -0.5</GeoTransform>'
        '<VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">{source.name}</SourceFilename><SourceBand>1</SourceBand>'
        '<SrcRect xOff="0" yOff="0" xSize="64" ySize="64"/><DstRect xOff="0" yOff="0" '
        'xSize="64" ySize="64"/></SimpleSource></VRTRasterBand></VRTDataset>')
    return path


def test_no_command_writes_over_an_input_at_any_depth(world, tmp_path):
    """Every file a command reads is an input, whatever --overwrite says: the
    raster, --within, a VRT's sources followed to the bottom, an image in an
    --images folder, and a symlink to any of them."""
    from mapclip.engine.core.outputs import write_vector
    d = tmp_path / "in"
    d.mkdir()
    x = make_raster(d / "x.tif", width=64, height=64, data=noise(3, 64, 64, seed=5))
    src = make_raster(d / "src.tif", width=64, height=64, data=noise(3, 64, 64, seed=6))
    _vrt(d / "outer.vrt", _vrt(d / "inner.vrt", src))
    write_vector(d / "w.gpkg", [("name", "str")], [{"name": "w"}], [(500000, 3999980, 500020, 4000000)],
                 "EPSG:32633", "within")
    os.symlink(x, d / "link.tif")
    _image(d / "MI2" / "m0.png", 3)
    Image.fromarray(np.pad(np.ones((8, 8), np.uint8), 20)).save(_image(d / "M" / "m0.png", 4))
    (d / "M" / "classes.json").write_text(json.dumps({"0": "background", "1": "building"}))
    before = _digest(d)
    model, env = world["model"], world["env"]
    cls = ["--class", "water", "--class", "forest", "--model", model, "--overwrite"]
    cases = {
        "classify_out": (["classify", x, "--out", x, *cls], "--out"),
        "classify_scores": (["classify", x, "--out", "{out}/c.tif", "--scores", x, *cls], "--scores"),
        "classify_polygons_within": (["classify", x, "--out", "{out}/c.tif", "--polygons",
                                      d / "w.gpkg", "--within", d / "w.gpkg", *cls], "--polygons"),
        "classify_symlink_out": (["classify", x, "--out", d / "link.tif", *cls], "--out"),
        "classify_nested_vrt": (["classify", d / "outer.vrt", "--out", src, *cls], "--out"),
        "detect_nested_vrt": (["detect", d / "outer.vrt", "--prompt", "x", "--model", model,
                               "--out", "{out}/b.gpkg", "--heatmap", src, "--overwrite"], "--heatmap"),
        "m2b_out_in_images": (["convert", "m2b", "--masks", d / "M", "--classes",
                               d / "M" / "classes.json", "--images", d / "MI2", "--out",
                               d / "MI2" / "m0.png", "--overwrite"], "--out"),
    }
    outs = {name: _outs(tmp_path) for name in cases}
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {name: pool.submit(_cli, [str(a).format(out=outs[name]) for a in argv], tmp_path, env)
                for name, (argv, _) in cases.items()}
        for name, fut in runs.items():
            run = fut.result()
            run.refused(2, cases[name][1], "also an input")
            _assert_empty(outs[name])
    assert _digest(d) == before


def test_the_guard_follows_vrts_and_input_folders_without_refusing_other_files(tmp_path):
    from mapclip.engine.core.errors import UsageError
    from mapclip.engine.core.jobs import check_outputs
    from mapclip.engine.raster.reader import raster_files
    src = make_raster(tmp_path / "src.tif", width=64, height=64)
    outer = _vrt(tmp_path / "outer.vrt", _vrt(tmp_path / "inner.vrt", src))
    files = raster_files(outer)
    assert [Path(f).name for f in files] == ["outer.vrt", "inner.vrt", "src.tif"]
    folder = tmp_path / "images"
    _image(folder / "deep" / "a.png", 1)
    (folder / "notes.json").write_text("{}")
    with pytest.raises(UsageError, match="a file in --images"):
        check_outputs([("--out", folder / "deep" / "a.png")], [("--images", folder)], overwrite=True)
    # what the run does not read stays writable: a report beside the images, a new image
    assert check_outputs([("--out", folder / "notes.json"), ("--captions", folder / "new.png")],
                         [("--images", folder)], overwrite=True)


def test_dedup_never_leaves_an_input_symlink_dangling(world, tmp_path):
    """A file an input symlink points at is kept (or, if two such files are
    duplicates, left in place and named in the report): no link dangles."""
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        _image(folder / "y.png", 11)
        _image(folder / "z.png", 11)
    os.symlink("z.png", one / "0link.png")
    os.symlink("z.png", two / "0link.png")
    os.symlink("y.png", two / "1link.png")
    for folder, moved in ((one, 1), (two, 0)):
        q, report = tmp_path / f"q-{folder.name}", tmp_path / f"{folder.name}.csv"
        run = _cli(["dedup", folder, "--out", report, "--move-to", q, "--no-cache", "--json"],
                   tmp_path, world["env"])
        assert run.rc == 0, run.err
        info = json.loads(run.out)
        assert info["pairs"] == 1 and info["move"]["moved"] == moved
        for link in folder.glob("*link.png"):
            assert link.exists(), f"{link} dangles"
    assert not (one / "y.png").exists() and (one / "z.png").is_file()
    assert (two / "y.png").is_file() and (two / "z.png").is_file()
    assert "not moved: linked from" in (tmp_path / "two.csv").read_text()


# ------------------------------------------------------------- writes that fail --
NO_SPACE = os.strerror(errno.ENOSPC)


def _main(argv, capsys) -> Run:
    from mapclip.engine.cli import main
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Run(rc, out, err)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)


class _LibraryError(Exception):
    """A write error as GDAL or safetensors raise it: the errno only in its text."""


def _no_space_in_words(*args, **kwargs):
    raise _LibraryError(f"Error while serializing: IoError(Os {{ code: 28, message: \"{NO_SPACE}\" }})")


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".part") or "mapclip-" in p.name)


def test_a_full_disk_is_one_error_and_nothing_half_written(tmp_path, capsys, monkeypatch,
                                                            one_torch_thread):
    import numpy
    import pyogrio.raw
    import safetensors.torch

    from mapclip.engine import detect as detect_mod
    a = make_raster(tmp_path / "a.tif", width=64, height=64, data=noise(3, 64, 64, seed=2))
    b = make_raster(tmp_path / "b.tif", width=64, height=64, data=noise(3, 64, 64, seed=3))
    idx = tmp_path / "idx"
    index = ["index", a, "--model", "test-tiny", "--device", "cpu", "--out", idx, "--tile", "32",
             "--no-footprints"]
    assert _main(index, capsys).rc == 0
    with monkeypatch.context() as m:                       # numpy.save of a shard: ENOSPC
        m.setattr(numpy, "save", _no_space)
        run = _main([*index[:2], b, *index[2:]], capsys)
    run.refused(1, NO_SPACE)
    assert "free disk space" in run.err and _leftovers(idx) == []
    before = _digest(idx)
    with monkeypatch.context() as m:                       # a GeoPackage write: no errno
        m.setattr(pyogrio.raw, "write", _no_space_in_words)
        run = _main(["search", idx, "--text", "a field", "--out", tmp_path / "hits.gpkg"], capsys)
    run.refused(1, NO_SPACE)
    assert not (tmp_path / "hits.gpkg").exists() and _leftovers(tmp_path) == []
    assert _digest(idx) == before
    # detect --overwrite onto good outputs: a failed heatmap keeps both old files
    det = ["detect", a, "--prompt", "a field", "--model", "test-tiny", "--device", "cpu",
           "--out", tmp_path / "b.gpkg", "--heatmap", tmp_path / "h.tif", "--overwrite"]
    assert _main(det, capsys).rc == 0
    good = {p: p.read_bytes() for p in (tmp_path / "b.gpkg", tmp_path / "h.tif")}
    with monkeypatch.context() as m:
        m.setattr(detect_mod, "write_heatmap_tif", _no_space_in_words)
        run = _main(det, capsys)
    run.refused(1, NO_SPACE)
    assert {p: p.read_bytes() for p in good} == good and _leftovers(tmp_path) == []
    # finetune: safetensors fails writing best/; no best.part/ is left
    data = tmp_path / "data"
    rows = ["image,caption"] + [f"{n}.png,a {n} square" for n in ("red", "green", "blue", "white")]
    for k, n in enumerate(("red", "green", "blue", "white")):
        _image(data / f"{n}.png", k)
    (data / "captions.csv").write_text("\n".join(rows) + "\n")
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", _no_space_in_words)
        run = _main(["finetune", "--model", "test-tiny", "--device", "cpu", "--data",
                     data / "captions.csv", "--out", tmp_path / "run", "--epochs", "1",
                     "--batch-size", "2", "--val-split", "0", "--workers", "0"], capsys)
    run.refused(1, NO_SPACE)
    assert not (tmp_path / "run" / "best").exists() and _leftovers(tmp_path / "run") == []


def test_a_file_name_that_is_not_utf8_is_an_error_line(world, tmp_path):
    bad = os.fsdecode(b"bad\xff")
    raster = tmp_path / f"{bad}.tif"
    raster.write_bytes(world["raster"].read_bytes())
    (tmp_path / "imgs").mkdir()
    _image(tmp_path / "imgs" / "a.png", 1)
    _image(tmp_path / "imgs" / "b.png", 1)
    before = _digest(tmp_path)
    runs = [_cli(["detect", raster, "--prompt", "x", "--model", world["model"], "--out",
                  tmp_path / "o.gpkg"], tmp_path, world["env"]),
            _cli(["dedup", tmp_path / "imgs", "--out", tmp_path / "r.csv", "--no-cache",
                  "--move-to", tmp_path / f"q{bad}"], tmp_path, world["env"])]
    for run in runs:
        run.refused(2, "not valid UTF-8", "\\xff")
    assert _digest(tmp_path) == before
    # a name met inside a folder is reported the same way (the report is never half-written)
    from mapclip.engine.core.errors import from_foreign
    try:
        f"1,duplicate,/data/{bad}.png,/data/a.png".encode("utf-8")
    except UnicodeEncodeError as exc:
        err = from_foreign(exc)
    assert err is not None and err.message == "the file name '/data/bad\\xff.png' is not valid UTF-8"


# ------------------------------------------------------ silent wrong results --
def test_a_txt_caption_bank_is_one_caption_a_line_as_written(tmp_path):
    from mapclip.engine.caption import read_caption_bank
    lines = ['"oil tanks beside a road', "Raw land by a river", "caption", "ships, in a harbour"]
    (tmp_path / "bank.txt").write_text("\n".join(lines) + "\n")
    assert read_caption_bank(tmp_path / "bank.txt") == lines
    # a CSV bank still knows a header of column names, and only that
    (tmp_path / "bank.csv").write_text("Raw land by a river\nships in a harbour\n")
    assert read_caption_bank(tmp_path / "bank.csv") == ["Raw land by a river", "ships in a harbour"]
    (tmp_path / "named.csv").write_text("image,caption_1\na.png,ships in a harbour\n")
    assert read_caption_bank(tmp_path / "named.csv") == ["ships in a harbour"]


def test_a_negative_prompt_equal_to_the_query_is_refused(world, tmp_path):
    idx = tmp_path / "idx"
    built = _cli(["index", world["raster"], "--model", world["model"], "--out", idx, "--tile", "32",
                  "--no-footprints"], tmp_path, world["env"])
    assert built.rc == 0, built.err
    run = _cli(["search", idx, "--text", "oil tanks", "--negative", " Oil  Tanks", "--model",
                world["model"]], tmp_path, world["env"])
    run.refused(2, "'Oil Tanks'", "query text itself")


def test_resume_after_the_training_images_were_replaced_is_refused(tmp_path, one_torch_thread):
    from mapclip.engine import finetune as ft
    from mapclip.engine.core.errors import UsageError
    o, _, captions = _interrupted_run(tmp_path)
    data = captions.parent
    original = (data / "blue.png").read_bytes()
    _image(data / "blue.png", 99)                       # another picture, same name and captions
    state = _digest(tmp_path / "run")
    with pytest.raises(UsageError, match=r"1 training image\(s\) changed .*blue\.png"):
        ft.finetune(ft.FinetuneOptions(**o, resume=True))
    assert _digest(tmp_path / "run") == state
    (data / "blue.png").write_bytes(original)           # restored (a new mtime): the run resumes
    assert ft.finetune(ft.FinetuneOptions(**o, resume=True)).resumed_from_epoch == 1


#: the CLI with IVF-PQ from 3000 rows (not 10^6), as tests/engine/test_ann.py sets it
SMALL_IVF = """
import sys
from mapclip.engine.archive import ann, approx
ann.IVF_MIN_ROWS, ann.IVF_MIN_LISTS, ann.IVF_MIN_PROBE, ann.IVF_MIN_CANDIDATES = 3000, 16, 4, 200
approx.APPROX_MIN_ROWS = 1000
from mapclip.engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _small_ivf(args, cwd: Path, env: dict) -> Run:
    p = subprocess.run([sys.executable, "-c", SMALL_IVF, *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=240)
    return Run(p.returncode, p.stdout, p.stderr)


def _unit_blocks(seed: int, sizes):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = rng.standard_normal((n, 32)).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def test_caches_and_shards_are_tied_to_their_index(tmp_path):
    """A search cache copied from another index of as many rows (under this index's
    cache name) is rebuilt, not used; two shards whose files were swapped are a
    damaged index, refused with a fix, not hits on the wrong raster."""
    from mapclip.engine.archive.store import open_index
    from tests.index_factories import index_folder_from_blocks
    env = _env(tmp_path)
    a = index_folder_from_blocks(tmp_path / "a", _unit_blocks(1, [1500, 1500]), 32)
    b = index_folder_from_blocks(tmp_path / "b", _unit_blocks(2, [1500, 1500]), 32)
    assert open_index(a).content_id != open_index(b).content_id
    like = ["--like", f"{224 * 2000 + 100},-100", "--top-k", "3", "--json"]    # row 2000's tile
    run = _small_ivf(["search", a, *like], tmp_path, env)
    assert run.rc == 0, run.err
    (cache_a,) = a.glob("ann-*.faiss")
    mine = b / f"ann-{open_index(b).content_id}.faiss"
    mine.write_bytes(cache_a.read_bytes())              # A's cache, named as B's
    run = _small_ivf(["search", b, *like], tmp_path, env)
    assert run.rc == 0, run.err
    out = json.loads(run.out)
    assert out["method"] == "approx" and out["hits"][0]["row"] == 2000, out["hits"]
    assert mine.read_bytes() != cache_a.read_bytes()     # rebuilt for B
    # the flat PQ cache (1000 to 3000 rows) is checked the same way
    c = index_folder_from_blocks(tmp_path / "c", _unit_blocks(3, [1200]), 32)
    d = index_folder_from_blocks(tmp_path / "d", _unit_blocks(4, [1200]), 32)
    near = ["--like", f"{224 * 700 + 100},-100", "--top-k", "3", "--json"]
    assert _small_ivf(["search", c, *near], tmp_path, env).rc == 0
    (cache_c,) = c.glob("approx-*.faiss")
    (d / f"approx-{open_index(d).content_id}.faiss").write_bytes(cache_c.read_bytes())
    run = _small_ivf(["search", d, *near], tmp_path, env)
    assert run.rc == 0 and json.loads(run.out)["hits"][0]["row"] == 700, run.err
    # two shards of as many rows, their files swapped: refused, whichever search runs
    shards = b / "shards"
    for kind in ("emb", "tiles"):
        one, two = shards / f"000001.{kind}.npy", shards / f"000002.{kind}.npy"
        tmp = shards / "swap"
        one.rename(tmp)
        two.rename(one)
        tmp.rename(two)
    before = _digest(b)
    for method in ("approx", "exact"):
        run = _small_ivf(["search", b, *like, "--method", method], tmp_path, env)
        run.refused(1, "is damaged", "shard 1")
    assert _digest(b) == before


# ------------------------------------------------------------ Ctrl-C, quietly --
CTRL_C = """
import signal, sys
# Ctrl-C as in a terminal, even when the suite itself was started in the background
signal.signal(signal.SIGINT, signal.default_int_handler)
from mapclip.engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_with_reader_processes_is_one_line(world, tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the reader processes
    ignore it (the command stops them), so stderr holds one line, no traceback. The
    Ctrl-C comes once 3 batches were read through the reader processes (the named
    fault point read.batch, action ctrl-c: SIGINT to the whole process group)."""
    big = make_raster(tmp_path / "big.tif", width=2048, height=2048,
                      data=noise(3, 2048, 2048, seed=5))                  # 16384 tiles of 16 px
    env = dict(world["env"], MAPCLIP_FAULT="read.batch:3:ctrl-c")
    p = subprocess.Popen([sys.executable, "-c", CTRL_C, "index", big, "--model", world["model"],
                          "--out", tmp_path / "idx", "--tile", "16", "--read-workers", "2",
                          "--no-footprints"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    out, err = p.communicate(timeout=240)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len([ln for ln in lines if ln.startswith("error:")]) <= 1, err
    assert any("interrupt" in ln or "cancel" in ln for ln in lines), (p.returncode, out, err)
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert not m["rasters"][0]["complete"]              # stopped mid-raster


# ----------------------------------------------------------------- residue --
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_partial_copies_of_a_killed_move_or_undo_are_removed_by_the_next_run(world, tmp_path):
    """A kill -9 during a cross-filesystem copy leaves its .part file (one beside an
    image in the input folder when it was an undo): the next undo of that manifest,
    or the next move into that quarantine, removes it and says so; another's stays."""
    data = tmp_path / "data"
    _image(data / "a.png", 3)
    _image(data / "b.png", 3)                                 # a duplicate of a.png
    q = tmp_path / "q"
    run = _cli(["dedup", data, "--out", tmp_path / "r.csv", "--move-to", q, "--no-cache"],
               tmp_path, world["env"])
    assert run.rc == 0, run.err
    (manifest,) = q.glob("manifest-*.json")
    move = json.loads(manifest.read_text())["moves"][0]
    src, dst = Path(move["from"]), Path(move["to"])
    stamp = manifest.stem[len("manifest-"):]
    dead = _dead_pid()
    # what a killed undo leaves in the input folder, and a killed move in the quarantine
    undo_part = src.parent / f".{src.name}.mapclip-dedup-{stamp}-{dead}.part"
    move_part = dst.parent / f".{dst.name}.mapclip-dedup-{stamp}-{dead}.part"
    alive = src.parent / f".{src.name}.mapclip-dedup-{stamp}-{os.getpid()}.part"   # still running
    other = src.parent / f".{src.name}.mapclip-dedup-20000101T000000000000Z-{dead}.part"
    for p in (undo_part, move_part, alive, other):
        p.write_bytes(dst.read_bytes()[:100])
    undo = _cli(["dedup", "--undo", manifest], tmp_path, world["env"])
    assert undo.rc == 0, undo.err
    assert not undo_part.exists() and not move_part.exists()
    assert alive.exists() and other.exists()      # a live run's and another manifest's stay
    assert f"removed {undo_part}" in undo.err and f"removed {move_part}" in undo.err
    assert "Traceback" not in undo.err and src.is_file()
    alive.unlink()
    other.unlink()
    # a killed move's copy in the quarantine: the next move into it removes it
    again = _cli(["dedup", data, "--out", tmp_path / "r2.csv", "--move-to", q, "--no-cache"],
                 tmp_path, world["env"])
    assert again.rc == 0, again.err
    move_part.write_bytes(b"partial")
    third_data = tmp_path / "more"
    _image(third_data / "c.png", 4)
    _image(third_data / "d.png", 4)
    third = _cli(["dedup", third_data, "--out", tmp_path / "r3.csv", "--move-to", q, "--no-cache"],
                 tmp_path, world["env"])
    assert third.rc == 0, third.err
    assert not move_part.exists() and f"removed {move_part}" in third.err
    assert not [p.name for p in tmp_path.rglob("*.part")]
