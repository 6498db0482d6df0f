"""One pydantic model tree for ``fed.yaml`` (the federation) and ``site.yaml`` (one site).

This is the only place defaults live.  Loading never raises a traceback at a user: every problem
becomes one :class:`ConfigError` naming the file, the key and the reason, which the CLI turns
into exit code 2.

Over 400 lines on purpose: the one tree is the point (every default in one file, next to its
bounds), so it is not split by section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "AccelConfig",
    "ConfigError",
    "CoordinatorAddress",
    "DataConfig",
    "DPConfig",
    "FederationConfig",
    "ModelConfig",
    "PolicyConfig",
    "RunSpec",
    "SecAggConfig",
    "SelectionConfig",
    "SiteConfig",
    "SiteEntry",
    "StrategyConfig",
    "TimeoutsConfig",
    "TrainConfig",
    "apply_overrides",
    "config_digest",
    "default_federation",
    "load_federation",
    "load_site",
]


_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration problem, phrased for a person: ``file: key: reason``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ModelConfig(_Strict):
    name: ModelName = "small_cnn"
    norm: Literal["batch", "group"] = "batch"
    width: int = Field(32, ge=4, le=512)
    # GroupNorm groups (capped at the channel count): 32, as Opacus uses when it converts BatchNorm.
    # On the label-skew split, FedAvg with GroupNorm scored 0.917 test AUC over three seeds with 32
    # groups and 0.854 with 8 (docs/results.md).
    groups: int = Field(32, ge=1)


StrategyName = Literal["fedavg", "fedprox", "fedavgm"]


class StrategyConfig(_Strict):
    name: StrategyName = "fedavg"
    mu: float = Field(0.0, ge=0)
    fedbn: bool = False
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    # "package.module:Class", a Strategy built as Class(cfg, initial_params) (docs/strategies.md)
    custom: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TrainConfig(_Strict):
    """How each site trains locally.

    ``max_update_norm``: each site scales its update (local model minus global model) down to
    this L2 norm before it leaves the site, so no one site's data moves the model by more; with
    secure aggregation off the coordinator also refuses an update above it (per sample).  It
    bounds honest sites only: under secure aggregation nothing can check a malicious site's
    (docs/threat-model.md, "Poisoning").  None: no bound (DP-SGD bounds each example instead)."""

    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    augment: bool = True
    max_update_norm: float | None = Field(None, gt=0)


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
    can never wrap; a configuration that could is refused.  ``prg``: the mask PRG (AES-128-CTR, or
    ChaCha20 for hardware without AES instructions).
    """

    enabled: bool = True
    mode: Literal["complete", "sparse"] = "sparse"
    shares: int | None = Field(None, ge=2)
    threshold: int | None = Field(None, ge=1)
    bits: Literal[32, 64] = 32
    clip: float = Field(4.0, gt=0)
    max_samples_per_site: int = Field(100_000, ge=1)
    prg: PrgName = "aes128-ctr"

    @model_validator(mode="after")
    def _threshold(self) -> SecAggConfig:
        if self.shares is not None and self.threshold is not None:
            if not self.shares // 2 + 1 <= self.threshold <= self.shares:
                raise ValueError(
                    f"threshold={self.threshold} must be a majority of shares={self.shares} "
                    f"(between {self.shares // 2 + 1} and {self.shares})"
                )
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


class PolicyConfig(_Strict):
    """What this site takes part in (docs/secagg.md, "Site policy"). The coordinator cannot lower it:
    a Welcome, a FitIns or a round that asks for less is refused, and the site declines.

    ``min_participants``: the fewest sites whose inputs must be summed with this site's before the
    coordinator may unmask anything (checked on the participants, the advertised sites, the
    survivors, and the connected group of sites this site's masks tie it to).  ``min_group`` and
    ``min_threshold``: the smallest secret-sharing group (this site included) and threshold
    accepted.  ``max_epsilon`` / ``max_delta``: the most DP budget a run may ask for; with
    ``require_dp`` a run without DP-SGD is refused.  ``run_id``: only this run is joined.
    ``colluders``: how many other participants this site assumes may be working with the
    coordinator; the survivor-list quorum rises by a half for each, the threshold floor by one,
    and this site's masking component must keep ``min_participants`` members whichever
    ``colluders`` of its other members are removed (docs/secagg.md, "What is guaranteed").
    ``report_privacy``: send epsilon and sigma with evaluation results.  ``equal_weight``: count
    as one sample in every sum, so the site's sample count never leaves it.
    """

    require_secagg: bool = True
    min_participants: int = Field(3, ge=2)
    min_group: int = Field(3, ge=2)
    min_threshold: int = Field(2, ge=2)
    colluders: int = Field(0, ge=0, le=1 << 16)
    # Send epsilon and sigma with evaluation results. Off by default: under noise_multiplier auto
    # they are functions of this site's sample rate, so together they give away its data size.
    report_privacy: bool = False
    # Weigh this site's update as one sample instead of its sample count. The count is summed
    # exactly, so two rounds whose participants differ by this site give it away by subtraction;
    # with equal_weight it never leaves the site, at the cost of FedAvg's sample weighting.
    equal_weight: bool = False
    require_dp: bool = False
    max_epsilon: float = Field(8.0, gt=0)
    max_delta: float = Field(1e-5, gt=0, lt=1)
    run_id: str | None = Field(None, min_length=1, max_length=128)


