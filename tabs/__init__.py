"""One module per method tab; the order of METHOD_TABS is the tab order.

Each tab module has `KEY` (see `core.methods`), `REQUIRED_MODELS` (registry names), `create_tab(runtime)` and
optionally `available(registry) -> bool` for further conditions. A tab is shown when every model it needs resolves
(bundled, cached, or pinned on the Hub) and its `available` agrees, so it appears as soon as its weights are trained
and registered.
"""

from __future__ import annotations

from types import ModuleType

from core.weights import Registry
from tabs import agilegan3d, beauty, latents2semantics, stylize3d, taxfree

METHOD_TABS: tuple[ModuleType, ...] = (taxfree, latents2semantics, stylize3d, beauty, agilegan3d)


def available_tabs(registry: Registry) -> list[ModuleType]:
    """The method tabs whose models can be had with this registry."""
    names = set(registry.names)
    return [
        tab for tab in METHOD_TABS
        if all(name in names and registry.locate(name)[0] != "missing" for name in tab.REQUIRED_MODELS)
        and getattr(tab, "available", lambda _: True)(registry)
    ]
