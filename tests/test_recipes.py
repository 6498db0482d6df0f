"""The shipped recipes (``examples/*.yaml``): each loads, and each runs in a shortened form, in one
process on the bundled data or on generated folders laid out like the real sets; a DP run with
settings known to train badly names the recipe that does not."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from asagiri.config import ConfigError, FederationConfig
from asagiri.local import lay_out, run_local
from asagiri.privacy.ledger import PrivacyLedger
from asagiri.recipes import DP_RECIPE, dp_advice, load_recipe

from .data.test_cache import make_isic, make_nih

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples").glob("*.yaml"))


def test_every_recipe_loads_and_validates(tmp_path):
    assert {p.name for p in RECIPES} >= {"demo.yaml", "dp-chest-xray.yaml", "nih-chestxray14-224.yaml",
                                         "isic-2020.yaml"}
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.description and recipe.sites and recipe.rounds
        cfg, _ = lay_out(tmp_path / path.stem, sites=recipe.sites, rounds=1, recipe=recipe.settings,
                         overrides=["data.path=/nonexistent"] if recipe.settings["data"]["dataset"] in ("nih", "isic")
                         else [])
        assert cfg.data.dataset == recipe.settings["data"]["dataset"]


def run(tmp_path, name: str, sites: int, overrides: list[str], min_examples: int | None = None) -> dict:
    recipe = load_recipe(ROOT / "examples" / name)
    # the shortened image-folder runs hold a few dozen images a site: their sites allow that
    extra = None if min_examples is None else {s: {"policy": {"min_examples": min_examples}}
                                               for s in range(1, sites + 1)}
    cfg, configs = lay_out(tmp_path / "run", sites=sites, rounds=1, recipe=recipe.settings, overrides=overrides,
                           site_extra=extra)
    return anyio.run(lambda: run_local(cfg, configs))


def test_the_dp_recipe_runs_and_spends_its_budget_on_the_bundled_chest_xrays(tmp_path):
    summary = run(tmp_path, "dp-chest-xray.yaml", 3, ["train.local_steps=5"])
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    assert summary["final"]["auc"] > 0.5
    # each site's own ledger: spent, within the target (the sites do not report it unless asked)
    ledgers = [PrivacyLedger(p, delta=1e-5) for p in (tmp_path / "run").rglob("privacy_ledger.json")]
    assert len(ledgers) == 3 and all(0 < ledger.epsilon() <= 8.0 for ledger in ledgers)


def test_the_nih_recipe_runs_on_a_chestxray14_folder(tmp_path):
    make_nih(tmp_path / "nih", n=72)
    # shortened: 64 px and a narrow ResNet-18, the rest as the recipe says
    summary = run(tmp_path, "nih-chestxray14-224.yaml", 3,
                  [f"data.path={tmp_path / 'nih'}", "data.image_size=64", "model.width=8", "train.batch_size=16",
                   "train.local_steps=5"],
                  min_examples=16)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    assert "accuracy" in summary["final"] and len(summary["final"]["site_accuracy"]) == 3


def test_the_isic_recipe_runs_on_an_isic2020_folder(tmp_path):
    make_isic(tmp_path / "isic", n=96)
    summary = run(tmp_path, "isic-2020.yaml", 3,
                  [f"data.path={tmp_path / 'isic'}", "data.image_size=64", "model.width=8", "train.batch_size=16",
                   "train.local_steps=5", "data.partition.scheme=iid"], min_examples=16)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1


def test_a_dp_run_with_the_defaults_is_told_about_the_recipe(tmp_path, caplog):
    naive = FederationConfig.model_validate({"dp": {"enabled": True}})
    advice = dp_advice(naive)
    assert advice is not None and DP_RECIPE in advice
    for pitfall in ("small_cnn", "BatchNorm", "Adam", "augmentation"):
        assert pitfall in advice
    recipe = load_recipe(ROOT / DP_RECIPE)
    cfg, _ = lay_out(tmp_path / "dp", sites=3, rounds=1, recipe=recipe.settings)
    assert dp_advice(cfg) is None and dp_advice(FederationConfig()) is None
    # the coordinator says it in its log
    from asagiri.cli.coordinator import main

    cfg, _ = lay_out(tmp_path / "naive", sites=3, rounds=1, overrides=["dp.enabled=true", "listen.port=1"])
    with caplog.at_level(logging.WARNING):  # (it stops at the missing key, after the warning)
        code = main(["--config", str(tmp_path / "naive" / "config" / "fed.yaml"), "--set",
                     f"identity_key={tmp_path / 'missing.key'}"])
    assert code == 2 and DP_RECIPE in caplog.text


def test_a_recipe_may_not_set_what_the_demo_lays_out(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [{id: 1, public_key: '00'}]\nrounds: 2\n")
    with pytest.raises(ConfigError, match="sites: set by the demo"):
        load_recipe(bad)
