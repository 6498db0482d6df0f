"""Issue 27, part 2: a coordinator that announces a wrong sum, against real ``asagiri-client``
processes and a scripted coordinator that holds the coordinator's key (SPEC §6.8).

It runs a round honestly through the unmask, announces the true sum plus one quantum in one
coordinate to every survivor, and relays the vouches they send.  Each site refuses the proof,
keeps it as a dispute, and declines the next round of the run for good.  The control announces
the true sum, in a run of its own: the sites adopt it and take part in the next round.
"""

from __future__ import annotations

import numpy as np
import pytest

from asagiri.causes import Rule
from asagiri.wire.messages import Decline, SumVouch

from .malicious import UNRECORDED_OK, Attacker, Round, next_round

pytestmark = pytest.mark.e2e

SITES = [1, 2, 3]


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    # each case is a new session of its run; none sends the round's record, which is not the subject
    with Attacker.running(tmp_path_factory.mktemp("verify"), SITES, policy=UNRECORDED_OK) as a:
        yield a


def announce_then_next_round(attacker: Attacker, run: str, shift: int) -> tuple[dict, dict, dict]:
    """One round whose announced sum is off by ``shift`` quanta in its first value; then, in a new
    session, the next round's start.  Returns (vouches, the next round's declines, its keys)."""

    def off_by_shift(site: int, total: np.ndarray) -> np.ndarray:
        lied = total.copy()
        lied[0] += np.array(shift, dtype=total.dtype)
        return lied

    async def lie(sessions):
        return await Round(attacker, sessions, SITES).announce(off_by_shift)

    async def next_one(sessions):
        rnd = Round(attacker, sessions, SITES, fit=attacker.fit_ins(next_round()))
        await rnd.start()
        return rnd.declines, rnd.keys

    vouches = attacker.case(lie, sites=SITES, run=run, timeout=120)
    declines, keys = attacker.case(next_one, sites=SITES, run=run, timeout=120)
    return vouches, declines, keys


def test_control_the_true_sum_is_adopted_and_the_run_goes_on(attacker):
    vouches, declines, keys = announce_then_next_round(attacker, "verify-control", 0)
    assert all(isinstance(m, SumVouch) for m in vouches.values())
    assert declines == {} and sorted(keys) == SITES


def test_a_sum_off_by_one_quantum_is_refused_and_the_sites_leave_the_run(attacker):
    vouches, declines, keys = announce_then_next_round(attacker, "verify-lie", 1)
    # they vouched (a vouch reveals nothing but a projection of the sum): the lie is caught at the
    # proof, which is answered with nothing, the coordinator's round being over
    assert all(isinstance(m, SumVouch) for m in vouches.values())
    assert not any(isinstance(m, Decline) for m in vouches.values())
    # and they leave the run: every later round is declined for good, naming the record rule
    assert keys == {}
    assert sorted(declines) == SITES and all(Rule(r) is Rule.RECORD for r in declines.values())
    for site in SITES:
        kept = [p.read_text() for p in (attacker.root / f"site-{site}").rglob("*") if p.is_file()]
        assert any("round_dispute" in t and "vouches do not add up to the announced sum" in t for t in kept), site
        assert "announced a sum its survivors' vouches refute" in attacker.log(site)
