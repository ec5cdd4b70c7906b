"""
Forward mode on the proxy side (L{sentinel_twisted.proxy.dialled}): the handshake
of a dialled connection, driven through bytes on a StringTransport and time
on a MemoryReactorClock; the frames it writes checked against the C{fwd_*}
vectors; and the redialling of L{DialledAgentService}.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sentinel_twisted import forward as f
from sentinel_twisted import messages as m
from sentinel_twisted._redial import BACKOFF_RESET_AFTER
from sentinel_twisted.errors import (
    ConnectionClosed,
    ConnectionLimitReached,
    InvalidMessage,
    RequestCancelled,
    RequestTimeout,
)
from sentinel_twisted.proxy import dialled
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.connection import AgentConnection
from sentinel_twisted.proxy.dialled import (
    DialledAgentService,
    ForwardConnectionFactory,
    ForwardConnectionProtocol,
    default_retry_policy,
    encoding_list,
    parse_agent_endpoint,
)
from sentinel_twisted.proxy.pool import AgentPool
from sentinel_twisted.wire import MessageType, encode_frame

from ._proxy_support import (
    CLOSE_DEADLINE,
    answer_frame,
    captured_log,
    delayed_calls,
    log_text,
    request_headers,
    take_frames,
)
from .test_forward import REFERENCE_CAPABILITIES, vector_payload
from .vectors import by_name, same_json


class Outcomes:
    """How one Deferred ended: C{value}, C{failure}, or not C{done} yet."""

    def __init__(self, deferred: Deferred[Any]) -> None:
        self.results: list[Any] = []
        deferred.addBoth(self.results.append)

    @property
    def done(self) -> bool:
        return bool(self.results)

    @property
    def value(self) -> Any:
        [result] = self.results
        assert not isinstance(result, Failure), result
        return result

    @property
    def failure(self) -> Failure:
        [result] = self.results
        assert isinstance(result, Failure), f"did not fail: {result!r}"
        return result


def handshake_response(**fields: Any) -> bytes:
    values: dict[str, Any] = {
        "protocol_version": 2,
        "capabilities": REFERENCE_CAPABILITIES,
        "success": True,
        "error": None,
        "encoding": "json",
    }
    values.update(fields)
    return encode_frame(MessageType.HANDSHAKE_RESPONSE, m.encode(values))


class Dialler:
    """A factory on a memory clock, and dialled connections to feed."""

    def __init__(self, agent_id: str | None = None, **options: Any) -> None:
        self.clock = MemoryReactorClock()
        self.pool = AgentPool()
        config = options.pop("config", None) or ReverseConnectionConfig(proxy_id="zentinel-proxy")
        self.factory = ForwardConnectionFactory(
            self.pool,
            description="unix:/run/agents/waf.sock",
            agent_id=agent_id,
            config=config,
            clock=self.clock,
            proxy_version="0.6.20",
            **options,
        )

    def connect(self) -> tuple[ForwardConnectionProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def handshake(self, encoding: str = "json") -> tuple[ForwardConnectionProtocol, StringTransport, AgentConnection]:
        protocol, transport = self.connect()
        transport.clear()
        name = "fwd_handshake_response_msgpack" if encoding == "msgpack" else "fwd_handshake_response"
        protocol.dataReceived(encode_frame(MessageType.HANDSHAKE_RESPONSE, vector_payload(name)))
        assert protocol.connection is not None, self.factory.failures
        return protocol, transport, protocol.connection


def lose(protocol: Any) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


class PendingCountsTests(SynchronousTestCase):
    def test_the_connections_of_every_dialler_of_a_pool_count_together(self) -> None:
        # The reads of dialled connections weigh the requests waiting on all
        # of the pool's connections, whichever dialler (slot) made them.
        dialler = Dialler()
        other = ForwardConnectionFactory(
            dialler.pool, description="unix:/run/agents/bot.sock", clock=dialler.clock
        )
        _, _, one = dialler.handshake()
        protocol = other.buildProtocol(None)  # type: ignore[arg-type]
        protocol.makeConnection(StringTransport())
        response = vector_payload("fwd_handshake_response")
        protocol.dataReceived(encode_frame(MessageType.HANDSHAKE_RESPONSE, response))
        two = protocol.connection
        assert two is not None
        for connection, cid in ((one, "a"), (two, "b"), (two, "c")):
            connection.send_request_headers(request_headers(cid)).addErrback(lambda f: None)
        self.assertEqual(dialler.pool.pending_counts, [3, 3])


class HandshakeRequestTests(SynchronousTestCase):
    """What the proxy sends first."""

    def test_json_offer_is_the_reference_bytes(self) -> None:
        dialler = Dialler(encodings=("json",))
        _, transport = dialler.connect()
        self.assertEqual(
            take_frames(transport),
            [(MessageType.HANDSHAKE_REQUEST, vector_payload("fwd_handshake_request"))],
        )

    def test_messagepack_offer_is_the_reference_bytes(self) -> None:
        dialler = Dialler()
        _, transport = dialler.connect()
        self.assertEqual(
            take_frames(transport),
            [(MessageType.HANDSHAKE_REQUEST, vector_payload("fwd_handshake_request_msgpack"))],
        )

    def test_defaults_offer_messagepack_then_json(self) -> None:
        factory = ForwardConnectionFactory(AgentPool(), description="x", clock=MemoryReactorClock())
        request = json.loads(factory.handshake_request)
        self.assertEqual(request["supported_encodings"], ["msgpack", "json"])
        self.assertEqual(request["supported_versions"], [2])
        self.assertEqual(request["proxy_id"], "sentinel-proxy")
        self.assertIsNone(request["config"])

    def test_unknown_encoding_is_refused_at_construction(self) -> None:
        self.assertRaises(ValueError, Dialler, encodings=("cbor",))
        self.assertRaises(ValueError, Dialler, encodings=())

    def test_connecting_starts_the_handshake_timer(self) -> None:
        dialler = Dialler()
        dialler.connect()
        [timer] = dialler.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 10.0)


class HandshakeAcceptedTests(SynchronousTestCase):
    def test_json_connection_joins_the_pool_under_the_announced_id(self) -> None:
        dialler = Dialler()
        _, transport, connection = dialler.handshake("json")
        self.assertEqual(dialler.pool.connections("waf-1"), [connection])
        self.assertEqual((connection.mode, connection.encoding), ("forward", "json"))
        self.assertEqual(connection.capabilities, REFERENCE_CAPABILITIES)
        self.assertEqual(dialler.clock.getDelayedCalls(), [])
        self.assertFalse(transport.disconnecting)
        info = connection.info()
        self.assertEqual((info.mode, info.encoding), ("forward", "json"))

    def test_messagepack_connection(self) -> None:
        dialler = Dialler()
        _, _, connection = dialler.handshake("msgpack")
        self.assertEqual(connection.encoding, "msgpack")

    def test_configured_id_wins(self) -> None:
        dialler = Dialler(agent_id="waf")
        _, _, connection = dialler.handshake()
        self.assertEqual(connection.agent_id, "waf")
        self.assertEqual(dialler.pool.agent_ids(), ["waf"])
        self.assertTrue(connection.connection_id.startswith("waf-"))

    def test_handshake_split_across_reads(self) -> None:
        dialler = Dialler()
        protocol, _ = dialler.connect()
        frame = encode_frame(MessageType.HANDSHAKE_RESPONSE, vector_payload("fwd_handshake_response"))
        for i in range(len(frame)):
            protocol.dataReceived(frame[i : i + 1])
        self.assertIsNotNone(protocol.connection)

    def test_a_handshake_resets_the_failed_attempts_only_once_the_connection_stayed_up(self) -> None:
        dialler = Dialler()
        for _ in range(5):
            dialler.factory.retry_delay(1)
        dialler.handshake()
        self.assertEqual(dialler.factory.failed_attempts, 5)
        dialler.clock.advance(BACKOFF_RESET_AFTER - 0.5)
        self.assertEqual(dialler.factory.failed_attempts, 5)
        dialler.clock.advance(0.5)
        self.assertEqual(dialler.factory.failed_attempts, 0)

    def test_answer_in_the_same_read_as_the_handshake(self) -> None:
        dialler = Dialler()
        protocol, _ = dialler.connect()
        frame = encode_frame(MessageType.HANDSHAKE_RESPONSE, vector_payload("fwd_handshake_response"))
        protocol.dataReceived(frame + encode_frame(MessageType.HEALTH_STATUS, b'{"state":2}'))
        assert protocol.connection is not None
        self.assertEqual(protocol.connection.health_state, 2)


class WrongFrameAfterTheHandshakeTests(SynchronousTestCase):
    def test_a_second_handshake_response_is_named_as_such(self) -> None:
        """
        In forward mode the HandshakeResponse is the agent's own frame: a
        second one is out of place, not from the wrong side.
        """
        dialler = Dialler(agent_id="waf")
        protocol, transport, connection = dialler.handshake()
        with captured_log() as events:
            protocol.dataReceived(handshake_response())
        text = log_text(events)
        self.assertIn(
            f"Agent waf sent a second handshake frame (HandshakeResponse) on connection "
            f"{connection.connection_id}, after the handshake; ignored",
            text,
        )
        self.assertNotIn("which only the proxy sends", text)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(dialler.pool), 1)

    def test_an_event_frame_still_names_the_proxy(self) -> None:
        dialler = Dialler(agent_id="waf")
        protocol, _, connection = dialler.handshake()
        with captured_log() as events:
            protocol.dataReceived(encode_frame(MessageType.HANDSHAKE_REQUEST, b"{}"))
            protocol.dataReceived(encode_frame(MessageType.REQUEST_HEADERS, b"{}"))
        text = log_text(events)
        self.assertIn("sent a second handshake frame (HandshakeRequest)", text)
        self.assertIn(
            f"Agent waf sent a RequestHeaders frame on connection {connection.connection_id}, "
            "which only the proxy sends; ignored",
            text,
        )


class HandshakeRejectedTests(SynchronousTestCase):
    """Every refusal: logged with the reason, connection closed, nothing in the pool."""

    def refused(self, data: bytes, reason: str, text: str, **options: Any) -> Dialler:
        dialler = Dialler(**options)
        protocol, transport = dialler.connect()
        with captured_log() as events:
            protocol.dataReceived(data)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(protocol.connection)
        self.assertEqual(len(dialler.pool), 0)
        self.assertEqual(dialler.factory.failures, {reason: 1})
        self.assertIn(text, log_text(events))
        self.assertEqual(delayed_calls(dialler.clock), CLOSE_DEADLINE)
        # Whatever follows is not read.
        protocol.dataReceived(handshake_response())
        self.assertIsNone(protocol.connection)
        lose(protocol)
        self.assertEqual(dialler.factory.failures, {reason: 1})
        self.assertEqual(dialler.clock.getDelayedCalls(), [])
        return dialler

    def test_success_false(self) -> None:
        self.refused(
            handshake_response(success=False, error="msgpack not offered"),
            "refused",
            "Agent refused the handshake: msgpack not offered",
        )

    def test_wrong_protocol_version(self) -> None:
        self.refused(handshake_response(protocol_version=3), "version", "expected 2, got 3")

    def test_encoding_not_offered(self) -> None:
        self.refused(
            handshake_response(encoding="msgpack"),
            "invalid_message",
            "Agent chose payload encoding 'msgpack', which was not offered (offered: json)",
            encodings=("json",),
        )

    def test_unknown_encoding(self) -> None:
        self.refused(handshake_response(encoding="cbor"), "invalid_message", "'cbor', which was not offered")

    def test_wrong_first_frame(self) -> None:
        self.refused(answer_frame("x"), "invalid_message", "Expected HandshakeResponse, got AgentResponse")

    def test_malformed_json(self) -> None:
        self.refused(
            encode_frame(MessageType.HANDSHAKE_RESPONSE, b"{not json"), "invalid_message", "Invalid HandshakeResponse"
        )

    def test_missing_capabilities(self) -> None:
        payload = b'{"protocol_version":2,"success":true,"error":null,"encoding":"json"}'
        self.refused(
            encode_frame(MessageType.HANDSHAKE_RESPONSE, payload), "invalid_message", "capabilities"
        )

    def test_oversize_frame_is_refused_before_it_is_buffered(self) -> None:
        self.refused(struct.pack(">I", 64 * 1024 + 1) + b"\x02", "frame_too_large", "65537")

    def test_empty_announced_id(self) -> None:
        capabilities = msgspec.structs.replace(REFERENCE_CAPABILITIES, agent_id="")
        self.refused(handshake_response(capabilities=capabilities), "invalid_message", "Agent ID cannot be empty")

    def test_announced_id_with_a_control_character(self) -> None:
        capabilities = msgspec.structs.replace(REFERENCE_CAPABILITIES, agent_id="waf\n1")
        self.refused(handshake_response(capabilities=capabilities), "invalid_message", "U+000A")

    def test_per_agent_cap(self) -> None:
        dialler = Dialler(config=ReverseConnectionConfig(max_connections_per_agent=1))
        dialler.handshake()
        protocol, transport = dialler.connect()
        protocol.dataReceived(handshake_response())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(dialler.pool), 1)
        self.assertEqual(dialler.factory.failures, {"connection_limit": 1})

    def test_timeout(self) -> None:
        dialler = Dialler()
        protocol, transport = dialler.connect()
        dialler.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        with captured_log() as events:
            dialler.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(dialler.factory.failures, {"handshake_timeout": 1})
        self.assertIn("Forward handshake with agent at unix:/run/agents/waf.sock failed", log_text(events))

    def test_agent_closes_before_answering(self) -> None:
        dialler = Dialler()
        protocol, _ = dialler.connect()
        lose(protocol)
        self.assertEqual(dialler.factory.failures, {"invalid_message": 1})
        self.assertEqual(dialler.clock.getDelayedCalls(), [])


class JsonConnectionTests(SynchronousTestCase):
    """After a JSON handshake: the reverse mode's bytes."""

    def test_event_is_the_reference_bytes(self) -> None:
        dialler = Dialler()
        protocol, transport, connection = dialler.handshake("json")
        event = m.decode(vector_payload("fwd_evt_request_headers"), m.RequestHeadersEvent)
        outcomes = Outcomes(connection.send_event(event))
        [(kind, payload)] = take_frames(transport)
        self.assertEqual(kind, MessageType.REQUEST_HEADERS)
        # The same JSON as the reverse mode's, whose keys are in declaration
        # order where the reference's serde_json sorts them.
        self.assertEqual(*same_json(payload, by_name("fwd_evt_request_headers")))
        self.assertEqual(payload, m.encode_event(event, "req-7f3a"))
        protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, vector_payload("fwd_resp_allow")))
        self.assertTrue(outcomes.value.is_allow)


