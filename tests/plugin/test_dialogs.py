"""MapCLIP's dialogs in real QGIS (offscreen): they build, refuse incomplete input with
a message naming the field, and run their engine job as a QgsTask on tiny inputs."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest



@pytest.fixture(autouse=True)
def _mapclip(mapclip):
    """conftest's QGIS application and the repository as package ``mapclip``."""
    return mapclip


def wait_task(qtbot, dialog, timeout=120_000):
    qtbot.waitUntil(lambda: dialog.task is not None and dialog.task.is_finished, timeout=timeout)
    return dialog.task.outcome


def write_png(path: Path, rgb, size=(32, 32)) -> Path:
    from PIL import Image
    Image.new("RGB", size, tuple(int(v) for v in rgb)).save(path)
    return path


# --------------------------------------------------------------- fine-tune --
def caption_set(folder: Path, n: int = 8) -> Path:
    names = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20), (20, 220, 220),
               (220, 20, 220), (250, 250, 250), (5, 5, 5)]
    rows = ["image,caption"]
    for i in range(n):
        write_png(folder / f"im{i}.png", colours[i % 8])
        rows.append(f"im{i}.png,a {names[i % 8]} square")
    data = folder / "pairs.csv"
    data.write_text("\n".join(rows) + "\n")
    return data


def test_finetune_dialog_refuses_missing_fields(qtbot):
    from mapclip.plugin.dialogs.finetune_dialog import FinetuneDialog
    dlg = FinetuneDialog()
    qtbot.addWidget(dlg)
    dlg.lr.setText("fast")
    assert dlg.start() is None  # nothing runs
    assert dlg.task is None
    assert "Image-caption file" in dlg.last_error and "Output folder" in dlg.last_error
    assert "Learning rate" in dlg.last_error
    assert dlg.status.text().startswith("Image-caption file")


def test_finetune_dialog_runs_plots_and_offers_the_model(qtbot, tmp_path):
    from mapclip.plugin.dialogs.finetune_dialog import FinetuneDialog
    offered = []
    dlg = FinetuneDialog(on_model_ready=lambda path, name: offered.append((path, name)))
    qtbot.addWidget(dlg)
    dlg.data.setFilePath(str(caption_set(tmp_path)))
    dlg.model.setCurrentText("test-tiny")
    dlg.epochs.setValue(2)
    dlg.batch_size.setValue(8)  # one batch: no loader worker processes to start
    dlg.lr.setText("1e-4")
    dlg.val_split.setValue(0.25)
    dlg.device.setText("cpu")
    dlg.out.setFilePath(str(tmp_path / "run"))
    assert dlg.validate() == []
    assert dlg.start() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    assert dlg.progress.value() == 100
    assert len(dlg.plot.loss) >= 2 and len(dlg.plot.recall) == 3  # before + 2 epochs
    assert all(0.0 <= r <= 100.0 for _, r in dlg.plot.recall)
    # the plot paints without error once it has lines
    dlg.plot.resize(300, 140)
    dlg.plot.grab()
    assert dlg.add_button.isEnabled() and not offered
    dlg.add_button.click()
    assert offered == [(str(tmp_path / "run" / "best"), "run")]
    assert (tmp_path / "run" / "best" / "open_clip_config.json").is_file()


