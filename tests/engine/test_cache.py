"""The embedding cache (engine.cache, engine.rasterjob): a second prompt on the same
extent is answered from the kept embeddings, exactly as an uncached run answers it,
and a kept pass never answers for a changed raster, another model or other options."""
from __future__ import annotations

import copy
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from mapclip.engine.cache import store
from mapclip.engine.cache.keys import key_digest
from mapclip.engine.count import count
from mapclip.engine.core.options import CountOptions
from mapclip.engine.detect import DetectOptions, detect
from tests.engine.test_detect import scene
from tests.rigged import BLUE, BLUE_PROMPT, RED, RED_PROMPT, rigged_model

SQUARES = [(70, 10, 40, RED), (200, 150, 40, BLUE)]


@pytest.fixture(scope="module")
def rig():
    return rigged_model()


def opts(**kw):
    kw.setdefault("tile_px", 32)
    kw.setdefault("window", 2)
    kw.setdefault("batch_size", 8)
    return DetectOptions(**kw)


def same(a, b):
    """Two detect results give the same boxes, scores and heatmap."""
    assert [(x.prompt, x.pixel, x.rank) for x in a.boxes] == [(x.prompt, x.pixel, x.rank) for x in b.boxes]
    assert [x.score for x in a.boxes] == [x.score for x in b.boxes]
    assert a.windows == b.windows and a.skipped == b.skipped and a.tiles == b.tiles
    if a.heatmap is not None or b.heatmap is not None:
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        assert a.heatmap_transform == b.heatmap_transform


def entries():
    folder = store.CACHE.folder
    return sorted(folder.glob("*.npz")) if folder.is_dir() else []


@pytest.mark.parametrize("mode", ["window", "dense"])
def test_a_second_prompt_is_answered_from_the_kept_pass_as_an_uncached_run_answers_it(tmp_path, rig, mode):
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    first = detect(path, [RED_PROMPT], rig, options=opts(mode=mode))
    assert first.cache == "computed" and not first.from_cache
    assert len(entries()) == 1
    second = detect(path, [BLUE_PROMPT], rig, options=opts(mode=mode))
    assert second.cache == "memory" and second.from_cache
    assert second.to_json()["from_cache"] is True and second.to_json()["cache"] == "memory"
    fresh = detect(path, [BLUE_PROMPT], rig, options=opts(mode=mode, cache=False))
    assert fresh.cache == "off"
    same(second, fresh)
    assert second.boxes and second.boxes[0].prompt == BLUE_PROMPT
    # the found object is the blue square, not the red one
    c0, r0, c1, r1 = second.boxes[0].pixel
    assert c0 <= 220 <= c1 and r0 <= 170 <= r1
    # both prompts at once, from the cache, equal both prompts uncached
    both = detect(path, [RED_PROMPT, BLUE_PROMPT], rig, options=opts(mode=mode))
    assert both.from_cache
    same(both, detect(path, [RED_PROMPT, BLUE_PROMPT], rig, options=opts(mode=mode, cache=False)))


def test_the_kept_pass_survives_the_process_on_disk_and_switches_modes_apart(tmp_path, rig):
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    detect(path, [RED_PROMPT], rig, options=opts())
    with store.CACHE._lock:
        store.CACHE._mem.clear()          # as a new process (a QGIS restart, a second CLI run)
    again = detect(path, [RED_PROMPT], rig, options=opts(refine=False))
    assert again.cache == "disk"
    # another tiling, another mode or another extent is another pass
    assert detect(path, [RED_PROMPT], rig, options=opts(window=1)).cache == "computed"
    assert detect(path, [RED_PROMPT], rig, options=opts(mode="dense")).cache == "computed"
    from mapclip.engine.raster.reader import open_raster
    with open_raster(path) as r:
        x0, y0, x1, y1 = r.info.bounds
    left = (x0, y0, (x0 + x1) / 2, y1)
    assert detect(path, [RED_PROMPT], rig, extent=left, options=opts()).cache == "computed"
    assert detect(path, [BLUE_PROMPT], rig, extent=left, options=opts()).cache == "memory"
    assert len(entries()) == 4


def test_a_raster_rewritten_in_place_with_the_same_size_and_time_is_embedded_again(tmp_path, rig):
    path = scene(tmp_path / "s.tif", squares=[(70, 10, 40, RED)])
    st = os.stat(path)
    first = detect(path, [RED_PROMPT], rig, options=opts())
    assert first.boxes[0].pixel[0] < 160
    # the same file name, size and modification time; the red square moved
    moved = scene(tmp_path / "m.tif", squares=[(220, 150, 40, RED)])
    with open(moved, "rb") as src:
        data = src.read()
    assert len(data) == st.st_size
    with open(path, "r+b") as dst:
        dst.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    again = detect(path, [RED_PROMPT], rig, options=opts())
    assert again.cache == "computed"
    same(again, detect(path, [RED_PROMPT], rig, options=opts(cache=False)))
    assert again.boxes[0].pixel[0] >= 160


