# -*- test-case-name: tests.gateway.test_hardening -*-
"""
L{DeadlineChannel}: an HTTP/1.1 channel of C{twisted.web} with a deadline
for each request head, checked by one timer per connection.  The gateway's
client connections and the status site's are both such channels.

twisted.web's own idle timeout starts over with every byte read, so a
client that sends a byte of a head now and then holds its connection for
ever; a connection cap then lets a few such clients lock everyone else
out.  The head's deadline does not move while the head arrives.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web import http

__all__ = ["TIMEOUT_RESPONSE", "DeadlineChannel"]

#: What a client gets when it was too slow: C{408}, and the connection closes.
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class DeadlineChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection whose client has C{header_timeout} seconds for
    each request head.

    The head's deadline runs whenever a request head is awaited: from the
    connection's start, and from the end of each response on a kept-alive
    connection, until the head's last line.  Bytes arriving do not move it.
    A client that has sent part of a head by then gets C{408}; an idle one
    is closed without a word.  A connection being closed awaits no head.

    One timer per connection checks the deadline: it re-arms itself for the
    earliest deadline due, and lapses when none runs.  A subclass checks
    deadlines of its own with the same timer (L{_check_other_deadlines},
    L{_arm}).

    @cvar header_timeout: seconds a client has to send a whole request head;
        C{None}: no limit.
    @cvar head_timeout_line: the warning logged (through L{_warn}) when a
        client part-way through a head is cut off; C{{timeout}} is
        C{header_timeout}.
    @ivar persistent: whether the connection stays open after the response
        (C{False} once it is being closed).
    """

    header_timeout: float | None = None
    head_timeout_line = "A client sent no complete request head in {timeout}s; answering 408"
    #: The site; its C{reactor} is the deadlines' clock.
    site: Any
    # When the awaited head is due (reactor seconds); None: no head awaited.
    _head_deadline: float | None = None
    # Whether a byte arrived since the head was awaited.
    _head_started = False
    _timer: IDelayedCall | None = None
    # When the timer fires (reactor seconds); inf: there is none.
    _timer_at = math.inf

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._await_head()

    def resetTimeout(self) -> None:
        # Called on every read (twisted.web's idle timeout starts over): an
        # awaited head has started, and its deadline stays.
        if self._head_deadline is not None:
            self._head_started = True
        super().resetTimeout()  # type: ignore[no-untyped-call]

    def _await_head(self) -> None:
        timeout = self.header_timeout
        if timeout and self._head_deadline is None:
            self._head_started = False
            now = self.site.reactor.seconds()
            self._head_deadline = deadline = now + timeout
            if self._timer_at > deadline:
                self._arm(now, deadline)

    def _arm(self, now: float, due: float) -> None:
        """Have the timer fire by C{due} (reactor seconds)."""
        if due < self._timer_at:
            self._timer_at = due
            timer = self._timer
            if timer is None:
                self._timer = self.callLater(max(due - now, 0.0), self._check_deadlines)  # type: ignore[no-untyped-call]
            else:
                timer.reset(max(due - now, 0.0))

    def _stop_timer(self) -> None:
        """No more deadlines: the timer is cancelled."""
        self._head_deadline = None
        timer, self._timer = self._timer, None
        self._timer_at = math.inf
        if timer is not None and timer.active():
            timer.cancel()

    def _check_deadlines(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.transport is None:
            return
        now = self.site.reactor.seconds()
        due = self._check_other_deadlines(now)
        if due is None:
            return
        deadline = self._head_deadline
        if deadline is not None:
            if deadline <= now:
                self._head_deadline = None
                self._head_timed_out()
                return
            due = min(due, deadline)
        if due != math.inf:
            self._arm(now, due)

    def _check_other_deadlines(self, now: float) -> float | None:
        """
        A subclass's own deadlines, checked before the head's: when the
        earliest of those still to come is due (C{inf}: none), or C{None}
        once one that passed has been acted on (nothing more is checked).
        """
        return math.inf

    def _head_timed_out(self) -> None:
        transport: Any = self.transport
        if self._head_started:
            self._warn("head_timeout", self.head_timeout_line, timeout=self.header_timeout)
            transport.write(TIMEOUT_RESPONSE)
        self.persistent = False
        self._close(transport)

    def _warn(self, kind: str, format: str, /, **fields: Any) -> None:
        """Log a warning about what a client did, a few per period (a subclass's limiter)."""
        raise NotImplementedError

    def _close(self, transport: Any) -> None:
        """Close the connection once its last bytes are sent."""
        transport.loseConnection()

    def allHeadersReceived(self) -> None:
        """The head is complete: its deadline no longer applies."""
        self._head_deadline = None
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Any) -> None:
        # Before the parent replays pipelined data: that may hold the next
        # head already, whose end stops this deadline again.
        if self.persistent:
            self._await_head()
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def loseConnection(self) -> None:
        # A 400 or the last response is the last word: no 408 after it.
        self._head_deadline = None
        super().loseConnection()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._stop_timer()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
