"""What used to break MapCLIP inside QGIS, each in the conditions that broke it.

- torch's CUDA build brings triton; with Mesa's libLLVM already loaded (as QGIS's
  OpenGL does), importing it crashed the process. plugin/runtime.py keeps triton
  out; the control case shows the crash is real on this machine.
- With torch, rasterio and affine missing, the toolbar button raised a Python
  error instead of opening the dock.
- The Archive tab's Search button passed its ``checked`` flag as a place.
"""
from __future__ import annotations

import glob
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def libllvm() -> str:
    found = sorted(glob.glob("/usr/lib/*/libLLVM-*.so.1")) or \
        sorted(glob.glob("/usr/lib/*/libLLVM*.so*"))
    if not found:
        pytest.fail("no libLLVM on this machine: QGIS from Debian brings it (mesa)")
    return found[-1]


IMPORTS = """
import ctypes, sys
ctypes.CDLL({llvm!r}, ctypes.RTLD_GLOBAL)   # what QGIS's OpenGL driver has loaded
sys.path.insert(0, {root!r})
if {block}:
    import importlib.util
    spec = importlib.util.spec_from_file_location("runtime", {root!r} + "/mapclip/plugin/runtime.py")
    runtime = importlib.util.module_from_spec(spec); spec.loader.exec_module(runtime)
    runtime.preload()
else:
    import torch, torchvision.ops, open_clip
import torch
print("imported", torch.__version__, torch.version.cuda, "triton" in sys.modules and sys.modules["triton"] is not None)
"""


def run_imports(block: bool) -> subprocess.CompletedProcess:
    code = IMPORTS.format(llvm=libllvm(), root=str(ROOT), block=block)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_heavy_imports_survive_libllvm_without_triton():
    res = run_imports(block=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("imported") and res.stdout.split()[-1] == "False"


def test_the_crash_is_real_without_the_block():
    """Control: the same imports with triton allowed die with SIGSEGV here (CUDA torch)."""
    import torch
    if torch.version.cuda is None:
        pytest.fail("build.py installs the CUDA build of torch; this torch is CPU-only")
    res = run_imports(block=False)
    assert res.returncode == -signal.SIGSEGV, (res.returncode, res.stderr[-1500:])


TOOLBAR_WITHOUT_PACKAGES = """
import sys
for name in ("torch", "torchvision", "open_clip", "rasterio", "affine"):
    sys.modules[name] = None          # not installed in QGIS's Python
sys.path.insert(0, {root!r})
from tests.plugin.conftest import IfaceStub, _import_mapclip
_import_mapclip()
from mapclip.plugin.main import MapClipPlugin
iface = IfaceStub()
plugin = MapClipPlugin(iface)
plugin.initGui()
plugin.dock_action.trigger()           # the toolbar button
dock = plugin.dock
assert dock is not None and plugin.dock_action.isChecked()
assert dock.deps_banner.isVisibleTo(dock), "no install offer in the dock"
assert "torch" in dock.deps_label.text()
assert dock.tile_spin.value() == 128 and dock.batch_spin.value() == 64   # the engine's defaults
assert "rasterio" not in [m for m in sys.modules if sys.modules[m] is not None]
plugin.unload()
print("dock opened")
"""


def test_toolbar_opens_the_dock_with_an_install_offer_when_packages_are_missing(qgis_app):
    code = TOOLBAR_WITHOUT_PACKAGES.format(root=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT))
    assert res.returncode == 0 and "dock opened" in res.stdout, res.stderr[-3000:]


def test_archive_search_button_searches_the_typed_query(iface, mapclip, qgis_settings, clean_project,
                                                         tmp_path, monkeypatch):
    from mapclip.plugin.dock.shell import MapClipDock
    dock = MapClipDock(iface, iface.main_window)
    try:
        dock.index_widget.setFilePath(str(tmp_path))
        dock.archive_query.setText("storage tanks")
        started = []
        monkeypatch.setattr(dock, "_start_archive_task",
                            lambda title, job, done: started.append(title) or True)
        dock.archive_search_button.click()          # clicked(bool) used to arrive as `like`
        assert started == ["MapCLIP: archive search 'storage tanks'"]
    finally:
        dock.shutdown()
        dock.deleteLater()
