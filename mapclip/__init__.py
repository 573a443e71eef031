"""QGIS entry point: the plugin folder is the repository root."""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin.main import MapClipPlugin
    return MapClipPlugin(iface)
