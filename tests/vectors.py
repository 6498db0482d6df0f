"""Load the protocol's test vectors (``protocol/vectors/*.json``)."""

import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())
