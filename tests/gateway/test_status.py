"""
The status site: C{/agents} JSON and C{/metrics} contents.
"""

from __future__ import annotations

import os
import re
from typing import Any

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from .support import Harness, ScriptedAgent, answer, block, wait_until


def hold(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> None:
    return None


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


class AgentsDocumentTests(TestCase):
    timeout = 20

    def test_agents_json_shows_each_connection(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            waf = await h.agent("waf", events=(1, 2), metadata={"region": "eu-1"}, decide=hold)
            bot = await h.agent("bot")
            second_bot = await h.agent("bot")
            waf.health(2)
            second_bot.pause()
            await wait_until(
                lambda: h.pool.connections("waf")[0].health_state == 2
                and any(c.is_paused for c in h.pool.connections("bot")),
                what="health and pause",
            )
            pending = ensureDeferred(h.get("/held"))
            await waf.wait(lambda: len(waf.held) == 1)

            document = (await h.status("/agents")).json()
            self.assertEqual([a["agent_id"] for a in document["agents"]], ["waf", "bot"])
            waf_info, bot_info = document["agents"]
            self.assertEqual(waf_info["in_flight"], 1)
            (connection,) = waf_info["connections"]
            self.assertEqual(connection["connection_id"], h.pool.connections("waf")[0].connection_id)
            self.assertEqual(connection["in_flight"], 1)
            self.assertFalse(connection["paused"])
            self.assertEqual((connection["health"], connection["health_name"]), (2, "degraded"))
            self.assertEqual(connection["metadata"], {"region": "eu-1"})
            self.assertEqual(connection["capabilities"]["supported_events"], [1, 2])
            self.assertEqual(connection["capabilities"]["limits"]["max_body_size"], 1048576)
            self.assertRegex(connection["connected_since"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
            self.assertIsInstance(connection["connected_since_epoch"], float)
            self.assertTrue(connection["peer"].startswith("unix"))
            # SO_PEERCRED: the agent is this process.
            self.assertEqual((connection["peer_pid"], connection["peer_uid"]), (os.getpid(), os.getuid()))
            self.assertEqual(connection["events"], ["request_headers", "request_body_chunk"])
            self.assertFalse(connection["write_blocked"])
            self.assertEqual(connection["events_sent"], 1)
            self.assertEqual((connection["timeouts"], connection["cancels_sent"]), (0, 0))
            self.assertEqual(connection["round_trip"]["answered"], 0)
            self.assertEqual((connection["mode"], connection["encoding"]), ("reverse", "json"))
            self.assertEqual(len(bot_info["connections"]), 2)
            self.assertEqual(bot_info["paused_connections"], 1)
            self.assertEqual([c["paused"] for c in bot_info["connections"]], [False, True])
            self.assertEqual(
                document["gateway"]["upstream"], f"http://127.0.0.1:{h.upstream_port.getHost().port}"
            )
            self.assertFalse(document["gateway"]["fail_open"])
            waf.release(answer())
            self.assertEqual((await pending).code, 200)
            h.pool.connections("bot")[0].set_write_blocked(True)
            document = (await h.status("/agents")).json()
            h.pool.connections("bot")[0].set_write_blocked(False)
            waf_info, bot_info = document["agents"]
            (connection,) = waf_info["connections"]
            round_trip = connection["round_trip"]
            self.assertEqual(round_trip["answered"], 1)
            self.assertGreater(round_trip["mean_seconds"], 0)
            self.assertGreater(round_trip["p99_seconds"], 0)
            self.assertEqual([c["write_blocked"] for c in bot_info["connections"]], [True, False])
            self.assertEqual(bot_info["write_blocked_connections"], 1)
            del bot

        return ensureDeferred(go())


class MetricsTests(TestCase):
    timeout = 20

    def test_metrics_cover_the_listener_and_the_gateway(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "waf", "--agent", "slow")
            # One refused registration (wrong protocol version).
            with self.assertRaises(RuntimeError):
                await h.agent("old", protocol_version=1)

            def waf_decides(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                return block(403) if body["uri"] == "/blocked" else answer()

            def slow_decides(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                return None if body["uri"] == "/held" else answer()

            await h.agent("waf", decide=waf_decides)
            slow = await h.agent("slow", decide=slow_decides)
            self.assertEqual((await h.get("/ok")).code, 200)
            self.assertEqual((await h.get("/blocked")).code, 403)
            pending = ensureDeferred(h.get("/held"))
            await slow.wait(lambda: len(slow.held) == 1)

            text = (await h.status("/metrics")).body.decode()
            values = samples(text)
            self.assertEqual(values[("sentinel_agent_registrations_total", ())], 2)
            self.assertEqual(
                values[("sentinel_agent_registration_rejections_total", (("reason", "version"),))], 1
            )
            self.assertEqual(values[("sentinel_agent_connections", (("agent", "waf"),))], 1)
            self.assertEqual(values[("sentinel_agent_requests_in_flight", (("agent", "slow"),))], 1)
            self.assertEqual(values[("sentinel_agent_requests_in_flight", (("agent", "waf"),))], 0)
            for decision in ("allow", "block"):
                self.assertEqual(
                    values[("sentinel_gateway_requests_total", (("decision", decision),))], 1, decision
                )
            # waf answered 3 RequestHeaders; slow answered /ok (its answer
            # to /blocked may come after waf's block cancelled it).
            self.assertEqual(values[("sentinel_agent_round_trip_seconds_count", (("agent", "waf"),))], 3)
            self.assertIn(values[("sentinel_agent_round_trip_seconds_count", (("agent", "slow"),))], (1, 2))
            self.assertIn(
                ("sentinel_agent_round_trip_seconds_bucket", (("agent", "waf"), ("le", "+Inf"))), values
            )
            self.assertRegex(text, re.compile(r"^# TYPE sentinel_agent_round_trip_seconds histogram$", re.M))
            duration = "sentinel_gateway_request_duration_seconds_count"
            self.assertEqual(values[(duration, (("code_class", "2xx"), ("decision", "allow")))], 1)
            self.assertEqual(values[(duration, (("code_class", "4xx"), ("decision", "block")))], 1)
            self.assertEqual(
                values[("sentinel_gateway_upstream_duration_seconds_count", (("outcome", "response"),))], 1
            )
            self.assertEqual(
                values[("sentinel_agent_decisions_total", (("agent", "waf"), ("decision", "block")))], 1
            )
            self.assertEqual(
                values[("sentinel_agent_decisions_total", (("agent", "waf"), ("decision", "allow")))], 2
            )
            # Its own registry: nothing leaks into the process-global one.
            self.assertIsNone(prometheus_client.REGISTRY.get_sample_value("sentinel_agent_registrations_total"))
            slow.release(answer())
            self.assertEqual((await pending).code, 200)

        return ensureDeferred(go())

    def test_timeouts_and_cancels_are_counted(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.3")
            agent = await h.agent("waf", decide=hold)
            self.assertEqual((await h.get("/timeout")).code, 503)
            client = await h.raw(b"GET /abort HTTP/1.1\r\nHost: x\r\n\r\n")
            await agent.wait(lambda: len(agent.held) == 2)
            client.transport.abortConnection()
            await agent.wait(lambda: len(agent.cancels) == 2)
            values = samples((await h.status("/metrics")).body.decode())
            self.assertEqual(values[("sentinel_agent_timeouts_total", (("agent", "waf"),))], 1)
            self.assertEqual(
                values[("sentinel_agent_cancels_total", (("agent", "waf"), ("reason", "timeout")))], 1
            )
            self.assertEqual(
                values[("sentinel_agent_cancels_total", (("agent", "waf"), ("reason", "client_disconnect")))], 1
            )
            self.assertEqual(values[("sentinel_gateway_requests_total", (("decision", "unavailable"),))], 1)
            self.assertEqual(values[("sentinel_gateway_requests_total", (("decision", "client_closed"),))], 1)

        return ensureDeferred(go())

    def test_fail_open_and_upstream_errors_are_counted(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--fail-open", "--agent", "ghost", "--upstream-timeout", "0.3")
            self.assertEqual((await h.get("/slow")).code, 504)
            self.assertEqual((await h.get("/drop")).code, 502)
            values = samples((await h.status("/metrics")).body.decode())
            self.assertEqual(
                values[
                    ("sentinel_gateway_fail_open_passes_total", (("agent", "ghost"), ("reason", "unavailable")))
                ],
                2,
            )
            self.assertEqual(values[("sentinel_gateway_upstream_errors_total", (("kind", "timeout"),))], 1)
            self.assertEqual(values[("sentinel_gateway_upstream_errors_total", (("kind", "error"),))], 1)
            upstream = "sentinel_gateway_upstream_duration_seconds_count"
            self.assertEqual(values[(upstream, (("outcome", "timeout"),))], 1)
            self.assertEqual(values[(upstream, (("outcome", "error"),))], 1)
            duration = "sentinel_gateway_request_duration_seconds_count"
            self.assertEqual(values[(duration, (("code_class", "5xx"), ("decision", "allow")))], 2)

        return ensureDeferred(go())

    def test_unknown_status_path_is_404(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            self.assertEqual((await h.status("/nope")).code, 404)

        return ensureDeferred(go())


class StatusHeadersTests(TestCase):
    """
    What a browser is told about each status response: its type (with its
    charset where it is text), not to guess another (peer text is in
    them: an agent id of C{<script>...}), that the page loads nothing and
    runs no script, and that nothing is to be kept.
    """

    timeout = 20

    def test_every_status_response_says_its_type_and_not_to_keep_it(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("<script>alert(1)</script>", metadata={"x": "</script><script>alert(2)"})
            types = {
                "/": "text/html; charset=utf-8",
                "/agents": "application/json",
                "/metrics": prometheus_client.CONTENT_TYPE_LATEST,
                "/healthz": "application/json",
                "/nope": "text/html; charset=utf-8",
            }
            for path, content_type in types.items():
                response = await h.status(path)
                self.assertEqual(response.header("content-type"), content_type, path)
                self.assertEqual(response.header("x-content-type-options"), "nosniff", path)
                self.assertEqual(
                    response.header("content-security-policy"),
                    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
                    path,
                )
                if path != "/nope":
                    self.assertEqual(response.header("cache-control"), "no-store", path)

        return ensureDeferred(go())


class MetricShapeTests(TestCase):
    """What an SLO is built on: series present from the start, buckets, names."""

    def metrics(self, **config: Any) -> Any:
        from sentinel_twisted.status.metrics import GatewayMetrics

        from .._proxy_support import Proxy

        self.proxy = Proxy(**config)
        return GatewayMetrics(self.proxy.pool, self.proxy.factory).attach()

    def test_every_decision_has_a_series_from_the_start(self) -> None:
        from sentinel_twisted.status.metrics import DECISIONS

        scraped = samples(self.metrics().render().decode())
        self.assertIn("error", DECISIONS)
        for decision in DECISIONS:
            self.assertEqual(scraped[("sentinel_gateway_requests_total", (("decision", decision),))], 0)

    def test_process_and_platform_metrics_are_exported(self) -> None:
        text = self.metrics().render().decode()
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
            self.assertRegex(text, re.compile(rf"^{name}[ {{]", re.M))

    def test_round_trip_buckets_reach_the_request_timeout(self) -> None:
        metrics = self.metrics(request_timeout=30.0)
        _, _, connection = self.proxy.register("waf")
        metrics.request_answered(connection, "c1", 25.0)
        scraped = samples(metrics.render().decode())
        bucket = "sentinel_agent_round_trip_seconds_bucket"
        self.assertEqual(scraped[(bucket, (("agent", "waf"), ("le", "10.0")))], 0)
        self.assertEqual(scraped[(bucket, (("agent", "waf"), ("le", "30.0")))], 1)
        self.assertEqual(metrics.round_trip_buckets[-1], 30.0)

    def test_buckets_end_at_an_odd_timeout(self) -> None:
        from sentinel_twisted.status.metrics import latency_buckets

        self.assertEqual(latency_buckets(7.5)[-3:], (2.5, 5.0, 7.5))
        self.assertEqual(latency_buckets(0.002)[-1], 0.002)
        self.assertEqual(latency_buckets(30.0)[-3:], (15.0, 20.0, 30.0))

    def test_request_duration_by_status_class_and_decision(self) -> None:
        metrics = self.metrics()
        metrics.request_decided("allow", 204, 0.02)
        metrics.request_decided("client_closed", 0, 1.0)
        scraped = samples(metrics.render().decode())
        name = "sentinel_gateway_request_duration_seconds"
        self.assertEqual(scraped[(f"{name}_count", (("code_class", "2xx"), ("decision", "allow")))], 1)
        self.assertEqual(scraped[(f"{name}_sum", (("code_class", "2xx"), ("decision", "allow")))], 0.02)
        self.assertEqual(
            scraped[(f"{name}_count", (("code_class", "none"), ("decision", "client_closed")))], 1
        )

    def test_names_follow_the_prometheus_conventions(self) -> None:
        text = self.metrics().render().decode()
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        self.assertGreater(len(types), 20)
        for name, kind in types.items():
            self.assertRegex(name, r"^[a-z][a-z0-9_]*$")
            if kind == "counter":
                self.assertTrue(name.endswith("_total"), name)
            else:
                self.assertFalse(name.endswith("_total"), name)
            if kind == "histogram":
                self.assertTrue(name.endswith("_seconds"), name)
            if name.startswith("sentinel_"):
                self.assertRegex(name, r"^sentinel_(agent|gateway)_")

    def test_quantiles_interpolate_within_a_bucket(self) -> None:
        from sentinel_twisted.status.metrics import quantile

        bounds = (0.1, 0.2, 0.4)
        self.assertIsNone(quantile(bounds, [0, 0, 0, 0], 0.5))
        self.assertAlmostEqual(quantile(bounds, [0, 10, 0, 0], 0.5) or 0, 0.15)
        self.assertEqual(quantile(bounds, [0, 0, 0, 5], 0.99), 0.4)
        self.assertAlmostEqual(quantile(bounds, [50, 0, 50, 0], 0.99) or 0, 0.396)


class DepartedAgentMetricsTests(TestCase):
    """
    Per-agent series last as long as the agent: 300 agents that came and
    went left /metrics at 420 KB.  Their totals live on in C{*_departed}.
    """

    def setUp(self) -> None:
        from sentinel_twisted.status.metrics import GatewayMetrics

        from .._proxy_support import Proxy

        self.proxy = Proxy()
        self.metrics = GatewayMetrics(self.proxy.pool, self.proxy.factory).attach()

    def visit(self, agent_id: str) -> None:
        """An agent registers, is timed out once, answers once, and leaves."""
        from .._proxy_support import lose

        protocol, _, connection = self.proxy.register(agent_id)
        self.metrics.agent_failed(agent_id, "timeout")
        self.metrics.cancel_sent(agent_id, 1)
        self.metrics.fail_open_pass(agent_id, "timeout")
        self.metrics.request_answered(connection, "c", 0.003)
        self.metrics.agent_decided(agent_id, "block")
        lose(protocol)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(self.metrics.render().decode())

    def test_an_agent_that_left_has_no_series(self) -> None:
        self.visit("gone")
        text = self.metrics.render().decode()
        self.assertNotIn('agent="gone"', text)

    def test_its_totals_are_kept_in_the_departed_series(self) -> None:
        self.visit("one")
        self.visit("two")
        scraped = self.scrape()
        self.assertEqual(scraped[("sentinel_agent_timeouts_departed_total", ())], 2)
        self.assertEqual(
            scraped[("sentinel_gateway_agent_failures_departed_total", (("reason", "timeout"),))], 2
        )
        self.assertEqual(
            scraped[("sentinel_agent_cancels_departed_total", (("reason", "timeout"),))], 2
        )
        self.assertEqual(
            scraped[("sentinel_gateway_fail_open_passes_departed_total", (("reason", "timeout"),))], 2
        )
        self.assertEqual(scraped[("sentinel_agent_round_trip_departed_seconds_count", ())], 2)
        self.assertEqual(
            scraped[("sentinel_agent_round_trip_departed_seconds_bucket", (("le", "0.005"),))], 2
        )

    def test_scrapes_stay_the_same_size_however_many_agents_left(self) -> None:
        for i in range(10):
            self.visit(f"agent-{i:04}")
        after_ten = self.metrics.render()
        for i in range(10, 300):
            self.visit(f"agent-{i:04}")
        after_300 = self.metrics.render()
        # The same series; only the totals' digits grow.
        self.assertEqual(after_300.count(b"\n"), after_ten.count(b"\n"))
        self.assertLess(len(after_300), len(after_ten) + 100)

    def test_per_connection_round_trips_leave_with_the_connection(self) -> None:
        for i in range(300):
            self.visit(f"agent-{i:04}")
        self.assertEqual(self.metrics._by_connection, {})
        self.assertEqual(self.scrape()[("sentinel_agent_decisions_departed_total", (("decision", "block"),))], 300)

    def test_an_agent_with_a_live_connection_keeps_its_series(self) -> None:
        from .._proxy_support import lose

        first, _, _ = self.proxy.register("waf")
        self.proxy.register("waf")
        self.metrics.agent_failed("waf", "timeout")
        lose(first)
        self.assertEqual(self.scrape()[("sentinel_agent_timeouts_total", (("agent", "waf"),))], 1)

    def test_an_agents_round_trips_outlive_its_connections(self) -> None:
        # Each answer counts once, in its connection; the agent's series and
        # everyone's total are sums of live and closed connections.
        from .._proxy_support import lose

        first, _, one = self.proxy.register("waf")
        _, _, two = self.proxy.register("waf")
        _, _, other = self.proxy.register("bot")
        self.metrics.request_answered(one, "a", 0.003)
        self.metrics.request_answered(two, "b", 0.003)
        self.metrics.request_answered(two, "c", 0.3)
        self.metrics.request_answered(other, "d", 0.003)
        lose(first)
        # An answer read as its connection closes still counts, for its agent.
        self.metrics.request_answered(one, "e", 0.003)
        self.assertEqual(set(self.metrics._by_connection), {two.connection_id, other.connection_id})
        scraped = self.scrape()
        self.assertEqual(scraped[("sentinel_agent_round_trip_seconds_count", (("agent", "waf"),))], 4)
        self.assertEqual(scraped[("sentinel_agent_round_trip_seconds_bucket", (("agent", "waf"), ("le", "0.005")))], 3)
        self.assertEqual(scraped[("sentinel_agent_round_trip_seconds_count", (("agent", "bot"),))], 1)
        snap = self.metrics.snapshot()
        self.assertEqual(snap.round_trip.count, 5)
        self.assertEqual(snap.agents["waf"].answers.count, 4)
        self.assertEqual(self.metrics.connection_round_trips(two.connection_id).count, 2)  # type: ignore[union-attr]
        self.visit("gone")
        self.assertEqual(self.metrics.snapshot().round_trip.count, 6)
        self.assertEqual(self.scrape()[("sentinel_agent_round_trip_departed_seconds_count", ())], 1)

    def test_an_agents_round_trip_sum_never_goes_down(self) -> None:
        # Prometheus takes a sum that goes down for a restart: rate() would
        # then count the whole sum again.  A connection that closes changes
        # what the agent's sum is made of, never its value.
        from .._proxy_support import lose

        first, _, one = self.proxy.register("waf")
        _, _, two = self.proxy.register("waf")
        third, _, three = self.proxy.register("waf")
        self.metrics.request_answered(one, "a", 0.3)
        lose(first)
        self.metrics.request_answered(two, "b", 0.1)
        self.metrics.request_answered(three, "c", 0.2)
        key = ("sentinel_agent_round_trip_seconds_sum", (("agent", "waf"),))
        before = self.scrape()[key]
        lose(third)
        self.assertGreaterEqual(self.scrape()[key], before)

    def test_round_trip_sums_never_go_down_as_connections_come_and_go(self) -> None:
        import random

        from .._proxy_support import lose

        rnd = random.Random(7)
        live: list[tuple[Any, Any]] = []
        last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for _ in range(300):
            choice = rnd.random()
            if choice < 0.15 or not live:
                agent_id = rnd.choice(("waf", "bot"))
                if len(self.proxy.pool.connections(agent_id)) < 4:
                    protocol, _, connection = self.proxy.register(agent_id)
                    live.append((protocol, connection))
            elif choice < 0.3:
                protocol, _ = live.pop(rnd.randrange(len(live)))
                lose(protocol)
            else:
                _, connection = rnd.choice(live)
                self.metrics.request_answered(connection, "c", rnd.choice((0.1, 0.2, 0.3, 0.0007, 1.9)))
            scraped = self.scrape()
            for key, value in scraped.items():
                if key[0] == "sentinel_agent_round_trip_seconds_sum" and key in last:
                    self.assertGreaterEqual(value, last[key], key)
            last = {k: v for k, v in scraped.items() if k[0] == "sentinel_agent_round_trip_seconds_sum"}

    def test_a_grace_period_keeps_the_series_of_an_agent_that_returns(self) -> None:
        from sentinel_twisted.status.metrics import GatewayMetrics

        from .._proxy_support import lose

        self.metrics.detach()
        metrics = GatewayMetrics(self.proxy.pool, self.proxy.factory, departed_grace=30).attach()
        protocol, _, _ = self.proxy.register("waf")
        metrics.agent_failed("waf", "timeout")
        lose(protocol)
        self.proxy.clock.advance(29)
        self.assertIn('agent="waf"', metrics.render().decode())
        self.proxy.register("waf")
        self.proxy.clock.advance(60)
        self.assertIn('agent="waf"', metrics.render().decode())
        self.assertEqual(self.proxy.clock.getDelayedCalls(), [])

    def test_after_the_grace_period_the_series_go(self) -> None:
        from sentinel_twisted.status.metrics import GatewayMetrics

        from .._proxy_support import lose

        self.metrics.detach()
        metrics = GatewayMetrics(self.proxy.pool, self.proxy.factory, departed_grace=30).attach()
        protocol, _, _ = self.proxy.register("waf")
        metrics.agent_failed("waf", "timeout")
        lose(protocol)
        self.proxy.clock.advance(30)
        text = metrics.render().decode()
        self.assertNotIn('agent="waf"', text)
        self.assertIn("sentinel_agent_timeouts_departed_total 1.0", text)
