"""Fuzz targets: every decoder and sans-IO state machine a peer can reach, each fed raw bytes.

A target returns quietly when its input is handled, whether accepted or refused with the error
the code documents for a peer's fault (``RemoteProtocolError``, ``SiteRefused``, ``Refusal``,
``ProtocolViolation``); any other exception is a bug the fuzzer reports.  The same functions run
under atheris (``tests/fuzz/run.py``, coverage-guided) and over the kept corpus in pytest
(``tests/fuzz/test_fuzz.py``), so a crash once found stays a regression test.

The state-machine targets start from one honest secure-aggregation round of three sites whose
randomness is a fixed keystream (as in the protocol vectors), so the messages of that round,
kept in the corpus, are accepted as they are: mutating them reaches every stage, not only the
first check.  Their input is a sequence of records ``u8 who ‖ u32 length ‖ plain encoding`` of
messages (``who``: the sending site for the coordinator's machine; ignored for a site's).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from asagiri.config import PolicyConfig, SecAggConfig
from asagiri.policy import Refusal, SitePolicy
from asagiri.secagg.client import ClientStateMachine
from asagiri.secagg.inmemory import LocalRound
from asagiri.secagg.server import ProtocolViolation, ServerStateMachine
from asagiri.signedlog import RECEIPT_DOMAIN, SignedLog
from asagiri.site.receipts import RoundWitness
from asagiri.wire import codec
from asagiri.wire.channel import ClientHandshake, SecureChannel, ServerHandshake, SiteRefused
from asagiri.wire.crypto import AuthenticationFailed, EphemeralKey, Identity, SessionKeys
from asagiri.wire.errors import RemoteProtocolError
from asagiri.wire.framing import FrameDecoder
from asagiri.wire.messages import Message, RoundRecord
from protocol.tools.secagg_vectors import deterministic_rng

__all__ = ["COORDINATOR", "IDENTITIES", "RUN", "TARGETS", "encode_sequence", "handshake_parts", "honest_round",
           "messages_in"]

MAX_PAYLOAD = 1 << 20
SITES = (1, 2, 3)
TARGET_SITE = 1
RUN = "fuzz-run"


def _seed(byte: int) -> bytes:
    return bytes([byte]) * 32


IDENTITIES = {i: Identity.from_seed(_seed(i)) for i in SITES}
COORDINATOR = Identity.from_seed(_seed(0x40))
SECAGG = SecAggConfig(mode="complete", bits=32, clip=1.0, max_samples_per_site=1000)
POLICY = PolicyConfig(min_participants=2, min_group=2)


# -- input format -----------------------------------------------------------------------------------


def messages_in(data: bytes) -> Iterator[tuple[int, Message | None]]:
    """The records of a state-machine input; a record that does not decode yields None."""
    pos = 0
    while pos + 5 <= len(data):
        who, n = data[pos], int.from_bytes(data[pos + 1 : pos + 5], "big")
        raw = data[pos + 5 : pos + 5 + n]
        pos += 5 + n
        try:
            yield who, codec.decode(raw, max_payload_bytes=MAX_PAYLOAD)
        except RemoteProtocolError:
            yield who, None


def encode_sequence(items: list[tuple[int, Message]]) -> bytes:
    out = bytearray()
    for who, msg in items:
        raw = codec.encode(msg)
        out += bytes([who]) + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


# -- the honest round the state-machine targets start from ---------------------------------------------


def _client(site: int) -> ClientStateMachine:
    pubs = {i: k.public for i, k in IDENTITIES.items()}
    return ClientStateMachine(site_id=site, identity=IDENTITIES[site], run_id=RUN, secagg=SECAGG,
                              spec_digest=_round().spec_digest, policy=SitePolicy(POLICY, pubs),
                              random_bytes=deterministic_rng(_seed(0x80 + site)))


@functools.cache
def _round() -> LocalRound:
    return LocalRound(ids=list(SITES), dim=6, secagg=SECAGG, identities=IDENTITIES, run_id=RUN, rnd=1,
                      min_clients=2, policy=functools.partial(SitePolicy, POLICY), clients={})


def _inputs() -> dict[int, tuple[np.ndarray, int]]:
    return {i: (np.linspace(-0.5, 0.5, 6, dtype=np.float32) * i, 10 * i) for i in SITES}


@functools.cache
def honest_round() -> tuple[list[tuple[int, Message]], list[tuple[int, Message]]]:
    """(what the coordinator sent site 1, what every site sent the coordinator) in an honest round."""
    base = _round()
    fed = LocalRound(ids=list(SITES), dim=6, secagg=SECAGG, identities=IDENTITIES, run_id=RUN, rnd=1,
                     min_clients=2, policy=functools.partial(SitePolicy, POLICY), clients={i: _client(i) for i in SITES})
    assert fed.spec_digest == base.spec_digest
    to_site: list[tuple[int, Message]] = []
    original = fed._step

    def step(out, pending):  # type: ignore[no-untyped-def]
        if out.site == TARGET_SITE:
            to_site.append((0, out.msg))
        return original(out, pending)

    fed._step = step  # type: ignore[method-assign]
    server = fed.deliver(_inputs())
    assert server.result is not None
    return to_site, list(fed.sent)


def _fresh_client() -> ClientStateMachine:
    client = _client(TARGET_SITE)
    client.receive(_round().fit)
    return client


def _fresh_server() -> ServerStateMachine:
    pubs = {i: k.public for i, k in IDENTITIES.items()}
    server = ServerStateMachine(params=_round().params, min_clients=2, identities=pubs)
    server.start()
    return server


# -- targets ------------------------------------------------------------------------------------------


def frame_decoder(data: bytes) -> None:
    """Bytes off a socket, in the pieces the first byte chooses."""
    decoder = FrameDecoder(max_frame_size=1024)
    step = max(1, data[0]) if data else 1
    try:
        for i in range(1, len(data), step):
            for frame in decoder.feed(data[i : i + step]):
                decoder.recycle(frame)
    except RemoteProtocolError:
        pass


def message_decoder(data: bytes) -> None:
    try:
        codec.decode(data, max_payload_bytes=MAX_PAYLOAD)
    except RemoteProtocolError:
        pass


def handshake_parts() -> tuple[ServerHandshake, ClientHandshake]:
    """Both sides of a handshake with fixed ephemeral keys (site 1 and the coordinator)."""
    server = ServerHandshake(COORDINATOR, {i: k.public for i, k in IDENTITIES.items()},
                             ephemeral=EphemeralKey(_seed(0x41)))
    client = ClientHandshake(IDENTITIES[1], 1, COORDINATOR.public, ephemeral=EphemeralKey(_seed(0x42)),
                             nonce=bytes(16))
    return server, client


def handshake(data: bytes) -> None:
    """``0x00 ‖ u16 n ‖ ClientHello (n bytes) ‖ ClientAuth`` to the coordinator's side, or
    ``0x01 ‖ ServerHello`` to the site's."""
    server, client = handshake_parts()
    try:
        if data[:1] == b"\x00" and len(data) >= 3:
            n = int.from_bytes(data[1:3], "big")
            server.receive_hello(data[3 : 3 + n])
            server.receive_auth(data[3 + n :])
        elif data[:1] == b"\x01":
            client.receive(data[1:])
    except (RemoteProtocolError, SiteRefused, AuthenticationFailed):
        pass


