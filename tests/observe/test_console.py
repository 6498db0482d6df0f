"""The lines a person reads on the coordinator's console."""

from asagiri.observe.recorder import console_line


def test_a_fedbn_runs_test_line_puts_each_sites_own_model_first_and_labels_the_pool():
    scores = {"test_auc": 0.71, "test_accuracy": 0.8, "test_examples": 624, "test_sites": [1, 2],
              "test_site_auc": {"1": 0.906, "2": 0.854}, "test_auc_site_mean": 0.88}
    plain = console_line({"event": "TestScored", "scores": scores}, 3)
    assert plain.startswith("test  auc=0.7100") and "site 1" not in plain
    own, pooled = console_line({"event": "TestScored", "scores": {**scores, "personalised": True}}, 3).split("\n")
    assert "site 1 0.9060  site 2 0.8540" in own and "(mean 0.8800)" in own
    assert pooled.startswith("test  pooled over the sites' models, on their own scales: auc=0.7100")
