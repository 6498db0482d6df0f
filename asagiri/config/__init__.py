"""One pydantic model tree for ``fed.yaml`` (the federation) and ``site.yaml`` (one site).

This is the only place defaults live.  Loading never raises a traceback at a user: every problem
becomes one :class:`ConfigError` naming the file, the key and the reason, which the CLI turns
into exit code 2.

Plain data: it imports nothing else of Asagiri.  Checks that need a protocol rule are made where
the rule lives (secure aggregation's ring plan: ``coordinator/checks.py`` with ``secagg/rules.py``).
One tree, split by concept: ``federation.py`` (fed.yaml), ``site.py`` (site.yaml and the site's
policy), ``spec.py`` (the run's spec a site receives), ``loading.py``; everything is importable
from ``asagiri.config`` as before.
"""

from .base import ConfigError
from .federation import (
    DEFAULT_LOCAL_STEPS,
    DataConfig,
    DPConfig,
    FederationConfig,
    ListenConfig,
    ModelConfig,
    ModelName,
    PartitionConfig,
    PrgName,
    SecAggConfig,
    SelectionConfig,
    SiteEntry,
    StrategyConfig,
    StrategyName,
    TimeoutsConfig,
    TrainConfig,
)
from .loading import (
    apply_overrides,
    config_digest,
    default_federation,
    load_federation,
    load_project,
    load_site,
    validated,
)
from .project import ProjectConfig, ProjectCoordinator, ProjectSite
from .site import (
    AccelConfig,
    CoordinatorAddress,
    PolicyConfig,
    ReconnectConfig,
    SimulationConfig,
    SiteConfig,
    TrainingBounds,
)
from .spec import RunSpec, SpecStrategy

__all__ = [
    "DEFAULT_LOCAL_STEPS",
    "AccelConfig",
    "ConfigError",
    "CoordinatorAddress",
    "DataConfig",
    "DPConfig",
    "FederationConfig",
    "ListenConfig",
    "ModelConfig",
    "ModelName",
    "PartitionConfig",
    "PolicyConfig",
    "ProjectConfig",
    "ProjectCoordinator",
    "ProjectSite",
    "PrgName",
    "ReconnectConfig",
    "RunSpec",
    "SecAggConfig",
    "SelectionConfig",
    "SimulationConfig",
    "SiteConfig",
    "SiteEntry",
    "SpecStrategy",
    "StrategyConfig",
    "StrategyName",
    "TimeoutsConfig",
    "TrainConfig",
    "TrainingBounds",
    "apply_overrides",
    "config_digest",
    "default_federation",
    "load_federation",
    "load_project",
    "load_site",
    "validated",
]