class MessagePackConnectionTests(SynchronousTestCase):
    """After a MessagePack handshake: the reference's layout, without its bugs."""

    def setUp(self) -> None:
        self.dialler = Dialler()
        self.protocol, self.transport, self.connection = self.dialler.handshake("msgpack")

    def sent(self, event: Any) -> tuple[Outcomes, bytes]:
        outcomes = Outcomes(self.connection.send_event(event))
        [(kind, payload)] = take_frames(self.transport)
        self.assertEqual(kind, event.message_type)
        return outcomes, payload

    def test_request_headers_are_the_reference_bytes(self) -> None:
        payload = vector_payload("fwd_evt_request_headers_msgpack")
        event = f.MSGPACK_CODEC.decode_event(payload, m.RequestHeadersEvent)
        outcomes, written = self.sent(event)
        self.assertEqual(written, payload)
        self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, vector_payload("fwd_resp_allow_msgpack")))
        self.assertTrue(outcomes.value.is_allow)
        self.assertEqual(outcomes.value.audit.custom, {"correlation_id": "req-7f3a"})

    def test_body_chunk_sends_the_key_once(self) -> None:
        """The reference's bytes, less its second correlation_id key."""
        payload = vector_payload("fwd_evt_request_body_chunk_msgpack")
        key = b"\xaecorrelation_id\xa8req-7f3a"
        self.assertEqual(payload[:1], b"\x87")
        expected = b"\x86" + payload[1:].replace(key + key, key)
        event = f.MSGPACK_CODEC.decode_event(payload, m.RequestBodyChunkEvent)
        _, written = self.sent(event)
        self.assertEqual(written, expected)

    def test_request_headers_without_traceparent_carry_twelve_metadata_elements(self) -> None:
        """The reference's bytes, with the 12th (null) element it leaves out."""
        payload = vector_payload("fwd_evt_request_headers_minimal_metadata_msgpack")
        stamp = b"\xb42026-01-01T00:00:00Z"
        expected = payload.replace(b"\xa8metadata\x9b", b"\xa8metadata\x9c").replace(stamp, stamp + b"\xc0")
        event = f.MSGPACK_CODEC.decode_event(payload, m.RequestHeadersEvent)
        _, written = self.sent(event)
        self.assertEqual(written, expected)
        self.assertEqual(len(msgspec.msgpack.decode(written)["metadata"]), 12)

    def test_cancel_stays_json(self) -> None:
        event = f.MSGPACK_CODEC.decode_event(vector_payload("fwd_evt_request_headers_msgpack"), m.RequestHeadersEvent)
        outcomes, _ = self.sent(event)
        self.connection.cancel_request("req-7f3a", m.CancelReason.CLIENT_DISCONNECT)
        [(kind, payload)] = take_frames(self.transport)
        self.assertEqual(kind, MessageType.CANCEL)
        expected = json.loads(vector_payload("fwd_ctl_cancel_msgpack"))
        written = json.loads(payload)
        self.assertEqual(list(written), list(expected))
        self.assertEqual(
            {k: v for k, v in written.items() if k != "timestamp_ms"},
            {k: v for k, v in expected.items() if k != "timestamp_ms"},
        )
        self.assertIsInstance(outcomes.failure.value, RequestCancelled)

    def test_ping_stays_json_and_a_json_pong_is_read(self) -> None:
        waiting = Outcomes(self.connection.ping())
        [(kind, payload)] = take_frames(self.transport)
        self.assertEqual(kind, MessageType.PING)
        self.assertEqual(json.loads(payload)["sequence"], 0)
        self.protocol.dataReceived(encode_frame(MessageType.PONG, payload))
        self.assertEqual(waiting.value, 0.0)

    def test_uncorrelated_answer_is_dropped_and_the_request_times_out(self) -> None:
        event = f.MSGPACK_CODEC.decode_event(vector_payload("fwd_evt_request_headers_msgpack"), m.RequestHeadersEvent)
        outcomes, _ = self.sent(event)
        self.protocol.dataReceived(
            encode_frame(MessageType.AGENT_RESPONSE, vector_payload("fwd_resp_allow_uncorrelated_msgpack"))
        )
        self.assertFalse(outcomes.done)
        self.dialler.clock.advance(30)
        self.assertIsInstance(outcomes.failure.value, RequestTimeout)

    def test_flow_control_and_health_are_messagepack_maps(self) -> None:
        self.protocol.dataReceived(encode_frame(MessageType.FLOW_CONTROL, msgspec.msgpack.encode({"action": 1})))
        self.assertTrue(self.connection.is_paused)
        self.protocol.dataReceived(encode_frame(MessageType.HEALTH_STATUS, msgspec.msgpack.encode({"state": 3})))
        self.assertEqual(self.connection.health_state, 3)

    def test_a_large_metrics_report_is_surfaced_and_a_large_flow_control_skipped(self) -> None:
        from sentinel_twisted.proxy.pool import PoolObserver

        reports: list[dict[str, Any]] = []

        class Reports(PoolObserver):
            def metrics_reported(self, connection: AgentConnection, report: dict[str, Any]) -> None:
                reports.append(report)

        self.dialler.pool.add_observer(Reports())
        event = f.MSGPACK_CODEC.decode_event(vector_payload("fwd_evt_request_headers_msgpack"), m.RequestHeadersEvent)
        outcomes, _ = self.sent(event)
        report = {"agent_id": "waf", "counters": [{"name": "hits", "labels": {"rule": f"r{i}"}, "value": i} for i in range(5000)]}
        metrics = encode_frame(MessageType.METRICS_REPORT, msgspec.msgpack.encode(report))
        pause = encode_frame(MessageType.FLOW_CONTROL, msgspec.msgpack.encode({"action": 1, "x": "x" * 70_000}))
        self.assertGreater(len(metrics), 180_000)
        for i in range(0, len(metrics), 4096):
            self.protocol.dataReceived(metrics[i : i + 4096])
        with captured_log() as events:
            for i in range(0, len(pause), 4096):
                self.protocol.dataReceived(pause[i : i + 4096])
                self.assertLessEqual(self.protocol.buffered_bytes, 5)
        self.assertEqual(reports, [report])
        self.assertFalse(self.connection.is_paused)
        self.assertIn(f"sent a FlowControl frame of {len(pause) - 4} bytes", log_text(events))
        self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, vector_payload("fwd_resp_allow_msgpack")))
        self.assertFalse(self.transport.disconnecting)
        self.assertTrue(outcomes.value.is_allow)

    def test_a_json_answer_on_a_messagepack_connection_is_invalid(self) -> None:
        outcomes = Outcomes(self.connection.send_event(request_headers("req-1")))
        with captured_log() as events:
            self.protocol.dataReceived(answer_frame("req-1"))
        self.assertIn("invalid AgentResponse", log_text(events))
        # Its correlation id could still be read: the request fails now.
        self.assertIsInstance(outcomes.failure.value, InvalidMessage)

    def test_an_invalid_answer_naming_a_waiting_request_fails_it_at_once(self) -> None:
        """
        As on a JSON connection: an answer that cannot be read as an
        AgentResponse, but whose correlation id can, fails that request now
        with the reason, in the reference's positional layout and as a map;
        the other requests wait for their answers, and the connection stays.
        """
        first = Outcomes(self.connection.send_event(request_headers("req-1")))
        second = Outcomes(self.connection.send_event(request_headers("req-2")))
        third = Outcomes(self.connection.send_event(request_headers("req-3")))
        audit = [[], [], None, [], {"correlation_id": "req-1"}]
        positional = msgspec.msgpack.encode([2, 5, [], [], {}, audit, False, None, None, None])
        as_map = {"version": "two", "decision": "allow", "audit": {"custom": {"correlation_id": "req-2"}}}
        with captured_log() as events:
            self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, positional))
            self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, msgspec.msgpack.encode(as_map)))
        self.assertIsInstance(first.failure.value, InvalidMessage)
        self.assertIn("unknown decision 5", str(first.failure.value))
        self.assertIsInstance(second.failure.value, InvalidMessage)
        self.assertIn("Expected `int`, got `str` - at `$.version`", str(second.failure.value))
        self.assertIn("answered 'req-1' on connection", log_text(events))
        self.assertFalse(third.done)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.connection.in_flight, 1)

    def test_an_answer_of_too_many_values_fails_its_request_at_once(self) -> None:
        """
        MessagePack takes a byte per empty list: 16 MiB of them decoded to
        more than 1 GiB.  Counted first, such an answer is refused undecoded,
        and the request it names fails now, in either layout.
        """
        first = Outcomes(self.connection.send_event(request_headers("req-1")))
        second = Outcomes(self.connection.send_event(request_headers("req-2")))
        third = Outcomes(self.connection.send_event(request_headers("req-3")))
        junk = [[] for _ in range(m.MAX_ANSWER_VALUES)]
        audit = [[], [], None, [], {"junk": junk, "correlation_id": "req-1"}]
        positional = msgspec.msgpack.encode([2, "allow", [], [], {}, audit, False, None, None, None])
        as_map = {"version": 2, "decision": "allow", "audit": {"custom": {"correlation_id": "req-2", "junk": junk}}}
        self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, positional))
        self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, msgspec.msgpack.encode(as_map)))
        for outcome in (first, second):
            self.assertIsInstance(outcome.failure.value, InvalidMessage)
            self.assertIn("holds more than 100,000 values", str(outcome.failure.value))
        self.assertFalse(third.done)
        self.assertFalse(self.transport.disconnecting)

    def test_an_answer_naming_nobody_is_logged_and_ignored(self) -> None:
        """
        As on a JSON connection: bytes nobody can tell the request of are
        logged, and the request ends by its answer or its timeout.
        """
        outcomes = Outcomes(self.connection.send_event(request_headers("req-1")))
        for garbage in (b"\xc1", b"\x91" * 5000, msgspec.msgpack.encode([2, "allow"])[:-1]):
            with captured_log() as events:
                self.protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, garbage))
            self.assertIn("sent an invalid AgentResponse", log_text(events))
        self.assertFalse(outcomes.done)
        self.assertFalse(self.transport.disconnecting)
        self.dialler.clock.advance(30)
        self.assertIsInstance(outcomes.failure.value, RequestTimeout)


