"""Regenerate ``protocol/vectors/*.json`` from fixed inputs, with the package's own code.

    python -m protocol.tools.generate_vectors          # write the files
    python -m protocol.tools.generate_vectors --check  # exit 1 if a file differs from what the package makes

Every value is deterministic: identities from fixed seeds, ephemeral keys from fixed secrets, the
CSPRNG replaced by a fixed keystream.  ``tests/protocol/test_vectors_product.py`` checks that the
package still produces every file byte for byte, and ``tests/protocol/test_spec_independent.py``
recomputes them from protocol/SPEC.md alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .derived_vectors import derived_vectors
from .record_vectors import record_vectors
from .secagg_vectors import binding_vector, deterministic_rng, round_vectors, secagg_vectors, shamir_vectors
from .wire_vectors import aead_vectors, frame_vectors, handshake_vector, keystream_vectors, message_vectors

__all__ = ["OUT", "VECTORS", "deterministic_rng", "render"]

OUT = Path(__file__).resolve().parents[1] / "vectors"

VECTORS: dict[str, Callable[[], Any]] = {
    "messages.json": message_vectors,
    "handshake.json": handshake_vector,
    "frames.json": frame_vectors,
    "aead.json": aead_vectors,
    "keystream.json": keystream_vectors,
    "shamir.json": shamir_vectors,
    "secagg.json": secagg_vectors,
    "binding.json": binding_vector,
    "secagg_round.json": round_vectors,
    "record.json": record_vectors,
    "derived.json": derived_vectors,
}


def render(name: str) -> str:
    return json.dumps(VECTORS[name](), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for name in VECTORS:
        text = render(name)
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print("wrote", path)
    for name in stale:
        print(f"{name}: differs from what the package produces", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
