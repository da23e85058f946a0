"""One module per method tab, each with `create_tab(runtime)`; the order here is the tab order."""

from __future__ import annotations

from types import ModuleType

# Method tabs land here as their bundled weights are trained: key (see core.methods) -> module.
METHOD_TABS: dict[str, ModuleType] = {}
