"""MapCLIP's QGIS side: menus, the search dock, tasks, layers, dialogs, Processing.

Everything here imports QGIS (through ``qgis.PyQt`` only, so the plugin is
ready for Qt6) and reaches the engine relatively (``from ..engine import``),
because QGIS loads the repository root as the package ``mapclip``. Modules
import torch, open_clip and rasterio only inside functions that run jobs, so
the plugin loads, and reports what is missing, without them.
"""
