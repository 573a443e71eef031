"""Rasters listed by a STAC catalogue: the COG assets of its items, as sources to index.

A static catalogue (a catalog.json, collection.json or item JSON, or an item
collection), read with pystac from a local file or an http(s) URL; its items
are walked recursively. Or a STAC API: its item-search URL (``.../search``) or
its landing page (a catalogue that conforms to item search and links
``rel="search"``); the filters go to the server with the search (GET
``/search?bbox=&datetime=&collections=&limit=``) and its ``next`` links are
followed, page by page (:func:`search_items`). Optional filters: a WGS84 bounding box (items whose
bbox intersects it), a date or date range ("2024-06-01", "2024-06-01/2024-08-31";
an item's datetime, or its start/end), collection ids. Each item gives one
asset: the one named by the user, else the one whose roles include "visual",
else the one keyed "visual", else the only GeoTIFF asset whose roles include
"data"; an item without one is left out with a note. Remote hrefs are indexed
as URLs (engine.raster.remote: GDAL's range reads), local ones as files.

The item search is written here over the standard library's HTTP client
rather than with pystac-client: every pystac-client release since 0.7.0 needs
requests >= 2.28.2 while QGIS on Debian 12 runs python3-requests 2.28.1, and
the plugin's installer (``pip install --target``) would put a newer requests,
with its urllib3, into the plugin's package folder ahead of QGIS's own
(pystac-client 0.6.1, the last release that accepts 2.28.1, drags requests in
the same way). The protocol is small: a GeoJSON FeatureCollection per page and
a ``next`` link (GET, or POST with a body to merge).
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..core.errors import UsageError, reason

#: the asset role and key that name the RGB rendering of an item
VISUAL = "visual"
#: media types that are GeoTIFFs (COGs among them)
GEOTIFF_TYPES = ("image/tiff; application=geotiff", "image/tiff")
#: items asked for per page of a STAC API search (a server may give fewer)
PAGE_LIMIT = 100
#: a search stops after this many items, with a note (narrow the filters)
MAX_ITEMS = 10_000
#: seconds to wait for one page
TIMEOUT = 60
#: the conformance class of STAC API item search (any version)
ITEM_SEARCH = "/item-search"
_API_FIX = ("check the URL (a STAC API's /search or landing page) and that the server answers; "
            "or give a static catalog.json")


def _utc(when: _dt.datetime) -> _dt.datetime:
    """A datetime in UTC without its zone (one that names none is taken as UTC)."""
    if when.tzinfo is not None:
        when = when.astimezone(_dt.timezone.utc)
    return when.replace(tzinfo=None)


def _dates(text: Optional[str]) -> Optional[Tuple[_dt.datetime, _dt.datetime]]:
    """A date or range typed by the user as a (start, end) span in UTC (open ends: min, max)."""
    if not text:
        return None
    parts = [p.strip() for p in str(text).split("/")]
    try:
        lo = _utc(_dt.datetime.fromisoformat(parts[0].replace("Z", "+00:00"))) \
            if parts[0] not in ("", "..") else _dt.datetime.min
        hi_text = parts[-1] if len(parts) > 1 else parts[0]
        hi = _utc(_dt.datetime.fromisoformat(hi_text.replace("Z", "+00:00"))) \
            if hi_text not in ("", "..") else _dt.datetime.max
    except ValueError:
        raise UsageError(f"STAC date {text!r} is not a date or a range", "e.g. 2024-06-01 or "
                         "2024-06-01/2024-08-31", option="stac_datetime") from None
    if len(parts) == 1 or len(hi_text) == 10:     # a day: all of it
        hi = hi + _dt.timedelta(days=1) - _dt.timedelta(microseconds=1) if hi != _dt.datetime.max else hi
    return lo, hi


def parse_bbox(text: Optional[str]) -> Optional[Tuple[float, float, float, float]]:
    """A WGS84 box typed as "W,S,E,N" (None when empty), checked."""
    if text is None or not str(text).strip():
        return None
    try:
        vals = tuple(float(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or not (vals[0] <= vals[2] and vals[1] <= vals[3]):
        raise UsageError(f"stac_bbox {text!r} is not a WGS84 box west,south,east,north",
                         "e.g. 14.9,36.0,15.1,36.2", option="stac_bbox")
    return vals  # type: ignore[return-value]


def _in_dates(item, span) -> bool:
    if span is None:
        return True
    props = item.properties
    start = item.datetime or _parse(props.get("start_datetime"))
    end = item.datetime or _parse(props.get("end_datetime")) or start
    if start is None:
        return False
    return _utc(start) <= span[1] and _utc(end) >= span[0]


def _parse(text) -> Optional[_dt.datetime]:
    try:
        return _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def _in_bbox(item, bbox) -> bool:
    if bbox is None:
        return True
    if not item.bbox:
        return False
    w, s, e, n = item.bbox[0], item.bbox[1], item.bbox[-3 if len(item.bbox) == 6 else 2], \
        item.bbox[-2 if len(item.bbox) == 6 else 3]
    return w <= bbox[2] and e >= bbox[0] and s <= bbox[3] and n >= bbox[1]


def pick_asset(item, name: Optional[str] = None):
    """The asset of ``item`` to index (see the module doc), or None."""
    assets = item.assets
    if name:
        return assets.get(name)
    for a in assets.values():
        if VISUAL in (a.roles or []):
            return a
    if VISUAL in assets:
        return assets[VISUAL]
    data = [a for a in assets.values()
            if "data" in (a.roles or []) and (a.media_type or "").startswith(GEOTIFF_TYPES)]
    return data[0] if len(data) == 1 else None


def _http_url(text: str) -> bool:
    return str(text).lower().startswith(("http://", "https://"))


def is_search_url(source: str) -> bool:
    """Whether ``source`` is a STAC API item-search URL (an http(s) URL ending in /search)."""
    from urllib.parse import urlsplit
    return _http_url(source) and urlsplit(source).path.rstrip("/").endswith("/search")


def _api_interval(span) -> Optional[str]:
    """A date span as the RFC 3339 interval a STAC API takes (open ends as "..")."""
    if span is None:
        return None
    lo, hi = span
    a = ".." if lo == _dt.datetime.min else lo.isoformat() + "Z"
    b = ".." if hi == _dt.datetime.max else hi.isoformat() + "Z"
    return f"{a}/{b}"


def _fetch(url: str, method: str = "GET", body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One JSON answer of a STAC API (a clear UsageError naming the URL otherwise)."""
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Accept": "application/geo+json, application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            text = resp.read()
    except urllib.error.HTTPError as exc:
        detail = reason(exc.read(300).decode("utf-8", "replace") or exc.reason, 160)
        raise UsageError(f"the STAC API search {url} answered HTTP {exc.code}: {detail}", _API_FIX,
                         option="stac") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise UsageError(f"cannot reach the STAC API search {url}: {reason(why)}", _API_FIX,
                         option="stac") from None
    try:
        page = json.loads(text)
    except ValueError:
        page = None
    if not isinstance(page, dict):
        raise UsageError(f"the STAC API search {url} did not answer with JSON", _API_FIX,
                         option="stac")
    return page


