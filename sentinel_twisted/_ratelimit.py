# -*- test-case-name: tests.test_ratelimit -*-
"""
L{LogRateLimiter}: repeated log lines of one kind, a few per period; the
rest are counted and reported in one line when the period ends.

A peer can make the proxy log a line per frame or per connection (answers
for unknown correlation ids, refused registrations, invalid messages).
Going through a limiter, 20,000 such events make a handful of lines and
one C{"... (... and 19,874 more like it in the last 10 s)"}.  Time is the
reactor's clock, so a test drives it with a C{MemoryReactorClock}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel

__all__ = ["LogRateLimiter"]


class _Window:
    __slots__ = ("count", "last", "start", "suppressed", "timer")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0
        self.last: tuple[Logger, LogLevel, str, dict[str, Any]] | None = None
        self.timer: IDelayedCall | None = None


class LogRateLimiter:
    """
    At most C{burst} lines of each kind per C{period} seconds.

    The first C{burst} events of a period are logged as they come; the
    others are counted, and when the period ends the last of them is logged
    with how many more there were.  A timer runs only while a period has
    suppressed something.

    Kinds are names the code chooses (C{"unknown-correlation-id"}, one per
    connection slot: C{"dial-3:retry"}, or one per agent id: C{"registered:"}
    and the id).  The limiter keeps one small record per kind, and once it
    holds L{SWEEP_AT} records it drops those whose period is over with
    nothing left to report, so kinds that come and go do not pile up.  A
    peer that makes up kinds (an agent id per connection) cannot make it
    hold more than L{MAX_KINDS}: past that, new kinds share one record,
    and so one limit, until old ones can be dropped.
    """

    #: Records held before the first sweep of those whose period is over.
    SWEEP_AT = 256
    #: The most records held for kinds of their own; new kinds beyond it
    #: share the record of L{OVERFLOW}.
    MAX_KINDS = 4096
    #: The kind that new kinds share once L{MAX_KINDS} are held.
    OVERFLOW = "(kinds over the limit)"

    def __init__(self, clock: IReactorTime, period: float = 10.0, burst: int = 5) -> None:
        if not period > 0:
            raise ValueError(f"period must be positive, got {period!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.clock = clock
        self.period = period
        self.burst = burst
        self._windows: dict[str, _Window] = {}
        self._stopped = False
        self._sweep_at = self.SWEEP_AT
        # When the records are all alive, none can be dropped before this.
        self._no_sweep_before = 0.0

    def emit(
        self, logger: Logger, level: LogLevel, kind: str, format: str, /, **fields: Any
    ) -> bool:
        """Log C{format} with C{fields} unless C{kind} is over its rate;
        C{True} if it was logged now."""
        if self._stopped:
            logger.emit(level, format, **fields)
            return True
        now = self.clock.seconds()
        window = self._windows.get(kind)
        if window is None and len(self._windows) >= self._sweep_at:
            if now >= self._no_sweep_before:
                self._sweep(now)
            if len(self._windows) >= self.MAX_KINDS:
                kind = self.OVERFLOW
                window = self._windows.get(kind)
        if window is None or (window.timer is None and now - window.start >= self.period):
            window = self._windows[kind] = _Window(now)
        window.count += 1
        if window.count <= self.burst:
            logger.emit(level, format, **fields)
            return True
        window.suppressed += 1
        window.last = (logger, level, format, fields)
        if window.timer is None:
            window.timer = self.clock.callLater(
                max(0.0, window.start + self.period - now), self._close, kind
            )
        return False

    def warn(self, logger: Logger, kind: str, format: str, /, **fields: Any) -> bool:
        return self.emit(logger, LogLevel.warn, kind, format, **fields)

    def info(self, logger: Logger, kind: str, format: str, /, **fields: Any) -> bool:
        return self.emit(logger, LogLevel.info, kind, format, **fields)

    def debug(self, logger: Logger, kind: str, format: str, /, **fields: Any) -> bool:
        return self.emit(logger, LogLevel.debug, kind, format, **fields)

    def suppressed(self, kind: str) -> int:
        """Events of C{kind} counted and not yet reported."""
        window = self._windows.get(kind)
        return 0 if window is None else window.suppressed

    def stop(self) -> None:
        """
        Report every count now, and from now on let every line through
        without a timer (the listener stopped: what is left to log is
        bounded, and no timer outlives the service).
        """
        self.flush()
        self._stopped = True

    def start(self) -> None:
        """Limit again (after L{stop})."""
        self._stopped = False

    def flush(self) -> None:
        """Report every count now and stop the timers."""
        for kind in [k for k, w in self._windows.items() if w.timer is not None]:
            window = self._windows[kind]
            timer = window.timer
            if timer is not None and timer.active():
                timer.cancel()
            self._close(kind)

    def _sweep(self, now: float) -> None:
        # A window whose period is over and that has no timer holds nothing
        # to report: the next event of its kind would start a new one anyway.
        for kind in [
            k for k, w in self._windows.items() if w.timer is None and now - w.start >= self.period
        ]:
            del self._windows[kind]
        # Kinds all alive: sweep again only once as many more have come (or
        # at the limit, once the oldest can go: not at every new kind).
        self._sweep_at = min(max(self.SWEEP_AT, 2 * len(self._windows)), self.MAX_KINDS)
        oldest = min((w.start for w in self._windows.values()), default=now)
        self._no_sweep_before = oldest + self.period

    def _close(self, kind: str) -> None:
        window = self._windows.pop(kind)
        window.timer = None
        if window.last is None:
            return
        logger, level, format, fields = window.last
        more = window.suppressed - 1
        if more:
            format += " (... and {rate_limited_more} more like it in the last {rate_limited_period})"
            fields = dict(
                fields,
                rate_limited_more=f"{more:,}",
                rate_limited_period=f"{self.period:g} s",
            )
        logger.emit(level, format, **fields)
