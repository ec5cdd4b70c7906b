# -*- test-case-name: tests.gateway.test_status -*-
"""
L{GatewayMetrics}: Prometheus metrics of the listener and the gateway, in
a registry of their own (never the process-global one, so that two
gateways in one process, or a test suite, do not collide).

Counters the gateway bumps per request are plain dicts turned into
metrics when scraped (one thread bumps them: no lock per sample); so are
the listener's own counters (registrations, rejections) and the pool's
state (connections, requests in flight).

Histograms are plain counters too (see C{_families}), turned into
Prometheus histograms when scraped; the status page reads the same
counters (L{GatewayMetrics.snapshot}) for its rates and quantiles.

Per-agent series last as long as their agent: when an agent's last
connection leaves (after an optional grace period, in case it comes back),
its series are removed and their totals added to aggregate
C{*_departed} series without the agent label, so that agents that come
and go do not make every scrape larger.
"""

from __future__ import annotations

from bisect import bisect_left
from math import fsum
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from zope.interface import implementer

from ..proxy._interfaces import IAgentPoolObserver
from ..proxy.pool import PoolObserver
from ._families import (
    _CODE_CLASSES,
    _MAX_DECIDED,
    _cancel_reason,
    _ClosedHistogram,
    _ConnectionHistogram,
    _CounterFamily,
    _CountersCollector,
    _Histogram,
    _HistogramFamily,
    _HistogramsCollector,
    _LatencyCollector,
    _ListenerCollector,
    code_class,
)
from ._families import quantile as quantile

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from ..proxy.connection import AgentConnection
    from ..proxy.factory import ReverseConnectionFactory
    from ..proxy.pool import AgentPool

__all__ = [
    "DECISIONS",
    "LATENCY_BUCKETS",
    "GatewayMetrics",
    "Snapshot",
    "code_class",
    "latency_buckets",
]

#: Every outcome of a gateway request: each has a series from the start,
#: so that a rate of C{error} is 0 rather than missing.
DECISIONS = (
    "allow",
    "block",
    "redirect",
    "challenge",
    "unavailable",
    "too_large",
    "client_closed",
    "client_timeout",
    "bad_request",
    "error",
)

#: How an agent may answer, in C{sentinel_agent_decisions_total}.
AGENT_DECISIONS = ("allow", "block", "redirect", "challenge")

#: The short end of the latency buckets, in seconds: 100 µs to 10 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Longer buckets, used up to the timeout that ends the wait anyway.
_LONGER_BUCKETS = (15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)


def latency_buckets(timeout: float) -> tuple[float, ...]:
    """
    Histogram buckets from 100 µs up to C{timeout} seconds, the timeout
    itself the last: nothing waits longer, and an SLO on "answered within
    the timeout" needs that bucket.
    """
    bounds = [b for b in (*LATENCY_BUCKETS, *_LONGER_BUCKETS) if b < timeout]
    bounds.append(float(timeout))
    return tuple(bounds)


class AgentSnapshot:
    """
    One agent's totals at one moment (see L{Snapshot}).

    @ivar answers: the histogram of its answer times (seconds).
    @ivar decisions: its answers, counted by decision.
    @ivar failures: its failures to answer, counted by reason.
    @ivar timeouts: its events that timed out.
    @ivar cancels: Cancel frames sent to it.
    """

    __slots__ = ("answers", "cancels", "decisions", "failures", "timeouts")

    def __init__(self, answers: _Histogram) -> None:
        self.answers = answers
        self.decisions: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.timeouts = 0
        self.cancels = 0