_KEYS = SessionKeys(tx=_seed(0x51), rx=_seed(0x52))


def channel(data: bytes) -> None:
    """Decrypted frames of a session: ``u8 kind ‖ u16 length ‖ plaintext`` records, sealed here with
    the sender's key, so the fuzzer reaches the header and chunk logic past the AEAD."""
    sender = SecureChannel(SessionKeys(tx=_KEYS.rx, rx=_KEYS.tx), max_frame_size=4096, max_payload_bytes=MAX_PAYLOAD,
                           chunk_bytes=1024)
    receiver = SecureChannel(_KEYS, max_frame_size=4096, max_payload_bytes=MAX_PAYLOAD, chunk_bytes=1024)
    pos = 0
    try:
        while pos + 3 <= len(data):
            kind, n = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big")
            plaintext = data[pos + 3 : pos + 3 + n]
            pos += 3 + n
            frame = sender._seal_frame(kind, plaintext)
            receiver.receive_frame(bytes(frame[4:]))
    except RemoteProtocolError:
        pass


def secagg_client(data: bytes) -> None:
    """A site's secure-aggregation machine, after the round's FitIns, fed the coordinator's messages."""
    client = _fresh_client()
    delta, n = _inputs()[TARGET_SITE]
    for _, msg in messages_in(data):
        if msg is None:
            continue
        try:
            client.receive(msg)
            if client.stage.value == "ready":
                client.set_input(delta, n, trained_on=(_round().params.params_digest, {}))
        except Refusal:
            return  # a site that refused says nothing more in the round


LOST = 0x80  # who = LOST + site: that site's connection is gone
DEADLINE = 0xFF  # who = DEADLINE: the stage's deadline passes


def secagg_server(data: bytes) -> None:
    """The coordinator's machine fed the sites' messages (``who``: the sending site, any id), with
    sites lost and deadlines passing where the input says."""
    server = _fresh_server()
    for who, msg in messages_in(data):
        if server.finished:
            return
        try:
            if who == DEADLINE:
                server.stage_timed_out()
            elif who > LOST:
                server.site_lost(who - LOST)
            elif msg is not None:
                server.receive(who, msg)
        except ProtocolViolation:
            server.site_lost(who)  # the runtime closes a violating site's channel


@functools.cache
def _witness_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="asagiri-fuzz-"))


def round_record(data: bytes) -> None:
    """A site's check of the coordinator's signed record of a round."""
    path = _witness_dir() / "receipts.jsonl"
    path.unlink(missing_ok=True)
    policy = SitePolicy(POLICY, {i: k.public for i, k in IDENTITIES.items()})
    witness = RoundWitness(SignedLog(path, IDENTITIES[1], domain=RECEIPT_DOMAIN), COORDINATOR.public, 1, policy)
    witness.evaluated(RUN, 1, "00" * 32, {})
    try:
        witness.record(RUN, RoundRecord(1, data[:MAX_PAYLOAD]))
    except Refusal:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frame_decoder": frame_decoder,
    "message_decoder": message_decoder,
    "handshake": handshake,
    "channel": channel,
    "secagg_client": secagg_client,
    "secagg_server": secagg_server,
    "round_record": round_record,
}
