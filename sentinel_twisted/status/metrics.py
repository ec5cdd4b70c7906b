# -*- test-case-name: tests.gateway.test_status -*-
"""
L{GatewayMetrics}: Prometheus metrics of the listener and the gateway, in
a registry of their own (never the process-global one, so that two
gateways in one process, or a test suite, do not collide).

Counters the gateway bumps per request are plain dicts turned into
metrics when scraped (one thread bumps them: no lock per sample); so are
the listener's own counters (registrations, rejections) and the pool's
state (connections, requests in flight).

Histograms are plain counters too (L{_Histogram}), turned into
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
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from zope.interface import implementer

from ..messages import CancelReason
from ..proxy._interfaces import IAgentPoolObserver
from ..proxy.pool import PoolObserver

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


_CODE_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
#: The most (decision, status) pairs whose series request_decided keeps at hand.
_MAX_DECIDED = 1024


def code_class(status: int) -> str:
    """C{2xx}, C{4xx}, ... of an HTTP status; C{none} when no status was sent."""
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "none"


def _cancel_reason(reason: int) -> str:
    try:
        return CancelReason(reason).name.lower()
    except ValueError:
        return str(reason)


class _CounterFamily:
    """
    A labelled counter kept as a plain dict: bumped once or more per request
    in the reactor thread, so without prometheus_client's per-sample lock.
    """

    __slots__ = ("agent_index", "departed", "documentation", "labels", "name", "values")

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[tuple[str, ...], int] = {}
        #: Where the agent label is, if there is one.
        self.agent_index = labels.index("agent") if "agent" in labels else None
        #: The totals of agents that left, by the other labels.
        self.departed: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0) + 1

    def forget_agent(self, agent_id: str) -> None:
        """Move C{agent_id}'s series into the departed totals."""
        index = self.agent_index
        if index is None:
            return
        values, departed = self.values, self.departed
        for labels in [k for k in values if k[index] == agent_id]:
            rest = labels[:index] + labels[index + 1 :]
            departed[rest] = departed.get(rest, 0) + values.pop(labels)


