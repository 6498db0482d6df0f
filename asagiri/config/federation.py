"""``fed.yaml``: the federation, as the coordinator runs it (``FederationConfig`` and its sections)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StrictInt, field_validator, model_validator

from .base import _Strict

__all__ = [
    "DEFAULT_LOCAL_STEPS",
    "DataConfig",
    "DPConfig",
    "FederationConfig",
    "ListenConfig",
    "ModelConfig",
    "ModelName",
    "NormName",
    "OptimizerName",
    "PartitionConfig",
    "PrgName",
    "SecAggConfig",
    "SelectionConfig",
    "SiteEntry",
    "StrategyConfig",
    "StrategyName",
    "TimeoutsConfig",
    "TrainConfig",
]


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(7740, ge=0, le=65535)


class TimeoutsConfig(_Strict):
    """Seconds. A stage that overruns drops the sites that did not answer."""

    handshake: float = Field(10.0, gt=0)
    fit: float = Field(600.0, gt=0)
    evaluate: float = Field(300.0, gt=0)
    secagg_stage: float = Field(60.0, gt=0)
    wait_for_sites: float = Field(300.0, gt=0)
    heartbeat_interval: float = Field(5.0, gt=0)
    heartbeat_timeout: float = Field(30.0, gt=0)
    # How long the coordinator keeps trying to tell the sites it is stopping.
    shutdown: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat(self) -> TimeoutsConfig:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout={self.heartbeat_timeout} must exceed heartbeat_interval={self.heartbeat_interval}"
            )
        return self


class SelectionConfig(_Strict):
    """Which connected, eligible sites take part in a round.

    ``all``: every available site; ``fraction``: a seeded random ``fraction`` of them;
    ``range``: a seeded random choice of between ``min_clients`` and ``max_per_round`` sites.
    The count is never below ``min_clients`` (the threshold k).
    """

    policy: Literal["all", "fraction", "range"] = "all"
    fraction: float = Field(1.0, gt=0, le=1)
    max_per_round: int | None = Field(None, ge=1)
    seed: int = 0


# scatter_linear: a linear model on fixed ScatterNet features, the DP-SGD choice (docs/privacy.md)
ModelName = Literal["small_cnn", "resnet18", "scatter_linear"]
NormName = Literal["batch", "group"]
OptimizerName = Literal["adam", "sgd"]


# Models that train on fixed features of the images (ScatterNet coefficients), which cannot be
# shifted like images: a run of one has augmentation off, and a site's policy does not ask for it.
UNAUGMENTABLE = frozenset({"scatter_linear"})


class ModelConfig(_Strict):
    name: ModelName = "small_cnn"
    norm: NormName = "batch"
    width: int = Field(32, ge=4, le=512)
    # GroupNorm groups (capped at the channel count): 32, as Opacus uses when it converts BatchNorm.
    # On the label-skew split, FedAvg with GroupNorm scored 0.917 test AUC over three seeds with 32
    # groups and 0.854 with 8 (docs/results.md).
    groups: int = Field(32, ge=1)


StrategyName = Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
ADAPTIVE_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")  # the server optimisers of Reddi et al. 2021


class StrategyConfig(_Strict):
    """The server's optimiser (``name``) and the parts a run combines with it: server momentum
    (``server_momentum``, FedAvgM's, with the plain server optimiser), FedProx's proximal term
    (``mu``), FedBN (``fedbn``) and SCAFFOLD's control variates (``scaffold``), each with any name: ``fedprox`` and ``fedavgm`` name the
    plain optimiser too, and require their part.  ``server_lr`` is 1 unless set, and 0.01 for
    the adaptive optimisers (Reddi et al. 2021, with ``tau`` 1e-3); ``beta1``, ``beta2`` and
    ``tau`` are theirs (``aggregate.server_step``)."""

    name: StrategyName = "fedavg"
    mu: float = Field(0.0, ge=0)
    fedbn: bool = False
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    # SCAFFOLD's drift correction (Karimireddy et al. 2020): each site's control-variate delta
    # travels inside the secure sum, and each site takes the server's from its derived models
    scaffold: bool = False
    # "package.module:Class", a Strategy built as Class(cfg, initial_params) (docs/strategies.md)
    custom: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    @model_validator(mode="after")
    def _server_lr(self) -> StrategyConfig:
        if self.name == "fedprox" and self.mu <= 0:
            raise ValueError("strategy fedprox needs strategy.mu > 0 (FedProx's proximal term, e.g. 0.01)")
        if self.name == "fedavgm" and self.server_momentum <= 0:
            raise ValueError("strategy fedavgm needs strategy.server_momentum > 0 (e.g. 0.9)")
        if self.name in ADAPTIVE_STRATEGIES and self.server_momentum > 0:
            raise ValueError(f"strategy {self.name} keeps its own first moment (beta1): server_momentum is for "
                             "the plain optimiser")
        if self.server_lr is None:
            self.server_lr = 0.01 if self.name in ADAPTIVE_STRATEGIES else 1.0
        return self


# A round's local training when a spec names neither steps nor epochs: about one pass over the
# bundled demo's average site (4,708 images over 4 sites, batches of 64).
DEFAULT_LOCAL_STEPS = 20


class TrainConfig(_Strict):
    """How each site trains locally.

    ``max_update_norm``: each site scales its update (local model minus global model) down to
    this L2 norm before it leaves the site, so no one site's data moves the model by more; with
    secure aggregation off the coordinator also refuses an update above it (per sample).  It
    bounds honest sites only: under secure aggregation nothing can check a malicious site's
    (docs/threat-model.md, "Poisoning").  None: no bound from the run (DP-SGD bounds each example
    instead); each site still applies its own ceiling, ``policy.bounds.max_update_norm``, and
    refuses settings outside its ``policy.bounds`` (``config/site.py``)."""

    # How much each site trains per round: ``local_steps`` minibatches whatever its data size (so
    # neither the update nor the time it took tells the coordinator that size: the default site
    # policy refuses anything else), or ``local_epochs`` full passes over its data. One of the two;
    # neither set means DEFAULT_LOCAL_STEPS.
    local_steps: int | None = Field(None, ge=1, le=100_000)
    local_epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: OptimizerName = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    augment: bool = True
    max_update_norm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_schedule(self) -> TrainConfig:
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("set train.local_steps or train.local_epochs, not both")
        if self.local_steps is None and self.local_epochs is None:
            self.local_steps = DEFAULT_LOCAL_STEPS
        return self

    def steps_per_round(self, n: int) -> int:
        """Minibatch steps a site with ``n`` training examples takes in one round (full batches
        over the epochs, or the fixed count)."""
        if self.local_steps is not None:
            return self.local_steps
        assert self.local_epochs is not None
        return self.local_epochs * max(1, -(-n // self.batch_size))


class PartitionConfig(_Strict):
    """How the demo's shared file is split into sites (see ``asagiri partition``).

    ``feature``: ChestX-ray14 by ``View Position`` (or ``feature_key: age_band``), ISIC 2020 by
    anatomical site; other sets get a simulated per-site acquisition profile.
    """

    scheme: Literal["iid", "dirichlet", "quantity", "feature"] = "dirichlet"
    alpha: float = Field(0.3, gt=0)
    seed: int = 0
    feature_key: str | None = None


class DataConfig(_Strict):
    """What the federation trains on.  ``path`` None means the data bundled with Asagiri."""

    dataset: Literal["pneumoniamnist", "dermamnist", "medmnist", "nih", "isic", "synthetic"] = "pneumoniamnist"
    path: Path | None = None
    image_size: int = Field(28, ge=8, le=512)
    partition: PartitionConfig = PartitionConfig()
    # patients held out for validation where the files have no validation split (ISIC, ChestX-ray14)
    val_fraction: float = Field(0.15, gt=0, lt=0.8)
    synthetic_samples: int = Field(512, ge=16)


# The mask PRGs of secure aggregation (protocol/SPEC.md §6.1).
PrgName = Literal["aes128-ctr", "chacha20"]


class SecAggConfig(_Strict):
    """Secure aggregation (docs/secagg.md). On by default: the coordinator learns only the sum.

    ``mode``: ``complete`` (every pair of sites) or ``sparse`` (SecAgg+: each site shares with a
    group of ``shares`` sites, itself included, drawn from a public seed; ``None`` picks about
    ``2 log2 n``).  ``threshold``: shares needed to rebuild a secret (default: a majority of the
    group).  ``clip``, ``max_samples_per_site`` and ``bits`` size the fixed-point ring so the sum
    can never wrap; a configuration that could is refused where a fed.yaml becomes a run
    (``coordinator/checks.py`` applies ``secagg/rules.py``, which also derives the group and
    threshold).  ``prg``: the mask PRG (AES-128-CTR, or ChaCha20 for hardware without AES
    instructions).

    ``batch_size``: the enrolled sites are cut into fixed participation batches of at least this
    many (``FederationConfig.participation_batches``); every round sums whole batches only, and a
    batch with a site missing is left out of the round whole, so two sums the coordinator holds
    differ by whole batches or not at all (docs/secagg.md, "Participation batches").  The sites'
    default policy requires batches of at least its ``min_participants``.  ``batches``: the cut,
    given explicitly instead (a partition of the enrolled site ids); the coordinator fills it in
    from ``batch_size`` for the run's spec.  ``batch_size: null`` and no ``batches``: none.
    """

    enabled: bool = True
    mode: Literal["complete", "sparse"] = "sparse"
    shares: int | None = Field(None, ge=2)
    threshold: int | None = Field(None, ge=1)
    bits: Literal[32, 64] = 32
    clip: float = Field(4.0, gt=0)
    max_samples_per_site: int = Field(100_000, ge=1)
    prg: PrgName = "aes128-ctr"
    batch_size: int | None = Field(3, ge=1)
    batches: list[list[Annotated[StrictInt, Field(ge=0, lt=1 << 31)]]] | None = Field(None, max_length=1 << 16)
    colluders: int = Field(0, ge=0, le=1 << 16)

    @model_validator(mode="after")
    def _threshold(self) -> SecAggConfig:
        if self.shares is not None and self.threshold is not None:
            if not self.shares // 2 + 1 <= self.threshold <= self.shares:
                raise ValueError(
                    f"threshold={self.threshold} must be a majority of shares={self.shares} "
                    f"(between {self.shares // 2 + 1} and {self.shares})"
                )
        if self.batches is not None:
            ids = [v for batch in self.batches for v in batch]
            if not all(self.batches) or len(set(ids)) != len(ids):
                raise ValueError("batches: each site in exactly one batch, and no batch empty")
        return self


class DPConfig(_Strict):
    """Record-level DP-SGD on every site (docs/privacy.md). With ``noise_multiplier: auto`` each
    site solves for the sigma that spends ``target_epsilon`` over the planned rounds at its own
    sample rate (``train.batch_size`` / its data size)."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0)
    target_delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    noise_multiplier: Literal["auto"] | float = "auto"
    # K augmented copies per example, gradients averaged before clipping (De et al. 2022): same
    # epsilon, K times the compute.
    augmentation_multiplicity: int = Field(1, ge=1, le=32)

    @field_validator("noise_multiplier")
    @classmethod
    def _positive(cls, v: str | float) -> str | float:
        if v != "auto" and float(v) <= 0:
            raise ValueError("must be 'auto' or a positive number")
        return v


class SiteEntry(_Strict):
    id: int = Field(ge=0, lt=1 << 31)
    public_key: str

    @field_validator("public_key")
    @classmethod
    def _hex_key(cls, v: str) -> str:
        v = v.strip()
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise ValueError("must be the 64 hex characters printed by `asagiri keygen`") from None
        if len(raw) != 32:
            raise ValueError("must be the 64 hex characters printed by `asagiri keygen`")
        return v.lower()


class FederationConfig(_Strict):
    run_id: str = "asagiri"
    listen: ListenConfig = ListenConfig()
    identity_key: Path = Path("keys/coordinator.key")
    rounds: int = Field(3, ge=1)
    # The threshold k: no round is aggregated over fewer sites. 3 matches the sites' default
    # policy.min_participants, below which they refuse secure-aggregation rounds.
    min_clients: int = Field(3, ge=1)
    max_round_attempts: int = Field(3, ge=1)
    selection: SelectionConfig = SelectionConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    model: ModelConfig = ModelConfig()
    strategy: StrategyConfig = StrategyConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    secagg: SecAggConfig = SecAggConfig()
    dp: DPConfig = DPConfig()
    metrics_port: int | None = Field(None, ge=0, le=65535)
    run_dir: Path = Path("runs/asagiri")
    # Keep every round's global model in run_dir/models/ (what `asagiri attack invert --run` attacks:
    # the aggregate the coordinator held, as the difference of two consecutive models).
    keep_models: bool = False
    max_frame_bytes: int = Field(4 << 20, ge=64 << 10, le=1 << 30)
    max_message_bytes: int = Field(1 << 30, ge=1 << 10)
    chunk_bytes: int = Field(1 << 20, ge=1 << 10)
    sites: list[SiteEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> FederationConfig:
        ids = [s.id for s in self.sites]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"sites: site ids must be unique, repeated: {dup}")
        if self.sites and self.min_clients > len(self.sites):
            raise ValueError(f"min_clients={self.min_clients} but only {len(self.sites)} sites are enrolled")
        m = self.selection.max_per_round
        if m is not None and m < self.min_clients:
            raise ValueError(f"selection.max_per_round={m} is below min_clients={self.min_clients}")
        if self.model.name in UNAUGMENTABLE and (self.train.augment or self.dp.augmentation_multiplicity > 1):
            raise ValueError("model.name=scatter_linear trains on fixed ScatterNet features, which cannot be shifted "
                             "like images: set train.augment=false and dp.augmentation_multiplicity=1")
        c = self.secagg.colluders
        if self.secagg.enabled and c > max(0, self.min_clients - 2):
            raise ValueError(f"secagg.colluders={c} with min_clients={self.min_clients}: a survivor list needs "
                             f"⌊(n + colluders)/2⌋ + 1 signatures, more than a round of {self.min_clients} sites "
                             f"can give with one of them lost (colluders at most min_clients - 2)")
        batches = self.secagg.batches
        if batches is not None and self.sites and {v for b in batches for v in b} != set(ids):
            raise ValueError("secagg.batches must hold every enrolled site (sites:) exactly once")
        if self.strategy.scaffold and not self.secagg.enabled:
            raise ValueError("strategy.scaffold needs secure aggregation (secagg.enabled: true): each site takes the "
                             "server's control variate from the models it derives from verified sums, never from "
                             "the coordinator, and its own control-variate delta leaves it only inside a sum")
        if self.chunk_bytes + 64 > self.max_frame_bytes:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} does not fit in max_frame_bytes={self.max_frame_bytes}")
        return self

    def participation_batches(self) -> list[list[int]] | None:
        """The run's participation batches: ``secagg.batches`` as given, or the enrolled sites,
        ascending, cut into ``len(sites) // batch_size`` contiguous batches (one, with fewer sites)
        whose sizes differ by at most one.  None: secure aggregation off, no sites, or no batches."""
        sa = self.secagg
        if not sa.enabled or sa.batches is not None:
            return sa.batches if sa.enabled else None
        ids = sorted(s.id for s in self.sites)
        if sa.batch_size is None or not ids:
            return None
        count = max(1, len(ids) // sa.batch_size)
        base, extra = divmod(len(ids), count)
        out, pos = [], 0
        for i in range(count):
            take = base + (1 if i < extra else 0)
            out.append(ids[pos:pos + take])
            pos += take
        return out

    def site_index(self, site_id: int) -> int:
        return [s.id for s in self.sites].index(site_id)