class ClosingTests(SynchronousTestCase):
    def test_lost_connection_fails_waiting_requests_and_leaves_the_pool(self) -> None:
        dialler = Dialler()
        protocol, _, connection = dialler.handshake()
        outcomes = Outcomes(connection.send_event(request_headers()))
        lose(protocol)
        self.assertIsInstance(outcomes.failure.value, ConnectionClosed)
        self.assertEqual(len(dialler.pool), 0)
        self.assertIsNone(dialler.factory.connection)

    def test_close_from_the_proxy(self) -> None:
        dialler = Dialler()
        protocol, transport, connection = dialler.handshake()
        closed = Outcomes(connection.close("enough"))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(closed.done)
        lose(protocol)
        self.assertTrue(closed.done)
        self.assertEqual(len(dialler.pool), 0)

    def test_close_before_the_handshake(self) -> None:
        dialler = Dialler()
        protocol, transport = dialler.connect()
        protocol.close_connection("stopping")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(delayed_calls(dialler.clock), CLOSE_DEADLINE)
        lose(protocol)
        self.assertEqual(dialler.clock.getDelayedCalls(), [])


@implementer(ISSLTransport)
class TLSTransport(StringTransport):
    """A transport that says it is TLS, as Twisted's TLS layer does."""


class TLSHandshakeOrderTests(SynchronousTestCase):
    """
    Over TLS the HandshakeRequest waits for the TLS handshake and the check
    of the agent's certificate (Twisted's TLS layer would send it as soon as
    its own handshake is done, whatever the certificate names); over a
    plain socket it goes at once.
    """

    def connect(self, problem: str | None) -> tuple[Dialler, ForwardConnectionProtocol, StringTransport]:
        checked: list[Any] = []

        def identity_error(transport: Any, role: str) -> str | None:
            checked.append((transport, role))
            return problem

        self.patch(dialled, "server_identity_error", identity_error)
        self.checked = checked
        dialler = Dialler()
        protocol = dialler.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = TLSTransport()
        protocol.makeConnection(transport)
        return dialler, protocol, transport

    def test_nothing_is_written_before_the_tls_handshake_completes(self) -> None:
        dialler, protocol, transport = self.connect(None)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.checked, [])
        protocol.handshakeCompleted()
        self.assertEqual(self.checked, [(transport, "agent")])
        self.assertEqual(take_frames(transport), [(MessageType.HANDSHAKE_REQUEST, dialler.factory.handshake_request)])
        protocol.dataReceived(handshake_response())
        self.assertIsNotNone(protocol.connection)

    def test_an_agent_certificate_that_fails_the_check_gets_nothing_and_is_aborted(self) -> None:
        dialler, protocol, transport = self.connect("the agent's certificate has no subjectAltName")
        with captured_log() as events:
            protocol.handshakeCompleted()
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected, "not aborted")
        self.assertEqual(dialler.factory.failures, {"tls": 1})
        self.assertEqual(dialler.pool.dial_failures, {"tls": 1})
        self.assertIn("failed (tls): the agent's certificate has no subjectAltName", log_text(events))
        lose(protocol)
        self.assertEqual(dialler.factory.failures, {"tls": 1})
        self.assertEqual(len(dialler.pool), 0)
        self.assertEqual(dialler.clock.getDelayedCalls(), [])

    def test_a_tls_failure_that_ends_the_connection_is_a_tls_failure(self) -> None:
        from OpenSSL import SSL

        dialler, protocol, transport = self.connect(None)
        with captured_log() as events:
            protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
        self.assertEqual(dialler.factory.failures, {"tls": 1})
        self.assertIn("failed (tls): TLS handshake failed: certificate verify failed", log_text(events))


