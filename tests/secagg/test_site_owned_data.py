"""The coordinator cannot choose what a site trains on (issue 26, attack 1), against real site
processes and a scripted coordinator that holds the coordinator's key.

The attack: ``Welcome.num_sites`` and ``site_index`` told a site to take 1/N of its own file, so
with N large its update was the gradient of a handful of images.  Now a site trains on its own
data whole, or on the simulated share its *own* config names; the Welcome's numbers change
nothing.  The view is the strongest an attacker can have: secure aggregation off (the site's
policy allows it, so its update arrives in the clear), and each update is compared with the
site's true update and with the tiny-share update the attack wanted, both computed here.
"""

from __future__ import annotations

import numpy as np
import pytest

from asagiri.causes import Rule
from asagiri.config import RunSpec, SiteConfig
from asagiri.params import flatten
from asagiri.site.worker import SiteWorker
from asagiri.wire.messages import Decline, FitRes, Welcome

from .malicious import RUN, SITES, UNRECORDED_OK, Attacker, next_round

pytestmark = pytest.mark.e2e

SITE = 6
TINY = 64  # the share the attack asks for: 1/64 of the file, a handful of training images
# in the clear, and with the exact count, so that the count is one more witness of what it trained on
PLAIN = {"require_secagg": False, "count": "exact"}


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    # every case is a new session of the same run, none sends a record: records are not the subject
    with Attacker.running(tmp_path_factory.mktemp("owned"), [], policy=UNRECORDED_OK) as a:
        a.spec = _plain(a)
        yield a


def _plain(attacker: Attacker) -> dict:
    spec = RunSpec.model_validate(attacker.spec)
    return spec.model_copy(update={"secagg": spec.secagg.model_copy(update={"enabled": False})}).wire()


def update_from(attacker: Attacker, fit, **settings) -> tuple[np.ndarray, int]:
    """``delta`` and ``n`` of a site whose config has ``settings``, computed here from ``fit``."""
    cfg = SiteConfig.model_validate({**attacker._site_settings(SITE), **settings})
    spec = RunSpec.model_validate(attacker.spec)
    worker = SiteWorker(cfg, Welcome(RUN, SITE - 1, SITES, attacker.spec), spec)
    delta, result = worker.train(fit)
    return flatten(delta).astype(np.float64), result.num_samples


def ask(attacker: Attacker, **site_settings):
    """Start the site with ``site_settings``, tell it it is share 0 of ``TINY``, ask for an update."""
    proc = attacker.start_site(SITE, **site_settings)
    attacker.welcome_indices = lambda site: (0, TINY)
    try:
        fit = attacker.fit_ins(next_round())

        async def script(sessions):
            await sessions[SITE].conn.send(fit)
            return await sessions[SITE].expect(timeout=120)

        return attacker.case(script, sites=[SITE], timeout=180), fit
    finally:
        attacker.welcome_indices = lambda site: (site - 1, SITES)
        proc.kill()
        proc.wait()


def test_a_welcome_cannot_shrink_a_sites_share(attacker):
    reply, fit = ask(attacker, policy=PLAIN)
    assert isinstance(reply, FitRes), reply
    sent = flatten(reply.update).astype(np.float64) / reply.num_samples
    own, n_own = update_from(attacker, fit)  # the share the site's own config names
    tiny, n_tiny = update_from(attacker, fit, simulation={"share": 0, "shares": TINY})
    assert reply.num_samples == n_own > 4 * n_tiny > 0
    assert np.allclose(sent, own, rtol=1e-4, atol=1e-6)
    # the update the attack wanted is not what came (the control below shows the test would see it)
    assert not np.allclose(sent, tiny, rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(sent - tiny)) > 100 * (1e-6 + 1e-4 * np.max(np.abs(tiny)))


def test_control_a_site_configured_with_a_tiny_share_sends_its_update(attacker):
    """The comparison can succeed: a site that itself holds a tiny share (and allows one with
    min_examples 1) sends exactly the tiny-share update, which the test recognises."""
    reply, fit = ask(attacker, policy={**PLAIN, "min_examples": 1},
                     simulation={"share": 0, "shares": TINY})
    assert isinstance(reply, FitRes), reply
    tiny, n_tiny = update_from(attacker, fit, simulation={"share": 0, "shares": TINY})
    assert reply.num_samples == n_tiny
    assert np.allclose(flatten(reply.update).astype(np.float64) / n_tiny, tiny, rtol=1e-4, atol=1e-6)


def test_a_site_holding_fewer_examples_than_its_floor_leaves_the_run(attacker):
    reply, _ = ask(attacker, policy=PLAIN, simulation={"share": 0, "shares": TINY})
    assert isinstance(reply, Decline) and reply.rule is Rule.MIN_EXAMPLES and reply.permanent
