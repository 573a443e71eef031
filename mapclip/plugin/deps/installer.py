"""Running pip in a QProcess, checking the result in a second one, and the message-bar offer."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

from .. import log
from .activate import add_deps_path
from .failures import explain_failure
from .folder import deps_dir, dist_name, loaded_elsewhere, prune_protected, qgis_path, same_path
from .missing import missing_message
from .plan import PipPlan, read_requirements
from .progress import RE_BAR, RE_RAW, PipProgress, shorten, strip_ansi
from .verify import (TorchBuild, VerifyResult, parse_verify, torch_build, verify_command,
                     write_install_record)

@dataclass
class InstallReport:
    """What one install did: pip's outcome, what was pruned, the torch build, the check."""

    pip_ok: bool = False
    pruned: List[str] = field(default_factory=list)
    torch: Optional[TorchBuild] = None
    verify: Optional[VerifyResult] = None
    restart_for: Dict[str, str] = field(default_factory=dict)
    message: str = ""


def _log(severity: str, text: str) -> None:
    """To the MapCLIP log panel when running in QGIS (quietly nothing elsewhere)."""
    try:
        (log.critical if severity == "error" else log.warning)(text)
    except Exception:
        pass


def _process_env(extra: Dict[str, Optional[str]]):
    env = QProcessEnvironment.systemEnvironment()
    env.insert("PYTHONNOUSERSITE", "1")
    for key, value in extra.items():
        if value is None:
            env.remove(key)
        else:
            env.insert(key, value)
    return env