class CloseDeadlineTests(SynchronousTestCase):
    """
    A dialled connection the proxy closes is gone within C{close_grace}:
    an agent that stalls its TLS handshake (or stops reading) cannot keep
    it open, and its slot is redialled.
    """

    def test_a_refused_handshake_not_gone_after_the_grace_is_aborted(self) -> None:
        dialler = Dialler(config=ReverseConnectionConfig(close_grace=1))
        protocol, transport = dialler.connect()
        protocol.dataReceived(handshake_response(success=False))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        dialler.clock.advance(1)
        self.assertTrue(transport.disconnected, "not aborted after the grace")
        lose(protocol)
        self.assertEqual(dialler.clock.getDelayedCalls(), [])

    def test_a_stalled_tls_handshake_is_aborted_at_the_handshake_timeout(self) -> None:
        # The HandshakeRequest waits for the TLS handshake; Twisted's TLS
        # layer would hold a close until that handshake completes.
        dialler = Dialler(config=ReverseConnectionConfig(handshake_timeout=2))
        protocol = dialler.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = TLSTransport()
        protocol.makeConnection(transport)
        dialler.clock.advance(2)
        self.assertTrue(transport.disconnected, "not aborted")
        self.assertEqual(dialler.factory.failures, {"handshake_timeout": 1})
        self.assertEqual(dialler.clock.getDelayedCalls(), [])

    def test_after_the_tls_handshake_a_close_waits_for_the_grace(self) -> None:
        # The agent's certificate names the host dialled.
        self.patch(dialled, "server_identity_error", lambda transport, role: None)
        dialler = Dialler()
        protocol = dialler.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = TLSTransport()
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()
        protocol.close_connection("stopping")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.assertEqual(delayed_calls(dialler.clock), CLOSE_DEADLINE)


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects a factory's protocols to StringTransports, or refuses."""

    def __init__(self) -> None:
        self.refuse = False
        self.attempts = 0
        self.connected: list[tuple[Any, StringTransport]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connected.append((protocol, transport))
        return succeed(protocol)


class DialledAgentServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.pool = AgentPool()
        self.endpoint = MemoryEndpoint()

    def service(self, connections: int = 1, **options: Any) -> DialledAgentService:
        service = DialledAgentService(
            self.endpoint,
            self.pool,
            description="unix:/run/agents/waf.sock",
            connections=connections,
            clock=self.clock,
            **{"retry_policy": lambda attempt: float(2**attempt), **options},
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def answer(self, index: int = -1, data: bytes | None = None) -> None:
        protocol, _ = self.endpoint.connected[index]
        protocol.dataReceived(
            data if data is not None else encode_frame(MessageType.HANDSHAKE_RESPONSE, vector_payload("fwd_handshake_response"))
        )

    def test_keeps_n_connections(self) -> None:
        service = self.service(connections=3, agent_id="waf")
        self.assertEqual(self.endpoint.attempts, 3)
        for i in range(3):
            self.answer(i)
        self.assertEqual(len(self.pool.connections("waf")), 3)
        self.assertEqual(len(service.connections()), 3)

    def test_more_connections_than_the_cap_is_refused(self) -> None:
        self.assertRaises(ValueError, self.service, connections=5)
        self.assertRaises(ValueError, self.service, connections=0)

    def test_refused_connects_back_off(self) -> None:
        self.endpoint.refuse = True
        self.service()
        delays = []
        for _ in range(4):
            [call] = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [2.0, 4.0, 8.0, 16.0])
        self.assertEqual(self.endpoint.attempts, 5)

    def test_retry_log_lines_name_the_endpoint(self) -> None:
        self.endpoint.refuse = True
        with captured_log() as events:
            self.service(agent_id="waf")
        self.assertIn(
            "Dialling agent waf at unix:/run/agents/waf.sock (connection 1): retry 1 in 2.00s",
            log_text(events),
        )

    def test_refused_handshakes_back_off_too(self) -> None:
        """
        A connect that succeeds does not reset the backoff; nor does a
        handshake whose connection is lost at once.
        """
        self.service()
        delays = []
        for _ in range(3):
            protocol, transport = self.endpoint.connected[-1]
            self.answer(data=handshake_response(success=False, error="no"))
            self.assertTrue(transport.disconnecting)
            lose(protocol)
            [call] = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [2.0, 4.0, 8.0])
        self.answer()
        self.assertEqual(len(self.pool), 1)
        protocol, _ = self.endpoint.connected[-1]
        lose(protocol)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 16.0)
        self.assertEqual(len(self.pool), 0)

    def delay_after_loss(self, up: float = 0.0) -> float:
        """Answer the handshake, keep the connection up C{up} seconds, lose it: the delay before the redial."""
        self.answer()
        self.assertEqual(len(self.pool), 1)
        self.clock.advance(up)
        lose(self.endpoint.connected[-1][0])
        [call] = self.clock.getDelayedCalls()
        delay = call.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        return delay

    def test_an_agent_that_answers_and_drops_is_redialled_with_growing_delays(self) -> None:
        """
        A handshake alone does not reset the backoff: an agent that accepts,
        answers and closes every connection is dialled less and less often.
        """
        self.service()
        delays = [self.delay_after_loss() for _ in range(4)]
        self.assertEqual(delays, [2.0, 4.0, 8.0, 16.0])
        self.assertEqual(self.endpoint.attempts, 5)

    def test_a_connection_lost_before_the_minimum_time_up_counts_as_a_failure(self) -> None:
        self.service()
        self.assertEqual(self.delay_after_loss(), 2.0)
        self.assertEqual(self.delay_after_loss(up=BACKOFF_RESET_AFTER - 0.1), 4.0)

    def test_a_connection_that_stayed_up_resets_the_backoff(self) -> None:
        self.endpoint.refuse = True
        self.service()
        for _ in range(3):
            [call] = self.clock.getDelayedCalls()
            self.clock.advance(call.getTime() - self.clock.seconds())
        self.endpoint.refuse = False
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 16.0)
        self.clock.advance(16.0)
        self.assertEqual(self.delay_after_loss(up=BACKOFF_RESET_AFTER), 2.0)
        self.assertEqual(self.delay_after_loss(), 4.0)

    def test_the_minimum_time_up_is_a_setting(self) -> None:
        self.service(backoff_reset_after=1.0)
        self.assertEqual(self.delay_after_loss(), 2.0)
        self.assertEqual(self.delay_after_loss(up=1.0), 2.0)

    def test_twisteds_retry_line_is_silenced_and_ours_has_the_real_count(self) -> None:
        """
        ClientService counts from the last connect, so its line said
        "retry 1" for every redial of an agent that answers and drops, with
        a 16-digit delay; ours counts the attempts in a row and rounds.
        """
        with captured_log() as events:
            self.service(agent_id="waf", retry_policy=lambda attempt: 2**attempt / 3)
            for _ in range(3):
                self.delay_after_loss()
        text = log_text(events)
        self.assertNotIn("Scheduling retry", text)
        for line in (
            "Dialling agent waf at unix:/run/agents/waf.sock (connection 1): retry 1 in 0.67s",
            "Dialling agent waf at unix:/run/agents/waf.sock (connection 1): retry 2 in 1.33s",
            "Dialling agent waf at unix:/run/agents/waf.sock (connection 1): retry 3 in 2.67s",
        ):
            self.assertIn(line, text)

    def test_the_lines_of_a_flapping_agent_are_rate_limited_per_slot(self) -> None:
        """
        However short the delays (a retry policy of 0.1 s here), each
        slot's dialled, disconnected and retry lines come a few per period,
        then one line with the count of the rest; another slot's are
        counted apart.
        """
        with captured_log() as events:
            self.service(connections=2, agent_id="waf", retry_policy=lambda attempt: 0.1)
            for _ in range(20):
                self.answer(-2)
                self.answer(-1)
                lose(self.endpoint.connected[-2][0])
                lose(self.endpoint.connected[-1][0])
                self.clock.advance(0.1)
            self.assertEqual(self.endpoint.attempts, 42)
            # The periods end (and before the last two handshakes time out).
            self.clock.advance(9)
        lines = [formatEvent(e) or "" for e in events]
        for needle in (" dialled at ", " disconnected: ", ": retry "):
            matching = [line for line in lines if needle in line]
            # 5 per slot as they come, then 1 per slot with the count of the rest.
            self.assertEqual(len(matching), 12, (needle, matching))
            self.assertEqual(len([line for line in matching if "and 14 more like it in the last 10 s" in line]), 2)

    def test_redials_after_the_agent_goes_away(self) -> None:
        self.service()
        self.answer()
        first = self.pool.connections()[0]
        lose(self.endpoint.connected[-1][0])
        self.assertEqual(len(self.pool), 0)
        self.clock.advance(2.0)
        self.assertEqual(self.endpoint.attempts, 2)
        self.answer()
        [second] = self.pool.connections()
        self.assertIsNot(first, second)

    def test_stop_closes_and_stops_redialling(self) -> None:
        service = self.service()
        self.answer()
        protocol, transport = self.endpoint.connected[-1]
        stopped = Outcomes(service.stopService())
        self.assertTrue(transport.disconnecting)
        lose(protocol)
        self.assertTrue(stopped.done)
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.endpoint.attempts, 1)

    def test_stop_gives_requests_the_grace_then_cancels(self) -> None:
        service = self.service(grace=1.0)
        self.answer()
        protocol, transport = self.endpoint.connected[-1]
        [connection] = self.pool.connections()
        answered = Outcomes(connection.send_event(request_headers("a")))
        late = Outcomes(connection.send_event(request_headers("b")))
        transport.clear()
        stopped = Outcomes(service.stopService())
        protocol.dataReceived(answer_frame("a"))
        self.assertTrue(answered.value.is_allow)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)
        self.assertIsInstance(late.failure.value, RequestCancelled)
        [(kind, payload)] = take_frames(transport)
        self.assertEqual(kind, MessageType.CANCEL)
        self.assertEqual(json.loads(payload)["reason"], m.CancelReason.PROXY_SHUTDOWN)
        self.assertTrue(transport.disconnecting)
        lose(protocol)
        self.assertTrue(stopped.done)

    def test_connect_agent_starts_a_service(self) -> None:
        service = self.pool.connect_agent(self.endpoint, "waf", 2, clock=self.clock, encodings=("json",))
        self.addCleanup(lambda: service.running and service.stopService())
        self.assertTrue(service.running)
        self.assertEqual(self.endpoint.attempts, 2)
        [(kind, payload)] = take_frames(self.endpoint.connected[0][1])
        self.assertEqual(json.loads(payload)["supported_encodings"], ["json"])
        self.answer(0)
        self.assertEqual(self.pool.agent_ids(), ["waf"])

    def test_connect_agent_parses_endpoint_strings(self) -> None:
        service = self.pool.connect_agent("unix:/nonexistent/agent.sock", clock=self.clock)
        self.assertTrue(service.running)
        service.stopService()
        self.assertRaises(ValueError, self.pool.connect_agent, "unix:/x", clock=self.clock, encodings=("cbor",))


