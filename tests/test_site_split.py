"""A real site's validation hold-out is its own (issue 26, "site-owned data"; a red-team finding):
the run's ``data.val_fraction`` and ``data.partition.seed`` used to choose which of a hospital's
patients it trained on, so a coordinator could shrink its training set (``val_fraction`` 0.79) or
move which patients were in it from run to run.  Now they apply to simulated sites only."""

from __future__ import annotations

import torch

from asagiri.config import FederationConfig, RunSpec, SiteConfig
from asagiri.site.worker import SiteWorker
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import Welcome

from .data.test_cache import make_isic


def worker(tmp_path, data_dir, *, run_val_fraction=0.15, run_seed=0, **site):
    key = Identity.generate()
    key.save(tmp_path / "k.key")
    cfg = SiteConfig(site_id=1, identity_key=tmp_path / "k.key", state_dir=tmp_path / "state", device="cpu",
                     coordinator={"public_key": key.public.hex()}, peers={1: key.public.hex()},
                     data_path=data_dir, **site)
    fed = FederationConfig.model_validate({
        "model": {"width": 8}, "data": {"dataset": "isic", "image_size": 32, "val_fraction": run_val_fraction,
                                        "partition": {"scheme": "iid", "seed": run_seed}}})
    spec = RunSpec.of(fed)
    return SiteWorker(cfg, Welcome("r", 0, 1, spec.wire()), spec)


def test_the_runs_hold_out_settings_do_not_move_a_real_sites_training_set(tmp_path):
    make_isic(tmp_path / "isic", n=96)
    honest = worker(tmp_path / "a", tmp_path / "isic")
    shrunk = worker(tmp_path / "b", tmp_path / "isic", run_val_fraction=0.79, run_seed=7)
    assert len(honest.data.train) == len(shrunk.data.train) > 60
    assert torch.equal(honest.data.train.images, shrunk.data.train.images)
    # the site's own settings do move it
    own = worker(tmp_path / "c", tmp_path / "isic", split_seed=3)
    assert not torch.equal(honest.data.train.images, own.data.train.images)
    smaller = worker(tmp_path / "d", tmp_path / "isic", val_fraction=0.5)
    assert len(smaller.data.train) < len(honest.data.train)
