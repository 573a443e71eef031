"""MapCLIP's Processing provider and algorithms (see docs/processing.md).

The plugin's ``initProcessing()`` calls :func:`add_provider` and its
``unload()`` calls :func:`remove_provider`.
"""
from __future__ import annotations

from typing import Optional

from .provider import MapClipProvider

__all__ = ["MapClipProvider", "add_provider", "remove_provider"]


def add_provider() -> MapClipProvider:
    """Create the provider and register it with QGIS's Processing registry."""
    from qgis.core import QgsApplication
    provider = MapClipProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    return provider


def remove_provider(provider: Optional[MapClipProvider]) -> None:
    """Unregister ``provider`` (from the plugin's unload); None, or a provider that is not
    the registered one (its id was taken), is ignored."""
    if provider is None:
        return
    from qgis.core import QgsApplication
    registry = QgsApplication.processingRegistry()
    if registry.providerById(provider.id()) is provider:
        registry.removeProvider(provider)
