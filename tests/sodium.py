"""libsodium's own AEAD and deterministic keystream, through PyNaCl: the second library the
package's pyca/cryptography primitives are checked against."""

import nacl.bindings as sodium

from asagiri.wire.crypto import counter_nonce


def sodium_chacha20poly1305_seal(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return sodium.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, aad, counter_nonce(counter), key)


def sodium_keystream(key: bytes, length: int) -> bytes:
    """``randombytes_buf_deterministic``: ChaCha20-IETF under nonce "LibsodiumDRG"."""
    return sodium.randombytes_buf_deterministic(length, key)
