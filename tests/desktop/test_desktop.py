"""MapCLIP in the real QGIS desktop, installed as an analyst installs it.

One QGIS session, started once for this module:

- the real ``qgis`` binary (Debian's QGIS 3.22) on a virtual screen (Xvfb),
  with its own OpenGL (Mesa llvmpipe, which loads libLLVM into the process);
- a fresh profile with MapCLIP unzipped from the ``build.py package`` zip into
  its plugins folder and enabled;
- the Python packages laid out as the plugin's installer lays them out
  (``<profile>/python/mapclip-deps``, one folder of packages in front of
  QGIS's own), here linked from the build's virtual environment: the CUDA
  build of torch with triton, i.e. the configuration that used to crash QGIS;
- QGIS's own Python (/usr/bin/python3), no virtual environment.

tests/desktop/drive_qgis.py runs inside that QGIS (``--code``) and uses the
dock, the archive tab, the map tool, the dialogs and a Processing dialog by
their visible labels; the tests here check what it recorded, that QGIS
exited normally, and that no Python error reached QGIS's log.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "drive_qgis.py"
QGIS = shutil.which("qgis") or "/usr/bin/qgis"
SYSTEM_PY = "/usr/bin/python3"
#: how long the whole desktop session may take (the CPU runs every model)
SESSION_TIMEOUT = 900
#: the COGs the desktop session indexes through a STAC catalogue served over loopback
STAC_COGS = ("s11_cog.tif", "s12_cog.tif", "s13_cog.tif")


def _deps_module():
    """The deps folder module (prune_protected), imported as the plugin imports it."""
    return importlib.import_module("mapclip.plugin.deps.folder")


def lay_out_packages(target: Path) -> None:
    """Fill ``target`` as the installer does (a ``pip --target`` folder), from this venv.

    Files are hard links (real files in the folder, as pip writes them; no
    copy of several GB), or copies across file systems. The installer's own
    clean-up (plugin/deps/folder.py prune_protected) then takes out what QGIS
    provides (NumPy, GDAL, Qt bindings), as it does after pip.
    """
    deps = _deps_module()
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir(parents=True)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in sorted(site.iterdir()):
        if entry.name == "__pycache__" or entry.suffix == ".pth":
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name, copy_function=link_or_copy, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            link_or_copy(entry, target / entry.name)
    removed = deps.prune_protected(str(target))
    assert "numpy" in removed, removed


def _truth(t) -> dict:
    """What the scene holds, in its CRS: class -> object boxes; the CRS and the bounds."""
    from rasterio.crs import CRS
    boxes = {}
    for b in t.boxes:
        boxes.setdefault(b.cls, []).append(list(b.bounds))
    x0, y0 = t.affine * (0, 0)
    x1, y1 = t.affine * (t.width, t.height)
    return {"crs": CRS.from_user_input(t.crs).to_string(), "boxes": boxes,
            "bounds": [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]}


def make_data(data: Path) -> Path:
    """A synthetic scene, an archive of two scenes, chips with captions, duplicate images."""
    import numpy as np
    from PIL import Image

    from mapclip.engine.data.synthetic.scene import make_scene
    data.mkdir()
    scene = data / "scene.tif"
    truth = {"scene": _truth(make_scene(str(scene), width=1024, seed=3))}  # tanks, airplanes, ships
    archive = data / "archive"
    archive.mkdir()
    for seed in (11, 12):
        truth[f"s{seed}.tif"] = _truth(make_scene(str(archive / f"s{seed}.tif"), width=256, seed=seed,
                                                  mask_path=None, coco_path=None))
    (data / "truth.json").write_text(json.dumps(truth))
    # three COGs of small scenes, to be served over loopback and listed by a STAC catalogue
    import rasterio
    www = data / "www"
    www.mkdir()
    for seed in (11, 12, 13):
        src = archive / f"s{seed}.tif" if seed != 13 else data / "s13.tif"
        if seed == 13:
            make_scene(str(src), width=256, seed=seed, mask_path=None, coco_path=None)
        with rasterio.open(src) as ds:
            profile = dict(ds.profile, driver="COG", blocksize=128, compress="deflate")
            for k in ("tiled", "blockxsize", "blockysize", "interleave"):
                profile.pop(k, None)
            with rasterio.open(www / f"s{seed}_cog.tif", "w", **profile) as out:
                out.write(ds.read())
    chips = data / "chips"
    chips.mkdir()
    import rasterio
    with rasterio.open(scene) as ds:
        img = np.moveaxis(ds.read([1, 2, 3]), 0, -1)
    rows = ["image,caption"]
    words = ["storage tanks", "a runway", "ships in a harbor", "trees", "buildings", "water",
             "a road", "bare ground"]
    for i in range(8):
        r, c = divmod(i, 4)
        Image.fromarray(img[r * 96:(r + 1) * 96, c * 96:(c + 1) * 96]).save(chips / f"c{i}.png")
        rows.append(f"c{i}.png,{words[i]}")
    (chips / "captions.csv").write_text("\n".join(rows) + "\n")
    dups = data / "dups"
    dups.mkdir()
    Image.fromarray(img[:128, :128]).save(dups / "a.png")
    Image.fromarray(img[:128, :128]).save(dups / "a_copy.png")
    Image.fromarray(img[200:328, 200:328]).save(dups / "b.png")
    return scene


def write_profile(profiles: Path, zip_path: Path) -> Path:
    """A fresh QGIS profile with MapCLIP unzipped and enabled, as "Install from ZIP" leaves it."""
    profile = profiles / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins)
    (profile / "QGIS").mkdir()
    (profile / "QGIS" / "QGIS3.ini").write_text(
        "[PythonPlugins]\nmapclip=true\n\n"
        "[qgis]\ncheckVersion=false\nshowTips=false\n"
        "allowCrashReporting=false\n\n[core]\nlocale\\userLocale=en_US\n")
    return profile


def start_xvfb(env: dict) -> subprocess.Popen:
    read, write = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1600x1000x24",
                             "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as fh:
        display = fh.readline().strip()
    env["DISPLAY"] = f":{display}"
    return proc


@pytest.fixture(scope="module")
def desktop():
    """Run the whole desktop session once; the results the driver recorded."""
    if not shutil.which("Xvfb"):
        pytest.fail("Xvfb is missing: `python3 build.py setup` installs it (Debian package xvfb)")
    # beside the venv, so the packages' folder is hard links on the same file system
    work = ROOT / ".cache" / "desktop-tests"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out, profiles, home = work / "out", work / "profiles", work / "home"
    out.mkdir()
    home.mkdir()
    scene = make_data(work / "data")
    sys.path.insert(0, str(ROOT))
    import build
    zip_path = build.write_package(work / "dist")
    profile = write_profile(profiles, zip_path)
    lay_out_packages(profile / "python" / "mapclip-deps")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "QT_QPA_PLATFORM", "PYTHONHOME")}
    # another Python first on PATH (a user's pyenv, conda or venv): here one that cannot
    # even start, so only QGIS's own interpreter, found by what it is, can run the readers
    wrong = work / "another-python"
    wrong.mkdir()
    for name in ("python3", "python"):
        (wrong / name).write_text("#!/bin/sh\necho 'not the Python QGIS runs' >&2\nexit 1\n")
        (wrong / name).chmod(0o755)
    env.update(PATH=f"{wrong}:/usr/local/bin:/usr/bin:/bin", HOME=str(home),
               XDG_RUNTIME_DIR=str(work / "runtime"), MAPCLIP_CACHE=str(work / "cache"),
               MAPCLIP_E2E_OUT=str(out), MAPCLIP_E2E_DATA=str(work / "data"),
               PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="2")
    (work / "runtime").mkdir(mode=0o700)
    from tests.engine.test_remote import _catalogue
    from tests.rangeserver import RangeServer
    server = RangeServer(work / "data" / "www").__enter__()
    env["MAPCLIP_E2E_STAC"] = _catalogue(work / "data" / "www", server.url, names=STAC_COGS)
    xvfb = start_xvfb(env)
    try:
        cmd = [QGIS, "--profiles-path", str(profiles), "--profile", "default", "--nologo",
               "--noversioncheck", "--code", str(DRIVER), str(scene)]
        with open(out / "qgis.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=SESSION_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = "timeout"
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=30)
        server.__exit__(None, None, None)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"steps": {}}
    results["exit_code"] = code
    results["qgis_log"] = (out / "qgis.log").read_text(errors="replace")[-20000:]
    results["faults"] = (out / "faulthandler.log").read_text(errors="replace") \
        if (out / "faulthandler.log").exists() else ""
    results["out"] = str(out)
    results["truth"] = json.loads((work / "data" / "truth.json").read_text())
    keep = os.environ.get("MAPCLIP_DESKTOP_KEEP")
    if keep:  # screenshots and logs for a person to look at
        shutil.copytree(out, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("index"))
    return results


def test_qgis_runs_the_session_and_exits_normally(desktop):
    assert "Fatal Python error" not in desktop["faults"], desktop["faults"][-3000:]
    assert desktop.get("finished"), (desktop["exit_code"], desktop["qgis_log"][-3000:])
    assert desktop["exit_code"] == 0, (desktop["exit_code"], desktop["qgis_log"][-3000:])


def test_no_python_error_reaches_qgis(desktop):
    assert desktop.get("finished")
    assert desktop["python_errors"] == []


def test_the_installed_packages_come_first_and_triton_stays_out(desktop):
    start = desktop["steps"]["start"]
    assert start["ok"], start
    assert start["deps_index"] == 0, start["sys_path_head"]
    boxes = desktop["steps"]["search_boxes"]
    assert boxes["ok"], boxes
    # the configuration that used to crash: a CUDA torch next to Mesa's libLLVM
    assert boxes["torch_cuda_build"], boxes
    assert "mapclip-deps" in boxes["torch_file"], boxes["torch_file"]
    assert boxes["libllvm_loaded"], "Mesa's libLLVM was not loaded: the crash case is not covered"
    assert boxes["triton_blocked"]


def test_reader_processes_run_qgis_own_python_with_another_python_first_on_path(desktop):
    """The first python3 on PATH is one that cannot start; the dock's search (1,849 tiles)
    still reads with reader processes, through QGIS's own interpreter found by what it is."""
    start, boxes = desktop["steps"]["start"], desktop["steps"]["search_boxes"]
    assert start["ok"] and boxes["ok"], (start, boxes)
    assert "another-python" in start["first_python_on_path"], start
    if (os.cpu_count() or 1) >= 2:
        assert boxes["reader_processes"] and all(n >= 1 for n in boxes["reader_processes"]), boxes


