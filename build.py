#!/usr/bin/env python3
"""MapCLIP's one entry point for people and CI (standard library only).

    python3 build.py setup     QGIS (Debian), .venv, pinned requirements; idempotent
    python3 build.py test      setup, then the whole test suite headless
    python3 build.py demo      setup, then the offline demo (synthetic scene, demo model)
    python3 build.py bench     setup, then the benchmarks (figures printed, nothing asserted)
    python3 build.py package   the plugin zip in dist/, installable with QGIS "Install from ZIP"

Extra arguments after `test` go to pytest (`build.py test tests/engine/test_count.py -x` runs
that file alone; without a test path, the whole `tests` folder), after `bench` and `demo`
to their scripts.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"
STAMP = VENV / ".mapclip-requirements.sha256"
SYSTEM_PY = "/usr/bin/python3"
PLUGIN_NAME = "mapclip"
DEBIAN_PACKAGES = ["qgis", "python3-qgis", "qgis-providers"]
#: the desktop tests run the real `qgis` binary on a virtual screen
DESKTOP_PACKAGES = ["xvfb"]
#: the QGIS plugin folder (the zip's one top folder); the engine is mapclip/engine
PLUGIN_DIR = ROOT / "mapclip"
REQUIREMENTS = PLUGIN_DIR / "requirements.txt"
# What goes into the plugin zip: the plugin folder, and the licence and readme beside it.
PACKAGE_EXTRA = ["LICENSE", "README.md"]
PACKAGE_EXCLUDE_PARTS = {"__pycache__", ".pytest_cache", "tests"}
PACKAGE_EXCLUDE_SUFFIXES = {".pyc", ".pyo", ".part"}


def say(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def run(cmd, **kw) -> int:
    return subprocess.call([str(c) for c in cmd], **kw)


def qgis_importable() -> bool:
    if not Path(SYSTEM_PY).exists():
        return False
    return run([SYSTEM_PY, "-c", "import qgis.core"], stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL) == 0


def ensure_qgis() -> None:
    missing = [] if qgis_importable() else list(DEBIAN_PACKAGES)
    if not shutil.which("Xvfb"):
        missing += DESKTOP_PACKAGES
    if not missing:
        return
    can_apt = shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
    if not can_apt:
        sys.exit("[build] Debian packages are missing (QGIS's Python bindings for /usr/bin/python3, "
                 "or Xvfb for the desktop tests).\n"
                 "        Install them, then run this again:\n"
                 f"        sudo apt-get install {' '.join(missing)}")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if run(["apt-get", "update", "-q"], env=env) != 0 or \
            run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env) != 0:
        sys.exit("[build] apt-get could not install " + " ".join(missing) + "; see the messages above.")
    if not qgis_importable():
        sys.exit("[build] QGIS was installed but `import qgis.core` still fails under /usr/bin/python3.")


def requirements_hash() -> str:
    data = REQUIREMENTS.read_bytes() + sys.version.encode()
    return hashlib.sha256(data).hexdigest()


def link_system_proj_data(venv: Path = VENV, base: Path = Path("/usr")) -> bool:
    """Give the system pyproj its own PROJ data inside the venv.

    The venv sees Debian's pyproj (system site packages, for QGIS). pyproj looks
    for proj.db under ``sys.prefix/share/proj``; in the venv ``sys.prefix`` is
    the venv, which has none, so every import of pyproj (pyogrio imports it)
    printed "Valid PROJ data directory not found". Debian's pyproj belongs with
    Debian's PROJ data in ``/usr/share/proj``, so the venv gets
    ``share/proj`` -> that folder. rasterio is unaffected: its wheel uses the
    PROJ data it bundles (no PROJ_DATA variable is set). True when linked.
    """
    data = base / "share" / "proj"
    link = venv / "share" / "proj"
    if not (data / "proj.db").is_file() or link.exists() or link.is_symlink():
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(data, target_is_directory=True)
    return True


def ensure_venv() -> None:
    if not VENV_PY.exists():
        say(f"creating {VENV} from {SYSTEM_PY} (with system site packages, for QGIS)")
        if run([SYSTEM_PY, "-m", "venv", "--system-site-packages", VENV]) != 0:
            sys.exit("[build] could not create the virtual environment; "
                     "on Debian install python3-venv (apt-get install python3-venv).")
    if link_system_proj_data():
        say("linked .venv/share/proj to the system PROJ data (for the system pyproj)")
    want = requirements_hash()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        return
    say("installing pinned requirements into .venv (first time: several minutes)")
    pip = [VENV_PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if run([*pip, "-r", REQUIREMENTS]) != 0:
        sys.exit("[build] pip could not install requirements.txt; see the messages above.")
    STAMP.write_text(want)


def setup() -> None:
    ensure_qgis()
    ensure_venv()


def venv_env() -> dict:
    env = dict(os.environ)
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    env.setdefault("XDG_RUNTIME_DIR", "/tmp/runtime-mapclip")
    Path(env["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(VENV / "bin") + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def pytest_args(extra) -> list:
    """pytest's arguments for `build.py test EXTRA`: the whole `tests` folder unless EXTRA
    names tests (a file, a folder, a node id like tests/x.py::test_y); options pass as given."""
    def names_tests(arg: str) -> bool:
        return not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()
    return list(extra) if any(names_tests(a) for a in extra) else ["tests", *extra]


def cmd_test(extra) -> int:
    setup()
    rc = run([VENV_PY, "-m", "pytest", *pytest_args(extra)], cwd=ROOT, env=venv_env())
    return 0 if rc == 5 and extra else rc  # 5: no test selected by the caller's filter


def cmd_demo(extra) -> int:
    setup()
    return run([VENV_PY, ROOT / "scripts" / "demo.py", *extra], cwd=ROOT, env=venv_env())


def cmd_bench(extra) -> int:
    setup()
    return run([VENV_PY, ROOT / "bench" / "run.py", *extra], cwd=ROOT, env=venv_env())


def package_files():
    """(file, name in the zip) of everything the plugin zip holds."""
    for name in PACKAGE_EXTRA:
        yield ROOT / name, f"{PLUGIN_NAME}/{name}"
    for f in sorted(PLUGIN_DIR.rglob("*")):
        rel = f.relative_to(PLUGIN_DIR)
        if f.is_file() and not (set(rel.parts) & PACKAGE_EXCLUDE_PARTS) \
                and f.suffix not in PACKAGE_EXCLUDE_SUFFIXES:
            yield f, f"{PLUGIN_NAME}/{rel.as_posix()}"


def plugin_version() -> str:
    for line in (PLUGIN_DIR / "metadata.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip()
    return "0"


def cmd_package(extra) -> int:
    out = write_package(ROOT / "dist")
    say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def write_package(out_dir: Path) -> Path:
    """The plugin zip (QGIS "Install from ZIP") in ``out_dir``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{PLUGIN_NAME}-{plugin_version()}.zip"
    tmp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f, name in package_files():
            zf.write(f, name)
    os.replace(tmp, out)
    return out


COMMANDS = {"setup": lambda extra: (setup(), 0)[1], "test": cmd_test, "demo": cmd_demo,
            "bench": cmd_bench, "package": cmd_package}


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
