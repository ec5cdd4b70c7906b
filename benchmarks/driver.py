"""
The proxy side of the benchmarks, run as its own process by
L{benchmarks.run}: a L{ReverseConnectionFactory} listening on one endpoint,
plus a load generator that drives C{pool.send_request_headers} from inside
the same process, as a real proxy would.

It writes one JSON object per line on stdout: C{listening} (with the
address), then the scenario's results.  Scenarios:

  - C{roundtrip}: wait for C{--expect} registered connections, then for
    each concurrency level keep that many requests in flight until
    C{--requests} answers were measured (after C{--warmup}); report round
    trips per second, latency percentiles and CPU use of the proxy and of
    the agents (whose pids they send in their registration metadata).
  - C{hold}: wait for C{--expect} registered connections; report the time
    from the first accepted connection and the RSS growth.
  - C{register}: wait for C{--expect} registrations (connections that
    register and leave); report the rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def proc_cpu(pid: int) -> float:
    """User plus system CPU seconds of another process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _address_text(address: Any) -> str:
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode() if isinstance(name, bytes) else str(name)
    return f"{address.host}:{address.port}"


def install_reactor(name: str) -> None:
    if name == "epoll":
        from twisted.internet import epollreactor

        epollreactor.install()
    elif name == "poll":
        from twisted.internet import pollreactor

        pollreactor.install()
    elif name in ("asyncio", "uvloop"):
        import asyncio

        from twisted.internet import asyncioreactor

        if name == "uvloop":
            import uvloop

            asyncioreactor.install(uvloop.new_event_loop())
        else:
            asyncioreactor.install(asyncio.new_event_loop())
    else:
        raise SystemExit(f"unknown reactor {name!r}")


# ---------------------------------------------------------------------------
# Alternative pending tables, to price the timeout design (see BENCHMARKS.md).
# They implement what AgentConnection uses of PendingTable.