class RetryPolicyTests(SynchronousTestCase):
    def test_doubles_from_half_a_second_to_thirty_with_a_quarter_of_jitter(self) -> None:
        policy = default_retry_policy()
        for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (50, 30.0)):
            for _ in range(20):
                delay = policy(attempt)
                self.assertGreaterEqual(delay, base)
                self.assertLessEqual(delay, base * 1.25)


class CommandLineValueTests(SynchronousTestCase):
    def test_agent_endpoint(self) -> None:
        self.assertEqual(parse_agent_endpoint("waf=unix:/run/a.sock"), ("waf", "unix:/run/a.sock"))
        self.assertEqual(parse_agent_endpoint("w=tls:h:7000"), ("w", "tls:h:7000"))
        for bad in ("waf", "=unix:/a", "waf=/run/a.sock", "waf=udp:1", "w\x00=unix:/a"):
            self.assertRaises(ValueError, parse_agent_endpoint, bad)

    def test_encoding_list(self) -> None:
        self.assertEqual(encoding_list("json"), ("json",))
        self.assertEqual(encoding_list(" msgpack , json"), ("msgpack", "json"))
        self.assertRaises(ValueError, encoding_list, "")
        self.assertRaises(ValueError, encoding_list, "json,cbor")


class StatusTests(SynchronousTestCase):
    def test_agents_document_shows_mode_and_encoding(self) -> None:
        from sentinel_twisted.status.resource import agents_document

        dialler = Dialler()
        dialler.handshake("msgpack")
        [agent] = agents_document(dialler.pool)["agents"]
        [connection] = agent["connections"]
        self.assertEqual((connection["mode"], connection["encoding"]), ("forward", "msgpack"))