def test_finetune_dialog_offers_recipe_and_runs_pir(qtbot, tmp_path):
    from mapclip.engine.core.options import RECIPES
    from mapclip.plugin.dialogs.finetune_dialog import FinetuneDialog
    dlg = FinetuneDialog()
    qtbot.addWidget(dlg)
    assert [dlg.recipe.itemText(i) for i in range(dlg.recipe.count())] == list(RECIPES)
    assert dlg.recipe.currentText() == "clip" and not dlg.pir_prior.isEnabled()
    assert dlg.options_kwargs()["recipe"] == "clip" and dlg.options_kwargs()["pir_prior"] is None
    # scene labels beside the captions: two classes of four images each
    data = caption_set(tmp_path)
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[0] + ",label"] + [f"{r},{'warm' if i % 2 else 'cool'}"
                                                       for i, r in enumerate(rows[1:])]) + "\n")
    cfg = json.loads((Path(__file__).parents[2] / "mapclip" / "engine" / "model" / "configs"
                      / "mapclip-tiny.json").read_text())
    cfg["pir_cfg"] = {"res_layers": [1, 1, 1, 1], "res_width": 8, "head_width": 64}
    (tmp_path / "pir-tiny.json").write_text(json.dumps(cfg))
    dlg.data.setFilePath(str(data))
    dlg.model.setCurrentText(f"{tmp_path / 'pir-tiny.json'}:random")
    dlg.recipe.setCurrentText("pir")
    assert dlg.pir_prior.isEnabled()
    dlg.pir_prior.setFilePath(str(tmp_path / "no-prior.safetensors"))
    dlg.out.setFilePath(str(tmp_path / "run"))
    assert any("PIR prior checkpoint" in p for p in dlg.validate())
    dlg.pir_prior.setFilePath("")
    dlg.epochs.setValue(1)
    dlg.batch_size.setValue(8)
    dlg.lr.setText("1e-3")
    dlg.val_split.setValue(0.0)
    dlg.device.setText("cpu")
    assert dlg.validate() == []
    assert dlg.options_kwargs()["recipe"] == "pir" and dlg.options_kwargs()["pir_labels"] == "column"
    assert [dlg.pir_labels.itemText(i) for i in range(dlg.pir_labels.count())] == ["column", "filename"]
    assert dlg.start() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    meta = json.loads((tmp_path / "run" / "best" / "open_clip_config.json").read_text())
    assert meta["mapclip"]["recipe"] == "pir" and "pir_cfg" in meta["model_cfg"]
    assert (tmp_path / "run" / "prior.safetensors").is_file()


def test_finetune_dialog_resume_needs_existing_run(qtbot, tmp_path):
    from mapclip.plugin.dialogs.finetune_dialog import FinetuneDialog
    dlg = FinetuneDialog()
    qtbot.addWidget(dlg)
    dlg.data.setFilePath(str(caption_set(tmp_path)))
    dlg.out.setFilePath(str(tmp_path / "nothing-here"))
    dlg.resume.setChecked(True)
    assert any("nothing to resume" in p for p in dlg.validate())


# ----------------------------------------------------------------- convert --
def test_convert_dialog_validates_each_tab(qtbot, tmp_path):
    from mapclip.plugin.dialogs.convert_dialog import ConvertDialog
    dlg = ConvertDialog()
    qtbot.addWidget(dlg)
    problems = dlg.validate()
    assert any(p.startswith("Annotations") for p in problems)
    assert any(p.startswith("Captions file") for p in problems)
    dlg.b2c_format.setCurrentText("yolo")
    dlg.b2c_annotations.setFilePath(str(tmp_path))
    assert any("YOLO" in p for p in dlg.validate())
    dlg.tabs.setCurrentIndex(1)
    problems = dlg.validate()
    assert any(p.startswith("Mask folder") for p in problems)
    assert any(p.startswith("Classes") for p in problems)
    assert any(p.startswith("Boxes file") for p in problems)


def test_convert_dialog_box_to_caption_and_mask_to_box(qtbot, tmp_path):
    from PIL import Image
    from mapclip.plugin.dialogs.convert_dialog import ConvertDialog
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "categories": [{"id": 1, "name": "ship"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 30, 4, 4]}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dlg = ConvertDialog()
    qtbot.addWidget(dlg)
    dlg.b2c_annotations.setFilePath(str(tmp_path / "ann.json"))
    dlg.b2c_out.setFilePath(str(tmp_path / "caps.csv"))
    assert dlg.start() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    rows = [r for r in csv.reader((tmp_path / "caps.csv").open()) if r and r[0] != "image"]
    assert len(rows) == 5 and "5 captions" in dlg.status.text()
    # Mask-to-Box
    (tmp_path / "masks").mkdir()
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 2:12] = 1
    Image.fromarray(m).save(tmp_path / "masks" / "m.png")
    (tmp_path / "classes.json").write_text(json.dumps({"1": "building"}))
    dlg.tabs.setCurrentIndex(1)
    dlg.m2b_masks.setFilePath(str(tmp_path / "masks"))
    dlg.m2b_classes.setFilePath(str(tmp_path / "classes.json"))
    dlg.m2b_ignore.setValue(0)
    dlg.m2b_out.setFilePath(str(tmp_path / "boxes.json"))
    assert dlg.start() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    boxes = [a["bbox"] for a in json.loads((tmp_path / "boxes.json").read_text())["annotations"]]
    assert boxes == [[2, 4, 10, 4]]
    assert "1 boxes" in dlg.status.text() or "building 1" in dlg.status.text()