def make_table_classes() -> dict[str, Callable[..., Any]]:
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from sentinel_twisted.errors import DuplicateCorrelationId, RequestTimeout
    from sentinel_twisted.proxy.pending import PendingTable, _Pending

    class NoTimeoutTable:
        """Requests never time out: a dict and nothing else."""

        def __init__(
            self, clock: Any, on_cancel: Any = None, on_timeout: Any = None, counts: list[int] | None = None
        ) -> None:
            self._clock = clock
            self._on_cancel = on_cancel
            self._on_timeout = on_timeout
            # The table's own entries (a Deferred, a Waiter or handlers, and
            # the time sent): what the connection's reads take out of it.
            self._entries: dict[str, _Pending] = {}
            # Kept as PendingTable keeps them: the proxy's reads batch by them.
            self._counts = counts if counts is not None else [0, 0]

        def __len__(self) -> int:
            return len(self._entries)

        def __contains__(self, cid: object) -> bool:
            return cid in self._entries

        def correlation_ids(self) -> list[str]:
            return list(self._entries)

        def sent_at(self, cid: str) -> float | None:
            entry = self._entries.get(cid)
            return None if entry is None else entry.sent_at

        def _cancelled(self, d: Deferred[Any]) -> None:
            cid = d._bench_cid  # type: ignore[attr-defined]
            entry = self._entries.get(cid)
            if entry is not None and entry.deferred is d:
                self._remove(cid)
                if self._on_cancel is not None:
                    self._on_cancel(cid)

        def add(
            self,
            cid: str,
            timeout: float,
            waiter: Any = None,
            answered: Any = None,
            failed: Any = None,
            arg: Any = None,
            notice: bool = False,
        ) -> Any:
            if cid in self._entries:
                raise DuplicateCorrelationId(cid)
            entry = object.__new__(_Pending)
            entry.correlation_id = cid
            entry.notice = notice
            if answered is not None:
                entry.deferred = None
                entry.answered, entry.failed, entry.arg = answered, failed, arg
            elif waiter is None:
                d: Any = Deferred(self._cancelled)
                d._bench_cid = cid
                entry.deferred = d
            else:
                entry.deferred = waiter
            entry.sent_at = self._clock.seconds()
            self._entries[cid] = entry
            self._counts[0] += 1
            self._counts[1] += 1
            return entry.deferred

        def _remove(self, cid: str) -> Any:
            entry = self._entries.pop(cid, None)
            if entry is not None:
                self._counts[0] -= 1
            return entry

        def pop(self, cid: str) -> Any:
            entry = self._remove(cid)
            return None if entry is None else entry.fired()

        def take(self, cid: str) -> Any:
            entry = self._remove(cid)
            return None if entry is None else (entry.fired(), entry.sent_at)

        def resolve(self, cid: str, result: object) -> bool:
            entry = self._remove(cid)
            if entry is None:
                return False
            entry.fired().callback(result)
            return True

        def fail(self, cid: str, error: BaseException) -> bool:
            fire = self.pop(cid)
            if fire is None:
                return False
            fire.errback(Failure(error))
            return True

        def fail_all(self, make_error: Callable[[str], BaseException]) -> int:
            entries = [(cid, self._remove(cid)) for cid in list(self._entries)]
            for cid, entry in entries:
                entry.fired().errback(Failure(make_error(cid)))
            return len(entries)

    class DelayedCallTable(NoTimeoutTable):
        """The textbook design: one reactor DelayedCall per request."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._timers: dict[str, Any] = {}

        def add(self, cid: str, timeout: float, *rest: Any) -> Any:
            d = super().add(cid, timeout, *rest)
            self._timers[cid] = self._clock.callLater(timeout, self._expire, cid, timeout)
            return d

        def _remove(self, cid: str) -> Any:
            timer = self._timers.pop(cid, None)
            if timer is not None and timer.active():
                timer.cancel()
            return super()._remove(cid)

        def _expire(self, cid: str, timeout: float) -> None:
            del self._timers[cid]
            entry = super()._remove(cid)
            if entry is not None:
                entry.fired().errback(Failure(RequestTimeout(timeout, cid)))
                if self._on_timeout is not None and not entry.notice:
                    self._on_timeout(cid)

    return {"table": PendingTable, "none": NoTimeoutTable, "delayedcall": DelayedCallTable}


def swap_tables(pool: Any, variant: str, default_timeout: float) -> None:
    """
    Give every (idle) connection a fresh pending table of C{variant}:
    C{table}, C{none} or C{delayedcall}, optionally with C{@SECONDS} for
    the request timeout (C{table@1}: the table's timer fires every second).
    """
    name, _, seconds = variant.partition("@")
    cls = make_table_classes()[name]
    for conn in pool.connections():
        assert conn.in_flight == 0
        old = conn._pending
        # The connections' tables share their listener's counts (see PendingTable).
        shared = {"counts": old._counts} if hasattr(old, "_counts") else {}
        conn._pending = cls(old._clock, on_cancel=old._on_cancel, on_timeout=old._on_timeout, **shared)
        conn.request_timeout = float(seconds) if seconds else default_timeout


# ---------------------------------------------------------------------------


def load_event(vectors: str | None) -> Any:
    """The RequestHeaders event of the vectors, with its correlation ids
    cleared so that the library gives every request a fresh one."""
    import msgspec

    from sentinel_twisted import messages as m

    payload: bytes | None = None
    path = os.path.join(vectors, "evt_request_headers.json") if vectors else None
    if path and os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)["payload"].encode()
    else:
        payload = FALLBACK_EVENT
    event = m.decode(payload, m.RequestHeadersEvent)
    return msgspec.structs.replace(
        event,
        correlation_id="",
        metadata=msgspec.structs.replace(event.metadata, correlation_id=""),
    )


# The same event as shared/vectors/evt_request_headers.json, for checkouts
# without the vectors.
FALLBACK_EVENT = (
    b'{"correlation_id":"req-7f3a","headers":{"accept":["application/json"],'
    b'"accept-encoding":["gzip, br"],"authorization":["Bearer abc.def.ghi"],'
    b'"cookie":["session=abc123","theme=dark"],"host":["api.example.com"],'
    b'"user-agent":["curl/8.5.0"],"x-forwarded-for":["203.0.113.7"],'
    b'"x-request-id":["req-internal-0001"]},"metadata":{"client_ip":"203.0.113.7",'
    b'"client_port":54321,"correlation_id":"req-7f3a","protocol":"HTTP/1.1",'
    b'"request_id":"req-internal-0001","route_id":"api-route","server_name":'
    b'"api.example.com","timestamp":"2026-01-01T00:00:00Z","tls_cipher":'
    b'"TLS_AES_128_GCM_SHA256","tls_version":"TLSv1.3","traceparent":'
    b'"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","upstream_id":'
    b'"api-backend"},"method":"GET","uri":"/api/items?id=42"}'
)


def print_allocations(before: Any, connections: int) -> None:
    import tracemalloc

    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"python allocations: {total / connections:.0f} B per connection", file=sys.stderr)
    for stat in stats[:25]:
        frames = " -> ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in stat.traceback)
        print(f"{stat.size_diff / connections:8.1f} B {stat.count_diff / connections:6.2f} blocks  {frames}", file=sys.stderr)


class ClosedLoop:
    """Keep C{concurrency} requests in flight until C{warmup + requests}
    answers arrived; time the last C{requests} of them."""

    def __init__(
        self,
        pool: Any,
        agent_ids: list[str],
        event: Any,
        concurrency: int,
        requests: int,
        warmup: int,
        agent_pids: list[int],
        on_done: Callable[[dict[str, Any]], None],
    ) -> None:
        self.pool = pool
        self.agent_ids = agent_ids
        self.event = event
        self.concurrency = concurrency
        self.requests = requests
        self.warmup = warmup
        self.total = warmup + requests
        self.agent_pids = agent_pids
        self.on_done = on_done
        self.sent = 0
        self.answered = 0
        self.errors = 0
        self.first_error: str | None = None
        self.latencies: list[float] = []
        self.t_start = 0.0
        self.cpu_start = 0.0
        self.agents_start = 0.0

    def start(self) -> None:
        if self.warmup == 0:
            self._mark()
        for _ in range(min(self.concurrency, self.total)):
            self._send()

    def _mark(self) -> None:
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.agents_start = sum(proc_cpu(p) for p in self.agent_pids)

    def _send(self) -> None:
        n = self.sent
        self.sent = n + 1
        agent_ids = self.agent_ids
        t0 = (time.perf_counter(),)
        d = self.pool.send_request_headers(agent_ids[n % len(agent_ids)], self.event)
        d.addCallbacks(self._answered, self._failed, t0, None, t0)

    def _answered(self, response: Any, t0: float) -> None:
        now = time.perf_counter()
        self.answered += 1
        if self.answered > self.warmup:
            self.latencies.append(now - t0)
        elif self.answered == self.warmup:
            self._mark()
        self._next()

    def _failed(self, failure: Any, t0: float) -> None:
        self.errors += 1
        self.answered += 1
        if self.first_error is None:
            self.first_error = str(failure.value)
        self._next()

    def _next(self) -> None:
        if self.sent < self.total:
            self._send()
        elif self.answered == self.total:
            self._finish()

    def _finish(self) -> None:
        wall = time.perf_counter() - self.t_start
        cpu = time.process_time() - self.cpu_start
        agents_cpu = sum(proc_cpu(p) for p in self.agent_pids) - self.agents_start
        lat = sorted(self.latencies)
        n = len(lat)

        def pct(q: float) -> float:
            return lat[min(n - 1, int(q * n))] * 1e6 if n else 0.0

        self.on_done(
            {
                "concurrency": self.concurrency,
                "requests": n,
                "errors": self.errors,
                "first_error": self.first_error,
                "seconds": wall,
                "rps": n / wall if wall > 0 else 0.0,
                "p50_us": pct(0.50),
                "p90_us": pct(0.90),
                "p99_us": pct(0.99),
                "proxy_cpu": cpu / wall if wall > 0 else 0.0,
                "agents_cpu": agents_cpu / wall if wall > 0 else 0.0,
            }
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="server endpoint, e.g. unix:/tmp/s.sock or tcp:0:interface=127.0.0.1")
    parser.add_argument("--scenario", choices=("roundtrip", "hold", "register"), required=True)
    parser.add_argument("--expect", type=int, default=8, help="connections (or registrations) to wait for")
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--variants", default="table", help="pending tables to compare: table,none,delayedcall")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the variant sequence (ABAB...)")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--reactor", default="epoll")
    parser.add_argument("--backlog", type=int, default=None, help="listen backlog (default: the config's)")
    parser.add_argument("--max-pending-registrations", type=int, default=None)
    parser.add_argument("--log", default=None, help="file for the library's log")
    parser.add_argument("--vectors", default=None)
    parser.add_argument("--profile", default=None, help="run under cProfile and write stats here")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--tracemalloc", action="store_true", help="hold: print the top allocations per connection on stderr")
    parser.add_argument("--dial", action="append", default=[], help="forward mode: a listening agent to dial (repeatable)")
    parser.add_argument("--dial-connections", type=int, default=4, help="connections per --dial agent")
    parser.add_argument("--encodings", default="msgpack,json", help="payload encodings offered to --dial agents")
    parser.add_argument("--busy-poll", type=int, default=0, help="microseconds of busy polling before each wait (0: off)")
    args = parser.parse_args(argv)

    install_reactor(args.reactor)
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from sentinel_twisted.endpoints import with_backlog
    from sentinel_twisted.proxy.config import ReverseConnectionConfig
    from sentinel_twisted.proxy.factory import ReverseConnectionFactory
    from sentinel_twisted.tap import raise_file_limit

    log_file = open(args.log or os.devnull, "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    if args.busy_poll:
        from sentinel_twisted.busypoll import BusyPollService

        BusyPollService(args.busy_poll / 1e6, reactor).startService()

    raised = raise_file_limit()
    config_args: dict[str, Any] = {"request_timeout": args.request_timeout}
    if args.backlog is not None:
        config_args["backlog"] = args.backlog
    if args.max_pending_registrations is not None:
        config_args["max_pending_registrations"] = args.max_pending_registrations
    config = ReverseConnectionConfig(**config_args)

    state: dict[str, Any] = {"first": None, "done": False}

    class Factory(ReverseConnectionFactory):
        def buildProtocol(self, addr: Any) -> Any:
            if state["first"] is None:
                state["first"] = time.perf_counter()
                state["cpu_first"] = time.process_time()
            return super().buildProtocol(addr)

        def connection_registered(self, connection: Any) -> None:
            super().connection_registered(connection)
            on_registered(connection)

    factory = Factory(config, clock=reactor)
    pool = factory.pool

    def finish() -> None:
        # A moment for the last writes (registration answers) to go out.
        if not state["done"]:
            state["done"] = True
            reactor.callLater(0.3, reactor.stop)

    def give_up() -> None:
        emit(event="error", error=f"gave up after {args.max_seconds} s", registered=factory.registrations, connections=len(pool))
        finish()

    reactor.callLater(args.max_seconds, give_up)

    gc.collect()
    rss0 = rss_bytes()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(4)
        state["snapshot"] = tracemalloc.take_snapshot()

    def on_registered(connection: Any) -> None:
        if args.scenario == "roundtrip":
            if len(pool) == args.expect:
                reactor.callLater(0.2, run_roundtrip)
        elif args.scenario == "hold":
            if len(pool) == args.expect:
                t = time.perf_counter() - state["first"]
                cpu = time.process_time() - state["cpu_first"]
                gc.collect()
                rss = rss_bytes()
                if args.tracemalloc:
                    print_allocations(state["snapshot"], len(pool))
                emit(
                    event="hold",
                    connections=len(pool),
                    seconds=t,
                    rate=len(pool) / t,
                    proxy_cpu_seconds=cpu,
                    rss_before=rss0,
                    rss_after=rss,
                    bytes_per_connection=(rss - rss0) / len(pool),
                    rejections=dict(factory.rejections),
                    backlog=config.backlog,
                    file_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    file_limit_raised=raised,
                )
                finish()
        elif args.scenario == "register":
            if factory.registrations == args.expect:
                t = time.perf_counter() - state["first"]
                cpu = time.process_time() - state["cpu_first"]
                emit(
                    event="register",
                    registrations=factory.registrations,
                    seconds=t,
                    rate=factory.registrations / t,
                    proxy_cpu=cpu / t,
                    rejections=dict(factory.rejections),
                )
                finish()

    event = load_event(args.vectors)
    levels = [int(x) for x in args.levels.split(",") if x]
    variants = [v for v in args.variants.split(",") if v]
    # Each round rotates the order of the variants, so that none is always
    # measured first (right after a level change or a collection).
    plan = [
        (v, level)
        for r in range(args.rounds)
        for level in levels
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]
    ]

    def run_roundtrip() -> None:
        agent_ids = sorted(pool.agent_ids())
        pids = sorted(
            {c.metadata["pid"] for c in pool.connections() if isinstance(c.metadata, dict) and "pid" in c.metadata}
        )
        emit(event="ready", connections=len(pool), agents=agent_ids, agent_pids=pids)

        def next_step() -> None:
            if not plan:
                finish()
                return
            variant, level = plan.pop(0)
            swap_tables(pool, variant, args.request_timeout)
            gc.collect()

            def done(result: dict[str, Any]) -> None:
                result.update(event="level", variant=variant, reactor=args.reactor)
                emit(**result)
                reactor.callLater(0.05, next_step)

            ClosedLoop(pool, agent_ids, event, level, args.requests, args.warmup, pids, done).start()

        next_step()

    description = with_backlog(args.listen, config.backlog)
    endpoint = serverFromString(reactor, description)

    def listening(port: Any) -> None:
        address = port.getHost()
        emit(
            event="listening",
            address=_address_text(address),
            pid=os.getpid(),
            reactor=type(reactor).__name__,
            rss=rss0,
        )

    def listen_failed(failure: Any) -> None:
        emit(event="error", error=f"cannot listen on {description}: {failure.value}")
        finish()

    endpoint.listen(factory).addCallbacks(listening, listen_failed)
    if args.dial:
        # Forward mode: dialled connections join the same pool.
        from sentinel_twisted.proxy.pool import PoolObserver

        class Dialled(PoolObserver):
            def agent_registered(self, connection: Any) -> None:
                if connection.mode == "forward":
                    on_registered(connection)

        pool.add_observer(Dialled())
        encodings = tuple(e for e in args.encodings.split(",") if e)
        for i, dialled in enumerate(args.dial):
            pool.connect_agent(
                dialled, f"bench-{chr(97 + i)}", args.dial_connections, config=config, encodings=encodings, clock=reactor
            )
    if args.profile:
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, args.profile)
    else:
        reactor.run()


if __name__ == "__main__":
    main()