class MessagePackFastPathTests(SynchronousTestCase):
    """The proxy's MessagePack shortcuts write and read what the general layout does."""

    codec = f.MSGPACK_CODEC

    def test_request_headers_are_the_layout_of_a_map_with_a_metadata_array(self) -> None:
        for traceparent in (msgspec.UNSET, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"):
            event = request_headers("req-1")
            event.metadata.traceparent = traceparent
            event.metadata.server_name = "example.com"
            metadata = [getattr(event.metadata, name) for name in m.RequestMetadata.__struct_fields__]
            metadata[0] = "other"
            metadata[-1] = None if traceparent is msgspec.UNSET else traceparent
            expected = msgspec.msgpack.encode(
                {"correlation_id": "other", "metadata": metadata, "method": "GET", "uri": "/items",
                 "headers": {"host": ["example.com"]}}
            )  # fmt: skip
            self.assertEqual(self.codec.encode_event(event, "other"), expected)

    def test_answers_read_alike_on_both_paths(self) -> None:
        answers = [
            m.AgentResponse(),
            m.AgentResponse(
                audit=m.AuditMetadata(tags=["a"], rule_ids=["r1"], confidence=0.5, reason_codes=["x"], custom={"k": [1]}),
                routing_metadata={"pool": "b"},
                needs_more=True,
            ),
            m.AgentResponse(decision=m.Block(status=403, body="no")),
            m.AgentResponse(request_headers=[m.SetHeader(name="x-a", value="1")]),
            m.AgentResponse(request_body_mutation=m.BodyMutation(data="", chunk_index=2)),
        ]
        for answer in answers:
            with self.subTest(answer=answer):
                self.assertEqual(self.codec.decode_response(self.codec.encode_response(answer)), answer)

    def test_a_malformed_allow_is_still_refused(self) -> None:
        for payload in (
            msgspec.msgpack.encode([2, "allow", [], [], {"a": 1}, [[], [], None, [], {}], False, None, None, None]),
            msgspec.msgpack.encode([2, "allow", [], [], {}, [[], [], "high", [], {}], False, None, None, None]),
            msgspec.msgpack.encode(["2", "allow", [], [], {}, [[], [], None, [], {}], False, None, None, None]),
        ):
            self.assertRaises(InvalidMessage, self.codec.decode_response, payload)

    def test_a_map_key_that_cannot_be_hashed_is_an_invalid_message(self) -> None:
        # An extension value as a map key: some msgspec releases raise a
        # TypeError for it rather than a DecodeError; either way the peer's.
        unhashable_key = b"\x81\xd4\x00\x00\x00"
        self.assertIsNone(self.codec.answer_correlation_id(unhashable_key))
        self.assertRaises(InvalidMessage, self.codec.decode_response, unhashable_key)
        self.assertRaises(InvalidMessage, self.codec.decode_control, unhashable_key, m.FlowControlMessage)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=64))
    def test_any_bytes_name_a_correlation_id_or_none(self, payload: bytes) -> None:
        """Looking for the id of a broken answer never raises, whatever the bytes."""
        for codec in (f.MSGPACK_CODEC, f.JSON_CODEC):
            found = codec.answer_correlation_id(payload)
            self.assertTrue(found is None or isinstance(found, str))


