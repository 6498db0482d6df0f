import itertools
import os
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asagiri.secagg import shamir


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.data())
def test_any_t_shares_reconstruct(secret, data):
    n = data.draw(st.integers(1, 12))
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, n, t)
    subset = data.draw(st.permutations(shares)).__getitem__(slice(0, data.draw(st.integers(t, n))))
    assert shamir.reconstruct(subset, t) == secret


def test_t_minus_one_shares_reveal_nothing_field_level():
    """Over GF(13), t=3: for every secret, any 2 shares are uniform over GF(13)^2.

    The coefficients are enumerated exhaustively through the injected randomness, so this is the
    distribution itself, not a sample of it: t-1 shares are independent of the secret.
    """
    p, n, t = 13, 5, 3
    per_secret = {}
    for secret in range(p):
        dist: dict[tuple[int, int], Counter] = {}
        for a1, a2 in itertools.product(range(p), repeat=2):
            coeffs = iter([bytes([a1]), bytes([a2])])
            shares = shamir.split_int(secret, n, t, prime=p, rng=lambda k, c=coeffs: next(c))
            for i, j in itertools.combinations(range(n), 2):
                dist.setdefault((i, j), Counter())[(shares[i][1], shares[j][1])] += 1
        for pair, counter in dist.items():
            assert len(counter) == p * p and set(counter.values()) == {1}, pair
        per_secret[secret] = dist
    assert all(per_secret[s] == per_secret[0] for s in range(p))


def test_t_shares_do_determine_the_secret_field_level():
    p = 13
    shares = shamir.split_int(7, 5, 3, prime=p, rng=lambda k: bytes([4]))
    assert shamir.reconstruct_int(shares[1:4], 3, prime=p) == 7


def test_share_encoding_round_trip_and_rejects_garbage():
    share = shamir.split(os.urandom(32), 3, 2)[0]
    assert shamir.decode_share(shamir.encode_share(share)) == share
    with pytest.raises(ValueError):
        shamir.decode_share(b"\0" * 68)  # x = 0 is not a share index
    with pytest.raises(ValueError):
        shamir.decode_share(b"\0\1" + b"\xff" * 66)  # y >= p
    with pytest.raises(ValueError):
        shamir.split(b"short", 3, 2)
