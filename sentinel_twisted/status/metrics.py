# -*- test-case-name: tests.gateway.test_status -*-
"""
L{GatewayMetrics}: Prometheus metrics of the listener and the gateway, in
a registry of their own (never the process-global one, so that two
gateways in one process, or a test suite, do not collide).

Counters the gateway bumps per request are bound to their labels once and
cached; the listener's own counters (registrations, rejections) and the
pool's state (connections, requests in flight) are read when scraped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from zope.interface import implementer

from .._interfaces import IAgentPoolObserver
from ..messages import CancelReason

if TYPE_CHECKING:
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
class GatewayMetrics:
    """
    The metrics of one listener and its gateway.  Add it to the pool as an
    observer (L{attach}) to get agent round-trip latencies.
    """

    def __init__(
        self,
        pool: AgentPool,
        factory: ReverseConnectionFactory | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pool = pool
        self.registry.register(_ListenerCollector(factory, pool))
        self._requests = Counter(
            "sentinel_gateway_requests",
            "Client requests, by decision (allow, block, redirect, challenge, "
            "unavailable, too_large, client_closed).",
            ["decision"],
            registry=self.registry,
        )
        self._agent_failures = Counter(
            "sentinel_gateway_agent_failures",
            "Agents that could not answer a request, by agent and reason "
            "(unavailable, paused, timeout, disconnected, invalid_answer, cancelled, error).",
            ["agent", "reason"],
            registry=self.registry,
        )
        self._timeouts = Counter(
            "sentinel_agent_timeouts",
            "Agent events that timed out, by agent.",
            ["agent"],
            registry=self.registry,
        )
        self._cancels = Counter(
            "sentinel_agent_cancels",
            "Cancel frames sent to agents, by agent and reason.",
            ["agent", "reason"],
            registry=self.registry,
        )
        self._fail_open = Counter(
            "sentinel_gateway_fail_open_passes",
            "Requests that went on without an agent that could not answer (--fail-open), "
            "by agent and reason.",
            ["agent", "reason"],
            registry=self.registry,
        )
        self._upstream = Counter(
            "sentinel_gateway_upstream_errors",
            "Upstream failures, by kind (error: 502, timeout: 504).",
            ["kind"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "sentinel_agent_round_trip_seconds",
            "Time from sending an event to an agent to its answer, by agent.",
            ["agent"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[Any, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def attach(self) -> GatewayMetrics:
        self.pool.add_observer(self)
        return self

    def detach(self) -> None:
        self.pool.remove_observer(self)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # -- GatewayMetricsSink ------------------------------------------------------

    def request_decided(self, decision: str) -> None:
        self._child(self._requests, decision).inc()

    def agent_failed(self, agent_id: str, reason: str) -> None:
        self._child(self._agent_failures, agent_id, reason).inc()
        if reason == "timeout":
            self._child(self._timeouts, agent_id).inc()

    def fail_open_pass(self, agent_id: str, reason: str) -> None:
        self._child(self._fail_open, agent_id, reason).inc()

    def cancel_sent(self, agent_id: str, reason: int) -> None:
        self._child(self._cancels, agent_id, _cancel_reason(reason)).inc()

    def upstream_failed(self, kind: str) -> None:
        self._child(self._upstream, kind).inc()

    # -- IAgentPoolObserver ----------------------------------------------------------

    def request_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
        self._child(self._latency, connection.agent_id).observe(seconds)

    def agent_registered(self, connection: AgentConnection) -> None:
        pass

    def agent_disconnected(self, connection: AgentConnection, reason: str) -> None:
        pass

    def health_changed(self, connection: AgentConnection, state: int | None) -> None:
        pass

    def flow_control_changed(self, connection: AgentConnection, paused: bool) -> None:
        pass

    def metrics_reported(self, connection: AgentConnection, report: dict[str, Any]) -> None:
        pass

    def config_update_requested(self, connection: AgentConnection, request: dict[str, Any]) -> None:
        pass
