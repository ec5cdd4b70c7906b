"""
An agent cannot make the gateway hold more by answering each small body
chunk with a large replacement: a stage sends its agent the next chunk only
while what follows it (the upstream, the client) is not busy, and what the
replacements make of a body is capped (C{--max-replaced-body-size}).

The agent of these tests asks for one-byte chunks and answers each with
C{needs_more} and a 64 KiB replacement; the peer after the gateway takes
64 KiB and then reads nothing.  The old gateway sent the next chunk after
every answer and held every replacement: 100 answers, 6.4 MiB.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from sentinel_twisted import messages as m
from sentinel_twisted.errors import RequestCancelled
from sentinel_twisted.gateway.body import STAGE_ROOM
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway
from sentinel_twisted.gateway.resource import GatewaySite
from sentinel_twisted.gateway.upstream import ForwardRequest, UpstreamResponse

from .._proxy_support import captured_log
from .support import small_chunks

#: What the agent answers each one-byte chunk with.
REPLACEMENT = 64 * 1024
#: What the peer after the gateway (a socket) takes before it pushes back.
TAKEN = 64 * 1024
#: Answers the agent gets to give (the attack sent 100 of 8 MiB).
ANSWERS = 100
#: The bound of docs/operators.md ("Memory per request") for one inspecting
#: agent with one-byte chunks: the client's bytes (2 + 256 KiB), the upstream
#: body's room (256 KiB), what the peer's socket took, and one replacement
#: in each of the three places it can be when the agent is stopped.
BOUND = 2 + STAGE_ROOM + STAGE_ROOM + TAKEN + 3 * REPLACEMENT


class _InspectingAgent:
    """An agent connection that asks for one-byte chunks; the test answers its events."""

    agent_id = "amp"
    is_closed = False

    def __init__(self, *events: m.EventType) -> None:
        self.events = frozenset(events)
        self.capabilities = SimpleNamespace(
            limits=m.AgentLimits(preferred_chunk_size=1, max_body_size=1 << 30)
        )
        self.pending: list[tuple[Any, Deferred[m.AgentResponse]]] = []

    def send_event(self, event: Any, correlation_id: str) -> Deferred[m.AgentResponse]:
        if isinstance(event, (m.RequestHeadersEvent, m.ResponseHeadersEvent)):
            return succeed(m.AgentResponse())
        answer: Deferred[m.AgentResponse] = Deferred()
        self.pending.append((event, answer))
        return answer

    def send_event_with(self, event: Any, answered: Any, failed: Any, arg: Any, correlation_id: str) -> None:
        self.send_event(event, correlation_id).addCallbacks(
            answered, failed, callbackArgs=(arg,), errbackArgs=(arg,)
        )

    def cancel_request(self, correlation_id: str, reason: int) -> bool:
        pending, self.pending = self.pending, []
        for _, answer in pending:
            answer.errback(Failure(RequestCancelled(correlation_id, reason)))
        return bool(pending)

    def answer_chunks(self, response: bool, count: int, measure: Any) -> int:
        """
        Answer up to C{count} waiting chunk events with C{needs_more} and a
        replacement; C{measure()} after each.  Returns how many were answered.
        """
        answered = 0
        while self.pending and answered < count:
            event, answer = self.pending.pop(0)
            mutation = m.BodyMutation.replace(event.chunk_index, b"R" * REPLACEMENT)
            if response:
                answer.callback(m.AgentResponse(needs_more=True, response_body_mutation=mutation))
            else:
                answer.callback(m.AgentResponse(needs_more=True, request_body_mutation=mutation))
            answered += 1
            measure()
        return answered


class _Pool:
    def __init__(self, *connections: _InspectingAgent) -> None:
        self.connections = {c.agent_id: c for c in connections}

    def agent_ids(self) -> list[str]:
        return list(self.connections)

    def select(self, agent_id: str) -> _InspectingAgent:
        return self.connections[agent_id]

    def add_observer(self, observer: object) -> None:
        """Its agents never come or go."""


class _FullSocket:
    """
    An upstream connection's side of the request body: like a transport it
    takes what is written, and past C{TAKEN} bytes it pauses the producer;
    the upstream reads nothing until the test calls L{drain}.
    """

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.buffered = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered > TAKEN and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.buffered = 0
        self.paused = False
        self.producer.resumeProducing()


class _StuckUpstream:
    """An upstream that reads a little of the request body and never answers."""

    socket: _FullSocket | None = None

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        assert request.body is not None
        self.socket = _FullSocket(request.body)
        request.body.startProducing(self.socket)
        return Deferred()

    def close(self) -> Deferred[None]:
        return succeed(None)

    def describe(self) -> str:
        return "stuck"


class _Response(UpstreamResponse):
    """A response whose body is a few bytes, delivered at once."""

    code = 200
    phrase = b"OK"
    length = None

    def __init__(self, body: bytes) -> None:
        self.headers = Headers()
        self.body = body

    def deliver(self, sink: Any) -> None:
        sink.response_data(self.body)

    def abort(self) -> None:
        pass


class _AnsweringUpstream:
    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        return succeed(_Response(b"b" * 1000))

    def close(self) -> Deferred[None]:
        return succeed(None)

    def describe(self) -> str:
        return "answering"


def _gateway(agent: _InspectingAgent | _Pool, upstream: Any, **config: Any) -> tuple[Any, StringTransport]:
    reactor = MemoryReactorClock()
    pool = agent if isinstance(agent, _Pool) else _Pool(agent)
    gateway = Gateway(pool, GatewayConfig(**config), upstream, clock=reactor)  # type: ignore[arg-type]
    site = GatewaySite(gateway, reactor=reactor)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


_POST = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000


class RequestBodyMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        # The agent prefers one-byte chunks: the worst case of the bound.
        small_chunks(self)

    def test_replacements_wait_for_the_upstream(self) -> None:
        agent = _InspectingAgent(m.EventType.REQUEST_HEADERS, m.EventType.REQUEST_BODY_CHUNK)
        upstream = _StuckUpstream()
        channel, transport = _gateway(agent, upstream)
        channel.dataReceived(_POST)
        (request,) = channel.requests
        exchange = request.exchange
        peak = 0

        def measure() -> None:
            nonlocal peak
            assert upstream.socket is not None
            held = exchange._request_pressure.held + upstream.socket.buffered
            peak = max(peak, held)

        answered = agent.answer_chunks(False, ANSWERS, measure)
        self.assertLessEqual(peak, BOUND)
        # The agent is not sent the next chunk while the upstream is full...
        self.assertLess(answered, ANSWERS)
        self.assertEqual(agent.pending, [])
        # ... and is once it has read again.
        assert upstream.socket is not None
        upstream.socket.drain()
        self.assertEqual(len(agent.pending), 1)
        channel.connectionLost(None)

    def test_replacements_wait_for_the_next_agent(self) -> None:
        """
        The first agent's replacements go to a second agent that answers
        nothing: the first is sent no more chunks once the second's stage
        holds its chunk and L{STAGE_ROOM}.
        """
        first = _InspectingAgent(m.EventType.REQUEST_HEADERS, m.EventType.REQUEST_BODY_CHUNK)
        second = _InspectingAgent(m.EventType.REQUEST_HEADERS, m.EventType.REQUEST_BODY_CHUNK)
        second.agent_id = "slow"
        second.capabilities.limits.preferred_chunk_size = REPLACEMENT
        channel, transport = _gateway(_Pool(first, second), _StuckUpstream())
        channel.dataReceived(_POST)
        (request,) = channel.requests
        pressure = request.exchange._request_pressure
        peak = 0

        def measure() -> None:
            nonlocal peak
            peak = max(peak, pressure.held)

        answered = first.answer_chunks(False, ANSWERS, measure)
        # The client's bytes, the second agent's chunk in flight, its room,
        # and the answer that took it past its room.
        self.assertLessEqual(peak, 1000 + REPLACEMENT + STAGE_ROOM + 2 * REPLACEMENT)
        self.assertLess(answered, ANSWERS)
        self.assertEqual(first.pending, [])
        # The second agent answers: its stage drains, and the first agent
        # gets its next chunk.
        for _ in range(ANSWERS):
            if first.pending or not second.pending:
                break
            event, answer = second.pending.pop(0)
            answer.callback(m.AgentResponse(needs_more=True))
        self.assertEqual(len(first.pending), 1)
        channel.connectionLost(None)

    def test_replacements_past_the_limit_are_an_agent_error(self) -> None:
        agent = _InspectingAgent(m.EventType.REQUEST_HEADERS, m.EventType.REQUEST_BODY_CHUNK)
        upstream = _StuckUpstream()
        channel, transport = _gateway(agent, upstream, max_replaced_body_size=3 * REPLACEMENT)
        channel.dataReceived(_POST)
        with captured_log() as events:
            for _ in range(ANSWERS):
                assert upstream.socket is not None
                upstream.socket.drain()
                if not agent.answer_chunks(False, 1, lambda: None):
                    break
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "), transport.value()[:40])
        # The fourth replacement made the body 4 x 64 KiB.
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        warned = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn]
        self.assertEqual(len(warned), 1, warned)
        self.assertRegex(
            warned[0],
            r"^Agent amp invalid_answer on \S+: Invalid message format: its body replacements make 262144 bytes of 4, "
            r"over the gateway's limit of 196608 \(--max-replaced-body-size\); answering 503$",
        )
        channel.connectionLost(None)

    def test_a_rewritten_body_may_stay_as_large_as_it_was(self) -> None:
        agent = _InspectingAgent(m.EventType.REQUEST_HEADERS, m.EventType.REQUEST_BODY_CHUNK)
        agent.capabilities.limits.preferred_chunk_size = REPLACEMENT
        upstream = _StuckUpstream()
        channel, transport = _gateway(agent, upstream, max_replaced_body_size=1)
        channel.dataReceived(
            b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * REPLACEMENT)
            + b"b" * (2 * REPLACEMENT)
        )
        for _ in range(2):
            assert upstream.socket is not None
            upstream.socket.drain()
            self.assertEqual(agent.answer_chunks(False, 1, lambda: None), 1)
        self.assertEqual(transport.value(), b"")
        channel.connectionLost(None)


class ResponseBodyMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        # The agent prefers one-byte chunks: the worst case of the bound.
        small_chunks(self)

    def test_replacements_wait_for_the_client(self) -> None:
        agent = _InspectingAgent(m.EventType.REQUEST_HEADERS, m.EventType.RESPONSE_BODY_CHUNK)
        channel, transport = _gateway(agent, _AnsweringUpstream())
        channel.dataReceived(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        # The client reads nothing: its socket's buffer is full after the
        # first replacement, and the connection asks the gateway to pause.
        self.assertEqual(agent.answer_chunks(True, 1, lambda: None), 1)
        channel.pauseProducing()
        written = len(transport.value())
        peak = 0

        def measure() -> None:
            nonlocal peak
            peak = max(peak, len(transport.value()) - written)

        answered = agent.answer_chunks(True, ANSWERS, measure)
        self.assertLessEqual(peak, REPLACEMENT + 16)
        self.assertLess(answered, 2)
        self.assertEqual(agent.pending, [])
        # The client reads again: the next chunk goes out.
        channel.resumeProducing()
        self.assertEqual(len(agent.pending), 1)
        channel.connectionLost(None)
