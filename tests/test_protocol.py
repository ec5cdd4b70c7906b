"""
L{ReverseConnectionProtocol}: the lifecycle of one reverse connection,
awaiting registration -> registered -> closed, driven through bytes on a
StringTransport and time on a MemoryReactorClock.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from sentinel_twisted import messages as m
from sentinel_twisted.errors import ConnectionClosed, InvalidMessage
from sentinel_twisted.proxy.pool import PoolObserver
from sentinel_twisted.wire import MAX_MESSAGE_SIZE, MessageType, encode_frame

from ._proxy_support import (
    CLOSE_DEADLINE,
    PEER,
    Proxy,
    RecordingTransport,
    answer_frame,
    captured_log,
    decoded,
    delayed_calls,
    log_text,
    lose,
    registration_frame,
    request_headers,
    take_frames,
)
from .test_pending import Outcomes


def only_response(transport: Any) -> m.RegistrationResponse:
    [response] = decoded(take_frames(transport), MessageType.HANDSHAKE_RESPONSE, m.RegistrationResponse)
    return response


class AwaitingRegistrationTests(TestCase):
    """Transitions out of AwaitingRegistration."""

    def setUp(self) -> None:
        self.proxy = Proxy()
        self.protocol, self.transport = self.proxy.connect()

    def test_connection_starts_the_handshake_timer(self) -> None:
        [timer] = self.proxy.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 10.0)
        self.assertEqual(self.proxy.factory.awaiting_registration, 1)

    def test_valid_registration_is_accepted(self) -> None:
        self.protocol.dataReceived(registration_frame("waf-1"))
        response = only_response(self.transport)
        self.assertTrue(response.success)
        self.assertIsNone(response.error)
        self.assertTrue(response.connection_id.startswith("waf-1-"))
        self.assertEqual(response.proxy_id, "sentinel-proxy")
        self.assertEqual(response.proxy_version, "9.9.9")
        self.assertFalse(self.transport.disconnecting)
        connection = self.protocol.connection
        assert connection is not None
        self.assertEqual(connection.connection_id, response.connection_id)
        self.assertEqual(self.proxy.pool.connections("waf-1"), [connection])

    def test_acceptance_stops_the_handshake_timer(self) -> None:
        self.protocol.dataReceived(registration_frame())
        self.assertEqual(self.proxy.clock.getDelayedCalls(), [])
        self.proxy.clock.advance(60)
        self.assertFalse(self.transport.disconnecting)

    def test_acceptance_leaves_the_awaiting_count(self) -> None:
        self.protocol.dataReceived(registration_frame())
        self.assertEqual(self.proxy.factory.awaiting_registration, 0)

    def test_registration_split_across_reads(self) -> None:
        frame = registration_frame()
        for i in range(len(frame)):
            self.protocol.dataReceived(frame[i : i + 1])
        self.assertTrue(only_response(self.transport).success)

    def test_frames_after_the_registration_in_the_same_read_reach_the_connection(self) -> None:
        self.protocol.dataReceived(
            registration_frame()
            + encode_frame(MessageType.FLOW_CONTROL, b'{"action":1}')
            + encode_frame(MessageType.PING, b'{"sequence":3,"timestamp_ms":0}')
        )
        frames = take_frames(self.transport)
        self.assertEqual([t for t, _ in frames], [MessageType.HANDSHAKE_RESPONSE, MessageType.PONG])
        assert self.protocol.connection is not None
        self.assertTrue(self.protocol.connection.is_paused)

    def test_first_frame_of_another_type_is_refused(self) -> None:
        self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, b"{}"))
        response = only_response(self.transport)
        self.assertFalse(response.success)
        self.assertEqual(
            response.error,
            "Invalid message format: Expected registration request (HandshakeRequest), got AgentResponse",
        )
        self.assertEqual(response.connection_id, "")
        self.assertTrue(self.transport.disconnecting)

    def test_refusal_writes_the_response_then_closes(self) -> None:
        self.protocol.dataReceived(registration_frame(version=1))
        self.assertEqual(self.transport.events, ["write", "loseConnection"])

    def test_refusal_stops_the_handshake_timer(self) -> None:
        self.protocol.dataReceived(encode_frame(MessageType.PING, b"{}"))
        self.assertEqual(delayed_calls(self.proxy.clock), CLOSE_DEADLINE)
        lose(self.protocol)
        self.assertEqual(self.proxy.clock.getDelayedCalls(), [])

    def test_malformed_registration_is_answered_then_closed(self) -> None:
        self.protocol.dataReceived(encode_frame(MessageType.HANDSHAKE_REQUEST, b"not-json!!"))
        response = only_response(self.transport)
        self.assertFalse(response.success)
        assert response.error is not None
        self.assertTrue(response.error.startswith("Invalid message format: "))
        self.assertTrue(self.transport.disconnecting)

    def test_bytes_after_a_refusal_are_ignored(self) -> None:
        self.protocol.dataReceived(encode_frame(MessageType.PING, b"{}") + registration_frame())
        only_response(self.transport)
        self.protocol.dataReceived(registration_frame())
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(self.protocol.connection)

    def test_handshake_times_out_from_connection_time(self) -> None:
        self.proxy.clock.advance(9.999)
        self.assertFalse(self.transport.disconnecting)
        self.proxy.clock.advance(0.001)
        response = only_response(self.transport)
        self.assertFalse(response.success)
        self.assertEqual(response.error, "Timeout after 10s")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.proxy.factory.awaiting_registration, 0)

    def test_a_byte_trickle_does_not_extend_the_handshake(self) -> None:
        frame = registration_frame()
        for i in range(19):
            self.proxy.clock.advance(0.5)
            self.protocol.dataReceived(frame[i : i + 1])
        self.assertFalse(self.transport.disconnecting)
        self.proxy.clock.advance(0.5)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(only_response(self.transport).error, "Timeout after 10s")
        self.protocol.dataReceived(frame[19:])
        self.assertIsNone(self.protocol.connection)

    def test_handshake_timeout_is_the_configured_one(self) -> None:
        proxy = Proxy(handshake_timeout=0.1)
        _, transport = proxy.connect()
        proxy.clock.advance(0.1)
        self.assertEqual(only_response(transport).error, "Timeout after 100ms")

    def test_framing_error_is_answered_then_closed(self) -> None:
        self.protocol.dataReceived(b"\x00\x00\x00\x00")
        response = only_response(self.transport)
        self.assertEqual(response.error, "Invalid message format: Zero-length message")
        self.assertEqual(self.transport.events, ["write", "loseConnection"])
        self.assertEqual(delayed_calls(self.proxy.clock), CLOSE_DEADLINE)

    def test_oversize_first_frame_is_refused_from_its_prefix(self) -> None:
        self.protocol.dataReceived(struct.pack(">I", MAX_MESSAGE_SIZE + 1))
        response = only_response(self.transport)
        self.assertEqual(
            response.error, f"Message too large: {MAX_MESSAGE_SIZE + 1} bytes (max: {MAX_MESSAGE_SIZE})"
        )
        self.assertEqual(self.protocol.buffered_bytes, 0)

    def test_first_frame_over_the_registration_limit_is_refused_from_its_prefix(self) -> None:
        # A RegistrationRequest never needs 1 MiB: nobody may buffer 16 MiB
        # before saying who they are.
        self.protocol.dataReceived(struct.pack(">IB", 1024 * 1024 + 1, MessageType.HANDSHAKE_REQUEST))
        response = only_response(self.transport)
        self.assertEqual(response.error, f"Message too large: {1024 * 1024 + 1} bytes (max: {1024 * 1024})")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.protocol.buffered_bytes, 0)
        self.assertEqual(self.proxy.factory.rejections["frame_too_large"], 1)

    def test_registration_frame_limit_is_an_option(self) -> None:
        proxy = Proxy(max_registration_frame_size=100)
        protocol, transport = proxy.connect()
        protocol.dataReceived(registration_frame("waf-1"))
        response = only_response(transport)
        self.assertFalse(response.success)
        self.assertIn("(max: 100)", response.error or "")

    def test_connection_lost_while_awaiting(self) -> None:
        self.protocol.dataReceived(registration_frame()[:10])
        lose(self.protocol)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.proxy.clock.getDelayedCalls(), [])
        self.assertEqual(self.proxy.factory.awaiting_registration, 0)
        self.assertEqual(len(self.proxy.pool), 0)

    def test_connection_lost_mid_frame_is_logged(self) -> None:
        self.protocol.dataReceived(registration_frame()[:10])
        with captured_log() as events:
            lose(self.protocol)
        self.assertIn("mid-frame", " ".join(e.get("detail", "") for e in events))

    def test_close_while_awaiting_drops_without_answer(self) -> None:
        self.protocol.close_connection("shutting down")
        self.assertEqual(self.transport.events, ["loseConnection"])
        self.assertEqual(delayed_calls(self.proxy.clock), CLOSE_DEADLINE)
        self.assertEqual(self.proxy.factory.awaiting_registration, 0)

    def test_no_answer_is_written_once_the_transport_is_closing(self) -> None:
        self.transport.loseConnection()
        self.protocol.dataReceived(encode_frame(MessageType.PING, b"{}"))
        self.assertEqual(self.transport.value(), b"")

    def test_peer_is_described(self) -> None:
        self.assertEqual(self.protocol.peer, "127.0.0.1:40000")

    def test_a_unix_peer_may_name_its_socket_anything(self) -> None:
        """
        A UNIX client binds its socket to a name of its choosing, any bytes
        (an abstract one starts with a NUL): the connection still starts its
        handshake timer, and its peer is text fit for a log line, the status
        page and JSON (not valid UTF-8, it used to raise in C{connectionMade},
        leaving the connection without a handshake timeout).
        """
        from twisted.internet.address import UNIXAddress
        from twisted.internet.testing import StringTransport

        for name, shown in [
            (b"\x00abs\xff<b>" + "\u202e".encode(), "unix:\\x00abs\\xff<b>\\u202e"),
            (b"/tmp/a\xfe\n\x1b[31m.sock", "unix:/tmp/a\\xfe\\x0a\\x1b[31m.sock"),
        ]:
            proxy = Proxy()
            protocol = proxy.factory.buildProtocol(UNIXAddress(name))
            with captured_log() as events:
                protocol.makeConnection(StringTransport(peerAddress=UNIXAddress(name)))
            self.assertEqual([e for e in events if e.get("log_failure")], [])
            self.assertEqual(protocol.peer, shown)
            [timer] = proxy.clock.getDelayedCalls()
            self.assertEqual(timer.getTime(), 10.0)
            protocol.peer.encode("utf-8")


class RegisteredTests(TestCase):
    """Transitions out of Registered."""

    def setUp(self) -> None:
        self.proxy = Proxy(request_timeout=5)
        self.protocol, self.transport, self.connection = self.proxy.register("waf-1")
        self.outcomes = Outcomes()
        for cid in ("a", "b"):
            self.outcomes.watch(cid, self.connection.send_request_headers(request_headers(cid)))
        take_frames(self.transport)

    def assertGone(self, detail: str, closing: bool = False) -> None:
        for cid in ("a", "b"):
            error = self.outcomes.error(cid)
            self.assertIsInstance(error, ConnectionClosed)
            self.assertEqual(error.detail, detail)  # type: ignore[attr-defined]
        self.assertEqual(self.connection.in_flight, 0)
        self.assertEqual(self.proxy.pool.connections("waf-1"), [])
        self.assertEqual(self.proxy.factory.registered_connections("waf-1"), 0)
        # Closed by the proxy: only the deadline of the close is left, until the transport goes.
        self.assertEqual(delayed_calls(self.proxy.clock), CLOSE_DEADLINE if closing else [])

    def test_answers_reach_their_requests(self) -> None:
        self.protocol.dataReceived(answer_frame("b") + answer_frame("a", m.Block(403)))
        self.assertEqual(self.outcomes.value("a").decision, m.Block(403))
        self.assertTrue(self.outcomes.value("b").is_allow)

    def test_connection_lost_fails_every_request_at_once(self) -> None:
        lose(self.protocol)
        self.assertGone("connection closed by agent")

    def test_connection_lost_with_an_error_names_it(self) -> None:
        lose(self.protocol, ConnectionLost("reset by peer"))
        self.assertIn("reset by peer", self.outcomes.error("a").detail)  # type: ignore[attr-defined]

    def test_connection_lost_mid_frame_says_so(self) -> None:
        self.protocol.dataReceived(answer_frame("a")[:9])
        lose(self.protocol)
        self.assertIn("mid-frame", self.outcomes.error("a").detail)  # type: ignore[attr-defined]

    def test_framing_error_closes_and_fails_every_request(self) -> None:
        self.protocol.dataReceived(struct.pack(">IB", 3, 0xEE) + b"{}")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(take_frames(self.transport), [])
        self.assertGone("Invalid message format: Unknown message type: 0xee", closing=True)

    def test_frames_after_a_framing_error_are_ignored(self) -> None:
        self.protocol.dataReceived(b"\x00\x00\x00\x00" + answer_frame("a"))
        self.assertIsInstance(self.outcomes.error("a"), ConnectionClosed)

    def test_close_fails_every_request_and_closes_the_transport(self) -> None:
        self.connection.close("maintenance")
        self.assertTrue(self.transport.disconnecting)
        self.assertGone("maintenance", closing=True)

    def test_close_lets_buffered_cancels_go_out(self) -> None:
        self.assertEqual(self.connection.cancel_all(m.CancelReason.PROXY_SHUTDOWN), 2)
        self.connection.close("shutting down")
        cancels = decoded(take_frames(self.transport), MessageType.CANCEL, m.CancelMessage)
        self.assertEqual([c.correlation_id for c in cancels], ["a", "b"])
        self.assertEqual(self.transport.events[-1], "loseConnection")
        self.assertFalse(self.transport.disconnected, "aborted: buffered frames were dropped")

    def test_close_with_abort_drops_what_is_buffered(self) -> None:
        self.connection.close("stuck", abort=True)
        self.assertTrue(self.transport.disconnected)

    def test_close_fires_only_when_the_transport_is_gone(self) -> None:
        closed = self.connection.close("maintenance")
        self.assertNoResult(closed)
        lose(self.protocol)
        self.assertIsNone(self.successResultOf(closed))

    def test_close_twice_closes_once(self) -> None:
        first = self.connection.close()
        second = self.connection.close()
        self.assertEqual(self.transport.events.count("loseConnection"), 1)
        lose(self.protocol)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_new_requests_fail_while_closing(self) -> None:
        self.connection.close()
        self.failureResultOf(
            self.connection.send_request_headers(request_headers("late")), ConnectionClosed
        )

    def test_frames_after_close_are_ignored(self) -> None:
        self.connection.close()
        take_frames(self.transport)
        self.protocol.dataReceived(encode_frame(MessageType.PING, b'{"sequence":1,"timestamp_ms":1}'))
        self.assertEqual(self.transport.value(), b"")

    def test_second_registration_frame_is_ignored(self) -> None:
        self.protocol.dataReceived(registration_frame("waf-2"))
        self.assertEqual(take_frames(self.transport), [])
        self.assertEqual(self.proxy.pool.agent_ids(), ["waf-1"])

    def test_timeouts_still_run_after_registration(self) -> None:
        self.proxy.clock.advance(5)
        self.assertEqual(str(self.outcomes.error("a")), "Timeout after 5s")
        self.assertEqual(self.connection.in_flight, 0)

    def test_observer_closing_a_connection_on_registration(self) -> None:
        # A re-entrant close from inside the registration must still leave
        # the connection closed, out of the pool, with its slot released.
        class Closer:
            def agent_registered(self, connection: Any) -> None:
                connection.close("not today")

        self.proxy.pool.add_observer(Closer())
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(registration_frame("waf-9"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.proxy.pool.connections("waf-9"), [])
        self.assertEqual(self.proxy.factory.registered_connections("waf-9"), 0)


class HostileFrameTests(TestCase):
    """
    Agents that send large control frames or unfinished frames: memory is
    bounded, and every pending request still ends exactly once.
    """

    def setUp(self) -> None:
        self.proxy = Proxy(request_timeout=30, frame_timeout=2, max_incomplete_frame_bytes=1000)
        self.protocol, self.transport, self.connection = self.proxy.register("waf-1")
        self.outcomes = Outcomes()
        self.outcomes.watch("a", self.connection.send_request_headers(request_headers("a")))
        take_frames(self.transport)

    def assertClosedOnce(self, detail: str) -> None:
        error = self.outcomes.error("a")
        self.assertIsInstance(error, ConnectionClosed)
        self.assertEqual(error.detail, detail)  # type: ignore[attr-defined]
        self.assertEqual(len(self.outcomes.results["a"]), 1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.proxy.pool.connections("waf-1"), [])
        self.assertEqual(self.proxy.factory.frame_budget.total, 0)

    def test_large_ping_or_flow_control_is_skipped_and_the_connection_carries_on(self) -> None:
        # Read in 100-byte pieces under a 1000-byte budget: buffering the
        # frame would close the connection.
        size = 64 * 1024 + 1000
        for kind, body in ((MessageType.PING, b"x" * size), (MessageType.FLOW_CONTROL, b'{"action":1,"x":"%s"}' % (b"x" * size))):
            frame = encode_frame(kind, body)
            cid = f"{kind.wire_name}-answer"
            self.outcomes.watch(cid, self.connection.send_request_headers(request_headers(cid)))
            take_frames(self.transport)
            with captured_log() as events:
                for i in range(0, len(frame), 100):
                    self.protocol.dataReceived(frame[i : i + 100])
                    self.assertLessEqual(self.protocol.buffered_bytes, 5)
                self.protocol.dataReceived(answer_frame(cid))
            self.assertIsInstance(self.outcomes.value(cid), m.AgentResponse)
            self.assertEqual(take_frames(self.transport), [], "a skipped Ping is not answered")
            self.assertFalse(self.connection.is_paused, "a skipped FlowControl does nothing")
            self.assertEqual(self.proxy.factory.frame_budget.total, 0)
            [warning] = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
            self.assertEqual(
                warning,
                f"Agent waf-1 sent a {kind.wire_name} frame of {len(frame) - 4} bytes on connection "
                f"{self.connection.connection_id}, over the limit of 65536 for a {kind.wire_name} "
                "frame; skipped it",
            )
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.proxy.pool.connections("waf-1"), [self.connection])
        self.assertEqual(self.outcomes.waiting(), ["a"])
        self.protocol.dataReceived(answer_frame("a"))
        self.assertIsInstance(self.outcomes.value("a"), m.AgentResponse)

    def test_skip_warnings_are_rate_limited(self) -> None:
        with captured_log() as events:
            self.protocol.dataReceived(encode_frame(MessageType.PONG, b"x" * (64 * 1024 + 1)) * 50)
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 5)
        self.assertFalse(self.transport.disconnecting)

    def test_a_trickled_skipped_frame_closes_the_connection_after_the_deadline(self) -> None:
        frame = encode_frame(MessageType.PING, b"x" * (64 * 1024 + 1000))
        for i in range(0, 400, 100):
            self.assertFalse(self.transport.disconnecting)
            self.protocol.dataReceived(frame[i : i + 100])
            self.proxy.clock.advance(0.5)
        self.assertClosedOnce(
            "Incomplete frame: 400 bytes of a skipped Ping frame received, and the rest not within 2s"
        )

    def test_large_ping_before_registration_is_still_refused(self) -> None:
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(struct.pack(">IB", 64 * 1024 + 1, MessageType.PING))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(protocol.connection)
        self.assertEqual(protocol.buffered_bytes, 0)
        self.assertEqual(
            only_response(transport).error,
            f"Message too large: {64 * 1024 + 1} bytes (max: {64 * 1024} for a Ping frame)",
        )

    def test_no_pong_while_the_transport_buffer_is_full(self) -> None:
        ping = encode_frame(MessageType.PING, b'{"sequence":1,"timestamp_ms":1,"pad":"xxxx"}')
        self.protocol.pauseProducing()  # the transport's buffer is over its high-water mark
        self.protocol.dataReceived(ping * 100)
        self.assertEqual(take_frames(self.transport), [])
        self.protocol.resumeProducing()
        self.protocol.dataReceived(ping)
        [pong] = decoded(take_frames(self.transport), MessageType.PONG, dict)
        self.assertEqual(pong, {"sequence": 1, "timestamp_ms": 1, "pad": "xxxx"})

    def test_control_frame_limit_is_an_option(self) -> None:
        proxy = Proxy(max_control_frame_size=16)
        protocol, transport, connection = proxy.register("waf-1")
        protocol.dataReceived(encode_frame(MessageType.HEALTH_STATUS, b'{"state": 1, "x": 1}'))
        self.assertIsNone(connection.health_state)
        protocol.dataReceived(encode_frame(MessageType.HEALTH_STATUS, b'{"state": 2}'))
        self.assertEqual(connection.health_state, 2)
        self.assertFalse(transport.disconnecting)

    def test_unfinished_frame_closes_the_connection_after_the_deadline(self) -> None:
        self.protocol.dataReceived(answer_frame("a")[:20])
        self.proxy.clock.advance(2)
        self.assertClosedOnce(
            "Incomplete frame: 20 bytes of a frame received, and the rest not within 2s"
        )

    def test_frame_deadline_defaults_to_the_request_timeout(self) -> None:
        proxy = Proxy(request_timeout=7)
        protocol, transport, _ = proxy.register("waf-1")
        protocol.dataReceived(answer_frame("x")[:20])
        proxy.clock.advance(6.9)
        self.assertFalse(transport.disconnecting)
        proxy.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_connection_holding_most_is_aborted_over_the_budget(self) -> None:
        protocol2, transport2, connection2 = self.proxy.register("waf-2")
        other = self.connection.send_request_headers(request_headers("b"))
        with captured_log() as events:
            protocol2.dataReceived(answer_frame("y")[:5])
            self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, b"x" * 2000)[:996])
        self.assertFalse(transport2.disconnecting)
        self.assertTrue(self.transport.disconnected, "aborted, not closed after a flush")
        self.assertIsInstance(self.failureResultOf(other).value, ConnectionClosed)
        self.assertIn("held 1001 bytes (max: 1000)", self.outcomes.error("a").detail)  # type: ignore[attr-defined]
        self.assertEqual(self.proxy.factory.frame_budget.total, 5)
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("closing connection", formatEvent(warnings[0]))
        self.assertEqual(len(self.outcomes.results["a"]), 1)

    def test_connection_awaiting_registration_is_counted_too(self) -> None:
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(registration_frame("waf-3")[:8])
        self.assertEqual(self.proxy.factory.frame_budget.held_by(protocol), 8)
        lose(protocol)
        self.assertEqual(self.proxy.factory.frame_budget.total, 0)

    def test_lost_connection_releases_its_bytes(self) -> None:
        self.protocol.dataReceived(answer_frame("a")[:20])
        self.assertEqual(self.proxy.factory.frame_budget.total, 20)
        lose(self.protocol)
        self.assertEqual(self.proxy.factory.frame_budget.total, 0)
        self.assertEqual(self.proxy.clock.getDelayedCalls(), [])


class Reports(PoolObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, dict[str, Any]]] = []

    def metrics_reported(self, connection: Any, report: dict[str, Any]) -> None:
        self.seen.append(("metrics", connection, report))

    def config_update_requested(self, connection: Any, request: dict[str, Any]) -> None:
        self.seen.append(("config_update", connection, request))


class LargeReportTests(TestCase):
    """
    MetricsReport and ConfigUpdateRequest are accepted and surfaced
    (SPEC section 4) up to the frame limit, however large: a report of many
    counters is not an error.
    """

    def setUp(self) -> None:
        self.proxy = Proxy()
        self.protocol, self.transport, self.connection = self.proxy.register("waf-1")
        self.reports = Reports()
        self.proxy.pool.add_observer(self.reports)

    def assertSurfacedAndKept(self, kind: MessageType, body: dict[str, Any], minimum: int) -> None:
        payload = json.dumps(body).encode()
        self.assertGreater(len(payload), minimum)
        outcomes = Outcomes()
        outcomes.watch("a", self.connection.send_request_headers(request_headers("a")))
        frame = encode_frame(kind, payload)
        for i in range(0, len(frame), 16 * 1024):
            self.protocol.dataReceived(frame[i : i + 16 * 1024])
        name = "metrics" if kind == MessageType.METRICS_REPORT else "config_update"
        self.assertEqual(self.reports.seen, [(name, self.connection, body)])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(outcomes.waiting(), ["a"])
        self.protocol.dataReceived(answer_frame("a"))
        self.assertIsInstance(outcomes.value("a"), m.AgentResponse)
        self.assertEqual(self.protocol.buffered_bytes, 0)

    def test_a_180_kb_metrics_report(self) -> None:
        counters = [{"name": "rule_hits_total", "labels": {"rule": f"r{i}"}, "value": i} for i in range(2500)]
        report = {
            "agent_id": "waf-1",
            "timestamp_ms": 1767225600000,
            "interval_ms": 10000,
            "counters": counters,
            "gauges": [],
            "histograms": [],
        }
        self.assertSurfacedAndKept(MessageType.METRICS_REPORT, report, 180_000)

    def test_a_100_kb_config_update_request(self) -> None:
        request = {"request_type": {"type": "reload"}, "request_id": "x", "timestamp_ms": 1, "detail": "d" * 100_000}
        self.assertSurfacedAndKept(MessageType.CONFIG_UPDATE_REQUEST, request, 100_000)


class ClosedTests(TestCase):
    """Late events once Closed do nothing harmful."""

    def test_connection_lost_after_refusal(self) -> None:
        proxy = Proxy()
        protocol, transport = proxy.connect()
        protocol.dataReceived(encode_frame(MessageType.PING, b"{}"))
        lose(protocol)
        self.assertEqual(proxy.factory.awaiting_registration, 0)
        self.assertEqual(proxy.factory.rejections["invalid_message"], 1)

    def test_close_after_refusal_does_nothing(self) -> None:
        proxy = Proxy()
        protocol, transport = proxy.connect()
        protocol.dataReceived(encode_frame(MessageType.PING, b"{}"))
        protocol.close_connection("again")
        self.assertEqual(transport.events, ["write", "loseConnection"])

    def test_late_handshake_timeout_after_close_does_nothing(self) -> None:
        proxy = Proxy()
        protocol, transport = proxy.connect()
        protocol.dataReceived(encode_frame(MessageType.PING, b"{}"))
        take_frames(transport)
        protocol._lifecycle.handshake_timed_out()
        self.assertEqual(transport.value(), b"")

    def test_late_handshake_timeout_after_registration_does_nothing(self) -> None:
        proxy = Proxy()
        protocol, transport, connection = proxy.register()
        protocol._lifecycle.handshake_timed_out()
        self.assertFalse(transport.disconnecting)
        self.assertTrue(connection.can_accept_requests)

    def test_framing_error_after_close_does_nothing(self) -> None:
        proxy = Proxy()
        protocol, transport, connection = proxy.register()
        connection.close()
        protocol.frame_error(InvalidMessage("late"))
        self.assertEqual(transport.events.count("loseConnection"), 1)

    def test_connection_lost_after_close_releases_once(self) -> None:
        proxy = Proxy(max_connections_per_agent=1)
        protocol, _, connection = proxy.register("waf-1")
        connection.close()
        lose(protocol)
        self.assertEqual(proxy.factory.registered_connections("waf-1"), 0)
        proxy.register("waf-1")
        self.assertEqual(proxy.factory.registered_connections("waf-1"), 1)


@implementer(ISSLTransport)
class TLSTransport(RecordingTransport):
    """A transport that says it is TLS, as Twisted's TLS layer does."""


