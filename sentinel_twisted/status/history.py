# -*- test-case-name: tests.gateway.test_status_history -*-
"""
L{History}: the last minutes of the metrics, for the status page.

Every C{interval} seconds it keeps a L{Snapshot} of the metrics' totals;
the page subtracts an older one from the totals of the moment to get the
last minute's rates and quantiles, and draws its charts from the
differences between neighbouring snapshots.

Bounded: C{points} snapshots, and only the newest few (those a rate over
the last minute needs) keep their per-agent part.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from twisted.internet.task import LoopingCall

from ._families import quantile
from .metrics import Snapshot

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from ._families import _Histogram
    from .metrics import GatewayMetrics

__all__ = ["HISTORY_INTERVAL", "HISTORY_POINTS", "RATE_WINDOW", "History", "Window"]

#: Seconds between two snapshots.
HISTORY_INTERVAL = 10.0
#: Snapshots kept: 15 minutes' worth.
HISTORY_POINTS = 90
#: The window of the page's rates and quantiles ("the last minute").
RATE_WINDOW = 60.0


def _delta_counts(now: _Histogram, then: _Histogram | None) -> list[int]:
    if then is None or len(then.counts) != len(now.counts):
        return list(now.counts)
    return [a - b for a, b in zip(now.counts, then.counts, strict=True)]


class Window:
    """
    What happened between two snapshots: rates per second and quantiles
    of the histograms over that time.

    @ivar metrics: the metrics the snapshots are of.
    @ivar now: the later snapshot.
    @ivar then: the earlier snapshot, C{None} when there is only one.
    @ivar seconds: the time between them (C{0.0} without C{then}).
    """

    def __init__(self, metrics: GatewayMetrics, now: Snapshot, then: Snapshot | None) -> None:
        self.metrics = metrics
        self.now = now
        self.then = then
        self.seconds = now.at - then.at if then is not None else 0.0

    def rate(self, now: int, then: int) -> float | None:
        """Per second, or C{None} when the window is empty."""
        if self.seconds <= 0:
            return None
        return max(now - then, 0) / self.seconds

    def requests(self, decisions: tuple[str, ...] | None = None) -> float | None:
        """Gateway requests per second (of C{decisions}, or all)."""
        now, then = self.now.requests, self.then.requests if self.then else {}
        keys = decisions if decisions is not None else now.keys()
        return self.rate(sum(now.get(k, 0) for k in keys), sum(then.get(k, 0) for k in keys))

    def code_class(self, klass: str) -> float | None:
        """Responses per second of one status class (C{2xx}, ..., C{none})."""
        then = self.then.code_classes if self.then else {}
        return self.rate(self.now.code_classes.get(klass, 0), then.get(klass, 0))

    def duration(self, q: float) -> float | None:
        """The C{q} quantile of the gateway's request durations."""
        then = self.then.duration if self.then else None
        return quantile(self.metrics.duration_buckets, _delta_counts(self.now.duration, then), q)

    def upstream(self, q: float) -> float | None:
        """The C{q} quantile of the upstream's response times."""
        then = self.then.upstream if self.then else None
        return quantile(self.metrics.upstream_buckets, _delta_counts(self.now.upstream, then), q)

    def round_trip(self, q: float) -> float | None:
        """The C{q} quantile of every agent's round trips."""
        then = self.then.round_trip if self.then else None
        return quantile(self.metrics.round_trip_buckets, _delta_counts(self.now.round_trip, then), q)

    def agent_rate(self, agent_id: str) -> float | None:
        """Answers per second of one agent."""
        now = self.now.agents.get(agent_id)
        if now is None:
            return self.rate(0, 0)
        then = self.then.agents.get(agent_id) if self.then else None
        return self.rate(now.answers.count, then.answers.count if then is not None else 0)

    def agent_round_trip(self, agent_id: str, q: float) -> float | None:
        """The C{q} quantile of one agent's round trips."""
        now = self.now.agents.get(agent_id)
        if now is None:
            return None
        then = self.then.agents.get(agent_id) if self.then else None
        counts = _delta_counts(now.answers, then.answers if then is not None else None)
        return quantile(self.metrics.round_trip_buckets, counts, q)


class History:
    """
    Snapshots of C{metrics} every C{interval} seconds on C{clock}, the
    last C{points} of them.

    @ivar metrics: the metrics it samples.
    @ivar clock: the clock of its sampling (the metrics' by default).
    @ivar interval: seconds between snapshots.
    @ivar window: the seconds rates are taken over (see L{last_window}).
    @ivar samples: the snapshots, oldest first.
    """

    def __init__(
        self,
        metrics: GatewayMetrics,
        clock: IReactorTime | None = None,
        *,
        interval: float = HISTORY_INTERVAL,
        points: int = HISTORY_POINTS,
        window: float = RATE_WINDOW,
    ) -> None:
        self.metrics = metrics
        self.clock = clock if clock is not None else metrics.clock
        self.interval = interval
        self.window = window
        self.samples: deque[Snapshot] = deque(maxlen=points)
        #: How many of the newest samples keep their per-agent totals.
        self._with_agents = int(window // interval) + 2
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        """Take a snapshot now and every C{interval} seconds."""
        if self._loop is not None:
            return
        loop = self._loop = LoopingCall(self.sample)
        loop.clock = self.clock
        loop.start(self.interval, now=True)

    def stop(self) -> None:
        """Take no more snapshots."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def sample(self) -> None:
        """Keep a snapshot of the totals of now."""
        samples = self.samples
        samples.append(self.metrics.snapshot())
        old = len(samples) - self._with_agents - 1
        if old >= 0:
            samples[old].agents = {}

    def last_window(self, now: Snapshot | None = None) -> Window:
        """
        From the newest snapshot at least C{window} seconds old (or the
        oldest there is) to C{now} (by default: the totals of this moment).
        """
        if now is None:
            now = self.metrics.snapshot()
        then = None
        for sample in self.samples:
            if now.at - sample.at >= self.window or then is None:
                then = sample
            else:
                break
        return Window(self.metrics, now, then)

    def steps(self) -> list[Window]:
        """The windows between neighbouring snapshots, oldest first, then up to now."""
        points = [*self.samples, self.metrics.snapshot()]
        return [Window(self.metrics, b, a) for a, b in zip(points, points[1:], strict=False)]