def test_a_fine_tuned_copy_of_the_model_never_answers_from_its_parents_pass(tmp_path, rig):
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    detect(path, [RED_PROMPT], rig, options=opts())
    tuned = copy.deepcopy(rig)
    with torch.no_grad():
        next(tuned.model.visual.parameters()).add_(1e-3)   # one step of training
    res = detect(path, [RED_PROMPT], tuned, options=opts())
    assert res.cache == "computed"
    same(res, detect(path, [RED_PROMPT], tuned, options=opts(cache=False)))
    # and a model trained in place (same object) is not its old self either
    with torch.no_grad():
        next(tuned.model.visual.parameters()).add_(1e-3)
    assert detect(path, [RED_PROMPT], tuned, options=opts()).cache == "computed"


def test_damaged_or_foreign_entries_are_never_a_hit_and_are_rebuilt(tmp_path, rig):
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    ref = detect(path, [RED_PROMPT], rig, options=opts(cache=False))
    detect(path, [RED_PROMPT], rig, options=opts())
    (entry,) = entries()
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])     # a torn file
    with store.CACHE._lock:
        store.CACHE._mem.clear()
    res = detect(path, [RED_PROMPT], rig, options=opts())
    assert res.cache == "computed"
    same(res, ref)
    # an entry stored under this pass's name but made for another key is a miss
    (entry,) = entries()
    other = scene(tmp_path / "o.tif", squares=[(220, 150, 40, RED)])
    detect(other, [RED_PROMPT], rig, options=opts())
    other_entry = [e for e in entries() if e != entry][0]
    os.replace(other_entry, entry)
    with store.CACHE._lock:
        store.CACHE._mem.clear()
    res = detect(path, [RED_PROMPT], rig, options=opts())
    assert res.cache == "computed"
    same(res, ref)


