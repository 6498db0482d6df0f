"""Shamir t-of-n secret sharing over the prime field GF(p), p = 2**521 - 1, written by us.

Field and encoding:
- p is the Mersenne prime M521, so every 32-byte secret (an integer below 2**256, big-endian) is
  one field element and a secret is shared in one polynomial, with no splitting.
- A share is ``(x, y)``: x in 1..65535 is the holder's index (the runtime uses the holder's
  position among the sharing site's neighbours plus one) and y a field element, encoded as 66
  big-endian bytes.
- Polynomial coefficients are uniform in GF(p), drawn by rejection from 521-bit strings of the
  injected ``random_bytes`` (libsodium's CSPRNG in production), so t-1 shares are independent of
  the secret.  ``reconstruct`` is Lagrange interpolation at 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..wire.crypto import random_bytes as _csprng

__all__ = ["P", "SHARE_BYTES", "Share", "decode_share", "encode_share", "reconstruct", "reconstruct_int", "split", "split_int"]

P = (1 << 521) - 1
SHARE_BYTES = 66
SECRET_BYTES = 32
MAX_SHARES = 65535

Share = tuple[int, int]


def _random_element(rng: Callable[[int], bytes], prime: int) -> int:
    bits = prime.bit_length()
    while True:
        v = int.from_bytes(rng((bits + 7) // 8), "big") & ((1 << bits) - 1)
        if v < prime:
            return v


def split_int(secret: int, n: int, t: int, *, prime: int = P, rng: Callable[[int], bytes] = _csprng) -> list[Share]:
    """Field-level sharing of ``secret`` in GF(prime); :func:`split` is this with M521."""
    if not 0 <= secret < prime:
        raise ValueError("the secret must be a field element")
    if not 1 <= t <= n <= min(MAX_SHARES, prime - 1):
        raise ValueError(f"need 1 <= t <= n <= {MAX_SHARES}, got t={t}, n={n}")
    coeffs = [secret] + [_random_element(rng, prime) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % prime
        shares.append((x, y))
    return shares


def reconstruct_int(shares: Sequence[Share], t: int, *, prime: int = P) -> int:
    """Lagrange interpolation at 0 from the first ``t`` shares with distinct x."""
    pts = list({x: y for x, y in shares}.items())[:t]
    if len(pts) < t:
        raise ValueError(f"{len(pts)} distinct shares, {t} needed")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % prime
                den = den * (xi - xj) % prime
        secret = (secret + yi * num * pow(den, -1, prime)) % prime
    return secret


def split(secret: bytes, n: int, t: int, *, rng: Callable[[int], bytes] = _csprng) -> list[Share]:
    """``n`` shares at x = 1..n, any ``t`` of which reconstruct ``secret`` (32 bytes)."""
    if len(secret) != SECRET_BYTES:
        raise ValueError("secrets are exactly 32 bytes")
    return split_int(int.from_bytes(secret, "big"), n, t, rng=rng)


def reconstruct(shares: Sequence[Share], t: int) -> bytes:
    """The secret from any ``t`` shares with distinct x (extra shares are ignored)."""
    secret = reconstruct_int(shares, t)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: the result is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def encode_share(share: Share) -> bytes:
    x, y = share
    return x.to_bytes(2, "big") + y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> Share:
    if len(data) != 2 + SHARE_BYTES:
        raise ValueError("a share is 68 bytes")
    x, y = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")
    if not (1 <= x <= MAX_SHARES and y < P):
        raise ValueError("share out of range")
    return x, y
