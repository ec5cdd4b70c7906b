"""
Back-pressure and memory bounds on the agent side: a proxy that stops
reading cannot make the agent buffer without bound, nor can many proxy
connections holding large unfinished frames, nor can a flood of
connections to a listening agent.

When the proxy stops reading, the transport's write buffer fills and the
transport pauses the connection (L{IPushProducer}): its Pings get no Pong,
its frames are no longer read (so TCP pushes back on the proxy), and after
C{write_stall_timeout} the connection is aborted (a dialled one is dialled
again).  Answers to the events already taken still go out.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted.agent import Agent, AgentClientFactory, AgentConnector, AgentListener
from sentinel_twisted.agent.forward import (
    DEFAULT_MAX_CONNECTIONS,
    ForwardAgentFactory,
    ForwardAgentProtocol,
)
from sentinel_twisted.agent.protocol import AgentSettings
from sentinel_twisted.endpoints import RefusedConnection
from sentinel_twisted.wire import MAX_INCOMPLETE_FRAME_BYTES, IncompleteFrameBudget

from .._proxy_support import captured_log
from ._support import (
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    PING,
    PONG,
    REQUEST_HEADERS,
    Harness,
    RecordingAgent,
    frame,
    headers_event,
    success_response,
    temp_path,
)
from .test_forward import Connection, handshake
from .test_tap_listen import parse


def ping(sequence: int, pad: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"sequence": sequence, "timestamp_ms": 1}
    if pad:
        body["pad"] = "x" * pad
    return body


def registered(agent: Any = None, **settings: Any) -> Harness:
    settings.setdefault("health_interval", 0)
    h = Harness(agent, **settings)
    h.register()
    h.sent()
    return h


def warnings(events: list[Any]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"].name == "warn"]


class ProducerTests(SynchronousTestCase):
    def test_serving_registers_the_connection_as_a_streaming_producer(self) -> None:
        h = Harness()
        self.assertIsNone(h.transport.producer)
        h.register()
        self.assertIs(h.transport.producer, h.protocol)
        self.assertTrue(h.transport.streaming)

    def test_a_forward_connection_too_once_past_its_handshake(self) -> None:
        c = Connection()
        self.assertIsNone(c.transport.producer)
        c.shake(handshake())
        self.assertIs(c.transport.producer, c.protocol)

    def test_the_stall_timeout_is_the_proxys_30s_by_default_and_positive(self) -> None:
        self.assertEqual(Harness().settings.write_stall_timeout, 30.0)
        for value in (0, -1):
            self.assertRaises(ValueError, Harness, write_stall_timeout=value)

    def test_closing_unregisters_the_producer_so_the_transport_can_close(self) -> None:
        h = registered()
        self.assertIs(h.transport.producer, h.protocol)
        h.protocol.close()
        self.assertIsNone(h.transport.producer)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.disconnected)


class PingFloodTests(SynchronousTestCase):
    """A proxy that sends Pings and reads nothing."""

    def test_no_pong_while_the_proxy_does_not_read(self) -> None:
        h = registered()
        h.feed(PING, ping(1))
        self.assertEqual(h.sent(), [(PONG, ping(1))])
        # The transport's buffer is full: it pauses its producer.
        with captured_log() as events:
            h.protocol.pauseProducing()
        self.assertTrue(h.protocol.write_blocked)
        self.assertEqual(h.transport.producerState, "paused", "the proxy's frames are still read")
        self.assertIn(
            "Proxy test-proxy is not reading connection waf-1-abc-1 of agent waf-1; its frames "
            "are left unread and its Pings unanswered until it catches up (aborting the "
            "connection after 30s)",
            warnings(events),
        )
        before = len(h.transport.value())
        for n in range(1000):
            h.feed(PING, ping(n, pad=60000))
        self.assertEqual(len(h.transport.value()), before, "Pongs grew the write buffer")
        self.assertEqual(h.protocol.stats["pings_not_answered"], 1000)
        self.assertFalse(h.transport.disconnecting)

    def test_pongs_again_once_the_proxy_reads(self) -> None:
        h = registered(write_stall_timeout=5)
        h.protocol.pauseProducing()
        h.feed(PING, ping(1))
        self.assertEqual(h.sent(), [])
        h.clock.advance(4)
        with captured_log() as events:
            h.protocol.resumeProducing()
        self.assertFalse(h.protocol.write_blocked)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertIn(
            "Proxy test-proxy is reading connection waf-1-abc-1 of agent waf-1 again",
            [formatEvent(e) for e in events],
        )
        h.feed(PING, ping(2))
        self.assertEqual(h.sent(), [(PONG, ping(2))])
        # The stall timer went with the block.
        h.clock.advance(60)
        self.assertFalse(h.transport.disconnecting)

    def test_a_repeated_pause_or_resume_changes_nothing(self) -> None:
        h = registered(write_stall_timeout=5)
        h.protocol.pauseProducing()
        h.clock.advance(3)
        h.protocol.pauseProducing()
        h.clock.advance(2)
        self.assertTrue(h.transport.disconnected, "a second pause restarted the stall timer")
        h = registered()
        h.protocol.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")

    def test_still_blocked_after_the_stall_timeout_the_connection_is_aborted(self) -> None:
        agent = RecordingAgent()
        h = registered(agent, write_stall_timeout=5)
        h.feed(REQUEST_HEADERS, headers_event("waiting"))
        h.protocol.pauseProducing()
        h.clock.advance(4.9)
        self.assertFalse(h.transport.disconnecting)
        with captured_log() as events:
            h.clock.advance(0.1)
        self.assertTrue(h.transport.disconnected, "not aborted")
        self.assertIsNone(h.transport.producer, "the producer must be unregistered to close")
        self.assertEqual(agent.cancelled, ["waiting"])
        self.assertIn(
            "Agent waf-1 aborting connection waf-1-abc-1 with proxy test-proxy: proxy stopped "
            "reading: write buffer full for 5s",
            warnings(events),
        )
        h.lose()
        self.assertEqual(h.events[-1], ("ended", "proxy stopped reading: write buffer full for 5s"))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_frame_that_cannot_come_while_blocked_ends_it_as_the_stall(self) -> None:
        # The agent stopped reading: the proxy's frame under way cannot be
        # complete in time, which is the stall's doing, not the proxy's.
        h = registered(frame_timeout=5, write_stall_timeout=30)
        h.protocol.dataReceived(frame(REQUEST_HEADERS, headers_event())[:20])
        h.clock.advance(2)
        h.protocol.pauseProducing()
        with captured_log() as events:
            h.clock.advance(3)
        self.assertTrue(h.transport.disconnected)
        self.assertIn(
            "Agent waf-1 aborting connection waf-1-abc-1 with proxy test-proxy: proxy stopped "
            "reading: write buffer full for 3s",
            warnings(events),
        )
        self.assertNotIn("not complete in time", " ".join(warnings(events)))
        h.lose()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_drain_while_blocked_is_aborted_at_the_stall_timeout(self) -> None:
        agent = RecordingAgent()
        h = registered(agent, write_stall_timeout=5)
        h.feed(REQUEST_HEADERS, headers_event("waiting"))
        h.protocol.pauseProducing()
        done = h.protocol.drain(60)
        h.clock.advance(5)
        self.assertTrue(h.transport.disconnected)
        h.lose()
        self.successResultOf(done)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_connection_lost_while_blocked_leaves_no_timer(self) -> None:
        h = registered()
        h.protocol.pauseProducing()
        h.lose()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        # A late call from the transport does nothing.
        h.protocol.pauseProducing()
        h.protocol.resumeProducing()
        self.assertEqual(h.clock.getDelayedCalls(), [])


class AnswersWhileBlockedTests(SynchronousTestCase):
    """
    Answers to the events already taken still go out: at most the
    concurrency limit running and C{max_queued} waiting, and the error
    decision for events of the read under way; nothing more is read.
    """

    def test_events_in_flight_are_answered(self) -> None:
        agent = RecordingAgent()
        h = registered(agent, max_concurrency=2, max_queued=1)
        h.protocol.dataReceived(b"".join(frame(REQUEST_HEADERS, headers_event(f"r{i}")) for i in range(2)))
        h.sent()
        h.protocol.pauseProducing()
        # The rest of the read that filled the buffer is still handled.
        h.protocol.dataReceived(b"".join(frame(REQUEST_HEADERS, headers_event(f"q{i}")) for i in range(3)))
        self.assertEqual(h.protocol.load, 3)
        self.assertEqual([a["audit"]["custom"]["correlation_id"] for a in h.answers()], ["q1", "q2"])
        agent.answer("r0")
        agent.answer("r1")
        agent.answer("q0")
        self.assertEqual(
            sorted(a["audit"]["custom"]["correlation_id"] for a in h.answers()), ["q0", "r0", "r1"]
        )
        self.assertEqual(h.protocol.load, 0)
        self.assertTrue(h.protocol.write_blocked)


class FrameBudgetTests(SynchronousTestCase):
    """
    Every connection of a listening agent shares one budget of bytes held
    in unfinished frames (each may declare 16 MiB past its handshake): over
    it, the connection holding the most is aborted.
    """

    def connections(self, count: int, **factory_options: Any) -> list[Connection]:
        """C{count} connections past their handshake, built by one factory."""
        first = Connection(**factory_options)
        result = [first]
        for _ in range(count - 1):
            other = Connection(**factory_options)
            # The same factory builds the others.
            other.factory = first.factory
            other.protocol = first.factory.buildProtocol(UNIXAddress(None))  # type: ignore[assignment]
            other.transport = StringTransport(peerAddress=UNIXAddress(None))
            other.protocol.makeConnection(other.transport)
            result.append(other)
        for c in result:
            c.shake(handshake())
        return result

    def test_the_default_budget_is_the_proxys_64_mib(self) -> None:
        c = Connection()
        self.assertEqual(c.factory.frame_budget.limit, MAX_INCOMPLETE_FRAME_BYTES)
        self.assertIs(c.protocol.frame_budget, c.factory.frame_budget)

    def test_over_the_budget_the_largest_holder_is_aborted(self) -> None:
        budget = IncompleteFrameBudget(3 * 1024 * 1024)
        one, two, three = self.connections(3, frame_budget=budget)
        header = struct.pack("!IB", 16 * 1024 * 1024, REQUEST_HEADERS)
        one.feed(header + b"x" * (1024 * 1024))
        two.feed(header + b"x" * (1536 * 1024))
        self.assertEqual(budget.total, 2560 * 1024 + 10)
        with captured_log() as events:
            three.feed(header + b"x" * (1024 * 1024))
        self.assertTrue(two.transport.disconnected, "the largest holder was not aborted")
        self.assertFalse(one.closed or three.closed)
        self.assertEqual(budget.evictions, 1)
        self.assertEqual(budget.total, 2048 * 1024 + 10)
        self.assertEqual(two.protocol.buffered_bytes, 0)
        self.assertIn(
            f"Incomplete frames of all proxy connections held {3584 * 1024 + 15} bytes (max: "
            f"{3 * 1024 * 1024}); agent waf-1 closing connection {two.protocol.connection_id} with "
            f"proxy zentinel-proxy, which held {1536 * 1024 + 5} of them",
            warnings(events),
        )
        self.assertNotIn("not complete in time", " ".join(warnings(events)))
        two.lose()
        self.assertEqual(budget.held_by(two.protocol), 0)

    def test_a_connection_gone_leaves_the_budget(self) -> None:
        budget = IncompleteFrameBudget()
        [c] = self.connections(1, frame_budget=budget)
        c.feed(struct.pack("!IB", 1024, REQUEST_HEADERS) + b"x" * 100)
        self.assertEqual(budget.total, 105)
        c.lose()
        self.assertEqual(budget.total, 0)

    def test_the_listener_and_the_connector_take_a_limit_or_a_shared_budget(self) -> None:
        clock = MemoryReactorClock()
        listener = AgentListener(Agent(), "tcp:0", "waf-1", reactor=clock, max_incomplete_frame_bytes=1000)
        self.assertEqual(listener.factory.frame_budget.limit, 1000)
        connector = AgentConnector(
            Agent(), "tcp:127.0.0.1:7000", "waf-1", reactor=clock, resolve_interval=0,
            max_incomplete_frame_bytes=2000,
        )
        self.assertEqual(connector.frame_budget.limit, 2000)
        shared = IncompleteFrameBudget(3000)
        listener = AgentListener(Agent(), "tcp:0", "waf-1", reactor=clock, frame_budget=shared)
        connector = AgentConnector(
            Agent(), "tcp:127.0.0.1:7000", "waf-1", reactor=clock, resolve_interval=0, frame_budget=shared
        )
        self.assertIs(listener.factory.frame_budget, shared)
        self.assertIs(connector.frame_budget, shared)

    def test_the_connectors_connections_count_against_its_budget(self) -> None:
        clock = MemoryReactorClock()
        connector = AgentConnector(
            Agent(), "tcp:127.0.0.1:7000", "waf-1", reactor=clock, resolve_interval=0, connections=2
        )
        connector.startService()
        self.addCleanup(connector.stopService)
        factories = [client[2] for client in clock.tcpClients]
        self.assertEqual(len(factories), 2)
        for wrapping in factories:
            protocol = wrapping.buildProtocol(None)._wrappedProtocol
            self.assertIs(protocol.frame_budget, connector.frame_budget)
        self.assertEqual(connector.frame_budget.limit, MAX_INCOMPLETE_FRAME_BYTES)

    def test_a_dialled_connection_over_the_budget_is_aborted_and_reported(self) -> None:
        budget = IncompleteFrameBudget(1000)
        factory = AgentClientFactory(
            AgentSettings(agent=Agent(), agent_id="waf-1", health_interval=0), MemoryReactorClock(),
            frame_budget=budget,
        )
        protocol = factory.buildProtocol(UNIXAddress(None))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(frame(HANDSHAKE_RESPONSE, success_response()))
        with captured_log() as events:
            protocol.dataReceived(struct.pack("!IB", 4096, REQUEST_HEADERS) + b"x" * 1200)
        self.assertTrue(transport.disconnected)
        self.assertIn(
            "Incomplete frames of all proxy connections held 1205 bytes (max: 1000); agent waf-1 "
            "closing connection waf-1-abc-1 with proxy test-proxy, which held 1205 of them",
            warnings(events),
        )


class ConnectionCapTests(SynchronousTestCase):
    def build(self, factory: ForwardAgentFactory) -> Any:
        protocol = factory.buildProtocol(UNIXAddress(None))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_past_the_cap_a_connection_is_closed_as_it_is_made(self) -> None:
        settings = AgentSettings(agent=Agent(), agent_id="waf-1", health_interval=0)
        factory = ForwardAgentFactory(settings, MemoryReactorClock(), max_connections=2)
        first, _ = self.build(factory)
        second, transport = self.build(factory)
        self.assertIsInstance(first, ForwardAgentProtocol)
        self.assertIsInstance(second, ForwardAgentProtocol)
        with captured_log() as events:
            refused = [self.build(factory) for _ in range(50)]
        for protocol, refused_transport in refused:
            self.assertIsInstance(protocol, RefusedConnection)
            self.assertTrue(refused_transport.disconnected)
        self.assertEqual(factory.refused_connections, 50)
        lines = warnings(events)
        self.assertEqual(len(lines), factory.log_limiter.burst, "the warning is not rate-limited")
        self.assertEqual(
            lines[0],
            "Agent waf-1 holds 2 proxy connections (limit 2), none of them idle for 1s or more; "
            "closing new ones until some end or go idle",
        )
        # One ends: there is room again.
        second.connectionLost()
        third, _ = self.build(factory)
        self.assertIsInstance(third, ForwardAgentProtocol)

    def test_the_default_cap_and_bad_values(self) -> None:
        settings = AgentSettings(agent=Agent(), agent_id="waf-1")
        self.assertEqual(ForwardAgentFactory(settings, MemoryReactorClock()).max_connections, 256)
        self.assertEqual(DEFAULT_MAX_CONNECTIONS, 256)
        for value in (0, -1):
            self.assertRaises(ValueError, ForwardAgentFactory, settings, MemoryReactorClock(), max_connections=value)


class OptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.socket = temp_path(self, "agent.sock")

    def test_defaults(self) -> None:
        from sentinel_twisted.agent.tap import make_agent_service

        options = parse("--listen", f"unix:{self.socket}", "--connect", "unix:/tmp/proxy.sock")
        service = make_agent_service(options, reactor=MemoryReactorClock())
        assert service.listener is not None and service.connector is not None
        self.assertEqual(service.listener.factory.max_connections, 256)
        self.assertEqual(service.listener.factory.frame_budget.limit, 64 * 1024 * 1024)
        # One budget for every proxy connection, dialled or dialling.
        self.assertIs(service.connector.frame_budget, service.listener.factory.frame_budget)

    def test_options(self) -> None:
        from sentinel_twisted.agent.tap import make_agent_service

        options = parse(
            "--listen", f"unix:{self.socket}", "--max-connections", "3", "--max-incomplete-frame-bytes", "1000"
        )
        service = make_agent_service(options, reactor=MemoryReactorClock())
        assert service.listener is not None
        self.assertEqual(service.listener.factory.max_connections, 3)
        self.assertEqual(service.listener.factory.frame_budget.limit, 1000)

    def test_bad_values(self) -> None:
        for option in ("--max-connections", "--max-incomplete-frame-bytes"):
            for value in ("0", "-1", "many"):
                with self.subTest(option=option, value=value):
                    error = self.assertRaises(
                        usage.UsageError, parse, "--listen", f"unix:{self.socket}", option, value
                    )
                    self.assertIn(f"{option}: expected a positive integer, got {value!r}", str(error))


# -- real sockets ---------------------------------------------------------------


def held_for_writing(transport: Any) -> int:
    """Bytes a Twisted socket transport holds, not yet written to its socket."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[no-any-return]


