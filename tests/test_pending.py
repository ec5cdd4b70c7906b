"""
L{PendingTable}: requests waiting for their answers, with one timer for the
whole table and every request ending exactly once.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from sentinel_twisted.errors import ConnectionClosed, DuplicateCorrelationId, RequestTimeout
from sentinel_twisted.proxy.pending import PendingTable, Waiter


class Outcomes:
    """Records how each Deferred ended (and that it ended only once)."""

    def __init__(self) -> None:
        self.results: dict[str, list[Any]] = {}

    def watch(self, name: str, deferred: Deferred[Any]) -> None:
        self.results[name] = []
        deferred.addBoth(self.results[name].append)

    def value(self, name: str) -> Any:
        [outcome] = self.results[name]
        return outcome

    def error(self, name: str) -> BaseException:
        outcome = self.value(name)
        assert isinstance(outcome, Failure), f"{name} did not fail: {outcome!r}"
        return outcome.value

    def waiting(self) -> list[str]:
        return [name for name, got in self.results.items() if not got]


class PendingTableTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cancelled: list[str] = []
        self.timed_out: list[str] = []
        self.table = PendingTable(
            self.clock, on_cancel=self.cancelled.append, on_timeout=self.timed_out.append
        )
        self.outcomes = Outcomes()

    def add(self, cid: str, timeout: float = 30.0) -> Deferred[Any]:
        deferred = self.table.add(cid, timeout)
        self.outcomes.watch(cid, deferred)
        return deferred

    def test_resolve_fires_the_deferred_with_the_answer(self) -> None:
        self.add("a")
        self.assertTrue(self.table.resolve("a", "answer"))
        self.assertEqual(self.outcomes.value("a"), "answer")
        self.assertEqual(len(self.table), 0)

    def test_resolve_of_unknown_id_is_false(self) -> None:
        self.assertFalse(self.table.resolve("nobody", "answer"))

    def test_resolve_twice_fires_once(self) -> None:
        self.add("a")
        self.table.resolve("a", 1)
        self.assertFalse(self.table.resolve("a", 2))
        self.assertEqual(self.outcomes.value("a"), 1)

    def test_duplicate_correlation_id_is_refused(self) -> None:
        self.add("a")
        with self.assertRaises(DuplicateCorrelationId) as caught:
            self.table.add("a", 30)
        self.assertIn("'a' is already in flight", str(caught.exception))
        self.assertEqual(len(self.table), 1)

    def test_an_answered_id_may_be_reused(self) -> None:
        self.add("a")
        self.table.resolve("a", 1)
        self.table.add("a", 30)
        self.assertIn("a", self.table)

    def test_one_timer_for_many_requests(self) -> None:
        for i in range(100):
            self.add(f"r{i}")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_request_times_out_after_its_timeout(self) -> None:
        self.add("a", 30)
        self.clock.advance(29.999)
        self.assertEqual(self.outcomes.waiting(), ["a"])
        self.clock.advance(0.001)
        error = self.outcomes.error("a")
        self.assertIsInstance(error, RequestTimeout)
        self.assertEqual(str(error), "Timeout after 30s")
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.timed_out, ["a"])

    def test_timeout_text_uses_rust_duration_format(self) -> None:
        self.add("a", 0.2)
        self.clock.advance(0.2)
        self.assertEqual(str(self.outcomes.error("a")), "Timeout after 200ms")

    def test_answered_request_does_not_time_out(self) -> None:
        self.add("a", 5)
        self.table.resolve("a", "ok")
        self.clock.advance(10)
        self.assertEqual(self.outcomes.value("a"), "ok")
        self.assertEqual(self.timed_out, [])

    def test_timer_stops_when_nothing_is_pending(self) -> None:
        self.add("a", 5)
        self.table.resolve("a", "ok")
        self.clock.advance(5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requests_sent_later_expire_later(self) -> None:
        self.add("a", 10)
        self.clock.advance(4)
        self.add("b", 10)
        self.clock.advance(6)
        self.assertIsInstance(self.outcomes.error("a"), RequestTimeout)
        self.assertEqual(self.outcomes.waiting(), ["b"])
        self.clock.advance(4)
        self.assertIsInstance(self.outcomes.error("b"), RequestTimeout)

    def test_timer_is_pulled_forward_after_an_expiry(self) -> None:
        # After the 10 s lane expired the timer waits for the 20 s one; a
        # 5 s request added then must still fire at 5 s, not at 20 s.
        self.add("ten", 10)
        self.add("twenty", 20)
        self.clock.advance(10)
        self.assertIsInstance(self.outcomes.error("ten"), RequestTimeout)
        self.add("five", 5)
        self.clock.advance(4.9)
        self.assertEqual(self.outcomes.waiting(), ["twenty", "five"])
        self.clock.advance(0.1)
        self.assertIsInstance(self.outcomes.error("five"), RequestTimeout)
        self.assertEqual(self.outcomes.waiting(), ["twenty"])

    def test_empty_timeout_lanes_are_removed(self) -> None:
        for i, timeout in enumerate((1.0, 2.0, 3.0)):
            self.add(f"r{i}", timeout)
        self.table.resolve("r1", "answer")
        self.clock.advance(1)
        self.assertEqual(sorted(self.table._lanes), [3.0])
        self.clock.advance(2)
        self.assertEqual(self.table._lanes, {})

    def test_shorter_timeout_added_later_expires_first(self) -> None:
        self.add("long", 30)
        self.clock.advance(1)
        self.add("short", 2)
        self.clock.advance(2)
        self.assertIsInstance(self.outcomes.error("short"), RequestTimeout)
        self.assertEqual(self.outcomes.waiting(), ["long"])
        self.clock.advance(26.9)
        self.assertEqual(self.outcomes.waiting(), ["long"])
        self.clock.advance(0.1)
        self.assertIsInstance(self.outcomes.error("long"), RequestTimeout)

    def test_mixed_timeouts_each_expire_at_their_own_deadline(self) -> None:
        # Times are multiples of 1/64 s, exact in binary floating point.
        epsilon = 1 / 64
        deadlines = {}
        for i, timeout in enumerate([5, 1, 3, 5, 1, 10, 3, 0.75]):
            self.clock.advance(1 / 16)
            cid = f"r{i}"
            self.add(cid, timeout)
            deadlines[cid] = self.clock.seconds() + timeout
        for deadline in sorted(set(deadlines.values())):
            due = sorted(cid for cid, d in deadlines.items() if d == deadline)
            self.clock.advance(deadline - epsilon - self.clock.seconds())
            for cid in due:
                self.assertEqual(self.outcomes.results[cid], [], f"{cid} expired early")
            self.clock.advance(epsilon)
            for cid in due:
                self.assertIsInstance(self.outcomes.error(cid), RequestTimeout)
            later = [cid for cid, d in deadlines.items() if d > deadline]
            self.assertEqual(sorted(self.outcomes.waiting()), sorted(later))
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answers_in_between_do_not_disturb_other_timeouts(self) -> None:
        self.add("a", 5)
        self.add("b", 5)
        self.add("c", 7)
        self.table.resolve("a", "ok")
        self.clock.advance(5)
        self.assertIsInstance(self.outcomes.error("b"), RequestTimeout)
        self.assertEqual(self.outcomes.waiting(), ["c"])
        self.clock.advance(2)
        self.assertEqual(self.outcomes.waiting(), [])

    def test_timed_out_id_is_free_again(self) -> None:
        self.add("a", 1)
        self.clock.advance(1)
        self.table.add("a", 1)
        self.assertIn("a", self.table)

    def test_fail_all_fails_every_request_at_once(self) -> None:
        for cid in ("a", "b", "c"):
            self.add(cid, 10 if cid != "b" else 3)
        count = self.table.fail_all(lambda cid: ConnectionClosed(f"lost {cid}"))
        self.assertEqual(count, 3)
        for cid in ("a", "b", "c"):
            error = self.outcomes.error(cid)
            self.assertIsInstance(error, ConnectionClosed)
            self.assertEqual(str(error), "Connection closed")
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fail_all_of_nothing_is_zero(self) -> None:
        self.assertEqual(self.table.fail_all(lambda cid: ConnectionClosed()), 0)

    def test_table_works_again_after_fail_all(self) -> None:
        self.add("a", 1)
        self.table.fail_all(lambda cid: ConnectionClosed())
        self.add("b", 2)
        self.clock.advance(2)
        self.assertIsInstance(self.outcomes.error("b"), RequestTimeout)

    def test_fail_one(self) -> None:
        self.add("a")
        self.assertTrue(self.table.fail("a", ConnectionClosed()))
        self.assertFalse(self.table.fail("a", ConnectionClosed()))
        self.assertIsInstance(self.outcomes.error("a"), ConnectionClosed)

    def test_pop_removes_without_firing(self) -> None:
        deferred = self.add("a")
        self.assertIs(self.table.pop("a"), deferred)
        self.assertEqual(self.outcomes.waiting(), ["a"])
        self.clock.advance(60)
        self.assertEqual(self.outcomes.waiting(), ["a"])
        self.assertIsNone(self.table.pop("a"))

    def test_cancelling_the_deferred_forgets_the_request_and_reports_it(self) -> None:
        deferred = self.add("a")
        deferred.cancel()
        self.assertIsInstance(self.outcomes.error("a"), CancelledError)
        self.assertNotIn("a", self.table)
        self.assertEqual(self.cancelled, ["a"])
        self.clock.advance(60)
        self.assertEqual(self.timed_out, [])

    def test_cancelling_a_finished_deferred_does_nothing(self) -> None:
        deferred = self.add("a")
        self.table.resolve("a", "ok")
        deferred.cancel()
        self.assertEqual(self.cancelled, [])

    def test_cancelling_an_old_deferred_does_not_touch_a_reused_id(self) -> None:
        old = self.table.add("a", 30)
        old.addErrback(lambda f: None)
        self.table.pop("a")
        self.add("a")
        old.cancel()
        self.assertIn("a", self.table)
        self.assertEqual(self.cancelled, [])

    def test_errback_that_adds_a_request_during_expiry(self) -> None:
        # A caller that retries from its timeout errback must get a working
        # timer for the retry.
        def retry(failure: Failure) -> None:
            self.add("retry", 1)

        self.table.add("a", 1).addErrback(retry)
        self.clock.advance(1)
        self.assertIn("retry", self.table)
        self.clock.advance(1)
        self.assertIsInstance(self.outcomes.error("retry"), RequestTimeout)

    def test_errback_that_fails_everything_during_expiry(self) -> None:
        self.add("b", 1)
        self.table.add("a", 1).addErrback(
            lambda f: self.table.fail_all(lambda cid: ConnectionClosed())
        )
        self.add("c", 5)
        self.clock.advance(1)
        self.assertIsInstance(self.outcomes.error("b"), RequestTimeout)
        self.assertIsInstance(self.outcomes.error("c"), ConnectionClosed)
        self.assertEqual(len(self.table), 0)

    def test_sent_at_is_the_clock_time(self) -> None:
        self.clock.advance(12)
        self.add("a")
        self.assertEqual(self.table.sent_at("a"), 12)
        self.assertIsNone(self.table.sent_at("b"))

    def test_correlation_ids_in_order_of_sending(self) -> None:
        for cid in ("x", "a", "m"):
            self.add(cid, {"x": 1, "a": 5, "m": 1}[cid])
        self.assertEqual(self.table.correlation_ids(), ["x", "a", "m"])


class SharedCountsTests(TestCase):
    """
    C{counts}: the requests waiting in the tables that share it, and the
    requests ever added to them; every way out of a table takes a request
    off the first.
    """

    def test_every_way_out_of_a_table_is_counted(self) -> None:
        clock = Clock()
        counts = [0, 0]
        table = PendingTable(clock, counts=counts)
        for cid in "abcdefg":
            table.add(cid, 10.0).addErrback(lambda f: None)
        table.add("late", 20.0).addErrback(lambda f: None)
        self.assertEqual(counts, [8, 8])
        table.pop("a")
        table.take("b")
        table.resolve("c", None)
        table.fail("d", ConnectionClosed())
        table.pop("nobody")
        table.take("nobody")
        self.assertEqual(counts, [4, 8])
        clock.advance(10)  # e, f and g expire
        self.assertEqual(counts, [1, 8])
        other = PendingTable(clock, counts=counts)
        cancelled = other.add("x", 10.0)
        cancelled.addErrback(lambda f: None)
        cancelled.cancel()
        other.add("y", 10.0).addErrback(lambda f: None)
        self.assertEqual(counts, [2, 10])
        other.fail_all(lambda cid: ConnectionClosed())
        table.fail_all(lambda cid: ConnectionClosed())
        self.assertEqual(counts, [0, 10])

    def test_a_table_counts_for_itself_by_default(self) -> None:
        one, two = PendingTable(Clock()), PendingTable(Clock())
        one.add("a", 1.0).addErrback(lambda f: None)
        self.assertEqual((one._counts, two._counts), ([1, 1], [0, 0]))


class HandlersTests(TestCase):
    """
    C{add(..., answered=, failed=, arg=)}: no Deferred and no Waiter; the
    table calls the handlers as a L{Waiter} made of them would, every way a
    request ends, and logs what they raise.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = PendingTable(self.clock)
        self.calls: list[tuple[str, Any, Any]] = []

    def answered(self, result: Any, arg: Any) -> None:
        self.calls.append(("answered", result, arg))

    def failed(self, failure: Failure, arg: Any) -> None:
        self.calls.append(("failed", failure.value, arg))

    def add(self, cid: str, timeout: float = 30.0) -> Any:
        return self.table.add(cid, timeout, None, self.answered, self.failed, f"arg-{cid}")

    def test_nothing_is_returned(self) -> None:
        self.assertIsNone(self.add("a"))
        self.assertEqual(self.table.correlation_ids(), ["a"])

    def test_handlers_come_in_pairs_and_without_a_waiter(self) -> None:
        # A lone handler would leave one way of ending without a call.
        waiter = Waiter(lambda result, arg: None, lambda failure, arg: None, None)
        for handlers in [
            {"answered": self.answered},
            {"failed": self.failed},
            {"answered": self.answered, "failed": self.failed, "waiter": waiter},
        ]:
            with self.subTest(handlers=sorted(handlers)):
                error = self.assertRaises(TypeError, self.table.add, "a", 30.0, **handlers)
                self.assertIn("answered and failed together", str(error))
        self.assertEqual((self.table.correlation_ids(), self.table._counts), ([], [0, 0]))

    def test_an_answer(self) -> None:
        self.add("a")
        self.assertTrue(self.table.resolve("a", "answer"))
        self.assertEqual(self.calls, [("answered", "answer", "arg-a")])

    def test_take_hands_out_what_fires_them(self) -> None:
        self.clock.advance(2.0)
        self.add("a")
        taken = self.table.take("a")
        assert taken is not None
        fire, sent_at = taken
        self.assertEqual(sent_at, 2.0)
        fire.callback("answer")
        self.assertEqual(self.calls, [("answered", "answer", "arg-a")])
        self.assertIsNone(self.table.take("a"))

    def test_a_timeout(self) -> None:
        self.add("a", timeout=1.0)
        self.clock.advance(1.0)
        [(kind, error, arg)] = self.calls
        self.assertEqual((kind, arg), ("failed", "arg-a"))
        self.assertIsInstance(error, RequestTimeout)

    def test_fail_and_fail_all(self) -> None:
        self.add("a")
        self.add("b")
        self.assertTrue(self.table.fail("a", ConnectionClosed("gone")))
        self.assertEqual(self.table.fail_all(lambda cid: ConnectionClosed(cid)), 1)
        self.assertEqual([(kind, arg) for kind, _, arg in self.calls], [("failed", "arg-a"), ("failed", "arg-b")])
        self.assertEqual(len(self.table), 0)

    def test_what_a_handler_raises_is_logged_not_raised(self) -> None:
        def broken(result: Any, arg: Any) -> None:
            raise ZeroDivisionError("handler bug")

        self.table.add("a", 30.0, None, broken, self.failed, None)
        self.assertTrue(self.table.resolve("a", "answer"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_fail_all_leaves_no_cycle(self) -> None:
        # An entry's lane holds it: after fail_all (a connection closing)
        # reference counting alone frees the entries and what their
        # handlers hold, a gateway request under load.
        class Held:
            pass

        held = Held()
        alive = weakref.ref(held)
        self.table.add("a", 30.0, None, self.answered, self.failed, held)
        del held
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        self.assertEqual(self.table.fail_all(lambda cid: ConnectionClosed(cid)), 1)
        self.calls.clear()
        self.assertIsNone(alive())


class TimeoutNoticeFailureTests(TestCase):
    def test_every_request_of_a_batch_times_out_though_the_notice_raises(self) -> None:
        clock = Clock()

        def broken(cid: str) -> None:
            raise ZeroDivisionError(cid)

        table = PendingTable(clock, on_timeout=broken)
        outcomes = Outcomes()
        for cid in ("a", "b", "c"):
            outcomes.watch(cid, table.add(cid, 1.0))
        clock.advance(1.0)
        for cid in ("a", "b", "c"):
            self.assertIsInstance(outcomes.error(cid), RequestTimeout)
        self.assertEqual(len(table), 0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 3)