class _CountersCollector(Collector):
    def __init__(self, families: list[_CounterFamily]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        for family in self.families:
            metric = CounterMetricFamily(family.name, family.documentation, labels=list(family.labels))
            for labels, value in sorted(family.values.items()):
                metric.add_metric(list(labels), value)
            yield metric
            index = family.agent_index
            if index is None:
                continue
            departed = CounterMetricFamily(
                f"{family.name}_departed",
                f"{family.documentation} Totals of agents that are no longer connected.",
                labels=[label for label in family.labels if label != "agent"],
            )
            for labels, value in sorted(family.departed.items()):
                departed.add_metric(list(labels), value)
            yield departed


class _Histogram:
    """One histogram's counters, one per bucket and one past the last: no lock (one thread)."""

    __slots__ = ("count", "counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], seconds: float) -> None:
        self.counts[bisect_left(bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def add(self, other: _Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total

    def copy(self) -> _Histogram:
        twin = _Histogram(len(self.counts) - 1)
        twin.counts = list(self.counts)
        twin.count = self.count
        twin.total = self.total
        return twin


class _HistogramFamily:
    """A labelled histogram kept as plain counters (see L{_CounterFamily})."""

    __slots__ = ("bounds", "documentation", "labels", "name", "values")

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.bounds = bounds
        self.values: dict[tuple[str, ...], _Histogram] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        histogram = self.values.get(labels)
        if histogram is None:
            histogram = self.values[labels] = _Histogram(len(self.bounds))
        histogram.observe(self.bounds, seconds)

    def metric(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for labels, histogram in sorted(self.values.items()):
            family.add_metric(list(labels), _buckets(self.bounds, histogram), histogram.total)
        return family


class _HistogramsCollector(Collector):
    def __init__(self, families: list[_HistogramFamily]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        for family in self.families:
            yield family.metric()


class _LatencyCollector(Collector):
    """
    Agent round trips.  Observed once per answer, so kept as plain
    counters (a prometheus_client Histogram takes a lock per observation)
    and turned into a histogram when scraped.
    """

    def __init__(
        self, bounds: tuple[float, ...], latencies: dict[str, _Histogram], departed: _Histogram
    ) -> None:
        self.bounds = bounds
        self.latencies = latencies
        self.departed = departed

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "sentinel_agent_round_trip_seconds",
            "Time from sending an event to an agent to its answer, by agent.",
            labels=["agent"],
        )
        for agent_id, latency in sorted(self.latencies.items()):
            family.add_metric([agent_id], _buckets(self.bounds, latency), latency.total)
        yield family
        departed = HistogramMetricFamily(
            "sentinel_agent_round_trip_departed_seconds",
            "Round trips of agents that are no longer connected.",
        )
        departed.add_metric([], _buckets(self.bounds, self.departed), self.departed.total)
        yield departed


def _buckets(bounds: tuple[float, ...], histogram: _Histogram) -> list[tuple[str, float]]:
    running = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip([*(repr(float(b)) for b in bounds), "+Inf"], histogram.counts, strict=True):
        running += count
        buckets.append((bound, running))
    return buckets


class _ListenerCollector(Collector):
    """The listener's counters and the pool's state, read at scrape time."""

    def __init__(self, factory: ReverseConnectionFactory | None, pool: AgentPool) -> None:
        self.factory = factory
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        factory = self.factory
        if factory is not None:
            yield CounterMetricFamily(
                "sentinel_agent_registrations",
                "Agent connections that registered successfully.",
                value=factory.registrations,
            )
            rejections = CounterMetricFamily(
                "sentinel_agent_registration_rejections",
                "Refused registrations, by reason.",
                labels=["reason"],
            )
            for reason, count in sorted(factory.rejections.items()):
                rejections.add_metric([reason], count)
            yield rejections
            yield GaugeMetricFamily(
                "sentinel_agent_connections_awaiting_registration",
                "Connections accepted that have not registered yet.",
                value=factory.awaiting_registration,
            )
        pool = self.pool
        yield CounterMetricFamily(
            "sentinel_agent_dial_handshakes",
            "Handshakes with dialled (forward-mode) agents that succeeded.",
            value=pool.dial_handshakes,
        )
        dial_failures = CounterMetricFamily(
            "sentinel_agent_dial_failures",
            "Handshakes with dialled (forward-mode) agents that failed, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(pool.dial_failures.items()):
            dial_failures.add_metric([reason], count)
        yield dial_failures
        connections = GaugeMetricFamily(
            "sentinel_agent_connections",
            "Registered agent connections, by agent.",
            labels=["agent"],
        )
        in_flight = GaugeMetricFamily(
            "sentinel_agent_requests_in_flight",
            "Events sent to agents and not yet answered, by agent.",
            labels=["agent"],
        )
        paused = GaugeMetricFamily(
            "sentinel_agent_connections_paused",
            "Agent connections paused by flow control, by agent.",
            labels=["agent"],
        )
        for agent_id in self.pool.agent_ids():
            conns = self.pool.connections(agent_id)
            connections.add_metric([agent_id], len(conns))
            in_flight.add_metric([agent_id], sum(c.in_flight for c in conns))
            paused.add_metric([agent_id], sum(1 for c in conns if c.is_paused))
        yield connections
        yield in_flight
        yield paused


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """
    The C{q} quantile (0 to 1) of a histogram's bucket counts (not
    cumulative; one past the last bound), interpolated within its bucket
    as Prometheus' C{histogram_quantile} does; C{None} without
    observations.  Past the last bound it is that bound.
    """
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(counts):
        if running + count >= rank and count:
            if index >= len(bounds):
                return bounds[-1] if bounds else None
            lower = bounds[index - 1] if index else 0.0
            upper = bounds[index]
            return lower + (upper - lower) * (rank - running) / count
        running += count
    return bounds[-1] if bounds else None


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
            "unavailable, too_large, client_closed, bad_request, error).",
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
        self._latencies: dict[str, _Histogram] = {}
        self._departed_latency = _Histogram(size)
        #: Every round trip, of the agents connected and departed alike.
        self._round_trip_all = _Histogram(size)
        self._duration_all = _Histogram(len(self.duration_buckets))
        self._upstream_all = _Histogram(len(self.upstream_buckets))
        self._code_classes: dict[str, int] = {}
        #: Each (decision, status) request_decided has seen: its requests
        #: counter key, its status class and its duration histogram.
        self._decided: dict[tuple[str, int], tuple[tuple[str], str, _Histogram]] = {}
        #: The upstream duration histogram of each outcome.
        self._upstream_by_outcome: dict[str, _Histogram] = {}
        #: Round trips by live connection id (removed when it leaves).
        self._by_connection: dict[str, _Histogram] = {}
        self.registry.register(
            _LatencyCollector(self.round_trip_buckets, self._latencies, self._departed_latency)
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
        """Fold C{agent_id}'s series into the departed totals (it left)."""
        for family in self._per_agent:
            family.forget_agent(agent_id)
        latency = self._latencies.pop(agent_id, None)
        if latency is not None:
            self._departed_latency.add(latency)

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
        snap.round_trip = self._round_trip_all.copy()
        snap.fail_open = sum(self._fail_open.values.values()) + sum(self._fail_open.departed.values())
        snap.connections = len(self.pool.connections())
        agents = snap.agents
        for agent_id, latency in self._latencies.items():
            agents[agent_id] = AgentSnapshot(latency.copy())
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
        self._decisions.inc(agent_id, decision)

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
        self._by_connection.pop(connection.connection_id, None)
        agent_id = connection.agent_id
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
        bounds = self.round_trip_buckets
        agent_id = connection.agent_id
        latency = self._latencies.get(agent_id)
        if latency is None:
            latency = self._latencies[agent_id] = _Histogram(len(bounds))
        index = bisect_left(bounds, seconds)
        latency.counts[index] += 1
        latency.count += 1
        latency.total += seconds
        everyone = self._round_trip_all
        everyone.counts[index] += 1
        everyone.count += 1
        everyone.total += seconds
        if connection.is_closed:
            return
        mine = self._by_connection.get(connection.connection_id)
        if mine is None:
            mine = self._by_connection[connection.connection_id] = _Histogram(len(bounds))
        mine.counts[index] += 1
        mine.count += 1
        mine.total += seconds