def test_the_cache_is_bounded_on_disk_and_in_memory(tmp_path, rig, monkeypatch):
    paths = [scene(tmp_path / f"s{i}.tif", squares=SQUARES, seed=i) for i in range(3)]
    detect(paths[0], [RED_PROMPT], rig, options=opts())
    size = entries()[0].stat().st_size
    with np.load(entries()[0]) as z:     # the arrays alone, as held in memory
        held = sum(z[k].nbytes for k in z.files if not k.startswith("__"))
    # room for two entries on disk and one in memory
    monkeypatch.setenv(store.DISK_ENV, str((2 * size + size // 2) / 2 ** 20))
    monkeypatch.setenv(store.MEMORY_ENV, str((held + held // 2) / 2 ** 20))
    for p in paths[1:]:
        detect(p, [RED_PROMPT], rig, options=opts())
    info = store.CACHE.info()
    assert info["entries"] == 2 and info["memory_entries"] == 1
    # the oldest (the first raster's) was evicted; the newest answers from memory
    assert detect(paths[2], [RED_PROMPT], rig, options=opts()).cache == "memory"
    assert detect(paths[1], [RED_PROMPT], rig, options=opts()).cache == "disk"
    assert detect(paths[0], [RED_PROMPT], rig, options=opts()).cache == "computed"
    # a pass larger than both bounds is not kept, and says so
    monkeypatch.setenv(store.DISK_ENV, "0")
    monkeypatch.setenv(store.MEMORY_ENV, "0")
    big = scene(tmp_path / "big.tif", squares=SQUARES, seed=9)
    assert detect(big, [RED_PROMPT], rig, options=opts()).cache == "too large"
    assert store.CACHE.clear() == 2 and not entries()


def test_turned_off_nothing_is_kept_or_read(tmp_path, rig):
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    assert detect(path, [RED_PROMPT], rig, options=opts(cache=False)).cache == "off"
    assert not entries() and store.CACHE.info()["memory_entries"] == 0
    detect(path, [RED_PROMPT], rig, options=opts())
    assert detect(path, [RED_PROMPT], rig, options=opts(cache=False)).cache == "off"


def test_count_by_dense_method_reuses_the_dense_search_pass(tmp_path, rig):
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    detect(path, [RED_PROMPT], rig, options=opts(mode="dense", tile_px=64, batch_size=4, refine=False))
    res = count(path, "red roof", rig, method="dense",
                options=CountOptions(dense_tile_px=64, batch_size=4))
    assert res.dense.cache == "memory"
    fresh = count(path, "red roof", rig, method="dense",
                  options=CountOptions(dense_tile_px=64, batch_size=4, cache=False))
    assert res.dense.cache != fresh.dense.cache == "off"
    assert res.count == fresh.count
    assert [b.bounds for b in res.dense.boxes] == [b.bounds for b in fresh.dense.boxes]


def test_the_key_names_everything_the_embeddings_depend_on(tmp_path, rig):
    from mapclip.engine.cache.keys import model_facts, pass_key, raster_identity
    from mapclip.engine.core.options import ReadOptions
    from mapclip.engine.geo.tiling import PixelWindow
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    ident = raster_identity(path)
    area = PixelWindow(0, 0, 320, 256)
    base = pass_key("detect-window", ident, area, ReadOptions(), {"tile_px": 32}, model_facts(rig))
    variants = [
        pass_key("detect-dense", ident, area, ReadOptions(), {"tile_px": 32}, model_facts(rig)),
        pass_key("detect-window", ident, PixelWindow(0, 0, 320, 128), ReadOptions(), {"tile_px": 32},
                 model_facts(rig)),
        pass_key("detect-window", ident, area, ReadOptions(bands=[3, 2, 1]), {"tile_px": 32},
                 model_facts(rig)),
        pass_key("detect-window", ident, area, ReadOptions(gsd=0.5), {"tile_px": 32}, model_facts(rig)),
        pass_key("detect-window", ident, area, ReadOptions(), {"tile_px": 64}, model_facts(rig)),
        pass_key("detect-window", ident, area, ReadOptions(), {"tile_px": 32},
                 dict(model_facts(rig), precision="bf16")),
    ]
    digests = {key_digest(k) for k in variants}
    assert key_digest(base) not in digests and len(digests) == len(variants)
    # how tiles are read (threads or processes) does not change them
    same_pass = pass_key("detect-window", ident, area, ReadOptions(workers=0), {"tile_px": 32},
                         model_facts(rig))
    assert key_digest(same_pass) == key_digest(base)
    assert raster_identity("/vsicurl/http://127.0.0.1:9/x.tif") is None


def test_another_set_of_classes_on_the_same_area_is_mapped_from_the_kept_pass(tmp_path, rig):
    from mapclip.engine.classify import classify
    from mapclip.engine.core.options import ClassifyOptions
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    o = ClassifyOptions(tile_px=64, batch_size=4, scores=True)
    first = classify(path, ["red roof", "blue pool"], rig, options=o)
    assert first.cache == "computed" and first.to_json()["cache"] == "computed"
    second = classify(path, ["blue pool", "grey ground", "red roof"], rig, options=o)
    assert second.from_cache and second.cache == "memory"
    fresh = classify(path, ["blue pool", "grey ground", "red roof"], rig,
                     options=replace(o, cache=False))
    np.testing.assert_array_equal(second.class_map, fresh.class_map)
    np.testing.assert_array_equal(second.scores, fresh.scores)
    assert second.counts == fresh.counts and second.counts["red roof"] > 0
    # within polygons (a smaller area than the extent): another pass, never the whole area's
    from mapclip.engine.raster.reader import open_raster
    with open_raster(path) as r:
        x0, y0, x1, y1 = r.info.bounds
    square = {"type": "Polygon", "coordinates": [[(x0, y1), (x0 + 60, y1), (x0 + 60, y1 - 60),
                                                  (x0, y1 - 60), (x0, y1)]]}
    inside = classify(path, ["red roof", "blue pool"], rig, options=o, within=[square])
    assert inside.cache == "computed"
    fresh_inside = classify(path, ["red roof", "blue pool"], rig, options=replace(o, cache=False),
                            within=[square])
    np.testing.assert_array_equal(inside.class_map, fresh_inside.class_map)
    # another overlap is another pass
    assert classify(path, ["red roof", "blue pool"], rig,
                    options=replace(o, overlap=0.125)).cache == "computed"


def test_display_statistics_beside_the_raster_keep_the_pass_but_a_changed_nodata_does_not(tmp_path, rig):
    """QGIS writes an .aux.xml of statistics while it shows a layer: the pass stays valid.
    An .aux.xml that changes how the raster reads (here its nodata) is another pass."""
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    detect(path, [RED_PROMPT], rig, options=opts())
    stats = "".join(f'<PAMRasterBand band="{b}"><Metadata><MDI key="STATISTICS_MEAN">100</MDI>'
                    f'</Metadata></PAMRasterBand>' for b in (1, 2, 3))
    aux = tmp_path / "s.tif.aux.xml"
    aux.write_text(f"<PAMDataset>{stats}</PAMDataset>")
    assert detect(path, [BLUE_PROMPT], rig, options=opts()).cache == "memory"
    nodata = "".join(f'<PAMRasterBand band="{b}"><NoDataValue>0</NoDataValue></PAMRasterBand>'
                     for b in (1, 2, 3))
    aux.write_text(f"<PAMDataset>{nodata}</PAMDataset>")
    res = detect(path, [BLUE_PROMPT], rig, options=opts())
    assert res.cache == "computed"
    same(res, detect(path, [BLUE_PROMPT], rig, options=opts(cache=False)))


def test_counting_another_object_on_the_same_tiles_uses_the_kept_tile_embeddings(tmp_path, rig):
    path = scene(tmp_path / "s.tif", squares=SQUARES)
    o = CountOptions(tile_px=64, batch_size=4)
    first = count(path, "red roof", rig, method="prompt", options=o)
    assert first.prompt.cache == "computed"
    second = count(path, "blue pool", rig, method="prompt", options=o)
    assert second.prompt.cache == "memory" and second.prompt.to_json()["cache"] == "memory"
    fresh = count(path, "blue pool", rig, method="prompt", options=replace(o, cache=False))
    assert fresh.prompt.cache == "off"
    assert second.prompt.tiles == fresh.prompt.tiles and second.count == fresh.count
    assert second.prompt.scores == pytest.approx(fresh.prompt.scores, abs=1e-6)


def _served_bytes(server, since=0):
    """Bytes the server sent in answer to ranged GETs after the first ``since`` requests."""
    import re
    total = 0
    for method, _, rng in server.requests[since:]:
        m = re.match(r"bytes=(\d+)-(\d+)$", rng) if method == "GET" else None
        total += int(m.group(2)) - int(m.group(1)) + 1 if m else 0
    return total


def test_a_remote_raster_is_kept_by_what_its_server_says_and_a_replaced_one_is_embedded_again(
        tmp_path, rig):
    from mapclip.engine.cache.keys import _remote_spans, raster_identity
    from tests.rangeserver import RangeServer, write_cog
    from tests.raster_fixtures import noise

    def cog(path, seed):
        data = noise(3, 768, 1024, seed=seed)
        data[:, 400:440, 600:640] = np.array(RED, np.uint8)[:, None, None]
        return write_cog(path, data)

    www = tmp_path / "www"
    cog(www / "scene_cog.tif", 1)
    o = opts(tile_px=64, window=1, refine=False)     # box fitting reads pixels: not a pass
    with RangeServer(www) as server:
        url = f"{server.url}/scene_cog.tif"
        ident = raster_identity(url)
        assert ident and ident[0][0] == "/vsicurl/" + url and ident[0][1] == os.path.getsize(
            www / "scene_cog.tif") and ident[0][3]["etag"]
        first = detect("/vsicurl/" + url, [RED_PROMPT], rig, options=o)
        assert first.cache == "computed" and first.boxes
        first_bytes, seen = _served_bytes(server), len(server.requests)
        assert first_bytes > os.path.getsize(www / "scene_cog.tif") // 2      # the tiles were read
        second = detect("/vsicurl/" + url, [BLUE_PROMPT, RED_PROMPT], rig, options=o)
        assert second.from_cache and second.cache == "memory"
        assert [b.pixel for b in second.boxes if b.prompt == RED_PROMPT] == \
            [b.pixel for b in first.boxes]
        # the second run read nothing but the identity's byte ranges (head, tail, samples)
        spans = _remote_spans(ident[0][1])
        gets = [tuple(map(int, r[6:].split("-"))) for m, _, r in server.requests[seen:] if m == "GET"]
        assert gets and all(any(a < off + n and b >= off for off, n in spans) for a, b in gets)
        assert _served_bytes(server, seen) < first_bytes // 4
        # the object replaced at the server (other bytes): embedded again, as the new file is
        cog(tmp_path / "new.tif", 2)
        os.replace(tmp_path / "new.tif", www / "scene_cog.tif")
        assert raster_identity(url) != ident
        third = detect("/vsicurl/" + url, [RED_PROMPT], rig, options=o)
        assert third.cache == "computed" and not third.from_cache
        cog(tmp_path / "local.tif", 2)
        same(third, detect(str(tmp_path / "local.tif"), [RED_PROMPT], rig,
                           options=replace(o, cache=False)))
    assert raster_identity(url) is None                       # the server gone: not cached
