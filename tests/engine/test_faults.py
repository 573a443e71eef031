"""engine.core.faults: the named fault points the reliability tests crash runs at."""
from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mapclip.engine.core import faults
from mapclip.engine.core.errors import UsageError
from mapclip.engine.core.faults import ENV, MARK_ENV, POINTS, fault_point

ROOT = Path(__file__).resolve().parents[2]


def test_unset_or_another_point_does_nothing(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for _ in range(3):
        fault_point("index.commit")
    monkeypatch.setenv(ENV, "dedup.moved:1:raise")
    for _ in range(3):
        fault_point("index.commit")                # not the point named


def test_the_nth_time_acts_and_only_that_time(monkeypatch):
    monkeypatch.setenv(ENV, "index.commit:3:raise")
    fault_point("index.commit")
    fault_point("dedup.moved")                     # other points do not count
    fault_point("index.commit")
    with pytest.raises(OSError) as e:
        fault_point("index.commit")
    assert e.value.errno == errno.ENOSPC and "index.commit" in str(e.value)
    fault_point("index.commit")                    # the 4th time: nothing
    monkeypatch.setenv(ENV, "index.commit:1:raise")    # a new setting counts from zero
    with pytest.raises(OSError):
        fault_point("index.commit")


def test_parse_defaults_and_clear_errors():
    assert faults.parse("finetune.epoch") == faults.Fault("finetune.epoch", 1, "kill")
    assert faults.parse("read.batch:7") == faults.Fault("read.batch", 7, "kill")
    assert faults.parse("read.batch:term") == faults.Fault("read.batch", 1, "term")
    with pytest.raises(UsageError, match="unknown action 'explode'") as e:
        faults.parse("read.batch:2:explode")
    assert "kill" in e.value.hint and "raise" in e.value.hint
    with pytest.raises(UsageError, match="names no fault point") as e:
        faults.parse("index.comit:2")
    assert "index.commit" in e.value.hint
    for bad in ("read.batch:0", "read.batch:2:kill:extra"):
        with pytest.raises(UsageError, match="not POINT"):
            faults.parse(bad)


def test_a_mark_makes_the_fault_happen_in_one_process_only(monkeypatch, tmp_path):
    mark = tmp_path / "fired"
    monkeypatch.setenv(ENV, "ray.batch:1:raise")
    monkeypatch.setenv(MARK_ENV, str(mark))
    with pytest.raises(OSError):
        fault_point("ray.batch")
    assert mark.read_text().isdigit()
    monkeypatch.setenv(ENV, "ray.batch:raise")   # counting again from zero: the mark holds it back
    fault_point("ray.batch")
    # a Ray worker is handed the driver's setting (it does not inherit its environment)
    given = faults.settings()
    assert given == {ENV: "ray.batch:raise", MARK_ENV: str(mark)}
    faults.adopt({})
    assert faults.settings() == {}
    faults.adopt(given)
    assert faults.settings() == given


@pytest.mark.parametrize("action,code", [("kill", -9), ("term", -15), ("int", -2)])
def test_signals_end_the_process_at_the_point(action, code, tmp_path):
    """A child that reaches the point twice is ended by the signal the second time;
    the line it prints before it shows it ran up to there and no further."""
    script = ("import signal; signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
              "from mapclip.engine.core.faults import fault_point\n"
              "for k in range(5):\n"
              "    print(k, flush=True); fault_point('dedup.moved')\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), ENV: f"dedup.moved:2:{action}"}, timeout=60)
    assert p.returncode == code and p.stdout.split() == ["0", "1"], (p.returncode, p.stdout, p.stderr)


def test_every_point_the_engine_calls_is_listed_and_documented():
    engine = ROOT / "mapclip" / "engine"
    called = {m for f in engine.rglob("*.py")
              for m in re.findall(r'fault_point\("([^"]+)"\)', f.read_text(encoding="utf-8"))}
    assert called == set(POINTS)
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert [p for p in POINTS if f"`{p}`" not in doc] == []


def test_raise_is_a_full_disk_at_that_step(tmp_path, monkeypatch, capsys):
    """``raise`` fails the step as a full disk would: the command's one error line and
    its fix, and nothing half-written (the report's temporary file removed)."""
    import numpy as np
    from PIL import Image
    from mapclip.engine.cli import main
    data = tmp_path / "data"
    data.mkdir()
    a = (np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)
    for k in range(2):
        Image.fromarray(a).save(data / f"{k}.png")
    monkeypatch.setenv(ENV, "output.rename:1:raise")
    rc = main(["dedup", str(data), "--out", str(tmp_path / "r.csv"), "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == \
        ["error: No space left on device (MAPCLIP_FAULT at output.rename)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
