import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asagiri.config import ConfigError, load_federation

KEY = "ab" * 32


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "fed.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def roster(n):
    return [{"id": i, "public_key": KEY[:-2] + f"{i:02x}"} for i in range(1, n + 1)]


def test_valid_config_and_overrides(tmp_path):
    p = write(tmp_path, {"rounds": 5, "sites": roster(4)})
    cfg = load_federation(p, ["min_clients=3", "strategy.name=fedprox", "strategy.mu=0.01"])
    assert cfg.min_clients == 3 and cfg.strategy.name == "fedprox" and cfg.strategy.mu == 0.01
    assert cfg.secagg.prg == "aes128-ctr"
    assert load_federation(p, ["secagg.prg=chacha20"]).secagg.prg == "chacha20"
    assert cfg.run_dir.is_absolute() or str(cfg.run_dir).startswith(str(tmp_path))


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"min_clients": 7, "sites": roster(4)}, [], "fed.yaml: min_clients=7 but only 4 sites are enrolled"),
        ({"rounds": 0, "sites": roster(2)}, [], "fed.yaml: rounds: Input should be greater than or equal to 1"),
        ({"sites": roster(2), "bogus": 1}, [], "fed.yaml: bogus: unknown key"),
        ({"sites": [{"id": 1, "public_key": "xyz"}]}, [], "fed.yaml: sites.0.public_key: must be the 64 hex"),
        ({"sites": roster(2)}, ["strategy.name=fedsgd"], "fed.yaml: strategy.name: Input should be"),
        ({"sites": roster(2) + roster(1)}, [], "site ids must be unique"),
        ({"sites": roster(3), "min_clients": 2, "selection": {"max_per_round": 1}}, [], "max_per_round=1 is below"),
        ({"sites": roster(2)}, ["secagg.prg=rc4"], "fed.yaml: secagg.prg: Input should be 'aes128-ctr' or 'chacha20'"),
    ],
)
def test_errors_name_key_and_reason(tmp_path, data, overrides, message):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_federation(p, overrides)
    assert message in str(exc.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_federation(tmp_path / "nope.yaml")
    bad = tmp_path / "fed.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_federation(bad)


def test_cli_reports_config_error_with_exit_code_2_and_no_traceback(tmp_path):
    p = write(tmp_path, {"min_clients": 7, "sites": roster(4)})
    proc = subprocess.run(
        [sys.executable, "-m", "asagiri.cli.coordinator", "--config", str(p)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: fed.yaml: min_clients=7 but only 4 sites are enrolled"
    assert "Traceback" not in proc.stderr


def test_demo_rejects_bad_override_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "asagiri.cli.main", "demo", "--sites", "2", "--out", str(tmp_path / "run"),
         "--set", "min_clients=5"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "min_clients=5 but only 2 sites are enrolled" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_wire_and_cipher_layers_name_the_same_prgs():
    from typing import get_args

    from asagiri.config import SecAggConfig
    from asagiri.secagg.prg import PRGS
    from asagiri.wire.crypto import KEYSTREAMS

    assert get_args(SecAggConfig.model_fields["prg"].annotation) == PRGS == KEYSTREAMS


def test_validation_share_defaults_agree_and_out_of_range_is_refused(tmp_path):
    from asagiri.cli.main import build_parser, main
    from asagiri.config import DataConfig
    from asagiri.data.loaders import VAL_FRACTION

    args = build_parser().parse_args(["partition", "--dataset", "pneumoniamnist", "--sites", "2", "--out", "x"])
    assert DataConfig().val_fraction == VAL_FRACTION == args.val_fraction
    assert main(["partition", "--dataset", "pneumoniamnist", "--sites", "2", "--val-fraction", "0.9",
                 "--out", str(tmp_path)]) == 2


def test_a_ring_that_could_wrap_is_refused_where_the_federation_is_loaded(tmp_path):
    from asagiri.coordinator.checks import check_federation

    p = tmp_path / "fed.yaml"
    sites = [{"id": i, "public_key": "ab" * 32} for i in (1, 2, 3)]
    p.write_text(yaml.safe_dump({"sites": sites, "secagg": {"clip": 1e6}}))
    cfg = load_federation(p)  # plain data: the rule is secure aggregation's
    with pytest.raises(ConfigError) as err:
        check_federation(cfg, p.name)
    assert str(err.value) == ("fed.yaml: secagg: 3 sites x 100000 samples x clip 1000000.0 overflow 32-bit masks "
                              "(scale would be below 1); use bits: 64, a smaller clip or max_samples_per_site")
    check_federation(load_federation(p, ["secagg.bits=64"]), p.name)
