"""Pixel and map geometry: tile grids and windows (tiling), boxes, NMS and
heatmap components (boxes), extents and ground sample distance (extent)."""