class SharedCapTests(SynchronousTestCase):
    def test_dialled_connections_count_against_a_registering_agent(self) -> None:
        from sentinel_twisted.proxy.factory import ReverseConnectionFactory

        from ._proxy_support import registration_payload

        dialler = Dialler(agent_id="waf-1", config=ReverseConnectionConfig(max_connections_per_agent=2))
        factory = ReverseConnectionFactory(
            ReverseConnectionConfig(max_connections_per_agent=2), dialler.pool, clock=dialler.clock
        )
        request = m.decode(registration_payload("waf-1"), m.RegistrationRequest)
        dialler.handshake()
        self.assertIsNone(factory.admit(request))
        refusal = factory.admit(m.decode(registration_payload("waf-1"), m.RegistrationRequest))
        self.assertEqual(str(refusal), str(ConnectionLimitReached("waf-1", 2)))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4),
    max_leaves=20,
)
_FIELDS = st.sampled_from(["protocol_version", "capabilities", "success", "error", "encoding", "agent_id", "x"])


class MalformedHandshakeProperties(SynchronousTestCase):
    """Whatever the agent answers, the connection joins the pool or is closed: never a hang, never a crash."""

    def check(self, data: bytes) -> None:
        dialler = Dialler()
        protocol, transport = dialler.connect()
        protocol.dataReceived(data)
        if protocol.connection is None:
            dialler.clock.advance(10)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(len(dialler.pool), 0)
            self.assertEqual(sum(dialler.factory.failures.values()), 1)
        else:
            self.assertEqual(dialler.pool.connections(), [protocol.connection])

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, data: bytes) -> None:
        self.check(data)

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.dictionaries(_FIELDS, _JSON, max_size=6))
    def test_any_json_object(self, fields: dict[str, Any]) -> None:
        self.check(encode_frame(MessageType.HANDSHAKE_RESPONSE, json.dumps(fields).encode()))

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.sampled_from(["protocol_version", "success", "error", "encoding"]), _JSON)
    def test_one_field_changed(self, name: str, value: Any) -> None:
        valid = json.loads(vector_payload("fwd_handshake_response_msgpack"))
        valid[name] = value
        self.check(encode_frame(MessageType.HANDSHAKE_RESPONSE, json.dumps(valid).encode()))


