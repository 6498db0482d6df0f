"""The coordinator's side of derived models (SPEC §6.9): the verified sums of recorded rounds,
kept in ``run_dir/sums``, sent to a site that says (``ModelAt``) it holds an older model, once a
session; the round's ``SumRecord`` to every evaluator that was not a survivor, before the model
it is to evaluate; an evaluation declined for a model the site did not derive."""

from __future__ import annotations

from functools import partial

import anyio
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from asagiri.causes import Rule
from asagiri.config import FederationConfig, PolicyConfig, SecAggConfig
from asagiri.coordinator.driver import FederationDriver
from asagiri.coordinator.round import Phase, ProtocolViolation, RoundMachine
from asagiri.coordinator.sessions import Sessions
from asagiri.observe.metrics import CoordinatorMetrics
from asagiri.observe.sums import SumHistory
from asagiri.policy import SitePolicy
from asagiri.secagg.inmemory import LocalRound
from asagiri.strategy.base import FedAvg
from asagiri.wire.messages import Decline, EvaluateIns, EvaluateRes, ModelAt, SumRecord

SIG = bytes(64)


def record(rnd: int, size: int = 5) -> SumRecord:
    return SumRecord(rnd, 1, [1, 2, 3], {"seed": rnd}, [1, 2, 3], {"s": np.arange(size, dtype="<u4") + rnd},
                     [[s, bytes(24), SIG] for s in (1, 2, 3)])


def test_the_history_keeps_recorded_sums_in_order_and_forgets_uncommitted_ones(tmp_path):
    history = SumHistory(tmp_path / "sums", vector_len=1 << 13)
    assert list(history.after(0)) == []  # no folder yet
    for rnd in (3, 1, 2):
        history.keep(record(rnd))
    assert [r.round for r in history.after(0)] == [1, 2, 3]
    assert [r.round for r in history.after(2)] == [3]
    got = next(history.after(1))
    assert np.array_equal(got.total["s"], record(2).total["s"]) and got.vouches == record(2).vouches
    history.keep(record(1_000_000))  # past six digits: still found, and in order
    assert [r.round for r in history.after(2)] == [3, 1_000_000]
    (tmp_path / "sums" / "round-1000000.msg").unlink()
    history.forget_after(1)  # a resumed run whose checkpoint is at round 1
    assert [r.round for r in history.after(0)] == [1]
    # a damaged file stops the history there (a site behind it cannot be brought past it)
    history.keep(record(2))
    history.keep(record(3))
    (tmp_path / "sums" / "round-000002.msg").write_bytes(b"\x00\x00")
    assert [r.round for r in history.after(0)] == [1]


def driver_with_sums(tmp_path) -> tuple[FederationDriver, Sessions]:
    """A driver, with no site connected, whose history holds the sums of rounds 1 and 2."""
    cfg = FederationConfig.model_validate({"rounds": 3})
    sessions = Sessions(cfg.timeouts, CoordinatorMetrics(CollectorRegistry()), capacity=8)
    driver = FederationDriver(cfg, sessions, lambda event: None, initial={"w": np.zeros(4, np.float32)},
                              checkpoint=tmp_path / "checkpoint.npz")
    for rnd in (1, 2):
        driver.sums.keep(record(rnd))
    return driver, sessions


def test_a_site_gets_the_sums_it_missed_once_a_session(tmp_path):
    driver, sessions = driver_with_sums(tmp_path)
    sent: list = []

    async def send(outbound):
        sent.extend((o.site, o.msg.round) for o in outbound)

    sessions.send = send  # type: ignore[method-assign]
    sessions.connected = lambda: {3}  # type: ignore[method-assign]
    sessions._opened[3] = 1
    anyio.run(driver.catch_up.answer, 3, ModelAt(0, bytes(32)))
    anyio.run(driver.catch_up.answer, 3, ModelAt(0, bytes(32)))  # again in the same session: nothing more
    assert sent == [(3, 1), (3, 2)]
    sessions._opened[3] = 2  # it reconnected, between rounds: answered, not taken for a violation
    dropped: list[int] = []
    sessions.drop = dropped.append  # type: ignore[method-assign]
    anyio.run(driver._handle_idle, 3, ModelAt(1, bytes(32)))
    assert sent == [(3, 1), (3, 2), (3, 2)] and dropped == []


