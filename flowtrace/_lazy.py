"""Package attributes imported when first read (PEP 562), so importing a package stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping
from typing import Any


def lazy_attributes(package: str, sources: Mapping[str, str],
                    submodules: Collection[str] = ()) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` is read from the module
    ``sources[name]``, imported then; a name in ``submodules`` is that submodule (so that
    ``import flowtrace`` then ``flowtrace.websocket.router`` works); any other name is an
    ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(source), name)

    return __getattr__