class SpecStrategy(_Strict):
    """The part of ``strategy`` a site acts on (``StrategyConfig``'s other keys stay with the coordinator)."""

    name: StrategyName = "fedavg"
    mu: float = Field(0.0, ge=0)
    fedbn: bool = False


class RunSpec(_Strict):
    """``Welcome.spec``: how every site of the run trains, built from fed.yaml by the coordinator.

    A site validates it whole before acting on any of it (a malformed spec is refused, never a
    crash) and binds its digest into every secure-aggregation round, so all sites of a round
    provably received the same one (``secagg/binding.py``).
    """

    model: ModelConfig
    train: TrainConfig
    strategy: SpecStrategy
    data: DataConfig
    rounds: int = Field(ge=1)
    heartbeat_interval: float = Field(gt=0)
    heartbeat_timeout: float = Field(gt=0)
    min_clients: int = Field(ge=1)
    secagg_stage_timeout: float = Field(gt=0)
    secagg: SecAggConfig
    dp: DPConfig

    @classmethod
    def of(cls, cfg: FederationConfig) -> RunSpec:
        t = cfg.timeouts
        return cls(
            model=cfg.model, train=cfg.train,
            strategy=SpecStrategy(name=cfg.strategy.name, mu=cfg.strategy.mu, fedbn=cfg.strategy.fedbn),
            data=cfg.data.model_copy(update={"path": None}), rounds=cfg.rounds,
            heartbeat_interval=t.heartbeat_interval, heartbeat_timeout=t.heartbeat_timeout,
            min_clients=cfg.min_clients, secagg_stage_timeout=t.secagg_stage, secagg=cfg.secagg, dp=cfg.dp,
        )

    def wire(self) -> dict[str, Any]:
        """The spec as Welcome carries it (``data.path`` never leaves the coordinator)."""
        out = self.model_dump()
        del out["data"]["path"]
        return out


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
        if self.model.name == "scatter_linear" and (self.train.augment or self.dp.augmentation_multiplicity > 1):
            raise ValueError("model.name=scatter_linear trains on fixed ScatterNet features, which cannot be shifted "
                             "like images: set train.augment=false and dp.augmentation_multiplicity=1")
        if self.chunk_bytes + 64 > self.max_frame_bytes:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} does not fit in max_frame_bytes={self.max_frame_bytes}")
        return self

    def site_index(self, site_id: int) -> int:
        return [s.id for s in self.sites].index(site_id)


