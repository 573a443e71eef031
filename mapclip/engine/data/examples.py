"""Labelled examples: places an analyst marked "what I mean" (1) or "not this" (0).

A file of examples is any vector file OGR reads (GeoPackage, GeoJSON,
Shapefile, ...), in any CRS, with a ``label`` field: 1 / true / yes / y / t
for a positive, 0 / false / no / n / f for a negative. Points are used as
they are; for lines and polygons their centroid is the place. What a search
does with them: engine.detect and engine.archive.search (``examples=``), through
engine.model.scoring.example_scorer / refine_query.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..core.errors import UsageError

#: the field that holds the label, and the values read as positive / negative
LABEL_FIELD = "label"
POSITIVE = ("1", "true", "yes", "y", "t")
NEGATIVE = ("0", "false", "no", "n", "f")
#: optional fields read beside the label (Example.prompt, Example.caption)
TEXT_FIELDS = ("prompt", "caption")
#: vector files read as marks where a caption file could be given (fine-tuning data;
#: .json stays a caption file)
MARK_SUFFIXES = (".gpkg", ".geojson", ".shp", ".fgb", ".gml", ".kml", ".sqlite")


def is_marks_file(path) -> bool:
    return Path(str(path)).suffix.lower() in MARK_SUFFIXES


@dataclass(frozen=True)
class Example:
    """One marked place: map coordinates and whether it is what is meant. ``crs``: the
    place's own CRS where it differs from the one its search is given (archive search:
    ``--like``/``--unlike`` points beside an examples file; ``""``: the rasters' own CRS)."""

    x: float
    y: float
    positive: bool
    crs: Optional[str] = None
    #: what the mark says in words, when its file has the fields: ``prompt`` (the search it
    #: was made in: the dock writes it) and ``caption`` (what the place is, typed by the user)
    prompt: Optional[str] = None
    caption: Optional[str] = None


def parse_label(value) -> Optional[bool]:
    """True / False for a label value (see the module doc); None when it is neither."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if value is not None else ""
    if text.endswith(".0"):
        text = text[:-2]
    if text in POSITIVE:
        return True
    if text in NEGATIVE:
        return False
    return None


def label_field(names: Sequence[str], source: str) -> str:
    """The name of the ``label`` field among ``names`` (any case); refused, naming ``source``
    (a file or a layer) and its fields, when there is none."""
    field = next((n for n in names if n.lower() == LABEL_FIELD), None)
    if field is None:
        raise UsageError(f"{source} has no '{LABEL_FIELD}' field (fields: {', '.join(names) or 'none'})",
                         f"add a '{LABEL_FIELD}' field: 1 for what you mean, 0 for what you do not",
                         option="examples")
    return field


def label_of(value, source: str, feature) -> bool:
    """A feature's label (:func:`parse_label`); refused, naming ``source`` and the feature,
    when it is neither 1/true nor 0/false."""
    label = parse_label(value)
    if label is None:
        raise UsageError(f"{source}, feature {feature}: label {value!r} is neither 1/true nor 0/false",
                         "label each example 1 (what you mean) or 0 (not this)", option="examples")
    return label


def read_examples(path: Union[str, Path]) -> Tuple[List[Example], Optional[str]]:
    """The examples in a vector file and its CRS (WKT, or None when it has none)."""
    from osgeo import ogr
    p = Path(path)
    if not p.exists():
        raise UsageError(f"examples file {p} does not exist", "check the path", option="examples")
    ds = ogr.Open(str(p))
    if ds is None or ds.GetLayerCount() == 0:
        raise UsageError(f"examples file {p} is not a vector file OGR can read",
                         "give a GeoPackage, GeoJSON or Shapefile of points or polygons",
                         option="examples")
    layer = ds.GetLayer(0)
    defn = layer.GetLayerDefn()
    names = [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
    field = label_field(names, f"examples file {p}")
    srs = layer.GetSpatialRef()
    text = {k: next((n for n in names if n.lower() == k), None) for k in TEXT_FIELDS}
    out: List[Example] = []
    for feat in layer:
        geom = feat.GetGeometryRef()
        if geom is None or geom.IsEmpty():
            continue
        label = label_of(feat.GetField(field), f"examples file {p}", feat.GetFID())
        c = geom.Centroid()
        words = {k: (str(feat.GetField(f)).strip() or None) if f and feat.GetField(f) is not None
                 else None for k, f in text.items()}
        out.append(Example(float(c.GetX()), float(c.GetY()), label, **words))
    if not out:
        raise UsageError(f"examples file {p} holds no example with a geometry",
                         "mark at least one place", option="examples")
    return out, (srs.ExportToWkt() if srs is not None else None)


def split(examples: Sequence[Example]) -> Tuple[List[Example], List[Example]]:
    """(positives, negatives)."""
    return [e for e in examples if e.positive], [e for e in examples if not e.positive]
