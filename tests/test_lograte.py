"""
L{sentinel_twisted._lograte}: a line per key per interval, and a count of
the lines held back.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from sentinel_twisted._lograte import LogRate, held_back


class LogRateTests(TestCase):
    def test_first_line_of_a_kind_is_admitted(self) -> None:
        rate = LogRate(Clock(), interval=10)
        self.assertEqual(rate.admit("a"), 0)
        self.assertEqual(rate.admit("b"), 0)

    def test_repeats_within_the_interval_are_held_and_counted(self) -> None:
        clock = Clock()
        rate = LogRate(clock, interval=10)
        rate.admit("a")
        clock.advance(9.5)
        self.assertIsNone(rate.admit("a"))
        self.assertIsNone(rate.admit("a"))
        clock.advance(0.5)
        self.assertEqual(rate.admit("a"), 2)
        self.assertIsNone(rate.admit("a"))
        clock.advance(10)
        self.assertEqual(rate.admit("a"), 1)

    def test_keys_are_bounded(self) -> None:
        rate = LogRate(Clock(), interval=10, max_keys=2)
        rate.admit("a")
        rate.admit("b")
        rate.admit("c")
        self.assertEqual(len(rate._keys), 2)
        # "a" was forgotten: its next line is admitted at once.
        self.assertEqual(rate.admit("a"), 0)
        self.assertIsNone(rate.admit("a"))

    def test_held_back_suffix(self) -> None:
        self.assertEqual(held_back(0), "")
        self.assertEqual(held_back(3), " (3 more like this not logged)")
