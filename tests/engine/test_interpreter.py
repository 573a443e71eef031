"""The Python that children run (engine.core.interpreter): found by what it is, for the
reader processes and the plugin's pip alike, whatever Python comes first on PATH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mapclip.engine.core import interpreter
from mapclip.engine.core.interpreter import Identity, candidates, find

ROOT = Path(__file__).resolve().parents[2]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def _script(path: Path, body: str) -> Path:
    """An executable shell script posing as a Python."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- #
# Where each platform keeps QGIS's Python (injected values)
# --------------------------------------------------------------------------- #
def test_windows_osgeo4w_python_next_to_qgis_bin(tmp_path):
    root = tmp_path / "OSGeo4W"
    qgis = _touch(root / "bin" / "qgis-bin.exe")
    python = _touch(root / "bin" / "python.exe")
    apps = _touch(root / "apps" / "Python312" / "python.exe")
    got = candidates(str(qgis), "win32", str(tmp_path / "nowhere"), (3, 12), search_path="")
    assert got == [str(python), str(apps)]                 # never the QGIS program itself


def test_windows_standalone_python_in_apps_python3x(tmp_path):
    root = tmp_path / "QGIS 3.34"
    qgis = _touch(root / "bin" / "qgis-ltr-bin.exe")
    old = _touch(root / "apps" / "Python39" / "python.exe")
    newest = _touch(root / "apps" / "Python312" / "python.exe")
    _touch(root / "apps" / "qgis-ltr" / "python" / "qgis" / "__init__.py")
    nowhere = str(tmp_path / "nowhere")
    assert candidates(str(qgis), "win32", nowhere, (3, 12), search_path="") == [str(newest), str(old)]
    # the folder matching the running Python's version comes first, before a newer one
    assert candidates(str(qgis), "win32", nowhere, (3, 9), search_path="") == [str(old), str(newest)]


def test_macos_python_inside_the_qgis_app(tmp_path):
    app = tmp_path / "QGIS.app" / "Contents"
    qgis = _touch(app / "MacOS" / "QGIS")
    nowhere = str(tmp_path / "nowhere")
    python = _touch(app / "MacOS" / "bin" / "python3")
    framework = _touch(app / "Frameworks" / "Python.framework" / "Versions" / "3.11" / "bin" /
                       "python3.11")
    assert candidates(str(qgis), "darwin", nowhere, (3, 11), search_path="") == [str(python),
                                                                                  str(framework)]
    python.unlink()                   # newer bundles: only the Python framework inside the app
    assert candidates(str(qgis), "darwin", nowhere, (3, 11), search_path="") == [str(framework)]


def test_linux_every_python_on_path_is_a_candidate_after_the_installation_own(tmp_path):
    pyenv = _touch(tmp_path / "pyenv" / "shims" / "python3")
    usr = tmp_path / "usr"
    exe = _touch(usr / "bin" / "python3.11")
    also = _touch(usr / "bin" / "python3")
    search = os.pathsep.join([str(pyenv.parent), str(usr / "bin")])
    # sys.executable is the first python3 on PATH (what QGIS's embedded Python does)
    got = candidates(str(pyenv), "linux", str(usr), (3, 11), search_path=search)
    assert got == [str(pyenv), str(exe), str(also)]


# --------------------------------------------------------------------------- #
# Chosen by what it is
# --------------------------------------------------------------------------- #
def test_the_interpreter_is_chosen_by_version_and_standard_library_not_by_name(tmp_path):
    broken = _script(tmp_path / "a" / "python3", "echo 'Fatal Python error: init_fs_encoding' >&2; exit 1")
    other = _script(tmp_path / "b" / "python3",
                    "echo '[[3, 11, 7], \"/opt/pyenv/lib/python3.11\", \"/opt/pyenv\", \"/opt/pyenv\"]'")
    found = find([str(broken), str(other), sys.executable])
    assert found.path == sys.executable
    assert [p for p, _ in found.tried] == [str(broken), str(other)]
    assert "exited with code 1: Fatal Python error" in found.tried[0][1]
    assert "is Python 3.11.7 (/opt/pyenv)" in found.tried[1][1]
    none = find([str(broken), str(other), str(tmp_path / "missing")])
    assert none.path is None
    why = none.why_none()
    assert str(other) in why and "3.11.7" in why and "could not start" in why
    assert ".".join(map(str, sys.version_info[:3])) in why


def test_same_installation_through_another_prefix_is_the_same_python(tmp_path):
    """An embedded Python that found its executable on PATH may say prefix "/" where the
    same installation run directly says "/usr"; the standard library decides."""
    lib = tmp_path / "usr" / "lib" / "python3.11"
    lib.mkdir(parents=True)
    (tmp_path / "lib").symlink_to(tmp_path / "usr" / "lib")
    want = Identity((3, 11, 2), str(tmp_path / "lib" / "python3.11"), str(tmp_path))
    assert Identity((3, 11, 2), str(lib), str(tmp_path / "usr")).same_as(want)
    assert not Identity((3, 11, 7), str(lib), str(tmp_path / "usr")).same_as(want)
    assert not Identity((3, 11, 2), str(tmp_path / "pyenv"), str(tmp_path / "usr")).same_as(want)


def test_the_answer_is_kept_per_process(monkeypatch):
    runs = []
    monkeypatch.setattr(interpreter, "find", lambda: runs.append(1) or "found")
    monkeypatch.setattr(interpreter, "_CACHE", [])
    assert interpreter.qgis_python() == interpreter.qgis_python() == "found"
    assert runs == [1]
    interpreter.forget()
    interpreter.qgis_python()
    assert runs == [1, 1]