def _body_value(name: str, text: str):
    """A GET search parameter as the POST body of the same search has it."""
    try:
        if name == "bbox":
            return [float(v) for v in text.split(",")]
        if name == "limit":
            return int(text)
    except ValueError:
        return text
    return text.split(",") if name in ("collections", "ids") else text


def search_items(url: str, bbox: Optional[Sequence[float]] = None, span=None,
                 collections: Optional[Sequence[str]] = None,
                 limit: int = PAGE_LIMIT) -> Tuple[List[Any], List[str]]:
    """(items, notes) of a STAC API item search at ``url`` with the filters, every page.

    The filters are sent as the API's query parameters (they replace the same
    parameters in ``url``'s query; others there are kept); ``next`` links are
    followed (GET, or POST with their body, merged into the last one when they
    say ``merge``) until a page has none, repeats one, or MAX_ITEMS are in."""
    import pystac
    from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if bbox is not None:
        query["bbox"] = ",".join(repr(float(v)) for v in bbox)
    interval = _api_interval(span)
    if interval:
        query["datetime"] = interval
    if collections:
        query["collections"] = ",".join(collections)
    query.setdefault("limit", str(limit))
    as_body = {k: _body_value(k, v) for k, v in query.items()}   # for next links to merge into
    request: Optional[Tuple[str, str, Optional[dict]]] = \
        ("GET", urlunsplit(parts._replace(query=urlencode(query, safe=",/:"))), None)
    features: List[Tuple[dict, str]] = []
    notes: List[str] = []
    seen = set()
    while request is not None:
        method, href, body = request
        mark = (method, href, json.dumps(body, sort_keys=True))
        if mark in seen:
            break                       # a server that links a page to itself
        seen.add(mark)
        page = _fetch(href, method, body)
        got = page.get("features")
        if page.get("type") != "FeatureCollection" or not isinstance(got, list):
            raise UsageError(f"{href} is not a STAC API item search: it answered no "
                             "FeatureCollection", _API_FIX, option="stac")
        features.extend((f, href) for f in got if isinstance(f, dict))
        if len(features) >= MAX_ITEMS:
            notes.append(f"the STAC API search stopped after {MAX_ITEMS} items; narrow "
                         "--stac-bbox / --stac-datetime / --stac-collection for the rest")
            break
        nxt = next((link for link in page.get("links") or []
                    if isinstance(link, dict) and link.get("rel") == "next" and link.get("href")),
                   None)
        request = None
        if nxt is not None:
            verb = str(nxt.get("method") or "GET").upper()
            sent = nxt.get("body") if verb == "POST" else None
            if verb == "POST" and nxt.get("merge"):
                sent = {**(body if isinstance(body, dict) else as_body), **(sent or {})}
            request = (verb, urljoin(href, nxt["href"]), sent)
    items = []
    for feature, where in features[:MAX_ITEMS]:
        try:
            item = pystac.Item.from_dict(feature, preserve_dict=False)
        except Exception as exc:  # noqa: BLE001 - a malformed feature: named, with its reason
            raise UsageError(f"the STAC API search {where} gave an item pystac cannot read "
                             f"({feature.get('id', '?')}): {reason(exc)}", _API_FIX,
                             option="stac") from None
        for asset in item.assets.values():      # relative hrefs: against the page's URL
            if not urlsplit(asset.href).scheme and not asset.href.startswith("/vsi"):
                asset.href = urljoin(where, asset.href)
        items.append(item)
    return items, notes


