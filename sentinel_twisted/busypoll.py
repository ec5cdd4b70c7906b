# -*- test-case-name: tests.test_busypoll -*-
"""
Busy polling: spend CPU to answer sooner when requests come one at a time.

A proxy waiting for an agent's answer blocks in C{epoll_wait}; when the
answer arrives the kernel wakes the process up.  On virtual machines that
wake-up is expensive: when the vCPU halted meanwhile, waking it costs an
exit to the hypervisor and an interrupt, tens of microseconds, paid on
every round trip when requests come one at a time.  With L{BusyPollService}
running, the reactor first checks its sockets without blocking, over and
over, for up to C{spin} seconds, yielding the CPU between checks
(C{sched_yield}, so that an agent on the same CPU runs), and only then
blocks as before.

The cost is CPU: after every wake-up the process keeps its CPU busy for up
to C{spin} seconds, so a proxy that wakes up more often than every C{spin}
seconds keeps a core busy all the time.  An idle proxy spins once after
its last activity, then blocks.  Timers are not delayed: the spin ends
before the reactor's next timed call is due, and the blocking wait that
follows is shortened by the time spent spinning.

It needs the epoll reactor (the default on Linux), whose epoll set is
checked directly; readiness is level-triggered there, so the check consumes
nothing and the reactor's own wait that follows returns at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import Logger

__all__ = ["MAX_SPIN", "BusyPollService", "UnsupportedReactor"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.busypoll")

#: The longest spin, in seconds, that L{BusyPollService} accepts: beyond a
#: few milliseconds a wake-up costs nothing next to the wait.
MAX_SPIN = 0.01


class UnsupportedReactor(Exception):
    """The reactor cannot busy-poll: it is not the epoll reactor."""


class _Spin:
    """
    The reactor's C{doIteration}, first spinning while nothing is ready.

    @ivar iterate: the reactor's own C{doIteration(timeout)}.
    @ivar ready: C{ready()} is true when a socket of the reactor is ready.
    @ivar spin: the longest spin before blocking, in seconds.
    @ivar clock: a monotonic clock in seconds.
    @ivar pause: gives the CPU to another runnable process, if any.
    @ivar hits: spins that ended with a socket ready.
    @ivar misses: spins that ended on time, followed by a blocking wait.
    @ivar active: false once its service stopped: it then calls C{iterate}
        at once (it stays where something else wrapped it).
    """

    def __init__(
        self,
        iterate: Callable[[float | None], None],
        ready: Callable[[], bool],
        spin: float,
        clock: Callable[[], float] = time.monotonic,
        pause: Callable[[], None] = os.sched_yield,
    ) -> None:
        self.iterate = iterate
        self.ready = ready
        self.spin = spin
        self.clock = clock
        self.pause = pause
        self.hits = 0
        self.misses = 0
        self.active = True

    def __call__(self, timeout: float | None) -> None:
        if timeout == 0 or not self.active:
            # Work is due now (a call with no delay, data already read).
            self.iterate(timeout)
            return
        ready, clock, pause = self.ready, self.clock, self.pause
        start = clock()
        deadline = start + (self.spin if timeout is None else min(self.spin, timeout))
        while not ready():
            now = clock()
            if now >= deadline:
                self.misses += 1
                if timeout is not None:
                    timeout = max(0.0, timeout - (now - start))
                self.iterate(timeout)
                return
            pause()
        self.hits += 1
        self.iterate(timeout)


class BusyPollService(service.Service):
    """
    While running, the reactor spins up to C{spin} seconds before each
    blocking wait (see the module's description for the trade-off).

    @ivar spin: the longest spin before blocking, in seconds.
    """

    def __init__(self, spin: float, reactor: Any = None) -> None:
        """
        @param spin: seconds, more than 0 and at most L{MAX_SPIN}.
        @param reactor: the epoll reactor (default: the global reactor).
        @raise ValueError: for a C{spin} out of range.
        @raise UnsupportedReactor: for another reactor than epoll's.
        """
        if not 0 < spin <= MAX_SPIN:
            raise ValueError(f"busy-poll spin must be more than 0 and at most {MAX_SPIN * 1e6:.0f} µs, not {spin!r} s")
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        poller = _epoll_of(reactor)
        self.spin = spin
        self._reactor = reactor
        self._ready: Callable[[], bool] = lambda: bool(poller.poll(0, 1))
        #: The spin in place while running (a new one each start, around
        #: whatever C{doIteration} the reactor has then).
        self._spinner: _Spin | None = None
        #: What the reactor's instance had as C{doIteration} before the
        #: spin went in (L{_CLASS}: nothing, the class's own).
        self._previous: Any = _CLASS
        #: Hits and misses of the spins of earlier runs.
        self._counted = (0, 0)

    @property
    def hits(self) -> int:
        """Spins that ended with a socket ready, since the service was made."""
        spinner = self._spinner
        return self._counted[0] + (spinner.hits if spinner is not None else 0)

    @property
    def misses(self) -> int:
        """Spins that ended on time and went on to block."""
        spinner = self._spinner
        return self._counted[1] + (spinner.misses if spinner is not None else 0)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        reactor = self._reactor
        # Around the reactor's doIteration as it is now: another wrapper
        # (or another BusyPollService) installed before this start keeps
        # working, and comes back when this service stops.
        self._previous = reactor.__dict__.get("doIteration", _CLASS)
        self._spinner = _Spin(reactor.doIteration, self._ready, self.spin)
        reactor.doIteration = self._spinner
        log.info("Busy polling: up to {micros:.0f} µs before each wait", micros=self.spin * 1e6)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        spinner, self._spinner = self._spinner, None
        if spinner is None:
            return
        self._counted = (self._counted[0] + spinner.hits, self._counted[1] + spinner.misses)
        reactor = self._reactor
        if reactor.__dict__.get("doIteration") is spinner:
            if self._previous is _CLASS:
                del reactor.doIteration
            else:
                reactor.doIteration = self._previous
        else:
            # Something wrapped the spin since: it stays in place, and no
            # longer spins.
            spinner.active = False
        self._previous = _CLASS


#: L{BusyPollService._previous} when the reactor used its class's C{doIteration}.
_CLASS: Any = object()


def _epoll_of(reactor: Any) -> Any:
    """The epoll object of C{reactor}, an epoll reactor."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        epoll: Any = None
    else:
        epoll = EPollReactor
    if epoll is None or not isinstance(reactor, epoll):
        raise UnsupportedReactor(
            f"busy polling needs the epoll reactor (twistd --reactor=epoll), not {type(reactor).__name__}"
        )
    return reactor._poller
