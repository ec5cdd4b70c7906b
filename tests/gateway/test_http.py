"""
HTTP/1.1 behaviour of the gateway's client side: pipelined requests,
answers given while a request body is still arriving, and the request
body producer on its own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from sentinel_twisted import messages as m
from sentinel_twisted.errors import RequestTimeout
from sentinel_twisted.gateway.body import Pressure
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway
from sentinel_twisted.gateway.resource import GatewaySite
from sentinel_twisted.gateway.upstream import ForwardRequest, StreamingBody, UpstreamResponse

from .support import (
    REQUEST_BODY_CHUNK,
    REQUEST_HEADERS,
    Harness,
    OneAgentPool,
    ScriptedAgent,
    answer,
    b64,
    block,
    wait_until,
)


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

    def test_100_continue_once_the_agents_allow(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            # It holds the request headers (the test answers them) and
            # inspects the body.
            agent = await h.agent(
                "waf", events=(1, 2), decide=lambda a, t, b: None if t == REQUEST_HEADERS else answer()
            )
            client = await h.raw(b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            await agent.wait(lambda: bool(agent.held))
            # The agent decides: the client, waiting for its 100 Continue,
            # has none yet.
            self.assertEqual(client.received, b"")
            agent.release(answer())
            await wait_until(lambda: b"100 Continue" in client.received, what="100 Continue")
            client.transport.write(b"hello")
            await wait_until(lambda: client.received.endswith(b"upstream saw /a"), what="the response")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"))
            self.assertEqual(h.upstream.requests[0]["body"], b"hello")
            [chunk] = agent.of_type(REQUEST_BODY_CHUNK)
            self.assertEqual(chunk["data"], b64(b"hello"))
            self.assertFalse(client.is_lost)

        return ensureDeferred(go())

    def test_a_blocked_request_gets_no_100_continue(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf", decide=lambda a, t, b: None)
            client = await h.raw(
                b"PUT /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            )
            await agent.wait(lambda: bool(agent.held))
            agent.release(block(403, "no uploads"))
            await wait_until(lambda: client.received.endswith(b"no uploads"), what="the block")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), client.received)
            self.assertIn(b"Connection: close\r\n", client.received)
            # A client that sends its body anyway, and another request
            # after it: the connection closes, nothing of it is parsed.
            if not client.is_lost:
                client.transport.write(b"hello" + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            await client.lost
            self.assertNotIn(b"100 Continue", client.received)
            self.assertEqual(client.received.count(b"HTTP/1.1 "), 1)
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(len(agent.events), 1)

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


# -- Expect: 100-continue, in memory -----------------------------------------------------


class _DecidingAgent:
    """An agent connection whose answers the test gives (L{allow}, L{refuse}, L{fail})."""

    events = frozenset({m.EventType.REQUEST_HEADERS})
    is_closed = False

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, Any, Any]] = []
        self.cancelled: list[str] = []

    def send_event_with(self, event: Any, answered: Any, failed: Any, arg: Any, correlation_id: str) -> None:
        self.waiting.append((answered, failed, arg))

    def cancel_request(self, correlation_id: str, reason: int) -> bool:
        self.cancelled.append(correlation_id)
        return False

    def allow(self) -> None:
        answered, _, arg = self.waiting.pop(0)
        answered(m.AgentResponse(), arg)

    def refuse(self, decision: Any) -> None:
        answered, _, arg = self.waiting.pop(0)
        answered(m.AgentResponse(decision=decision), arg)

    def fail(self) -> None:
        _, failed, arg = self.waiting.pop(0)
        failed(Failure(RequestTimeout(1.0)), arg)


class _OK(UpstreamResponse):
    code = 200
    phrase = b"OK"
    length = 2

    def __init__(self) -> None:
        self.headers = Headers()

    def deliver(self, sink: Any) -> None:
        sink.response_data(b"ok")
        sink.response_end(None)


class _Collector:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _BodyUpstream:
    """Reads each request body and answers C{200 ok} once it is complete."""

    def __init__(self) -> None:
        self.bodies: list[_Collector] = []

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        body = _Collector()
        self.bodies.append(body)
        if request.body is None:
            return succeed(_OK())
        return request.body.startProducing(body).addCallback(lambda _: _OK())

    def close(self) -> Deferred[None]:
        return succeed(None)

    def describe(self) -> str:
        return "reader"


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_EXPECTING = b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"


class ExpectContinueTests(SynchronousTestCase):
    """
    A request with C{Expect: 100-continue} gets its C{100 Continue} once the
    agents allow it, its body then wanted; one answered first gets its final
    response alone.
    """

    def connect(self, agents: bool = True, **config: Any) -> tuple[Any, StringTransport, _DecidingAgent, _BodyUpstream, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        agent = _DecidingAgent()
        upstream = _BodyUpstream()
        pool: Any = OneAgentPool(agent, "waf")
        if not agents:
            pool.agent_ids = list
        gateway = Gateway(pool, GatewayConfig(**config), upstream, clock=reactor)  # type: ignore[arg-type]
        channel = GatewaySite(gateway, reactor=reactor).buildProtocol(None)
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport, agent, upstream, reactor

    def test_100_continue_once_the_agents_allow(self) -> None:
        channel, transport, agent, upstream, _ = self.connect()
        channel.dataReceived(_EXPECTING)
        self.assertEqual(len(agent.waiting), 1)
        # The agent decides: nothing for the client yet.
        self.assertEqual(transport.value(), b"")
        agent.allow()
        self.assertEqual(transport.value(), _CONTINUE)
        [body] = upstream.bodies
        self.assertEqual(body.data, b"")
        channel.dataReceived(b"hello")
        self.assertEqual(body.data, b"hello")
        response = transport.value()
        self.assertTrue(response.startswith(_CONTINUE + b"HTTP/1.1 200 OK\r\n"), response)
        self.assertTrue(response.endswith(b"\r\n\r\nok"), response)
        self.assertEqual(response.count(b"100 Continue"), 1)
        self.assertFalse(transport.disconnecting)

    def test_100_continue_at_once_when_no_agent_decides(self) -> None:
        # Failing open with no agent to ask, the request is allowed at
        # once, its 100 Continue too (as before); with one to ask, not.
        channel, transport, _, upstream, _ = self.connect(agents=False, fail_open=True)
        channel.dataReceived(_EXPECTING)
        self.assertEqual(transport.value(), _CONTINUE)
        channel.dataReceived(b"hello")
        self.assertEqual(upstream.bodies[0].data, b"hello")
        channel, transport, agent, _, _ = self.connect(fail_open=True)
        channel.dataReceived(_EXPECTING)
        self.assertEqual(transport.value(), b"")

    def test_a_request_refused_first_gets_its_answer_alone(self) -> None:
        outcomes = [
            (lambda agent: agent.refuse(m.Block(status=403, body="no uploads")), b"HTTP/1.1 403 "),
            (lambda agent: agent.refuse(m.Redirect(url="/elsewhere", status=302)), b"HTTP/1.1 302 "),
            (lambda agent: agent.fail(), b"HTTP/1.1 503 "),
        ]
        for decide, status in outcomes:
            channel, transport, agent, upstream, _ = self.connect()
            channel.dataReceived(_EXPECTING)
            decide(agent)
            response = transport.value()
            self.assertTrue(response.startswith(status), response)
            self.assertNotIn(b"100 Continue", response)
            self.assertIn(b"\r\nConnection: close\r\n", response)
            self.assertTrue(transport.disconnecting)
            # A client that sends its body anyway, and a request after it:
            # nothing of it is read as a request, nothing more is written.
            channel.dataReceived(b"hello" + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(transport.value(), response)
            self.assertEqual(upstream.bodies, [])
            self.assertEqual(agent.waiting, [])

    def test_no_100_continue_for_a_request_without_content(self) -> None:
        channel, transport, agent, _, _ = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n")
        agent.allow()
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertNotIn(b"100 Continue", response)

    def test_the_body_rate_counts_from_the_100_continue(self) -> None:
        # The client waits for its 100 Continue as long as the agents
        # decide, past the body's grace and twisted.web's idle timeout
        # (60 s); its body's least rate counts from then on.
        channel, transport, agent, upstream, reactor = self.connect(header_timeout=5.0, min_body_rate=1)
        channel.dataReceived(_EXPECTING)
        reactor.advance(100)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        agent.allow()
        self.assertEqual(transport.value(), _CONTINUE)
        reactor.advance(4.5)
        channel.dataReceived(b"hel")
        reactor.advance(3)
        self.assertFalse(transport.disconnecting)
        # 8 s after the 100 Continue (5 s of grace), 3 bytes in at 1 byte/s: late.
        reactor.advance(0.5)
        self.assertTrue(transport.value().startswith(_CONTINUE + b"HTTP/1.1 408 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(upstream.bodies[0].data, b"hel")