def test_convert_dialog_engine_error_goes_to_message_bar(qtbot, tmp_path):
    from mapclip.plugin.dialogs.convert_dialog import ConvertDialog
    (tmp_path / "bad.json").write_text("{oops")
    dlg = ConvertDialog()
    qtbot.addWidget(dlg)
    dlg.b2c_annotations.setFilePath(str(tmp_path / "bad.json"))
    dlg.b2c_out.setFilePath(str(tmp_path / "caps.csv"))
    dlg.start()
    assert wait_task(qtbot, dlg) == "error"
    assert "bad.json" in dlg.last_error and "fix" in dlg.last_error
    assert dlg.bar.currentItem() is not None
    assert dlg.run_button.isEnabled() and not (tmp_path / "caps.csv").exists()


# ------------------------------------------------------------------- dedup --
def test_dedup_dialog_validates(qtbot, tmp_path):
    from mapclip.plugin.dialogs.dedup_dialog import DedupDialog
    dlg = DedupDialog()
    qtbot.addWidget(dlg)
    assert dlg.start() is None and "Image folders" in dlg.last_error
    dlg.add_folder(str(tmp_path / "missing"))
    assert any("does not exist" in p for p in dlg.validate())
    assert dlg.move_to_quarantine() is None and "find duplicates first" in dlg.last_error
    assert not dlg.move_button.isEnabled()


def test_dedup_dialog_finds_groups_moves_on_request_and_undoes(qtbot, tmp_path, near_duplicate_folders):
    from mapclip.plugin.dialogs.dedup_dialog import DedupDialog
    train, test = near_duplicate_folders
    dlg = DedupDialog()
    qtbot.addWidget(dlg)
    dlg.add_folder(str(train))
    dlg.test_folder.setFilePath(str(test))
    assert dlg.start() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    actions = sorted(dlg.table.item(r, 2).text() for r in range(dlg.table.rowCount()))
    assert actions == ["contaminated", "duplicate", "keep"]
    assert not dlg.table.item(0, 1).icon().isNull()  # thumbnail
    assert len(list(train.iterdir())) == 3           # finding moves nothing
    assert dlg.move_button.isEnabled() and not dlg.undo_button.isEnabled()
    # the move needs a quarantine folder
    assert dlg.move_to_quarantine() is None and "Quarantine folder" in dlg.last_error
    dlg.quarantine.setFilePath(str(tmp_path / "q"))
    assert dlg.move_to_quarantine() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    assert len(list(train.iterdir())) == 1 and dlg.manifest and os.path.isfile(dlg.manifest)
    assert dlg.undo_button.isEnabled() and not dlg.move_button.isEnabled()
    assert dlg.undo() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    assert len(list(train.iterdir())) == 3 and dlg.manifest is None


def test_finetune_dialog_cancel_then_resume(qtbot, tmp_path):
    """Cancel after the first epoch's evaluation; Resume finishes the second epoch only."""
    from qgis.PyQt.QtCore import Qt
    from mapclip.plugin.dialogs.finetune_dialog import FinetuneDialog
    dlg = FinetuneDialog()
    qtbot.addWidget(dlg)
    dlg.data.setFilePath(str(caption_set(tmp_path)))
    dlg.model.setCurrentText("test-tiny")
    dlg.epochs.setValue(2)
    dlg.batch_size.setValue(8)
    dlg.device.setText("cpu")
    dlg.out.setFilePath(str(tmp_path / "run"))

    def cancel_after_epoch_1(record):  # runs in the worker thread (direct connection)
        if record.get("type") == "eval" and record.get("epoch") == 1:
            dlg.task.cancel()

    dlg.metrics_arrived.connect(cancel_after_epoch_1, Qt.DirectConnection)
    dlg.start()
    assert wait_task(qtbot, dlg) == "cancelled"
    assert "cancelled" in dlg.status.text() and not dlg.add_button.isEnabled()
    dlg.metrics_arrived.disconnect(cancel_after_epoch_1)
    dlg.resume.setChecked(True)
    assert dlg.start() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    assert dlg.result.resumed_from_epoch == 1 and dlg.result.epochs_run == 1
    assert dlg.add_button.isEnabled()


