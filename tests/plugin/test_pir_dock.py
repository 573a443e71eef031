"""A PIR-CLIP model fine-tuned by `finetune --recipe pir` searches in the dock (issue 27): its
model folder is added to the model picker, a search draws boxes (window mode; dense mode falls
back to window mode, saying why) and the Archive tab indexes and searches with it."""
from __future__ import annotations

from qgis.core import QgsRasterLayer

from .conftest import make_geotiff
from .test_tasks import _run, archive_in_dock, rigged, search_dock  # noqa: F401 (fixtures)


def _pir_model(tmp_path):
    from mapclip.engine.core.options import FinetuneOptions
    from mapclip.engine.finetune import finetune
    from tests.engine.test_pir import labelled_pairs, tiny_pir_config
    data = labelled_pairs(tmp_path / "data")
    spec = tiny_pir_config(tmp_path / "pir-tiny.json")
    result = finetune(FinetuneOptions(model=spec, recipe="pir", data=str(data), out=str(tmp_path / "run"),
                                      epochs=1, batch_size=3, lr=1e-3, val_split=0.0, workers=0,
                                      pir_prior_epochs=1, device="cpu"))
    return result.best_path


def test_a_pir_model_searches_in_the_dock_and_the_archive_tab(qtbot, search_dock, tmp_path, clean_project):
    from mapclip.plugin import tasks
    best = _pir_model(tmp_path)
    dock = search_dock
    tasks.forget_models()
    dock.add_model(best, "pir-run")
    dock.select_model(best)
    assert dock.current_model() == best
    raster = QgsRasterLayer(make_geotiff(tmp_path / "scene.tif"), "scene", "gdal")
    clean_project.addMapLayer(raster)
    dock.layer_combo.setLayer(raster)
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
    dock.prompt_combo.setEditText("a red square")
    dock.tile_spin.setValue(32)
    assert _run(qtbot, dock) == "done", dock.iface.bar_texts()
    assert dock.last_result.boxes and dock.last_result.model == best
    boxes = [l for l in dock.last_layers if l is not None and l.name() == "a red square"]
    assert boxes and boxes[0].featureCount() == len(dock.last_result.boxes)
    # dense mode: a PIR model has no dense path; the search runs in window mode and says so
    dock.method_combo.setCurrentText("dense")
    assert _run(qtbot, dock) == "done"
    assert dock.last_result.mode == "window"
    assert any("PIR model" in w for w in dock.last_result.warnings)
    # the Archive tab: an index built and searched with the same model
    folder = tmp_path / "archive"
    folder.mkdir()
    make_geotiff(folder / "a.tif")
    archive_in_dock(qtbot, dock, folder, tmp_path / "idx", "a red square", 2)
    assert dock.archive_results.topLevelItemCount() == 2
