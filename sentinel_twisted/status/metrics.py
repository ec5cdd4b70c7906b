# -*- test-case-name: tests.gateway.test_status -*-
"""
L{GatewayMetrics}: Prometheus metrics of the listener and the gateway, in
a registry of their own (never the process-global one, so that two
gateways in one process, or a test suite, do not collide).

Counters the gateway bumps per request are plain dicts turned into
metrics when scraped (one thread bumps them: no lock per sample); so are
the listener's own counters (registrations, rejections) and the pool's
state (connections, requests in flight).

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

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from zope.interface import implementer

from .._interfaces import IAgentPoolObserver
from ..messages import CancelReason
from ..pool import PoolObserver

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from ..connection import AgentConnection
    from ..factory import ReverseConnectionFactory
    from ..pool import AgentPool

__all__ = ["LATENCY_BUCKETS", "GatewayMetrics"]

#: Agent round-trip buckets, in seconds: 100 µs to 10 s.
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


class _Latency:
    """One agent's round-trip histogram: plain counters, no lock (one thread)."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def add(self, other: _Latency) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total


class _LatencyCollector(Collector):
    """
    Agent round trips.  Observed once per answer, so kept as plain
    counters (a prometheus_client Histogram takes a lock per observation)
    and turned into a histogram when scraped.
    """

    def __init__(self, latencies: dict[str, _Latency], departed: _Latency) -> None:
        self.latencies = latencies
        self.departed = departed

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "sentinel_agent_round_trip_seconds",
            "Time from sending an event to an agent to its answer, by agent.",
            labels=["agent"],
        )
        for agent_id, latency in sorted(self.latencies.items()):
            family.add_metric([agent_id], _buckets(latency), latency.total)
        yield family
        departed = HistogramMetricFamily(
            "sentinel_agent_round_trip_departed_seconds",
            "Round trips of agents that are no longer connected.",
        )
        departed.add_metric([], _buckets(self.departed), self.departed.total)
        yield departed


_BOUNDS = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]


def _buckets(latency: _Latency) -> list[tuple[str, float]]:
    running = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(_BOUNDS, latency.counts, strict=True):
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


@implementer(IAgentPoolObserver)
class GatewayMetrics(PoolObserver):
    """
    The metrics of one listener and its gateway.  Add it to the pool as an
    observer (L{attach}) to get agent round-trip latencies, and to have the
    series of agents that left folded into the C{*_departed} totals.

    @param departed_grace: seconds an agent whose last connection left
        keeps its own series, in case it comes back (on C{clock}, by
        default the factory's).
    """

    def __init__(
        self,
        pool: AgentPool,
        factory: ReverseConnectionFactory | None = None,
        registry: CollectorRegistry | None = None,
        *,
        clock: IReactorTime | None = None,
        departed_grace: float = 0.0,
    ) -> None:
        if departed_grace < 0:
            raise ValueError(f"departed_grace must not be negative, got {departed_grace!r}")
        if clock is None and factory is not None:
            clock = factory.clock
        if clock is None and departed_grace:
            from twisted.internet import reactor

            clock = reactor
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pool = pool
        self.clock = clock
        self.departed_grace = departed_grace
        self._leaving: dict[str, IDelayedCall] = {}
        self.registry.register(_ListenerCollector(factory, pool))
        self._requests = _CounterFamily(
            "sentinel_gateway_requests",
            "Client requests, by decision (allow, block, redirect, challenge, "
            "unavailable, too_large, client_closed, error).",
            ("decision",),
        )
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
                    self._fail_open,
                    self._upstream,
                ]
            )
        )
        self._per_agent = [
            self._agent_failures,
            self._timeouts,
            self._cancels,
            self._fail_open,
        ]
        self._latencies: dict[str, _Latency] = {}
        self._departed_latency = _Latency()
        self.registry.register(_LatencyCollector(self._latencies, self._departed_latency))

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

    # -- GatewayMetricsSink ------------------------------------------------------

    def request_decided(self, decision: str) -> None:
        """Count a request in C{sentinel_gateway_requests_total}."""
        values = self._requests.values
        key = (decision,)
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
        if agent_id in self.pool or agent_id in self._leaving:
            return
        if not self.departed_grace or self.clock is None:
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
        agent_id = connection.agent_id
        latency = self._latencies.get(agent_id)
        if latency is None:
            latency = self._latencies[agent_id] = _Latency()
        latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency.count += 1
        latency.total += seconds