class MetricsTests(SynchronousTestCase):
    def test_dial_handshakes_and_failures_are_counted(self) -> None:
        from sentinel_twisted.status.metrics import GatewayMetrics

        dialler = Dialler()
        metrics = GatewayMetrics(dialler.pool, clock=dialler.clock)
        dialler.handshake()
        protocol, _ = dialler.connect()
        protocol.dataReceived(handshake_response(success=False, error="no"))
        dialler.connect()
        dialler.clock.advance(10)
        sample = metrics.registry.get_sample_value
        self.assertEqual(sample("sentinel_agent_dial_handshakes_total", {}), 1)
        self.assertEqual(sample("sentinel_agent_dial_failures_total", {"reason": "refused"}), 1)
        self.assertEqual(sample("sentinel_agent_dial_failures_total", {"reason": "handshake_timeout"}), 1)


class ConnectionAttributesTests(SynchronousTestCase):
    def test_a_reverse_connection_carries_no_codec_attributes_of_its_own(self) -> None:
        """Registered connections are many: the forward-mode defaults live on the class."""
        from ._proxy_support import Proxy

        _, _, connection = Proxy().register()
        self.assertEqual((connection.mode, connection.encoding), ("reverse", "json"))
        self.assertFalse({"mode", "encoding", "_decode_control"} & set(vars(connection)))
        self.assertIs(connection._encode_event, m.encode_event)
        self.assertIs(connection._decode_answer, m.decode_agent_response)
