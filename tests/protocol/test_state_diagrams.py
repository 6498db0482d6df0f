"""protocol/SPEC.md's state diagrams are drawn from the machines' tables, and the tables are the
machines' behaviour: a stale drawing fails here (tests/coordinator and tests/secagg hold the machines to the tables)."""

import dataclasses

import pytest

from asagiri.coordinator._states import PLAIN_ROUND, SECURE_ROUND
from asagiri.secagg._states import CLIENT_ACCEPTS, SERVER_ACCEPTS, ClientStage, ServerStage
from asagiri.wire.messages import KeyRoster, UnmaskResponse
from protocol.tools.state_diagrams import DIAGRAMS, SPEC, render, stale, update


@pytest.mark.parametrize("name", sorted(DIAGRAMS))
def test_spec_holds_the_diagram_drawn_from_the_table(name):
    text = SPEC.read_text()
    assert f"<!-- BEGIN generated: {name} -->\n{render(name)}<!-- END generated: {name} -->" in text, (
        f"run python -m protocol.tools.state_diagrams and review protocol/SPEC.md ({name})")


def test_a_changed_table_makes_the_block_stale(monkeypatch):
    text = SPEC.read_text()
    assert stale(text) == [] and update(text) == text
    table = dict(PLAIN_ROUND)
    table.pop(next(iter(table)))
    monkeypatch.setitem(DIAGRAMS, "round-phases-plain", dataclasses.replace(DIAGRAMS["round-phases-plain"], table=table))
    assert stale(text) == ["round-phases-plain"]
    assert stale(text.replace("<!-- BEGIN generated: site-secagg-stages -->", "")) == [
        "round-phases-plain", "site-secagg-stages"]


def test_the_tables_say_what_each_stage_takes():
    assert SERVER_ACCEPTS[ServerStage.UNMASK] == {UnmaskResponse}
    assert SERVER_ACCEPTS[ServerStage.DONE] == SERVER_ACCEPTS[ServerStage.ABORTED] == frozenset()
    assert KeyRoster in CLIENT_ACCEPTS[ClientStage.ADVERTISED]
    assert KeyRoster not in CLIENT_ACCEPTS[ClientStage.SHARED]
    assert set(PLAIN_ROUND.values()) == set(SECURE_ROUND.values())