def test_a_search_from_the_dock_adds_a_styled_layer_with_the_models_defaults(desktop):
    boxes = desktop["steps"]["search_boxes"]
    assert boxes["ok"], boxes
    assert boxes["features"] >= 1 and boxes["renderer"] == "graduatedSymbol"
    assert [f for f in boxes["fields"] if f != "fid"][:5] == ["prompt", "score", "cosine", "rank",
                                                             "model"]
    assert boxes["results_rows"] == boxes["features"]
    # nothing changed in the dock: the engine fills in the demo model's own tile size
    assert boxes["request"]["tile_px"] is None
    assert Path(boxes["screenshot"]).stat().st_size > 20000


STEPS = ["open_dock", "describe", "second_prompt", "mark_examples", "search_heatmap", "archive_stac", "count", "land_cover", "cancel", "try_the_demo", "error_empty_prompt",
         "error_bad_bands", "error_missing_checkpoint", "archive_build", "archive_search_button",
         "archive_map_tool", "dialog_convert", "dialog_dedup", "dialog_finetune",
         "processing_toolbox", "unload"]


@pytest.mark.parametrize("name", STEPS)
def test_step(desktop, name):
    entry = desktop["steps"].get(name)
    assert entry is not None, f"step {name} never ran (QGIS stopped before it)"
    assert entry["ok"], entry.get("traceback") or entry


