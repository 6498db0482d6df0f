"""A silent site is dropped, and rejoins once it answers again, with real processes on loopback.

The site's session answers heartbeats whatever its training thread does (``tests/test_liveness.py``
holds a site's worker past the heartbeat timeout and shows it is kept).  The other half: a site
process that is stopped (SIGSTOP: it sends nothing, as a frozen or cut-off machine would) is
dropped for its silence; let go on, it reconnects and takes part again (that the others go on
without a lost site: ``tests/e2e/test_federation.py``).  The test waits for the coordinator's
events, not for a time.
"""

from __future__ import annotations

import os
import signal

import pytest

from .harness import Federation

pytestmark = pytest.mark.e2e


def test_a_dropped_site_rejoins_the_next_attempt_once_it_answers_again(fed_factory):
    """Issue 28: a site dropped for its silence is not out of the run.  Three sites, all needed
    (min_clients=3): site 3 is stopped in round 2, dropped, and the attempt aborts; the next
    attempt waits for three sites, site 3 is let go on, reconnects, and takes part."""
    fed: Federation = fed_factory("rejoin", sites=3, rounds=2, batches=False, overrides=[
        "min_clients=3", "timeouts.heartbeat_timeout=4", "timeouts.fit=600", "timeouts.secagg_stage=600",
        "timeouts.wait_for_sites=600", "max_round_attempts=3",
    ])
    fed.start_coordinator()
    for site in (1, 2, 3):
        fed.start_site(site)
    fed.events(until="RoundCompleted")
    stopped = fed.sites[3]
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        dropped = fed.events_until(lambda e: e["event"] == "SiteDropped")
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    assert dropped[-1]["event"] == "SiteDropped" and dropped[-1]["site"] == 3, fed.logs()
    assert dropped[-1]["reason"] == "heartbeat timeout", dropped[-1]
    later = fed.events()
    assert any(e["event"] == "RoundAborted" and e["round"] == 2 for e in dropped + later), fed.logs()
    assert fed.summary()["status"] == "completed", fed.logs()
    assert [r["participants"] for r in fed.metrics()] == [[1, 2, 3], [1, 2, 3]]
    assert fed.wait_all()["site-3"] == 0, fed.logs()
