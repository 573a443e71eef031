"""p-Hash de-duplication: the segment index equals brute force; groups, contamination,
the report, the cache, and the move / undo round trip."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapclip.engine.cli import main as cli_main
from mapclip.engine.core.options import DedupOptions
from mapclip.engine.dedup.duplicates import find_duplicates
from mapclip.engine.dedup.hashing import phash_file
from mapclip.engine.dedup.quarantine import move_duplicates, undo_move
from mapclip.engine.dedup.segments import brute_force_pairs, check_segments, find_cross_pairs, find_pairs, hamming, segment_layout
from mapclip.engine.core.errors import Cancelled, UsageError


# ------------------------------------------------------------ hash level --
def flip(h: int, bits: int, d: int, rng: random.Random) -> int:
    for b in rng.sample(range(bits), d):
        h ^= 1 << b
    return h


def planted(n: int, d: int, bits: int = 64, seed: int = 0):
    """n random hashes, then copies of some at distances 0..d and d+1 (never pairs
    within d of anything but their source: checked by the brute force anyway)."""
    rng = random.Random(seed)
    hashes = [rng.getrandbits(bits) for _ in range(n)]
    near = []
    for k in range(n // 5):
        src = rng.randrange(n)
        dist = k % (d + 2)                       # 0 .. d+1
        hashes.append(flip(hashes[src], bits, dist, rng))
        near.append((src, len(hashes) - 1, dist))
    return hashes, near


def python_brute(hashes, d):
    return sorted((i, j, hamming(hashes[i], hashes[j])) for i in range(len(hashes))
                  for j in range(i + 1, len(hashes)) if hamming(hashes[i], hashes[j]) <= d)


@pytest.mark.parametrize("bits,n", [(64, 1), (64, 2), (64, 3), (64, 5), (64, 64), (10, 3)])
def test_segment_layout_covers_every_bit_once(bits, n):
    layout = segment_layout(bits, n)
    covered = [b for shift, width in layout for b in range(shift, shift + width)]
    assert sorted(covered) == list(range(bits))
    widths = [w for _, w in layout]
    assert max(widths) - min(widths) <= 1 and len(layout) == n


@pytest.mark.parametrize("d", [0, 1, 2, 3, 4])
def test_segment_index_equals_brute_force_near_duplicates(d):
    hashes, near = planted(1500, d, seed=d)
    got = find_pairs(hashes, d)
    assert got == brute_force_pairs(hashes, d)
    pairs = {(i, j) for i, j, _ in got}
    for src, dup, dist in near:
        key = (min(src, dup), max(src, dup))
        if dist <= d:
            assert key in pairs, (src, dup, dist)
        else:
            assert key not in pairs, (src, dup, dist)   # d + 1 is never reported


@pytest.mark.parametrize("d,n", [(1, 2), (1, 3), (2, 5), (3, 7), (0, 1), (2, 16)])
def test_any_valid_segment_count_equals_brute_force(d, n):
    hashes, _ = planted(800, d, seed=10 + n)
    assert find_pairs(hashes, d, segments=n) == brute_force_pairs(hashes, d)


def test_random_sets_and_duplicates_of_identical_hashes():
    rng = random.Random(3)
    for trial in range(5):
        base = [rng.getrandbits(64) for _ in range(50)]
        hashes = [rng.choice(base) if rng.random() < 0.5 else flip(rng.choice(base), 64, rng.randint(0, 3), rng)
                  for _ in range(300)]
        for d in (1, 2):
            assert find_pairs(hashes, d) == brute_force_pairs(hashes, d) == python_brute(hashes, d)


def test_wider_hashes_uneven_segments():
    """hash_size 5: 25 bits, split into 4 segments of 7/6/6/6 bits."""
    hashes, _ = planted(400, 3, bits=25, seed=4)
    assert find_pairs(hashes, 3, bits=25) == python_brute(hashes, 3)
    hashes, _ = planted(200, 2, bits=256, seed=5)
    assert find_pairs(hashes, 2, bits=256) == python_brute(hashes, 2)


def test_cross_pairs_equal_brute_force():
    hashes, near = planted(600, 2, seed=8)
    q, r = hashes[:600], hashes[600:]
    want = sorted((i, j, hamming(a, b)) for i, a in enumerate(q) for j, b in enumerate(r)
                  if hamming(a, b) <= 2)
    assert want and find_cross_pairs(q, r, 2) == want


def test_segment_count_is_validated():
    assert check_segments(64, 1, None) == 2
    with pytest.raises(UsageError, match="more segments than the max distance"):
        check_segments(64, 2, 2)
    with pytest.raises(UsageError, match="at most 64 segments"):
        check_segments(64, 1, 65)
    with pytest.raises(UsageError, match="not below the hash"):
        check_segments(64, 64, None)
    with pytest.raises(UsageError, match="negative"):
        check_segments(64, -1, None)


# ------------------------------------------------------------ image level --
def blocky(seed: int, size: int = 64) -> Image.Image:
    """A random 8 x 8 colour grid, scaled up: its p-Hash survives resizing."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.NEAREST)


