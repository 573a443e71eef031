"""Rasters listed by a STAC catalogue: the COG assets of its items, as sources to index.

A static catalogue (a catalog.json, collection.json or item JSON, or an item
collection), read with pystac from a local file or an http(s) URL; its items
are walked recursively. Optional filters: a WGS84 bounding box (items whose
bbox intersects it), a date or date range ("2024-06-01", "2024-06-01/2024-08-31";
an item's datetime, or its start/end), collection ids. Each item gives one
asset: the one named by the user, else the one whose roles include "visual",
else the one keyed "visual", else the only GeoTIFF asset whose roles include
"data"; an item without one is left out with a note. Remote hrefs are indexed
as URLs (engine.raster.remote: GDAL's range reads), local ones as files.
A STAC API search (pystac-client) is not supported: give a static catalogue.
"""
from __future__ import annotations

import datetime as _dt
from typing import List, Optional, Sequence, Tuple

from ..core.errors import UsageError, reason

#: the asset role and key that name the RGB rendering of an item
VISUAL = "visual"
#: media types that are GeoTIFFs (COGs among them)
GEOTIFF_TYPES = ("image/tiff; application=geotiff", "image/tiff")


def _dates(text: Optional[str]) -> Optional[Tuple[_dt.datetime, _dt.datetime]]:
    if not text:
        return None
    parts = [p.strip() for p in str(text).split("/")]
    try:
        lo = _dt.datetime.fromisoformat(parts[0]) if parts[0] not in ("", "..") else _dt.datetime.min
        hi_text = parts[-1] if len(parts) > 1 else parts[0]
        hi = _dt.datetime.fromisoformat(hi_text) if hi_text not in ("", "..") else _dt.datetime.max
    except ValueError:
        raise UsageError(f"STAC date {text!r} is not a date or a range", "e.g. 2024-06-01 or "
                         "2024-06-01/2024-08-31", option="stac_datetime") from None
    if len(parts) == 1 or len(hi_text) == 10:     # a day: all of it
        hi = hi + _dt.timedelta(days=1) - _dt.timedelta(microseconds=1) if hi != _dt.datetime.max else hi
    return lo.replace(tzinfo=None), hi.replace(tzinfo=None)


def _in_dates(item, span) -> bool:
    if span is None:
        return True
    props = item.properties
    start = item.datetime or _parse(props.get("start_datetime"))
    end = item.datetime or _parse(props.get("end_datetime")) or start
    if start is None:
        return False
    return start.replace(tzinfo=None) <= span[1] and end.replace(tzinfo=None) >= span[0]


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


def stac_sources(source: str, asset: Optional[str] = None, bbox: Optional[Sequence[float]] = None,
                 datetime: Optional[str] = None,
                 collections: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """(raster hrefs to index, notes) from the STAC catalogue ``source`` (module doc)."""
    import pystac
    try:
        obj = pystac.read_file(source)
    except Exception as exc:  # noqa: BLE001 - a missing file, a bad URL, not STAC: one line
        raise UsageError(f"cannot read the STAC catalogue {source}: {reason(exc)}",
                         "give a static STAC catalog.json, collection.json or item (a file or an "
                         "http(s) URL)", option="stac") from None
    if isinstance(obj, pystac.Item):
        items = [obj]
    elif isinstance(obj, pystac.ItemCollection):
        items = list(obj.items)
    else:
        items = list(obj.get_items(recursive=True))
    span = _dates(datetime)
    wanted = set(collections or ())
    hrefs: List[str] = []
    notes: List[str] = []
    no_asset: List[str] = []
    kept = 0
    for item in items:
        if wanted and item.collection_id not in wanted:
            continue
        if not (_in_bbox(item, bbox) and _in_dates(item, span)):
            continue
        kept += 1
        a = pick_asset(item, asset)
        if a is None:
            no_asset.append(item.id)
            continue
        hrefs.append(a.get_absolute_href() or a.href)
    if no_asset:
        what = f"no asset {asset!r}" if asset else "no visual or single GeoTIFF data asset"
        notes.append(f"{len(no_asset)} STAC item(s) with {what} left out: {', '.join(no_asset[:5])}"
                     + (" ..." if len(no_asset) > 5 else ""))
    if not hrefs:
        raise UsageError(f"the STAC catalogue {source} gives no raster to index ({len(items)} items, "
                         f"{kept} passing the filters" + (f"; {notes[0]}" if notes else "") + ")",
                         "name the asset with --stac-asset, or widen --stac-bbox / --stac-datetime / "
                         "--stac-collection", option="stac")
    return list(dict.fromkeys(hrefs)), notes
