"""
Connection churn: agents that connect, register, maybe get a request, and
leave, at a steady rate, against a listener in this process.

    python -m benchmarks.churn                      # 500/s for 60 s, UNIX socket
    python -m benchmarks.churn --rate 500 --duration 60 --transport tcp

Every connection is a minimal raw agent (C{struct} framing, pre-encoded
JSON).  Each one, picked at random:

  - registers (one of C{--agent-ids} ids) and then, after 0-40 ms,
    closes, aborts (RST), or is closed by the proxy;
  - or gets a request from the proxy first, which it answers or leaves
    pending while it goes;
  - or (5 %) never registers and just hangs up.

At the end it checks the accounting invariant and exits non-zero if any of
it fails: every request sent got exactly one outcome (answer, timeout,
cancel or connection closed), nothing is in flight, the pool is empty, no
connection awaits registration, no registration slot is held, and the
process has no more file descriptors than before.  C{tests/reliability}
runs a 3-second version of it in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

_PREFIX = struct.Struct(">I")
_HANDSHAKE_REQUEST = 0x01
_HANDSHAKE_RESPONSE = 0x02
_REQUEST_HEADERS = 0x10
_AGENT_RESPONSE = 0x20

# What a connection does once registered.
AGENT_CLOSES = "agent-closes"
AGENT_ABORTS = "agent-aborts"
PROXY_CLOSES = "proxy-closes"
ANSWERS = "answers"
LEAVES_PENDING = "leaves-pending"
NEVER_REGISTERS = "never-registers"
_REGISTERED_FATES = (AGENT_CLOSES, AGENT_ABORTS, PROXY_CLOSES, ANSWERS, LEAVES_PENDING)


def _frame(message_type: int, body: Any) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return _PREFIX.pack(len(payload) + 1) + bytes([message_type]) + payload


def registration_frame(agent_id: str, fate: str) -> bytes:
    features = {
        "streaming_body": False, "websocket": False, "guardrails": False, "config_push": False,
        "metrics_export": False, "concurrent_requests": 4, "cancellation": True,
        "flow_control": True, "health_reporting": False,
    }  # fmt: skip
    return _frame(
        _HANDSHAKE_REQUEST,
        {
            "protocol_version": 2,
            "agent_id": agent_id,
            "capabilities": {
                "agent_id": agent_id,
                "name": "churn",
                "version": "1",
                "supported_events": [1],
                "features": features,
                "limits": {"max_body_size": 1024, "max_concurrency": 4, "preferred_chunk_size": 1024},
            },
            "auth_token": None,
            # Tells the proxy's side of the churn what this agent will do.
            "metadata": {"fate": fate},
        },
    )


def answer_frame(correlation_id: str) -> bytes:
    return _frame(
        _AGENT_RESPONSE,
        {"version": 2, "decision": "allow", "audit": {"custom": {"correlation_id": correlation_id}}},
    )


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


class ChurnAgent(Protocol):
    """One short-lived agent connection."""

    def __init__(self, churn: Churn, fate: str, agent_id: str, lifetime: float) -> None:
        self.churn = churn
        self.fate = fate
        self.agent_id = agent_id
        self.lifetime = lifetime
        self.buffer = b""
        self.ended = False
        self.timers: list[Any] = []

    def connectionMade(self) -> None:
        self.churn.counts["connected"] += 1
        if self.fate == NEVER_REGISTERS:
            self.timers.append(self.churn.later(self.lifetime, self._close))
            return
        assert self.transport is not None
        self.transport.write(self.churn.registration(self.agent_id, self.fate))
        # Whatever happens (no answer, no request), the agent leaves in time.
        self.timers.append(self.churn.later(self.lifetime + self.churn.patience, self._close))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 5:
            (length,) = _PREFIX.unpack_from(self.buffer)
            if len(self.buffer) < 4 + length:
                return
            message_type = self.buffer[4]
            payload = self.buffer[5 : 4 + length]
            self.buffer = self.buffer[4 + length :]
            self.frame(message_type, payload)

    def frame(self, message_type: int, payload: bytes) -> None:
        if message_type == _HANDSHAKE_RESPONSE:
            if b'"success":true' not in payload:
                self.churn.counts["refused"] += 1
                return
            self.churn.counts["registered"] += 1
            if self.fate in (AGENT_CLOSES, AGENT_ABORTS):
                end = self._abort if self.fate == AGENT_ABORTS else self._close
                self.timers.append(self.churn.later(self.lifetime, end))
        elif message_type == _REQUEST_HEADERS:
            self.churn.counts["requests_seen"] += 1
            cid = json.loads(payload)["correlation_id"]
            if self.fate == ANSWERS:
                assert self.transport is not None
                self.transport.write(answer_frame(cid))
            self.timers.append(self.churn.later(self.lifetime, self._close))

    def _close(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.loseConnection()

    def _abort(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = True
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        self.churn.agent_ended(self)


class Churn:
    """
    Drives the churn against C{factory} (already listening at C{endpoint}).

    @param track: called with each request's Deferred and a label; by
        default the outcomes are counted here.
    @param patience: seconds a registering agent waits for its answer (and
        then for a request) before it leaves anyway.
    @param request_timeout: seconds the proxy gives each request.
    """

    def __init__(
        self,
        reactor: Any,
        factory: Any,
        endpoint: Any,
        *,
        rate: float = 500.0,
        duration: float = 60.0,
        agent_ids: int = 50,
        seed: int = 1,
        track: Callable[[Deferred[Any], str], object] | None = None,
        patience: float = 1.0,
        request_timeout: float = 5.0,
    ) -> None:
        from sentinel_twisted.proxy.pool import PoolObserver

        self.reactor = reactor
        self.factory = factory
        self.pool = factory.pool
        self.endpoint = endpoint
        self.rate = rate
        self.duration = duration
        self.agent_ids = [f"churn-{i}" for i in range(agent_ids)]
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.fates: dict[str, str] = {}
        self.live: set[ChurnAgent] = set()
        self._registration_frames: dict[str, bytes] = {}
        self._track = track
        self.patience = patience
        self.request_timeout = request_timeout
        self._started_at = 0.0
        self._opened = 0
        self._timer: Any = None
        self._done: Deferred[None] = Deferred()
        self._seconds = 0.0
        self._proxy_timers: set[Any] = set()
        self._max_live = 0
        self._lag = 0.0
        churn = self

        class Observer(PoolObserver):
            def agent_registered(self, connection: Any) -> None:
                churn.proxy_registered(connection)

        self._observer = Observer()

    def registration(self, agent_id: str, fate: str) -> bytes:
        key = f"{agent_id} {fate}"
        frame = self._registration_frames.get(key)
        if frame is None:
            frame = self._registration_frames[key] = registration_frame(agent_id, fate)
        return frame

    def later(self, delay: float, call: Callable[[], None]) -> Any:
        return self.reactor.callLater(delay, call)

    # -- the run -----------------------------------------------------------------

    def run(self) -> Deferred[None]:
        """Fires once every agent connection has ended (see L{report})."""
        self.pool.add_observer(self._observer)
        self._started_at = time.monotonic()
        self._tick()
        return self._done

    def _tick(self) -> None:
        elapsed = time.monotonic() - self._started_at
        target = min(int(self.rate * min(elapsed, self.duration)), int(self.rate * self.duration))
        due = target - self._opened
        # Catching up after a slow iteration is fine; a runaway backlog is not.
        for _ in range(min(due, max(1, int(self.rate / 10)))):
            self._open_one()
        self._lag = max(self._lag, (target - self._opened) / self.rate)
        if self._opened < int(self.rate * self.duration):
            self._timer = self.reactor.callLater(0.005, self._tick)
        else:
            self._timer = None
            self._maybe_done()

    def _open_one(self) -> None:
        self._opened += 1
        r = self.random
        fate = NEVER_REGISTERS if r.random() < 0.05 else r.choice(_REGISTERED_FATES)
        agent = ChurnAgent(self, fate, r.choice(self.agent_ids), r.uniform(0.0, 0.04))
        self.live.add(agent)
        self._max_live = max(self._max_live, len(self.live))
        self.counts["opened"] += 1
        self.counts[f"fate:{fate}"] += 1

        def failed(failure: Failure) -> None:
            self.counts["connect_failed"] += 1
            self.counts[f"connect_failed:{failure.getErrorMessage()}"] += 1
            self.agent_ended(agent)

        self.endpoint.connect(_OneShot(agent)).addErrback(failed)

    def agent_ended(self, agent: ChurnAgent) -> None:
        if agent in self.live:
            self.live.discard(agent)
            self.counts["closed"] += 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._timer is None and not self.live and not self._done.called:
            self.pool.remove_observer(self._observer)
            for timer in self._proxy_timers:
                if timer.active():
                    timer.cancel()
            self._proxy_timers.clear()
            self._seconds = time.monotonic() - self._started_at
            self._done.callback(None)

    def report(self) -> dict[str, Any]:
        """The counters; outcomes are read now (the proxy may see the last
        connections go after the agents have)."""
        return {
            "rate": self.rate,
            "duration": self.duration,
            "seconds": round(self._seconds, 3),
            "achieved_rate": round(self._opened / max(self._seconds, 1e-9), 1),
            "max_lag_seconds": round(self._lag, 3),
            "max_live_connections": self._max_live,
            "counts": dict(self.counts),
            "outcomes": dict(self.outcomes),
        }

    # -- the proxy's side -----------------------------------------------------------

    def proxy_registered(self, connection: Any) -> None:
        agent_fate = self._fate_of(connection)
        if agent_fate in (ANSWERS, LEAVES_PENDING):
            self.counts["requests_sent"] += 1
            cid = f"{connection.connection_id}-r"
            d = connection.send_request_headers(_event(cid), timeout=self.request_timeout)
            if self._track is not None:
                self._track(d, cid)
            else:
                d.addBoth(self._count_outcome)
        elif agent_fate == PROXY_CLOSES:
            timer = self.later(self.random.uniform(0.0, 0.04), lambda: self._proxy_close(connection, timer))
            self._proxy_timers.add(timer)

    def _proxy_close(self, connection: Any, timer: Any) -> None:
        self._proxy_timers.discard(timer)
        connection.close("churn: proxy closes")

    def _fate_of(self, connection: Any) -> str:
        metadata = connection.metadata
        return str(metadata.get("fate")) if isinstance(metadata, dict) else ""

    def _count_outcome(self, result: object) -> None:
        from sentinel_twisted.errors import ConnectionClosed, RequestCancelled, RequestTimeout

        if isinstance(result, Failure):
            if result.check(ConnectionClosed):
                self.outcomes["closed"] += 1
            elif result.check(RequestTimeout):
                self.outcomes["timeout"] += 1
            elif result.check(RequestCancelled):
                self.outcomes["cancel"] += 1
            else:
                self.outcomes[f"error:{type(result.value).__name__}"] += 1
        else:
            self.outcomes["answer"] += 1


class _OneShot(Factory):
    """A client factory for exactly one, already built, protocol."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def _event(cid: str) -> Any:
    from sentinel_twisted import messages as m

    return m.RequestHeadersEvent(
        metadata=m.RequestMetadata(
            correlation_id=cid,
            request_id=cid,
            client_ip="203.0.113.1",
            client_port=1,
            timestamp="2026-01-01T00:00:00Z",
        ),
        method="GET",
        uri="/churn",
        headers={},
    )


