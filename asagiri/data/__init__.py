"""Data sets, partitions and per-site splits (see ``loaders.py`` and ``partition.py``)."""

from .loaders import SiteData, load_configured_site, load_site_data

__all__ = ["SiteData", "load_configured_site", "load_site_data"]