class CoordinatorAddress(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(7740, ge=1, le=65535)
    public_key: str

    @field_validator("public_key")
    @classmethod
    def _hex_key(cls, v: str) -> str:
        return SiteEntry._hex_key(v)


class ReconnectConfig(_Strict):
    connect_s: float = Field(30.0, gt=0)  # one TCP connect, and then one handshake
    initial_s: float = Field(0.2, gt=0)
    max_s: float = Field(5.0, gt=0)
    give_up_s: float = Field(600.0, gt=0)


class AccelConfig(_Strict):
    """How this site's hardware runs its training (``train/accel.py``); none of it changes what
    is trained or sent.  ``auto`` turns on, for a CUDA GPU, mixed precision (bfloat16 where the
    GPU has it, else float16 with loss scaling) and channels-last images, and leaves a CPU in
    float32.  DP-SGD trains in float32 and without channels-last whatever is set here; it clips
    with Opacus' ghost clipping on a GPU (``auto``) or where ``dp_clipping: ghost`` asks, and
    with per-example gradients (``hooks``) otherwise.  ``compile``:
    ``torch.compile`` for training without DP (minutes of compiling on the first round)."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    dp_clipping: Literal["auto", "ghost", "hooks"] = "auto"


class SiteConfig(_Strict):
    site_id: int = Field(ge=0, lt=1 << 31)
    identity_key: Path
    coordinator: CoordinatorAddress
    data_path: Path | None = None
    # Pinned identity keys of every site of the federation (id -> hex), checked on their
    # secure-aggregation keys and survivor-list signatures. Required for secure aggregation:
    # keys that came from the coordinator would let it stand in for the other sites.
    peers: dict[int, str] | None = None
    policy: PolicyConfig = PolicyConfig()
    state_dir: Path = Path("state")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    accel: AccelConfig = AccelConfig()
    threads: int = Field(1, ge=1, le=256)
    # This site's own Prometheus metrics on 127.0.0.1 (training speed, epsilon, refusals); off by default.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    reconnect: ReconnectConfig = ReconnectConfig()
    max_frame_bytes: int = Field(4 << 20, ge=64 << 10, le=1 << 30)
    # A hard cap on one message's tensors. Once the site knows the model it accepts nothing larger
    # than the model's shared parameters plus 1 MiB (client/session.py).
    max_message_bytes: int = Field(256 << 20, ge=1 << 10)
    chunk_bytes: int = Field(1 << 20, ge=1 << 10)
    # Image folders (ChestX-ray14, ISIC 2020) are decoded once into state_dir/cache, by this many
    # worker processes (None: one per core, at most 8). An image that cannot be decoded stops
    # the site with an error naming the file, unless skip_unreadable_images leaves it out (counted).
    decode_workers: int | None = Field(None, ge=1, le=64)
    skip_unreadable_images: bool = False

    @field_validator("peers")
    @classmethod
    def _peer_keys(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        if v is None:
            return v
        for site, key in v.items():
            if not 0 <= site < 1 << 31:
                raise ValueError(f"site id {site} out of range")
            v[site] = SiteEntry._hex_key(key)
        return v

    @model_validator(mode="after")
    def _pinned(self) -> SiteConfig:
        if self.policy.require_secagg and not self.peers:
            raise ValueError(
                "peers: required while policy.require_secagg is true; pin every site's identity key "
                "(id: hex, as `asagiri keygen` prints them; docs/deployment.md)"
            )
        return self


# ---- loading --------------------------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    """``--set`` values are YAML scalars: ``3``, ``0.5``, ``true``, ``fedprox``, ``null``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], *, source: str) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to raw config data, before validation."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item}: empty key")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: --set {key}: {p} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


def _format_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = f" (got {value!r})" if loc and not isinstance(value, dict | list) and value is not None else ""
        lines.append(f"{source}: {loc + ': ' if loc else ''}{msg}{shown}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None or p.is_absolute():
        return p
    return base / p


def _load(model: type[_M], path: Path, overrides: list[str] | None) -> _M:
    data = apply_overrides(_read_yaml(path), overrides or [], source=path.name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(path.name, exc)) from None


def load_federation(path: Path, overrides: list[str] | None = None) -> FederationConfig:
    """Load and validate ``fed.yaml``; relative paths are taken from the file's folder."""
    cfg = _load(FederationConfig, path, overrides)
    base = path.parent
    cfg = cfg.model_copy(
        update={"identity_key": _resolve(base, cfg.identity_key), "run_dir": _resolve(base, cfg.run_dir)}
    )
    if cfg.data.path is not None:
        cfg.data.path = _resolve(base, cfg.data.path)
    return cfg


def config_digest(cfg: BaseModel) -> str:
    """SHA-256 of a config's canonical JSON (keys sorted): what the audit log records."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_federation(overrides: list[str] | None = None) -> FederationConfig:
    """The defaults, with ``key.path=value`` overrides: a federation config without a file."""
    try:
        return FederationConfig.model_validate(apply_overrides({}, overrides or [], source="--set"))
    except ValidationError as exc:
        raise ConfigError(_format_error("--set", exc)) from None


def load_site(path: Path, overrides: list[str] | None = None) -> SiteConfig:
    """Load and validate a site's file; relative paths are taken from the file's folder."""
    cfg = _load(SiteConfig, path, overrides)
    base = path.parent
    return cfg.model_copy(
        update={
            "identity_key": _resolve(base, cfg.identity_key),
            "state_dir": _resolve(base, cfg.state_dir),
            "data_path": _resolve(base, cfg.data_path),
        }
    )
