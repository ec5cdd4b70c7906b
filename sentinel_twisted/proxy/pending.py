# -*- test-case-name: tests.test_pending -*-
"""
Requests waiting for their answer, keyed by correlation id, with timeouts.

A L{twisted.internet.base.DelayedCall} per request costs a heap push and a
cancel on every round trip.  Requests that share a timeout expire in the
order they were sent, so each distinct timeout gets one insertion-ordered
lane and the table keeps a single timer for the earliest deadline of all
lanes.  Answering a request is two dict deletions; the timer fires about
once per timeout period.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import DuplicateCorrelationId, RequestTimeout

__all__ = ["PendingTable", "Waiter"]

#: The module's logger (a waiter's failing handler is logged here).
log = Logger(namespace="sentinel_twisted.pending")


class Waiter:
    """
    What a pending request fires when its caller wants no Deferred: two
    plain callables and one argument, called as C{answered(result, arg)} or
    C{failed(failure, arg)}.  It has a Deferred's C{callback} and
    C{errback}, so the table fires both alike; an answer costs two calls
    instead of a Deferred's callback chain.  An exception a callable raises
    is logged: it never reaches the frame that fired it.

    @ivar answered: called with the result and C{arg}.
    @ivar failed: called with a L{Failure} and C{arg}.
    @ivar arg: the second argument of both.
    """

    __slots__ = ("answered", "arg", "failed")

    def __init__(self, answered: Callable[[Any, Any], object], failed: Callable[[Failure, Any], object], arg: Any) -> None:
        self.answered = answered
        self.failed = failed
        self.arg = arg

    def callback(self, result: object) -> None:
        """Hand C{result} to C{answered}."""
        try:
            self.answered(result, self.arg)
        except Exception:
            self.answer_handler_failed()

    def errback(self, failure: Failure) -> None:
        """Hand C{failure} to C{failed}."""
        try:
            self.failed(failure, self.arg)
        except Exception:
            log.failure("A waiting request's failure handler {handler!r} failed", handler=self.failed)

    def answer_handler_failed(self) -> None:
        """Log the exception C{answered} raised (call it where it is caught)."""
        log.failure("A waiting request's answer handler {handler!r} failed", handler=self.answered)


class _Pending(Waiter):
    """
    A waiting request.  With C{deferred} C{None}, the entry is its own
    L{Waiter}: the handlers a caller gave L{PendingTable.add} are kept here,
    with no object of their own.
    """

    __slots__ = ("correlation_id", "deferred", "deadline", "sent_at", "timeout", "lane", "notice")

    correlation_id: str
    #: A Deferred, a Waiter, or C{None} (this entry's own handlers).
    deferred: Deferred[Any] | Waiter | None
    deadline: float
    sent_at: float
    timeout: float
    lane: dict[str, _Pending]
    #: A notice (RequestComplete): its timeout is told to nobody but its caller.
    notice: bool

    def fired(self) -> Deferred[Any] | Waiter:
        """What to fire: the Deferred or Waiter, else the entry itself."""
        deferred = self.deferred
        return self if deferred is None else deferred


# Entries are made without Waiter.__init__ (their fields are set one by one).
_new_entry = object.__new__


class PendingTable:
    """
    The pending requests of one connection.

    @param on_cancel: called with C{(correlation_id, reason)} when a waiting
        caller cancels its Deferred, so the agent can be told.
    @param on_timeout: called with the correlation id of a request that
        timed out, just before its caller gets the L{RequestTimeout} (so
        that a Cancel goes out before anything the caller then sends).
    @param counts: the requests waiting now and the requests ever added,
        in this table and every other table given the same list (the
        connections of one pool share one: their reads compare the two);
        by default the table's own.
    """

    # One table per registered connection: no per-instance __dict__.
    __slots__ = ("_clock", "_counts", "_on_cancel", "_on_timeout", "_entries", "_lanes", "_timer", "_timer_at")

    def __init__(
        self,
        clock: IReactorTime,
        on_cancel: Callable[[str], None] | None = None,
        on_timeout: Callable[[str], None] | None = None,
        counts: list[int] | None = None,
    ) -> None:
        self._clock = clock
        self._counts = counts if counts is not None else [0, 0]
        self._on_cancel = on_cancel
        self._on_timeout = on_timeout
        self._entries: dict[str, _Pending] = {}
        self._lanes: dict[float, dict[str, _Pending]] = {}
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, correlation_id: object) -> bool:
        return correlation_id in self._entries

    def correlation_ids(self) -> list[str]:
        """The ids waiting for an answer, oldest first."""
        return list(self._entries)

    def sent_at(self, correlation_id: str) -> float | None:
        """When the request was added (clock seconds), C{None} if it is not waiting."""
        entry = self._entries.get(correlation_id)
        return None if entry is None else entry.sent_at

    def add(
        self,
        correlation_id: str,
        timeout: float,
        waiter: Waiter | None = None,
        answered: Callable[[Any, Any], object] | None = None,
        failed: Callable[[Failure, Any], object] | None = None,
        arg: Any = None,
        notice: bool = False,
    ) -> Any:
        """
        Register a request; the returned Deferred fires with its answer, or
        fails with L{RequestTimeout} after C{timeout} seconds.  With
        C{waiter}, no Deferred: the waiter is fired instead, and returned.
        With C{answered} and C{failed}, neither: they are called as a
        L{Waiter} made of them and C{arg} would be, with no object made for
        them, and C{None} is returned.  A C{notice} (RequestComplete: the
        request it names is over) that times out fails its caller alone:
        C{on_timeout} is not called, so the agent is sent no Cancel for a
        request it was told is over.

        @raise DuplicateCorrelationId: if the id is already waiting.
        @raise TypeError: C{answered} without C{failed} or the other way
            round, or either with C{waiter}.
        """
        if correlation_id in self._entries:
            raise DuplicateCorrelationId(correlation_id)
        if (answered is None) is not (failed is None) or (answered is not None and waiter is not None):
            raise TypeError("PendingTable.add: give answered and failed together, or a waiter, or neither")
        entry: _Pending = _new_entry(_Pending)
        entry.correlation_id = correlation_id
        entry.notice = notice
        if answered is not None:
            entry.deferred = None
            entry.answered = answered
            entry.failed = failed  # type: ignore[assignment]
            entry.arg = arg
        elif waiter is None:
            deferred: Deferred[Any] = Deferred(self._cancelled)
            deferred._sentinel_cid = correlation_id  # type: ignore[attr-defined]
            entry.deferred = deferred
        else:
            entry.deferred = waiter
        now = self._clock.seconds()
        entry.sent_at = now
        entry.timeout = timeout
        deadline = entry.deadline = now + timeout
        lane = self._lanes.get(timeout)
        if lane is None:
            lane = self._lanes[timeout] = {}
        entry.lane = lane
        lane[correlation_id] = entry
        self._entries[correlation_id] = entry
        counts = self._counts
        counts[0] += 1
        counts[1] += 1
        timer = self._timer
        if timer is None:
            self._timer_at = deadline
            self._timer = self._clock.callLater(timeout, self._expire)
        elif deadline < self._timer_at:
            self._timer_at = deadline
            timer.reset(timeout)
        return entry.deferred

    def _remove(self, correlation_id: str) -> _Pending | None:
        """Take a request out of the table: its entry, C{None} if it is not waiting."""
        entry = self._entries.pop(correlation_id, None)
        if entry is None:
            return None
        del entry.lane[correlation_id]
        self._counts[0] -= 1
        return entry

    def pop(self, correlation_id: str) -> Deferred[Any] | Waiter | None:
        """Remove a request; its Deferred (or Waiter) is returned for the caller to fire."""
        entry = self._remove(correlation_id)
        return None if entry is None else entry.fired()

    def take(self, correlation_id: str) -> tuple[Deferred[Any] | Waiter, float] | None:
        """
        Remove a request and return its Deferred (for the caller to fire)
        with the time it was added; C{None} if it is not waiting.  One
        lookup for what an answer needs: routing, latency, resolution.
        """
        entry = self._remove(correlation_id)
        return None if entry is None else (entry.fired(), entry.sent_at)

    def resolve(self, correlation_id: str, result: object) -> bool:
        """Fire the request's Deferred with C{result}; C{False} if unknown."""
        entry = self._remove(correlation_id)
        if entry is None:
            return False
        entry.fired().callback(result)
        return True

    def fail(self, correlation_id: str, error: BaseException) -> bool:
        """Fail one waiting request with C{error}; C{False} if it is not waiting."""
        deferred = self.pop(correlation_id)
        if deferred is None:
            return False
        deferred.errback(Failure(error))
        return True

    def fail_all(self, make_error: Callable[[str], BaseException]) -> int:
        """
        Fail every waiting request at once; C{make_error(correlation_id)}
        builds each caller's error.  Returns how many there were.
        """
        entries, self._entries = self._entries, {}
        lanes, self._lanes = self._lanes, {}
        # Each entry's lane holds it: emptied, or every entry and what its
        # handlers hold (a gateway request) would be left as a cycle for the
        # collector.
        for lane in lanes.values():
            lane.clear()
        self._counts[0] -= len(entries)
        self._stop_timer()
        for cid, entry in entries.items():
            entry.fired().errback(Failure(make_error(cid)))
        return len(entries)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _cancelled(self, deferred: Deferred[Any]) -> None:
        # The caller cancelled the Deferred: forget the request and tell the
        # agent.  Twisted then fails the Deferred with CancelledError.
        cid = deferred._sentinel_cid  # type: ignore[attr-defined]
        entry = self._entries.get(cid)
        if entry is None or entry.deferred is not deferred:
            return
        self._remove(cid)
        if self._on_cancel is not None:
            self._on_cancel(cid)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        expired: list[_Pending] = []
        next_deadline: float | None = None
        for lane in self._lanes.values():
            for entry in lane.values():
                if entry.deadline > now:
                    if next_deadline is None or entry.deadline < next_deadline:
                        next_deadline = entry.deadline
                    break
                expired.append(entry)
        for entry in expired:
            del self._entries[entry.correlation_id]
            del entry.lane[entry.correlation_id]
        self._counts[0] -= len(expired)
        for timeout in [t for t, lane in self._lanes.items() if not lane]:
            del self._lanes[timeout]
        if next_deadline is not None:
            self._timer_at = next_deadline
            self._timer = self._clock.callLater(max(0.0, next_deadline - now), self._expire)
        for entry in expired:
            # The agent is told before the caller: whatever the caller sends
            # next under the same id (the gateway's RequestComplete) must
            # follow the Cancel, or the agent would cancel that instead.
            if self._on_timeout is not None and not entry.notice:
                try:
                    self._on_timeout(entry.correlation_id)
                except Exception:
                    # Every request of the batch still gets its outcome.
                    log.failure("Telling of timed-out request {cid!r} failed", cid=entry.correlation_id)
            entry.fired().errback(Failure(RequestTimeout(entry.timeout, entry.correlation_id)))
