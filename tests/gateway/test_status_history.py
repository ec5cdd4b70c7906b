"""
The status page's memory of the last minutes (L{History}) and the page
built from it, on a memory clock.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.status.history import History
from sentinel_twisted.status.metrics import GatewayMetrics
from sentinel_twisted.status.page import event_names, format_age
from sentinel_twisted.status.resource import StatusResource

from .._proxy_support import Proxy, lose


class HistoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = Proxy()
        self.clock = self.proxy.clock
        self.metrics = GatewayMetrics(self.proxy.pool, self.proxy.factory).attach()
        self.history = History(self.metrics, self.clock, interval=10, points=90, window=60)
        self.history.start()
        self.addCleanup(self.history.stop)

    def test_rates_are_over_the_last_minute(self) -> None:
        for _ in range(120):
            self.metrics.request_decided("allow", 200, 0.01)
            self.clock.advance(1)
        # 120 s of one request a second, then a burst of 60 in the last second.
        for _ in range(60):
            self.metrics.request_decided("block", 403, 0.5)
        window = self.history.last_window()
        self.assertEqual(window.seconds, 60)
        self.assertAlmostEqual(window.requests(("allow",)) or 0, 1.0)
        self.assertAlmostEqual(window.requests(("block",)) or 0, 1.0)
        self.assertAlmostEqual(window.code_class("4xx") or 0, 1.0)
        self.assertLessEqual(window.duration(0.99) or 0, 0.5)
        self.assertGreater(window.duration(0.99) or 0, 0.25)
        self.assertLess(window.duration(0.25) or 1, 0.011)

    def test_agent_round_trips_of_the_last_minute(self) -> None:
        _, _, connection = self.proxy.register("waf")
        for _ in range(10):
            self.metrics.request_answered(connection, "c", 2.0)
        self.clock.pump([10] * 7)
        for _ in range(10):
            self.metrics.request_answered(connection, "c", 0.002)
        window = self.history.last_window()
        self.assertLessEqual(window.agent_round_trip("waf", 0.99) or 1, 0.0025)
        self.assertAlmostEqual(window.agent_rate("waf") or 0, 10 / 60)

    def test_fifteen_minutes_are_kept_and_no_more(self) -> None:
        self.clock.pump([10] * 360)
        self.assertEqual(len(self.history.samples), 90)
        self.assertEqual(len(self.history.steps()), 90)

    def test_only_the_newest_samples_keep_per_agent_totals(self) -> None:
        for i in range(50):
            _, _, connection = self.proxy.register(f"agent-{i}")
            self.metrics.request_answered(connection, "c", 0.001)
        self.clock.pump([10] * 90)
        with_agents = [s for s in self.history.samples if s.agents]
        self.assertLessEqual(len(with_agents), 9)
        self.assertEqual(len(with_agents[-1].agents), 50)

    def test_stopping_leaves_no_timer(self) -> None:
        self.history.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PageTests(SynchronousTestCase):
    def test_ages_read_like_a_person_writes_them(self) -> None:
        self.assertEqual(format_age(12.7), "12 s")
        self.assertEqual(format_age(303), "5 min 3 s")
        self.assertEqual(format_age(3 * 3600 + 12 * 60 + 5), "3 h 12 min")
        self.assertEqual(format_age(2 * 86400 + 4 * 3600), "2 d 4 h")
        self.assertEqual(format_age(-3), "0 s")

    def test_durations_and_rates_never_show_an_exponent(self) -> None:
        from sentinel_twisted.status.page import _rate, _seconds

        self.assertEqual(_seconds(0.0002), "0.2 ms")
        self.assertEqual(_seconds(0.9996), "1 s")
        self.assertEqual(_seconds(0.9994), "999 ms")
        self.assertEqual(_seconds(1234.0), "1234 s")
        self.assertEqual(_seconds(None), "–")
        self.assertEqual(_rate(0.0), "0/s")
        self.assertEqual(_rate(999.7), "1000/s")
        self.assertEqual(_rate(12345.0), "12,345/s")

    def test_events_by_name(self) -> None:
        self.assertEqual(event_names([5, 1, 99]), ["request_headers", "request_complete", "99"])

    def test_a_peer_supplied_id_is_escaped_on_the_page(self) -> None:
        proxy = Proxy()
        metrics = GatewayMetrics(proxy.pool, proxy.factory).attach()
        history = History(metrics, proxy.clock)
        history.start()
        self.addCleanup(history.stop)
        protocol, _, _ = proxy.register('<script>alert("x")</script>')
        page = StatusResource(proxy.pool, metrics, {}, history).page()
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;", page)
        lose(protocol)

    def test_the_failure_policy_is_stated(self) -> None:
        proxy = Proxy()
        metrics = GatewayMetrics(proxy.pool, proxy.factory)
        closed = StatusResource(proxy.pool, metrics, {"fail_open": False}).page()
        opened = StatusResource(proxy.pool, metrics, {"fail_open": True}).page()
        self.assertIn("the client gets 503", closed)
        self.assertIn("the request goes on unchecked", opened)
