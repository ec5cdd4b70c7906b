# -*- test-case-name: tests.test_redial -*-
"""
What the two sides' redialling shares: the proxy dials listening agents
(forward mode) and an agent dials its proxies (reverse mode), each
connection slot through a Twisted L{ClientService}.

L{RedialBackoff} counts the failed attempts in a row that a slot's retry
delay grows with.  A connection that completes its handshake (or
registration) and is lost within L{BACKOFF_RESET_AFTER} seconds counts as
a failed attempt too: a peer that accepts, answers and drops every
connection is redialled with a growing delay, not about once a second
forever.  Only a connection that stays up that long starts the count
over.

L{QuietClientService} is a L{ClientService} without its own retry log
line (C{Scheduling retry 1 to connect ... in 4.433616460174694 seconds}),
which counts attempts since the last transport connection and so always
says "retry 1" for such a peer; each side logs its own line with the
count above.
"""

from __future__ import annotations

from twisted.application.internet import ClientService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import implementer

__all__ = ["BACKOFF_RESET_AFTER", "QuietClientService", "RedialBackoff"]

#: Seconds a connection must stay up after its handshake (or registration)
#: for its end to start the backoff over; one lost sooner counts as a failed
#: attempt.
BACKOFF_RESET_AFTER = 10.0


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: LogEvent) -> None:
        pass


class QuietClientService(ClientService):
    """
    A L{ClientService} whose own log lines go nowhere: the retry policy
    logs each retry with the slot's own count (see L{RedialBackoff}), which
    C{ClientService}'s line would contradict.
    """

    _log = Logger(namespace="sentinel_twisted.redial", observer=_Discard())


class RedialBackoff:
    """
    The failed attempts in a row of one connection slot.

    An attempt fails when it ends without a handshake, and when the
    connection it made is lost less than C{reset_after} seconds after its
    handshake.  Once a connection has been up that long the count is 0.
    No timer: the time up is compared when the count is read.

    @ivar clock: the clock the time up is measured on.
    @ivar reset_after: seconds a connection must stay up to reset the count.
    """

    def __init__(self, clock: IReactorTime, reset_after: float = BACKOFF_RESET_AFTER) -> None:
        if not reset_after >= 0:
            raise ValueError(f"reset_after must not be negative, got {reset_after!r}")
        self.clock = clock
        self.reset_after = reset_after
        self._failures = 0
        self._up_since: float | None = None

    def __repr__(self) -> str:
        return f"<RedialBackoff failures={self.failures} up={self._up_since is not None}>"

    @property
    def failures(self) -> int:
        """Attempts in a row that failed (0 once the connection up now has lasted C{reset_after})."""
        self._settle()
        return self._failures

    def attempt_failed(self) -> int:
        """
        An attempt failed (the retry policy asks for the next delay): count
        it, and return the count (1 for the first in a row).
        """
        self.connection_lost()
        self._failures += 1
        return self._failures

    def connection_up(self) -> None:
        """The slot's connection completed its handshake: its time up starts now."""
        self._up_since = self.clock.seconds()

    def connection_lost(self) -> None:
        """The slot's connection ended (or left the pool): did it last C{reset_after}?"""
        self._settle()
        self._up_since = None

    def reset(self) -> None:
        """Start over (the slot starts dialling anew)."""
        self._failures = 0
        self._up_since = None

    def _settle(self) -> None:
        if self._up_since is not None and self.clock.seconds() - self._up_since >= self.reset_after:
            self._failures = 0
            self._up_since = None
