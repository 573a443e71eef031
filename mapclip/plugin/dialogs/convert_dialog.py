"""The conversion dialog: Box-to-Caption and Mask-to-Box, one tab each.

Both call the engine functions behind ``python -m engine convert b2c|m2b``
(``engine.data.box_caption.box_to_caption`` / ``mask_to_box``) in an
:class:`plugin.tasks.EngineTask`. The result's summary (images, captions,
boxes per class, images without objects) shows in the dialog.
"""
from __future__ import annotations

import os
from typing import Any, Callable, List

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QSpinBox, QTabWidget,
                                 QWidget)

from .base import JobDialog, file_widget, need_file

#: annotation formats (the engine's engine.data.annotations.FORMATS)
FORMATS = ("coco", "dota", "yolo", "voc")
#: formats whose annotations are one file; the others may be a folder of label files
SINGLE_FILE_FORMATS = ("coco",)


class ConvertDialog(JobDialog):
    """Box-to-Caption (annotations -> captions CSV) and Mask-to-Box (masks -> COCO JSON)."""

    TITLE = "MapCLIP: convert annotations"
    RUN_TEXT = "Convert"

    def __init__(self, iface=None, parent=None):
        super().__init__(iface, parent)
        self.tabs = QTabWidget()
        # Box-to-Caption
        b2c = QWidget()
        f = QFormLayout(b2c)
        self.b2c_format = QComboBox()
        self.b2c_format.addItems(FORMATS)
        self.b2c_annotations = file_widget(QgsFileWidget.GetFile,
                                           "Annotations (*.json *.xml *.txt);;All files (*)")
        self.b2c_folder = QCheckBox("Annotations are a folder of label files (DOTA, YOLO, VOC)")
        self.b2c_folder.toggled.connect(self._annotation_mode)
        self.b2c_images = file_widget(QgsFileWidget.GetDirectory)
        self.b2c_seed = QSpinBox()
        self.b2c_seed.setRange(0, 2 ** 31 - 1)
        self.b2c_out = file_widget(QgsFileWidget.SaveFile, "CSV (*.csv);;TSV (*.tsv);;JSONL (*.jsonl)")
        f.addRow("Format", self.b2c_format)
        f.addRow("Annotations", self.b2c_annotations)
        f.addRow("", self.b2c_folder)
        f.addRow("Images folder", self.b2c_images)
        f.addRow("Seed", self.b2c_seed)
        f.addRow("Captions file", self.b2c_out)
        # Mask-to-Box
        m2b = QWidget()
        g = QFormLayout(m2b)
        self.m2b_masks = file_widget(QgsFileWidget.GetDirectory)
        self.m2b_classes = file_widget(QgsFileWidget.GetFile, "JSON (*.json)")
        self.m2b_min_area = QSpinBox()
        self.m2b_min_area.setRange(0, 10 ** 8)
        self.m2b_ignore = QSpinBox()
        self.m2b_ignore.setRange(-1, 65535)
        self.m2b_ignore.setSpecialValueText("none")
        self.m2b_ignore.setValue(-1)
        self.m2b_images = file_widget(QgsFileWidget.GetDirectory)
        self.m2b_out = file_widget(QgsFileWidget.SaveFile, "JSON (*.json)")
        self.m2b_captions = file_widget(QgsFileWidget.SaveFile, "CSV (*.csv)")
        g.addRow("Mask folder", self.m2b_masks)
        g.addRow("Classes (JSON)", self.m2b_classes)
        g.addRow("Minimum area, px", self.m2b_min_area)
        g.addRow("Ignore value", self.m2b_ignore)
        g.addRow("Images folder (optional)", self.m2b_images)
        g.addRow("Boxes file (COCO JSON)", self.m2b_out)
        g.addRow("Also captions (optional)", self.m2b_captions)
        self.tabs.addTab(b2c, "Box-to-Caption")
        self.tabs.addTab(m2b, "Mask-to-Box")
        self.form.addRow(self.tabs)

    def _annotation_mode(self, folder: bool) -> None:
        self.b2c_annotations.setStorageMode(QgsFileWidget.GetDirectory if folder else QgsFileWidget.GetFile)

    @property
    def mode(self) -> str:
        return "b2c" if self.tabs.currentIndex() == 0 else "m2b"

    # -- checks --------------------------------------------------------------
    def validate(self) -> List[str]:
        problems: List[str] = []
        if self.mode == "b2c":
            ann = self.b2c_annotations.filePath().strip()
            fmt = self.b2c_format.currentText()
            if not ann:
                problems.append("Annotations: nothing chosen (choose the annotation file or folder)")
            elif not os.path.exists(ann):
                problems.append(f"Annotations: {ann} does not exist (choose an existing file or folder)")
            elif os.path.isdir(ann) and fmt in SINGLE_FILE_FORMATS:
                problems.append(f"Annotations: {fmt} annotations are one JSON file, not a folder "
                                f"(choose the file)")
            images = self.b2c_images.filePath().strip()
            if images:
                need_file(problems, "Images folder", images, folder=True)
            elif fmt == "yolo":
                problems.append("Images folder: YOLO labels are normalised, so the images are "
                                "needed for their sizes (choose the images folder)")
            self._need_output(problems, "Captions file", self.b2c_out.filePath())
        else:
            need_file(problems, "Mask folder", self.m2b_masks.filePath(), folder=True)
            need_file(problems, "Classes", self.m2b_classes.filePath())
            images = self.m2b_images.filePath().strip()
            if images:
                need_file(problems, "Images folder", images, folder=True)
            self._need_output(problems, "Boxes file", self.m2b_out.filePath())
            caps = self.m2b_captions.filePath().strip()
            if caps:
                self._need_output(problems, "Captions file", caps)
                if os.path.abspath(caps) == os.path.abspath(self.m2b_out.filePath().strip()):
                    problems.append("Captions file: same as the boxes file (choose another name)")
        return problems

    @staticmethod
    def _need_output(problems: List[str], label: str, path: str) -> None:
        path = path.strip()
        if not path:
            problems.append(f"{label}: no file chosen (choose where to write it)")
        elif os.path.exists(path):
            problems.append(f"{label}: {path} already exists (choose a new file name)")

    # -- the job -------------------------------------------------------------
    def make_job(self) -> Callable:
        if self.mode == "b2c":
            ann = self.b2c_annotations.filePath().strip()
            out = self.b2c_out.filePath().strip()
            kwargs = dict(format=self.b2c_format.currentText(),
                          images_dir=self.b2c_images.filePath().strip() or None,
                          seed=self.b2c_seed.value())

            def job(progress, cancel):
                from ...engine.core.options import BoxCaptionOptions
                from ...engine.data.box_caption import box_to_caption
                return box_to_caption(ann, out, BoxCaptionOptions(**kwargs), progress=progress,
                                      cancel=cancel)
            return job
        masks, classes = self.m2b_masks.filePath().strip(), self.m2b_classes.filePath().strip()
        out = self.m2b_out.filePath().strip()
        kwargs = dict(min_area=self.m2b_min_area.value(),
                      ignore_index=None if self.m2b_ignore.value() < 0 else self.m2b_ignore.value(),
                      images_dir=self.m2b_images.filePath().strip() or None,
                      captions=self.m2b_captions.filePath().strip() or None)

        def job(progress, cancel):
            from ...engine.core.options import MaskOptions
            from ...engine.data.mask_box import mask_to_box
            return mask_to_box(masks, classes, out, MaskOptions(**kwargs), progress=progress,
                               cancel=cancel)
        return job

    def job_description(self) -> str:
        return "MapCLIP Box-to-Caption" if self.mode == "b2c" else "MapCLIP Mask-to-Box"

    def job_done(self, result: Any) -> None:
        self.status.setText(summary(result))


def summary(result: Any) -> str:
    """One line about a CaptionResult or a MaskResult."""
    if hasattr(result, "captions") and isinstance(getattr(result, "captions"), int):
        text = (f"{result.captions} captions for {result.captioned} of {result.images} images "
                f"written to {result.out}")
        if result.empty:
            text += f"; {len(result.empty)} images without objects got none"
        return text
    per = ", ".join(f"{k} {v}" for k, v in sorted(result.per_class.items()))
    text = f"{result.boxes} boxes from {result.masks} masks ({per}) written to {result.out}"
    if result.captions is not None:
        text += f"; {result.captions.captions} captions in {result.captions.out}"
    return text