# --------------------------------------------------------------------------- #
# Another Python first on PATH: large jobs still read (issue 23)
# --------------------------------------------------------------------------- #
CHILD = textwrap.dedent('''
    import json, os, sys
    fake, raster, mode = sys.argv[1:4]
    sys.executable = fake                # what QGIS's Python says with pyenv first on PATH
    os.cpu_count = lambda: 2             # "auto" picks one reader process on any machine
    from mapclip.engine.core import interpreter
    if mode == "none":                   # no interpreter like this one anywhere
        interpreter.candidates = lambda *a, **k: [fake]
    elif mode == "broken":               # one that matches but cannot start the readers
        interpreter._CACHE.append(interpreter.Search(fake, interpreter.running()))
    from dataclasses import replace
    from mapclip.engine.core.options import DetectOptions, ReadOptions
    from mapclip.engine.detect import detect
    from mapclip.engine.raster.stream import iter_tile_batches
    from mapclip.engine.raster.reader import open_raster
    from tests.rigged import RED_PROMPT, rigged_model
    out = {}
    for workers in ("auto", 0):
        with open_raster(raster, ReadOptions(workers=workers), quiet=True) as r:
            it = iter_tile_batches(r, r.grid(tile_px=32).tiles, 64)
            with it:
                batches = [(t[0].index, int(a.astype("int64").sum())) for t, a in it]
            out[str(workers)] = {"kind": type(it).__name__, "batches": batches,
                                 "tiles": it.total, "notes": it.notes,
                                 "warnings": list(r.warnings),
                                 "processes": getattr(it, "_fallback", 1) is None}
    rig = rigged_model()
    opts = DetectOptions(tile_px=32, window=1, top_k=3, refine=False, cache=False)  # read each time
    res = detect(raster, [RED_PROMPT], rig, options=replace(opts, read=ReadOptions(workers="auto")))
    out["boxes"] = [list(b.pixel) for b in res.boxes]
    out["search_notes"] = [n for n in res.warnings if "reader processes" in n]
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def large_raster(tmp_path_factory):
    import numpy as np

    from tests.raster_fixtures import make_raster, noise
    data = noise(3, 1024, 1024, seed=5)
    data[:, 600:640, 320:352] = np.array((255, 0, 0), np.uint8)[:, None, None]
    return make_raster(tmp_path_factory.mktemp("big") / "big.tif", data=data, block=64)


def _run_with_another_python_first(tmp_path, raster, mode: str) -> dict:
    """A fresh Python whose sys.executable is a Python that exits 1 (pyenv's, first on PATH),
    reading 1,024 tiles with reader processes on "auto"."""
    fake = _script(tmp_path / "pyenv" / "shims" / "python3", "exit 1")
    env = dict(os.environ, PATH=os.pathsep.join([str(fake.parent), os.environ.get("PATH", "")]),
               PYTHONPATH=str(ROOT))
    env.pop("MAPCLIP_READ_WORKERS", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(fake), str(raster), mode],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_another_python_first_on_path_reads_through_qgis_own_python(tmp_path, large_raster):
    out = _run_with_another_python_first(tmp_path, large_raster, "find")
    auto, threads = out["auto"], out["0"]
    assert auto["tiles"] == 1024 and auto["kind"] == "ProcessTileBatches"
    assert auto["processes"] and auto["notes"] == [] and auto["warnings"] == []
    assert auto["batches"] == threads["batches"] and threads["kind"] == "TileBatches"
    assert out["boxes"] and out["boxes"][0] == [320, 608, 352, 640]
    assert out["search_notes"] == []


@pytest.mark.parametrize("mode", ["none", "broken"])
def test_reader_processes_that_cannot_start_give_way_to_threads_with_one_note(
        tmp_path, large_raster, mode):
    out = _run_with_another_python_first(tmp_path, large_raster, mode)
    auto, threads = out["auto"], out["0"]
    assert auto["kind"] == "ProcessTileBatches" and not auto["processes"]
    assert auto["batches"] == threads["batches"]                 # every tile, same bytes
    assert len(auto["notes"]) == 1 and auto["warnings"] == auto["notes"]
    note = auto["notes"][0]
    assert "read with threads" in note and "--read-workers 0" in note
    if mode == "none":
        assert "no Python program matching this one" in note
        assert "pyenv/shims/python3 exited with code 1" in note
    else:
        assert "pyenv/shims/python3" in note and "failed" in note
    # the search itself succeeds, reading with threads, and its result says so once
    assert out["boxes"] and out["boxes"][0] == [320, 608, 352, 640]
    assert out["search_notes"] == [note]


def test_an_index_build_without_a_matching_python_reads_with_threads_and_says_so_once(
        tmp_path, tiny_model, monkeypatch):
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.store import open_index
    from mapclip.engine.core.options import IndexOptions, ReadOptions
    from mapclip.engine.raster import workers
    from tests.raster_fixtures import make_raster, noise
    monkeypatch.setattr(interpreter, "_CACHE", [interpreter.Search(None, interpreter.running())])
    monkeypatch.setattr(workers, "_START_FAILED", [])
    (tmp_path / "in").mkdir()
    for k in range(2):
        make_raster(tmp_path / "in" / f"r{k}.tif", 128, 96, data=noise(3, 96, 128, seed=k))
    out = {}
    for w in (0, 2):
        opts = IndexOptions(tile_px=32, footprints=False, read=ReadOptions(workers=w))
        out[w] = build_index([str(tmp_path / "in")], tmp_path / f"ix{w}", tiny_model, opts)
    assert out[0].warnings == []
    notes = [n for n in out[2].warnings if "reader processes" in n]
    assert len(notes) == 1 and "no Python program" in notes[0] and "--read-workers 0" in notes[0]
    assert open_index(tmp_path / "ix2").rows == open_index(tmp_path / "ix0").rows == 24
