"""``asagiri provision`` and ``asagiri fingerprint`` (issue 28): kits from one project file, with
no hex pasted by hand; bad input gets one line and exit code 2, and nothing is overwritten."""

from __future__ import annotations

import yaml

from asagiri.cli.main import main
from asagiri.config import load_federation, load_site
from asagiri.wire.crypto import Identity, PublicIdentity

PROJECT = {"name": "study-1", "coordinator": {"host": "10.0.0.5", "port": 7740, "listen_host": "0.0.0.0"},
           "federation": {"rounds": 3}, "sites": [{"id": 1, "name": "a"}, {"id": 2}, {"id": 3, "data_path": "/d.npz"}]}


def write(tmp_path, project) -> str:
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project))
    return str(path)


def test_kits_pin_every_key_and_print_every_fingerprint(tmp_path, capsys):
    kits = tmp_path / "kits"
    assert main(["provision", write(tmp_path, PROJECT), "--out", str(kits)]) == 0
    printed = capsys.readouterr().out
    fed = load_federation(kits / "coordinator" / "fed.yaml")
    coordinator = Identity.load(kits / "coordinator" / "coordinator.key").public
    assert fed.run_id == "study-1" and fed.listen.host == "0.0.0.0" and fed.rounds == 3
    assert coordinator.fingerprint() in printed
    for entry in fed.sites:
        site = load_site(kits / f"site-{entry.id}" / "site.yaml")
        key = Identity.load(site.identity_key).public
        assert key.hex() == entry.public_key and key.fingerprint() in printed
        assert site.coordinator.public_key == coordinator.hex() and site.coordinator.host == "10.0.0.5"
        assert site.peers == {e.id: e.public_key for e in fed.sites}
        assert site.simulation is None  # a deployed site trains on its whole file
    assert str(load_site(kits / "site-3" / "site.yaml").data_path) == "/d.npz"
    # the fingerprint command prints the same short form, from a key, a .pub or a config
    assert main(["fingerprint", str(kits / "site-2" / "site-2.pub")]) == 0
    assert PublicIdentity.from_hex(fed.sites[1].public_key).fingerprint() in capsys.readouterr().out
    assert main(["fingerprint", str(kits / "site-1" / "site.yaml")]) == 0
    assert coordinator.fingerprint() in capsys.readouterr().out


def test_existing_kits_are_kept_and_a_bad_project_is_one_line(tmp_path, capsys):
    kits = tmp_path / "kits"
    assert main(["provision", write(tmp_path, PROJECT), "--out", str(kits)]) == 0
    before = (kits / "site-1" / "site-1.key").read_text()
    capsys.readouterr()
    assert main(["provision", write(tmp_path, PROJECT), "--out", str(kits)]) == 2
    assert "--force" in capsys.readouterr().err and (kits / "site-1" / "site-1.key").read_text() == before
    # --force: new keys over the kits' own files, and nothing else deleted (a newcomer's finding:
    # it removed the folder, a run directory and each site's state, privacy ledger included)
    (kits / "coordinator" / "runs").mkdir()
    (kits / "coordinator" / "runs" / "audit.jsonl").write_text("{}\n")
    (kits / "site-1" / "state").mkdir()
    (kits / "site-1" / "state" / "privacy_ledger.json").write_text("{}")
    (kits / "notes.txt").write_text("mine")
    assert main(["provision", write(tmp_path, PROJECT), "--out", str(kits), "--force"]) == 0
    assert (kits / "site-1" / "site-1.key").read_text() != before
    assert (kits / "coordinator" / "runs" / "audit.jsonl").exists() and (kits / "notes.txt").read_text() == "mine"
    assert (kits / "site-1" / "state" / "privacy_ledger.json").exists()
    for bad, why in (({**PROJECT, "federation": {"sites": []}}, "written by provisioning"),
                     ({**PROJECT, "sites": [{"id": 1}, {"id": 1}]}, "distinct"),
                     ({**PROJECT, "name": "no spaces"}, "name"),
                     ({**PROJECT, "federation": {"rounds": 0}}, "rounds"),
                     ({**PROJECT, "sites": [{"id": 1, "data_path": "data/a.npz"}]}, "must be an absolute path")):
        assert main(["provision", write(tmp_path, bad), "--out", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") <= 2, err
        assert not (tmp_path / "other").exists()  # nothing written for a project that cannot run
    assert main(["fingerprint", str(tmp_path / "missing.pub")]) == 2
    assert main(["fingerprint", write(tmp_path, PROJECT)]) == 2  # a project pins no key (was a KeyError)
    assert "pins no keys" in capsys.readouterr().err
