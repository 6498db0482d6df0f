"""Data sets, partitions and per-site splits (see ``loaders.py`` and ``partition.py``).

The names below load on first use: a process that only decodes images (``cache.py``'s workers)
does not pay for torch."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loaders import SiteData, load_configured_site, load_site_data

__all__ = ["SiteData", "load_configured_site", "load_site_data"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
