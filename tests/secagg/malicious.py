"""A scripted malicious coordinator: the coordinator's real key and the real wire protocol
(``asagiri.wire``), as an attacker who runs modified coordinator code would have them, facing real
``asagiri-client`` processes on loopback.

``Attacker.case(script)`` opens the listener, takes the sites' connections, sends each a Welcome,
and runs ``script`` against them; afterwards every site is told the session is over (not the
federation), so the same site processes serve the next case.  Each site's *true* update is
computed here with :class:`~asagiri.site.SiteWorker` from the same config, the same FitIns and the
same seed, so a test can check that what the attacker unmasked is not that update.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
import yaml

from asagiri.causes import Rule
from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SiteConfig
from asagiri.params import flatten
from asagiri.policy import SitePolicy
from asagiri.secagg import shamir
from asagiri.secagg.binding import RoundParams, params_digest, spec_digest, survivors_message
from asagiri.secagg.client import ClientStateMachine
from asagiri.secagg.graph import graph_seed, neighbours
from asagiri.secagg.masking import pair_seed, sign
from asagiri.secagg.prg import expand
from asagiri.secagg.server import SecAggResult, ServerStage, ServerStateMachine
from asagiri.site import SiteWorker
from asagiri.wire.channel import SiteRefused
from asagiri.wire.connection import Connection, accept_handshake
from asagiri.wire.crypto import EphemeralKey, Identity
from asagiri.wire.errors import ConnectionLost, RemoteProtocolError
from asagiri.wire.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySig,
    Decline,
    FitIns,
    Heartbeat,
    KeyRoster,
    MaskedInput,
    Message,
    SecAggStart,
    ShareDelivery,
    ShareKeys,
    Shutdown,
    SumAnnounce,
    SumProof,
    SumVouch,
    UnmaskRequest,
    UnmaskResponse,
    Welcome,
)

RUN = "attack-run"
SITES = 6  # enrolled; the module's fixture runs five, a sixth starts with its own policy
# The spec every case starts from: three sites in a complete 2-of-3 graph as `asagiri demo` lays
# them out; five sites give a SecAgg+ ring of degree 2.
FED = FederationConfig.model_validate({
    "run_id": RUN, "rounds": 100, "min_clients": 2,
    "data": {"dataset": "synthetic", "synthetic_samples": 320, "partition": {"scheme": "iid"}},
    "model": {"width": 8},
    "secagg": {"mode": "sparse", "shares": 3, "threshold": 2},
    "timeouts": {"heartbeat_interval": 1, "heartbeat_timeout": 120, "secagg_stage": 30},
})


# Site policy for a harness whose cases each open a new session and take sums without sending
# their records: a site excuses that (max_unrecorded) only so often in a run.
UNRECORDED_OK = {"max_unrecorded": 1 << 20}
# The harness's spec cuts no participation batches, so that each case meets the one defence it
# is about (a batch rule would refuse most of them first): the sites allow that.  The batch rule
# is tested on its own, with the default policy, in test_batches_attack.py.
NO_BATCHES = {"require_batches": False}
# ... and it sends whatever model a case needs: the sites take it.  The rule that they train and
# evaluate only models they derived is tested on its own, with the default policy, in
# test_derived_attack.py.
FOREIGN_MODELS = {"derive_models": False}

_rounds = itertools.count(1)


def next_round() -> int:
    """Round numbers only go up across a module's cases: the sites refuse a replayed round."""
    return next(_rounds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """One site's connection, with its messages queued for the script."""

    def __init__(self, site: int, conn: Connection) -> None:
        self.site = site
        self.conn = conn
        self.send_q, self.recv_q = anyio.create_memory_object_stream[Message](64)
        self.closed = anyio.Event()

    async def read(self) -> None:
        try:
            while True:
                msg = await self.conn.receive()
                if not isinstance(msg, Heartbeat):
                    await self.send_q.send(msg)
        except (ConnectionLost, RemoteProtocolError):
            self.closed.set()

    async def expect(self, timeout: float = 30) -> Message:
        with anyio.fail_after(timeout):
            return await self.recv_q.receive()


class ColludingSite:
    """An enrolled site that works with the coordinator: the attacker holds its identity key and
    everything it holds.  It runs the honest client machine in this process, so what it sends the
    honest sites is what a site sends; it stands in for a session (``conn.send``, ``expect``)."""

    def __init__(self, attacker: Attacker, site: int, spec: dict) -> None:
        self.site = site
        self.identity = attacker.site_keys[site]
        peers = {i: k.public for i, k in attacker.site_keys.items()}
        self.machine = ClientStateMachine(
            site_id=site, identity=self.identity, run_id=attacker.run_id,
            secagg=RunSpec.model_validate(spec).secagg, spec_digest=spec_digest(spec),
            policy=SitePolicy(PolicyConfig(), peers))
        self.conn = self
        self._out: list[Message] = []

    async def send(self, msg: Message) -> None:
        self._out += self.machine.receive(msg)
        if isinstance(msg, SecAggStart):  # its update: zeros, which it knows, as it knows its own
            binding = self.machine.fit_binding
            assert binding is not None
            self._out += self.machine.set_input(np.zeros(msg.vector_len - 1, np.float32), 1, trained_on=binding)

    async def expect(self, timeout: float = 30) -> Message:
        return self._out.pop(0)

    def sign_survivors(self, context: bytes, survivors: list[int]) -> list:
        """A survivor-list signature for any list: a proof entry ``[site, masked_with, signature]``."""
        masked_with = list(self.machine._round.masked_with)
        return [self.site, masked_with, self.identity.sign(survivors_message(context, survivors, masked_with))]

    def held_shares(self, owner: int) -> tuple[bytes, bytes]:
        """Its shares of ``owner``'s self-mask seed and masking key."""
        return self.machine._round.held[owner]


class Attacker:
    def __init__(self, root: Path, sites: int = SITES, policy: dict[str, Any] | None = None) -> None:
        self.root = root
        self.policy = {**NO_BATCHES, **FOREIGN_MODELS, **(policy or {})}  # under what a case's own policy adds
        self.port = free_port()
        self.identity = Identity.generate()
        self.site_keys = {i: Identity.generate() for i in range(1, sites + 1)}
        self.spec = RunSpec.of(FED).wire()
        self.procs: dict[int, subprocess.Popen] = {}
        self.run_id = RUN  # what Welcome and the round parameters name; a case may name another run
        # (site_index, num_sites) that Welcome claims for a site; a case may claim anything
        self.welcome_indices: Callable[[int], tuple[int, int]] = lambda site: (site - 1, SITES)
        self._workers: dict[tuple[int, str], SiteWorker] = {}  # for true_update
        (root / "logs").mkdir(parents=True, exist_ok=True)

    @classmethod
    @contextmanager
    def running(cls, root: Path, sites: list[int], policy: dict[str, Any] | None = None) -> Iterator[Attacker]:
        """An attacker facing ``sites`` as real processes, every one of them killed on leaving."""
        attacker = cls(root, policy=policy)
        try:
            for site in sites:
                attacker.start_site(site)
            yield attacker
        finally:
            attacker.kill_all()

    # -- site processes ----------------------------------------------------------------------------

    def site_config(self, site: int, **extra: Any) -> Path:
        path = self.root / f"site-{site}.yaml"
        path.write_text(yaml.safe_dump(self._site_settings(site, **extra)))
        return path

    def _site_settings(self, site: int, **extra: Any) -> dict[str, Any]:
        key = self.root / "keys" / f"site-{site}.key"
        if not key.exists():
            self.site_keys[site].save(key)
        return {
            "site_id": site, "identity_key": str(key),
            "coordinator": {"host": "127.0.0.1", "port": self.port, "public_key": self.identity.public.hex()},
            "peers": {i: k.public.hex() for i, k in self.site_keys.items()},
            "state_dir": str(self.root / f"site-{site}"), "threads": 1,
            "reconnect": {"initial_s": 0.1, "max_s": 0.3, "give_up_s": 300},
            "simulation": {"share": site - 1, "shares": SITES},
            "train_seed": 7,  # so that true_update, computed here, trains as the site does
            **extra,
            "policy": {**self.policy, **extra.get("policy", {})},
        }

    def start_site(self, site: int, **extra: Any) -> subprocess.Popen:
        path = self.site_config(site, **extra)
        log = open(self.root / "logs" / f"site-{site}.log", "ab")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, "-m", "asagiri.cli.client", "--site", str(site), "--config",
                                 str(path)], stdout=log, stderr=log)
        self.procs[site] = proc
        return proc

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def log(self, site: int) -> str:
        return (self.root / "logs" / f"site-{site}.log").read_text()

    # -- one case ----------------------------------------------------------------------------------

    def case(self, script: Callable[[dict[int, Session]], Awaitable[Any]], *, sites: list[int],
             spec: dict | Callable[[int], dict] | None = None, timeout: float = 90, run: str = RUN) -> Any:
        """Accept ``sites``, welcome them (``spec`` may differ per site) to ``run``, run ``script``,
        end the session."""
        self.run_id = run
        try:
            return anyio.run(self._case, script, sites, spec, timeout)
        finally:
            self.run_id = RUN

    async def _case(self, script, sites, spec, timeout):  # type: ignore[no-untyped-def]
        sessions: dict[int, Session] = {}
        everyone = anyio.Event()
        roster = {i: k.public for i, k in self.site_keys.items()}
        result = None
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        with anyio.fail_after(timeout):
            async with listener, anyio.create_task_group() as tg:

                async def handle(stream: anyio.abc.SocketStream) -> None:
                    async with stream:
                        try:
                            site, conn = await accept_handshake(
                                stream, self.identity, roster, max_frame_size=4 << 20, max_payload_bytes=64 << 20,
                                chunk_bytes=1 << 20,
                            )
                        except (SiteRefused, ConnectionLost, RemoteProtocolError):
                            return  # a half-open retry; the site comes back
                        body = spec(site) if callable(spec) else (spec or self.spec)
                        await conn.send(Welcome(self.run_id, *self.welcome_indices(site), body))
                        session = Session(site, conn)
                        sessions[site] = session
                        if set(sites) <= set(sessions):
                            everyone.set()
                        async with anyio.create_task_group() as inner:
                            inner.start_soon(session.read)
                            await session.closed.wait()
                            inner.cancel_scope.cancel()

                tg.start_soon(listener.serve, handle, tg)
                await everyone.wait()
                try:
                    result = await script(sessions)
                finally:
                    for s in sessions.values():
                        try:
                            await s.conn.send(Shutdown("case over", False))
                            await s.conn.aclose()
                        except ConnectionLost:
                            pass
                    tg.cancel_scope.cancel()
        return result

    def reject_once(self, site: int, timeout: float = 30) -> None:
        """Answer ``site``'s next ClientHello with a plaintext Reject, as anyone on the path could."""
        anyio.run(self._reject_once, site, timeout)

    async def _reject_once(self, site: int, timeout: float) -> None:
        from asagiri.wire import codec
        from asagiri.wire.framing import FrameDecoder, encode_frame
        from asagiri.wire.messages import Reject

        with anyio.fail_after(timeout):
            async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port) as listeners:
                listener = listeners.listeners[0]
                while True:
                    async with await listener.accept() as stream:
                        decoder, frames = FrameDecoder(max_frame_size=1024), []
                        while not frames:
                            frames = decoder.feed(await stream.receive())
                        hello = codec.decode(bytes(frames[0]), max_payload_bytes=0)
                        if hello.site_id == site:
                            reject = codec.encode(Reject("injected by someone on the path"))
                            await stream.send(encode_frame(reject, max_frame_size=1024))
                            return

    # -- what an honest coordinator would send -------------------------------------------------------

    def fit_ins(self, rnd: int, attempt: int = 1, *, params: dict | None = None, config: dict | None = None) -> FitIns:
        if params is None:
            torch.manual_seed(rnd)
            from asagiri.initial import initial_params

            params = initial_params(FED)
        return FitIns(rnd, attempt, params, config if config is not None else {"mu": 0.0, "seed": rnd})

    def round_params(self, fit: FitIns, participants: list[int], spec: dict | None = None) -> RoundParams:
        return RoundParams.derive(
            run_id=self.run_id, round=fit.round, attempt=fit.attempt, participants=participants,
            secagg=RunSpec.model_validate(spec or self.spec).secagg, params_digest=params_digest(fit.params),
            fit_config=fit.config, vector_len=sum(v.size for v in fit.params.values()) + 1,
            spec_digest=spec_digest(spec or self.spec),
        )

    @staticmethod
    def start(p: RoundParams) -> SecAggStart:
        return SecAggStart(p.round, p.attempt, list(p.participants), p.vector_len, p.plan.to_dict(), p.prg,
                           p.degree, p.threshold)

    # -- the site's true update, computed here -------------------------------------------------------

    def worker(self, site: int, spec: dict | None = None) -> SiteWorker:
        """The site's worker as its process builds it (its own data share), for ``spec`` or the
        attacker's; its data are loaded once, and ``train`` starts from the FitIns every time."""
        spec = spec or self.spec
        key = (site, canonical_hash(spec))
        if key not in self._workers:
            cfg = SiteConfig.model_validate(self._site_settings(site))
            self._workers[key] = SiteWorker(cfg, Welcome(RUN, site - 1, SITES, spec), RunSpec.model_validate(spec))
        return self._workers[key]

    def true_update(self, site: int, fit: FitIns, count: str = "one") -> tuple[np.ndarray, int]:
        """``c * clip(delta)`` and ``c`` as the site computes them from this FitIns, where ``c`` is
        what its ``policy.count`` (the default's unless given) makes of its sample count."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            delta, result = self.worker(site).train(fit)
        finally:
            torch.set_num_threads(threads)
        clip = FED.secagg.clip
        c = SitePolicy(PolicyConfig(count=count)).count_sent(result.num_samples)
        return c * np.clip(flatten(delta).astype(np.float64), -clip, clip), c


def canonical_hash(spec: dict) -> str:
    """A short name for a spec (a run id per changed spec: a site holds a run's spec fixed)."""
    return spec_digest(spec).hex()[:12]


def unmask_attempt(site: int, y: np.ndarray | None, p: RoundParams, *, masked_with: list[int],
                   responses: list[UnmaskResponse], s_pk: dict[int, bytes]) -> np.ndarray:
    """The attacker's best estimate of ``n * clip(delta)`` for ``site`` from what it collected.

    It removes every mask it can: the self mask if it holds ``t`` shares of the site's seed, and each
    pairwise mask with a neighbour whose masking key it holds ``t`` shares of.  What it cannot
    remove stays in, as it would for the attacker.
    """
    if y is None:
        return np.zeros(p.vector_len - 1)
    y = y.copy()
    t = p.threshold
    b = [shamir.decode_share(sh) for r in responses for o, sh in r.b_shares if o == site]
    if len({x for x, _ in b}) >= t:
        y -= expand(shamir.reconstruct(b, t), p.vector_len, dtype=p.plan.dtype, prg=p.prg)
    for v in masked_with:
        s = [shamir.decode_share(sh) for r in responses for o, sh in r.s_shares if o == v]
        if len({x for x, _ in s}) < t:
            continue
        key = EphemeralKey(shamir.reconstruct(s, t))
        seed = pair_seed(key, s_pk[site], site, v, p.context)
        mask = expand(seed, p.vector_len, dtype=p.plan.dtype, prg=p.prg)
        y = y - mask if sign(site, v) > 0 else y + mask
    return y.view(p.plan.signed)[:-1].astype(np.float64) / p.plan.scale


def matches(estimate: np.ndarray, true: np.ndarray, p: RoundParams) -> bool:
    """Within the quantisation bound of one site (docs/secagg.md): the attack worked."""
    return bool(np.max(np.abs(estimate - true)) <= 1 / p.plan.scale + 1e-6 * max(1.0, float(np.max(np.abs(true)))))


class Round:
    """What the attacker collects in one round attempt, stage by stage."""

    def __init__(self, attacker: Attacker, sessions, participants, *, fit: FitIns | None = None,
                 spec: dict | None = None):
        self.a, self.sessions, self.participants = attacker, sessions, list(participants)
        self.fit = fit or attacker.fit_ins(next_round())
        self.params = attacker.round_params(self.fit, self.participants, spec)
        self.declines: dict[int, str] = {}
        self.keys: dict[int, AdvertiseKeys] = {}
        self.shares: dict[int, ShareKeys] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.sigs: dict[int, ConsistencySig] = {}
        self.responses: list[UnmaskResponse] = []
        self.delivered: dict[int, list[int]] = {}
        self.result: SecAggResult | None = None  # the honest machine's, once its round is done

    async def send(self, site, msg):
        await self.sessions[site].conn.send(msg)

    async def collect(self, sites, kind):
        got = {}
        for site in sites:
            if site in self.declines:
                continue
            msg = await self.sessions[site].expect()
            if isinstance(msg, Decline):
                self.declines[site] = msg.rule
            else:
                assert isinstance(msg, kind), (site, msg)
                got[site] = msg
        return got

    async def start(self, starts=None, fits=None):
        for site in self.participants:
            await self.send(site, (fits or {}).get(site, self.fit))
            await self.send(site, (starts or {}).get(site, self.a.start(self.params)))
        self.keys = await self.collect(self.participants, AdvertiseKeys)

    def graph(self, view=None):
        view = sorted(view or self.keys)
        return neighbours(view, self.params.degree or None, graph_seed(self.params.context, view))

    async def roster(self, entries_for=None):
        graph = self.graph()
        for site in self.keys:
            entries = [[v, self.keys[v].c_pk, self.keys[v].s_pk, self.keys[v].signature] for v in graph[site]]
            if entries_for:
                entries = entries_for(site, entries)
            await self.send(site, KeyRoster(self.fit.round, self.fit.attempt, sorted(self.keys), entries))
        self.shares = await self.collect(list(self.keys), ShareKeys)

    async def deliver(self, allow=lambda recipient, sender: True):
        for site in self.shares:
            items = [[v, ct] for v, m in self.shares.items() for r, ct in m.shares if r == site and allow(site, v)]
            self.delivered[site] = [v for v, _ in items]
            await self.send(site, ShareDelivery(self.fit.round, self.fit.attempt, items))
        got = await self.collect(list(self.shares), MaskedInput)
        self.masked = {s: m.vector["y"] for s, m in got.items()}

    async def consistency(self, lists):
        for site, survivors in lists.items():
            await self.send(site, ConsistencyCheck(self.fit.round, self.fit.attempt, survivors))
        self.sigs = await self.collect(list(lists), ConsistencySig)

    async def unmask(self, requests):
        for site, (survivors, dropped) in requests.items():
            if site in self.sigs:
                proof = [[s, sig.masked_with, sig.signature] for s, sig in self.sigs.items()]
                await self.send(site, UnmaskRequest(self.fit.round, self.fit.attempt, survivors, dropped, proof))
        got = await self.collect([s for s in requests if s in self.sigs], UnmaskResponse)
        self.responses = list(got.values())

    async def honest(self) -> np.ndarray:
        """Run the round as the real coordinator's machine would; returns the unmasked ring sum."""
        machine, pending = self._machine()
        await self._drive(machine, pending)
        assert machine.result is not None, machine.abort_reason
        return machine.result.total

    async def announce(self, total_for) -> dict[int, Message]:
        """Run the round honestly through the unmask, then announce ``total_for(site, z)`` instead
        of the sum ``z`` to each survivor and relay the vouches they send as a ``SumProof``, as a
        coordinator running modified code would.  Returns each survivor's vouch (or Decline)."""
        machine, pending = self._machine()
        pending = await self._drive(machine, pending, until=ServerStage.VERIFY)
        survivors = sorted(o.site for o in pending)
        vouches = {}
        for o in pending:
            total = total_for(o.site, o.msg.total["s"])
            await self.send(o.site, SumAnnounce(self.fit.round, self.fit.attempt, {"s": total}))
        for site in survivors:
            vouches[site] = await self.sessions[site].expect()
        proof = [[s, m.scalars, m.signature] for s, m in vouches.items() if isinstance(m, SumVouch)]
        for site in survivors:
            await self.send(site, SumProof(self.fit.round, self.fit.attempt, proof))
        return vouches

    def _machine(self) -> tuple[ServerStateMachine, list]:
        machine = ServerStateMachine(params=self.params, min_clients=2,
                                     identities={i: k.public for i, k in self.a.site_keys.items()})
        return machine, machine.start()

    async def _drive(self, machine: ServerStateMachine, pending: list, until: ServerStage | None = None) -> list:
        """Send the machine's messages and feed it the answers until it finishes (or enters
        ``until``: then its unsent messages are returned)."""
        for site in self.participants:
            await self.send(site, self.fit)
        while pending and not machine.finished:
            if machine.stage is until:
                return pending
            for o in pending:
                await self.send(o.site, o.msg)
            # a SumProof has no answer: the site checks it and says nothing
            sites = list(dict.fromkeys(o.site for o in pending if not isinstance(o.msg, SumProof)))
            pending = []
            for site in sites:
                msg = await self.sessions[site].expect()
                assert not isinstance(msg, Decline), msg
                pending += machine.receive(site, msg)
                if isinstance(msg, UnmaskResponse):
                    self.responses.append(msg)
                if isinstance(msg, MaskedInput):
                    self.masked[site] = msg.vector["y"]
                if isinstance(msg, AdvertiseKeys):
                    self.keys[site] = msg
        for o in pending:  # the SumProof
            await self.send(o.site, o.msg)
        self.result = machine.result
        self.delivered = {s: list(machine.delivered_from.get(s, [])) for s in self.participants}
        return []

    def estimate(self, site):
        s_pk = {v: k.s_pk for v, k in self.keys.items()}
        return unmask_attempt(site, self.masked.get(site), self.params, masked_with=self.delivered.get(site, []),
                              responses=self.responses, s_pk=s_pk)


def rule_of(rule: Rule) -> str:
    """The rule a Decline names. It names nothing else (a typed cause): details stay in the site's log."""
    assert isinstance(rule, Rule), rule
    return str(rule)


def declined(msg: Message) -> str | None:
    return msg.rule if isinstance(msg, Decline) else None


__all__ = ["FOREIGN_MODELS", "NO_BATCHES", "UNRECORDED_OK", "Attacker", "ColludingSite", "FED", "RUN", "Round", "Session", "canonical_hash", "declined", "matches", "next_round", "rule_of",
           "unmask_attempt"]