def ping_frame(pad: int) -> bytes:
    return frame(PING, ping(1, pad=pad))


class RealSocketTests(TestCase):
    """Over UNIX sockets, with a peer that writes and never reads."""

    timeout = 30

    def socket_path(self) -> str:
        return temp_path(self, "a.sock")

    def peer(self, path: str) -> socket.socket:
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(path)
        peer.setblocking(False)
        self.addCleanup(peer.close)
        return peer

    @defer.inlineCallbacks
    def flood(self, peer: socket.socket, protocol: Any, data: bytes, count: int):  # type: ignore[no-untyped-def]
        """
        Send C{count} copies of C{data} on C{peer} as fast as the agent takes
        them, reading nothing, until it stops taking them for good (aborted)
        or all are sent; returns (bytes sent, most bytes the agent's
        transport held for writing).
        """
        sent = most = 0
        pending = b""
        left = count
        for _ in range(20000):
            if not pending:
                if not left:
                    break
                pending, left = data, left - 1
            try:
                n = peer.send(pending)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                n = 0
            except OSError:
                break  # aborted by the agent
            sent += n
            pending = pending[n:]
            transport = protocol.transport
            # Over TLS, the socket's transport is under the TLS layer.
            transport = getattr(transport, "transport", None) if hasattr(transport, "_tlsConnection") else transport
            if transport is not None and hasattr(transport, "dataBuffer"):
                most = max(most, held_for_writing(transport))
            if not n:
                if protocol._transport_gone:
                    break
                yield task.deferLater(reactor, 0.01, lambda: None)
            elif sent % (1024 * 1024) < len(data):
                yield task.deferLater(reactor, 0, lambda: None)
        return sent, most

    @defer.inlineCallbacks
    def wait_for(self, condition: Any):  # type: ignore[no-untyped-def]
        for _ in range(1000):
            if condition():
                return True
            yield task.deferLater(reactor, 0.01, lambda: None)
        return False

    @defer.inlineCallbacks
    def test_a_listening_agent_stops_a_ping_flood_and_aborts_the_proxy(self):  # type: ignore[no-untyped-def]
        path = self.socket_path()
        listener = AgentListener(
            Agent(), f"unix:{path}:mode=600", "waf-1", reactor=reactor, write_stall_timeout=1.0, health_interval=0
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        proxy = self.peer(path)
        proxy.send(frame(HANDSHAKE_REQUEST, handshake()))
        self.assertTrue((yield self.wait_for(lambda: listener.factory.serving)))
        [protocol] = listener.factory.serving
        flood = 400  # 24 MB of Pings
        sent, most = yield self.flood(proxy, protocol, ping_frame(60000), flood)
        self.assertLess(most, 1024 * 1024, "the agent's write buffer grew with the flood")
        self.assertLess(sent, flood * 60000 // 4, "the agent read the whole flood")
        self.assertTrue((yield self.wait_for(lambda: not listener.factory.connections)), "not aborted")
        self.assertEqual(protocol.stats["write_stalls"], 1)

    @defer.inlineCallbacks
    def test_over_tls_too(self):  # type: ignore[no-untyped-def]
        from twisted.internet import ssl as twisted_ssl
        from twisted.internet.endpoints import SSL4ServerEndpoint

        from .test_tls_verification import _certificates

        _, server_path, _ = _certificates(os.path.dirname(self.socket_path()), "localhost")
        with open(server_path, "rb") as f:
            options = twisted_ssl.PrivateCertificate.loadPEM(f.read()).options()
        endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        listener = AgentListener(Agent(), endpoint, "waf-1", reactor=reactor, write_stall_timeout=1.0, health_interval=0)
        listener.startService()
        self.addCleanup(listener.stopService)
        port = yield listener._listening
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small buffers, set before connecting: the kernel then holds
        # little of the flood, and no window grows to hold more.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        raw.connect(("127.0.0.1", port.getHost().port))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        proxy = context.wrap_socket(raw, do_handshake_on_connect=False)
        self.addCleanup(proxy.close)
        proxy.setblocking(False)
        for _ in range(500):
            try:
                proxy.do_handshake()
                break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                yield task.deferLater(reactor, 0.01, lambda: None)
        proxy.send(frame(HANDSHAKE_REQUEST, handshake()))
        self.assertTrue((yield self.wait_for(lambda: listener.factory.serving)))
        [protocol] = listener.factory.serving
        flood = 400
        sent, most = yield self.flood(proxy, protocol, ping_frame(60000), flood)
        self.assertLess(most, 1024 * 1024, "the agent's write buffer grew with the flood")
        # TCP's buffers grow with the traffic, the agent's side's beyond our
        # reach: what they hold is the kernel's, not the agent's.
        self.assertLess(sent, flood * 60000, "the agent read the whole flood")
        self.assertTrue((yield self.wait_for(lambda: not listener.factory.connections)), "not aborted")
        self.assertEqual(protocol.stats["write_stalls"], 1)

    @defer.inlineCallbacks
    def test_a_dialling_agent_stops_a_ping_flood_then_dials_again(self):  # type: ignore[no-untyped-def]
        path = self.socket_path()
        accepted: list[Protocol] = []

        class FakeProxy(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)
                self.transport.write(frame(HANDSHAKE_RESPONSE, success_response()))  # type: ignore[union-attr]

        port = yield serverFromString(reactor, f"unix:{path}:mode=600").listen(Factory.forProtocol(FakeProxy))
        self.addCleanup(port.stopListening)
        connector = AgentConnector(
            Agent(), f"unix:{path}", "waf-1", reactor=reactor, write_stall_timeout=1.0, health_interval=0,
            initial_delay=0.05, jitter=lambda: 0.0,
        )
        connector.startService()
        self.addCleanup(connector.stopService)
        self.assertTrue((yield self.wait_for(lambda: connector.protocols())))
        [protocol] = connector.protocols()
        # The fake proxy stops reading and writes Pings, from its own socket.
        [proxy] = accepted
        proxy.transport.stopReading()  # type: ignore[union-attr]
        handle = proxy.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood = 400
        sent, most = yield self.flood(handle, protocol, ping_frame(60000), flood)
        self.assertLess(most, 1024 * 1024, "the agent's write buffer grew with the flood")
        self.assertLess(sent, flood * 60000 // 4, "the agent read the whole flood")
        self.assertTrue((yield self.wait_for(lambda: protocol._transport_gone)), "not aborted")
        self.assertEqual(protocol.stats["write_stalls"], 1)
        # Dialled again after its back-off.
        self.assertTrue((yield self.wait_for(lambda: len(accepted) == 2)), "not dialled again")
        self.assertTrue((yield self.wait_for(lambda: connector.protocols())))

    @defer.inlineCallbacks
    def test_unfinished_frames_past_the_budget_close_the_largest_holder(self):  # type: ignore[no-untyped-def]
        path = self.socket_path()
        listener = AgentListener(
            Agent(), f"unix:{path}:mode=600", "waf-1", reactor=reactor, health_interval=0,
            max_incomplete_frame_bytes=3 * 1024 * 1024,
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        budget = listener.factory.frame_budget
        peers = [self.peer(path) for _ in range(4)]
        for peer in peers:
            peer.send(frame(HANDSHAKE_REQUEST, handshake()))
        self.assertTrue((yield self.wait_for(lambda: len(listener.factory.serving) == 4)))
        most = 0
        for i, peer in enumerate(peers):
            # Each declares a 16 MiB frame and sends (1 + i/4) MiB of it.
            data = struct.pack("!IB", 16 * 1024 * 1024, REQUEST_HEADERS) + b"x" * ((4 + i) * 256 * 1024)
            for _ in range(2000):
                try:
                    data = data[peer.send(data) :]
                except BlockingIOError:
                    pass
                except OSError:
                    break  # this one was closed
                most = max(most, budget.total)
                if not data:
                    break
                yield task.deferLater(reactor, 0.005, lambda: None)
        self.assertTrue((yield self.wait_for(lambda: budget.evictions >= 1)), "nothing was evicted")
        self.assertTrue((yield self.wait_for(lambda: len(listener.factory.connections) < 4)))
        self.assertLessEqual(most, budget.limit)
        self.assertLessEqual(budget.total, budget.limit)

    @defer.inlineCallbacks
    def test_the_connection_past_the_cap_is_closed(self):  # type: ignore[no-untyped-def]
        path = self.socket_path()
        listener = AgentListener(
            Agent(), f"unix:{path}:mode=600", "waf-1", reactor=reactor, health_interval=0, max_connections=2
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        first, second = self.peer(path), self.peer(path)
        self.assertTrue((yield self.wait_for(lambda: len(listener.factory.connections) == 2)))
        third = self.peer(path)
        self.assertTrue((yield self.wait_for(lambda: listener.factory.refused_connections == 1)))

        def closed(peer: socket.socket) -> bool:
            try:
                return peer.recv(1) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        self.assertTrue((yield self.wait_for(lambda: closed(third))), "the third connection is open")
        self.assertFalse(closed(first) or closed(second))
        self.assertEqual(len(listener.factory.connections), 2)