@pytest.fixture
def folders(tmp_path):
    """train/a: 6 distinct images, a 2x copy of #0 in train/b, a JPEG copy of #1 in
    train/b/sub, a corrupt file; test/: a copy of #2."""
    a, b, t = tmp_path / "train" / "a", tmp_path / "train" / "b", tmp_path / "test"
    for f in (a, b / "sub", t):
        f.mkdir(parents=True)
    for k in range(6):
        blocky(k).save(a / f"img{k}.png")
    blocky(0, 128).save(b / "big0.png")
    blocky(1).save(b / "sub" / "copy1.jpg", quality=98)
    blocky(2).save(t / "t2.png")
    (a / "broken.png").write_bytes(b"not an image")
    return tmp_path


def snapshot(root: Path):
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def opts(tmp_path, **kw):
    return DedupOptions(cache=str(tmp_path / "cache.sqlite"), **kw)


def test_find_duplicates_groups_keep_rule_and_report(folders):
    a, b = folders / "train" / "a", folders / "train" / "b"
    assert hamming(phash_file(a / "img0.png")[0], phash_file(b / "big0.png")[0]) <= 1
    assert hamming(phash_file(a / "img1.png")[0], phash_file(b / "sub" / "copy1.jpg")[0]) <= 1
    before = snapshot(folders / "train")
    report = folders / "out" / "report.csv"
    res = find_duplicates([a, b], report, options=opts(folders))
    assert snapshot(folders / "train") == before           # inputs untouched
    assert res.images == 8 and res.pairs == 2
    assert res.groups == [[str(a / "img1.png"), str(b / "sub" / "copy1.jpg")],   # same size: path order
                          [str(b / "big0.png"), str(a / "img0.png")]]            # largest kept
    assert res.remove == sorted([str(a / "img0.png"), str(b / "sub" / "copy1.jpg")])
    assert [p for p, _ in res.unreadable] == [str(a / "broken.png")]
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    actions = {(Path(r["path"]).name, r["action"], Path(r["duplicate_of"]).name if r["duplicate_of"] else "")
               for r in rows}
    assert actions == {("img1.png", "keep", ""), ("copy1.jpg", "duplicate", "img1.png"),
                       ("big0.png", "keep", ""), ("img0.png", "duplicate", "big0.png"),
                       ("broken.png", "unreadable", "")}
    assert [r["width"] for r in rows if r["path"].endswith("big0.png")] == ["128"]


def test_against_reports_contamination(folders):
    a, b = folders / "train" / "a", folders / "train" / "b"
    res = find_duplicates([a, b], against=[folders / "test"], options=opts(folders))
    assert res.contaminated == {str(a / "img2.png"): (str(folders / "test" / "t2.png"), 0)}
    assert str(a / "img2.png") in res.remove
    assert res.against_images == 1


def test_contaminated_image_is_never_the_one_kept(tmp_path):
    tr, te = tmp_path / "train", tmp_path / "test"
    tr.mkdir(), te.mkdir()
    blocky(1, 128).save(tr / "big.png")      # largest, but it is in the test set too
    blocky(1).save(tr / "small.png")
    blocky(1, 128).save(te / "t.png")
    res = find_duplicates([tr], against=[te], options=opts(tmp_path))
    # both lie within the distance of the test image: neither is kept
    assert res.groups == [[str(tr / "big.png"), str(tr / "small.png")]]
    assert res.remove == [str(tr / "big.png"), str(tr / "small.png")]
    # every copy of a test image is contaminated, so nothing of this group stays
    assert set(res.contaminated) == {str(tr / "big.png"), str(tr / "small.png")}


def test_hash_cache_by_path_size_mtime(folders):
    a = folders / "train" / "a"
    o = opts(folders)
    r1 = find_duplicates([a], options=o)
    assert r1.from_cache == 0 and r1.hashed == 6
    r2 = find_duplicates([a], options=o)
    assert r2.from_cache == 6 and r2.hashed == 0
    blocky(0).save(a / "img3.png")                       # now a copy of img0
    os.utime(a / "img3.png", ns=(1, 1))                  # and a different mtime for sure
    r3 = find_duplicates([a], options=o)
    assert r3.from_cache == 5 and r3.hashed == 1
    assert r3.groups == [[str(a / "img0.png"), str(a / "img3.png")]]


def test_cancel_writes_nothing(folders):
    class Stop:
        def is_set(self):
            return True
    report = folders / "r.csv"
    with pytest.raises(Cancelled):
        find_duplicates([folders / "train"], report, options=opts(folders), cancel=Stop())
    assert not report.exists()