# ----------------------------------------------------------- model manager --
def test_model_manager_lists_adds_checks_and_removes(qtbot, tmp_path, qgis_settings):
    from mapclip.plugin.dialogs.model_manager import ModelManagerDialog
    from mapclip.plugin.settings import Settings
    from tests.rigged import save_rigged_folder
    folder = str(save_rigged_folder(tmp_path / "run" / "best"))
    dlg = ModelManagerDialog(settings=Settings())
    qtbot.addWidget(dlg)
    specs = [dlg.table.item(r, 0).text() for r in range(dlg.table.rowCount())]
    assert "remoteclip-vit-b-32" in specs and "demo" in specs and "test-tiny" not in specs
    dlg.select_spec("remoteclip-vit-b-32")
    assert not dlg.remove_button.isEnabled()  # presets cannot be removed
    changed = []
    dlg.models_changed.connect(lambda: changed.append(1))
    dlg.add_model(folder, "run")
    assert changed and Settings().custom_models()[-1]["spec"] == folder
    assert dlg.selected_spec() == folder and dlg.remove_button.isEnabled()
    assert dlg.start() is not None
    assert wait_task(qtbot, dlg) == "done", dlg.last_error
    from tests.rigged import EMBED, IMAGE_SIZE
    assert f"embedding {EMBED}, input {IMAGE_SIZE} px" in dlg.status.text()
    assert "mapclip-rigged" in dlg.status.text()
    # a checkpoint that does not exist: the check fails with the engine's message
    spec = dlg.add_checkpoint(str(tmp_path / "missing.pt"), "ViT-B-32-quickgelu")
    row = [dlg.table.item(r, 2).text() for r in range(dlg.table.rowCount())
           if dlg.table.item(r, 0).text() == spec]
    assert row == ["no"]
    dlg.start()
    assert wait_task(qtbot, dlg) == "error" and "missing.pt" in dlg.last_error
    dlg.remove_selected()
    assert spec not in [i["spec"] for i in Settings().custom_models()]


def test_model_manager_adds_a_published_checkpoint_by_path_and_asks_only_the_activation(
        qtbot, tmp_path, qgis_settings, monkeypatch):
    """No free architecture list: a recognised file is added as is, another file's
    architecture comes from its shapes and only its activation is picked."""
    import torch

    from mapclip.engine.model.models import load_model
    from mapclip.plugin.dialogs import model_manager as mm
    from mapclip.plugin.settings import Settings
    sd = load_model("test-tiny", device="cpu").model.state_dict()
    published = tmp_path / "RemoteCLIP-ViT-B-32.pt"      # the published name, tiny weights
    torch.save(sd, published)
    other = tmp_path / "mine.pt"
    torch.save(sd, other)
    dlg = mm.ModelManagerDialog(settings=Settings())
    qtbot.addWidget(dlg)
    picked = {"path": str(published)}
    monkeypatch.setattr(mm.QFileDialog, "getOpenFileName",
                        staticmethod(lambda *a, **k: (picked["path"], "")))
    asked = []

    def get_item(parent, title, label, items, current, editable):
        asked.append((list(items), editable))
        return items[current], True

    monkeypatch.setattr(mm.QInputDialog, "getItem", staticmethod(get_item))
    monkeypatch.setattr(mm.QInputDialog, "getText",
                        staticmethod(lambda *a, **k: pytest.fail("no free-text architecture for these files")))
    assert dlg._pick_checkpoint() == str(published) and not asked
    picked["path"] = str(other)
    spec = dlg._pick_checkpoint()
    assert spec == f"mapclip-tiny:{other}" and asked == [([f"mapclip-tiny:{other}"], False)]
    assert [m["spec"] for m in Settings().custom_models()][-2:] == [str(published), spec]
