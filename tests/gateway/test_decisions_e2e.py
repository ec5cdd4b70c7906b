"""
Each decision, end to end: HTTP client -> gateway -> raw-socket agent ->
upstream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import TestCase

from .._proxy_support import captured_log
from .support import (
    REQUEST_COMPLETE,
    REQUEST_HEADERS,
    RESPONSE_BODY_CHUNK,
    Harness,
    ScriptedAgent,
    answer,
    block,
    wait_until,
)


def on_headers(response: dict[str, Any]) -> Any:
    """A decider answering RequestHeaders with C{response}, anything else allow."""

    def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any]:
        return response if message_type == REQUEST_HEADERS else answer()

    return decide


class DecisionTests(TestCase):
    timeout = 20

    def test_allow_forwards_with_header_operations(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent(
                "waf",
                decide=on_headers(
                    answer(
                        "allow",
                        request_headers=[
                            {"set": {"name": "X-Checked", "value": "waf"}},
                            {"add": {"name": "X-Tag", "value": "one"}},
                            {"remove": {"name": "X-Secret"}},
                        ],
                        response_headers=[
                            {"set": {"name": "X-Policy", "value": "passed"}},
                            {"remove": {"name": "X-Upstream"}},
                        ],
                    )
                ),
            )
            response = await h.get(
                "/items?id=7", headers={"X-Secret": "hunter2", "X-Tag": "zero", "Connection": "x-hop", "X-Hop": "1"}
            )
            self.assertEqual(response.code, 200, response)
            self.assertEqual(response.body, b"upstream saw /items?id=7")
            self.assertEqual(response.header("X-Policy"), "passed")
            self.assertIsNone(response.header("X-Upstream"))
            (seen,) = h.upstream.requests
            headers = seen["headers"]
            self.assertEqual(headers["x-checked"], ["waf"])
            self.assertEqual(headers["x-tag"], ["zero", "one"])
            self.assertNotIn("x-secret", headers)
            # Hop-by-hop headers, and those the Connection header names, stay here.
            self.assertNotIn("x-hop", headers)
            self.assertEqual(headers["x-forwarded-for"], ["127.0.0.1"])
            self.assertEqual(headers["x-forwarded-proto"], ["http"])
            self.assertEqual(headers["x-forwarded-host"], [f"127.0.0.1:{h.http_port}"])
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="allow"), 1)

        return ensureDeferred(go())

    def test_block_answers_status_body_and_headers(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent(
                "waf",
                decide=on_headers(
                    answer(
                        {"block": {"status": 451, "body": "no thanks", "headers": {"X-Reason": "rule-9"}}},
                        response_headers=[{"set": {"name": "X-Blocked-By", "value": "waf"}}],
                    )
                ),
            )
            response = await h.get("/admin")
            self.assertEqual(response.code, 451)
            self.assertEqual(response.body, b"no thanks")
            self.assertEqual(response.header("X-Reason"), "rule-9")
            self.assertEqual(response.header("X-Blocked-By"), "waf")
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="block"), 1)

        return ensureDeferred(go())

    def test_block_without_body_says_the_status(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", decide=on_headers(block(403)))
            response = await h.get("/")
            self.assertEqual((response.code, response.body), (403, b"403 Forbidden\n"))

        return ensureDeferred(go())

    def test_a_block_status_goes_out_with_its_reason_phrase(self) -> Any:
        """
        Statuses twisted.web has no phrase for (429, 431: the rule agent's
        C{[request]} bounds) go out with their own, not C{Unknown Status}.
        """

        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", decide=lambda agent, kind, body: block(int(body["uri"][1:])))
            for code, phrase in ((429, b"Too Many Requests"), (431, b"Request Header Fields Too Large"),
                                 (451, b"Unavailable For Legal Reasons"), (403, b"Forbidden")):
                client = await h.raw(b"GET /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % code)
                await wait_until(lambda: client.is_lost, what="the response")  # noqa: B023
                status_line = client.received.split(b"\r\n", 1)[0]
                self.assertEqual(status_line, b"HTTP/1.1 %d %s" % (code, phrase))

        return ensureDeferred(go())

    def test_redirect(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent(
                "auth", decide=on_headers(answer({"redirect": {"url": "https://login.example/", "status": 307}}))
            )
            response = await h.get("/private")
            self.assertEqual(response.code, 307)
            self.assertEqual(response.header("Location"), "https://login.example/")
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_challenge_is_403_with_its_type(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent(
                "bot",
                decide=on_headers(answer({"challenge": {"challenge_type": "captcha", "params": {"site": "k1"}}})),
            )
            response = await h.get("/")
            self.assertEqual(response.code, 403)
            self.assertEqual(response.header("X-Sentinel-Challenge"), "captcha")
            self.assertEqual(response.json(), {"challenge": "captcha", "params": {"site": "k1"}})
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="challenge"), 1)

        return ensureDeferred(go())

    def test_challenge_status_is_configurable(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--challenge-status", "429")
            await h.agent("bot", decide=on_headers(answer({"challenge": {"challenge_type": "js"}})))
            response = await h.get("/")
            self.assertEqual(response.code, 429)
            self.assertEqual(response.header("X-Sentinel-Challenge"), "js")

        return ensureDeferred(go())

    def test_first_non_allow_in_agent_order_wins(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "first", "--agent", "second")
            first = await h.agent("first", decide=lambda a, t, b: None)
            second = await h.agent("second", decide=on_headers(block(403, "second says no")))
            pending = ensureDeferred(h.get("/"))
            # The second agent has already blocked; the first still decides,
            # and comes first: its redirect wins.
            await first.wait(lambda: len(first.held) == 1)
            await second.wait(lambda: len(second.events) == 1)
            self.assertFalse(pending.called)
            first.release(answer({"redirect": {"url": "/elsewhere", "status": 302}}))
            response = await pending
            self.assertEqual(response.code, 302)
            self.assertEqual(response.header("Location"), "/elsewhere")

        return ensureDeferred(go())

    def test_later_block_wins_when_earlier_agents_allow(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "first", "--agent", "second")
            first = await h.agent("first")
            second = await h.agent("second", decide=on_headers(block(403, "second says no")))
            response = await h.get("/")
            self.assertEqual((response.code, response.body), (403, b"second says no"))
            self.assertEqual(len(first.of_type(REQUEST_HEADERS)), 1)
            self.assertEqual(len(second.of_type(REQUEST_HEADERS)), 1)

        return ensureDeferred(go())

    def test_a_block_carries_only_the_deciding_answers_response_operations(self) -> Any:
        """
        The allowing agent's response header operations are for the
        upstream's response: a block answered by another agent carries the
        blocking answer's operations alone (docs/operators.md, step 2).
        """

        async def go() -> None:
            h = await Harness(self).start("--agent", "first", "--agent", "second")
            await h.agent(
                "first",
                decide=on_headers(answer("allow", response_headers=[{"set": {"name": "X-First", "value": "1"}}])),
            )
            await h.agent(
                "second",
                decide=on_headers(
                    block(403, "no") | {"response_headers": [{"set": {"name": "X-Second", "value": "2"}}]}
                ),
            )
            response = await h.get("/")
            self.assertEqual((response.code, response.body), (403, b"no"))
            self.assertEqual(response.header("X-Second"), "2")
            self.assertIsNone(response.header("X-First"))

        return ensureDeferred(go())

    def test_block_cancels_agents_still_deciding(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "first", "--agent", "second")
            await h.agent("first", decide=on_headers(block(403)))
            second = await h.agent("second", decide=lambda a, t, b: None)
            response = await h.get("/")
            self.assertEqual(response.code, 403)
            await second.wait(lambda: len(second.cancels) == 1)
            (cancel,) = second.cancels
            self.assertEqual(cancel["reason"], 2)
            self.assertEqual(cancel["correlation_id"], second.held[0][1]["metadata"]["correlation_id"])

        return ensureDeferred(go())

    def test_echo_without_upstream_shows_headers_after_operations_and_decisions(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start(upstream=False)
            await h.agent(
                "waf",
                decide=on_headers(answer(request_headers=[{"set": {"name": "X-Checked", "value": "yes"}}])),
            )
            response = await h.post("/submit?a=1&b=2", b"hello", headers={"X-Client": "c"})
            self.assertEqual(response.code, 200)
            self.assertEqual(response.header("Content-Type"), "application/json")
            echo = response.json()
            self.assertEqual(echo["method"], "POST")
            self.assertEqual(echo["path"], "/submit")
            self.assertEqual(echo["query"], "a=1&b=2")
            self.assertEqual(echo["headers"]["x-checked"], ["yes"])
            self.assertEqual(echo["headers"]["x-client"], ["c"])
            self.assertEqual(echo["body_bytes"], 5)
            self.assertEqual(echo["decisions"], [{"agent_id": "waf", "decision": "allow"}])

        return ensureDeferred(go())

    def test_response_header_operations_apply_to_the_final_headers(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start(upstream=False)
            await h.agent(
                "waf",
                decide=on_headers(
                    answer(
                        response_headers=[
                            {"remove": {"name": "Server"}},
                            {"remove": {"name": "Date"}},
                            {"add": {"name": "X-Frame-Options", "value": "DENY"}},
                        ]
                    )
                ),
            )
            response = await h.get("/")
            self.assertEqual(response.code, 200)
            self.assertIsNone(response.header("Server"))
            self.assertIsNone(response.header("Date"))
            self.assertEqual(response.header("X-Frame-Options"), "DENY")

        return ensureDeferred(go())

    def test_no_agent_registered_fails_closed(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            response = await h.get("/open")
            self.assertEqual(response.code, 503)
            self.assertIn(b"No agent is available", response.body)
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="unavailable"), 1)
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="allow"), 0)

        return ensureDeferred(go())

    def test_an_agent_leaving_is_a_warning_and_its_return_a_line(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            with captured_log() as events:
                agent = await h.agent("waf")
                agent.drop()
                await wait_until(lambda: len(h.pool) == 0, what="the agent to leave")
                refused = await h.get("/x")
                await h.agent("waf")
                allowed = await h.get("/x")
            self.assertEqual((refused.code, allowed.code), (503, 200))
            lines = [(e["log_level"], formatEvent(e)) for e in events if e.get("log_namespace") == "sentinel_twisted.gateway"]
            self.assertIn(
                (
                    LogLevel.warn,
                    "Agent waf left: requests are answered 503 (fail closed) until it registers again "
                    "(a reload that retires it forgets it)",
                ),
                lines,
            )
            self.assertIn((LogLevel.info, "Agent waf registered: requests are decided by it again"), lines)
            # Once each; the request refused while it was away says why (a
            # line rate-limited per agent and reason).
            self.assertIn((LogLevel.warn, "Agent waf unavailable; answering 503"), lines)
            self.assertEqual(len([line for line in lines if line[0] != LogLevel.debug]), 3, lines)

        return ensureDeferred(go())

    def test_gateway_lines_cut_long_agent_ids(self) -> Any:
        # An agent chooses its id (up to --max-agent-id-length): the
        # gateway's lines quote a bounded part of it, as the listener's do.
        long_id = "w" * 5000

        async def go() -> None:
            h = await Harness(self).start("--max-agent-id-length", "10000")
            with captured_log() as events:
                agent = await h.agent(long_id)
                agent.drop()
                await wait_until(lambda: len(h.pool) == 0, what="the agent to leave")
                await h.agent(long_id)
            lines = [formatEvent(e) for e in events if e.get("log_namespace") == "sentinel_twisted.gateway"]
            self.assertEqual(len(lines), 2, lines)
            for line in lines:
                self.assertLess(len(line), 400, line[:100])

        return ensureDeferred(go())

    def test_no_agent_registered_passes_requests_with_fail_open(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--fail-open")
            response = await h.get("/open")
            self.assertEqual((response.code, response.body), (200, b"upstream saw /open"))
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="allow"), 1)

        return ensureDeferred(go())

    def test_keep_alive_reuses_the_client_connection(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf")
            for path in ("/a", "/b", "/c"):
                response = await h.get(path)
                self.assertEqual(response.code, 200)
            self.assertEqual(len(h.live_http), 1)
            # ... and the upstream connection too.
            self.assertEqual(len(h.live_upstream), 1)

        return ensureDeferred(go())

    def test_request_complete_after_the_response(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("audit", events=(1, 5))
            response = await h.post("/log", b"12345")
            self.assertEqual(response.code, 200)
            await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 1)
            (complete,) = agent.of_type(REQUEST_COMPLETE)
            (headers,) = agent.of_type(REQUEST_HEADERS)
            self.assertEqual(complete["correlation_id"], headers["metadata"]["correlation_id"])
            self.assertEqual(complete["status"], 200)
            self.assertEqual(complete["request_body_size"], 5)
            self.assertEqual(complete["response_body_size"], len(b"upstream saw /log"))
            self.assertIsNone(complete["error"])

        return ensureDeferred(go())

    def test_request_complete_when_the_client_leaves_before_the_answer(self) -> Any:
        # An agent that keeps state per request (a concurrency count, a
        # session) learns that the request is over however it ended: the
        # Cancel of what it was deciding, then RequestComplete saying why.
        async def go() -> None:
            h = await Harness(self).start()
            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any] | None:
                return None if body.get("uri") == "/held" else answer()

            agent = await h.agent("audit", events=(1, 5), decide=decide)
            client = await h.raw(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await agent.wait(lambda: len(agent.held) == 1)
            client.transport.loseConnection()
            await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 1)
            (complete,) = agent.of_type(REQUEST_COMPLETE)
            (headers,) = agent.of_type(REQUEST_HEADERS)
            self.assertEqual(complete["correlation_id"], headers["metadata"]["correlation_id"])
            self.assertEqual([c["correlation_id"] for c in agent.cancels], [complete["correlation_id"]])
            self.assertEqual(
                complete["error"], "the client closed its connection before the response was complete"
            )
            self.assertEqual(complete["status"], 0)
            # Told once: a late answer to the cancelled event changes nothing.
            agent.release()
            response = await h.get("/after")
            self.assertEqual(response.code, 200)
            await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 2)

        return ensureDeferred(go())

    def test_request_complete_when_an_agent_cuts_the_response_off(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any]:
                # The first chunk goes to the client, the second is refused.
                if message_type != RESPONSE_BODY_CHUNK:
                    return answer()
                return block(403) if body["chunk_index"] == 1 else answer(needs_more=True)

            agent = await h.agent("dlp", events=(1, 3, 4, 5), chunk_size=4096, decide=decide)
            client = await h.raw(b"GET /bytes?n=20000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: client.is_lost, what="the client's connection to be cut")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), client.received)
            await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 1)
            (complete,) = agent.of_type(REQUEST_COMPLETE)
            self.assertEqual(complete["status"], 200)
            self.assertEqual(complete["error"], "agent dlp answered block after the response started")

        return ensureDeferred(go())

    def test_no_request_complete_for_a_request_the_agent_was_never_shown(self) -> Any:
        # Refused on its Content-Length before any agent was asked: an agent
        # counting requests by RequestHeaders and RequestComplete would have
        # counted an end without a start.
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("audit", events=(1, 2, 5), max_body=8)
            response = await h.post("/big", b"x" * 100)
            self.assertEqual(response.code, 413)
            response = await h.get("/small")
            self.assertEqual(response.code, 200)
            await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) >= 1)
            self.assertEqual([e["uri"] for e in agent.of_type(REQUEST_HEADERS)], ["/small"])
            (complete,) = agent.of_type(REQUEST_COMPLETE)
            self.assertEqual(complete["correlation_id"], agent.of_type(REQUEST_HEADERS)[0]["correlation_id"])

        return ensureDeferred(go())

    def test_no_cancel_after_request_complete(self) -> Any:
        # RequestComplete tells an agent the request is over: an agent that
        # is slow to answer it (or never does, as it changes nothing) is not
        # sent a Cancel for that request afterwards.
        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.2")

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                return None if message_type == REQUEST_COMPLETE else answer()

            agent = await h.agent("audit", events=(1, 5), decide=decide)
            response = await h.get("/x")
            self.assertEqual(response.code, 200)
            await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 1)
            # Past the request timeout: a Cancel would have come by now.
            await deferLater(reactor, 0.5, lambda: None)
            self.assertEqual(agent.cancels, [])
            self.assertEqual(agent.held, [(REQUEST_COMPLETE, agent.of_type(REQUEST_COMPLETE)[0])])
            # Answered late, it changes nothing.
            agent.release()
            self.assertEqual((await h.get("/y")).code, 200)

        return ensureDeferred(go())

    def test_request_complete_says_plainly_why_the_upstream_broke(self) -> Any:
        # An upstream that breaks its connection mid-body: the agents are
        # told so in words, not with the repr of a list of failures.
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("audit", events=(1, 5))
            client = await h.raw(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: client.is_lost, what="the client's connection to be cut")
            await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 1)
            (complete,) = agent.of_type(REQUEST_COMPLETE)
            self.assertEqual(complete["status"], 200)
            self.assertEqual(
                complete["error"],
                "upstream response broke: Connection to the other side was lost in a non-clean fashion.",
            )

        return ensureDeferred(go())

    def test_request_complete_failure_never_reaches_the_client(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == REQUEST_COMPLETE:
                    agent.drop()
                    return None
                return answer()

            agent = await h.agent("audit", events=(1, 5), decide=decide)
            response = await h.get("/x")
            self.assertEqual(response.code, 200)
            await agent.lost
            self.assertEqual(len(agent.of_type(REQUEST_COMPLETE)), 1)
            # The next request finds no agent: the gateway answers, it does not hang.
            again = await h.get("/y")
            self.assertEqual(again.code, 503)

        return ensureDeferred(go())
