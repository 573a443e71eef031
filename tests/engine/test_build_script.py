"""`python3 build.py test [PYTEST ARGS]`: the pytest command it runs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def build(monkeypatch):
    spec = importlib.util.spec_from_file_location("build_script", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ran = []
    monkeypatch.setattr(module, "setup", lambda: None)
    monkeypatch.setattr(module, "run", lambda cmd, **kw: ran.append([str(c) for c in cmd[3:]]) or 0)
    module.ran = ran
    return module


@pytest.mark.parametrize("extra, args", [
    ([], ["tests"]),                                                   # the whole suite
    (["-x", "-q"], ["tests", "-x", "-q"]),                             # options only: still all
    (["-k", "count"], ["tests", "-k", "count"]),
    (["tests/engine/test_count.py"], ["tests/engine/test_count.py"]),  # one file, alone
    (["tests/engine/test_count.py::test_bad_count_input", "-x"],
     ["tests/engine/test_count.py::test_bad_count_input", "-x"]),
    (["-q", "tests/engine", "-k", "bias"], ["-q", "tests/engine", "-k", "bias"]),
])
def test_build_test_adds_the_tests_folder_only_when_no_tests_are_named(build, extra, args):
    assert build.main(["test", *extra]) == 0
    assert build.ran == [args]
