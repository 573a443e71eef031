"""``python -m engine``: MapCLIP's command line, run from a checkout.

The engine itself is the package :mod:`mapclip.engine` (inside the QGIS plugin
folder ``mapclip/``); this folder only lets the command keep its short name.
Import the engine as ``mapclip.engine``, never through this package.
"""
