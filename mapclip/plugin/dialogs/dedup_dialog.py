"""The de-duplication dialog: find near-duplicate images, look at them, quarantine on request.

"Find duplicates" runs ``engine.dedup.duplicates.find_duplicates`` (the function behind
``python -m engine dedup``) in an :class:`plugin.tasks.EngineTask` and fills a
table: one row per image in a duplicate group (the kept image first, with a
thumbnail) and one per training image that duplicates an image of the test
folder. Nothing moves until the user presses "Move to quarantine" (after a
quarantine folder is chosen); that writes a manifest first, and "Undo move"
puts every file back (``engine.dedup.quarantine.undo_move``).
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QIcon, QImageReader, QPixmap
from qgis.PyQt.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView,
                                 QListWidget, QPushButton, QSpinBox, QTableWidget,
                                 QTableWidgetItem, QVBoxLayout, QWidget)

from .base import JobDialog, file_widget, need_file

THUMB = 64
#: thumbnails are drawn for this many rows; the rest show the path only
MAX_THUMBNAILS = 300
COLUMNS = ("Group", "Image", "Action", "Duplicate of", "Path")


def thumbnail(path: str, size: int = THUMB) -> QPixmap:
    """A small preview, decoded at reduced size where the format allows it."""
    reader = QImageReader(path)
    full = reader.size()
    if full.isValid() and (full.width() > size or full.height() > size):
        reader.setScaledSize(full.scaled(size, size, Qt.KeepAspectRatio))
    image = reader.read()
    return QPixmap.fromImage(image) if not image.isNull() else QPixmap()


def table_rows(result: Any) -> List[Tuple[str, str, str, str]]:
    """(group, path, action, duplicate of) for every image the result names."""
    rows: List[Tuple[str, str, str, str]] = []
    contaminated = dict(result.contaminated)
    removed = set(result.remove)
    for g, group in enumerate(result.groups, 1):
        kept = group[0]
        for path in group:
            if path in contaminated:
                test, dist = contaminated[path]
                rows.append((str(g), path, "contaminated", f"{test} (distance {dist})"))
            elif path in removed:
                rows.append((str(g), path, "duplicate", kept))
            else:
                rows.append((str(g), path, "keep", ""))
    grouped = {p for group in result.groups for p in group}
    for path in sorted(contaminated):
        if path not in grouped:
            test, dist = contaminated[path]
            rows.append(("test", path, "contaminated", f"{test} (distance {dist})"))
    return rows


class DedupDialog(JobDialog):
    """Find duplicate groups, show them with thumbnails, move the extra copies on request."""

    TITLE = "MapCLIP: de-duplicate images"
    RUN_TEXT = "Find duplicates"

    def __init__(self, iface=None, parent=None):
        super().__init__(iface, parent)
        self.folders = QListWidget()
        self.folders.setMaximumHeight(90)
        add, remove = QPushButton("Add folder..."), QPushButton("Remove")
        add.clicked.connect(self._pick_folder)
        remove.clicked.connect(lambda: [self.folders.takeItem(self.folders.row(i))
                                        for i in self.folders.selectedItems()])
        box = QWidget()
        lay = QHBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.folders, 1)
        col = QVBoxLayout()
        col.addWidget(add)
        col.addWidget(remove)
        col.addStretch(1)
        lay.addLayout(col)
        self.distance = QSpinBox()
        self.distance.setRange(0, 64)
        self.test_folder = file_widget(QgsFileWidget.GetDirectory)
        self.report = file_widget(QgsFileWidget.SaveFile, "CSV (*.csv)")
        self.quarantine = file_widget(QgsFileWidget.GetDirectory)
        self.form.addRow("Image folders", box)
        self.form.addRow("Maximum Hamming distance", self.distance)
        self.form.addRow("Test folder (optional)", self.test_folder)
        self.form.addRow("Report CSV (optional)", self.report)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setIconSize(QSize(THUMB, THUMB))
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.Stretch)
        self.table.setMinimumHeight(220)
        self.body.addWidget(self.table)
        row = QHBoxLayout()
        self.move_button = QPushButton("Move to quarantine")
        self.undo_button = QPushButton("Undo move")
        self.move_button.setEnabled(False)
        self.undo_button.setEnabled(False)
        self.move_button.clicked.connect(self.move_to_quarantine)
        self.undo_button.clicked.connect(self.undo)
        row.addWidget(self.quarantine, 1)
        row.addWidget(self.move_button)
        row.addWidget(self.undo_button)
        self.body.addLayout(row)
        self.quarantine.lineEdit().setPlaceholderText("quarantine folder (outside the inputs)")
        self.mode = "find"
        self.found: Any = None
        self.manifest: Optional[str] = None
        from ...engine.core.options import DEFAULT_MAX_DISTANCE
        self.distance.setValue(DEFAULT_MAX_DISTANCE)

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Image folder")
        if folder:
            self.add_folder(folder)

    def add_folder(self, folder: str) -> None:
        if folder not in self.folder_list():
            self.folders.addItem(folder)

    def folder_list(self) -> List[str]:
        return [self.folders.item(i).text() for i in range(self.folders.count())]

    # -- checks --------------------------------------------------------------
    def validate(self) -> List[str]:
        problems: List[str] = []
        if self.mode == "find":
            folders = self.folder_list()
            if not folders:
                problems.append("Image folders: none added (add at least one folder)")
            for f in folders:
                if not os.path.isdir(f):
                    problems.append(f"Image folders: {f} does not exist (remove it)")
            test = self.test_folder.filePath().strip()
            if test:
                need_file(problems, "Test folder", test, folder=True)
            report = self.report.filePath().strip()
            if report and os.path.exists(report):
                problems.append(f"Report CSV: {report} already exists (choose a new file name)")
        elif self.mode == "move":
            if self.found is None or not self.found.remove:
                problems.append("Nothing to move (find duplicates first)")
            if not self.quarantine.filePath().strip():
                problems.append("Quarantine folder: none chosen (choose a folder outside the inputs)")
        elif self.mode == "undo" and not self.manifest:
            problems.append("Nothing to undo (no move was made)")
        return problems

    # -- the jobs ------------------------------------------------------------
    def start(self):
        self.mode = "find"
        return super().start()

    def move_to_quarantine(self):
        """Move the images not kept; only on the user's request (this button)."""
        self.mode = "move"
        return JobDialog.start(self)

    def undo(self):
        self.mode = "undo"
        return JobDialog.start(self)

    def make_job(self) -> Callable:
        if self.mode == "find":
            folders = self.folder_list()
            test = self.test_folder.filePath().strip() or None
            report = self.report.filePath().strip() or None
            distance = self.distance.value()

            def job(progress, cancel):
                from ...engine.core.options import DedupOptions
                from ...engine.dedup.duplicates import find_duplicates
                return find_duplicates(folders, report, against=[test] if test else None,
                                       options=DedupOptions(max_distance=distance),
                                       progress=progress, cancel=cancel)
            return job
        if self.mode == "move":
            found, quarantine = self.found, self.quarantine.filePath().strip()

            def job(progress, cancel):
                from ...engine.dedup.quarantine import move_duplicates
                return move_duplicates(found, quarantine, progress=progress, cancel=cancel)
            return job
        manifest = self.manifest

        def job(progress, cancel):
            from ...engine.dedup.quarantine import undo_move
            return undo_move(manifest, progress=progress, cancel=cancel)
        return job

    def job_description(self) -> str:
        return {"find": "MapCLIP de-duplication", "move": "MapCLIP quarantine move",
                "undo": "MapCLIP undo quarantine move"}[self.mode]

    def set_running(self, running: bool) -> None:
        super().set_running(running)
        self.move_button.setEnabled(not running and self.found is not None
                                    and bool(self.found.remove) and not self.manifest)
        self.undo_button.setEnabled(not running and bool(self.manifest))

    def job_done(self, result: Any) -> None:
        if self.mode == "find":
            self.found = result
            self.manifest = None
            self.fill_table(result)
            self.status.setText(f"{result.images} images: {len(result.groups)} duplicate groups, "
                                f"{len(result.contaminated)} duplicating the test folder, "
                                f"{len(result.remove)} would be moved")
        elif self.mode == "move":
            self.manifest = result.manifest
            self.status.setText(f"moved {result.moved} images; the manifest is {result.manifest}")
        else:
            self.manifest = None
            self.status.setText(f"moved {result.moved} images back")
        self.set_running(False)

    def fill_table(self, result: Any) -> None:
        rows = table_rows(result)
        self.table.setRowCount(len(rows))
        for r, (group, path, action, dup_of) in enumerate(rows):
            image = QTableWidgetItem(os.path.basename(path))
            if r < MAX_THUMBNAILS:
                pix = thumbnail(path)
                if not pix.isNull():
                    image.setIcon(QIcon(pix))
            for c, item in enumerate((QTableWidgetItem(group), image, QTableWidgetItem(action),
                                      QTableWidgetItem(dup_of), QTableWidgetItem(path))):
                item.setToolTip(path)
                self.table.setItem(r, c, item)
            self.table.setRowHeight(r, THUMB + 4 if r < MAX_THUMBNAILS else 22)
        self.table.resizeColumnsToContents()
