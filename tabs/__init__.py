"""One module per method tab; the order of METHOD_TABS is the tab order.

Each tab module has `KEY` (see `core.methods`), `REQUIRED_MODELS` (registry names; a tuple of names stands for
alternatives, preferred first), `create_tab(runtime)` and optionally `available(registry) -> bool` for further
conditions. A tab is shown when every model it needs resolves (bundled, cached, or pinned on the Hub) and its
`available` agrees, so it appears as soon as its weights are trained and registered.
"""

from __future__ import annotations

from types import ModuleType

from core.weights import Registry
from tabs import agilegan3d, beauty, latents2semantics, stylize3d, taxfree

METHOD_TABS: tuple[ModuleType, ...] = (taxfree, latents2semantics, stylize3d, beauty, agilegan3d)


def available_tabs(registry: Registry) -> list[ModuleType]:
    """The method tabs whose models can be had with this registry."""
    def resolves(required: str | tuple[str, ...]) -> bool:
        return any(registry.is_available(name) for name in ((required,) if isinstance(required, str) else required))

    return [
        tab for tab in METHOD_TABS
        if all(resolves(required) for required in tab.REQUIRED_MODELS)
        and getattr(tab, "available", lambda _: True)(registry)
    ]
