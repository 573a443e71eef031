"""MapCLIP engine: free-text CLIP search over rasters, pure Python (no QGIS).

Importing the package is cheap: torch, open_clip and rasterio load on first use
of the modules that need them, so the QGIS plugin can start (and report missing
dependencies) without them.
"""
__version__ = "0.1.0"
