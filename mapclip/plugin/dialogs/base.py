"""What the MapCLIP dialogs share: a form, input checks, one engine job at a time.

A dialog subclasses :class:`JobDialog`, builds its form into ``self.form``,
implements :meth:`JobDialog.validate` (a list of problems, each naming the
field and the fix: shown in the dialog's message bar, nothing starts) and
:meth:`JobDialog.make_job` (a plain-values ``fn(progress, cancel)`` that calls
the engine). :meth:`JobDialog.start` runs it as a
:class:`plugin.tasks.EngineTask` in QGIS's task manager with a progress bar
and a Cancel button; the result arrives in :meth:`JobDialog.job_done` on the
main thread; errors go to the dialog's message bar and the log panel.
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

from qgis.core import Qgis
from qgis.gui import QgsFileWidget, QgsMessageBar
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (QDialog, QDialogButtonBox, QFormLayout, QHBoxLayout, QLabel,
                                 QProgressBar, QPushButton, QSizePolicy, QVBoxLayout, QWidget)

from .. import log
from ..tasks import EngineTask, start


def file_widget(mode=QgsFileWidget.GetFile, filter_: str = "", dialog_title: str = "") -> QgsFileWidget:
    w = QgsFileWidget()
    w.setStorageMode(mode)
    if filter_:
        w.setFilter(filter_)
    if dialog_title:
        w.setDialogTitle(dialog_title)
    return w


def need_file(problems: List[str], label: str, path: str, folder: bool = False,
              must_exist: bool = True) -> None:
    """Append a problem when a required file or folder is empty or missing."""
    kind = "folder" if folder else "file"
    if not path.strip():
        problems.append(f"{label}: no {kind} chosen (choose one)")
    elif must_exist and folder and not os.path.isdir(path):
        problems.append(f"{label}: folder {path} does not exist (choose an existing folder)")
    elif must_exist and not folder and not os.path.isfile(path):
        problems.append(f"{label}: file {path} does not exist (choose an existing file)")


class JobDialog(QDialog):
    """A form plus Run / Cancel / Close, a progress bar and a message bar."""

    #: emitted on the main thread with the engine's result when a job finishes
    job_finished = pyqtSignal(object)
    TITLE = "MapCLIP"
    RUN_TEXT = "Run"

    def __init__(self, iface=None, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.iface = iface
        self.task: Optional[EngineTask] = None
        self.result: Any = None
        self.last_error: Optional[str] = None
        self.setWindowTitle(self.TITLE)
        self.bar = QgsMessageBar(self)
        self.bar.setSizePolicy(QSizePolicy.Minimum, QSizePolicy.Fixed)
        self.body = QVBoxLayout()
        self.form = QFormLayout()
        self.body.addLayout(self.form)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.run_button = QPushButton(self.RUN_TEXT)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Close)
        self.buttons.addButton(self.run_button, QDialogButtonBox.ActionRole)
        self.buttons.addButton(self.cancel_button, QDialogButtonBox.ActionRole)
        self.buttons.rejected.connect(self.reject)
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        outer = QVBoxLayout(self)
        outer.addWidget(self.bar)
        outer.addLayout(self.body)
        row = QHBoxLayout()
        row.addWidget(self.progress, 1)
        outer.addLayout(row)
        outer.addWidget(self.status)
        outer.addWidget(self.buttons)

    # -- to implement --------------------------------------------------------
    def validate(self) -> List[str]:
        """Problems with the inputs, each naming the field and the fix; [] = ready."""
        return []

    def make_job(self) -> Callable:
        """A function ``fn(progress, cancel)`` calling the engine with plain values."""
        raise NotImplementedError

    def job_done(self, result: Any) -> None:
        """Called on the main thread with the engine's result."""

    def job_description(self) -> str:
        return self.TITLE

    # -- running -------------------------------------------------------------
    def show_problems(self, problems: List[str]) -> None:
        self.last_error = "\n".join(problems)
        self.bar.clearWidgets()
        self.bar.pushMessage("Check the inputs", "; ".join(problems), Qgis.Warning, 0)
        self.status.setText(problems[0])

    def start(self) -> Optional[EngineTask]:
        """Validate, then run the job as a task; returns the task (None if refused)."""
        if self.task is not None and not self.task.is_finished:
            return None
        problems = self.validate()
        if problems:
            self.show_problems(problems)
            return None
        self.bar.clearWidgets()
        self.last_error = None
        self.result = None
        task = EngineTask(self.job_description(), self.make_job(), on_done=self._on_done,
                          on_error=self._on_error, on_cancel=self._on_cancel, iface=self.iface)
        task.progressChanged.connect(lambda p: self.progress.setValue(int(p)))
        self.task = task
        self.set_running(True)
        self.status.setText("running...")
        start(task)
        return task

    def cancel(self) -> None:
        if self.task is not None and not self.task.is_finished:
            self.task.cancel()
            self.status.setText("cancelling...")

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_done(self, result: Any) -> None:
        self.set_running(False)
        self.progress.setValue(100)
        self.result = result
        self.status.setText("done")
        self.job_done(result)
        self.job_finished.emit(result)

    def _on_error(self, exc: BaseException, details: str) -> None:
        self.set_running(False)
        text = log.bar_error(self.iface, f"{self.job_description()} failed", exc, details)
        self.last_error = text
        self.bar.pushMessage("MapCLIP", text, Qgis.Critical, 0)
        self.status.setText(text)

    def _on_cancel(self) -> None:
        self.set_running(False)
        self.progress.setValue(0)
        self.status.setText("cancelled: nothing was written")

    def reject(self) -> None:
        self.cancel()
        super().reject()
