"""Remote rasters (raster/remote.py): a COG served over loopback HTTP with byte
ranges gives the CLI the same hits and boxes as the local file; a dead server or a
missing object is refused with the URL and GDAL's reason."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mapclip.engine.cli import main as cli_main
from tests.rangeserver import RangeServer, dead_port, write_cog
from tests.raster_fixtures import noise
from tests.rigged import RED, RED_PROMPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def served(tmp_path):
    """A folder of two COGs (one with a red patch) and a server for it."""
    data = noise(3, 192, 256, seed=5)
    data[:, 140:180, 200:240] = np.array(RED, np.uint8)[:, None, None]
    write_cog(tmp_path / "www" / "scene_cog.tif", data)
    write_cog(tmp_path / "www" / "other_cog.tif", noise(3, 128, 128, seed=6))
    with RangeServer(tmp_path / "www") as server:
        yield server, tmp_path / "www"


def _run(argv, capsys):
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _detect(raster, out, rig_folder, capsys):
    code, stdout, err = _run(["detect", raster, "--prompt", RED_PROMPT, "--model", rig_folder,
                              "--tile", "64", "--window", "1", "--top-k", "2", "--out", str(out),
                              "--device", "cpu", "--json", "--no-refine", "--read-workers", "0"],
                             capsys)
    assert code == 0, err
    return json.loads(stdout)


@pytest.mark.parametrize("form", ["vsicurl", "http"])
def test_detect_on_a_served_cog_finds_the_boxes_of_the_local_file(tmp_path, served, rig_folder,
                                                                   capsys, form):
    server, www = served
    local = _detect(str(www / "scene_cog.tif"), tmp_path / "local.gpkg", rig_folder, capsys)
    url = f"{server.url}/scene_cog.tif"
    remote = _detect(url if form == "http" else "/vsicurl/" + url, tmp_path / "remote.gpkg",
                     rig_folder, capsys)
    assert server.ranged_gets() > 0                    # GDAL read parts, not a download
    assert remote["boxes"] and remote["tiles"] == local["tiles"]
    assert [(b["pixel"], b["bounds"], round(b["score"], 5)) for b in remote["boxes"]] == \
           [(b["pixel"], b["bounds"], round(b["score"], 5)) for b in local["boxes"]]


def test_a_dead_server_and_a_missing_object_are_refused_with_the_url_and_gdals_reason(
        tmp_path, served, rig_folder, capsys, monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")
    server, _ = served
    dead = f"/vsicurl/http://127.0.0.1:{dead_port()}/scene_cog.tif"
    missing = f"{server.url}/no_such_cog.tif"
    for url, reason in [(dead, "connect"), (missing, "404")]:
        for verb in (["detect", url, "--prompt", "x", "--model", rig_folder, "--out",
                      str(tmp_path / "b.gpkg")],
                     ["index", url, "--model", rig_folder, "--out", str(tmp_path / "idx")]):
            code, _, err = _run(verb, capsys)
            assert code == 2, err
            line = err.splitlines()[0]
            assert line.startswith("error: cannot read remote raster /vsicurl/http://127.0.0.1:")
            assert reason in err.lower() and "does not exist" not in err
            assert "GDAL_HTTP_MAX_RETRY" in err and "Traceback" not in err
    assert not (tmp_path / "idx").exists() and not (tmp_path / "b.gpkg").exists()


def test_index_records_the_url_resumes_and_rechecks_it_on_append(tmp_path, served, rig_folder,
                                                                 capsys, monkeypatch):
    server, www = served
    url = f"{server.url}/scene_cog.tif"
    remote_idx, local_idx = tmp_path / "remote_idx", tmp_path / "local_idx"
    common = ["--model", rig_folder, "--tile", "64", "--device", "cpu", "--json",
              "--read-workers", "0"]
    code, out, err = _run(["index", url, f"/vsicurl/{server.url}/other_cog.tif",
                           "--out", str(remote_idx), *common], capsys)
    assert code == 0, err
    built = json.loads(out)
    assert built["added"] == [f"/vsicurl/{url}", f"/vsicurl/{server.url}/other_cog.tif"]
    manifest = json.loads((remote_idx / "manifest.json").read_text())
    assert [r["path"] for r in manifest["rasters"]] == built["added"]       # never http:/
    assert manifest["rasters"][0]["name"] == "scene_cog.tif"
    assert manifest["rasters"][0]["checksum"].startswith("remote1:")
    assert _run(["index", str(www / "scene_cog.tif"), str(www / "other_cog.tif"),
                 "--out", str(local_idx), *common], capsys)[0] == 0
    hits = {}
    for name, idx in (("remote", remote_idx), ("local", local_idx)):
        code, out, err = _run(["search", str(idx), "--text", RED_PROMPT, "--top-k", "3",
                               "--model", rig_folder, "--device", "cpu", "--json"], capsys)
        assert code == 0, err
        hits[name] = json.loads(out)["hits"]
    assert hits["remote"][0]["raster"] == f"/vsicurl/{url}"
    assert [(h["pixel"], h["bounds"], round(h["score"], 4)) for h in hits["remote"]] == \
           [(h["pixel"], h["bounds"], round(h["score"], 4)) for h in hits["local"]]
    # the same URL again: unchanged, checked by opening it (the server saw new requests)
    seen = len(server.requests)
    code, out, err = _run(["index", url, "--out", str(remote_idx), "--json", "--read-workers", "0"],
                          capsys)
    assert code == 0, err
    assert json.loads(out)["unchanged"] == [f"/vsicurl/{url}"] and len(server.requests) > seen
    # the object rewritten in place: replaced; gone: the append is refused, the index kept
    write_cog(www / "scene_cog.tif", noise(3, 192, 256, seed=9))
    code, out, err = _run(["index", url, "--out", str(remote_idx), "--json", "--read-workers", "0"],
                          capsys)
    assert code == 0, err
    assert json.loads(out)["replaced"] == [f"/vsicurl/{url}"]
    os.remove(www / "scene_cog.tif")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    code, _, err = _run(["index", url, "--out", str(remote_idx), "--read-workers", "0"], capsys)
    assert code == 2 and "cannot read remote raster" in err and "404" in err
    assert json.loads((remote_idx / "manifest.json").read_text())["rasters"][0]["path"] == \
        f"/vsicurl/{url}"


WORLD = 20037508.342789244
LEVEL = 12


def _xyz_xml(url: str) -> str:
    """A GDAL TMS description of an XYZ tile service (EPSG:3857, zoom LEVEL)."""
    return f"""<GDAL_WMS>
  <Service name="TMS"><ServerUrl>{url}/${{z}}/${{x}}/${{y}}.png</ServerUrl></Service>
  <DataWindow><UpperLeftX>{-WORLD}</UpperLeftX><UpperLeftY>{WORLD}</UpperLeftY>
    <LowerRightX>{WORLD}</LowerRightX><LowerRightY>{-WORLD}</LowerRightY>
    <TileLevel>{LEVEL}</TileLevel><TileCountX>1</TileCountX><TileCountY>1</TileCountY>
    <YOrigin>top</YOrigin></DataWindow>
  <Projection>EPSG:3857</Projection><BlockSizeX>256</BlockSizeX><BlockSizeY>256</BlockSizeY>
  <BandsCount>3</BandsCount>
