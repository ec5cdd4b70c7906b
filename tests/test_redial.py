"""
L{sentinel_twisted._redial}, what both sides' redialling shares: the count
of failed attempts that only a connection that stayed up resets, and a
ClientService without its own retry line.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sentinel_twisted._redial import BACKOFF_RESET_AFTER, QuietClientService, RedialBackoff

from ._proxy_support import captured_log, log_text


class RedialBackoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.backoff = RedialBackoff(self.clock)

    def test_failed_attempts_count_up_from_one(self) -> None:
        self.assertEqual([self.backoff.attempt_failed() for _ in range(3)], [1, 2, 3])
        self.assertEqual(self.backoff.failures, 3)

    def test_a_connection_lost_before_the_minimum_time_up_is_a_failed_attempt(self) -> None:
        self.backoff.attempt_failed()
        self.backoff.connection_up()
        self.clock.advance(BACKOFF_RESET_AFTER - 0.001)
        self.backoff.connection_lost()
        self.assertEqual(self.backoff.attempt_failed(), 2)

    def test_a_connection_that_stayed_up_starts_the_count_over(self) -> None:
        for _ in range(4):
            self.backoff.attempt_failed()
        self.backoff.connection_up()
        self.assertEqual(self.backoff.failures, 4)
        self.clock.advance(BACKOFF_RESET_AFTER)
        self.assertEqual(self.backoff.failures, 0, "already while the connection is up")
        self.clock.advance(100)
        self.backoff.connection_lost()
        self.assertEqual(self.backoff.attempt_failed(), 1)

    def test_the_time_up_is_taken_when_the_connection_is_lost(self) -> None:
        """A retry asked for long after the loss (a slow close) does not count the wait as time up."""
        self.backoff.attempt_failed()
        self.backoff.connection_up()
        self.backoff.connection_lost()
        self.clock.advance(BACKOFF_RESET_AFTER * 2)
        self.assertEqual(self.backoff.attempt_failed(), 2)

    def test_reset_and_settings(self) -> None:
        self.backoff.attempt_failed()
        self.backoff.reset()
        self.assertEqual(self.backoff.failures, 0)
        self.assertEqual(BACKOFF_RESET_AFTER, 10.0)
        self.assertEqual(RedialBackoff(self.clock, 0.5).reset_after, 0.5)
        self.assertRaises(ValueError, RedialBackoff, self.clock, -1)


@implementer(IStreamClientEndpoint)
class RefusingEndpoint:
    def connect(self, factory: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError())

    def __repr__(self) -> str:
        return "unix:/run/nowhere.sock"


class QuietClientServiceTests(SynchronousTestCase):
    def test_it_logs_no_retry_line_of_its_own(self) -> None:
        clock = MemoryReactorClock()
        delays = []

        def policy(attempt: int) -> float:
            delays.append(attempt)
            return 4.433616460174694

        service = QuietClientService(
            RefusingEndpoint(), Factory.forProtocol(Protocol), retryPolicy=policy, clock=clock
        )
        with captured_log() as events:
            service.startService()
            clock.advance(4.433616460174694)
            service.stopService()
        self.assertEqual(delays, [1, 2])
        self.assertNotIn("Scheduling retry", log_text(events))
        self.assertEqual(events, [])
