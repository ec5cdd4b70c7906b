"""
Failure paths: agents that cannot answer (fail closed and fail open),
flow control, client aborts, pipelined answers, upstream errors.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from .support import (
    REQUEST_COMPLETE,
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    Harness,
    ScriptedAgent,
    answer,
    listen_for,
    small_chunks,
    unreachable_url,
    wait_until,
)


def hold(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> None:
    return None


class AgentFailureTests(TestCase):
    timeout = 20

    def test_agent_not_connected_is_503(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "ghost")
            response = await h.get("/")
            self.assertEqual(response.code, 503)
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="unavailable"), 1)
            self.assertEqual(
                h.sample("sentinel_gateway_agent_failures_total", agent="ghost", reason="unavailable"), 1
            )

        return ensureDeferred(go())

    def test_agent_not_connected_fail_open(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "ghost", "--fail-open")
            response = await h.get("/")
            self.assertEqual(response.code, 200)
            self.assertEqual(
                h.sample("sentinel_gateway_fail_open_passes_total", agent="ghost", reason="unavailable"), 1
            )

        return ensureDeferred(go())

    async def paused_agent(self, h: Harness) -> ScriptedAgent:
        agent = await h.agent("waf")
        agent.pause()
        await wait_until(lambda: h.pool.connections("waf")[0].is_paused, what="the pause")
        return agent

    def test_all_connections_paused_is_503(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await self.paused_agent(h)
            response = await h.get("/")
            self.assertEqual(response.code, 503)
            self.assertEqual(agent.events, [])
            self.assertEqual(h.sample("sentinel_gateway_agent_failures_total", agent="waf", reason="paused"), 1)
            agent.resume()
            await wait_until(lambda: not h.pool.connections("waf")[0].is_paused, what="the resume")
            self.assertEqual((await h.get("/")).code, 200)

        return ensureDeferred(go())

    def test_all_connections_paused_fail_open(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--fail-open")
            agent = await self.paused_agent(h)
            response = await h.get("/")
            self.assertEqual(response.code, 200)
            self.assertEqual(agent.events, [])
            self.assertEqual(
                h.sample("sentinel_gateway_fail_open_passes_total", agent="waf", reason="paused"), 1
            )

        return ensureDeferred(go())

    def test_timeout_is_503_and_cancels(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.3")
            agent = await h.agent("waf", decide=hold)
            response = await h.get("/")
            self.assertEqual(response.code, 503)
            await agent.wait(lambda: len(agent.cancels) == 1)
            self.assertEqual(agent.cancels[0]["reason"], 1)
            self.assertEqual(h.sample("sentinel_agent_timeouts_total", agent="waf"), 1)
            self.assertEqual(h.sample("sentinel_agent_cancels_total", agent="waf", reason="timeout"), 1)
            self.assertEqual(h.pool.connections("waf")[0].in_flight, 0)
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_timeout_cancel_reaches_the_agent_before_request_complete(self) -> Any:
        # The request ends on the timeout and its RequestComplete goes to the
        # same agent under the same id: the Cancel must come first, or the
        # agent takes it for the RequestComplete.
        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.3")
            cancels_before: list[int] = []

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == REQUEST_COMPLETE:
                    cancels_before.append(len(agent.cancels))
                    return answer()
                return None

            agent = await h.agent("waf", events=(1, 5), decide=decide)
            response = await h.get("/")
            self.assertEqual(response.code, 503)
            await agent.wait(lambda: bool(cancels_before))
            self.assertEqual(cancels_before, [1])
            self.assertEqual(agent.cancels[0]["reason"], 1)
            await wait_until(lambda: h.pool.connections("waf")[0].in_flight == 0, what="the answer")
            self.assertEqual(h.sample("sentinel_agent_timeouts_total", agent="waf"), 1)

        return ensureDeferred(go())

    def test_timeout_fail_open(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.3", "--fail-open")
            await h.agent("waf", decide=hold)
            response = await h.get("/")
            self.assertEqual(response.code, 200)
            self.assertEqual(
                h.sample("sentinel_gateway_fail_open_passes_total", agent="waf", reason="timeout"), 1
            )

        return ensureDeferred(go())

    def test_connection_dropped_mid_request_is_503_at_once(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def drop(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> None:
                agent.drop()
                return None

            await h.agent("waf", decide=drop)
            response = await h.get("/")
            self.assertEqual(response.code, 503)
            # The agent left with its only connection: its failures now
            # count among the departed agents' totals.
            self.assertEqual(
                h.sample("sentinel_gateway_agent_failures_departed_total", reason="disconnected"), 1
            )

        return ensureDeferred(go())

    def test_connection_dropped_mid_request_fail_open(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--fail-open", "--agent", "waf", "--agent", "auth")

            def drop(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> None:
                agent.drop()
                return None

            await h.agent("waf", decide=drop)
            auth = await h.agent(
                "auth", decide=lambda a, t, b: answer(request_headers=[{"set": {"name": "X-Auth", "value": "ok"}}])
            )
            response = await h.get("/")
            self.assertEqual(response.code, 200)
            self.assertEqual(h.upstream.requests[0]["headers"]["x-auth"], ["ok"])
            self.assertEqual(len(auth.events), 1)

        return ensureDeferred(go())

    def test_a_broken_answer_fails_closed(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", decide=lambda a, t, b: {"version": 2, "decision": {"explode": {}}})
            response = await h.get("/")
            self.assertEqual(response.code, 503)
            self.assertEqual(
                h.sample("sentinel_gateway_agent_failures_total", agent="waf", reason="invalid_answer"), 1
            )

        return ensureDeferred(go())


class FlowControlTests(TestCase):
    timeout = 20

    def test_requests_route_around_a_paused_connection(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            first = await h.agent("waf")
            second = await h.agent("waf")
            first.pause()
            await wait_until(
                lambda: any(c.is_paused for c in h.pool.connections("waf")), what="the pause"
            )
            for i in range(4):
                self.assertEqual((await h.get(f"/{i}")).code, 200)
            self.assertEqual(len(first.events), 0)
            self.assertEqual(len(second.events), 4)
            first.resume()
            await wait_until(
                lambda: not any(c.is_paused for c in h.pool.connections("waf")), what="the resume"
            )
            for i in range(4):
                self.assertEqual((await h.get(f"/{i}")).code, 200)
            self.assertGreater(len(first.events), 0)

        return ensureDeferred(go())

    def test_all_events_of_a_request_use_one_connection(self) -> Any:
        small_chunks(self)

        async def go() -> None:
            h = await Harness(self).start()
            agents = [
                await h.agent(
                    "waf",
                    events=(1, 2, 3, 4, 5),
                    chunk_size=4,
                    decide=lambda a, t, b: answer(needs_more=True),
                )
                for _ in range(3)
            ]
            for i in range(3):
                response = await h.post(f"/{i}", b"0123456789")
                self.assertEqual(response.code, 200)
            # headers, 3 request chunks, response headers, 4 response chunks
            # ("upstream saw /N" is 15 bytes), complete.
            per_request = 1 + 3 + 1 + 4 + 1
            await wait_until(
                lambda: sum(len(a.events) for a in agents) == 3 * per_request,
                what="every event",
            )
            for agent in agents:
                ids = {
                    body["metadata"]["correlation_id"] if t == REQUEST_HEADERS else body["correlation_id"]
                    for t, body in agent.events
                }
                # Each connection saw whole requests: 7 events per id.
                for cid in ids:
                    count = sum(
                        1
                        for t, body in agent.events
                        if (body["metadata"]["correlation_id"] if t == REQUEST_HEADERS else body["correlation_id"])
                        == cid
                    )
                    self.assertEqual(count, per_request)

        return ensureDeferred(go())


class ClientAbortTests(TestCase):
    timeout = 20

    def test_client_disconnect_cancels_agents_still_deciding(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "waf", "--agent", "bot")
            waf = await h.agent("waf", decide=hold)
            bot = await h.agent("bot", decide=hold)
            client = await h.raw(b"GET /slowly HTTP/1.1\r\nHost: example\r\n\r\n")
            await waf.wait(lambda: len(waf.held) == 1)
            await bot.wait(lambda: len(bot.held) == 1)
            bot.release(answer())
            await wait_until(lambda: h.pool.connections("bot")[0].in_flight == 0, what="bot's answer")
            client.transport.abortConnection()
            await waf.wait(lambda: len(waf.cancels) == 1)
            (cancel,) = waf.cancels
            self.assertEqual(cancel["reason"], 0)
            self.assertEqual(cancel["correlation_id"], waf.held[0][1]["metadata"]["correlation_id"])
            # The agent that had answered is not told anything.
            self.assertEqual(bot.cancels, [])
            self.assertEqual(h.sample("sentinel_agent_cancels_total", agent="waf", reason="client_disconnect"), 1)
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="client_closed"), 1)
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())


class PipeliningTests(TestCase):
    timeout = 20

    def test_answers_out_of_order_reach_their_own_requests(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf", decide=hold)
            paths = [f"/p{i}" for i in range(5)]
            pending = [ensureDeferred(h.get(path)) for path in paths]
            await agent.wait(lambda: len(agent.held) == len(paths))
            self.assertEqual(h.pool.connections("waf")[0].in_flight, len(paths))
            # Answer the newest first; each answer tags its request by uri.
            while agent.held:
                _, body = agent.held[-1]
                agent.release(
                    answer(request_headers=[{"set": {"name": "X-Uri", "value": body["uri"]}}]),
                    index=len(agent.held) - 1,
                )
            responses = await gatherResults(pending)
            for path, response in zip(paths, responses, strict=True):
                self.assertEqual(response.body, b"upstream saw " + path.encode())
            for seen in h.upstream.requests:
                self.assertEqual(seen["headers"]["x-uri"], [seen["uri"]])

        return ensureDeferred(go())


class _CannedUpstream(Protocol):
    """An upstream that answers each request head with the same bytes."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        while b"\r\n\r\n" in self.received:
            _, _, self.received = self.received.partition(b"\r\n\r\n")
            self.transport.write(self.response)