class Snapshot:
    """
    Every total the status page turns into rates and quantiles, at one
    moment (C{at}, on the metrics' clock): two snapshots a minute apart
    give the last minute's rates.

    @ivar at: when it was taken, in seconds on the metrics' clock.
    @ivar requests: gateway requests, counted by decision.
    @ivar code_classes: responses counted by status class (C{2xx}, ...,
        C{none}).
    @ivar duration: the histogram of request durations (seconds).
    @ivar upstream: the histogram of upstream response times (seconds).
    @ivar round_trip: the histogram of agents' round trips (seconds).
    @ivar fail_open: requests let through because an agent could not answer
        (fail-open).
    @ivar connections: agent connections registered.
    @ivar agents: each agent's totals, by agent id.
    """

    __slots__ = (
        "agents",
        "at",
        "code_classes",
        "connections",
        "duration",
        "fail_open",
        "requests",
        "round_trip",
        "upstream",
    )

    def __init__(self, at: float) -> None:
        self.at = at
        self.requests: dict[str, int] = {}
        self.code_classes: dict[str, int] = {}
        self.duration = _Histogram(0)
        self.upstream = _Histogram(0)
        self.round_trip = _Histogram(0)
        self.fail_open = 0
        self.connections = 0
        self.agents: dict[str, AgentSnapshot] = {}


