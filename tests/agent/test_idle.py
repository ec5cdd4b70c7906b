"""
A listening agent's idle connections: with every place taken a newcomer
takes the place of the connection idle longest (never one with an event in
flight), and C{idle_timeout} closes connections that carry no event.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import Agent, AgentListener
from sentinel_twisted.agent.forward import (
    DEFAULT_EVICTION_IDLE_AGE,
    ForwardAgentFactory,
    ForwardAgentProtocol,
)
from sentinel_twisted.agent.protocol import AgentSettings
from sentinel_twisted.endpoints import RefusedConnection
from sentinel_twisted.proxy.pool import AgentPool

from .._proxy_support import captured_log
from ._support import (
    AGENT_RESPONSE,
    HANDSHAKE_REQUEST,
    PING,
    PONG,
    REQUEST_HEADERS,
    RecordingAgent,
    frame,
    headers_event,
    temp_path,
    wait_for,
)
from .test_backpressure import warnings
from .test_forward import handshake, raw_frames
from .test_tap_listen import parse


class Listener:
    """A L{ForwardAgentFactory} on a Clock, its connections over StringTransports."""

    def __init__(self, agent: Any = None, **options: Any) -> None:
        self.agent = agent if agent is not None else Agent()
        self.clock = Clock()
        settings = AgentSettings(agent=self.agent, agent_id="waf-1", health_interval=0)
        self.factory = ForwardAgentFactory(settings, self.clock, **options)

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(UNIXAddress(None))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def shaken(self) -> tuple[ForwardAgentProtocol, StringTransport]:
        """A connection past its handshake."""
        protocol, transport = self.connect()
        assert isinstance(protocol, ForwardAgentProtocol)
        protocol.dataReceived(frame(HANDSHAKE_REQUEST, handshake()))
        assert protocol.registered
        return protocol, transport

    def pending(self) -> list[Any]:
        return [call for call in self.clock.getDelayedCalls() if call.active()]


def answered(transport: StringTransport) -> list[str]:
    return [
        json.loads(body)["audit"]["custom"]["correlation_id"]
        for kind, body in raw_frames(transport.value())
        if kind == AGENT_RESPONSE
    ]


class EvictionTests(SynchronousTestCase):
    def test_a_newcomer_takes_the_place_of_an_idle_connection(self) -> None:
        listener = Listener(max_connections=2)
        first, first_transport = listener.shaken()
        listener.clock.advance(1)
        second, second_transport = listener.shaken()
        listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE)
        with captured_log() as events:
            third, _ = listener.connect()
        self.assertIsInstance(third, ForwardAgentProtocol)
        # The one idle longest is aborted, its place free at once.
        self.assertTrue(first_transport.disconnected)
        self.assertFalse(second_transport.disconnecting)
        self.assertEqual(listener.factory.evicted_connections, 1)
        self.assertEqual(listener.factory.refused_connections, 0)
        self.assertEqual(listener.factory.connections, {second, third})
        self.assertEqual(
            warnings(events),
            [
                "Agent waf-1 holds 2 proxy connections (limit 2); closing connection waf-1-fwd-1 of "
                "proxy zentinel-proxy, idle for 2s, to make room for a new one"
            ],
        )

    def test_a_connection_with_an_event_in_flight_is_never_closed_for_a_newcomer(self) -> None:
        agent = RecordingAgent()
        listener = Listener(agent, max_connections=2)
        busy, busy_transport = listener.shaken()
        busy.dataReceived(frame(REQUEST_HEADERS, headers_event("slow")))
        listener.clock.advance(1)
        idle, idle_transport = listener.shaken()
        listener.clock.advance(100)
        newcomer, _ = listener.connect()
        self.assertIsInstance(newcomer, ForwardAgentProtocol)
        self.assertFalse(busy_transport.disconnecting)
        self.assertTrue(idle_transport.disconnected)
        # With the other two busy too, the next newcomer is refused.
        newcomer.dataReceived(frame(HANDSHAKE_REQUEST, handshake()) + frame(REQUEST_HEADERS, headers_event("n")))
        listener.clock.advance(100)
        refused, refused_transport = listener.connect()
        self.assertIsInstance(refused, RefusedConnection)
        self.assertTrue(refused_transport.disconnected)
        self.assertEqual(listener.factory.refused_connections, 1)
        # Answered, the slow event leaves its connection idle from then.
        agent.answer("slow")
        self.assertEqual(answered(busy_transport), ["slow"])
        listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE)
        listener.connect()
        self.assertTrue(busy_transport.disconnected)

    def test_a_connection_partway_through_a_frame_is_kept_for_the_age(self) -> None:
        listener = Listener(max_connections=2)
        _, mid_handshake = listener.connect()
        listener.factory.connections.copy().pop().dataReceived(frame(HANDSHAKE_REQUEST, handshake())[:10])
        serving, serving_transport = listener.shaken()
        listener.clock.advance(5)
        # Idle 5 s, then an event on its way: it counts from the frame's start.
        serving.dataReceived(frame(REQUEST_HEADERS, headers_event("a"))[:20])
        listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE / 2)
        serving.dataReceived(frame(REQUEST_HEADERS, headers_event("a"))[20:30])
        # The handshake partly read since the start is not kept.
        newcomer, _ = listener.connect()
        self.assertIsInstance(newcomer, ForwardAgentProtocol)
        self.assertTrue(mid_handshake.disconnected)
        refused, _ = listener.connect()
        self.assertIsInstance(refused, RefusedConnection)
        self.assertFalse(serving_transport.disconnecting)
        self.assertEqual(listener.factory.evicted_connections, 1)

    def test_a_handshake_partly_read_holds_a_place_for_the_age_only(self) -> None:
        listener = Listener(max_connections=1)
        stalling, transport = listener.connect()
        stalling.dataReceived(frame(HANDSHAKE_REQUEST, handshake())[:6])
        listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE / 2)
        self.assertIsInstance(listener.connect()[0], RefusedConnection)
        listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE / 2)
        # Not the handshake timeout (10 s): a proxy's handshake comes in one write.
        newcomer, _ = listener.connect()
        self.assertIsInstance(newcomer, ForwardAgentProtocol)
        self.assertTrue(transport.disconnected)

    def test_frames_without_events_ending_partway_through_the_next_do_not_hold_a_place(self) -> None:
        listener = Listener(max_connections=1)
        peer, transport = listener.shaken()
        # Each write ends a frame that is no event (a Pong, an invalid event)
        # and starts the next, so that every read leaves one partly read.
        peer.dataReceived(struct.pack("!IB", 3, REQUEST_HEADERS))
        for _ in range(4):
            listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE / 2)
            peer.dataReceived(b"{}" + frame(PONG, {}) + struct.pack("!IB", 3, REQUEST_HEADERS))
            self.assertTrue(peer.mid_frame)
        newcomer, _ = listener.connect()
        self.assertIsInstance(newcomer, ForwardAgentProtocol)
        self.assertTrue(transport.disconnected)
        self.assertEqual(peer.stats["events"], 4)

    def test_an_event_served_lets_the_next_frame_partly_read_hold_the_place_again(self) -> None:
        listener = Listener(max_connections=1)
        proxy, transport = listener.shaken()
        event = frame(REQUEST_HEADERS, headers_event("a"))
        proxy.dataReceived(event[:10])
        listener.clock.advance(10)
        proxy.dataReceived(event[10:] + event[:10])
        self.assertEqual(answered(transport), ["a"])
        listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE / 2)
        self.assertIsInstance(listener.connect()[0], RefusedConnection)

    def test_a_connection_idle_less_than_the_age_is_kept(self) -> None:
        listener = Listener(max_connections=1, eviction_idle_age=10)
        _, transport = listener.shaken()
        listener.clock.advance(9.5)
        with captured_log() as events:
            refused, _ = listener.connect()
        self.assertIsInstance(refused, RefusedConnection)
        self.assertEqual(
            warnings(events),
            [
                "Agent waf-1 holds 1 proxy connections (limit 1), none of them idle for 10s or more; "
                "closing new ones until some end or go idle"
            ],
        )
        listener.clock.advance(0.5)
        newcomer, _ = listener.connect()
        self.assertIsInstance(newcomer, ForwardAgentProtocol)
        self.assertTrue(transport.disconnected)

    def test_a_connection_that_never_carried_an_event_goes_first(self) -> None:
        listener = Listener(max_connections=2)
        used, used_transport = listener.shaken()
        used.dataReceived(frame(REQUEST_HEADERS, headers_event("a")))
        self.assertEqual(answered(used_transport), ["a"])
        listener.clock.advance(5)
        unused, unused_transport = listener.shaken()
        listener.clock.advance(5)
        # The used one is idle longer (10 s against 5 s), yet kept.
        newcomer, _ = listener.connect()
        self.assertIsInstance(newcomer, ForwardAgentProtocol)
        self.assertTrue(unused_transport.disconnected)
        self.assertFalse(used_transport.disconnecting)
        self.assertEqual(unused.stats["evicted"], 1)

    def test_a_connection_that_sent_no_handshake_is_closed_for_a_newcomer(self) -> None:
        listener = Listener(max_connections=1)
        silent, transport = listener.connect()
        listener.clock.advance(1)
        newcomer, _ = listener.connect()
        self.assertIsInstance(newcomer, ForwardAgentProtocol)
        self.assertTrue(transport.disconnected)
        self.assertFalse(silent.registered)
        # Its handshake timer went with it.
        self.assertEqual(len(listener.pending()), 1)

    def test_pings_do_not_keep_a_connection_from_being_closed_for_a_newcomer(self) -> None:
        listener = Listener(max_connections=1)
        pinging, transport = listener.shaken()
        for _ in range(5):
            listener.clock.advance(1)
            pinging.dataReceived(frame(PING, {"sequence": 1, "timestamp_ms": 1}))
        listener.connect()
        self.assertTrue(transport.disconnected)

    def test_newcomers_take_the_places_of_the_idle_oldest_first(self) -> None:
        agent = RecordingAgent()
        listener = Listener(agent, max_connections=5)
        made = [listener.shaken() for _ in range(5)]
        order = {protocol: i for i, (protocol, _) in enumerate(made)}
        # Events on 0 then 3 then 1 (its own still in flight); 2 and 4 never carry one.
        for i, cid in ((0, "a"), (3, "b"), (1, "c")):
            listener.clock.advance(1)
            made[i][0].dataReceived(frame(REQUEST_HEADERS, headers_event(cid)))
        for cid in ("a", "b"):
            agent.answer(cid)
        listener.clock.advance(1)
        agent.answer("c")
        listener.clock.advance(DEFAULT_EVICTION_IDLE_AGE)
        closed = []
        for _ in range(6):
            before = set(listener.factory.connections)
            newcomer, transport = listener.connect()
            # Each newcomer carries an event at once, and keeps it in flight.
            if isinstance(newcomer, ForwardAgentProtocol):
                newcomer.dataReceived(
                    frame(HANDSHAKE_REQUEST, handshake()) + frame(REQUEST_HEADERS, headers_event(f"n{len(closed)}"))
                )
            closed.extend(order[p] for p in before - listener.factory.connections)
        # Never used (oldest first), then used, idle longest first (1 was
        # busy until last).  With every place busy, the sixth is refused.
        self.assertEqual(closed, [2, 4, 0, 3, 1])
        self.assertIsInstance(newcomer, RefusedConnection)

    def test_a_connection_whose_events_were_all_answered_at_once_counts_as_never_used(self) -> None:
        listener = Listener(max_connections=2)
        used, used_transport = listener.shaken()
        used.dataReceived(frame(REQUEST_HEADERS, headers_event("a")))
        listener.clock.advance(5)
        garbling, garbling_transport = listener.shaken()
        garbling.dataReceived(frame(REQUEST_HEADERS, {"correlation_id": "g"}))
        self.assertEqual(answered(garbling_transport), ["g"])
        listener.clock.advance(5)
        listener.connect()
        self.assertTrue(garbling_transport.disconnected)
        self.assertFalse(used_transport.disconnecting)

    def test_eviction_can_be_turned_off(self) -> None:
        listener = Listener(max_connections=1, eviction_idle_age=None)
        _, transport = listener.shaken()
        listener.clock.advance(1000)
        with captured_log() as events:
            refused, _ = listener.connect()
        self.assertIsInstance(refused, RefusedConnection)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(
            warnings(events),
            ["Agent waf-1 holds 1 proxy connections (limit 1); closing new ones until some end"],
        )

    def test_bad_eviction_ages(self) -> None:
        settings = AgentSettings(agent=Agent(), agent_id="waf-1")
        for value in (-1, float("inf"), float("nan")):
            with self.subTest(value=value):
                self.assertRaises(ValueError, ForwardAgentFactory, settings, Clock(), eviction_idle_age=value)


class IdleTimeoutTests(SynchronousTestCase):
    def test_off_by_default(self) -> None:
        listener = Listener()
        self.assertEqual(listener.factory.idle_timeout, 0)
        _, transport = listener.shaken()
        self.assertEqual(listener.pending(), [])
        listener.clock.advance(86400)
        self.assertFalse(transport.disconnecting)

    def test_a_connection_without_events_is_closed_at_the_timeout(self) -> None:
        listener = Listener(idle_timeout=30)
        _, transport = listener.shaken()
        listener.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        with captured_log() as events:
            listener.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        # Closed, not aborted: nothing was in flight.
        self.assertFalse(transport.disconnected)
        self.assertEqual(listener.factory.idle_closed_connections, 1)
        self.assertIn(
            "Agent waf-1 closing forward connection waf-1-fwd-1 of proxy zentinel-proxy: no event for "
            "30s (idle timeout 30s)",
            [e["log_format"].format(**e) for e in events if "idle timeout" in e.get("log_format", "")],
        )

    def test_the_time_counts_from_the_end_of_the_last_event(self) -> None:
        agent = RecordingAgent()
        listener = Listener(agent, idle_timeout=30)
        protocol, transport = listener.shaken()
        listener.clock.advance(20)
        protocol.dataReceived(frame(REQUEST_HEADERS, headers_event("slow")))
        # In flight for 40 s: long past the timeout, and kept.
        listener.clock.advance(40)
        self.assertFalse(transport.disconnecting)
        agent.answer("slow")
        listener.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        listener.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_frames_partly_read_without_events_do_not_count(self) -> None:
        listener = Listener(idle_timeout=30)
        peer, transport = listener.shaken()
        peer.dataReceived(struct.pack("!IB", 3, REQUEST_HEADERS))
        for _ in range(2):
            listener.clock.advance(20)
            peer.dataReceived(b"{}" + struct.pack("!IB", 3, REQUEST_HEADERS))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(listener.factory.idle_closed_connections, 1)

    def test_pings_do_not_count(self) -> None:
        listener = Listener(idle_timeout=30)
        protocol, transport = listener.shaken()
        for _ in range(3):
            listener.clock.advance(10)
            protocol.dataReceived(frame(PING, {"sequence": 1, "timestamp_ms": 1}))
        self.assertTrue(transport.disconnecting)

    def test_before_the_handshake_the_handshake_timeout_applies(self) -> None:
        listener = Listener(idle_timeout=1, handshake_timeout=10)
        _, transport = listener.connect()
        listener.clock.advance(5)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(listener.factory.idle_closed_connections, 0)

    def test_the_timer_goes_with_the_connection(self) -> None:
        listener = Listener(idle_timeout=30)
        protocol, transport = listener.shaken()
        self.assertEqual(len(listener.pending()), 1)
        transport.disconnecting = True
        protocol.connectionLost()
        self.assertEqual(listener.pending(), [])
        self.assertEqual(listener.factory.connections, set())

    def test_bad_timeouts(self) -> None:
        settings = AgentSettings(agent=Agent(), agent_id="waf-1")
        for value in (-1, float("inf"), float("nan")):
            with self.subTest(value=value):
                self.assertRaises(ValueError, ForwardAgentFactory, settings, Clock(), idle_timeout=value)


class OptionTests(SynchronousTestCase):
    def test_idle_timeout_option(self) -> None:
        from sentinel_twisted.agent.tap import make_agent_service

        path = temp_path(self, "agent.sock")
        service = make_agent_service(parse("--listen", f"unix:{path}"), reactor=Clock())
        assert service.listener is not None
        self.assertEqual(service.listener.factory.idle_timeout, 0)
        self.assertEqual(service.listener.factory.eviction_idle_age, DEFAULT_EVICTION_IDLE_AGE)
        service = make_agent_service(parse("--listen", f"unix:{path}", "--idle-timeout", "300"), reactor=Clock())
        assert service.listener is not None
        self.assertEqual(service.listener.factory.idle_timeout, 300)
        for value in ("-1", "soon"):
            with self.subTest(value=value):
                error = self.assertRaises(
                    usage.UsageError, parse, "--listen", f"unix:{path}", "--idle-timeout", value
                )
                self.assertIn("--idle-timeout", str(error))

    def test_eviction_idle_age_option(self) -> None:
        from sentinel_twisted.agent.tap import make_agent_service

        path = temp_path(self, "agent.sock")
        for given, age in (("5", 5.0), ("0", 0.0), ("never", None), ("Never", None)):
            with self.subTest(given=given):
                options = parse("--listen", f"unix:{path}", "--eviction-idle-age", given)
                service = make_agent_service(options, reactor=Clock())
                assert service.listener is not None
                self.assertEqual(service.listener.factory.eviction_idle_age, age)
        for value in ("-1", "soon", "inf"):
            with self.subTest(value=value):
                error = self.assertRaises(
                    usage.UsageError, parse, "--listen", f"unix:{path}", "--eviction-idle-age", value
                )
                self.assertIn("--eviction-idle-age", str(error))


# -- real sockets ---------------------------------------------------------------


class HeldPlacesTests(TestCase):
    """Over a UNIX socket: a peer holds every place, and a proxy still gets in."""

    timeout = 30

    @defer.inlineCallbacks
    def test_a_proxy_is_served_when_a_peer_holds_every_place(self):  # type: ignore[no-untyped-def]
        path = temp_path(self, "agent.sock")
        listener = AgentListener(
            Agent(),
            f"unix:{path}:mode=600",
            "waf-1",
            reactor=reactor,
            health_interval=0,
            max_connections=4,
            eviction_idle_age=0.2,
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        factory = listener.factory
        # The hostile peer: four handshakes, then nothing.
        held = []
        for _ in range(4):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(peer.close)
            peer.connect(path)
            peer.setblocking(False)
            peer.send(frame(HANDSHAKE_REQUEST, handshake()))
            held.append(peer)
        yield wait_for(lambda: len(factory.serving) == 4, "four handshakes")
        # A real proxy dials: it is let in and its request is answered.
        pool = AgentPool()
        service = pool.connect_agent(f"unix:{path}", "waf", clock=reactor)
        self.addCleanup(service.stopService)
        yield wait_for(lambda: "waf" in pool, "the proxy to get in")
        answer = yield pool.send_request_headers("waf", m.decode(json.dumps(headers_event("fwd-1")).encode(), m.RequestHeadersEvent))
        self.assertEqual(answer.decision, m.ALLOW)
        self.assertEqual(factory.evicted_connections, 1)
        self.assertLessEqual(len(factory.connections), 4)
