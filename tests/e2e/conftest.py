"""The e2e tests' one fixture: federations that are always torn down, whatever the test did."""

import pytest

from .harness import Federation


@pytest.fixture
def fed_factory(tmp_path):
    """``make(name=None, **kw)``: a :class:`Federation` under ``tmp_path/name`` (``run<N>`` if no
    name), all of whose processes are killed when the test ends."""
    feds: list[Federation] = []

    def make(name: str | None = None, **kw) -> Federation:
        fed = Federation(tmp_path / (name or f"run{len(feds)}"), **kw)
        feds.append(fed)
        return fed

    yield make
    for fed in feds:
        fed.kill_all()
