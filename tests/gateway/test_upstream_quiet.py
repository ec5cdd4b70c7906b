"""
An upstream that sends its response headers and then goes quiet in the
middle of the body: C{--upstream-timeout} bounds its silence while the
gateway reads the body (as nginx's C{proxy_read_timeout} does).  The
upstream connection is aborted, the client's connection is closed without
a clean end, agents still inspecting the body are cancelled, and one line
says so.  Time while the gateway does not read (a slow client, agents
behind) does not count.

The gateway runs in memory on a L{MemoryReactorClock} with the real
L{HTTPUpstream}: the upstream's connection is a L{StringTransport} the
tests write the upstream's bytes to.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted.errors import RequestCancelled
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway
from sentinel_twisted.gateway.resource import GatewaySite
from sentinel_twisted.gateway.upstream import HTTPUpstream

from .._proxy_support import captured_log
from .support import OneAgentPool, small_chunks
from .test_target import _RecordingConnection

#: --upstream-timeout of these tests (a power of two: the clock's sums stay exact).
TIMEOUT = 4.0

_GET = b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n"


class _Transport(StringTransport):
    """A connection that tells an abort from a clean close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class _InspectingAgent:
    """
    An agent connection that allows the request headers at once and holds
    each response body chunk (4 bytes) until the test answers it.
    """

    agent_id = "inspector"
    is_closed = False
    events = frozenset({m.EventType.REQUEST_HEADERS, m.EventType.RESPONSE_BODY_CHUNK})

    def __init__(self) -> None:
        self.capabilities = SimpleNamespace(limits=m.AgentLimits(preferred_chunk_size=4))
        self.pending: list[tuple[Any, Deferred[m.AgentResponse]]] = []
        self.cancels: list[int] = []

    def send_event_with(self, event: Any, answered: Any, failed: Any, arg: Any, correlation_id: str) -> None:
        if isinstance(event, m.RequestHeadersEvent):
            answered(m.AgentResponse(), arg)
            return
        answer: Deferred[m.AgentResponse] = Deferred()
        answer.addCallbacks(answered, failed, callbackArgs=(arg,), errbackArgs=(arg,))
        self.pending.append((event, answer))

    def answer(self, needs_more: bool = True) -> None:
        """Allow the chunk the agent holds."""
        _, answer = self.pending.pop(0)
        answer.callback(m.AgentResponse(needs_more=needs_more))

    def cancel_request(self, correlation_id: str, reason: int) -> bool:
        self.cancels.append(reason)
        pending, self.pending = self.pending, []
        for _, answer in pending:
            answer.errback(Failure(RequestCancelled(correlation_id, reason)))
        return bool(pending)


class _Scene:
    """A client's GET through the gateway, its upstream connection open."""

    def __init__(self, agent: Any = None) -> None:
        self.reactor = reactor = MemoryReactorClock()
        self.agent = agent if agent is not None else _RecordingConnection()
        upstream = HTTPUpstream(reactor, "http://127.0.0.1:8000", timeout=TIMEOUT)
        config = GatewayConfig(upstream_timeout=TIMEOUT, send_timeout=1000.0)
        self.gateway = Gateway(OneAgentPool(self.agent, "waf"), config, upstream, clock=reactor)  # type: ignore[arg-type]
        self.client = GatewaySite(self.gateway, reactor=reactor).buildProtocol(None)
        self.client_transport = _Transport()
        self.client.makeConnection(self.client_transport)
        self.client.dataReceived(_GET)
        ((host, port, factory, _, _),) = reactor.tcpClients
        self.server = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.server_transport = _Transport()
        self.server.makeConnection(self.server_transport)
        assert self.server_transport.value().startswith(b"GET /file HTTP/1.1\r\n")

    def upstream_sends(self, data: bytes) -> None:
        self.server.dataReceived(data)

    @property
    def received(self) -> bytes:
        """What the client has received."""
        return self.client_transport.value()

    @property
    def cut(self) -> bool:
        """Whether the gateway aborted the upstream and the client connections."""
        upstream = self.server_transport.aborted
        client = self.client_transport.aborted
        assert upstream == client, (upstream, client)
        return upstream

    def connections_lost(self) -> None:
        """What the reactor does after the aborts."""
        self.server.connectionLost(Failure(ConnectionAborted()))
        self.client.connectionLost(Failure(ConnectionAborted()))


