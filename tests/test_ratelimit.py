"""
L{LogRateLimiter}: a few lines of each kind per period, the rest counted
and reported once, on the reactor's clock.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import TestCase

from sentinel_twisted._ratelimit import LogRateLimiter

from ._proxy_support import captured_log

log = Logger(namespace="tests.test_ratelimit")


class LogRateLimiterTests(TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.limiter = LogRateLimiter(self.clock, period=10, burst=2)

    def warn(self, n: int, kind: str = "unknown-id") -> list[str]:
        with captured_log() as events:
            for i in range(n):
                self.limiter.warn(log, kind, "Dropped answer {n}", n=i)
        return [formatEvent(e) or "" for e in events]

    def test_a_burst_is_logged_as_it_comes(self) -> None:
        self.assertEqual(self.warn(2), ["Dropped answer 0", "Dropped answer 1"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_rest_are_counted_and_reported_once_when_the_period_ends(self) -> None:
        self.assertEqual(len(self.warn(20_000)), 2)
        self.assertEqual(self.limiter.suppressed("unknown-id"), 19_998)
        with captured_log() as events:
            self.clock.advance(10)
        [line] = [formatEvent(e) for e in events]
        self.assertEqual(
            line, "Dropped answer 19999 (... and 19,997 more like it in the last 10 s)"
        )
        self.assertEqual(events[0]["log_level"].name, "warn")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_single_suppressed_line_is_reported_as_it_was(self) -> None:
        self.warn(3)
        with captured_log() as events:
            self.clock.advance(10)
        self.assertEqual([formatEvent(e) for e in events], ["Dropped answer 2"])

    def test_a_new_period_logs_again(self) -> None:
        self.warn(5)
        self.clock.advance(10)
        self.assertEqual(len(self.warn(5)), 2)

    def test_a_quiet_period_needs_no_timer(self) -> None:
        self.warn(2)
        self.clock.advance(11)
        self.assertEqual(self.warn(2), ["Dropped answer 0", "Dropped answer 1"])

    def test_kinds_are_limited_apart(self) -> None:
        self.warn(5, "a")
        self.assertEqual(len(self.warn(2, "b")), 2)

    def test_flush_reports_now_and_stops_the_timers(self) -> None:
        self.warn(4)
        with captured_log() as events:
            self.limiter.flush()
        self.assertEqual(len(events), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fields_named_like_parameters_are_fine(self) -> None:
        with captured_log() as events:
            self.limiter.warn(log, "k", "a {kind} frame", kind="Ping")
        self.assertEqual(formatEvent(events[0]), "a Ping frame")

    def test_kinds_whose_period_is_over_do_not_pile_up(self) -> None:
        """
        Kinds made per connection slot come and go: at SWEEP_AT records,
        those with nothing left to report are dropped; one with a count
        still to report is kept, and reports it, and so is one whose period
        is not over.
        """
        for i in range(LogRateLimiter.SWEEP_AT - 2):
            self.limiter.info(log, f"slot-{i}", "x")
        self.clock.advance(5)
        self.warn(3, "counting")
        self.limiter.info(log, "fresh", "x")
        self.clock.advance(5)
        self.limiter.info(log, "late", "x")
        self.assertEqual(sorted(self.limiter._windows), ["counting", "fresh", "late"])
        self.limiter.info(log, "fresh", "x")
        self.assertFalse(self.limiter.info(log, "fresh", "x"), "the count of a live kind is kept")
        with captured_log() as events:
            self.clock.advance(5)
        self.assertEqual([formatEvent(e) for e in events], ["Dropped answer 2", "x"])

    def test_made_up_kinds_share_one_record_past_the_limit(self) -> None:
        """
        A peer that makes up a kind per event (an agent id per connection)
        cannot make the limiter hold more than MAX_KINDS records: the new
        kinds share one, and its limit, until the old ones can go.
        """
        limit = LogRateLimiter.MAX_KINDS
        with captured_log() as events:
            for i in range(3 * limit):
                self.limiter.info(log, f"registered:bot-{i}", "Agent {n}", n=i)
        self.assertEqual(len(self.limiter._windows), limit + 1)
        self.assertEqual(len(events), limit + 2)
        self.assertEqual(self.limiter.suppressed(LogRateLimiter.OVERFLOW), 2 * limit - 2)
        with captured_log() as events:
            self.clock.advance(10)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [f"Agent {3 * limit - 1} (... and {2 * limit - 3:,} more like it in the last 10 s)"],
        )
        # Once their period is over the old records go: new kinds have their own again.
        self.assertTrue(self.limiter.info(log, "registered:waf-1", "x"))
        self.assertTrue(self.limiter.info(log, "registered:waf-1", "x"))
        self.assertFalse(self.limiter.info(log, "registered:waf-1", "x"))
        self.assertIn("registered:waf-1", self.limiter._windows)
        self.assertLess(len(self.limiter._windows), LogRateLimiter.SWEEP_AT)

    def test_bad_settings_are_refused(self) -> None:
        self.assertRaises(ValueError, LogRateLimiter, self.clock, period=0)
        self.assertRaises(ValueError, LogRateLimiter, self.clock, burst=0)


class StoppedLimiterTests(TestCase):
    def test_stop_reports_and_then_lets_every_line_through_without_a_timer(self) -> None:
        clock = MemoryReactorClock()
        limiter = LogRateLimiter(clock, burst=1)
        with captured_log() as events:
            for _ in range(3):
                limiter.warn(log, "k", "x")
            limiter.stop()
            for _ in range(3):
                limiter.warn(log, "k", "y")
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["x", "x (... and 1 more like it in the last 10 s)", "y", "y", "y"],
        )
        self.assertEqual(clock.getDelayedCalls(), [])
        limiter.start()
        limiter.warn(log, "k", "z")
        self.assertFalse(limiter.warn(log, "k", "z"))
