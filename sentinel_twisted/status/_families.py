# -*- test-case-name: tests.gateway.test_status -*-
"""
The building blocks of L{GatewayMetrics <sentinel_twisted.status.metrics.GatewayMetrics>}:
counters and histograms kept as plain numbers and the collectors that turn
them, and the listener's and the pool's state, into Prometheus metrics when
scraped; quantiles of a histogram for the status page.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from math import fsum
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..messages import CancelReason

if TYPE_CHECKING:

    from ..proxy.factory import ReverseConnectionFactory
    from ..proxy.pool import AgentPool


__all__ = ["code_class", "listener_families", "quantile"]

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


class _ConnectionHistogram(_Histogram):
    """One live connection's round trips, with the agent it belongs to."""

    __slots__ = ("agent_id",)

    def __init__(self, size: int, agent_id: str) -> None:
        super().__init__(size)
        self.agent_id = agent_id


class _ClosedHistogram(_Histogram):
    """
    The round trips of an agent's connections that left, their sum kept
    exact: an agent's sum is this one's and its live connections', added
    when read, and it must never go down (Prometheus takes a counter that
    does for a restart).  Sums of floats taken in another order can come
    out lower, as C{(0.3 + 0.1) + 0.2 > (0.3 + 0.2) + 0.1} does; the exact
    sum, rounded once (L{math.fsum}), cannot.

    @ivar partials: floats whose exact sum is the round trips' sum
        (non-overlapping, as C{math.fsum} keeps them: a few at most).
    """

    __slots__ = ("partials",)

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.partials: list[float] = []

    def add(self, other: _Histogram) -> None:
        super().add(other)
        self._add_exactly(other.total)

    def observe(self, bounds: tuple[float, ...], seconds: float) -> None:
        super().observe(bounds, seconds)
        self._add_exactly(seconds)

    def _add_exactly(self, value: float) -> None:
        # Shewchuk's algorithm, as math.fsum runs it.
        partials = self.partials
        i = 0
        for other in partials:
            if abs(value) < abs(other):
                value, other = other, value
            high = value + other
            low = other - (high - value)
            if low:
                partials[i] = low
                i += 1
            value = high
        partials[i:] = [value]
        self.total = fsum(partials)


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

    @param agents: returns each connected agent's round trips.
    """

    def __init__(
        self, bounds: tuple[float, ...], agents: Callable[[], dict[str, _Histogram]], departed: _Histogram
    ) -> None:
        self.bounds = bounds
        self.agents = agents
        self.departed = departed

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "sentinel_agent_round_trip_seconds",
            "Time from sending an event to an agent to its answer, by agent.",
            labels=["agent"],
        )
        for agent_id, latency in sorted(self.agents().items()):
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


def _by_reason(name: str, documentation: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter family labelled by C{reason}, one series per reason, sorted."""
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


def listener_families(factory: ReverseConnectionFactory) -> Iterable[Metric]:
    """The listener's registration counters: registrations, refusals by reason, awaiting."""
    yield CounterMetricFamily(
        "sentinel_agent_registrations",
        "Agent connections that registered successfully.",
        value=factory.registrations,
    )
    yield _by_reason(
        "sentinel_agent_registration_rejections", "Refused registrations, by reason.", factory.rejections
    )
    yield GaugeMetricFamily(
        "sentinel_agent_connections_awaiting_registration",
        "Connections accepted that have not registered yet.",
        value=factory.awaiting_registration,
    )


class _ListenerCollector(Collector):
    """The listener's counters and the pool's state, read at scrape time."""

    def __init__(self, factory: ReverseConnectionFactory | None, pool: AgentPool) -> None:
        self.factory = factory
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        if self.factory is not None:
            yield from listener_families(self.factory)
        pool = self.pool
        yield CounterMetricFamily(
            "sentinel_agent_dial_handshakes",
            "Handshakes with dialled (forward-mode) agents that succeeded.",
            value=pool.dial_handshakes,
        )
        yield _by_reason(
            "sentinel_agent_dial_failures",
            "Handshakes with dialled (forward-mode) agents that failed, by reason.",
            pool.dial_failures,
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
