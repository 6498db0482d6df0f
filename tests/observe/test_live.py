"""The coordinator's live console, fed the events of a real (in-memory) federation; and the
machine-readable log format."""

import io
import json
import logging

import anyio
import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from asagiri.cli.common import JsonLines
from asagiri.local import lay_out, run_local
from asagiri.observe.live import LiveView
from asagiri.observe.metrics import CoordinatorMetrics

FAST = ["data.dataset=synthetic", "data.synthetic_samples=192", "data.partition.scheme=iid", "model.width=8",
        "train.local_steps=5", "timeouts.heartbeat_timeout=10"]


def test_the_live_view_follows_rounds_stages_sites_and_metrics(tmp_path):
    cfg, sites = lay_out(tmp_path, sites=3, rounds=2, overrides=FAST)
    screen = io.StringIO()
    view = LiveView([s.id for s in cfg.sites], cfg.rounds, Console(file=screen, force_terminal=True, color_system=None, width=100))
    anyio.run(lambda: run_local(cfg, sites, watchers=[view]))
    out = screen.getvalue()
    assert "round 2/2" in out and "stage" in out
    assert "fit/masked_input" in out  # a secure-aggregation stage was shown
    assert "contributed" in out and "auc=" in out
    assert "round 1/2  participants=[1, 2, 3]" in out  # the plain lines are printed above the view
    assert not view.live.is_started  # it closed at FederationEnded
    assert all(view.state[s] == "contributed" for s in (1, 2, 3))


def test_json_log_lines_are_one_object_each():
    record = logging.LogRecord("asagiri.coordinator", logging.WARNING, __file__, 1, "site %d dropped", (3,), None)
    line = JsonLines("coordinator").format(record)
    assert json.loads(line) == {"time": round(record.created, 3), "process": "coordinator", "level": "warning",
                                "logger": "asagiri.coordinator", "message": "site 3 dropped"}


def test_a_sites_free_text_never_becomes_a_new_metric_label():
    """A Decline's rule and an abort's cause come from closed sets: a site cannot grow the label set."""
    from asagiri.causes import AbortCause, Rule
    from asagiri.wire.codec import decode, encode
    from asagiri.wire.errors import RemoteProtocolError
    from asagiri.wire.messages import Decline, MessageError

    body = encode(Decline(1, 1, Rule.MIN_PARTICIPANTS, False))
    assert decode(body, max_payload_bytes=0).rule is Rule.MIN_PARTICIPANTS
    forged = body.replace(b"min_participants", b"min_participantz")
    with pytest.raises(RemoteProtocolError, match="rule must be one of"):
        decode(forged, max_payload_bytes=0)
    with pytest.raises(MessageError):
        Decline(1, 1, "policy min_participants", False)  # the old prose form is not a rule
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    labels = {s.labels.get("kind") for m in registry.collect() if m.name == "asagiri_refusals" for s in m.samples}
    assert labels >= {str(r) for r in Rule}
    aborted = {s.labels.get("cause") for m in registry.collect() if m.name == "asagiri_rounds_aborted"
               for s in m.samples}
    assert aborted >= {str(c) for c in AbortCause}
    del metrics


def test_the_sites_training_bar_is_drawn_by_the_event_loop_from_the_training_thread():
    from asagiri.client.progress import TrainingProgress

    screen = io.StringIO()
    bar = TrainingProgress(Console(file=screen, force_terminal=True, color_system=None, width=100))

    async def main():
        on_step = bar.round(3, 250)
        await anyio.to_thread.run_sync(lambda: [on_step(i) for i in range(1, 251)])
        bar.finish()

    anyio.run(main)
    out = screen.getvalue()
    assert "round 3: local training" in out and "250/250" in out
    assert out.count("/250") <= 110  # drawn once per percent, not once per step


def test_training_reports_every_step_it_makes():
    import torch

    from asagiri.data.loaders import Split
    from asagiri.models import build
    from asagiri.train import train_local

    torch.manual_seed(0)
    data = Split(torch.randn(50, 1, 28, 28), torch.randint(0, 2, (50,)))
    seen = []
    result = train_local(build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2), data,
                         epochs=2, batch_size=16, lr=1e-3, augment=False, on_step=seen.append)
    assert seen == list(range(1, result.steps + 1)) and result.steps == 8
