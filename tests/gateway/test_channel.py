"""
The client connection's own work per request, in memory: a response leaves
in one send on a plain socket (in order, the rest through the transport
when the socket takes less), and the idle timeout keeps one timer per
connection, not one per request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway
from sentinel_twisted.gateway.resource import GatewayRequest, GatewaySite
from sentinel_twisted.gateway.upstream import UpstreamResponse
from sentinel_twisted.proxy import protocol as proxy_protocol

from .support import OneAgentPool
from .test_target import _RecordingConnection, _RecordingUpstream


class _Socket:
    """Takes at most C{room} bytes per send (C{None}: everything)."""

    def __init__(self, room: int | None = None) -> None:
        self.room = room
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        taken = data if self.room is None else data[: self.room]
        self.sent.append(bytes(taken))
        return len(taken)


class _SocketTransport(FileDescriptor):
    """A plain socket's transport, as far as the channel looks at it."""

    connected = 1

    def __init__(self, reactor: MemoryReactorClock, sock: _Socket) -> None:
        super().__init__(reactor)
        self.socket = sock

    def writeSomeData(self, data: bytes) -> int:
        return len(data)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.7", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def loseConnection(self, _connDone: Any = None) -> None:
        self.disconnecting = True

    @property
    def buffered(self) -> bytes:
        return b"".join(self._tempDataBuffer) + bytes(self.dataBuffer[self.offset :])