def test_a_reconnecting_site_has_one_catch_up_at_a_time(tmp_path):
    """A red-team finding: a site that reads nothing and reconnects again and again piled up one
    blocked catch-up per session, each holding a sum.  A new session's catch-up cancels the last."""
    driver, sessions = driver_with_sums(tmp_path)
    blocked = []

    async def stuck(outbound):  # the site reads nothing: every send waits
        blocked.append(outbound[0].msg.round)
        try:
            await anyio.sleep_forever()
        finally:
            blocked.remove(outbound[0].msg.round)

    sessions.send = stuck  # type: ignore[method-assign]
    sessions.connected = lambda: {3}  # type: ignore[method-assign]

    async def scenario():
        async with anyio.create_task_group() as tg:
            driver.catch_up.background = tg
            for session in range(1, 6):
                sessions._opened[3] = session
                await driver.catch_up.answer(3, ModelAt(0, bytes(32)))
                await anyio.wait_all_tasks_blocked()
                assert blocked == [1] and len(driver.catch_up.sending) == 1, (session, blocked)
            tg.cancel_scope.cancel()

    anyio.run(scenario)
    assert blocked == [] and driver.catch_up.sending == {}


def secure_round(evaluators):
    """A round machine whose secure-aggregation machine ran an honest round of sites 1-3."""
    fed = LocalRound(ids=[1, 2, 3], dim=4, secagg=SecAggConfig(), min_clients=3,
                     policy=partial(SitePolicy, PolicyConfig(require_batches=False)))
    rng = np.random.default_rng(0)
    params = {"w": np.zeros(4, np.float32)}
    m = RoundMachine(rnd=1, attempt=1, selected=[1, 2, 3], evaluators=evaluators, min_clients=3,
                     global_params=params, fit_config={}, strategy=FedAvg(FederationConfig(), params),
                     secagg=fed.server)
    m.start()
    fed.deliver({i: (rng.normal(0, 0.05, 4).astype(np.float32), 8) for i in fed.ids})
    return m, fed


def test_an_evaluator_that_was_not_a_survivor_is_sent_the_sum_before_the_model(tmp_path):
    m, fed = secure_round([1, 2, 3, 4])
    out = m._finish_secure_fit()
    assert m.phase is Phase.EVALUATE
    to_4 = [o.msg for o in out if o.site == 4]
    assert [type(x) for x in to_4] == [SumRecord, EvaluateIns]
    rec = to_4[0]
    assert rec.survivors == [1, 2, 3] and rec.participants == [1, 2, 3]
    assert np.array_equal(rec.total["s"], fed.server.result.total) and rec.vouches == fed.server.result.vouches
    assert m.outcome.sum_record == rec and m.outcome.sum_sent == [4]
    assert all(not isinstance(o.msg, SumRecord) for o in out if o.site != 4)
    # site 4 will not evaluate a model it did not derive: the round goes on without its metrics
    for site in (1, 2, 3):
        m.receive(site, EvaluateRes(1, "val", 10, {"auc": 0.5}))
    assert m.phase is Phase.EVALUATE
    m.receive(4, Decline(1, 0, Rule.DERIVE_MODELS, False))
    assert m.phase is Phase.DONE and 4 not in m.outcome.site_eval and 4 not in m.outcome.declined
    with pytest.raises(ProtocolViolation):
        m.receive(4, Decline(1, 0, Rule.DERIVE_MODELS, False))  # a second answer


def test_an_evaluation_decline_nobody_asked_for_is_a_violation():
    m, _ = secure_round([1, 2, 3])
    with pytest.raises(ProtocolViolation):
        m.receive(1, Decline(1, 0, Rule.DERIVE_MODELS, False))  # still in FIT
    with pytest.raises(ProtocolViolation):
        m.receive(1, Decline(2, 0, Rule.DERIVE_MODELS, False))  # a round not begun
