"""Procedural, seeded, georeferenced aerial-like scenes with exact ground truth.

No real imagery can be shipped or downloaded, so the demo model, the demo and
the end-to-end quality tests run on scenes this module draws: land cover
(water, forest, fields, bare ground, grass, urban blocks, roads, a runway and
its apron) and seven object classes, each with its own shape, colours and
context:

==============  =========================================================
storage-tank    light round discs with a rim and a shadow, clustered on
                bare-ground pads (tank farms), a few alone
ship            elongated hulls with a pointed bow, on water, some moored
                side by side (harbours)
airplane        cross shapes (fuselage, swept wings, tail) in rows on the
                apron beside the runway
building        rectangles with flat or gabled roofs and shadows, in urban
                blocks between streets
vehicle         small coloured rectangles along roads
sports-field    green rectangles with white border, centre line and circle
swimming-pool   small cyan rectangles in urban yards
==============  =========================================================

A scene is written as a tiled GeoTIFF (512 px blocks, RGB uint8) in a
projected CRS (default UTM 33N, 0.5 m/px), strip by strip: only one 512-row
strip and the plan (a coarse grid, one value per ``CELL`` pixels, plus lists of
rectangles and objects) live in memory, so a 10000 x 10000 scene takes
seconds. Ground truth is exact: a class-mask GeoTIFF (values in
:data:`MASK_CLASSES`; objects over land cover, shadows excluded), COCO JSON
boxes in pixel coordinates (each the tight box of that object's pixels in the
mask; objects never overlap) with map coordinates beside them, so
Box-to-Caption and Mask-to-Box run on it as on DOTA or LoveDA.

Everything is a function of the seed (and the size): the same call writes the
same bytes.

Modules: :mod:`.truth` (classes, mask values, boxes, georeferencing), :mod:`.shapes`
(one object's pixels), :mod:`.plan` (fields, rectangles, placed objects),
:mod:`.render` (strips of pixels), :mod:`.coco` (COCO JSON, mask colours),
:mod:`.scene` (writing a scene), :mod:`.chips` (chips cut from a scene); each name
is imported from its module. The measures of detections (AP, precision, recall) are
in :mod:`engine.data.metrics`.
"""
