"""
What the gateway and the status site log, as an operator reads it: agent
failures at info and warning (rate-limited), upstream failures as text, no
per-connection factory lines, no warning for C{HEAD}, an access log in the
combined format.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed

from sentinel_twisted._ratelimit import LogRateLimiter
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway

from .._proxy_support import captured_log
from .support import (
    RESPONSE_BODY_CHUNK,
    Harness,
    ScriptedAgent,
    answer,
    block,
    listen_for,
    unreachable_url,
)
from .test_failures import _CannedUpstream


def quoted(name: str) -> str:
    """A double-quoted field of an access log line, backslash escapes allowed."""
    return rf'"(?P<{name}>(?:[^"\\]|\\.)*)"'


#: The combined log format: host ident user [time] "request" status bytes "referer" "agent".
COMBINED = re.compile(
    r"^(?P<host>\S+) - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
    + quoted("request")
    + r" (?P<status>\d{3}) (?P<size>\d+|-) "
    + quoted("referer")
    + " "
    + quoted("agent")
    + "$"
)


def hold(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> None:
    return None


def lines(events: list[LogEvent], level: LogLevel | None = None, containing: str = "") -> list[str]:
    """The formatted text of the events (of one level), that contain a text."""
    found = []
    for event in events:
        text = formatEvent(event) or ""
        if containing in text and (level is None or event.get("log_level") is level):
            found.append(text)
    return found


def memory_clock(h: Harness) -> Clock:
    """Rate-limit the gateway's log lines on a clock the test moves."""
    clock = Clock()
    h.gateway_service.gateway.log_limiter = LogRateLimiter(clock)
    return clock


