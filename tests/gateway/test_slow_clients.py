"""
Slow clients, in memory: a request body must arrive at C{--min-body-rate}
on average after a grace of C{--header-timeout} (else C{408}, the agents'
events cancelled and the upstream request aborted), and a client that
takes no response bytes for C{--send-timeout} is cut off.  One timer per
connection checks it all.  One test on a loopback socket: a client that
reads a byte now and then is cut off as well.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from sentinel_twisted import messages as m
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway, NullMetrics
from sentinel_twisted.gateway.resource import GatewaySite
from sentinel_twisted.gateway.upstream import UpstreamResponse

from .support import Harness, OneAgentPool, wait_until

_HEAD = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"


class _Agent:
    """An agent connection that answers request headers only when told to."""

    events = frozenset({m.EventType.REQUEST_HEADERS})
    is_closed = False

    def __init__(self, answer_at_once: bool = False) -> None:
        self.answer_at_once = answer_at_once
        self.waiting: list[tuple[Any, Any]] = []
        self.cancelled: list[tuple[str, int]] = []

    def send_event_with(self, event: Any, answered: Any, failed: Any, arg: Any, correlation_id: str) -> None:
        if self.answer_at_once:
            answered(m.AgentResponse(), arg)
        else:
            self.waiting.append((failed, arg))

    def cancel_request(self, correlation_id: str, reason: int) -> bool:
        self.cancelled.append((correlation_id, reason))
        for failed, arg in self.waiting:
            failed(Failure(CancelledError()), arg)
        self.waiting = []
        return True


class _Upstream:
    """An upstream whose answers come when told to; it records cancellations."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Any]] = []
        self.cancelled = 0
        self.bodies: list[Any] = []

    def forward(self, request: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        self.bodies.append(request.body)
        self.calls.append(Deferred(cancel))
        return self.calls[-1]

    def close(self) -> Deferred[None]:
        return Deferred()

    def describe(self) -> str:
        return "test"


class _Response(UpstreamResponse):
    """A response whose body is sent when told to; it records an abort."""

    code = 200
    phrase = b"OK"
    length: int | None = None

    def __init__(self) -> None:
        self.headers = Headers()
        self.sink: Any = None
        self.aborted = False

    def deliver(self, sink: Any) -> None:
        self.sink = sink

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


class _Metrics(NullMetrics):
    def __init__(self) -> None:
        self.decided: list[tuple[str, int]] = []

    def request_decided(self, decision: str, status: int, seconds: float) -> None:
        self.decided.append((decision, status))


class _Connection:
    def __init__(self, **config: Any) -> None:
        self.reactor = reactor = MemoryReactorClock()
        self.agent = _Agent(config.pop("answer_at_once", False))
        self.upstream = _Upstream()
        self.metrics = _Metrics()
        config.setdefault("header_timeout", 10.0)
        gateway = Gateway(
            OneAgentPool(self.agent, "recorder"),  # type: ignore[arg-type]
            GatewayConfig(**config),
            self.upstream,  # type: ignore[arg-type]
            metrics=self.metrics,
            clock=reactor,
        )
        # No idle timeout of twisted.web's own here.
        self.site = GatewaySite(gateway, reactor=reactor, timeout=None)
        self.channel: Any = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.scheduled: list[float] = []

        def call_later(delay: float, f: Any, *args: Any) -> Any:
            self.scheduled.append(delay)
            return reactor.callLater(delay, f, *args)

        self.channel.callLater = call_later

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def trickle(self, seconds: float, every: float = 2.0, piece: bytes = b"A") -> None:
        """Send C{piece} every C{every} seconds for C{seconds}, unless closed."""
        for _ in range(int(seconds / every)):
            if self.transport.disconnecting:
                return
            self.send(piece)
            self.reactor.advance(every)

    @property
    def responses(self) -> list[bytes]:
        """The status lines sent, up to the code."""
        return [line[:12] for line in self.transport.value().split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


class BodyRateTests(SynchronousTestCase):
    def test_a_trickled_body_gets_408_once_it_falls_behind(self) -> None:
        c = _Connection(min_body_rate=100)
        c.send(_HEAD % 1_000_000 + b"A")
        # The grace (the header timeout, 10 s) and a byte's worth of it.
        c.trickle(8)
        self.assertEqual(c.responses, [])
        self.assertFalse(c.transport.disconnecting)
        c.trickle(20)
        self.assertEqual(c.responses, [b"HTTP/1.1 408"])
        self.assertTrue(c.transport.disconnecting)
        self.assertLessEqual(c.reactor.seconds(), 12.0)
        self.assertIn(b"Connection: close", c.transport.value())
        # The agent still deciding is told, as for a client that left.
        self.assertEqual([reason for _, reason in c.agent.cancelled], [m.CancelReason.CLIENT_DISCONNECT])
        self.assertEqual(c.metrics.decided, [("client_timeout", 408)])

    def test_the_upstream_request_is_aborted(self) -> None:
        c = _Connection(min_body_rate=100, answer_at_once=True)
        c.send(_HEAD % 1_000_000 + b"A")
        self.assertEqual(len(c.upstream.calls), 1)
        c.trickle(20)
        self.assertEqual(c.responses, [b"HTTP/1.1 408"])
        self.assertEqual(c.upstream.cancelled, 1)

    def test_an_upstream_that_answered_before_the_body_is_aborted(self) -> None:
        # The response waits for the body; the body does not come.
        c = _Connection(min_body_rate=100, answer_at_once=True)
        c.send(_HEAD % 1_000_000 + b"A")
        response = _Response()
        c.upstream.calls[0].callback(response)
        c.trickle(20)
        self.assertEqual(c.responses, [b"HTTP/1.1 408"])
        self.assertTrue(response.aborted)

    def test_a_body_at_the_least_rate_is_not_cut(self) -> None:
        c = _Connection(min_body_rate=100, answer_at_once=True)
        length = 100 * 120
        c.send(_HEAD % length)
        # 200 bytes every 2 s: exactly the least rate, from the start (the
        # grace is left untouched).
        c.trickle(118, piece=b"B" * 200)
        c.send(b"B" * (length - 200 * 59))
        self.assertFalse(c.transport.disconnecting)
        response = _Response()
        response.length = 2
        c.upstream.calls[0].callback(response)
        response.sink.response_data(b"ok")
        response.sink.response_end(None)
        self.assertEqual(c.responses, [b"HTTP/1.1 200"])
        self.assertEqual(c.agent.cancelled, [])
        # Kept alive: the next head's deadline is the only one left.
        self.assertFalse(c.transport.disconnecting)
        c.reactor.advance(9.9)
        self.assertFalse(c.transport.disconnecting)
        c.reactor.advance(0.1)
        self.assertTrue(c.transport.disconnecting)

    def test_time_the_gateway_stops_reading_does_not_count(self) -> None:
        c = _Connection(min_body_rate=100)
        c.send(_HEAD % 1_000_000)
        request = c.channel.requests[-1]
        request.pause_body()
        self.assertTrue(c.transport.producerState == "paused")
        c.reactor.advance(1000)
        self.assertEqual(c.responses, [])
        request.resume_body()
        c.reactor.advance(9.9)
        self.assertEqual(c.responses, [])
        c.reactor.advance(0.2)
        self.assertEqual(c.responses, [b"HTTP/1.1 408"])

    def test_a_stop_counts_once_the_upstream_has_answered(self) -> None:
        # An upstream that answers before the body and reads no more holds
        # the body back: that must not hold the client forever.
        c = _Connection(min_body_rate=100, answer_at_once=True)
        c.send(_HEAD % 1_000_000 + b"A" * 100)
        request = c.channel.requests[-1]
        request.pause_body()
        c.reactor.advance(30)
        self.assertEqual(c.responses, [])
        response = _Response()
        c.upstream.calls[0].callback(response)
        c.reactor.advance(10)
        self.assertEqual(c.responses, [b"HTTP/1.1 408"])
        self.assertTrue(response.aborted)

    def test_a_whole_body_stops_the_clock(self) -> None:
        c = _Connection(min_body_rate=100)
        c.send(_HEAD % 5 + b"hello")
        # The agent decides for as long as it likes.
        c.reactor.advance(1000)
        self.assertEqual(c.responses, [])
        self.assertFalse(c.transport.disconnecting)

    def test_one_timer_per_connection_not_per_read(self) -> None:
        c = _Connection(min_body_rate=1, answer_at_once=True, header_timeout=1000.0)
        c.send(_HEAD % 1_000_000)
        (timer,) = c.reactor.getDelayedCalls()
        for _ in range(200):
            c.send(b"A" * 100)
            c.reactor.advance(0.01)
        self.assertEqual(c.scheduled, [])
        self.assertEqual(c.reactor.getDelayedCalls(), [timer])
        c.channel.connectionLost(Failure(CancelledError()))
        self.assertEqual(c.reactor.getDelayedCalls(), [])


class SendTimeoutTests(SynchronousTestCase):
    def responding(self, **config: Any) -> tuple[_Connection, _Response]:
        c = _Connection(answer_at_once=True, **config)
        c.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        response = _Response()
        c.upstream.calls[0].callback(response)
        response.sink.response_data(b"x" * 100_000)
        self.assertEqual(c.responses, [b"HTTP/1.1 200"])
        return c, response

    def test_a_client_that_takes_nothing_is_cut_off(self) -> None:
        c, response = self.responding(send_timeout=5.0)
        # The transport's buffer is full: it pauses the channel.
        c.channel.pauseProducing()
        c.reactor.advance(4.9)
        self.assertFalse(c.transport.disconnected)
        c.reactor.advance(0.1)
        self.assertTrue(c.transport.disconnected)
        self.assertTrue(response.aborted)
        self.assertEqual(c.metrics.decided, [("client_timeout", 200)])

    def test_a_reading_client_is_not_cut_off(self) -> None:
        c, response = self.responding(send_timeout=5.0)
        for _ in range(20):
            c.channel.pauseProducing()
            c.reactor.advance(4)
            # Everything buffered went: the transport wants more.
            c.channel.resumeProducing()
            response.sink.response_data(b"x" * 100_000)
        self.assertFalse(c.transport.disconnecting)
        response.sink.response_end(None)
        self.assertFalse(response.aborted)
        self.assertEqual(c.metrics.decided, [("allow", 200)])

    def test_a_closing_connection_gets_as_long_for_its_last_bytes(self) -> None:
        c = _Connection(send_timeout=5.0, header_timeout=10.0)
        c.send(b"GET /one HTTP/1.1\r\nHo")
        c.reactor.advance(10)
        self.assertEqual(c.responses, [b"HTTP/1.1 408"])
        self.assertTrue(c.transport.disconnecting)
        # The client does not take them: the connection is aborted.
        c.reactor.advance(4.9)
        self.assertFalse(c.transport.disconnected)
        c.reactor.advance(0.1)
        self.assertTrue(c.transport.disconnected)

    def test_a_closed_connection_leaves_no_timer(self) -> None:
        c, _ = self.responding(send_timeout=5.0)
        c.channel.pauseProducing()
        c.channel.loseConnection()
        c.channel.connectionLost(Failure(CancelledError()))
        self.assertEqual(c.reactor.getDelayedCalls(), [])


class TrickleReaderOverLoopbackTests(TestCase):
    """On a real socket: the transport's own pause is what starts the send deadline."""

    timeout = 30

    def test_a_client_reading_a_byte_now_and_then_is_cut_off(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--send-timeout", "0.5")
            await h.agent("waf")
            sock = socket.socket()
            self.addCleanup(sock.close)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", h.http_port))
            sock.setblocking(False)
            sock.sendall(b"GET /bytes?n=16000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            got = [0]

            def take_a_byte() -> None:
                try:
                    got[0] += len(sock.recv(1))
                except OSError:
                    pass

            reading = LoopingCall(take_a_byte)
            reading.start(0.05)
            self.addCleanup(lambda: reading.running and reading.stop())
            # The client still holds unread bytes when it is cut: the
            # gateway's side tells.
            await wait_until(
                lambda: h.sample("sentinel_gateway_requests_total", decision="client_timeout") == 1
                and not h.live_http,
                timeout=20,
                what="the gateway to cut the client off",
            )
            self.assertGreater(got[0], 0)
            self.assertTrue(reading.running)

        return ensureDeferred(go())
