"""The dependency installer (plugin/deps/), for real and in its parts.

The real tests run the installer's own code path: PipInstaller in a QProcess,
real pip with QGIS's Python (/usr/bin/python3), against PEP 503 indexes served
on 127.0.0.1 by http.server from wheels this file builds (a "sympy" newer than
Debian's 1.11 with a marker, a fake NumPy with QGIS's version, a stand-in that
needs both, and fake torch builds: a "CUDA" one on the default index, a
``+cpu`` one on the CPU index). Nothing is downloaded; the install goes to a
temporary folder, never to the user's profile. A fresh /usr/bin/python3 with
the sys.path QGIS will have then shows which copies win.

The unit tests cover what cannot run here: the CPU/CUDA choice, the pip
command lines, the Windows and macOS interpreter paths, the sys.path order,
the clean-up of QGIS's own packages, progress parsing and the diagnosis.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

SYSTEM_PY = "/usr/bin/python3"
MARKER = "from-the-mapclip-test-index"


# --------------------------------------------------------------------------- #
# Helpers: wheels, a local index, QGIS's sys.path
# --------------------------------------------------------------------------- #
def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(folder: Path, name: str, version: str, files: dict, requires=(),
                scripts: dict = None) -> Path:
    """A pure-Python wheel ``name-version-py3-none-any.whl`` with ``files`` (path -> text)."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    content = {path: text if isinstance(text, bytes) else text.encode()
               for path, text in files.items()}
    for script, text in (scripts or {}).items():
        content[f"{dist}-{version}.data/scripts/{script}"] = text.encode()
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    content[f"{info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    content[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: mapclip-test\n"
                                b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    tops = sorted({p.split("/", 1)[0] for p in files})
    content[f"{info}/top_level.txt"] = ("\n".join(tops) + "\n").encode()
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    for path, data in content.items():
        writer.writerow([path, _record_hash(data), len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    content[f"{info}/RECORD"] = rows.getvalue().encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arc, data in content.items():
            zf.writestr(arc, data)
    return path


def write_simple_index(root: Path, wheels) -> None:
    """A PEP 503 index under ``root``: root/<project>/index.html linking its wheels."""
    by_project = {}
    for wheel in wheels:
        project = wheel.name.split("-", 1)[0].replace("_", "-").lower()
        by_project.setdefault(project, []).append(wheel)
    root.mkdir(parents=True, exist_ok=True)
    links = []
    for project, files in by_project.items():
        (root / project).mkdir(exist_ok=True)
        anchors = []
        for wheel in files:
            (root / project / wheel.name).write_bytes(wheel.read_bytes())
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            href = wheel.name.replace("+", "%2B")
            anchors.append(f'<a href="{href}#sha256={digest}">{wheel.name}</a><br/>')
        (root / project / "index.html").write_text(
            "<!DOCTYPE html><html><body>" + "".join(anchors) + "</body></html>")
        links.append(f'<a href="{project}/">{project}</a><br/>')
    (root / "index.html").write_text("<!DOCTYPE html><html><body>" + "".join(links)
                                     + "</body></html>")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def local_index(tmp_path):
    """Two indexes on 127.0.0.1: /simple/ (stands for PyPI) and /cpu/ (the PyTorch CPU index)."""
    wheels = tmp_path / "wheels"
    sympy = build_wheel(wheels / "pypi", "sympy", "1.14.0", {
        "sympy/__init__.py": f"__version__ = '1.14.0'\nMAPCLIP_MARKER = {MARKER!r}\n",
        "sympy/core/__init__.py": "",
        "sympy/core/numbers.py": "def equal_valued(a, b):\n    return a == b\n",
    })
    # QGIS's NumPy version, so the resolver is satisfied; the installer must delete it again
    fake_numpy = build_wheel(wheels / "pypi", "numpy", "1.24.2", {
        "numpy/__init__.py": "__version__ = '1.24.2'\nFAKE_FROM_TEST_INDEX = True\n",
    }, scripts={"f2py": "#!python\nprint('fake f2py')\n"})
    standin = build_wheel(wheels / "pypi", "mapclip-standin", "1.0", {
        "mapclip_standin/__init__.py": ("import numpy\n"
                                        "from sympy.core.numbers import equal_valued\n"
                                        "OK = equal_valued(1, 1)\n"),
    }, requires=["sympy>=1.13.3", "numpy"])
    cuda_torch = build_wheel(wheels / "pypi", "torch", "2.14.1", {
        "torch/__init__.py": "from .version import __version__\nfrom . import version\n",
        "torch/version.py": "__version__ = '2.14.1+cu130'\ncuda: 'Optional[str]' = '13.0'\n",
    })
    cpu_torch = build_wheel(wheels / "cpu", "torch", "2.14.1+cpu", {
        "torch/__init__.py": "from .version import __version__\nfrom . import version\n",
        "torch/version.py": "__version__ = '2.14.1+cpu'\ncuda: 'Optional[str]' = None\n",
        # big enough (over 40 kB) for pip to draw its download bar
        "torch/_weights.bin": os.urandom(300_000),
    })
    served = tmp_path / "served"
    write_simple_index(served / "simple", [sympy, fake_numpy, standin, cuda_torch])
    write_simple_index(served / "cpu", [cpu_torch])
    handler = lambda *a, **kw: _Quiet(*a, directory=str(served), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield {"simple": f"{base}/simple/", "cpu": f"{base}/cpu/"}
    server.shutdown()
    server.server_close()


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_pip_env(tmp_path) -> dict:
    """pip ignores this machine's pip configuration (indexes, find-links) and caches."""
    env = {k: None for k in os.environ if k.startswith("PIP_")}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
                "PIP_TIMEOUT": "5", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", "HOME": str(tmp_path)})
    return env


def system_path() -> list:
    """The sys.path of QGIS's Python (/usr/bin/python3) as QGIS starts it, without ''."""
    out = subprocess.run([SYSTEM_PY, "-s", "-c", "import json, sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, check=True, env=_clean_env())
    return [p for p in json.loads(out.stdout) if p]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return env


def system_pip_wheel():
    """None when QGIS's Python has pip (python3-pip); else the pip wheel python3-venv brings."""
    from mapclip.plugin.deps.plan import pip_wheel
    has_pip = subprocess.run([SYSTEM_PY, "-c", "import pip"], capture_output=True,
                             env=_clean_env()).returncode == 0
    return None if has_pip else pip_wheel()


def run_installer(qtbot, plan, timeout_ms=90000):
    from mapclip.plugin.deps.installer import PipInstaller
    inst = PipInstaller(plan)
    events, results = [], []
    inst.progress.connect(lambda f, text: events.append((f, text)))
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.start()
    qtbot.waitUntil(lambda: bool(results), timeout=timeout_ms)
    return inst, events, results[0]


def fresh_python(path, code: str) -> dict:
    """Run ``code`` in a fresh /usr/bin/python3 whose sys.path is ``path``; it prints JSON."""
    script = f"import json, sys\nsys.path[:] = {list(path)!r}\n{code}"
    out = subprocess.run([SYSTEM_PY, "-s", "-c", script], capture_output=True, text=True,
                         env=_clean_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- #
# For real: pip with QGIS's Python against a local index
# --------------------------------------------------------------------------- #
def test_real_install_wins_over_system_copies_keeps_qgis_numpy_and_reports_cpu_torch(
        mapclip, qtbot, tmp_path, local_index, monkeypatch):
    from mapclip.plugin.deps.folder import qgis_path
    from mapclip.plugin.deps.plan import pip_plan
    from mapclip.plugin.deps.verify import install_record, verify_install
    system_sympy = fresh_python(system_path(), "import sympy\nprint(json.dumps(sympy.__version__))")
    assert system_sympy.startswith("1.11"), "Debian's sympy is the older copy this test is about"
    system_numpy = fresh_python(system_path(), "import numpy\n"
                                "print(json.dumps([numpy.__version__, numpy.__file__]))")
    target = tmp_path / "profile" / "python" / "mapclip-deps"
    qgis_paths = system_path()
    plan = pip_plan(target=str(target), cuda=False, numpy_version=system_numpy[0],
                    python=SYSTEM_PY, requirements=["mapclip-standin==1.0", "torch==2.14.1"],
                    platform="linux", index_url=local_index["simple"],
                    torch_index=local_index["cpu"], env=isolated_pip_env(tmp_path),
                    verify_modules=["numpy", "sympy", "mapclip_standin", "torch"],
                    verify_path=[str(target), *qgis_paths], wheel=system_pip_wheel())
    cmd = plan.command()
    assert "torch==2.14.1+cpu" in cmd and f"numpy=={system_numpy[0]}" in cmd
    monkeypatch.setattr(sys, "path", list(sys.path))     # the installer adds the folder
    inst, events, (ok, message) = run_installer(qtbot, plan)
    assert ok, message + "\n" + "\n".join(inst.output)

    # which torch build it really installed, in the report and in the message
    assert inst.report.torch is not None and inst.report.torch.cuda is None
    assert inst.report.torch.version == "2.14.1+cpu"
    record = install_record(str(target))
    assert record["numpy"] == system_numpy[0] and record["torch"]["cuda"] is None
    assert record["torch_build_asked"] == "CPU" and "torch==2.14.1+cpu" in record["packages"]
    assert "torch 2.14.1+cpu (CPU build)" in message
    # QGIS's NumPy is never taken from the folder: pip put the fake one there, it is gone
    assert "numpy-1.24.2.dist-info" in inst.report.pruned and "numpy" in inst.report.pruned
    assert not (target / "numpy").exists()
    assert not list(target.glob("numpy-*.dist-info")) and not (target / "bin" / "f2py").exists()
    assert (target / "sympy").is_dir() and (target / "mapclip_standin").is_dir()
    # the check ran with QGIS's sys.path and saw the folder's sympy
    data = inst.report.verify.data
    assert data["loaded"]["sympy"].startswith(str(target))
    assert data["loaded"]["numpy"] == system_numpy[1]

    # progress: determinate fractions from pip's own byte counts, texts that name the packages
    assert all(f == -1 or 0.0 <= f <= 1.0 for f, _ in events)
    assert any(f == 0.0 and t.startswith("downloading torch 2.14.1+cpu (30") for f, t in events), \
        events
    assert any(f == pytest.approx(1.0) and t.startswith("downloading torch 2.14.1+cpu: 30")
               and " kB of 30" in t for f, t in events), events
    texts = " | ".join(t for _, t in events)
    assert "downloading sympy 1.14.0" in texts and "collecting mapclip-standin" in texts, texts
    assert "\x1b" not in texts and not any("\x1b" in line for line in inst.output)
    assert any(f < 0 and "checking" in t for f, t in events)
    # the running QGIS gets the folder at the front of sys.path
    assert sys.path[0] == str(target)

    # a fresh QGIS Python with the sys.path QGIS will have: the folder wins, NumPy stays QGIS's
    got = fresh_python(qgis_path(str(target), qgis_paths), """
import numpy, sympy, mapclip_standin, torch
print(json.dumps({"sympy": sympy.__file__, "marker": getattr(sympy, "MAPCLIP_MARKER", None),
                  "numpy": numpy.__file__, "numpy_version": numpy.__version__,
                  "fake_numpy": hasattr(numpy, "FAKE_FROM_TEST_INDEX"),
                  "standin": mapclip_standin.OK, "torch_cuda": torch.version.cuda}))
""")
    assert got["marker"] == MARKER and got["sympy"].startswith(str(target))
    assert got["numpy"] == system_numpy[1] and got["numpy_version"] == system_numpy[0]
    assert not got["fake_numpy"] and got["standin"] is True and got["torch_cuda"] is None

    # the same folder at the END of the path (the old installer's layout) is what broke
    # searches: the check names the module, the error, the shadowing copy and a real fix
    result = verify_install(str(target), SYSTEM_PY, ["mapclip_standin"],
                            path=[*qgis_paths, str(target)], if_present=())
    assert not result.ok
    problem = result.problems[0]
    assert problem.module == "mapclip_standin"
    assert "equal_valued" in problem.error and "ImportError" in problem.error
    assert "sympy is imported from /usr/lib/python3/dist-packages" in problem.cause
    assert "installing again cannot help" in problem.cause
    assert "python3-sympy" in problem.fix and "restart QGIS" in problem.fix


def test_real_install_fails_clearly_when_the_cpu_index_is_unreachable_and_takes_no_cuda_build(
        mapclip, qtbot, tmp_path, local_index):
    from mapclip.plugin.deps.plan import pip_plan
    target = tmp_path / "mapclip-deps"
    dead = f"http://127.0.0.1:{free_port()}/cpu/"
    plan = pip_plan(target=str(target), cuda=False, numpy_version="1.24.2",
                    python=SYSTEM_PY, requirements=["torch==2.14.1"], platform="linux",
                    index_url=local_index["simple"], torch_index=dead,
                    env=isolated_pip_env(tmp_path), verify_path=[str(target)],
                    wheel=system_pip_wheel())
    inst, events, (ok, message) = run_installer(qtbot, plan, timeout_ms=60000)
    assert not ok
    assert "could not reach the PyTorch CPU wheel index" in message and dead in message
    assert "torch==2.14.1+cpu" in message
    assert "does not fall back" in message and "CUDA" in message
    assert "Fix:" in message and "--index-url " + dead in message
    # the default index's (CUDA) torch was not installed, nothing was
    assert not (target / "torch").exists()
    assert inst.report.pip_ok is False and inst.report.torch is None


def test_install_button_runs_the_real_installer_and_reports_the_torch_build(
        mapclip, iface, qgis_settings, qtbot, tmp_path, local_index, monkeypatch):
    """The plugin's own Install button: real pip, local index, the message bar's verdict."""
    from qgis.PyQt.QtWidgets import QPushButton
    from mapclip.plugin.deps.plan import pip_plan
    from mapclip.plugin.deps import missing as deps_missing
    from mapclip.plugin.deps import plan as deps_plan
    target = tmp_path / "mapclip-deps"
    plan = pip_plan(target=str(target), cuda=False, numpy_version="1.24.2",
                    python=SYSTEM_PY, requirements=["mapclip-standin==1.0", "torch==2.14.1"],
                    platform="linux", index_url=local_index["simple"],
                    torch_index=local_index["cpu"], env=isolated_pip_env(tmp_path),
                    verify_modules=["numpy", "mapclip_standin", "torch"],
                    verify_path=[str(target), *system_path()], wheel=system_pip_wheel())
    monkeypatch.setattr(deps_missing, "missing_modules", lambda required=None: ["torch"])
    monkeypatch.setattr(deps_plan, "pip_plan", lambda **kw: plan)
    monkeypatch.setattr(sys, "path", list(sys.path))
    plugin = mapclip.classFactory(iface)
    plugin.initGui()
    try:
        button = next(b for b in iface.bar.findChildren(QPushButton)
                      if b.objectName() == "mapclipInstallDeps")
        button.click()
        assert plugin.installer is not None
        qtbot.waitUntil(lambda: plugin.installer is None, timeout=90000)
        texts = iface.bar_texts()
        assert any("torch 2.14.1+cpu (CPU build)" in t for t in texts), texts
        assert not any("failed" in t for t in texts), texts
        assert sys.path[0] == str(target) and not (target / "numpy").exists()
    finally:
        plugin.unload()


# --------------------------------------------------------------------------- #
# The CPU/CUDA choice and the pip command lines
# --------------------------------------------------------------------------- #
def _after(cmd, flag):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_cpu_plan_pins_the_cpu_build_by_its_local_version_from_the_cpu_index_only(mapclip):
    from mapclip.plugin.deps.plan import REQUIREMENTS, TORCH_CPU_INDEX, pip_plan
    plan = pip_plan(target="/t", cuda=False, numpy_version="1.24.2", python="/usr/bin/python3",
                    platform="linux", pip=(23, 0))
    cmd = plan.command()
    assert cmd[:4] == ["/usr/bin/python3", "-m", "pip", "install"]
    assert _after(cmd, "--target") == ["/t"] and "--upgrade" in cmd
    assert _after(cmd, "--extra-index-url") == [TORCH_CPU_INDEX]
    assert TORCH_CPU_INDEX == "https://download.pytorch.org/whl/cpu"
    assert "--index-url" not in cmd                      # the user's pip configuration stays
    reqs = open(REQUIREMENTS).read().splitlines()
    torch_version = next(l for l in reqs if l.startswith("torch==")).split("==")[1]
    vision_version = next(l for l in reqs if l.startswith("torchvision==")).split("==")[1]
    # only the CPU index has these: no CUDA fallback
    assert f"torch=={torch_version}+cpu" in cmd and f"torchvision=={vision_version}+cpu" in cmd
    assert plan.torch_build == "CPU" and not plan.cuda
    # pip 23 has no raw progress: its bar, forced into the pipe, carries the bytes
    assert _after(cmd, "--progress-bar") == ["on"] and plan.env["FORCE_COLOR"] == "1"
    assert "CPU torch" in plan.summary() and TORCH_CPU_INDEX in plan.summary()


def test_other_pins_become_upper_bounds_and_numpy_is_pinned_to_qgis_exact_version(mapclip):
    from mapclip.plugin.deps.plan import REQUIREMENTS, pip_plan
    plan = pip_plan(target="/t", cuda=False, numpy_version="1.24.2", python="py",
                    platform="linux", pip=(23, 0))
    cmd = plan.command()
    assert "numpy==1.24.2" in cmd and sum(a.startswith("numpy") for a in cmd) == 1
    reqs = [l for l in open(REQUIREMENTS).read().splitlines() if "==" in l]
    open_clip = next(l for l in reqs if l.startswith("open_clip_torch=="))
    assert open_clip in cmd                              # exact: the engine is tested with it
    faiss = next(l for l in reqs if l.startswith("faiss-cpu=="))
    assert faiss.replace("==", "<=") in cmd              # pip may take an older one for NumPy 1.24
    rasterio = next(l for l in reqs if l.startswith("rasterio=="))
    assert rasterio.replace("==", "<=") in cmd
    assert not any(a.startswith(("pytest", "pytest-qt")) for a in cmd)
    assert "numpy" in plan.protected


def test_cuda_plan_uses_the_cuda_index_and_macos_uses_pypi_torch(mapclip, monkeypatch):
    from mapclip.plugin.deps.plan import TORCH_CUDA_INDEX, has_cuda, pip_plan
    from mapclip.plugin.deps import plan as deps_plan
    monkeypatch.setattr(deps_plan.shutil, "which",
                        lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.setattr(deps_plan.sys, "platform", "linux")
    assert has_cuda("linux") and has_cuda()    # without a platform: this machine's
    plan = pip_plan(target="/x", numpy_version="2.1.0", python="py", platform="linux",
                    pip=(24, 2))
    cmd = plan.command()
    assert plan.cuda and plan.torch_build == "CUDA"
    assert _after(cmd, "--extra-index-url") == [TORCH_CUDA_INDEX]
    assert any(a.startswith("torch==") and "+" not in a for a in cmd)
    assert "numpy==2.1.0" in cmd
    assert _after(cmd, "--progress-bar") == ["raw"]       # pip >= 24.1 reports bytes
    assert "FORCE_COLOR" not in plan.env
    # macOS: no CUDA build exists; PyPI's torch (CPU + MPS), no extra index
    assert not has_cuda("darwin")
    mac = pip_plan(target="/x", numpy_version="1.26.4", python="py", platform="darwin")
    assert mac.torch_build == "macOS" and "--extra-index-url" not in mac.command()
    assert not any("+cpu" in a for a in mac.command())
    # no NVIDIA driver: CPU
    monkeypatch.setattr(deps_plan.shutil, "which", lambda name: None)
    assert not has_cuda("linux") and not has_cuda()
    assert pip_plan(target="/x", numpy_version="1.26.4", python="py",
                    platform="linux").torch_build == "CPU"


def test_without_a_pip_module_pip_runs_from_the_bundled_wheel(mapclip, monkeypatch, tmp_path):
    from mapclip.plugin.deps.plan import pip_plan, pip_wheel
    from mapclip.plugin.deps import plan as deps_plan
    wheels = tmp_path / "python-wheels"
    for name in ("pip-22.3.1-py3-none-any.whl", "pip-23.0.1-py3-none-any.whl",
                 "setuptools-66.1.1-py3-none-any.whl"):
        _touch(wheels / name)
    real_listdir = os.listdir
    monkeypatch.setattr(deps_plan.os, "listdir", lambda folder: real_listdir(wheels) if str(folder) in (
             "/usr/share/python-wheels",) else real_listdir(folder))
    monkeypatch.setitem(sys.modules, "ensurepip", None)        # Debian strips ensurepip
    newest = str(wheels / "pip-23.0.1-py3-none-any.whl")
    assert pip_wheel() == "/usr/share/python-wheels/pip-23.0.1-py3-none-any.whl"
    real_find_spec = deps_plan.importlib.util.find_spec
    monkeypatch.setattr(deps_plan.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pip" else real_find_spec(name, *a))
    monkeypatch.setattr(deps_plan, "pip_wheel", lambda: newest)
    plan = pip_plan(target="/t", cuda=False, numpy_version="1.24.2", platform="linux")
    assert plan.env["PYTHONPATH"] == newest
    assert plan.command()[1:4] == ["-m", "pip", "install"]
    assert _after(plan.command(), "--progress-bar") == ["on"]    # the wheel's pip is 23.0


def test_without_numpy_in_qgis_numpy_is_neither_pinned_nor_deleted(mapclip):
    from mapclip.plugin.deps.plan import pip_plan
    plan = pip_plan(target="/t", cuda=False, numpy_version="", python="py", platform="linux")
    assert not any(a.startswith("numpy") for a in plan.command())
    assert "numpy" not in plan.protected and "gdal" in plan.protected


@pytest.mark.parametrize("version, pin", [("1.24.2", "numpy==1.24.2"), ("2.1.0", "numpy==2.1.0"),
                                          ("1.26.4+mkl", "numpy==1.26.4"), ("", "numpy<2"),
                                          ("weird", "numpy<2")])
def test_numpy_pin(mapclip, version, pin):
    from mapclip.plugin.deps.plan import numpy_pin
    assert numpy_pin(version) == pin


def test_installer_requirements_keeps_specifiers_it_does_not_pin(mapclip):
    from mapclip.plugin.deps.plan import installer_requirements
    got = installer_requirements(["torch==2.14.1", "torchvision==0.29.1+cpu",
                                  "open-clip-torch==3.3.0", "attrs==25.4.0", "tqdm>=4",
                                  "rasterio"], torch_local="cpu")
    assert got == ["torch==2.14.1+cpu", "torchvision==0.29.1+cpu", "open-clip-torch==3.3.0",
                   "attrs<=25.4.0", "tqdm>=4", "rasterio"]


# --------------------------------------------------------------------------- #
# QGIS's Python as a program (the engine's finder; its platform lists are tested in
# tests/engine/test_interpreter.py)
# --------------------------------------------------------------------------- #
def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def _fake_python_first(tmp_path, monkeypatch) -> Path:
    """sys.executable and PATH as QGIS has them with pyenv first on PATH: a python3 that
    is not QGIS's (here one that cannot even start)."""
    from mapclip.engine.core import interpreter
    fake = tmp_path / "shims" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake.parent), os.environ.get("PATH", "")]))
    monkeypatch.setattr(interpreter, "_CACHE", [])
    return fake


def test_pip_runs_with_qgis_python_not_the_first_python_on_path(mapclip, tmp_path, monkeypatch):
    from mapclip.engine.core.interpreter import identity, running
    from mapclip.plugin.deps.plan import pip_plan
    fake = _fake_python_first(tmp_path, monkeypatch)
    plan = pip_plan(target=str(tmp_path / "t"), cuda=False, numpy_version="1.24.2",
                    platform="linux", pip=(24, 1))
    assert plan.program != str(fake)
    got, _ = identity(plan.program)
    assert got is not None and got.same_as(running())


def test_without_qgis_python_the_installer_says_how_to_install_by_hand(
        mapclip, iface, tmp_path, monkeypatch):
    from mapclip.engine.core import interpreter
    from mapclip.plugin.deps import plan as deps_plan
    fake = _fake_python_first(tmp_path, monkeypatch)
    monkeypatch.setattr(interpreter, "candidates", lambda: [str(fake)])
    monkeypatch.setattr(deps_plan, "deps_dir", lambda: str(tmp_path / "mapclip-deps"))
    plugin = mapclip.classFactory(iface)
    plugin.initGui()
    try:
        plugin.install_deps()
        assert plugin.installer is None                       # pip never ran
        item = iface.bar.items()[-1]
        text = item.property("mapclipText")                   # the whole text ("Show more")
        assert text.startswith(item.text()[:100]) and len(item.text()) < len(text)
        assert "installing MapCLIP's packages failed" in text and str(fake) in text
        assert "exited with code 1" in text and "Traceback" not in text
        assert f"pip install --target {tmp_path / 'mapclip-deps'}" in text and "torch" in text
    finally:
        plugin.unload()


# --------------------------------------------------------------------------- #
# sys.path order and the clean-up of QGIS's own packages
# --------------------------------------------------------------------------- #
def test_deps_folder_is_in_the_qgis_profile_and_goes_to_the_front_of_sys_path_once(
        mapclip, qgis_app, tmp_path, monkeypatch):
    from qgis.core import QgsApplication
    from mapclip.plugin.deps.activate import add_deps_path
    from mapclip.plugin.deps.folder import deps_dir, qgis_path
    assert deps_dir().startswith(QgsApplication.qgisSettingsDirPath())
    assert deps_dir().endswith("mapclip-deps")
    folder = tmp_path / "mapclip-deps"
    folder.mkdir()
    monkeypatch.setattr(sys, "path", [*sys.path, str(folder)])   # where the old installer put it
    assert add_deps_path(str(folder)) == str(folder)
    assert sys.path[0] == str(folder) and sys.path.count(str(folder)) == 1   # its copies win
    add_deps_path(str(folder))
    assert sys.path.count(str(folder)) == 1
    order = qgis_path(str(folder), ["/usr/share/qgis/python", str(folder),
                                    "/usr/lib/python3/dist-packages"])
    assert order[:3] == [str(folder), "/usr/share/qgis/python", "/usr/lib/python3/dist-packages"]


def _fake_dist(target: Path, dist: str, version: str, files, extra_record=()):
    info = target / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    for rel in files:
        _touch(target / rel)
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in [*files, *extra_record]))


def test_prune_deletes_numpy_gdal_pyqt_sip_qgis_and_nothing_else(mapclip, tmp_path):
    from mapclip.plugin.deps.folder import prune_protected
    target = tmp_path / "deps"
    _fake_dist(target, "numpy", "1.26.4", ["numpy/__init__.py", "numpy.libs/libopenblas.so"],
               extra_record=["../../bin/f2py"])
    _touch(target / "bin" / "f2py")
    _fake_dist(target, "GDAL", "3.6.2", ["osgeo/__init__.py", "osgeo_utils/__init__.py"])
    _fake_dist(target, "PyQt5", "5.15.9", ["PyQt5/__init__.py"])
    _fake_dist(target, "PyQt5_sip", "12.11.1", ["PyQt5/sip.so"])
    _touch(target / "sip.cpython-311-x86_64-linux-gnu.so")
    _touch(target / "qgis" / "__init__.py")
    keep = ["sympy/__init__.py", "numpy_financial/__init__.py", "torch/__init__.py",
            "bin/torchrun"]
    _fake_dist(target, "sympy", "1.14.0", keep[:1])
    for rel in keep[1:]:
        _touch(target / rel)
    removed = prune_protected(str(target))
    assert {"numpy", "numpy.libs", "numpy-1.26.4.dist-info", "bin/f2py", "osgeo", "osgeo_utils",
            "GDAL-3.6.2.dist-info", "PyQt5", "PyQt5-5.15.9.dist-info",
            "PyQt5_sip-12.11.1.dist-info", "sip.cpython-311-x86_64-linux-gnu.so",
            "qgis"} <= set(removed)
    left = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert left == sorted([*keep, "sympy-1.14.0.dist-info/RECORD"])


def test_add_deps_path_removes_numpy_an_older_installer_left(mapclip, tmp_path, monkeypatch):
    from mapclip.plugin.deps.activate import add_deps_path
    target = tmp_path / "deps"
    _fake_dist(target, "numpy", "1.26.4", ["numpy/__init__.py"])
    _touch(target / "sympy" / "__init__.py")
    monkeypatch.setattr(sys, "path", list(sys.path))
    add_deps_path(str(target))
    assert not (target / "numpy").exists() and (target / "sympy").exists()
    import numpy
    assert not numpy.__file__.startswith(str(target))


def test_prune_keeps_numpy_when_qgis_has_none(mapclip, tmp_path, monkeypatch):
    from mapclip.plugin.deps.folder import prune_protected
    from mapclip.plugin.deps import folder as deps_folder
    target = tmp_path / "deps"
    _fake_dist(target, "numpy", "1.26.4", ["numpy/__init__.py"])
    monkeypatch.setattr(deps_folder, "provided_elsewhere", lambda name, target, path=None: False)
    assert prune_protected(str(target), only_provided_elsewhere=True) == []
    assert (target / "numpy" / "__init__.py").exists()


def test_torch_build_is_read_from_version_py(mapclip, tmp_path):
    from mapclip.plugin.deps.verify import torch_build
    assert torch_build(str(tmp_path)) is None
    _touch(tmp_path / "torch" / "version.py").write_text(
        "from typing import Optional\n__version__ = '2.14.1+cu130'\n"
        "cuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n")
    build = torch_build(str(tmp_path))
    assert (build.version, build.cuda) == ("2.14.1+cu130", "13.0")
    assert build.describe() == "torch 2.14.1+cu130 (CUDA 13.0 build)"
    (tmp_path / "torch" / "version.py").write_text("__version__ = '2.14.1+cpu'\ncuda = None\n")
    assert torch_build(str(tmp_path)).describe() == "torch 2.14.1+cpu (CPU build)"


# --------------------------------------------------------------------------- #
# Progress from pip's output
# --------------------------------------------------------------------------- #
BAR = "\x1b[2K     \x1b[90m━━━━━━━━━━━━━━━━╸━━━━━━━━━━━━━━━━━\x1b[0m \x1b[32m{}\x1b[0m \x1b[31m9.1 MB/s\x1b[0m eta " \
      "\x1b[36m0:00:11\x1b[0m"
PIP23_OUTPUT = f"""\
Looking in indexes: https://pypi.org/simple, https://download.pytorch.org/whl/cpu
Collecting torch==2.14.1+cpu
  Downloading https://download.pytorch.org/whl/cpu/torch-2.14.1%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl (184.5 MB)
{BAR.format("0.0/184.5 MB")}
{BAR.format("84.3/184.5 MB")}
{BAR.format("184.5/184.5 MB")}
Collecting open_clip_torch==3.3.0
  Downloading open_clip_torch-3.3.0-py3-none-any.whl (1.5 MB)
{BAR.format("1.5/1.5 MB")}
Collecting sympy>=1.13.3
  Using cached sympy-1.14.0-py3-none-any.whl (6.3 MB)
Collecting mpmath<1.4,>=1.1.0
  Downloading mpmath-1.3.0-py3-none-any.whl (536 kB)
{BAR.format("536.2/536.2 kB")}
Installing collected packages: mpmath, sympy, torch, open_clip_torch
Successfully installed mpmath-1.3.0 open_clip_torch-3.3.0 sympy-1.14.0 torch-2.14.1+cpu
"""


def test_progress_from_pip_23_bar_is_the_bytes_of_the_file_in_flight(mapclip):
    from mapclip.plugin.deps.progress import PipProgress
    parser = PipProgress()
    events = [e for e in map(parser.feed, PIP23_OUTPUT.splitlines()) if e]
    assert events[0] == (-1.0, "collecting torch==2.14.1+cpu (requirements so far: 1)")
    assert events[1] == (0.0, "downloading torch 2.14.1+cpu (184.5 MB)")
    assert events[2][0] == 0.0
    assert events[3][0] == pytest.approx(84.3 / 184.5)
    assert events[3][1] == ("downloading torch 2.14.1+cpu: 84.3 MB of 184.5 MB · file 1, "
                            "84.3 MB downloaded so far")
    assert events[4][0] == pytest.approx(1.0)
    assert events[5][0] == -1                     # resolving: pip gives no measure
    assert events[6] == (0.0, "downloading open_clip_torch 3.3.0 (1.5 MB) · file 2, "
                              "184.5 MB downloaded so far")
    texts = [t for _, t in events]
    assert "using cached sympy 1.14.0 (6.3 MB)" in texts
    assert "downloading mpmath 1.3.0 (536 kB) · file 4, 186.0 MB downloaded so far" in texts
    assert events[-2][0] == -1 and events[-2][1].startswith("unpacking 4 packages into the folder: "
                                                            "mpmath, sympy")
    assert events[-1] == (1.0, "pip installed 4 packages (186.5 MB downloaded)")
    assert all(len(t) <= 110 for t in texts)


def test_progress_with_pip_raw_bytes(mapclip):
    from mapclip.plugin.deps.progress import PipProgress, human_size
    parser = PipProgress()
    parser.feed("Collecting torch")
    parser.feed("  Downloading torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl (200.0 MB)")
    f, text = parser.feed("Progress 50000000 of 200000000")
    assert f == pytest.approx(0.25)
    assert text == "downloading torch 2.14.1: 50.0 MB of 200.0 MB · file 1, 50.0 MB downloaded so far"
    f, _ = parser.feed("Progress 200000000 of 200000000")
    assert f == pytest.approx(1.0)
    # a file whose size pip did not print takes it from the byte counts
    f, text = parser.feed("  Downloading tiny-1.0-py3-none-any.whl")
    assert f == -1 and text.startswith("downloading tiny 1.0 · file 2")
    f, text = parser.feed("Progress 1000000 of 2000000")
    assert f == pytest.approx(0.5) and text.startswith("downloading tiny 1.0: 1.0 MB of 2.0 MB")
    assert human_size(6.12e9) == "6.12 GB" and human_size(1500) == "1.5 kB"


def test_long_lines_are_cut_at_words_after_the_package_name(mapclip):
    from mapclip.plugin.deps.progress import file_label, progress_line, shorten
    line = "Installing collected packages: " + ", ".join(f"package-number-{i}" for i in range(40))
    text = progress_line(line)
    assert text.startswith("unpacking 40 packages into the folder: package-number-0,")
    assert len(text) <= 110 and text.endswith("…")
    assert not text[:-1].endswith("package-number-")        # no name cut in half
    long_req = "collecting " + "x" * 200
    assert shorten(long_req).startswith("collecting x")
    assert file_label("https://h/whl/cpu/torchvision-0.29.1%2Bcpu-cp311-cp311-linux.whl") \
        == "torchvision 0.29.1+cpu"
    assert file_label("affine-3.0.1.tar.gz") == "affine 3.0.1"


def test_installer_reads_lines_split_across_reads_and_emits_progress(mapclip, qtbot, tmp_path):
    """A real QProcess running a stand-in for pip that prints in odd chunks, then fails."""
    from mapclip.plugin.deps.plan import PipPlan
    fake = tmp_path / "fakepip.py"
    fake.write_text(
        "import sys, time\n"
        "w = sys.stdout.write\n"
        "w('Collecting sym'); sys.stdout.flush(); time.sleep(0.2)\n"
        "w('py>=1.13\\n  Downloading sympy-1.14.0-py3-none-any.whl (6.3 MB)\\n')\n"
        "w('Collecting mpmath\\n'); sys.stdout.flush()\n"
        "w('ERROR: No space left on device\\n')\n"
        "sys.exit(1)\n")
    plan = PipPlan(sys.executable, [str(fake)], str(tmp_path / "deps"), False)
    inst, events, (ok, message) = run_installer(qtbot, plan, timeout_ms=20000)
    assert not ok and "disk is full" in message
    texts = [t for _, t in events]
    assert "collecting sympy>=1.13 (requirements so far: 1)" in texts
    assert (0.0, "downloading sympy 1.14.0 (6.3 MB)") in events
    assert "collecting mpmath (requirements so far: 2)" in texts


# --------------------------------------------------------------------------- #
# Explaining failures and diagnosing the check
# --------------------------------------------------------------------------- #
def test_unreachable_cpu_index_is_named_and_not_confused_with_no_network(mapclip):
    from mapclip.plugin.deps.failures import explain_failure
    from mapclip.plugin.deps.plan import pip_plan
    plan = pip_plan(target="/t", cuda=False, numpy_version="1.24.2", python="py",
                    platform="linux", pip=(23, 0))
    output = ("WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, "
              "status=None)) after connection broken by 'NewConnectionError(...: Failed to "
              "establish a new connection: [Errno -3] Temporary failure in name resolution')': "
              "/whl/cpu/torch/\n"
              "WARNING: Could not fetch URL https://download.pytorch.org/whl/cpu/torch/: "
              "connection error: HTTPSConnectionPool(host='download.pytorch.org', port=443): "
              "Max retries exceeded with url: /whl/cpu/torch/\n"
              "ERROR: Could not find a version that satisfies the requirement torch==2.14.1+cpu "
              "(from versions: 2.14.1)\n"
              "ERROR: No matching distribution found for torch==2.14.1+cpu\n")
    probed = []
    text = explain_failure(output, 1, plan, probe=probed.append)
    assert "could not reach the PyTorch CPU wheel index (https://download.pytorch.org/whl/cpu" \
        in text
    assert "does not fall back" in text and "download.pytorch.org" in text
    assert probed == []                   # pip's own lines said so: no probe needed
    # pip said nothing about the connection (--retries 0): the probe decides
    quiet = ("ERROR: Could not find a version that satisfies the requirement torch==2.14.1+cpu "
             "(from versions: none)\nERROR: No matching distribution found for torch==2.14.1+cpu\n")
    text = explain_failure(quiet, 1, plan, probe=lambda url: "ConnectionRefusedError: refused")
    assert "could not reach" in text and "ConnectionRefusedError" in text
    # reachable index, but no such build for this Python/OS
    text = explain_failure(quiet, 1, plan, probe=lambda url: None)
    assert "has no torch==2.14.1+cpu for this Python and OS" in text
    # QGIS's NumPy has no wheel on the index: said as such
    text = explain_failure("ERROR: No matching distribution found for numpy==1.24.2\n", 1,
                           plan, probe=lambda url: None)
    assert "QGIS's exact NumPy (1.24.2)" in text and "Fix:" in text
    # without a plan the old explanations hold
    assert "no network" in explain_failure(output, 1)


def test_only_the_pytorch_index_failing_names_it_the_index_that_answered_and_the_hand_command(
        mapclip):
    """The package index answered; the download from PyTorch's index timed out: not "no
    network?", but which host failed, which answered, the command and the folder."""
    from mapclip.plugin.deps.failures import explain_failure
    from mapclip.plugin.deps.plan import PYPI_INDEX, pip_plan
    plan = pip_plan(target="/home/a/mapclip-deps", cuda=False, numpy_version="1.24.2",
                    python="/usr/bin/python3", platform="linux", pip=(24, 1),
                    requirements=["torch==2.14.1", "open-clip-torch==3.3.0"])
    output = ("Looking in indexes: https://pypi.org/simple, https://download.pytorch.org/whl/cpu\n"
              "Collecting open-clip-torch==3.3.0\n"
              "  Downloading open_clip_torch-3.3.0-py3-none-any.whl (1.5 MB)\n"
              "Collecting torch==2.14.1+cpu\n"
              "  Downloading https://download.pytorch.org/whl/cpu/torch-2.14.1%2Bcpu-cp311-cp311-"
              "linux_x86_64.whl (190.0 MB)\n"
              "ERROR: Exception:\n"
              "pip._vendor.urllib3.exceptions.ReadTimeoutError: HTTPSConnectionPool("
              "host='download.pytorch.org', port=443): Read timed out.\n")
    probed = []
    text = explain_failure(output, 2, plan, probe=lambda url: probed.append(url))
    assert "no network" not in text
    assert ("could not connect to download.pytorch.org (the PyTorch CPU wheel index, "
            "https://download.pytorch.org/whl/cpu)") in text
    assert "pypi.org (the package index) answered" in text and probed == [PYPI_INDEX]
    assert ("install by hand: /usr/bin/python3 -m pip install --target /home/a/mapclip-deps "
            "--extra-index-url https://download.pytorch.org/whl/cpu torch==2.14.1+cpu "
            "open-clip-torch==3.3.0 numpy==1.24.2") in text
    assert "target folder: /home/a/mapclip-deps" in text
    # both unreachable: that is no network, and both hosts are named
    text = explain_failure(output + "WARNING: Retrying after connection broken by "
                           "'NewConnectionError(Failed to establish a new connection)': "
                           "https://pypi.org/simple/open-clip-torch/\n", 2, plan,
                           probe=lambda url: None)
    assert "no network?" in text and "pypi.org (the package index" in text
    assert "make pypi.org and download.pytorch.org reachable" in text


def test_diagnosis_of_a_numpy_mismatch_names_the_package_and_qgis_numpy(mapclip, tmp_path):
    from mapclip.plugin.deps.verify import RECORD_FILE, diagnose
    target = tmp_path / "deps"
    _fake_dist(target, "faiss_cpu", "1.15.1", ["faiss/__init__.py"])
    data = {"errors": [{"module": "faiss", "type": "ImportError",
                        "error": "numpy.core.multiarray failed to import",
                        "name": None, "path": None,
                        "frames": [str(target / "faiss" / "__init__.py"),
                                   "/usr/lib/python3/dist-packages/numpy/core/multiarray.py"]}],
            "loaded": {"numpy": "/usr/lib/python3/dist-packages/numpy/__init__.py",
                       "faiss": str(target / "faiss" / "__init__.py")},
            "versions": {"numpy": "1.24.2"}}
    problems = diagnose(data, str(target), [str(target), "/usr/lib/python3/dist-packages"],
                        "/usr/bin/python3")
    assert len(problems) == 1
    p = problems[0]
    assert p.module == "faiss" and "multiarray" in p.error
    assert "faiss was built for another NumPy than QGIS's (1.24.2)" in p.cause
    # a folder from an older installer (no record of QGIS's NumPy): installing again helps
    assert "install MapCLIP's packages again" in p.fix and "another NumPy" in p.fix
    # a folder this installer made for QGIS's NumPy: it does not, an older release does
    (target / RECORD_FILE).write_text(json.dumps({"numpy": "1.24.2"}))
    p = diagnose(data, str(target), [str(target), "/usr/lib/python3/dist-packages"],
                 "/usr/bin/python3")[0]
    assert "'faiss_cpu<1.15.1'" in p.fix and "again" not in p.fix


def test_a_shadowed_copy_that_still_imports_is_a_warning_not_a_failure(mapclip, tmp_path):
    from mapclip.plugin.deps.verify import VERIFY_MARKER, parse_verify
    target = tmp_path / "deps"
    _touch(target / "certifi" / "__init__.py")
    stdout = VERIFY_MARKER + json.dumps({
   "imported": {"requests": "x"}, "errors": [], "skipped": [],
   "loaded": {"certifi": "/usr/lib/python3/dist-packages/certifi/__init__.py",
              "numpy": "/usr/lib/python3/dist-packages/numpy/__init__.py"},
        "versions": {"certifi": "2022.09.24", "numpy": "1.24.2"}})
    result = parse_verify(stdout, "", 0, str(target),
                          [str(target), "/usr/lib/python3/dist-packages"])
    assert result.ok
    (p,) = result.problems
    assert p.severity == "warning" and p.module == "certifi"
    assert "certifi is imported from /usr/lib/python3/dist-packages (version 2022.09.24)" in p.cause


def test_diagnosis_of_missing_module_and_missing_library(mapclip, tmp_path):
    from mapclip.plugin.deps.verify import diagnose
    target = tmp_path / "deps"
    target.mkdir()
    data = {"errors": [
        {"module": "open_clip", "type": "ModuleNotFoundError", "error": "No module named 'ftfy'",
         "name": "ftfy", "path": None, "frames": []},
        {"module": "torch", "type": "OSError",
         "error": "libgomp.so.1: cannot open shared object file: No such file or directory",
         "name": None, "path": None, "frames": [str(target / "torch" / "__init__.py")]},
        {"module": "osgeo.gdal", "type": "ModuleNotFoundError", "error": "No module named 'osgeo'",
         "name": "osgeo", "path": None, "frames": []},
        {"module": "sympy", "type": "ModuleNotFoundError",
         "error": "No module named 'sympy.core.numbers'", "name": "sympy.core.numbers",
         "path": None, "frames": []}],
        "loaded": {"sympy": str(target / "sympy" / "__init__.py")}, "versions": {}}
    _touch(target / "sympy" / "__init__.py")
    problems = diagnose(data, str(target), [str(target)], "py")
    assert "pip did not install it" in problems[0].cause and "install again" in problems[0].fix
    assert "ftfy" in problems[0].fix
    assert "libgomp.so.1" in problems[1].cause and "cannot add it" in problems[1].fix
    assert "QGIS's Python has no osgeo" in problems[2].cause
    assert "incomplete or mixed install of sympy" in problems[3].cause
    assert problems[3].fix == f"delete {target / 'sympy'} and install again."
    assert len(problems) == 4


def test_the_check_keeps_triton_out_as_qgis_does(mapclip, tmp_path):
    """The check imports like QGIS: with triton blocked (plugin/runtime.py), deps folder first."""
    from mapclip.plugin.deps.verify import verify_install
    target = tmp_path / "deps"
    _touch(target / "triton" / "__init__.py").write_text("raise SystemExit('triton imported')\n")
    _touch(target / "uses_triton.py").write_text(
        "try:\n    import triton\n    HAS = True\nexcept ImportError:\n    HAS = False\n")
    result = verify_install(str(target), SYSTEM_PY, ["uses_triton"],
                            path=[str(target), *system_path()], if_present=())
    assert result.ok, [p.text() for p in result.problems]
    assert result.data["imported"]["uses_triton"] == str(target / "uses_triton.py")
    assert "triton" not in result.data["loaded"]


def test_a_crash_while_importing_names_the_module(mapclip, tmp_path):
    from mapclip.plugin.deps.verify import parse_verify
    result = parse_verify("", "importing numpy\nimporting torch\nimporting torchvision.ops\n"
                          "Fatal Python error: Segmentation fault\n", -11, str(tmp_path),
                          [str(tmp_path)])
    assert not result.ok
    assert result.problems[0].module == "torchvision.ops"
    assert "crashed (signal 11)" in result.problems[0].error


def test_explain_import_error_in_qgis_names_the_shadowing_copy(mapclip, tmp_path, monkeypatch):
    """The message a search shows for the sympy failure is not "install again"."""
    from mapclip.plugin.deps.verify import explain_import_error
    target = tmp_path / "deps"
    _touch(target / "sympy" / "__init__.py")
    system = tmp_path / "dist-packages"
    _touch(system / "sympy" / "__init__.py").write_text("__version__ = '1.11.1'\n")
    _touch(system / "sympy" / "core" / "__init__.py")
    _touch(system / "sympy" / "core" / "numbers.py").write_text("X = 1\n")
    monkeypatch.setattr(sys, "path", [str(system), *sys.path])
    for name in [m for m in sys.modules if m == "sympy" or m.startswith("sympy.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        from sympy.core.numbers import equal_valued  # noqa: F401
    except ImportError as exc:
        text = explain_import_error(exc, str(target))
    else:
        pytest.fail("the stand-in sympy has no equal_valued")
    finally:
        for name in [m for m in sys.modules if m == "sympy" or m.startswith("sympy.")]:
            sys.modules.pop(name, None)
    assert text is not None
    assert "equal_valued" in text and f"sympy is imported from {system}" in text
    assert "version 1.11.1" in text and "restart QGIS" in text
    # an ImportError that has nothing to do with the folder keeps the usual advice
    assert explain_import_error(ModuleNotFoundError("No module named 'nothere'",
                                                    name="nothere"), str(target)) is None
