"""Draw the state machines' transition tables into protocol/SPEC.md.

    python -m protocol.tools.state_diagrams          # rewrite SPEC.md's generated blocks
    python -m protocol.tools.state_diagrams --check  # exit 1 if a block differs from the tables

Each block sits between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``
and is drawn from one table (``asagiri/coordinator/_states.py``, ``asagiri/secagg/_states.py``),
as h11 draws its docs' diagrams from ``_state.py``.  Edit the tables, never the blocks:
``tests/protocol/test_state_diagrams.py`` fails while a block is stale.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from asagiri.coordinator._states import PLAIN_ROUND, SECURE_ROUND, Phase
from asagiri.secagg._states import CLIENT_TRANSITIONS, SERVER_TRANSITIONS, ClientStage, ServerStage
from asagiri.wire.messages import Message

__all__ = ["DIAGRAMS", "SPEC", "render", "stale", "update"]

SPEC = Path(__file__).resolve().parents[1] / "SPEC.md"


@dataclass(frozen=True)
class Diagram:
    table: Mapping[tuple[enum.Enum, type], enum.Enum]
    states: type[enum.Enum]
    source: str  # where the table lives


DIAGRAMS: dict[str, Diagram] = {
    "round-phases-plain": Diagram(PLAIN_ROUND, Phase, "asagiri/coordinator/_states.py: PLAIN_ROUND"),
    "round-phases-secure": Diagram(SECURE_ROUND, Phase, "asagiri/coordinator/_states.py: SECURE_ROUND"),
    "coordinator-secagg-stages": Diagram(SERVER_TRANSITIONS, ServerStage, "asagiri/secagg/_states.py: SERVER_TRANSITIONS"),
    "site-secagg-stages": Diagram(CLIENT_TRANSITIONS, ClientStage, "asagiri/secagg/_states.py: CLIENT_TRANSITIONS"),
}

_BLOCK = re.compile(r"(<!-- BEGIN generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- END generated: (?P=name) -->)",
                    re.S)


def render(name: str) -> str:
    """The block's text: one line per transition, grouped by the stage it leaves, the rows that hold
    in every stage last, then what the machine's own events mean."""
    d = DIAGRAMS[name]
    states = list(d.states)
    events = list(dict.fromkeys(event for _, event in d.table))
    everywhere = {e for e in events if all((s, e) in d.table for s in states)}
    rows: list[tuple[str, str, str]] = []
    for s in states:
        leaving = [(e, nxt) for (src, e), nxt in d.table.items() if src is s and e not in everywhere]
        rows += [(s.name, e.__name__, nxt.name) for e, nxt in leaving]
        if not leaving and not everywhere:
            rows.append((s.name, "", "(final)"))
    for e in events:
        if e in everywhere:
            targets = {d.table[(s, e)] for s in states}
            stays = all(d.table[(s, e)] is s for s in states)
            rows.append(("any stage", e.__name__, "(unchanged)" if stays else "/".join(t.name for t in targets)))
    sw = max(len(r[0]) for r in rows)
    ew = max(len(r[1]) for r in rows) + 2
    lines = [f"start: {states[0].name}", ""]
    for src, event, dst in rows:
        lines.append(f"{src:<{sw}}  {dst}" if not event else f"{src:<{sw}}  --{event:-<{ew}}-> {dst}")
    own = [e for e in events if not issubclass(e, Message)]
    if own:
        lines.append("")
        for e in own:
            lines.append(f"{e.__name__}: {' '.join((e.__doc__ or '').replace('``', '').split())}")
    body = "\n".join(_wrap(line, 100) for line in lines)
    return f"Drawn from `{d.source}` by `python -m protocol.tools.state_diagrams`.\n\n```text\n{body}\n```\n"


def _wrap(line: str, width: int) -> str:
    """Long legend lines wrapped, continued under their text."""
    if len(line) <= width or ": " not in line or line.startswith(" "):
        return line
    head, _, text = line.partition(": ")
    indent = " " * (len(head) + 2)
    out, cur = [], head + ":"
    for word in text.split():
        if len(cur) + 1 + len(word) > width:
            out.append(cur)
            cur = indent + word
        else:
            cur += " " + word
    return "\n".join([*out, cur])


def update(text: str) -> str:
    """``text`` with every generated block redrawn from its table."""
    return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def stale(text: str) -> list[str]:
    """The generated blocks of ``text`` that differ from their tables, and the diagrams it lacks."""
    found = {m.group("name"): m.group("body") for m in _BLOCK.finditer(text)}
    return [name for name in DIAGRAMS if found.get(name) != render(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = SPEC.read_text()
    if args.check:
        bad = stale(text)
        for name in bad:
            print(f"stale or missing: {name}", file=sys.stderr)
        return 1 if bad else 0
    missing = [name for name in DIAGRAMS if f"<!-- BEGIN generated: {name} -->" not in text]
    if missing:
        print(f"SPEC.md has no block for {missing}: add its BEGIN/END markers first", file=sys.stderr)
        return 1
    SPEC.write_text(update(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