class PipInstaller(QObject):  # type: ignore[misc]
    """Run a :class:`PipPlan` in a QProcess, then check the result in a second one.

    Signals: ``progress(fraction, text)`` (fraction 0..1, or -1 where pip gives
    no measure), ``step(n, text)`` (the n-th status line, as before) and
    ``finished(ok, message)``. ``report`` holds the details afterwards.
    """

    step = pyqtSignal(int, str)          # steps seen so far, the latest status line
    progress = pyqtSignal(float, str)    # fraction 0..1 or -1, the status line
    finished = pyqtSignal(bool, str)     # ok, message

    def __init__(self, plan: PipPlan, parent=None):
        super().__init__(parent)
        self.plan = plan
        self.output: List[str] = []
        self.steps = 0
        self.report = InstallReport()
        self.parser = PipProgress()
        self._partial = ""
        self._last_bytes = 0.0
        self._cancelled = False
        self._done_emitted = False
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.MergedChannels)
        self.process.setProcessEnvironment(_process_env(plan.env))
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.finished.connect(self._done)
        self.process.errorOccurred.connect(self._error)
        self.checker: Optional[QProcess] = None
        self._verify_path: List[str] = []
        self._timer: Optional[QTimer] = None

    # -- control ---------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.plan.target, exist_ok=True)
        self._emit(-1.0, self.plan.summary())
        self.process.start(self.plan.program, self.plan.args)

    def cancel(self) -> None:
        self._cancelled = True
        for proc in (self.process, self.checker):
            if proc is not None and proc.state() != QProcess.NotRunning:
                proc.kill()

    def running(self) -> bool:
        return any(p is not None and p.state() != QProcess.NotRunning
                   for p in (self.process, self.checker))

    # -- pip -------------------------------------------------------------------
    def _emit(self, fraction: float, text: str) -> None:
        self.steps += 1
        self.step.emit(self.steps, text)
        self.progress.emit(float(fraction), text)

    def _read(self) -> None:
        chunk = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        text = self._partial + chunk
        lines = re.split(r"\r\n|\n|\r", text)
        self._partial = lines.pop()           # an unfinished line waits for the rest
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        line = strip_ansi(line)
        if not line.strip():
            return
        is_bytes = bool(RE_RAW.match(line) or RE_BAR.search(line))
        if not is_bytes:
            self.output.append(line)
        got = self.parser.feed(line)
        if not got:
            return
        now = time.monotonic()
        if is_bytes and 0.0 < got[0] < 1.0 and now - self._last_bytes < 0.2:
            return                            # pip redraws its bar often: 5 updates a second
        if is_bytes:
            self._last_bytes = now
        self._emit(*got)

    def _error(self, err) -> None:
        if err == QProcess.FailedToStart:
            self._finish(False, f"could not start {self.plan.program}: "
                                f"{self.process.errorString()}. Check that QGIS's Python is there "
                                f"(MapCLIP looks next to the QGIS program).")

    def _finish(self, ok: bool, message: str) -> None:
        if self._done_emitted:
            return
        self._done_emitted = True
        self.report.message = message
        self.finished.emit(ok, message)

    def _done(self, code: int, status) -> None:
        if self.process.bytesAvailable():
            self._read()
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        out = "\n".join(self.output)
        if self._cancelled:
            self._finish(False, "the install was cancelled; the folder may hold part of it: "
                                "install again to complete it")
            return
        if code != 0 or status != QProcess.NormalExit:
            _log("error", f"pip failed (exit code {code}): {' '.join(self.plan.command())}\n"
                          + "\n".join(self.output[-60:]))
            self._finish(False, explain_failure(out, code, self.plan))
            return
        self.report.pip_ok = True
        self.report.pruned = prune_protected(self.plan.target, self.plan.protected)
        self.report.torch = torch_build(self.plan.target)
        write_install_record(self.plan, self.report.torch)
        self._start_check()

    # -- the check -------------------------------------------------------------
    def _start_check(self) -> None:
        path = (list(self.plan.verify_path) if self.plan.verify_path is not None
                else qgis_path(self.plan.target))
        if not path or not same_path(path[0], self.plan.target):
            path = [self.plan.target, *[p for p in path if not same_path(p, self.plan.target)]]
        self._verify_path = path
        names = [m for m in self.plan.verify_modules if m != "numpy"][:4]
        self._emit(-1.0, shorten(f"checking the install: importing {', '.join(names)} with "
                                 f"QGIS's paths"))
        cmd = verify_command(self.plan.program, self.plan.target, self.plan.verify_modules,
                             path, self.plan.verify_if_present)
        self.checker = QProcess(self)
        self.checker.setProcessEnvironment(_process_env(
            {k: v for k, v in self.plan.env.items() if not k.startswith("PIP_")}))
        self.checker.finished.connect(self._checked)
        self.checker.errorOccurred.connect(self._check_error)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._check_timeout)
        self._timer.start(int(self.plan.verify_timeout_s * 1000))
        self.checker.start(cmd[0], cmd[1:])

    def _check_timeout(self) -> None:
        if self.checker is not None and self.checker.state() != QProcess.NotRunning:
            self.checker.kill()

    def _check_error(self, err) -> None:
        if err == QProcess.FailedToStart:
            self._finish(False, f"pip finished, but the check could not start "
                                f"{self.plan.program}: {self.checker.errorString()}")

    def _checked(self, code: int, status) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._cancelled:
            self._finish(False, "the install was cancelled during the check")
            return
        stdout = bytes(self.checker.readAllStandardOutput()).decode("utf-8", "replace")
        stderr = bytes(self.checker.readAllStandardError()).decode("utf-8", "replace")
        if status != QProcess.NormalExit and code == 0:
            code = -9
        result = parse_verify(stdout, stderr, code, self.plan.target, self._verify_path,
                              self.plan.program)
        self.report.verify = result
        if stderr.strip():
            self.output.append(stderr.strip())
        for problem in result.problems:
            _log(problem.severity, f"install check, {problem.severity}: {problem.text()}")
        add_deps_path(self.plan.target)
        self.report.restart_for = loaded_elsewhere(self.plan.target)
        self._finish(result.ok, self._message(result))

    def _message(self, result: VerifyResult) -> str:
        torch = self.report.torch
        if torch is None and result.data.get("versions", {}).get("torch"):
            torch = TorchBuild(result.data["versions"]["torch"], result.torch_cuda)
        parts = []
        if torch is not None:
            build = torch.describe()
            wanted = self.plan.torch_build
            if wanted == "CPU" and torch.cuda:
                build += " although the CPU build was asked for"
            elif wanted == "CUDA" and not torch.cuda:
                build += (" although a CUDA build was asked for (the CUDA wheels were not "
                          "found for this Python)")
            parts.append(build)
        pruned = sorted({dist_name(p) for p in self.report.pruned
                         if p.endswith((".dist-info", ".egg-info"))})
        errors = [p for p in result.problems if p.severity == "error"]
        warnings = [p for p in result.problems if p.severity != "error"]
        if not result.ok:
            first = errors[0]
            more = (f" ({len(result.problems) - 1} more problem(s) in the log)"
                    if len(result.problems) > 1 else "")
            return (f"pip installed the packages into {self.plan.target}"
                    f"{' (' + parts[0] + ')' if parts else ''}, but they do not import with "
                    f"QGIS's paths: {first.text()}{more}")
        text = f"installed into {self.plan.target}"
        if parts:
            text += f": {parts[0]}"
        text += "; the engine imports with QGIS's paths"
        if pruned:
            text += f" (QGIS's own {', '.join(pruned)} kept)"
        if self.report.restart_for:
            names = ", ".join(sorted(self.report.restart_for))
            text += f". Restart QGIS before searching: {names} was already loaded from older copies"
        if warnings:
            text += ". Note: " + " ".join(p.text() for p in warnings)
        return text


def offer_install(iface, missing: Sequence[str], on_install: Callable[[], None]):
    """A message-bar warning naming what is missing, with an Install button.

    Returns the message-bar item (or None without a message bar).
    """
    from qgis.core import Qgis
    from qgis.PyQt.QtWidgets import QPushButton

    text = missing_message(missing)
    log.warning(text)
    bar = iface.messageBar() if iface is not None else None
    if bar is None:
        return None
    item = bar.createMessage("MapCLIP", text)
    button = QPushButton("Install…", item)
    button.setObjectName("mapclipInstallDeps")
    button.setToolTip("pip install " + " ".join(read_requirements()) + f" into {deps_dir()}")
    button.clicked.connect(on_install)
    item.layout().addWidget(button)
    bar.pushWidget(item, Qgis.Warning, 0)
    return item
