"""Our crypto wrappers against the libraries' own reference paths."""

from __future__ import annotations

import nacl.bindings
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from asagiri.wire.crypto import Keystream, StreamCipher, blake2b
from tests.sodium import sodium_chacha20poly1305_seal


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=300), person=st.binary(max_size=16), key=st.binary(max_size=64),
       size=st.integers(16, 64))
def test_blake2b_equals_libsodium_generichash(data, person, key, size):
    want = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        data, digest_size=size, key=key, person=person.ljust(16, b"\0")
    )
    assert blake2b(data, person=person, key=key, size=size) == want


@settings(max_examples=30, deadline=None)
@given(text=st.binary(max_size=2000), aad=st.binary(max_size=64), counter=st.integers(0, 2**64 - 1))
def test_aead_equals_libsodium(text, aad, counter):
    key = bytes(range(32))
    assert StreamCipher(key).seal(counter, text, aad) == sodium_chacha20poly1305_seal(key, counter, text, aad)


@pytest.mark.parametrize("algorithm,key", [("aes128-ctr", bytes(range(16))), ("chacha20", bytes(range(32)))])
def test_keystream_resumes_exactly_across_uneven_fills(algorithm, key):
    n = (1 << 20) + 4099
    whole = np.empty(n, dtype=np.uint8)
    Keystream(key, algorithm=algorithm).fill(memoryview(whole))
    parts = np.empty(n, dtype=np.uint8)
    ks = Keystream(key, algorithm=algorithm)
    for start, stop in [(0, 3), (3, 64), (64, 1000), (1000, 1001), (1001, n)]:
        ks.fill(memoryview(parts[start:stop]))
    assert parts.tobytes() == whole.tobytes()


def test_aes_keystream_is_aes_ctr_from_a_zero_counter():
    key = bytes(range(16))
    out = bytearray(100)
    Keystream(key, algorithm="aes128-ctr").fill(memoryview(out))
    ref = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(100))
    assert bytes(out) == ref


def test_keystream_refuses_wrong_key_sizes_and_unknown_ciphers():
    with pytest.raises(ValueError, match="16 bytes"):
        Keystream(bytes(32), algorithm="aes128-ctr")
    with pytest.raises(ValueError, match="32 bytes"):
        Keystream(bytes(16), algorithm="chacha20")
    with pytest.raises(ValueError, match="unknown keystream"):
        Keystream(bytes(32), algorithm="rc4")