def _dechunked(response: bytes) -> bytes:
    """The body of a chunked response (as far as it came)."""
    _, _, rest = response.partition(b"\r\n\r\n")
    body = b""
    for _ in range(len(rest)):
        size_line, _, rest = rest.partition(b"\r\n")
        if not size_line or not int(size_line, 16):
            break
        size = int(size_line, 16)
        body += rest[:size]
        rest = rest[size + 2 :]
    return body


def _text(events: list[Any]) -> str:
    return "\n".join(formatEvent(event) or "" for event in events)


class QuietUpstreamTests(SynchronousTestCase):
    def test_a_body_that_stops_coming_is_cut_off(self) -> None:
        """
        Headers, some of the body, then nothing: after --upstream-timeout
        the upstream connection is aborted and the client's is closed
        without the body's end (short of Content-Length, or no last
        chunk), with one line.
        """
        framings = [
            (b"Content-Length: 100\r\n\r\nhello", b"hello"),
            (b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"5\r\nhello\r\n"),
        ]
        for head, sent in framings:
            scene = _Scene()
            with captured_log() as events:
                scene.upstream_sends(b"HTTP/1.1 200 OK\r\n" + head)
                self.assertTrue(scene.received.startswith(b"HTTP/1.1 200 OK\r\n"), scene.received)
                self.assertTrue(scene.received.endswith(sent), scene.received)
                scene.reactor.advance(TIMEOUT - 0.5)
                self.assertFalse(scene.cut)
                scene.reactor.advance(0.5)
                self.assertTrue(scene.cut)
            # Nothing more reached the client: no last chunk, no more bytes.
            self.assertTrue(scene.received.endswith(sent), scene.received)
            text = _text(events)
            self.assertIn(
                "Closing the client connection mid-response: upstream timed out: "
                "http://127.0.0.1:8000 went quiet for 4s in its response body",
                text,
            )
            self.assertEqual(text.count("went quiet"), 1, text)
            scene.connections_lost()
            self.assertEqual(scene.gateway.exchanges, set())
            self.assertEqual(scene.reactor.getDelayedCalls(), [])

    def test_agents_inspecting_the_body_are_cancelled(self) -> None:
        """
        The agent inspecting the response body has a chunk in flight when
        the upstream goes quiet: it is cancelled (upstream error), as when
        the upstream connection breaks mid-body, and nothing stays pending.
        """
        small_chunks(self)
        agent = _InspectingAgent()
        scene = _Scene(agent)
        with captured_log() as events:
            scene.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabcdefghi")
            agent.answer()
            # The first chunk went to the client (chunked: the agents may
            # change the body), the second waits for the agent.
            self.assertTrue(scene.received.endswith(b"\r\n\r\n4\r\nabcd\r\n"), scene.received)
            self.assertEqual(len(agent.pending), 1)
            scene.reactor.advance(TIMEOUT)
            self.assertTrue(scene.cut)
        self.assertEqual(agent.cancels, [m.CancelReason.UPSTREAM_ERROR])
        self.assertEqual(agent.pending, [])
        self.assertTrue(scene.received.endswith(b"4\r\nabcd\r\n"), scene.received)
        self.assertIn("went quiet for 4s", _text(events))

    def test_quiet_before_the_response_started_is_504(self) -> None:
        """
        Nothing of the body reached the client yet (the agent holds the
        first chunk): the client gets C{504}, as for no headers in time.
        """
        small_chunks(self)
        agent = _InspectingAgent()
        scene = _Scene(agent)
        with captured_log() as events:
            scene.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabcdefghi")
            self.assertEqual(scene.received, b"")
            scene.reactor.advance(TIMEOUT)
        self.assertTrue(scene.received.startswith(b"HTTP/1.1 504 Gateway Time-out\r\n"), scene.received)
        self.assertTrue(scene.server_transport.aborted)
        self.assertFalse(scene.client_transport.aborted)
        self.assertEqual(agent.cancels, [m.CancelReason.UPSTREAM_ERROR])
        self.assertEqual(agent.pending, [])
        self.assertIn(
            "Upstream timed out for GET /file: http://127.0.0.1:8000 went quiet for 4s in its response body",
            _text(events),
        )

    def test_a_steady_trickle_is_not_cut(self) -> None:
        """
        A byte every 3.5 s, for far longer than --upstream-timeout in all:
        each read starts the timeout over.  A body that trickles to its end
        completes (and leaves no timer); once a trickle stops, the timeout
        counts from its last byte.
        """
        whole = _Scene()
        whole.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
        stopped = _Scene()
        stopped.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(20):
            for scene in (whole, stopped):
                scene.reactor.advance(TIMEOUT - 0.5)
                self.assertFalse(scene.cut)
                scene.upstream_sends(b"x")
        for scene in (whole, stopped):
            self.assertTrue(scene.received.endswith(b"\r\n\r\n" + b"x" * 20), scene.received)
        # The whole body: complete, the connection back in the pool.
        self.assertEqual(
            [call for call in whole.reactor.getDelayedCalls() if "BodyReader" in repr(call.func)], []
        )
        self.assertFalse(whole.client_transport.disconnecting)
        self.assertFalse(whole.server_transport.disconnecting)
        whole.reactor.advance(10 * TIMEOUT)
        self.assertFalse(whole.cut)
        # The stopped one: cut off a timeout after its last byte.
        stopped.reactor.advance(TIMEOUT - 0.5)
        self.assertFalse(stopped.cut)
        stopped.reactor.advance(0.5)
        self.assertTrue(stopped.cut)

    def test_a_slow_client_does_not_count(self) -> None:
        """
        The client takes nothing for ten times the timeout: the gateway
        stops reading the upstream, and that time is not the upstream's
        silence.  Once the client reads again, the upstream has the whole
        timeout again.
        """
        scene = _Scene()
        scene.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        # The client's connection is full: it pauses the gateway.
        scene.client_transport.producer.pauseProducing()
        self.assertEqual(scene.server_transport.producerState, "paused")
        scene.reactor.advance(10 * TIMEOUT)
        self.assertFalse(scene.cut)
        # The timer stopped while the gateway was not reading.
        self.assertEqual(
            [call for call in scene.reactor.getDelayedCalls() if "BodyReader" in repr(call.func)], []
        )
        scene.reactor.advance(TIMEOUT - 0.5)
        scene.client_transport.producer.resumeProducing()
        self.assertEqual(scene.server_transport.producerState, "producing")
        scene.reactor.advance(TIMEOUT - 0.5)
        self.assertFalse(scene.cut)
        scene.reactor.advance(0.5)
        self.assertTrue(scene.cut)

    def test_agents_behind_do_not_count(self) -> None:
        """
        The inspecting agent sits on its first chunk while the upstream
        sends more than the gateway holds for it: the gateway stops reading
        the upstream, and that time is not the upstream's silence.
        """
        small_chunks(self)
        agent = _InspectingAgent()
        scene = _Scene(agent)
        body = b"b" * (300 * 1024)
        scene.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(body) + 10) + body)
        self.assertEqual(scene.server_transport.producerState, "paused")
        scene.reactor.advance(10 * TIMEOUT)
        self.assertFalse(scene.cut)
        # The agent answers: it has seen enough, the rest passes it by and
        # the gateway reads the upstream again.
        agent.answer(needs_more=False)
        self.assertEqual(scene.server_transport.producerState, "producing")
        self.assertEqual(_dechunked(scene.received), body)
        scene.reactor.advance(TIMEOUT - 0.5)
        self.assertFalse(scene.cut)
        scene.upstream_sends(b"e" * 5)
        self.assertEqual(_dechunked(scene.received), body + b"e" * 5)
        # Then the upstream goes quiet: the timeout counts from its last byte.
        scene.reactor.advance(TIMEOUT - 0.5)
        self.assertFalse(scene.cut)
        scene.reactor.advance(0.5)
        self.assertTrue(scene.cut)
        self.assertEqual(agent.cancels, [m.CancelReason.UPSTREAM_ERROR])
        self.assertFalse(scene.received.endswith(b"\r\n0\r\n\r\n"))