class CloseDeadlineTests(TestCase):
    """
    A connection the proxy closes is gone within C{close_grace}, whatever
    its peer does: one that reads nothing, or never completes its TLS
    handshake, cannot keep it open (and hold a file descriptor) for ever.
    """

    def test_a_refused_connection_not_gone_after_the_grace_is_aborted(self) -> None:
        proxy = Proxy(close_grace=2)
        protocol, transport = proxy.connect()
        protocol.dataReceived(encode_frame(MessageType.PING, b"{}"))
        self.assertEqual(transport.events, ["write", "loseConnection"])
        proxy.clock.advance(1.9)
        self.assertFalse(transport.disconnected)
        with captured_log() as events:
            proxy.clock.advance(0.1)
        self.assertTrue(transport.disconnected, "not aborted after the grace")
        self.assertIn("Connection from 127.0.0.1:40000 was not gone 2s after it was closed", log_text(events))
        lose(protocol)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_a_timed_out_registration_not_gone_after_the_grace_is_aborted(self) -> None:
        proxy = Proxy(handshake_timeout=1, close_grace=0.5)
        protocol, transport = proxy.connect()
        proxy.clock.advance(1)
        self.assertEqual(only_response(transport).error, "Timeout after 1s")
        self.assertFalse(transport.disconnected)
        proxy.clock.advance(0.5)
        self.assertTrue(transport.disconnected)

    def test_a_closed_registered_connection_not_gone_after_the_grace_is_aborted(self) -> None:
        proxy = Proxy()
        protocol, transport, connection = proxy.register("waf-1")
        closed = connection.close("maintenance")
        proxy.clock.advance(proxy.config.close_grace)
        self.assertTrue(transport.disconnected)
        self.assertNoResult(closed)
        lose(protocol)
        self.successResultOf(closed)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_a_connection_gone_in_time_leaves_no_timer(self) -> None:
        proxy = Proxy()
        protocol, transport = proxy.connect()
        protocol.close_connection("shutting down")
        self.assertEqual(delayed_calls(proxy.clock), CLOSE_DEADLINE)
        lose(protocol)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])
        self.assertFalse(transport.disconnected)

    def test_an_abort_needs_no_deadline(self) -> None:
        proxy = Proxy()
        _, transport, connection = proxy.register("waf-1")
        connection.close("stuck", abort=True)
        self.assertTrue(transport.disconnected)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_an_abort_of_a_closing_connection_drops_it_at_once(self) -> None:
        """
        A connection closed gracefully whose agent does not read is dropped
        as soon as an abort is asked for (shutdown asks it of a connection
        that is not read), not only at the close grace.
        """
        proxy = Proxy()
        protocol, transport, connection = proxy.register("waf-1")
        protocol.pauseProducing()
        closed = connection.close("maintenance")
        self.assertFalse(transport.disconnected)
        aborted = connection.close("shutting down", abort=True)
        self.assertTrue(transport.disconnected)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])
        lose(protocol)
        self.successResultOf(closed)
        self.successResultOf(aborted)

    def test_a_late_deadline_after_the_transport_is_gone_does_nothing(self) -> None:
        proxy = Proxy()
        protocol, transport = proxy.connect()
        protocol.close_connection("shutting down")
        lose(protocol)
        protocol._close_overdue()
        self.assertFalse(transport.disconnected)

    def tls_connect(self, proxy: Proxy) -> tuple[Any, TLSTransport]:
        protocol = proxy.factory.buildProtocol(PEER)
        assert protocol is not None
        transport = TLSTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_before_the_tls_handshake_completes_a_timeout_aborts_at_once(self) -> None:
        # Twisted's TLS layer would hold a close (with the refusal written)
        # until a TLS handshake that a silent client never completes.
        proxy = Proxy(handshake_timeout=1)
        _, transport = self.tls_connect(proxy)
        proxy.clock.advance(1)
        self.assertTrue(transport.disconnected, "not aborted")
        self.assertEqual(proxy.factory.awaiting_registration, 0)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_before_the_tls_handshake_completes_a_close_aborts_at_once(self) -> None:
        proxy = Proxy()
        protocol, transport = self.tls_connect(proxy)
        protocol.close_connection("shutting down")
        self.assertTrue(transport.disconnected)

    def test_after_the_tls_handshake_the_refusal_is_sent_and_the_close_waits(self) -> None:
        proxy = Proxy(handshake_timeout=1)
        protocol, transport = self.tls_connect(proxy)
        protocol.handshakeCompleted()
        proxy.clock.advance(1)
        self.assertEqual(only_response(transport).error, "Timeout after 1s")
        self.assertEqual(transport.events, ["write", "loseConnection"])
        self.assertFalse(transport.disconnected)
        self.assertEqual(delayed_calls(proxy.clock), CLOSE_DEADLINE)


