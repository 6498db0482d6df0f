"""The seed corpus: valid inputs for every target, made from the protocol vectors and one honest
round, so fuzzing starts past the first checks.  ``python -m tests.fuzz.seeds`` rewrites
``tests/fuzz/corpus/<target>/seed-*``; inputs the fuzzer found (``crash-*`` turned regression,
or new coverage kept on purpose) live beside them and are never rewritten."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from asagiri.signedlog import SignedLog, line_of
from asagiri.wire import codec
from asagiri.wire.channel import FRAME_CHUNK, FRAME_HEADER
from asagiri.wire.framing import encode_frame
from asagiri.wire.messages import EvaluateIns, FitIns, Heartbeat, Shutdown

from .targets import COORDINATOR, RUN, TARGETS, encode_sequence, handshake_parts, honest_round

CORPUS = Path(__file__).parent / "corpus"
VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def _plain_messages() -> list[bytes]:
    return [bytes.fromhex(m["encoded_hex"]) for m in json.loads((VECTORS / "messages.json").read_text())]


def _channel_records() -> list[bytes]:
    """A header frame, then its chunks, as ``u8 kind ‖ u16 length ‖ plaintext`` records."""
    out = []
    fit = FitIns(1, 1, {"w": np.arange(10, dtype="<f4"), "b": np.ones(3, "<f4")}, {"mu": 0.0, "seed": 1})
    for msg in (Heartbeat(3), fit, EvaluateIns(1, fit.params, "val"), Shutdown("done", True)):
        header, arrays = codec.encode_header(msg)
        records = [(FRAME_HEADER, header)] + [(FRAME_CHUNK, a.tobytes()) for a in arrays if a.nbytes]
        out.append(b"".join(bytes([k]) + len(p).to_bytes(2, "big") + p for k, p in records))
    return out


def _handshakes() -> list[bytes]:
    server, client = handshake_parts()
    hello = client.hello()
    server_hello = server.receive_hello(hello)
    auth = client.receive(server_hello)
    return [b"\x00" + len(hello).to_bytes(2, "big") + hello + auth, b"\x01" + server_hello]


def _record() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        log = SignedLog(Path(tmp) / "audit.jsonl", COORDINATOR)
        rec = log.append("round_completed", run_id=RUN, log_id="ab" * 32, started=1, round=1, attempt=1, selected=[1, 2, 3], participants=[2, 3],
                         dropped=[1], declined={}, model_sha256="00" * 32, epsilon={}, noise_multiplier={})
    return line_of(rec)


def seeds() -> dict[str, list[bytes]]:
    to_site, from_sites = honest_round()
    plain = _plain_messages()
    return {
        "frame_decoder": [b"\x05" + b"".join(encode_frame(m, max_frame_size=1024) for m in plain if len(m) < 1000)],
        "message_decoder": plain,
        "handshake": _handshakes(),
        "channel": _channel_records(),
        "secagg_client": [encode_sequence(to_site), encode_sequence(to_site[:2])],
        "secagg_server": [encode_sequence(from_sites), encode_sequence([*from_sites[:6], (0xFF, from_sites[0][1])])],
        "round_record": [_record()],
    }


def write() -> None:
    for target, inputs in seeds().items():
        assert target in TARGETS
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for i, data in enumerate(inputs):
            (folder / f"seed-{i}").write_bytes(data)
    print(f"wrote the seeds of {len(TARGETS)} targets under {CORPUS}", file=sys.stderr)


if __name__ == "__main__":
    write()