class _Pending(_RecordingUpstream):
    """An upstream that answers when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Deferred[Any]] = []

    def forward(self, request: Any) -> Deferred[Any]:
        self.calls.append(Deferred())
        return self.calls[-1]


class _Streamed(UpstreamResponse):
    """A response whose body starts at once and ends when told to."""

    code = 200
    phrase = b"OK"
    length = 5

    def __init__(self) -> None:
        self.headers = Headers()
        self.sink: Any = None

    def deliver(self, sink: Any) -> None:
        self.sink = sink
        sink.response_data(b"hello")

    def end(self) -> None:
        self.sink.response_end(None)


def _site(upstream: Any = None, timeout: float | None = None, **config: Any) -> tuple[GatewaySite, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    gateway = Gateway(
        OneAgentPool(_RecordingConnection(), "recorder"),  # type: ignore[arg-type]
        GatewayConfig(**config),
        upstream if upstream is not None else _RecordingUpstream(),
        clock=reactor,
    )
    kwargs: dict[str, Any] = {"reactor": reactor}
    if timeout is not None:
        kwargs["timeout"] = timeout
    return GatewaySite(gateway, **kwargs), reactor


def _responses(data: bytes) -> list[bytes]:
    return [b"HTTP/1.1 " + piece.split(b"\r\n", 1)[0] for piece in data.split(b"HTTP/1.1 ")[1:]]


class WritingAtOnceTests(SynchronousTestCase):
    def connect(self, room: int | None = None) -> tuple[Any, _SocketTransport, _Socket, MemoryReactorClock]:
        site, reactor = _site()
        sock = _Socket(room)
        transport = _SocketTransport(reactor, sock)
        channel = site.buildProtocol(None)
        channel.makeConnection(transport)
        return channel, transport, sock, reactor

    def test_a_response_leaves_in_one_send_before_the_reactor_turns(self) -> None:
        channel, transport, sock, reactor = self.connect()
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        (sent,) = sock.sent
        self.assertTrue(sent.startswith(b"HTTP/1.1 200 OK\r\n"), sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n"), sent)
        self.assertIn(b"\r\nContent-Length: 0\r\n", sent)
        # Nothing waits in the transport, and nobody watches for writability.
        self.assertEqual(transport.buffered, b"")
        self.assertNotIn(transport, reactor.getWriters())

    def test_pipelined_responses_leave_in_order(self) -> None:
        channel, transport, sock, _ = self.connect()
        channel.dataReceived(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b"".join(sock.sent)
        self.assertEqual(_responses(data), [b"HTTP/1.1 200 OK"] * 3)
        self.assertEqual(len(sock.sent), 3)
        self.assertTrue(transport.disconnecting)

    def test_what_the_socket_does_not_take_goes_through_the_transport(self) -> None:
        channel, transport, sock, reactor = self.connect(room=5)
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        # The first response's first 5 bytes went at once; the rest of it,
        # and all of the second (the transport holds bytes), queue in order.
        self.assertEqual(sock.sent, [b"HTTP/"])
        data = b"HTTP/" + transport.buffered
        self.assertEqual(_responses(data), [b"HTTP/1.1 200 OK"] * 2)
        self.assertIn(transport, reactor.getWriters())

    def test_a_bad_request_after_a_pipelined_response_comes_after_it(self) -> None:
        channel, transport, sock, _ = self.connect()
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nNo colon\r\n\r\n")
        data = b"".join(sock.sent) + transport.buffered
        self.assertEqual(_responses(data), [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"])

    def test_the_addresses_are_asked_of_the_transport_once_per_connection(self) -> None:
        channel, transport, sock, _ = self.connect()
        asked: list[str] = []
        get_host, get_peer = transport.getHost, transport.getPeer
        transport.getHost = lambda: asked.append("host") or get_host()  # type: ignore[method-assign]
        transport.getPeer = lambda: asked.append("peer") or get_peer()  # type: ignore[method-assign]
        for i in range(3):
            channel.dataReceived(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        self.assertEqual(len(sock.sent), 3)
        self.assertEqual(sorted(asked), ["host", "peer"])

    def test_a_response_written_while_answers_are_read_leaves_when_the_read_is_done(self) -> None:
        upstream = _Pending()
        site, reactor = _site(upstream, upstream_timeout=1000.0)
        sock = _Socket()
        channel = site.buildProtocol(None)
        channel.makeConnection(_SocketTransport(reactor, sock))
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        response = _Streamed()
        # As if the upstream's answer came while agents' answers are read.
        proxy_protocol._reading[0] += 1
        try:
            upstream.calls[0].callback(response)
            self.assertEqual(sock.sent, [])
        finally:
            proxy_protocol._reading[0] -= 1
        proxy_protocol._send_all_held()
        (sent,) = sock.sent
        self.assertTrue(sent.startswith(b"HTTP/1.1 200 OK\r\n"), sent)
        self.assertTrue(sent.endswith(b"\r\n\r\nhello"), sent)
        # Its length was known: the end adds nothing to send.
        response.end()
        self.assertEqual(len(sock.sent), 1)

    def test_a_string_transport_takes_the_usual_path(self) -> None:
        site, _ = _site()
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))


class RequestTests(SynchronousTestCase):
    def test_date_and_no_server_header_and_the_query_left_alone(self) -> None:
        upstream = _RecordingUpstream()
        site, _ = _site(upstream)
        requests: list[Any] = []
        site.requestFactory = lambda *a: requests.append(GatewayRequest(*a)) or requests[-1]
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /a?b=1&b=2&c HTTP/1.1\r\nHost: x\r\n\r\n")
        head = transport.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        self.assertEqual(head[0], b"HTTP/1.1 200 OK")
        (date,) = [line for line in head if line.startswith(b"Date: ")]
        self.assertRegex(date, rb"^Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$")
        self.assertFalse([line for line in head if line.lower().startswith(b"server:")])
        self.assertEqual(upstream.targets, [b"/a?b=1&b=2&c"])
        (request,) = requests
        self.assertEqual((request.path, request.args), (b"/a", {}))


class IdleTimeoutTests(SynchronousTestCase):
    def connect(self, site: GatewaySite) -> tuple[Any, StringTransport]:
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_a_quiet_connection_is_closed_after_the_idle_timeout(self) -> None:
        site, reactor = _site(timeout=10, header_timeout=100.0)
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        reactor.advance(9)
        # A read moves the deadline.
        channel.dataReceived(b"GET /two HTTP/1.1\r\n")
        reactor.advance(9)
        self.assertFalse(transport.disconnecting)
        reactor.advance(1.5)
        self.assertTrue(transport.disconnecting)

    def test_no_idle_timeout_while_a_request_is_handled(self) -> None:
        upstream = _Pending()
        site, reactor = _site(upstream, timeout=10, header_timeout=100.0, upstream_timeout=1000.0)
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        reactor.advance(50)
        self.assertFalse(transport.disconnecting)
        from .test_target import _Answer

        upstream.calls[0].callback(_Answer())
        self.assertIn(b"HTTP/1.1 200 OK", transport.value())
        # Idle again: the timeout is back.
        reactor.advance(10.5)
        self.assertTrue(transport.disconnecting)

    def test_one_idle_timer_per_connection_not_per_request(self) -> None:
        site, reactor = _site(timeout=10, header_timeout=100.0)
        channel, transport = self.connect(site)
        scheduled: list[float] = []

        def call_later(delay: float, f: Any, *args: Any) -> Any:
            scheduled.append(delay)
            return reactor.callLater(delay, f, *args)

        channel.callLater = call_later
        for i in range(50):
            channel.dataReceived(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            reactor.advance(0.1)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 50)
        self.assertEqual(scheduled, [])
        self.assertFalse(transport.disconnecting)
        channel.connectionLost(None)
        self.assertEqual(reactor.getDelayedCalls(), [])


class _TurnRecordingConnection(_RecordingConnection):
    """Records, per event, whether it was sent under HOLD_FRAMES_FOR_TURN."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[bool] = []

    def send_event_with(self, event: Any, answered: Any, failed: Any, arg: Any, correlation_id: str) -> None:
        self.held.append(bool(proxy_protocol._for_turn[0]))
        super().send_event_with(event, answered, failed, arg, correlation_id)