class ConnectionIdTests(TestCase):
    def test_connection_ids_are_unique_in_the_same_millisecond(self) -> None:
        proxy = Proxy(max_connections_per_agent=200)
        self.patch(__import__("time"), "time", lambda: 1767225600.0)
        ids = {proxy.register("waf-1")[2].connection_id for _ in range(200)}
        self.assertEqual(len(ids), 200)

    def test_connection_ids_of_different_factories_differ(self) -> None:
        self.patch(__import__("time"), "time", lambda: 1767225600.0)
        first = Proxy().register("waf-1")[2].connection_id
        second = Proxy().register("waf-1")[2].connection_id
        self.assertNotEqual(first, second)

    def test_connection_id_names_the_agent(self) -> None:
        connection = Proxy().register("edge-waf")[2]
        self.assertTrue(connection.connection_id.startswith("edge-waf-"))
        self.assertEqual(json.dumps(connection.connection_id).count(" "), 0)


class PeerCredentialsTests(TestCase):
    """The pid and uid of a UNIX socket's peer (SO_PEERCRED)."""

    def test_a_unix_peer_has_pid_and_uid(self) -> None:
        import os
        import socket

        from twisted.internet.address import UNIXAddress

        from sentinel_twisted.proxy.protocol import peer_credentials

        ours, theirs = socket.socketpair(socket.AF_UNIX)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)

        class Transport:
            def getPeer(self) -> UNIXAddress:
                return UNIXAddress(None)

            def getHandle(self) -> socket.socket:
                return ours

        self.assertEqual(peer_credentials(Transport())[:2], (os.getpid(), os.getuid()))  # type: ignore[index]

    def test_a_tcp_peer_has_none(self) -> None:
        from twisted.internet.testing import StringTransport

        from sentinel_twisted.proxy.protocol import peer_credentials

        self.assertIsNone(peer_credentials(StringTransport()))


class FootprintTests(TestCase):
    """
    Idle registered connections are counted in thousands: what is the same
    for every connection of a listener lives on the factory, so that a
    protocol's instance dict stays small enough to share its keys (past a
    dozen or so it does not, and a connection costs 650 bytes more).
    """

    def test_a_registered_protocol_holds_only_what_is_its_own(self) -> None:
        proxy = Proxy()
        protocol, _, _ = proxy.register("waf-1")
        own = set(vars(protocol))
        self.assertLessEqual(len(own), 14, sorted(own))
        for shared in ("MAX_CONTROL_LENGTH", "frame_budget", "frame_clock", "frame_timeout"):
            self.assertNotIn(shared, own)
        self.assertIs(protocol.frame_budget, proxy.factory.frame_budget)
        self.assertEqual(protocol.frame_timeout, proxy.factory.config.frame_deadline)
        self.assertEqual(protocol.MAX_CONTROL_LENGTH, proxy.factory.config.max_control_frame_size)

    def test_before_registration_a_started_frame_has_no_deadline_of_its_own(self) -> None:
        proxy = Proxy()
        protocol, _ = proxy.connect()
        self.assertIsNone(protocol.frame_timeout)
        self.assertIsNone(protocol.frame_clock)
