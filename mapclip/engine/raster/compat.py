"""Compatibility with the system packages QGIS brings (imported before rasterio).
"""
from __future__ import annotations

import functools


def repair_affine() -> None:
    """Make ``affine`` usable when an old ``attrs`` shadows the one it needs.

    affine 3.x declares ``functools.cached_property`` members on an attrs
    slotted class; with attrs < 23.2 (Debian's system package, which the
    venv sees) those raise TypeError, breaking ``transform * (x, y)``,
    ``~transform`` and rasterio's ``dataset.res``. Plain properties give the
    same values.
    """
    from affine import Affine
    try:
        Affine.identity().determinant
        return
    except TypeError:
        pass
    for name, val in list(vars(Affine).items()):
        if isinstance(val, functools.cached_property):
            setattr(Affine, name, property(val.func, doc=val.__doc__))


repair_affine()