def test_a_second_prompt_and_a_mode_switch_reuse_the_first_searchs_embeddings(desktop):
    first, second = desktop["steps"]["search_boxes"], desktop["steps"]["second_prompt"]
    assert first["ok"] and second["ok"], (first, second)
    assert first["cache"] == "computed" and second["from_cache"] and second["cache"] == "memory"
    assert second["boxes"] >= 1
    assert desktop["steps"]["search_heatmap"]["from_cache"]
    print(f"first search {first['engine_seconds']} s; second prompt {second['engine_seconds']} s "
          f"in the engine, {second['seconds_to_boxes']} s from Run to the layer")


def test_two_marks_in_the_dock_change_the_ranking_from_the_kept_embeddings(desktop):
    """Search, mark two results ("Yes, like this", "Not this"), see the ranking change: each
    refresh answered from the kept embeddings; the box marked "not this" leaves the top three."""
    step = desktop["steps"]["mark_examples"]
    assert step["ok"], step
    yes, no = step["refreshes"]
    assert step["marks"] == [1, 1] and step["examples_layer"] == "MapCLIP examples"
    assert yes["rows"] != step["before"] and no["rows"] != yes["rows"]
    assert "refined by 1 yes / 0 not" in yes["status"] and "refined by 1 yes / 1 not" in no["status"]
    assert all("from the kept embeddings" in r["status"] for r in (yes, no))
    assert no["marked"] not in [r[2:] for r in no["rows"][:3]], no
    print(f"refresh after a mark: {yes['seconds']} s and {no['seconds']} s from the mark to the layer")


def _overlaps(box, truth):
    x0, y0, x1, y1 = box
    return any(x0 < t[2] and t[0] < x1 and y0 < t[3] and t[1] < y1 for t in truth)