class UpstreamFailureTests(TestCase):
    timeout = 20

    async def answered(self, response: bytes, complete: bytes) -> tuple[bytes, ScriptedAgent]:
        """
        What a client gets (once it ends with C{complete}) through a gateway
        whose upstream answers C{response}, and the agent of the gateway.
        """
        port = await listen_for(self, Factory.forProtocol(lambda: _CannedUpstream(response)))
        h = await Harness(self).start("--upstream", f"http://127.0.0.1:{port.getHost().port}")
        agent = await h.agent("waf", events=(1, 3))
        client = await h.raw(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: client.received.endswith(complete), what="the response")
        return client.received, agent

    def test_a_status_that_is_no_http_status_is_502(self) -> Any:
        async def go() -> None:
            for status in (b"-1", b"99", b"600", b"99999"):
                received, agent = await self.answered(
                    b"HTTP/1.1 " + status + b" OK\r\nContent-Length: 2\r\n\r\nok", b"502 Bad Gateway\n"
                )
                self.assertTrue(received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), received)
                self.assertEqual(agent.of_type(RESPONSE_HEADERS), [])

        return ensureDeferred(go())

    def test_a_reason_phrase_with_control_characters_is_not_passed_on(self) -> Any:
        async def go() -> None:
            for phrase in (b"OK\rSet-Cookie: planted=1", b"O\x00K", b"OK\x1b[2J"):
                received, _ = await self.answered(
                    b"HTTP/1.1 200 " + phrase + b"\r\nContent-Length: 2\r\n\r\nok", b"\r\n\r\nok"
                )
                self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\nDate: "), received)
            # A phrase of its own, well formed, goes on as the upstream sent it.
            received, _ = await self.answered(
                b"HTTP/1.1 200 Fine\tand \xe9\r\nContent-Length: 2\r\n\r\nok", b"\r\n\r\nok"
            )
            self.assertTrue(received.startswith(b"HTTP/1.1 200 Fine\tand \xe9\r\n"), received)

        return ensureDeferred(go())

    def test_a_status_twisted_has_no_phrase_for_gets_its_own(self) -> Any:
        """
        An upstream's 429 without a usable phrase goes on as C{Too Many
        Requests}, not twisted.web's C{Unknown Status}.
        """

        async def go() -> None:
            for phrase in (b"", b"\x00"):
                received, _ = await self.answered(
                    b"HTTP/1.1 429 " + phrase + b"\r\nContent-Length: 2\r\n\r\nok", b"\r\n\r\nok"
                )
                self.assertTrue(received.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), received)

        return ensureDeferred(go())

    def test_unreachable_upstream_is_502(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--upstream", unreachable_url())
            await h.agent("waf")
            response = await h.get("/")
            self.assertEqual(response.code, 502)
            self.assertEqual(h.sample("sentinel_gateway_upstream_errors_total", kind="error"), 1)

        return ensureDeferred(go())

    def test_upstream_dropping_the_connection_is_502(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf")
            response = await h.get("/drop")
            self.assertEqual(response.code, 502)

        return ensureDeferred(go())

    def test_upstream_timeout_is_504(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--upstream-timeout", "0.3")
            agent = await h.agent("audit", events=(1, 5))
            response = await h.get("/slow")
            self.assertEqual(response.code, 504)
            self.assertEqual(h.sample("sentinel_gateway_upstream_errors_total", kind="timeout"), 1)
            await agent.wait(lambda: len(agent.events) == 2)
            complete = agent.events[1][1]
            self.assertEqual(complete["status"], 504)
            self.assertIn("no response", complete["error"])

        return ensureDeferred(go())

    def test_upstream_quiet_mid_body_cuts_the_response_off(self) -> Any:
        """
        Over real connections: the upstream sends its headers and part of
        the body, then nothing.  After --upstream-timeout the gateway
        aborts the upstream connection and closes the client's, the body
        short of its Content-Length.
        """

        async def go() -> None:
            upstreams: list[_CannedUpstream] = []
            lost: list[_CannedUpstream] = []

            def build() -> _CannedUpstream:
                upstream = _CannedUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
                upstream.connectionLost = lambda reason: lost.append(upstream)  # type: ignore[method-assign]
                upstreams.append(upstream)
                return upstream

            port = await listen_for(self, Factory.forProtocol(build))
            h = await Harness(self).start(
                "--upstream", f"http://127.0.0.1:{port.getHost().port}", "--upstream-timeout", "0.3"
            )
            await h.agent("waf")
            client = await h.raw(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            await client.lost
            self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), client.received)
            self.assertTrue(client.received.endswith(b"\r\n\r\nhello"), client.received)
            await wait_until(lambda: len(lost) == 1, what="the upstream connection to close")
            self.assertEqual(len(upstreams), 1)
            self.assertEqual(h.sample("sentinel_gateway_upstream_errors_total", kind="timeout"), 1)

        return ensureDeferred(go())