class HoldingForTheTurnTests(SynchronousTestCase):
    def connect(self) -> tuple[Gateway, Any, _TurnRecordingConnection]:
        connection = _TurnRecordingConnection()
        reactor = MemoryReactorClock()
        gateway = Gateway(
            OneAgentPool(connection, "recorder"),  # type: ignore[arg-type]
            GatewayConfig(),
            _RecordingUpstream(),
            clock=reactor,
        )
        channel = GatewaySite(gateway, reactor=reactor).buildProtocol(None)
        channel.makeConnection(StringTransport())
        return gateway, channel, connection

    def test_a_request_alone_goes_to_its_agents_at_once(self) -> None:
        # Nothing else under way would join it at the end of the turn: no
        # timer call for it.
        _, channel, connection = self.connect()
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.dataReceived(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(connection.held, [False, False])

    def test_a_request_beside_others_waits_for_the_end_of_the_turn(self) -> None:
        gateway, channel, connection = self.connect()
        gateway.exchanges.add(object())  # type: ignore[arg-type]
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(connection.held, [True])


class ReadsAfterARefusalTests(SynchronousTestCase):
    """
    The reactor may hand the channel bytes read after it closed the
    connection: the socket's read event was polled in the same turn as the
    one whose handling refused a request (a pipelined request replayed once
    the upstream answered the one before it).  Those bytes are never parsed.
    """

    def connect(self) -> tuple[Any, _SocketTransport, _Socket, _RecordingUpstream, list[Any]]:
        upstream = _RecordingUpstream()
        site, reactor = _site(upstream)
        sock = _Socket()
        transport = _SocketTransport(reactor, sock)
        channel = site.buildProtocol(None)
        channel.makeConnection(transport)
        return channel, transport, sock, upstream, site.gateway.pool.connection.seen

    def test_after_a_bad_request_line(self) -> None:
        channel, transport, sock, upstream, seen = self.connect()
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n0\r\n")
        self.assertTrue(transport.disconnecting)
        # Before: AttributeError (no request line parsed) in the reactor's
        # read, the connection aborted and the 400 lost with it.
        channel.dataReceived(b"\r\n")
        data = b"".join(sock.sent) + transport.buffered
        self.assertEqual(_responses(data), [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"])
        self.assertEqual(upstream.targets, [b"/one"])

    def test_after_a_bad_header_line(self) -> None:
        channel, transport, sock, upstream, seen = self.connect()
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nNo colon\r\nHost: x\r\n")
        self.assertTrue(transport.disconnecting)
        # Before: the rest of the head refused with 400 made a request,
        # shown to the agents and forwarded.
        channel.dataReceived(b"\r\n")
        data = b"".join(sock.sent) + transport.buffered
        self.assertEqual(_responses(data), [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"])
        self.assertEqual(upstream.targets, [b"/one"])
        self.assertEqual([event.uri for event in seen], ["/one"])

    def test_after_a_bad_chunk(self) -> None:
        channel, transport, sock, upstream, seen = self.connect()
        channel.dataReceived(b"POST /one HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertTrue(transport.disconnecting)
        channel.dataReceived(b"0\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b"".join(sock.sent) + transport.buffered
        self.assertNotIn(b"200 OK", data)
        self.assertEqual(upstream.targets, [b"/one"])
        self.assertEqual([event.uri for event in seen], ["/one"])
