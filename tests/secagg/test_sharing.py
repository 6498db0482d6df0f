"""Never both shares of one owner: ``HeldShares.reveal`` keeps the invariant on its own.

Through the site machine an honest-looking request cannot reach this guard (the survivor and
dropout lists must be disjoint, and the table takes one ``UnmaskRequest`` per round attempt;
``test_adversarial.test_asking_a_live_site_for_both_share_kinds_is_refused`` shows both), so
these tests reach it directly: a change that removes the guard fails here.
"""

import numpy as np
import pytest

from asagiri.policy import Refusal
from asagiri.secagg.client import ClientStage
from asagiri.secagg.server import ServerStage
from asagiri.secagg.sharing import BothShares, HeldShares
from asagiri.wire.messages import UnmaskRequest, UnmaskResponse

from .harness import Federation, ring_inputs


def held(*owners):
    shares = HeldShares()
    for o in owners:
        shares[o] = (b"b%d" % o, b"s%d" % o)
    return shares


def test_reveal_gives_the_b_share_of_survivors_and_the_key_share_of_dropped_sites():
    shares = held(1, 2, 3, 4)
    b_out, s_out = shares.reveal(survivors=[1, 2], dropped=[3])
    assert b_out == [[1, b"b1"], [2, b"b2"]] and s_out == [[3, b"s3"]]
    assert shares.revealed == {1: "b", 2: "b", 3: "s"}
    assert shares.reveal(survivors=[1, 2], dropped=[3]) == (b_out, s_out)  # the same again is no news


def test_never_both_shares_when_one_request_lists_an_owner_twice():
    shares = held(1, 2, 3)
    with pytest.raises(BothShares, match="site 2$") as exc:
        shares.reveal(survivors=[1, 2], dropped=[2])
    assert exc.value.owner == 2 and shares.revealed == {}  # nothing left


def test_never_both_shares_across_two_requests():
    shares = held(1, 2, 3)
    shares.reveal(survivors=[1, 2, 3], dropped=[])
    with pytest.raises(BothShares, match="site 2$"):
        shares.reveal(survivors=[1, 3], dropped=[2])
    assert shares.revealed == {1: "b", 2: "b", 3: "b"}

    shares = held(1, 2, 3)
    shares.reveal(survivors=[1, 3], dropped=[2])
    with pytest.raises(BothShares, match="site 2$"):
        shares.reveal(survivors=[1, 2, 3], dropped=[])


def test_a_site_whose_key_share_of_a_peer_left_never_reveals_its_seed_share():
    """The machine's own guard, on a state built directly: site 1 is SIGNED and its record says
    site 2's key share already left; an otherwise valid request for site 2's b share is refused."""
    fed = Federation(4, dim=16)
    rng = np.random.default_rng(7)
    inputs = ring_inputs(fed.ids, fed.dim, rng)
    queue = fed.advance(inputs, ServerStage.UNMASK)
    request = next(o.msg for o in queue if o.site == 1 and isinstance(o.msg, UnmaskRequest))
    site = fed.clients[1]
    assert site.stage is ClientStage.SIGNED and 2 in request.survivors
    site._round.held.revealed[2] = "s"
    with pytest.raises(Refusal, match="^stage: asked for both kinds of share of site 2$"):
        site.receive(request)
    assert site.stage is ClientStage.ABORTED

    fed = Federation(4, dim=16)
    queue = fed.advance(inputs, ServerStage.UNMASK)
    request = next(o.msg for o in queue if o.site == 1 and isinstance(o.msg, UnmaskRequest))
    [reply] = fed.clients[1].receive(request)  # the same request, without that record, is answered
    assert isinstance(reply, UnmaskResponse) and 2 in [o for o, _ in reply.b_shares]