</GDAL_WMS>
"""


def test_index_of_an_xyz_service_needs_an_extent_and_matches_the_same_pixels_on_disk(
        tmp_path, rig_folder, capsys):
    import rasterio
    from rasterio.transform import from_origin

    from tests.raster_fixtures import make_raster
    x0, y0 = 2200, 1343                                # a 2 x 2 block of tiles at LEVEL
    size = 2 * WORLD / 2 ** LEVEL
    mosaic = noise(3, 512, 512, seed=7)
    mosaic[:, 300:340, 80:120] = np.array(RED, np.uint8)[:, None, None]
    for dx in (0, 1):
        for dy in (0, 1):
            tile = tmp_path / "www" / str(LEVEL) / str(x0 + dx) / f"{y0 + dy}.png"
            tile.parent.mkdir(parents=True, exist_ok=True)
            with rasterio.open(tile, "w", driver="PNG", width=256, height=256, count=3,
                               dtype="uint8") as ds:
                ds.write(mosaic[:, dy * 256:(dy + 1) * 256, dx * 256:(dx + 1) * 256])
    xmin, ymax = -WORLD + x0 * size, WORLD - y0 * size
    local = make_raster(tmp_path / "mosaic.tif", 512, 512, data=mosaic, crs="EPSG:3857",
                        transform=from_origin(xmin, ymax, size / 256, size / 256))
    extent = f"{xmin!r},{ymax - 2 * size!r},{xmin + 2 * size!r},{ymax!r}"
    common = ["--model", rig_folder, "--tile", "64", "--device", "cpu", "--json", "--read-workers", "0"]
    with RangeServer(tmp_path / "www") as server:
        xml = tmp_path / "xyz.xml"
        xml.write_text(_xyz_xml(server.url))
        code, _, err = _run(["index", str(xml), "--out", str(tmp_path / "world"), *common], capsys)
        assert code == 2 and "web map service" in err and "--extent" in err
        assert not (tmp_path / "world").exists() and not server.requests   # nothing fetched
        code, out, err = _run(["index", str(xml), "--out", str(tmp_path / "xyz_idx"),
                               f"--extent={extent}", *common], capsys)
        assert code == 0, err
        assert json.loads(out)["rows"] == 64
        assert {p for _, p, _ in server.requests} == {
            f"/{LEVEL}/{x0 + dx}/{y0 + dy}.png" for dx in (0, 1) for dy in (0, 1)}
    assert _run(["index", str(local), "--out", str(tmp_path / "local_idx"), *common], capsys)[0] == 0
    hits = {}
    for name in ("xyz_idx", "local_idx"):
        code, out, err = _run(["search", str(tmp_path / name), "--text", RED_PROMPT, "--top-k", "3",
                               "--model", rig_folder, "--device", "cpu", "--json"], capsys)
        assert code == 0, err
        hits[name] = json.loads(out)["hits"]
    assert [([round(v, 3) for v in h["bounds"]], round(h["score"], 4)) for h in hits["xyz_idx"]] == \
           [([round(v, 3) for v in h["bounds"]], round(h["score"], 4)) for h in hits["local_idx"]]
    assert hits["xyz_idx"][0]["pixel"][2:] == [64, 64]


def test_an_index_extent_leaves_out_rasters_it_misses_and_refuses_one_that_misses_all(
        tmp_path, rig_folder, capsys):
    from tests.raster_fixtures import UTM_ORIGIN, make_raster
    a = make_raster(tmp_path / "a.tif", 128, 128, seed=1)
    far = make_raster(tmp_path / "far.tif", 64, 64, seed=2, origin=(UTM_ORIGIN[0] + 10_000, UTM_ORIGIN[1]))
    x, y = UTM_ORIGIN
    common = ["--model", rig_folder, "--tile", "32", "--device", "cpu", "--json", "--read-workers", "0"]
    code, out, err = _run(["index", str(a), str(far), "--out", str(tmp_path / "idx"),
                           f"--extent={x},{y - 16},{x + 16},{y}", *common], capsys)   # 32 x 32 px
    assert code == 0, err
    info = json.loads(out)
    assert info["rows"] == 1 and info["added"] == [str(a)]
    assert any(str(far) in w and "misses" in w for w in info["warnings"])
    # the same raster with a larger extent: other tiles, so its rows are replaced
    code, out, err = _run(["index", str(a), "--out", str(tmp_path / "idx"),
                           f"--extent={x},{y - 32},{x + 32},{y}", *common], capsys)
    assert code == 0, err
    assert json.loads(out)["replaced"] == [str(a)] and json.loads(out)["rows"] == 4
    code, _, err = _run(["index", str(far), "--out", str(tmp_path / "idx2"),
                         f"--extent={x},{y - 32},{x + 32},{y}", *common], capsys)
    assert code == 2 and "misses the raster" in err
    code, _, err = _run(["index", str(a), "--out", str(tmp_path / "idx3"),
                         "--extent-crs", "EPSG:4326", *common], capsys)
    assert code == 2 and "--extent" in err


def _catalogue(www, server_url, with_thumbnail_only=False,
               names=("scene_cog.tif", "other_cog.tif", "third_cog.tif")):
    """A static STAC catalogue of the served COGs (written with pystac), beside them."""
    import datetime as dt

    import pystac
    cat = pystac.Catalog(id="scenes", description="three COGs served over loopback")
    days = dict(zip(names, ("2024-06-01", "2024-07-15", "2025-01-10")))
    for name, day in days.items():
        item = pystac.Item(id=name.split(".")[0], geometry=None, bbox=[14.9, 36.0, 15.1, 36.2],
                           datetime=dt.datetime.fromisoformat(day + "T10:00:00+00:00"), properties={})
        item.add_asset("thumbnail", pystac.Asset(href=f"{server_url}/{name}.png", roles=["thumbnail"],
                                                 media_type="image/png"))
        if not (with_thumbnail_only and name == names[-1]):
            item.add_asset("image", pystac.Asset(href=f"{server_url}/{name}", roles=["visual"],
                                                 media_type=pystac.MediaType.COG))
        cat.add_item(item)
    cat.normalize_hrefs(str(www))
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return f"{server_url}/catalog.json"


def test_a_static_stac_catalogue_of_three_cogs_is_indexed_and_searched_like_the_files(
        tmp_path, served, rig_folder, capsys):
    server, www = served
    write_cog(www / "third_cog.tif", noise(3, 128, 128, seed=7))
    catalogue = _catalogue(www, server.url)
    common = ["--model", rig_folder, "--tile", "64", "--device", "cpu", "--json", "--read-workers", "0"]
    code, out, err = _run(["index", "--stac", catalogue, "--out", str(tmp_path / "stac_idx"), *common],
                          capsys)
    assert code == 0, err
    added = json.loads(out)["added"]
    assert sorted(added) == sorted(f"/vsicurl/{server.url}/{n}"
                                   for n in ("scene_cog.tif", "other_cog.tif", "third_cog.tif"))
    local = [str(www / n) for n in ("scene_cog.tif", "other_cog.tif", "third_cog.tif")]
    assert _run(["index", *local, "--out", str(tmp_path / "local_idx"), *common], capsys)[0] == 0
    hits = {}
    for name in ("stac_idx", "local_idx"):
        code, out, err = _run(["search", str(tmp_path / name), "--text", RED_PROMPT, "--top-k", "3",
                               "--model", rig_folder, "--device", "cpu", "--json"], capsys)
        assert code == 0, err
        hits[name] = json.loads(out)["hits"]
    assert hits["stac_idx"][0]["raster"].endswith("scene_cog.tif")
    assert [(h["pixel"], h["bounds"], round(h["score"], 4)) for h in hits["stac_idx"]] == \
           [(h["pixel"], h["bounds"], round(h["score"], 4)) for h in hits["local_idx"]]
    # filters: a date range keeps the summer's two items; a box elsewhere keeps none
    code, out, err = _run(["index", "--stac", catalogue, "--stac-datetime", "2024-06-01/2024-08-31",
                           "--out", str(tmp_path / "summer"), *common], capsys)
    assert code == 0, err
    assert sorted(a.rsplit("/", 1)[-1] for a in json.loads(out)["added"]) == ["other_cog.tif", "scene_cog.tif"]
    code, _, err = _run(["index", "--stac", catalogue, "--stac-bbox", "0,0,1,1",
                         "--out", str(tmp_path / "none"), *common], capsys)
    assert code == 2 and "gives no raster to index" in err and "--stac-bbox" in err


def test_stac_items_without_a_visual_asset_are_left_out_with_a_note_and_a_bad_catalogue_is_refused(
        tmp_path, served, rig_folder, capsys):
    server, www = served
    write_cog(www / "third_cog.tif", noise(3, 128, 128, seed=7))
    catalogue = _catalogue(www, server.url, with_thumbnail_only=True)
    code, out, err = _run(["index", "--stac", catalogue, "--out", str(tmp_path / "idx"), "--model",
                           rig_folder, "--tile", "64", "--device", "cpu", "--json",
                           "--read-workers", "0"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["added"]) == 2
    assert "1 STAC item(s) with no visual or single GeoTIFF data asset left out: third_cog" in err
    code, _, err = _run(["index", "--stac", str(tmp_path / "nowhere.json"), "--out",
                         str(tmp_path / "idx2"), "--model", rig_folder], capsys)
    assert code == 2 and "cannot read the STAC catalogue" in err and "static STAC" in err


def test_opening_a_remote_raster_leaves_local_sidecar_files_read(tmp_path, served):
    """The no-folder-listing setting of remote opens stays with them: a local raster opened
    afterwards in the same process still reads its .aux.xml (here its nodata)."""
    from mapclip.engine.raster.reader import open_raster
    from tests.raster_fixtures import make_raster
    server, _ = served
    with open_raster(f"/vsicurl/{server.url}/scene_cog.tif") as r:
        assert r.info.width == 256
    local = make_raster(tmp_path / "local.tif", data=noise(3, 64, 64, seed=1))
    (tmp_path / "local.tif.aux.xml").write_text(
        "<PAMDataset>" + "".join(f'<PAMRasterBand band="{b}"><NoDataValue>0</NoDataValue>'
                                 "</PAMRasterBand>" for b in (1, 2, 3)) + "</PAMDataset>")
    assert "GDAL_DISABLE_READDIR_ON_OPEN" not in os.environ or \
        os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] != "EMPTY_DIR"
    with open_raster(str(local)) as r:
        assert r.info.nodata == 0


def _stac_api(www, server_url, page_size=2, next_method="GET"):
    """The served COGs as the items of a STAC API (tests/rangeserver.py answers / and /search)."""
    import datetime as dt

    import pystac
    items = []
    for name, day, coll in (("scene_cog.tif", "2024-06-01", "summer"),
                            ("other_cog.tif", "2024-07-15", "summer"),
                            ("third_cog.tif", "2025-01-10", "winter")):
        box = {"type": "Polygon", "coordinates": [[[14.9, 36.0], [15.1, 36.0], [15.1, 36.2],
                                                   [14.9, 36.2], [14.9, 36.0]]]}
        item = pystac.Item(id=name.split(".")[0], geometry=box, bbox=[14.9, 36.0, 15.1, 36.2],
                           datetime=dt.datetime.fromisoformat(day + "T10:00:00+00:00"),
                           properties={}, collection=coll)
        item.add_asset("image", pystac.Asset(href=f"{server_url}/{name}", roles=["visual"],
                                             media_type=pystac.MediaType.COG))
        items.append(item.to_dict(include_self_link=False))
    (www / "stac-api.json").write_text(json.dumps({"items": items, "page_size": page_size,
                                                   "next": next_method}))


def _searches(server):
    from urllib.parse import parse_qsl, urlsplit
    return [dict(parse_qsl(urlsplit(p).query)) for m, p, _ in server.requests
            if m == "GET" and urlsplit(p).path == "/search"]


def test_a_stac_api_search_is_indexed_like_the_files_with_filters_sent_and_pages_followed(
        tmp_path, served, rig_folder, capsys):
    server, www = served
    write_cog(www / "third_cog.tif", noise(3, 128, 128, seed=7))
    _stac_api(www, server.url)
    names = ("scene_cog.tif", "other_cog.tif", "third_cog.tif")
    common = ["--model", rig_folder, "--tile", "64", "--device", "cpu", "--json", "--read-workers", "0"]
    code, out, err = _run(["index", "--stac", f"{server.url}/search", "--out",
                           str(tmp_path / "api_idx"), *common], capsys)
    assert code == 0, err
    assert sorted(json.loads(out)["added"]) == sorted(f"/vsicurl/{server.url}/{n}" for n in names)
    pages = _searches(server)
    assert [p.get("token") for p in pages] == [None, "2"]             # two pages of two, one
    assert pages[0]["limit"] == "100" and "bbox" not in pages[0]
    assert _run(["index", *[str(www / n) for n in names], "--out", str(tmp_path / "local_idx"),
                 *common], capsys)[0] == 0
    hits = {}
    for name in ("api_idx", "local_idx"):
        code, out, err = _run(["search", str(tmp_path / name), "--text", RED_PROMPT, "--top-k", "3",
                               "--model", rig_folder, "--device", "cpu", "--json"], capsys)
        assert code == 0, err
        hits[name] = json.loads(out)["hits"]
    assert hits["api_idx"][0]["raster"] == f"/vsicurl/{server.url}/scene_cog.tif"
    assert [(h["pixel"], h["bounds"], round(h["score"], 4)) for h in hits["api_idx"]] == \
           [(h["pixel"], h["bounds"], round(h["score"], 4)) for h in hits["local_idx"]]
    # the filters go to the server, which answers with what passes them; the landing page
    # leads to the same search
    seen = len(_searches(server))
    code, out, err = _run(["index", "--stac", f"{server.url}/", "--stac-bbox", "14.95,36.05,15,36.1",
                           "--stac-datetime", "2024-06-01/2024-06-30", "--stac-collection", "summer",
                           "--out", str(tmp_path / "june"), *common], capsys)
    assert code == 0, err
    assert json.loads(out)["added"] == [f"/vsicurl/{server.url}/scene_cog.tif"]
    sent = _searches(server)[seen:]
    assert len(sent) == 1 and sent[0]["bbox"] == "14.95,36.05,15.0,36.1"
    assert sent[0]["datetime"] == "2024-06-01T00:00:00Z/2024-06-30T23:59:59.999999Z"
    assert sent[0]["collections"] == "summer"
    code, _, err = _run(["index", "--stac", f"{server.url}/search", "--stac-collection", "autumn",
                         "--out", str(tmp_path / "none"), *common], capsys)
    assert code == 2 and "STAC API search" in err and "gives no raster to index (0 items" in err
    assert "--stac-collection" in err and not (tmp_path / "none").exists()


def test_a_stac_api_that_pages_by_post_is_followed_with_the_filters_merged(tmp_path, served):
    from mapclip.engine.raster.stac import stac_sources
    server, www = served
    _stac_api(www, server.url, page_size=1, next_method="POST")
    hrefs, notes = stac_sources(f"{server.url}/search", collections=["summer", "winter"],
                                bbox=[14, 35, 16, 37])
    assert hrefs == [f"{server.url}/{n}" for n in ("scene_cog.tif", "other_cog.tif", "third_cog.tif")]
    posts = [json.loads(body) for m, _, body in server.requests if m == "POST"]
    assert [p["token"] for p in posts] == [1, 2]
    assert all(p["collections"] == ["summer", "winter"] and p["bbox"] == [14, 35, 16, 37]
               for p in posts) and not notes


def test_a_stac_api_at_a_dead_port_or_answering_an_error_is_refused_naming_the_url(
        tmp_path, served, rig_folder, capsys):
    server, _ = served
    dead = f"http://127.0.0.1:{dead_port()}/search"
    code, _, err = _run(["index", "--stac", dead, "--out", str(tmp_path / "idx"), "--model",
                         rig_folder], capsys)
    assert code == 2 and "Traceback" not in err
    line = err.splitlines()[0]
    assert line.startswith(f"error: cannot reach the STAC API search {dead}?limit=100: ")
    assert "refused" in line.lower() and "--stac" in err and not (tmp_path / "idx").exists()
    # no stac-api.json: the server answers 404 to /search
    code, _, err = _run(["index", "--stac", f"{server.url}/search", "--out", str(tmp_path / "idx"),
                         "--model", rig_folder], capsys)
    assert code == 2 and f"the STAC API search {server.url}/search?limit=100 answered HTTP 404" in err


def test_stac_api_items_with_relative_hrefs_and_dates_with_zones_are_read_as_the_api_means(
        tmp_path, served):
    from mapclip.engine.raster.stac import _api_interval, _dates, stac_sources
    server, www = served
    _stac_api(www, server.url)
    api = json.loads((www / "stac-api.json").read_text())
    api["items"][0]["assets"]["image"]["href"] = "scene_cog.tif"          # relative to /search
    (www / "stac-api.json").write_text(json.dumps(api))
    hrefs, _ = stac_sources(f"{server.url}/search", datetime="2024-06-01T12:00:00+02:00/..")
    assert hrefs == [f"{server.url}/scene_cog.tif", f"{server.url}/other_cog.tif",
                     f"{server.url}/third_cog.tif"]
    assert _api_interval(_dates("2024-06-01T12:00:00+02:00/..")) == "2024-06-01T10:00:00Z/.."
    assert _searches(server)[0]["datetime"] == "2024-06-01T10:00:00Z/.."