class AgentFailureLogTests(TestCase):
    timeout = 20

    def test_no_agent_503_is_a_warning_a_few_times_per_period(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "ghost")
            clock = memory_clock(h)
            limiter = h.gateway_service.gateway.log_limiter
            with captured_log() as events:
                for _ in range(limiter.burst + 3):
                    self.assertEqual((await h.get("/")).code, 503)
                clock.advance(limiter.period)
            warned = lines(events, LogLevel.warn, "answering 503")
            self.assertEqual(
                warned,
                ["Agent ghost unavailable; answering 503"] * limiter.burst
                + ["Agent ghost unavailable; answering 503 (... and 2 more like it in the last 10 s)"],
            )

        return ensureDeferred(go())

    def test_no_agent_fail_open_is_info(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "ghost", "--fail-open")
            memory_clock(h)
            with captured_log() as events:
                self.assertEqual((await h.get("/")).code, 200)
            self.assertEqual(
                lines(events, LogLevel.info, "fail-open"),
                ["Agent ghost unavailable; request passes (fail-open)"],
            )
            self.assertEqual(lines(events, LogLevel.warn), [])

        return ensureDeferred(go())

    def test_agent_timeout_503_is_a_warning(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.3")
            memory_clock(h)
            await h.agent("waf", decide=hold)
            with captured_log() as events:
                self.assertEqual((await h.get("/")).code, 503)
            [warned] = lines(events, LogLevel.warn, "answering 503")
            self.assertRegex(warned, r"^Agent waf timeout on \S+: .+; answering 503$")

        return ensureDeferred(go())

    def test_agent_timeout_fail_open_is_info(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.3", "--fail-open")
            memory_clock(h)
            await h.agent("waf", decide=hold)
            with captured_log() as events:
                self.assertEqual((await h.get("/")).code, 200)
            [passed] = lines(events, LogLevel.info, "fail-open")
            self.assertRegex(passed, r"^Agent waf timeout on \S+; request goes on \(fail-open\)$")

        return ensureDeferred(go())

    def test_an_answer_quoted_in_the_503_line_is_escaped_and_cut(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            # An unknown decision: the error text quotes it.
            await h.agent("waf", decide=lambda a, t, b: answer("x\u2028Forged line " * 100))
            with captured_log() as events:
                self.assertEqual((await h.get("/")).code, 503)
            [failed] = lines(events, LogLevel.warn, "answering 503")
            self.assertIn("unknown decision", failed)
            self.assertIn("x\\u2028Forged line", failed)
            self.assertNotIn("\u2028", failed)
            self.assertLess(len(failed), 400)

        return ensureDeferred(go())


class _ChurningPool:
    """A pool whose only agent comes and goes as the test says."""

    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.present = True

    def add_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def remove_observer(self, observer: Any) -> None:
        self.observers.remove(observer)

    def agent_ids(self) -> list[str]:
        return ["churn"] if self.present else []

    def __len__(self) -> int:
        return int(self.present)

    def __contains__(self, agent_id: object) -> bool:
        return self.present and agent_id == "churn"

    def leave(self, connection: Any) -> None:
        self.present = False
        for observer in self.observers:
            observer.agent_disconnected(connection, "closed")

    def come_back(self, connection: Any) -> None:
        self.present = True
        for observer in self.observers:
            observer.agent_registered(connection)


class AgentPresenceLogTests(SynchronousTestCase):
    def test_agent_churn_is_rate_limited(self) -> None:
        """
        An agent that registers and leaves in a loop makes a few lines per
        period, then one that reports the latest state and the count.
        """
        clock = Clock()
        pool = _ChurningPool()
        gateway = Gateway(pool, GatewayConfig(), object(), clock=clock)  # type: ignore[arg-type]
        gateway.watch_agents()
        connection = SimpleNamespace(agent_id="churn")
        limiter = gateway.log_limiter
        rounds = 100
        with captured_log() as events:
            for _ in range(rounds):
                pool.leave(connection)
                pool.come_back(connection)
            clock.advance(limiter.period)
        gateway.unwatch_agents()
        presence = [e for e in events if "agent" in (formatEvent(e) or "").lower()]
        self.assertEqual(len(presence), limiter.burst + 1)
        self.assertEqual(
            formatEvent(presence[-1]),
            "Agent churn registered: requests are decided by it again "
            f"(... and {2 * rounds - limiter.burst - 1} more like it in the last 10 s)",
        )


class UpstreamLogTests(TestCase):
    timeout = 20

    def test_upstream_failure_names_method_and_target_as_text(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--upstream", unreachable_url())
            await h.agent("waf")
            with captured_log() as events:
                self.assertEqual((await h.get("/x?a=1")).code, 502)
            [failed] = lines(events, containing="Upstream failed")
            self.assertTrue(failed.startswith("Upstream failed for GET /x?a=1: "), failed)
            self.assertNotIn("b'", failed)

        return ensureDeferred(go())

    def test_a_status_line_quoted_in_the_failure_line_is_cut(self) -> Any:
        async def go() -> None:
            status_line = b"HTTP/1.1 OK " + b"A" * 10000 + b"\r\n\r\n"
            port = await listen_for(self, Factory.forProtocol(lambda: _CannedUpstream(status_line)))
            h = await Harness(self).start("--upstream", f"http://127.0.0.1:{port.getHost().port}")
            await h.agent("waf")
            with captured_log() as events:
                self.assertEqual((await h.get("/x")).code, 502)
            [failed] = lines(events, containing="Upstream failed")
            self.assertIn("non-integer status code", failed)
            self.assertLess(len(failed), 400)

        return ensureDeferred(go())

    def test_upstream_connections_log_no_factory_lines(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf")
            upstream = f":{h.upstream_port.getHost().port}"
            with captured_log() as events:
                self.assertEqual((await h.get("/")).code, 200)
                await h.gateway_service.upstream.close()
            factory_lines = [
                e for e in events if "factory" in e and upstream in repr(e["factory"])
            ]
            self.assertEqual(factory_lines, [])
            self.assertEqual(len(h.upstream.requests), 1)

        return ensureDeferred(go())


class StatusHeadTests(TestCase):
    timeout = 20

    def test_head_answers_headers_only_without_a_warning(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            for path in ("/metrics", "/agents", "/"):
                with captured_log() as events:
                    response = await h.client.request("HEAD", h.status_url(path))
                self.assertEqual(response.code, 200, path)
                self.assertEqual(response.body, b"", path)
                self.assertEqual(lines(events, containing="eat it"), [], path)
            got = await h.status("/agents")
            head = await h.client.request("HEAD", h.status_url("/agents"))
            self.assertEqual(head.header("Content-Length"), str(len(got.body)))
            self.assertEqual(head.header("Content-Type"), got.header("Content-Type"))

        return ensureDeferred(go())


class AccessLogTests(TestCase):
    timeout = 20

    def test_access_log_is_in_the_combined_format(self) -> Any:
        async def go() -> None:
            h = Harness(self)
            path = os.path.join(h.dir, "access.log")
            await h.start("--access-log", path)
            await h.agent("waf")
            response = await h.get(
                '/x?q="1"', headers={"User-Agent": "curl/8.5.0", "Referer": "http://example.com/"}
            )
            self.assertEqual(response.code, 200)
            await h.get("/none")
            h.gateway_service.site.logFile.flush()
            with open(path, encoding="ascii") as f:
                first, second = f.read().splitlines()
            match = COMBINED.match(first)
            self.assertIsNotNone(match, first)
            assert match is not None
            self.assertEqual(match["host"], "127.0.0.1")
            self.assertEqual(match["request"], 'GET /x?q=\\"1\\" HTTP/1.1')
            self.assertEqual(match["status"], "200")
            self.assertEqual(match["size"], str(len(response.body)))
            self.assertEqual(match["referer"], "http://example.com/")
            self.assertEqual(match["agent"], "curl/8.5.0")
            match = COMBINED.match(second)
            self.assertIsNotNone(match, second)
            assert match is not None
            self.assertEqual((match["referer"], match["agent"]), ("-", "-"))

        return ensureDeferred(go())


def _block_the_second_body_chunk(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
    """Allow everything but the response body's second chunk: blocked once the client has the first."""
    if message_type == RESPONSE_BODY_CHUNK and len(agent.of_type(RESPONSE_BODY_CHUNK)) == 2:
        return block()
    return answer(needs_more=message_type == RESPONSE_BODY_CHUNK)


class RequestLineFloodTests(TestCase):
    """
    Lines a request can make whatever its agents and upstream decide come
    a few per period, then one with the count of the rest: clients that
    keep asking (or an agent that keeps blocking mid-response) cannot
    flood the log.
    """

    timeout = 30

    def test_upstream_failures_are_a_few_lines_per_period(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--upstream", unreachable_url())
            clock = memory_clock(h)
            limiter = h.gateway_service.gateway.log_limiter
            await h.agent("waf")
            with captured_log() as events:
                for _ in range(limiter.burst + 3):
                    self.assertEqual((await h.get("/x")).code, 502)
                clock.advance(limiter.period)
            failed = lines(events, containing="Upstream failed for GET /x")
            self.assertEqual(len(failed), limiter.burst + 1)
            self.assertIn("(... and 2 more like it in the last 10 s)", failed[-1])

        return ensureDeferred(go())

    def test_cutting_responses_off_is_a_few_lines_per_period(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            clock = memory_clock(h)
            limiter = h.gateway_service.gateway.log_limiter
            with captured_log() as events:
                for _ in range(limiter.burst + 3):
                    agent = await h.agent(
                        "body-checker", events=(1, 4), chunk_size=4096, decide=_block_the_second_body_chunk
                    )
                    with self.assertRaises(ResponseFailed):
                        await h.get("/bytes?n=20000")
                    agent.transport.loseConnection()
                    await agent.lost
                clock.advance(limiter.period)
            cut = lines(events, containing="Closing the client connection mid-response")
            self.assertEqual(len(cut), limiter.burst + 1, cut)
            self.assertIn("(... and 2 more like it in the last 10 s)", cut[-1])

        return ensureDeferred(go())
