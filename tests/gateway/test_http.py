"""
HTTP/1.1 behaviour of the gateway's client side: pipelined requests,
answers given while a request body is still arriving, and the request
body producer on its own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted.gateway.body import Pressure
from sentinel_twisted.gateway.upstream import StreamingBody

from .support import REQUEST_HEADERS, Harness, ScriptedAgent, answer, block, wait_until


class ClientSideTests(TestCase):
    timeout = 20

    def test_pipelined_requests_answered_in_order(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf")
            client = await h.raw(
                b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            await wait_until(lambda: client.received.count(b"HTTP/1.1 200 OK") == 3, what="three answers")
            received = client.received
            self.assertLess(received.index(b"upstream saw /one"), received.index(b"upstream saw /two"))
            self.assertLess(received.index(b"upstream saw /two"), received.index(b"upstream saw /three"))
            self.assertEqual([r["body"] for r in h.upstream.requests], [b"", b"abc", b""])
            self.assertEqual(len(agent.of_type(REQUEST_HEADERS)), 3)
            self.assertFalse(client.is_lost)

        return ensureDeferred(go())

    def test_body_over_the_limit_is_refused_before_it_is_sent(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", events=(1, 2), max_body=1000)
            client = await h.raw(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            await client.lost
            self.assertTrue(client.received.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), client.received)
            self.assertIn(b"Connection: close\r\n", client.received)
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_block_while_the_body_is_still_arriving(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                return block(403, "no uploads") if message_type == REQUEST_HEADERS else answer()

            await h.agent("waf", decide=decide)
            client = await h.raw(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
            )
            # The answer comes at once and the connection closes: the
            # rest of the body is never read.
            await client.lost
            self.assertTrue(client.received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), client.received)
            self.assertTrue(client.received.endswith(b"no uploads"))
            self.assertIn(b"Connection: close\r\n", client.received)
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_no_100_continue_after_an_answer_given_at_once(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", events=(1, 2), max_body=1000)
            heads = [
                # 413: over the agent's max_body_size.
                b"POST /big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
                # 400: a dot segment.
                b"POST /../x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            ]
            for head in heads:
                client = await h.raw(head)
                await client.lost
                self.assertNotIn(b"100 Continue", client.received)
                self.assertRegex(client.received, rb"\AHTTP/1.1 4\d\d ")

        return ensureDeferred(go())

    def test_100_continue_while_the_agents_decide(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf")
            client = await h.raw(b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            await wait_until(lambda: b"100 Continue" in client.received, what="100 Continue")
            client.transport.write(b"hello")
            await wait_until(lambda: client.received.endswith(b"upstream saw /a"), what="the response")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"))
            self.assertEqual(h.upstream.requests[0]["body"], b"hello")

        return ensureDeferred(go())

    def test_agent_unavailable_while_the_body_is_still_arriving(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "ghost")
            client = await h.raw(b"PUT /file HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await client.lost
            self.assertTrue(client.received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), client.received)

        return ensureDeferred(go())


class StreamingBodyTests(SynchronousTestCase):
    """The request body as an IBodyProducer, against a consumer that records."""

    class Consumer:
        def __init__(self) -> None:
            self.data: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.data.append(data)

    def setUp(self) -> None:
        self.calls: list[str] = []
        self.pressure = Pressure(lambda: self.calls.append("pause"), lambda: self.calls.append("resume"), 10, 5)

    def test_held_until_the_upstream_connection_takes_it(self) -> None:
        body = StreamingBody(None, self.pressure)
        body.feed(b"0123456789ab")
        self.assertEqual(self.calls, ["pause"])
        consumer = self.Consumer()
        done = body.startProducing(consumer)
        self.assertEqual(consumer.data, [b"0123456789ab"])
        self.assertEqual(self.calls, ["pause", "resume"])
        self.assertNoResult(done)
        body.end()
        self.successResultOf(done)

    def test_paused_by_the_upstream(self) -> None:
        body = StreamingBody(3, self.pressure)
        consumer = self.Consumer()
        done = body.startProducing(consumer)
        body.pauseProducing()
        body.feed(b"abc")
        body.end()
        self.assertEqual(consumer.data, [])
        self.assertNoResult(done)
        body.resumeProducing()
        self.assertEqual(consumer.data, [b"abc"])
        self.successResultOf(done)

    def test_stopped_body_drops_what_it_holds(self) -> None:
        body = StreamingBody(None, self.pressure)
        body.feed(b"x" * 20)
        body.stopProducing()
        self.assertEqual(self.pressure.held, 0)
        self.assertEqual(self.calls, ["pause", "resume"])
        body.feed(b"more")
        self.assertEqual(self.pressure.held, 0)