@implementer(IAgentPoolObserver)
class GatewayMetrics(PoolObserver):
    """
    The metrics of one listener and its gateway.  Add it to the pool as an
    observer (L{attach}) to get agent round-trip latencies, and to have the
    series of agents that left folded into the C{*_departed} totals.

    @param departed_grace: seconds an agent whose last connection left
        keeps its own series, in case it comes back (on C{clock}, by
        default the factory's).
    @param request_timeout: the agents' timeout: the round-trip buckets
        end there (by default the factory's C{--request-timeout}).
    @param upstream_timeout: the upstream's timeout: where its buckets end.
    @param process: whether to export the process and platform metrics
        (C{process_*}, C{python_info}) too.
    @ivar registry: the Prometheus registry its metrics are in.
    @ivar pool: the pool it reports on.
    @ivar factory: the listener it reports on, C{None} for none.
    @ivar clock: the clock of latencies and of C{departed_grace}.
    @ivar departed_grace: seconds a departed agent keeps its own series.
    @ivar duration_buckets: the request duration histogram's bucket bounds
        (seconds).
    @ivar upstream_buckets: the upstream latency histogram's bucket bounds
        (seconds).
    """

    def __init__(
        self,
        pool: AgentPool,
        factory: ReverseConnectionFactory | None = None,
        registry: CollectorRegistry | None = None,
        *,
        clock: IReactorTime | None = None,
        departed_grace: float = 0.0,
        request_timeout: float | None = None,
        upstream_timeout: float = 30.0,
        process: bool = True,
    ) -> None:
        if departed_grace < 0:
            raise ValueError(f"departed_grace must not be negative, got {departed_grace!r}")
        if clock is None and factory is not None:
            clock = factory.clock
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        if request_timeout is None:
            request_timeout = factory.config.request_timeout if factory is not None else 30.0
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pool = pool
        self.factory = factory
        self.clock: IReactorTime = clock
        self.departed_grace = departed_grace
        self._leaving: dict[str, IDelayedCall] = {}
        self.registry.register(_ListenerCollector(factory, pool))
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._requests = _CounterFamily(
            "sentinel_gateway_requests",
            "Client requests, by decision (allow, block, redirect, challenge, "
            "unavailable, too_large, client_closed, client_timeout, bad_request, error).",
            ("decision",),
        )
        for decision in DECISIONS:
            self._requests.values[(decision,)] = 0
        self._agent_failures = _CounterFamily(
            "sentinel_gateway_agent_failures",
            "Agents that could not answer a request, by agent and reason "
            "(unavailable, paused, timeout, disconnected, invalid_answer, cancelled, error).",
            ("agent", "reason"),
        )
        self._timeouts = _CounterFamily(
            "sentinel_agent_timeouts", "Agent events that timed out, by agent.", ("agent",)
        )
        self._cancels = _CounterFamily(
            "sentinel_agent_cancels",
            "Cancel frames sent to agents, by agent and reason.",
            ("agent", "reason"),
        )
        self._decisions = _CounterFamily(
            "sentinel_agent_decisions",
            "Agents' answers, by agent and decision (allow, block, redirect, challenge).",
            ("agent", "decision"),
        )
        self._fail_open = _CounterFamily(
            "sentinel_gateway_fail_open_passes",
            "Requests that went on without an agent that could not answer (--fail-open), "
            "by agent and reason.",
            ("agent", "reason"),
        )
        self._upstream = _CounterFamily(
            "sentinel_gateway_upstream_errors",
            "Upstream failures, by kind (error: 502, timeout: 504).",
            ("kind",),
        )
        self.registry.register(
            _CountersCollector(
                [
                    self._requests,
                    self._agent_failures,
                    self._timeouts,
                    self._cancels,
                    self._decisions,
                    self._fail_open,
                    self._upstream,
                ]
            )
        )
        self._per_agent = [
            self._agent_failures,
            self._timeouts,
            self._cancels,
            self._decisions,
            self._fail_open,
        ]
        #: Bucket bounds of the agents' round trips, of the gateway's
        #: requests end to end, and of the upstream's responses.
        self.round_trip_buckets = latency_buckets(request_timeout)
        self.duration_buckets = latency_buckets(max(request_timeout, upstream_timeout))
        self.upstream_buckets = latency_buckets(upstream_timeout)
        self._duration = _HistogramFamily(
            "sentinel_gateway_request_duration_seconds",
            "Time from a client request's arrival to the end of its response, by status "
            "class (2xx ... 5xx, none: no response) and decision.",
            ("code_class", "decision"),
            self.duration_buckets,
        )
        self._upstream_duration = _HistogramFamily(
            "sentinel_gateway_upstream_duration_seconds",
            "Time from forwarding a request upstream to its response headers (or its "
            "failure), by outcome (response, error, timeout).",
            ("outcome",),
            self.upstream_buckets,
        )
        self.registry.register(_HistogramsCollector([self._duration, self._upstream_duration]))
        size = len(self.round_trip_buckets)
        # An answer's round trip goes into one histogram: its connection's
        # while it is live, its agent's closed total after that.  The
        # agents' and everyone's histograms are sums, made when read.
        #: Round trips of each agent's connections that have left.
        self._closed_latency: dict[str, _ClosedHistogram] = {}
        self._departed_latency = _Histogram(size)
        self._duration_all = _Histogram(len(self.duration_buckets))
        self._upstream_all = _Histogram(len(self.upstream_buckets))
        self._code_classes: dict[str, int] = {}
        #: Each (decision, status) request_decided has seen: its requests
        #: counter key, its status class and its duration histogram.
        self._decided: dict[tuple[str, int], tuple[tuple[str], str, _Histogram]] = {}
        #: The upstream duration histogram of each outcome.
        self._upstream_by_outcome: dict[str, _Histogram] = {}
        #: Round trips by live connection id (folded into its agent's closed
        #: total when it leaves).
        self._by_connection: dict[str, _ConnectionHistogram] = {}
        self.registry.register(
            _LatencyCollector(self.round_trip_buckets, self.agent_round_trips, self._departed_latency)
        )

    def attach(self) -> GatewayMetrics:
        """Start observing the pool; returns itself."""
        self.pool.add_observer(self)
        return self

    def detach(self) -> None:
        """Stop observing the pool."""
        self.pool.remove_observer(self)
        for timer in self._leaving.values():
            if timer.active():
                timer.cancel()
        self._leaving.clear()

    def forget_agent(self, agent_id: str) -> None:
        """
        Fold C{agent_id}'s series into the departed totals: it left, or the
        gateway forgot it (a reload retired it while it was away).
        """
        timer = self._leaving.pop(agent_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        for family in self._per_agent:
            family.forget_agent(agent_id)
        latency = self._closed_latency.pop(agent_id, None)
        if latency is not None:
            self._departed_latency.add(latency)

    def agent_round_trips(self) -> dict[str, _Histogram]:
        """Each connected agent's round trips (its live and closed connections'), as of now."""
        agents = {agent_id: latency.copy() for agent_id, latency in self._closed_latency.items()}
        # Each sum is the exact one, rounded once: a connection that closes
        # then changes no agent's sum (see _ClosedHistogram).
        sums = {agent_id: list(latency.partials) for agent_id, latency in self._closed_latency.items()}
        size = len(self.round_trip_buckets)
        for latency in self._by_connection.values():
            agent_id = latency.agent_id
            mine = agents.get(agent_id)
            if mine is None:
                mine = agents[agent_id] = _Histogram(size)
                sums[agent_id] = []
            mine.add(latency)
            sums[agent_id].append(latency.total)
        for agent_id, mine in agents.items():
            mine.total = fsum(sums[agent_id])
        return agents

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def connection_round_trips(self, connection_id: str) -> _Histogram | None:
        """The round trips of one live connection (C{None} before its first answer)."""
        return self._by_connection.get(connection_id)

    def snapshot(self) -> Snapshot:
        """Every total the status page needs, now."""
        snap = Snapshot(self.clock.seconds())
        snap.requests = {k[0]: v for k, v in self._requests.values.items()}
        snap.code_classes = dict(self._code_classes)
        snap.duration = self._duration_all.copy()
        snap.upstream = self._upstream_all.copy()
        snap.round_trip = everyone = self._departed_latency.copy()
        snap.fail_open = sum(self._fail_open.values.values()) + sum(self._fail_open.departed.values())
        snap.connections = len(self.pool.connections())
        agents = snap.agents
        for agent_id, latency in self.agent_round_trips().items():
            everyone.add(latency)
            agents[agent_id] = AgentSnapshot(latency)
        empty = _Histogram(len(self.round_trip_buckets))

        def agent(agent_id: str) -> AgentSnapshot:
            found = agents.get(agent_id)
            if found is None:
                found = agents[agent_id] = AgentSnapshot(empty.copy())
            return found

        for (agent_id, decision), count in self._decisions.values.items():
            agent(agent_id).decisions[decision] = count
        for (agent_id, reason), count in self._agent_failures.values.items():
            failures = agent(agent_id).failures
            failures[reason] = failures.get(reason, 0) + count
        for (agent_id,), count in self._timeouts.values.items():
            agent(agent_id).timeouts += count
        for (agent_id, _), count in self._cancels.values.items():
            agent(agent_id).cancels += count
        return snap

    # -- GatewayMetricsSink ------------------------------------------------------

    def request_decided(self, decision: str, status: int = 0, seconds: float = 0.0) -> None:
        """
        Count a request in C{sentinel_gateway_requests_total} and observe its
        duration in C{sentinel_gateway_request_duration_seconds}.
        """
        # Once per request: the labelled series are looked up once per
        # decision and status, and one bucket search serves both histograms.
        child = self._decided.get((decision, status))
        if child is None:
            child = self._decided_child(decision, status)
        key, klass, histogram = child
        values = self._requests.values
        values[key] = values.get(key, 0) + 1
        classes = self._code_classes
        classes[klass] = classes.get(klass, 0) + 1
        index = bisect_left(self.duration_buckets, seconds)
        for each in (histogram, self._duration_all):
            each.counts[index] += 1
            each.count += 1
            each.total += seconds

    def _decided_child(self, decision: str, status: int) -> tuple[tuple[str], str, _Histogram]:
        klass = _CODE_CLASSES.get(status // 100, "none") if status < 600 else "none"
        labels = (klass, decision)
        histogram = self._duration.values.get(labels)
        if histogram is None:
            histogram = self._duration.values[labels] = _Histogram(len(self.duration_buckets))
        child = ((decision,), klass, histogram)
        # Decisions are a fixed few; statuses are what upstreams and agents
        # answer, bounded here so that they cannot grow the table at will.
        if len(self._decided) < _MAX_DECIDED:
            self._decided[(decision, status)] = child
        return child

    def upstream_responded(self, outcome: str, seconds: float) -> None:
        """Observe C{sentinel_gateway_upstream_duration_seconds} (response, error, timeout)."""
        histogram = self._upstream_by_outcome.get(outcome)
        if histogram is None:
            labels = (outcome,)
            histogram = self._upstream_duration.values.get(labels)
            if histogram is None:
                histogram = self._upstream_duration.values[labels] = _Histogram(len(self.upstream_buckets))
            self._upstream_by_outcome[outcome] = histogram
        index = bisect_left(self.upstream_buckets, seconds)
        for each in (histogram, self._upstream_all):
            each.counts[index] += 1
            each.count += 1
            each.total += seconds

    def agent_decided(self, agent_id: str, decision: str) -> None:
        """Count C{sentinel_agent_decisions_total}."""
        # The family's inc(), spelled out: this runs per agent answer.
        values = self._decisions.values
        key = (agent_id, decision)
        values[key] = values.get(key, 0) + 1

    def agent_failed(self, agent_id: str, reason: str) -> None:
        """
        Count C{sentinel_gateway_agent_failures_total} (and C{sentinel_agent_timeouts_total} for a timeout).
        """
        self._agent_failures.inc(agent_id, reason)
        if reason == "timeout":
            self._timeouts.inc(agent_id)

    def fail_open_pass(self, agent_id: str, reason: str) -> None:
        """Count C{sentinel_gateway_fail_open_passes_total}."""
        self._fail_open.inc(agent_id, reason)

    def cancel_sent(self, agent_id: str, reason: int) -> None:
        """Count C{sentinel_agent_cancels_total}."""
        self._cancels.inc(agent_id, _cancel_reason(reason))

    def upstream_failed(self, kind: str) -> None:
        """Count C{sentinel_gateway_upstream_errors_total}."""
        self._upstream.inc(kind)

    # -- IAgentPoolObserver ----------------------------------------------------------

    def agent_registered(self, connection: AgentConnection) -> None:
        timer = self._leaving.pop(connection.agent_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def agent_disconnected(self, connection: AgentConnection, reason: str) -> None:
        agent_id = connection.agent_id
        latency = self._by_connection.pop(connection.connection_id, None)
        if latency is not None:
            self._closed_of(agent_id).add(latency)
        if agent_id in self.pool or agent_id in self._leaving:
            return
        if not self.departed_grace:
            self.forget_agent(agent_id)
            return
        self._leaving[agent_id] = self.clock.callLater(
            self.departed_grace, self._grace_over, agent_id
        )

    def _grace_over(self, agent_id: str) -> None:
        del self._leaving[agent_id]
        if agent_id not in self.pool:
            self.forget_agent(agent_id)

    def request_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
        # One histogram per answer (see __init__): this runs per event.
        mine = self._by_connection.get(connection.connection_id)
        if mine is None:
            if connection.is_closed:
                # Read as its connection closes: its agent's closed total.
                self._closed_of(connection.agent_id).observe(self.round_trip_buckets, seconds)
                return
            mine = self._by_connection[connection.connection_id] = _ConnectionHistogram(
                len(self.round_trip_buckets), connection.agent_id
            )
        mine.counts[bisect_left(self.round_trip_buckets, seconds)] += 1
        mine.count += 1
        mine.total += seconds

    def _closed_of(self, agent_id: str) -> _ClosedHistogram:
        """The round trips of C{agent_id}'s connections that left."""
        closed = self._closed_latency.get(agent_id)
        if closed is None:
            closed = self._closed_latency[agent_id] = _ClosedHistogram(len(self.round_trip_buckets))
        return closed
