"""``site.yaml``: one site (``SiteConfig``), and the policy it holds every run to (``PolicyConfig``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import _Strict
from .federation import ModelName, NormName, OptimizerName, SiteEntry

__all__ = ["AccelConfig", "CoordinatorAddress", "PolicyConfig", "ReconnectConfig", "SimulationConfig", "SiteConfig",
           "TrainingBounds"]


class TrainingBounds(_Strict):
    """``policy.bounds``: the range of every training setting a run's spec may choose, held by the
    site (docs/secagg.md, "Site policy"; each family refused under its own rule).  A coordinator
    that chooses them freely can make one site's update readable out of a secure sum (a huge
    learning rate or many epochs so that update dwarfs the others; a full or tiny batch with no
    augmentation so that training is deterministic and the update is a gradient to invert; a
    fine fixed-point ring so the sum is exact).  The defaults admit every shipped recipe.

    ``model`` rule: ``models``, ``norms``, ``min_width``..``max_width``.
    ``train_bounds`` rule: ``min_lr``..``max_lr``, ``min_local_steps``..``max_local_steps``,
    ``allow_epochs`` (a run that trains in ``local_epochs`` takes a number of steps that grows
    with this site's data size, and with it the update and the round's time: refused by
    default), ``max_local_epochs``,
    ``min_batch_size``..``max_batch_size``, ``optimizers``, ``max_momentum``,
    ``max_weight_decay``, ``max_mu`` (FedProx's weight in each FitIns), ``max_server_lr`` and
    ``max_adaptive_server_lr`` (the server step's size), ``require_augment`` (``without_dp``: a run without DP-SGD must augment,
    unless its model trains on fixed features that cannot be shifted (``scatter_linear``);
    DP-SGD's Poisson sampling and noise randomise training on their own).
    ``max_update_norm``: not a refusal; the site scales every update it sends down to this L2
    norm, or to the spec's ``train.max_update_norm`` if smaller, even when the spec sets none.
    ``secagg_bounds`` rule: ``secagg_bits``, ``min_clip``, ``min_max_samples_per_site``.
    ``dp_bounds`` rule: ``min_grad_norm``..``max_grad_norm`` (DP-SGD's per-example clip) and
    ``min_noise_multiplier`` (when the spec gives a number rather than ``auto``).
    """

    # model
    models: tuple[ModelName, ...] = Field(("small_cnn", "resnet18", "scatter_linear"), min_length=1)
    norms: tuple[NormName, ...] = Field(("batch", "group"), min_length=1)
    min_width: int = Field(4, ge=1)
    max_width: int = Field(128, ge=1)
    # train_bounds
    min_lr: float = Field(1e-5, gt=0)
    max_lr: float = Field(1.0, gt=0)
    # a floor too: one step of a small batch makes the update a single minibatch's gradient
    min_local_steps: int = Field(5, ge=1)
    max_local_steps: int = Field(500, ge=1)
    allow_epochs: bool = False
    max_local_epochs: int = Field(5, ge=1)
    min_batch_size: int = Field(16, ge=1)
    max_batch_size: int = Field(512, ge=1)
    optimizers: tuple[OptimizerName, ...] = Field(("adam", "sgd"), min_length=1)
    max_momentum: float = Field(0.95, ge=0, lt=1)
    max_weight_decay: float = Field(0.01, ge=0)
    # FedProx's proximal weight, as each FitIns carries it: with lr * mu near 1 every local step
    # restarts from the global model, and the update is close to one minibatch's gradient.
    max_mu: float = Field(0.1, ge=0)
    # The server step each site derives from a verified sum (SPEC §6.9): the plain optimiser's
    # step is the mean update times server_lr; an adaptive one (FedAdam, FedYogi, FedAdagrad)
    # moves every weight by up to about server_lr a round whatever the update's size, so a
    # coordinator's large one would throw the model anywhere the sum's signs point.
    max_server_lr: float = Field(1.0, gt=0)
    max_adaptive_server_lr: float = Field(0.1, gt=0)
    require_augment: Literal["always", "without_dp", "never"] = "without_dp"
    # applied, never refused
    max_update_norm: float = Field(100.0, gt=0)
    # secagg_bounds
    secagg_bits: tuple[Literal[32, 64], ...] = Field((32, 64), min_length=1)
    min_clip: float = Field(1.0, gt=0)
    min_max_samples_per_site: int = Field(1000, ge=1)
    # dp_bounds
    min_grad_norm: float = Field(0.01, gt=0)
    max_grad_norm: float = Field(10.0, gt=0)
    min_noise_multiplier: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> TrainingBounds:
        for lo, hi in (("min_width", "max_width"), ("min_lr", "max_lr"), ("min_batch_size", "max_batch_size"),
                       ("min_local_steps", "max_local_steps"),
                       ("min_grad_norm", "max_grad_norm")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo}={getattr(self, lo)} is above {hi}={getattr(self, hi)}")
        return self


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
    ``require_batches``: a run with secure aggregation must cut its sites into participation
    batches of at least ``min_participants + colluders`` (``secagg.batches`` in its spec), and every
    round sums whole batches only, so that no two sums the coordinator obtains, in one round or
    across rounds and attempts, differ by fewer than ``min_participants`` honest sites' inputs
    (docs/secagg.md, "Participation batches").  When a spec has batches, the site keeps to them
    whatever this says.  ``derive_models``: in a run with secure aggregation, train and evaluate
    only models this site derived itself: ``W_0`` from the run's id and spec, and each next model
    from a sum it verified, by the run's server step (docs/secagg.md, "Derived models"); a
    ``FitIns`` or ``EvaluateIns`` carrying any other weights is declined.  It holds against a
    coordinator with no colluding survivor (``colluders`` does not extend to it: a colluding
    survivor can vouch for any sum).  ``report_privacy``: send epsilon and sigma with evaluation
    results.  ``count``: the sample
    count this site puts in every sum and validation result: ``one`` (its update weighs as much
    as any other site's; its size never leaves it), ``pow2`` (its size rounded down to a power of
    two), ``exact`` (FedAvg's sample weighting, and the size readable by differencing two rounds
    or from one plaintext one).  ``bounds``: the
    range of every training setting a run may choose (:class:`TrainingBounds`).  A run's spec
    is fixed for its ``run_id``: a Welcome with another spec under the same ``run_id`` is refused
    (``spec_changed``), across restarts (``state_dir/run_specs.json``).
    """

    require_secagg: bool = True
    min_participants: int = Field(3, ge=2)
    min_group: int = Field(3, ge=2)
    min_threshold: int = Field(2, ge=2)
    colluders: int = Field(0, ge=0, le=1 << 16)
    require_batches: bool = True
    derive_models: bool = True
    # Send one score per official test example (the coordinator pools them into one AUC). Off: the
    # test result carries the site's own AUC, accuracy and loss, as rounded as validation's, and
    # the count as `count` says: a list of scores is as long as the site's test set.
    share_predictions: bool = False
    # Send epsilon and sigma with evaluation results. Off by default: under noise_multiplier auto
    # they are functions of this site's sample rate, so together they give away its data size.
    report_privacy: bool = False
    # The count is summed exactly inside the secure sum, so two rounds whose participants differ by
    # this site give away whatever it sends here: by default that is 1 (docs/secagg.md, "Sample counts").
    count: Literal["one", "pow2", "exact"] = "one"
    # Unless count is exact, evaluation metrics are sent to this many decimals or two significant
    # digits, the coarser: an exact accuracy is k/n, and the denominators of a few rounds' values
    # give the split's size away; a crafted model's loss is M*k/n for any M.
    metric_decimals: int = Field(2, ge=0, le=15)
    require_dp: bool = False
    # The fewest training examples one update may come from: a share the size of a few images
    # would make the site's update (even inside a secure sum) a picture of those images.
    min_examples: int = Field(32, ge=1)
    # Rounds of a run this site contributed to (or whose model it evaluated) whose signed record
    # never came, excused by a new session (the coordinator restarted); past this many it leaves.
    max_unrecorded: int = Field(2, ge=0)
    max_epsilon: float = Field(8.0, gt=0)
    max_delta: float = Field(1e-5, gt=0, lt=1)
    run_id: str | None = Field(None, min_length=1, max_length=128)
    bounds: TrainingBounds = TrainingBounds()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        if isinstance(data, dict) and "equal_weight" in data:
            raise ValueError("policy.equal_weight was replaced by policy.count: `count: one` is what "
                             "`equal_weight: true` did, and is now the default; `count: exact` sends the sample count")
        return data


class CoordinatorAddress(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(7740, ge=1, le=65535)
    public_key: str

    @field_validator("public_key")
    @classmethod
    def _hex_key(cls, v: str) -> str:
        return SiteEntry._hex_key(v)


class SimulationConfig(_Strict):
    """A simulated site (``asagiri demo``, ``asagiri.local``, the benchmarks and tests): it takes
    share ``share`` of ``shares`` of a shared file, as the run's ``data.partition`` splits it.  The
    share is the site's own setting; nothing the coordinator sends changes it."""

    share: int = Field(ge=0, lt=1 << 20)
    shares: int = Field(ge=1, le=1 << 20)

    @model_validator(mode="after")
    def _within(self) -> SimulationConfig:
        if self.share >= self.shares:
            raise ValueError(f"share {self.share} of {self.shares}: shares are numbered from 0")
        return self


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
    # A real site trains on the whole of its data; only a simulated one takes a share of a shared
    # file (a partition is a simulation device, never the coordinator's choice).
    simulation: SimulationConfig | None = None
    # Where this site's files have no validation split of their own (ISIC 2020, ChestX-ray14): the
    # fraction of its patients it holds out, and the seed of that draw. The site's, not the
    # run's: a run's data.val_fraction and data.partition.seed apply to simulated sites only.
    val_fraction: float = Field(0.15, gt=0, lt=0.8)
    split_seed: int = 0
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
    # The seed of this site's training randomness (batch order, augmentation, DP-SGD's sampling
    # and noise), drawn by the site, never taken from the coordinator. None: a fresh one from
    # the OS every round. A number makes a simulation reproducible (the demo's site configs set
    # one); a deployed site should leave it None.
    train_seed: int | None = Field(None, ge=0, lt=1 << 62)

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
