"""The model manager: which models the picker offers, where each loads from, and a load check.

It lists the engine's presets (available offline or to be downloaded, and
from where) and the models the user added (checkpoints as ``ARCH:PATH``,
model folders such as a fine-tuning run's ``best/``), stored by
:class:`plugin.settings.Settings`. *Add folder...* / *Add checkpoint...* add
one, *Remove* forgets one (files are never touched), and *Check* loads the
selected model in an :class:`plugin.tasks.EngineTask` and reports its
embedding size, input size, device and precision (or the engine's error and
fix). :attr:`ModelManagerDialog.models_changed` tells the dock to refresh
its picker.
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView,
                                 QInputDialog, QPushButton, QTableWidget, QTableWidgetItem)

from .base import JobDialog

COLUMNS = ("Model", "Kind", "Available offline", "Loads from")
#: the architecture offered first for a bare checkpoint (RemoteCLIP ViT-B/32)
DEFAULT_CHECKPOINT_ARCH = "ViT-B-32-quickgelu"


def ask_checkpoint(parent) -> Optional[Tuple[str, str]]:
    """Ask for a checkpoint file; (spec, label) or None if the user gave up.

    A published checkpoint is added by path (the engine reads its
    architecture); another file's architecture comes from its shapes and only
    the activation is asked; a file whose shapes match nothing needs its
    architecture typed. The dock's "Add checkpoint…" and this dialog share it.
    """
    path, _ = QFileDialog.getOpenFileName(parent, "Checkpoint", "",
                                          "Checkpoints (*.pt *.pth *.bin *.safetensors)")
    if not path:
        return None
    from ...engine.model.specs import checkpoint_choice
    choice = checkpoint_choice(path)
    if choice.spec:
        return choice.spec, choice.label
    if choice.choices:
        spec, ok = QInputDialog.getItem(parent, "Activation", choice.note, choice.choices, 0, False)
        if ok and spec:
            return spec, f"{os.path.basename(path)} ({spec.split(':', 1)[0]})"
        return None
    arch, ok = QInputDialog.getText(parent, "Architecture",
                                    f"{choice.note}\nopen_clip architecture of this checkpoint "
                                    "(RemoteCLIP and GeoRSCLIP need the -quickgelu variant):",
                                    text=DEFAULT_CHECKPOINT_ARCH)
    if ok and arch.strip():
        return f"{arch.strip()}:{path}", f"{os.path.basename(path)} ({arch.strip()})"
    return None


class ModelManagerDialog(JobDialog):
    TITLE = "MapCLIP: models"
    RUN_TEXT = "Check"
    models_changed = pyqtSignal()

    def __init__(self, iface=None, parent=None, settings=None):
        super().__init__(iface, parent)
        from ..settings import Settings
        self.settings = settings or Settings()
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.Stretch)
        self.table.setMinimumSize(640, 260)
        self.body.addWidget(self.table)
        row = QHBoxLayout()
        self.add_folder_button = QPushButton("Add folder...")
        self.add_checkpoint_button = QPushButton("Add checkpoint...")
        self.remove_button = QPushButton("Remove")
        self.add_folder_button.clicked.connect(self._pick_folder)
        self.add_checkpoint_button.clicked.connect(self._pick_checkpoint)
        self.remove_button.clicked.connect(self.remove_selected)
        for b in (self.add_folder_button, self.add_checkpoint_button, self.remove_button):
            row.addWidget(b)
        row.addStretch(1)
        self.body.addLayout(row)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.refresh()

    # -- the list ------------------------------------------------------------
    def rows(self) -> List[tuple]:
        """(spec, kind, available, location) for presets, then the user's models."""
        from ...engine.model.hub import preset_available, preset_location
        from ...engine.model.presets import list_presets
        out = [(p.name, f"preset ({p.family or p.source})", preset_available(p), preset_location(p))
               for p in list_presets()]
        for item in self.settings.custom_models():
            spec = item["spec"]
            path = spec.split(":", 1)[1] if ":" in spec and not os.path.exists(spec) else spec
            kind = "model folder" if os.path.isdir(path) else "checkpoint"
            out.append((spec, f"added: {item.get('label') or spec}" if item.get("label") != spec
                        else f"added {kind}", os.path.exists(path), path))
        return out

    def refresh(self) -> None:
        rows = self.rows()
        self.table.setRowCount(len(rows))
        for r, (spec, kind, available, where) in enumerate(rows):
            for c, text in enumerate((spec, kind, "yes" if available else "no", where)):
                item = QTableWidgetItem(text)
                item.setToolTip(where)
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()
        self._selection_changed()

    def selected_spec(self) -> Optional[str]:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        return self.table.item(rows[0].row(), 0).text() if rows else None

    def select_spec(self, spec: str) -> None:
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).text() == spec:
                self.table.selectRow(r)
                return

    def _is_custom(self, spec: Optional[str]) -> bool:
        return bool(spec) and any(i["spec"] == spec for i in self.settings.custom_models())

    def _selection_changed(self) -> None:
        spec = self.selected_spec()
        self.remove_button.setEnabled(self._is_custom(spec))
        self.run_button.setEnabled(bool(spec) and (self.task is None or self.task.is_finished))

    # -- adding and removing --------------------------------------------------
    def add_model(self, spec: str, label: Optional[str] = None) -> None:
        self.settings.add_custom_model(spec, label)
        self.refresh()
        self.select_spec(spec)
        self.models_changed.emit()

    def add_checkpoint(self, path: str, arch: str) -> str:
        """A checkpoint needs its open_clip architecture: the spec is ``ARCH:PATH``."""
        spec = f"{arch}:{path}"
        self.add_model(spec, f"{os.path.basename(path)} ({arch})")
        return spec

    def remove_selected(self) -> None:
        spec = self.selected_spec()
        if self._is_custom(spec):
            self.settings.remove_custom_model(spec)
            self.refresh()
            self.models_changed.emit()

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (open_clip_config.json + weights)")
        if folder:
            self.add_model(folder, os.path.basename(os.path.dirname(folder.rstrip("/"))) or folder)

    def _pick_checkpoint(self) -> Optional[str]:
        picked = ask_checkpoint(self)
        if picked is None:
            return None
        self.add_model(*picked)
        return picked[0]

    # -- the load check --------------------------------------------------------
    def validate(self) -> List[str]:
        return [] if self.selected_spec() else ["Model: none selected (select a row to check)"]

    def make_job(self) -> Callable:
        spec = self.selected_spec()

        def job(progress, cancel):
            from ...engine.model.models import load_model
            return load_model(spec, progress=progress).describe()
        return job

    def job_description(self) -> str:
        return f"MapCLIP model check: {self.selected_spec()}"

    def job_done(self, result: Any) -> None:
        self.status.setText(f"{result['model']} loads: {result['arch']}, embedding "
                            f"{result['embed_dim']}, input {result['image_size']} px, "
                            f"{result['device']}, {result['precision']}")