class _Upload:
    """
    A client's POST through the gateway (min body rate 1000 bytes/s, the
    timeout's grace 4 s), its upstream connection open and taking the body.
    """

    def __init__(self, length: int) -> None:
        self.reactor = reactor = MemoryReactorClock()
        upstream = HTTPUpstream(reactor, "http://127.0.0.1:8000", timeout=TIMEOUT)
        config = GatewayConfig(
            upstream_timeout=TIMEOUT, send_timeout=1000.0, header_timeout=TIMEOUT, min_body_rate=1000
        )
        self.gateway = Gateway(OneAgentPool(_RecordingConnection(), "waf"), config, upstream, clock=reactor)  # type: ignore[arg-type]
        self.client = GatewaySite(self.gateway, reactor=reactor).buildProtocol(None)
        self.client_transport = _Transport()
        self.client.makeConnection(self.client_transport)
        self.client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)
        ((host, port, factory, _, _),) = reactor.tcpClients
        self.server = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.server_transport = _Transport()
        self.server.makeConnection(self.server_transport)

    @property
    def received(self) -> bytes:
        """What the client has received."""
        return self.client_transport.value()


class UploadTests(SynchronousTestCase):
    """
    The wait for the upstream's response counts while the upstream holds
    things up, not while the client's body is still on its way to it.
    """

    def test_an_upload_longer_than_the_timeout(self) -> None:
        """
        The client sends its body at 1500 bytes/s (above the least rate)
        for five times --upstream-timeout, the upstream taking it all as
        it comes: no 504; the upstream's answer reaches the client.
        """
        scene = _Upload(30000)
        for _ in range(20):
            scene.client.dataReceived(b"x" * 1500)
            scene.reactor.advance(1)
            self.assertEqual(scene.received, b"")
        self.assertTrue(scene.server_transport.value().endswith(b"x" * 1500))
        # The body is all sent: the upstream has the timeout from now on.
        scene.reactor.advance(TIMEOUT - 1.5)
        scene.server.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(scene.received.startswith(b"HTTP/1.1 201 Created\r\n"), scene.received)
        self.assertTrue(scene.received.endswith(b"\r\n\r\nok"), scene.received)

    def test_an_upstream_silent_after_the_body(self) -> None:
        """Once the whole body is sent, the upstream has the timeout to answer."""
        scene = _Upload(6000)
        for _ in range(4):
            scene.reactor.advance(1)
            scene.client.dataReceived(b"x" * 1500)
        scene.reactor.advance(TIMEOUT - 0.5)
        self.assertEqual(scene.received, b"")
        scene.reactor.advance(0.5)
        self.assertTrue(scene.received.startswith(b"HTTP/1.1 504 Gateway Time-out\r\n"), scene.received)

    def test_an_upstream_that_takes_no_body(self) -> None:
        """
        The upstream stops taking the body (its connection's buffer stays
        full) for --upstream-timeout: 504, however the client goes on.
        """
        scene = _Upload(30000)
        scene.client.dataReceived(b"x" * 1500)
        scene.reactor.advance(1)
        producer = scene.server_transport.producer
        assert producer is not None
        producer.pauseProducing()
        scene.reactor.advance(TIMEOUT - 0.5)
        self.assertEqual(scene.received, b"")
        scene.reactor.advance(0.5)
        self.assertTrue(scene.received.startswith(b"HTTP/1.1 504 Gateway Time-out\r\n"), scene.received)