def test_report_refused_when_it_exists(folders):
    report = folders / "r.csv"
    report.write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        find_duplicates([folders / "train"], report, options=opts(folders))
    assert report.read_text() == "x"


def test_move_and_undo_round_trip(folders):
    train, test = folders / "train", folders / "test"
    before_train, before_test = snapshot(train), snapshot(test)
    res = find_duplicates([train / "a", train / "b"], against=[test], options=opts(folders))
    q = folders / "quarantine"
    moved = move_duplicates(res, q)
    assert moved.moved == 3
    for p in res.remove:
        assert not Path(p).exists()
    manifest = json.loads(Path(moved.manifest).read_text())
    assert sorted(m["from"] for m in manifest["moves"]) == res.remove
    assert all(Path(m["to"]).is_file() and Path(m["to"]).is_relative_to(q) for m in manifest["moves"])
    assert (q / "1-b" / "sub" / "copy1.jpg").is_file()          # path kept below its input folder
    assert snapshot(test) == before_test
    back = undo_move(moved.manifest)
    assert back.moved == 3
    assert snapshot(train) == before_train                      # exactly as before, mtimes too
    assert sorted(p.name for p in q.rglob("*")) == [Path(moved.manifest).name]
    # a second undo has nothing left to do
    again = undo_move(moved.manifest)
    assert again.moved == 0 and len(again.skipped) == 3


def test_undo_refuses_to_overwrite_a_file_that_reappeared(folders):
    a, b = folders / "train" / "a", folders / "train" / "b"
    res = find_duplicates([a, b], options=opts(folders))
    moved = move_duplicates(res, folders / "q")
    victim = Path(res.remove[0])
    victim.write_bytes(b"new file")
    with pytest.raises(UsageError, match="exists again"):
        undo_move(moved.manifest)
    assert victim.read_bytes() == b"new file"
    assert all(not Path(p).exists() for p in res.remove[1:])    # nothing was moved back


def test_quarantine_inside_an_input_is_refused(folders):
    res = find_duplicates([folders / "train"], options=opts(folders))
    with pytest.raises(UsageError, match="overlaps input"):
        move_duplicates(res, folders / "train" / "q")


# -------------------------------------------------------------------- CLI --
def test_cli_dedup_move_undo(folders, capsys):
    train = folders / "train"
    before = snapshot(train)
    report, q = folders / "rep.csv", folders / "q"
    rc = cli_main(["dedup", str(train / "a"), str(train / "b"), "--against", str(folders / "test"),
                   "--out", str(report), "--move-to", str(q), "--cache",
                   str(folders / "c.sqlite"), "--json"])
    cap = capsys.readouterr()
    assert rc == 0
    out = json.loads(cap.out)
    assert out["move"]["moved"] == 3 and len(out["groups"]) == 2
    assert "broken.png" in cap.err
    assert cli_main(["dedup", "--undo", out["move"]["manifest"]]) == 0
    assert snapshot(train) == before


@pytest.mark.parametrize("argv,match", [
    (["dedup", "MISSING", "--out", "R"], "folder not found"),
    (["dedup", "TRAIN", "--out", "R", "--max-distance", "3", "--segments", "3"],
     "more segments than the max distance"),
    (["dedup", "TRAIN"], "--out is required"),
    (["dedup", "--undo", "BADMANIFEST"], "not a dedup manifest"),
    (["dedup", "--undo", "MISSING"], "manifest not found"),
])
def test_cli_bad_input_exit_2_one_line(folders, capsys, argv, match):
    (folders / "bad.json").write_text("{")
    subst = {"MISSING": str(folders / "missing"), "R": str(folders / "r.csv"),
             "TRAIN": str(folders / "train"), "BADMANIFEST": str(folders / "bad.json")}
    rc = cli_main([subst.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0]
    assert not (folders / "r.csv").exists()


def test_symlinked_duplicate_moves_as_a_link(tmp_path):
    outside, inp = tmp_path / "outside", tmp_path / "in"
    outside.mkdir(), inp.mkdir()
    blocky(4).save(outside / "orig.png")
    blocky(4).save(inp / "a.png")
    (inp / "z_link.png").symlink_to(outside / "orig.png")
    target = hashlib.sha256((outside / "orig.png").read_bytes()).hexdigest()
    seen = []
    res = find_duplicates([inp], options=opts(tmp_path), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2, 2)
    assert res.remove == [str(inp / "z_link.png")]
    moved = move_duplicates(res, tmp_path / "q")
    assert not os.path.lexists(inp / "z_link.png")
    assert (outside / "orig.png").is_file()                       # the link moved, not its target
    undo_move(moved.manifest)
    assert (inp / "z_link.png").is_symlink()
    assert hashlib.sha256((outside / "orig.png").read_bytes()).hexdigest() == target
