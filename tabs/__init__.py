"""One module per method tab; the order of METHOD_TABS is the tab order.

Each tab module has `KEY` (see `core.methods`), `REQUIRED_MODELS` (registry names) and `create_tab(runtime)`. A tab
is shown when every model it needs resolves (bundled, cached, or pinned on the Hub), so a tab appears as soon as its
weights are trained and registered.
"""

from __future__ import annotations

from types import ModuleType

from core.weights import Registry
from tabs import beauty, latents2semantics, taxfree

METHOD_TABS: tuple[ModuleType, ...] = (taxfree, latents2semantics, beauty)


def available_tabs(registry: Registry) -> list[ModuleType]:
    """The method tabs whose models can be had with this registry."""
    names = set(registry.names)
    return [
        tab for tab in METHOD_TABS
        if all(name in names and registry.locate(name)[0] != "missing" for name in tab.REQUIRED_MODELS)
    ]
