"""The checks of a fed.yaml that need secure aggregation's rules (protocol/SPEC.md §6.2).

``config`` is plain data and never imports ``secagg``; the ring-overflow rule is secagg's
(``secagg.rules.ring_plan``).  Whoever turns a fed.yaml into a run calls :func:`check_federation`
right after loading it (``asagiri-coordinator``, the launcher, ``asagiri attack``), and the driver
calls it again on whatever configuration it is given.  A failure reads as ``load_federation``'s own
errors do: ``fed.yaml: secagg: ...``.
"""

from __future__ import annotations

from ..config import ConfigError, FederationConfig
from ..secagg.plan import QuantisationError
from ..secagg.rules import ring_plan

__all__ = ["check_federation"]


def check_federation(cfg: FederationConfig, source: str = "fed.yaml") -> None:
    """Refuse a configuration whose secure-aggregation sum over every enrolled site could wrap."""
    if cfg.secagg.enabled and cfg.sites:
        try:
            ring_plan(cfg.secagg, len(cfg.sites))
        except QuantisationError as exc:
            raise ConfigError(f"{source}: {exc}") from None