def _holds_centre(box, truth):
    x0, y0, x1, y1 = box
    return any(x0 <= (t[0] + t[2]) / 2 <= x1 and y0 <= (t[1] + t[3]) / 2 <= y1 for t in truth)


def test_what_the_analyst_sees_is_on_the_scenes_objects(desktop):
    """Not only that layers appeared: the boxes lie on the scene's true objects, in the
    scene's CRS; the caption names what is there; archive hits lie inside the indexed rasters.
    Measured on the demo model (2026-12-07): the 4 tank boxes all overlap a tank, 2 hold a
    tank's centre; 3 of the top 4 ship boxes hold a ship's centre. The floors keep a margin."""
    truth = desktop["truth"]
    scene = truth["scene"]
    tanks, ships = scene["boxes"]["storage-tank"], scene["boxes"]["ship"]
    boxes = desktop["steps"]["search_boxes"]
    assert boxes["ok"] and boxes["crs"] == scene["crs"], (boxes.get("crs"), scene["crs"])
    top = [b[2:] for b in boxes["boxes"][:4]]
    assert sum(_overlaps(b, tanks) for b in top) >= min(3, len(top)), (top, tanks)
    assert any(_holds_centre(b, tanks) for b in top), (top, tanks)
    second = desktop["steps"]["second_prompt"]
    assert second["ok"] and second["crs"] == scene["crs"]
    top_ships = [b[2:] for b in second["ship_boxes"][:4]]
    assert sum(_holds_centre(b, ships) for b in top_ships) >= 2, (top_ships, ships)
    caption = desktop["steps"]["describe"]["caption"]
    assert "storage tank" in caption, caption
    hits = desktop["steps"]["archive_search_button"]
    assert hits["ok"] and hits["hits_crs"] == truth["s11.tif"]["crs"] and hits["hit_rows"]
    xmin, ymin, xmax, ymax = truth["s11.tif"]["bounds"]   # both archive scenes share these bounds
    for h in hits["hit_rows"]:
        b = h["bounds"]
        assert xmin - 1e-6 <= b[0] < b[2] <= xmax + 1e-6 and ymin - 1e-6 <= b[1] < b[3] <= ymax + 1e-6, h


def test_the_archive_tab_indexes_a_stac_catalogue_and_finds_what_the_files_give(desktop):
    """The dock's Archive tab, given a STAC catalogue's URL, indexes its three COGs over HTTP;
    its search hits are the hits of an index of the same files on disk (built here, the same
    engine calls)."""
    step = desktop["steps"]["archive_stac"]
    assert step["ok"], step.get("traceback") or step
    assert sorted(r.rsplit("/", 1)[-1] for r in step["indexed"]) == sorted(STAC_COGS)
    assert all(r.startswith("/vsicurl/http://127.0.0.1:") for r in step["indexed"])
    assert len(step["hits"]) >= 10 and step["hits_crs"] == "EPSG:32633"
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.search import search_index
    from mapclip.engine.archive.store import open_index
    from mapclip.engine.model.models import load_model
    work = ROOT / ".cache" / "desktop-tests"
    local = [str(work / "data" / "www" / n) for n in STAC_COGS]
    lm = load_model("demo", device="cpu")
    build_index(local, work / "local_idx", lm)
    from mapclip.engine.core.options import SearchOptions
    hits = search_index(open_index(work / "local_idx"), text="storage tanks", model=lm,
                        options=SearchOptions(top_k=len(step["hits"])))
    mine = [(h["raster"].rsplit("/", 1)[-1], [round(v, 3) for v in h["bounds"]]) for h in step["hits"]]
    theirs = [(str(h.raster).rsplit("/", 1)[-1], [round(v, 3) for v in h.bounds]) for h in hits]
    assert mine == theirs


def test_processing_dialog_labels_fit(desktop):
    """The detect dialog's labels are short enough not to be cut off (the Model field included)."""
    step = desktop["steps"]["processing_toolbox"]
    assert step["ok"], step
    assert step["long_labels"] == []


def test_the_archive_map_tool_does_not_move_the_map(desktop):
    step = desktop["steps"]["archive_map_tool"]
    assert step["ok"], step
    assert step["extent_moved"] == 0 and step["tool_restored"]


def test_the_dock_with_advanced_open_fits_a_1000_px_window(desktop):
    step = desktop["steps"]["small_screen"]
    assert step["ok"], step.get("traceback") or step
    assert step["window_height"] <= 1000 and step["dock_height"] < step["window_height"], step
    assert step["dock_hint"] < 700 and step["results_height"] >= 120, step
    assert step["run_visible"] and step["describe_visible"], step
