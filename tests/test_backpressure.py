"""
Back-pressure: an agent that stops reading must not make the proxy buffer
without bound.  The transport pauses the connection (IPushProducer) when its
write buffer fills; the pool routes new requests around it; if it stays
full for C{write_stall_timeout} the connection is aborted and everything
pending on it fails with ConnectionClosed.
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase

from sentinel_twisted.errors import ConnectionClosed, FlowControlPaused
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory

from ._proxy_support import Proxy, request_headers
from .rawagent import frame, registration


class ProducerTests(TestCase):
    def test_registration_registers_the_protocol_as_a_streaming_producer(self) -> None:
        protocol, transport, _ = Proxy().register("waf-1")
        self.assertIs(transport.producer, protocol)
        self.assertTrue(transport.streaming)

    def test_a_full_write_buffer_routes_new_requests_to_another_connection(self) -> None:
        proxy = Proxy()
        blocked_protocol, _, blocked = proxy.register("waf-1")
        _, _, other = proxy.register("waf-1")
        blocked_protocol.pauseProducing()
        self.assertTrue(blocked.is_write_blocked)
        self.assertFalse(blocked.can_accept_requests)
        for _ in range(4):
            self.assertIs(proxy.pool.select("waf-1"), other)
        blocked_protocol.resumeProducing()
        self.assertTrue(blocked.can_accept_requests)

    def test_the_only_connection_blocked_gives_the_flow_control_error(self) -> None:
        proxy = Proxy()
        protocol, _, _ = proxy.register("waf-1")
        protocol.pauseProducing()
        failure = self.failureResultOf(proxy.pool.send_request_headers("waf-1", request_headers("r1")))
        failure.trap(FlowControlPaused)
        # The agent asked for nothing: the text says what holds it back.
        self.assertTrue(failure.value.not_reading)
        self.assertEqual(
            str(failure.value),
            "Flow control paused: agent 'waf-1' is not reading its connections (write buffers full)",
        )

    def test_one_connection_paused_by_the_agent_keeps_the_reference_text(self) -> None:
        proxy = Proxy()
        blocked_protocol, _, _ = proxy.register("waf-1")
        paused_protocol, _, paused = proxy.register("waf-1")
        blocked_protocol.pauseProducing()
        paused_protocol.dataReceived(frame(0x33, b'{"action":1}'))
        self.assertTrue(paused.is_paused)
        failure = self.failureResultOf(proxy.pool.send_request_headers("waf-1", request_headers("r1")))
        self.assertFalse(failure.value.not_reading)
        self.assertEqual(str(failure.value), "Flow control paused: agent 'waf-1' requested backpressure")

    def test_a_connection_blocked_past_the_stall_timeout_is_aborted(self) -> None:
        proxy = Proxy(request_timeout=5.0)
        protocol, transport, connection = proxy.register("waf-1")
        waiting = connection.send_request_headers(request_headers("r1"), timeout=60)
        protocol.pauseProducing()
        proxy.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        proxy.clock.advance(0.2)
        self.assertTrue(transport.disconnected, "the stalled connection was not aborted")
        self.assertIsNone(transport.producer, "the producer must be unregistered to close")
        failure = self.failureResultOf(waiting)
        failure.trap(ConnectionClosed)
        self.assertIn("agent stopped reading", failure.value.detail)
        self.assertEqual(connection.in_flight, 0)
        self.assertEqual(len(proxy.pool), 0)

    def test_resuming_before_the_stall_timeout_keeps_the_connection(self) -> None:
        proxy = Proxy(request_timeout=5.0)
        protocol, transport, connection = proxy.register("waf-1")
        protocol.pauseProducing()
        proxy.clock.advance(4.0)
        protocol.resumeProducing()
        proxy.clock.advance(10.0)
        self.assertFalse(transport.disconnecting)
        self.assertTrue(connection.can_accept_requests)

    def test_closing_unregisters_the_producer_so_the_transport_can_close(self) -> None:
        proxy = Proxy()
        _, transport, connection = proxy.register("waf-1")
        connection.close()
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)


class RealSocketTests(TestCase):
    """An agent that registers and then never reads, over a UNIX socket."""

    timeout = 20

    @defer.inlineCallbacks
    def test_a_non_reading_agent_is_routed_around_then_aborted(self):  # type: ignore[no-untyped-def]
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "bp.sock")
        factory = ReverseConnectionFactory(ReverseConnectionConfig(request_timeout=1.0))
        port = yield serverFromString(reactor, f"unix:{path}:mode=600").listen(factory)
        self.addCleanup(port.stopListening)

        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        agent.connect(path)
        self.addCleanup(agent.close)
        agent.sendall(frame(0x01, registration("waf-1")))
        for _ in range(200):
            if len(factory.pool):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        [connection] = factory.pool.connections("waf-1")

        # ~64 KiB events until the pool refuses: the agent never reads.
        big = request_headers("r0")
        big.headers["x-padding"] = ["p" * 65536]
        outcomes: list[object] = []
        refused = None
        for i in range(2000):
            d = factory.pool.send_request_headers("waf-1", big, correlation_id=f"r{i}", timeout=30)
            if d.called:
                refused = self.failureResultOf(d)
                break
            d.addBoth(outcomes.append)
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertIsNotNone(refused, "the pool kept accepting requests for an agent that never reads")
        refused.trap(FlowControlPaused)
        self.assertGreater(connection.in_flight, 0)

        # Stalled longer than write_stall_timeout (the request timeout, 1 s): aborted.
        for _ in range(300):
            if not len(factory.pool):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(factory.pool), 0)
        self.assertEqual(connection.in_flight, 0)
        self.assertTrue(outcomes)
        for outcome in outcomes:
            self.assertTrue(getattr(outcome, "check", lambda *_: False)(ConnectionClosed))
