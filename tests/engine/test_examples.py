"""Examples that refine a search (engine.data.examples, engine.model.scoring.refine_query,
detect(examples=...)): read from any vector file, moved prompts, answered from the kept pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mapclip.engine.core.errors import UsageError
from mapclip.engine.core.options import DetectOptions
from mapclip.engine.data.examples import Example, parse_label, read_examples
from mapclip.engine.detect import detect
from mapclip.engine.model.scoring import ROCCHIO_NEGATIVE, ROCCHIO_POSITIVE, refine_query
from tests.engine.test_detect import scene
from tests.rigged import BLUE, RED, RED_PROMPT, rigged_model


@pytest.fixture(scope="module")
def rig():
    return rigged_model()


def test_rocchio_moves_the_prompt_toward_positives_and_away_from_negatives_by_hand():
    t = torch.tensor([1.0, 0.0, 0.0])
    pos = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0, 1.0]])
    q = refine_query(t, pos, neg, "rocchio")
    # t + 0.75 * (0, 1, 0) - 0.25 * (0, 0, 1) = (1, 0.75, -0.25), normalised
    want = torch.tensor([1.0, ROCCHIO_POSITIVE, -ROCCHIO_NEGATIVE])
    assert torch.allclose(q, want / want.norm(), atol=1e-6)
    # only negatives: away from them; examples alone: the positives' mean
    q = refine_query(t, None, neg, "rocchio")
    assert q[2] < 0 and q[0] > 0.9
    assert torch.allclose(refine_query(None, pos, None, "rocchio"), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(UsageError):
        refine_query(None, None, neg, "rocchio")
    with pytest.raises(UsageError) as err:
        refine_query(t, pos, neg, "magic")
    assert err.value.option == "examples_method"


def test_the_probe_separates_the_examples_and_stays_near_the_prompt():
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.tensor([1.0, 0.2, 0.0, 0.0]), dim=0)
    pos = torch.nn.functional.normalize(torch.tensor([[0.6, 0.8, 0.0, 0.0]]) + 0.01 * torch.randn(3, 4, generator=g), dim=1)
    neg = torch.nn.functional.normalize(torch.tensor([[0.6, -0.8, 0.0, 0.0]]) + 0.01 * torch.randn(3, 4, generator=g), dim=1)
    q = refine_query(t, pos, neg, "probe")
    assert float((pos @ q).min()) > float((neg @ q).max())       # positives now rank above negatives
    assert float(q @ t) > 0.5                                    # and the prompt still counts
    assert abs(float(q.norm()) - 1.0) < 1e-6


def test_labels_and_files(tmp_path):
    assert [parse_label(v) for v in (1, "1", "true", "Yes", 1.0, "0", False, "no")] == \
        [True, True, True, True, True, False, False, False]
    assert parse_label("maybe") is None
    from osgeo import ogr, osr
    path = tmp_path / "marks.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    layer = ds.CreateLayer("marks", srs, ogr.wkbUnknown)
    layer.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
    for wkt, label in (("POINT (10 20)", 1), ("POLYGON ((0 0, 4 0, 4 2, 0 2, 0 0))", 0)):
        f = ogr.Feature(layer.GetLayerDefn())
        f.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
        f.SetField("label", label)
        layer.CreateFeature(f)
    ds = None
    examples, crs = read_examples(path)
    assert examples == [Example(10.0, 20.0, True), Example(2.0, 1.0, False)]   # polygon: centroid
    assert "32633" in crs or "UTM" in crs
    bad = tmp_path / "nolabel.geojson"
    bad.write_text('{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"x":1},'
                   '"geometry":{"type":"Point","coordinates":[1,2]}}]}')
    with pytest.raises(UsageError) as err:
        read_examples(bad)
    assert "no 'label' field" in err.value.message and err.value.option == "examples"


def test_a_search_refined_by_examples_is_answered_from_the_kept_pass(tmp_path, rig):
    # three red squares and a blue one; the windows at two red squares are marked "yes",
    # the window at the blue square "not this"
    squares = [(40, 40, 32, RED), (200, 40, 32, RED), (40, 180, 32, RED), (200, 180, 32, BLUE)]
    path = scene(tmp_path / "s.tif", squares=squares)
    from mapclip.engine.raster.reader import open_raster
    with open_raster(path) as r:
        tf = r.info.transform
    at = lambda c, r_: tf @ (c, r_)                                          # noqa: E731
    examples = [Example(*at(56, 56), True), Example(*at(216, 56), True), Example(*at(216, 196), False),
                Example(*at(5000, 5000), True)]                              # the last one is outside
    o = DetectOptions(tile_px=32, window=2, batch_size=8, refine=False, top_k=5)
    plain = detect(path, [RED_PROMPT], rig, options=o)
    assert plain.cache == "computed"
    refined = detect(path, [RED_PROMPT], rig, options=o, examples=examples)
    assert refined.cache == "memory"                                         # no pixel read again
    assert any("refined by 2 positive and 1 negative examples (rocchio)" in w for w in refined.warnings)
    assert any("1 of 4 examples lie outside" in w for w in refined.warnings)
    assert [b.cosine for b in refined.boxes] != [b.cosine for b in plain.boxes]   # the softmax saturates
    # the red square nobody marked is still found first; the marked blue one is not in the top boxes
    c0, r0, c1, r1 = refined.boxes[0].pixel
    assert any(c0 <= x <= c1 and r0 <= y <= r1 for x, y in ((56, 56), (216, 56), (56, 196)))
    assert not any(b.pixel[0] <= 216 <= b.pixel[2] and b.pixel[1] <= 196 <= b.pixel[3]
                   for b in refined.boxes[:3])
    # the same refinement without the cache gives the same boxes
    fresh = detect(path, [RED_PROMPT], rig, options=DetectOptions(tile_px=32, window=2, batch_size=8,
                                                                   refine=False, top_k=5, cache=False),
                   examples=examples)
    assert [b.pixel for b in fresh.boxes] == [b.pixel for b in refined.boxes]
    np.testing.assert_allclose([b.cosine for b in fresh.boxes], [b.cosine for b in refined.boxes], atol=1e-6)
    with pytest.raises(UsageError) as err:
        detect(path, [RED_PROMPT], rig, options=DetectOptions(tile_px=32, mode="dense"), examples=examples)
    assert err.value.option == "examples" and "window mode" in err.value.hint


def test_the_cli_takes_an_examples_file_and_says_what_it_did(tmp_path, rig, capsys):
    import json

    from osgeo import ogr, osr
    from mapclip.engine.cli import main as cli_main
    from tests.rigged import save_rigged_folder
    folder = str(save_rigged_folder(tmp_path / "rigged"))
    path = scene(tmp_path / "s.tif", squares=[(40, 40, 32, RED), (200, 180, 32, BLUE)])
    from mapclip.engine.raster.reader import open_raster
    with open_raster(path) as r:
        tf, wkt = r.info.transform, r.info.crs
    marks = tmp_path / "marks.geojson"
    ds = ogr.GetDriverByName("GeoJSON").CreateDataSource(str(marks))
    srs = osr.SpatialReference()
    srs.ImportFromWkt(wkt)
    layer = ds.CreateLayer("marks", srs, ogr.wkbPoint)
    layer.CreateField(ogr.FieldDefn("label", ogr.OFTString))
    for (c, r_), label in (((56, 56), "yes"), ((216, 196), "no")):
        f = ogr.Feature(layer.GetLayerDefn())
        x, y = tf @ (c, r_)
        f.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT ({x} {y})"))
        f.SetField("label", label)
        layer.CreateFeature(f)
    ds = None
    code = cli_main(["detect", path, "--prompt", RED_PROMPT, "--model", folder, "--tile", "32",
                     "--window", "2", "--out", str(tmp_path / "b.gpkg"), "--examples", str(marks),
                     "--examples-method", "probe", "--no-refine", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert any("1 positive and 1 negative examples (probe)" in w for w in out["warnings"])
    # the examples file is an input: it is never overwritten
    code = cli_main(["detect", path, "--prompt", RED_PROMPT, "--model", folder, "--out", str(marks),
                     "--examples", str(marks), "--overwrite"])
    assert code == 2 and "label" in marks.read_text()
