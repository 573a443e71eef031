"""`python -m mapclip.engine` as a user runs it: a separate process, its exit code, its streams."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mapclip.engine import __version__
from mapclip.engine.core.options import DEFAULT_MAX_DISTANCE

ROOT = Path(__file__).resolve().parents[2]


def _engine(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mapclip.engine", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_version():
    r = _engine("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"MapCLIP {__version__}"


def test_a_commands_help_names_its_flags_and_defaults():
    r = _engine("dedup", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m engine dedup")
    for flag in ("--against", "--max-distance", "--move-to", "--undo", "--json"):
        assert flag in r.stdout, flag
    # the default shown is the engine's own
    assert f"(default {DEFAULT_MAX_DISTANCE}:" in " ".join(r.stdout.split())
    assert r.stderr == ""


def test_a_usage_error_is_an_error_line_and_a_fix_line_with_exit_code_2(tmp_path):
    missing = tmp_path / "no-manifest.json"
    r = _engine("dedup", "--undo", str(missing))
    assert r.returncode == 2
    assert r.stdout == ""
    error, fix = r.stderr.splitlines()           # exactly two lines, no traceback
    assert error.startswith("error: ") and "not found" in error and error.endswith(str(missing))
    assert fix.startswith("  fix: ") and "--undo" in fix


def test_an_unknown_command_is_refused_by_the_parser_with_exit_code_2():
    r = _engine("nope")
    assert r.returncode == 2
    assert "invalid choice: 'nope'" in r.stderr and "Traceback" not in r.stderr