def _api_search_link(obj) -> Optional[str]:
    """The item-search URL of a STAC API landing page read as a catalogue, else None."""
    conforms = (getattr(obj, "extra_fields", None) or {}).get("conformsTo") or []
    if not any(ITEM_SEARCH in str(c) for c in conforms):
        return None
    link = obj.get_single_link("search")
    return link.get_absolute_href() if link is not None else None


def _read_catalogue(source: str):
    import pystac
    try:
        return pystac.read_file(source)
    except Exception as exc:  # noqa: BLE001 - a missing file, a bad URL, not STAC: one line
        raise UsageError(f"cannot read the STAC catalogue {source}: {reason(exc)}",
                         "give a static STAC catalog.json, collection.json or item (a file or an "
                         "http(s) URL), or a STAC API's /search URL", option="stac") from None


def stac_sources(source: str, asset: Optional[str] = None, bbox: Optional[Sequence[float]] = None,
                 datetime: Optional[str] = None,
                 collections: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """(raster hrefs to index, notes) from the STAC catalogue or API ``source`` (module doc)."""
    import pystac
    span = _dates(datetime)
    notes: List[str] = []
    search = source if is_search_url(source) else None
    obj = None if search else _read_catalogue(source)
    if obj is not None and isinstance(obj, pystac.Catalog):
        search = _api_search_link(obj)
    if search:
        items, notes = search_items(search, bbox, span, collections)
        what = f"the STAC API search {search} ({len(items)} items found"
    else:
        if isinstance(obj, pystac.Item):
            items = [obj]
        elif isinstance(obj, pystac.ItemCollection):
            items = list(obj.items)
        else:
            items = list(obj.get_items(recursive=True))
        total = len(items)
        wanted = set(collections or ())
        items = [i for i in items if (not wanted or i.collection_id in wanted)
                 and _in_bbox(i, bbox) and _in_dates(i, span)]
        what = f"the STAC catalogue {source} ({total} items, {len(items)} passing the filters"
    return _hrefs(items, asset, what, notes)


def _hrefs(items, asset: Optional[str], what: str, notes: List[str]) -> Tuple[List[str], List[str]]:
    """The asset hrefs of the items that passed the filters, and the notes."""
    hrefs: List[str] = []
    no_asset: List[str] = []
    for item in items:
        a = pick_asset(item, asset)
        if a is None:
            no_asset.append(item.id)
            continue
        hrefs.append(a.get_absolute_href() or a.href)
    if no_asset:
        kind = f"no asset {asset!r}" if asset else "no visual or single GeoTIFF data asset"
        notes.append(f"{len(no_asset)} STAC item(s) with {kind} left out: {', '.join(no_asset[:5])}"
                     + (" ..." if len(no_asset) > 5 else ""))
    if not hrefs:
        raise UsageError(what.replace(" (", " gives no raster to index (", 1)
                         + (f"; {notes[-1]}" if no_asset else "") + ")",
                         "name the asset with --stac-asset, or widen --stac-bbox / --stac-datetime / "
                         "--stac-collection", option="stac")
    return list(dict.fromkeys(hrefs)), notes