def check_invariant(factory: Any, result: dict[str, Any], fds_before: int) -> list[str]:
    """The accounting invariant after a churn run; the problems found."""
    problems = []
    outcomes = result["outcomes"]
    counts = result["counts"]
    sent = counts.get("requests_sent", 0)
    ended = sum(outcomes.values())
    if ended != sent:
        problems.append(f"{sent} request(s) sent but {ended} outcome(s)")
    odd = {k: v for k, v in outcomes.items() if k not in ("answer", "timeout", "cancel", "closed")}
    if odd:
        problems.append(f"unexpected outcomes: {odd}")
    if counts.get("opened", 0) != counts.get("closed", 0):
        problems.append(f"{counts.get('opened')} opened but {counts.get('closed')} closed")
    if counts.get("connect_failed", 0):
        problems.append(f"{counts['connect_failed']} connection attempt(s) failed")
    if len(factory.pool):
        problems.append(f"{len(factory.pool)} connection(s) left in the pool")
    if factory.pool.in_flight:
        problems.append(f"{factory.pool.in_flight} request(s) still in flight")
    if factory.awaiting_registration:
        problems.append(f"{factory.awaiting_registration} connection(s) still awaiting registration")
    held = {k: v for k, v in factory._registered_per_agent.items() if v}
    if held:
        problems.append(f"registration slots still held: {held}")
    fds_after = result.get("fds_after")
    if fds_after is not None and fds_after > fds_before:
        problems.append(f"file descriptors: {fds_before} before, {fds_after} after")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0, help="connections opened per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to open connections for")
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    parser.add_argument("--agent-ids", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--log", default=os.devnull, help="file for the library's log lines")
    args = parser.parse_args(argv)

    import gc
    import tempfile

    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString, serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from sentinel_twisted.proxy.config import ReverseConnectionConfig
    from sentinel_twisted.proxy.factory import ReverseConnectionFactory
    from sentinel_twisted.tap import raise_file_limit

    # Without an observer, twisted.logger keeps the first 65536 events in
    # memory, which would show up as growth.
    log_file = open(args.log, "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    raise_file_limit()
    workdir = tempfile.mkdtemp(prefix="sentinel-churn-")
    factory = ReverseConnectionFactory(
        ReverseConnectionConfig(max_connections_per_agent=1000, backlog=1024), clock=reactor
    )
    if args.transport == "unix":
        path = os.path.join(workdir, "churn.sock")
        listen, connect = f"unix:{path}:mode=600:backlog=1024", f"unix:{path}"
    else:
        listen, connect = "tcp:0:interface=127.0.0.1:backlog=1024", ""
    outcome: dict[str, Any] = {}

    def start(port: Any) -> Deferred[Any]:
        nonlocal connect
        if not connect:
            connect = f"tcp:127.0.0.1:{port.getHost().port}"
        gc.collect()
        outcome["fds_before"] = open_fd_count()
        outcome["rss_before"] = _rss()
        churn = Churn(
            reactor, factory, clientFromString(reactor, connect),
            rate=args.rate, duration=args.duration, agent_ids=args.agent_ids, seed=args.seed,
        )  # fmt: skip
        sys.stderr.write(f"churn: {args.rate:g} connections/s for {args.duration:g} s over {args.transport}\n")

        def finished(_: None) -> Deferred[Any]:
            outcome["churn"] = churn
            return port.stopListening()  # type: ignore[no-any-return]

        return churn.run().addCallback(finished)

    def settle(_: object) -> Deferred[Any]:
        from twisted.internet.task import deferLater

        # The reactor closes the last sockets on its next iterations.
        return deferLater(reactor, 0.5, lambda: None)

    def stop(result: object) -> None:
        if isinstance(result, Failure):
            outcome["error"] = result.getTraceback()
        reactor.stop()

    d = serverFromString(reactor, listen).listen(factory)
    d.addCallback(start).addCallback(settle).addBoth(stop)
    reactor.run()
    if "error" in outcome:
        sys.stderr.write(outcome["error"])
        return 2
    result = outcome["churn"].report()
    gc.collect()
    result["fds_before"] = outcome["fds_before"]
    result["fds_after"] = open_fd_count()
    result["rss_before_mib"] = round(outcome["rss_before"] / 2**20, 1)
    result["rss_after_mib"] = round(_rss() / 2**20, 1)
    problems = check_invariant(factory, result, outcome["fds_before"])
    result["problems"] = problems
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    for problem in problems:
        sys.stderr.write(f"churn: invariant broken: {problem}\n")
    return 1 if problems else 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    raise SystemExit(main())
