"""
The agent in forward mode: the proxy connects and sends the handshake.

Frames come from the C{fwd_*} vectors (the reference proxy's own bytes)
where one exists; answers are compared with the reference agent's bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent import Agent, allow
from sentinel_twisted.agent.errors import HandshakeFailed
from sentinel_twisted.agent.forward import (
    MAX_HANDSHAKE_SIZE,
    ForwardAgentFactory,
    ForwardAgentProtocol,
)
from sentinel_twisted.agent.protocol import AgentSettings

from ..vectors import by_name, frame_bytes
from ._support import (
    AGENT_RESPONSE,
    CANCEL,
    FLOW_CONTROL,
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    HEALTH_STATUS,
    PING,
    PONG,
    REQUEST_HEADERS,
    RecordingAgent,
    frame,
    headers_event,
)


def raw_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    offset = 0
    while len(data) - offset >= 5:
        (length,) = struct.unpack_from("!I", data, offset)
        frames.append((data[offset + 4], data[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return frames


def vector_payload(name: str) -> bytes:
    return frame_bytes(by_name(name))[5:]


def handshake(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "supported_versions": [2],
        "proxy_id": "zentinel-proxy",
        "proxy_version": "0.6.20",
        "config": None,
        "supported_encodings": ["json"],
    }
    request.update(overrides)
    return request


class Connection:
    """One forward connection over a StringTransport, with a Clock."""

    def __init__(
        self, agent: Any = None, settings: dict[str, Any] | None = None, **factory_options: Any
    ) -> None:
        self.agent = agent if agent is not None else Agent()
        self.clock = Clock()
        self.settings = AgentSettings(agent=self.agent, agent_id="waf-1", health_interval=0, **(settings or {}))
        self.factory = ForwardAgentFactory(self.settings, self.clock, **factory_options)
        self.refused: list[Any] = []
        self.factory.registration_refused = lambda protocol, error: self.refused.append(error)  # type: ignore[method-assign]
        self.protocol: ForwardAgentProtocol = self.factory.buildProtocol(UNIXAddress(None))
        self.transport = StringTransport(peerAddress=UNIXAddress(None))
        self.protocol.makeConnection(self.transport)
        self._read = 0

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> list[tuple[int, bytes]]:
        data = self.transport.value()
        frames = raw_frames(data[self._read :])
        self._read = len(data)
        return frames

    def shake(self, request: Any = None) -> dict[str, Any]:
        """Send a handshake; returns the HandshakeResponse, parsed."""
        if request is None:
            self.feed(frame_bytes(by_name("fwd_handshake_request")))
        elif isinstance(request, bytes):
            self.feed(request)
        else:
            self.feed(frame(HANDSHAKE_REQUEST, request))
        frames = [f for f in self.sent() if f[0] == HANDSHAKE_RESPONSE]
        assert len(frames) == 1, frames
        result: dict[str, Any] = json.loads(frames[0][1])
        return result

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def pending_calls(self) -> list[str]:
        """The names of the functions the clock has yet to call."""
        return [getattr(call.func, "__name__", repr(call.func)) for call in self.clock.getDelayedCalls()]

    def lose(self) -> None:
        self.transport.disconnecting = True
        self.protocol.connectionLost(Failure(ConnectionDone()))


class HandshakeTests(SynchronousTestCase):
    def test_json_handshake(self) -> None:
        c = Connection()
        response = c.shake()
        self.assertEqual(
            response,
            {
                "protocol_version": 2,
                "capabilities": json.loads(msgspec.json.encode(c.agent.capabilities("waf-1"))),
                "success": True,
                "error": None,
                "encoding": "json",
            },
        )
        self.assertEqual(list(response), ["protocol_version", "capabilities", "success", "error", "encoding"])
        self.assertTrue(c.protocol.registered)
        self.assertEqual(c.protocol.proxy_id, "zentinel-proxy")
        self.assertEqual(c.protocol.encoding, "json")
        self.assertEqual(c.factory.serving, [c.protocol])
        self.assertFalse(c.closed)

    def test_messagepack_offer(self) -> None:
        c = Connection()
        response = c.shake(frame_bytes(by_name("fwd_handshake_request_msgpack")))
        self.assertEqual(response["encoding"], "msgpack")
        self.assertEqual(c.protocol.codec.name, "msgpack")

    def test_json_only_agent_answers_json_to_a_messagepack_offer(self) -> None:
        c = Connection(encodings=("json",))
        response = c.shake(frame_bytes(by_name("fwd_handshake_request_msgpack")))
        self.assertEqual(response["encoding"], "json")

    def test_first_known_encoding_wins(self) -> None:
        for offer, chosen in (
            (["json", "msgpack"], "json"),
            (["cbor", "msgpack"], "msgpack"),
            (["cbor"], "json"),
            ([], "json"),
        ):
            self.assertEqual(Connection().shake(handshake(supported_encodings=offer))["encoding"], chosen)

    def test_missing_config_and_encodings(self) -> None:
        c = Connection()
        response = c.shake({"supported_versions": [2], "proxy_id": "p", "proxy_version": "1"})
        self.assertTrue(response["success"])
        self.assertEqual(response["encoding"], "json")

    def test_connection_ids_are_distinct(self) -> None:
        factory = ForwardAgentFactory(AgentSettings(agent=Agent(), agent_id="a"), Clock())
        ids = {factory.buildProtocol(UNIXAddress(None)).connection_id for _ in range(3)}
        self.assertEqual(ids, {"a-fwd-1", "a-fwd-2", "a-fwd-3"})


class WrongFrameAfterTheHandshakeTests(SynchronousTestCase):
    def test_a_second_handshake_request_is_named_as_such(self) -> None:
        """
        In forward mode the HandshakeRequest is the proxy's own frame: a
        second one is out of place, not from the wrong side.
        """
        from .._proxy_support import captured_log, log_text

        c = Connection()
        c.shake()
        with captured_log() as events:
            c.feed(frame_bytes(by_name("fwd_handshake_request")))
            c.feed(frame(AGENT_RESPONSE, {}))
        text = log_text(events)
        self.assertIn(
            "Proxy zentinel-proxy sent a second handshake frame (HandshakeRequest) on connection "
            "waf-1-fwd-1, after the handshake; ignored",
            text,
        )
        self.assertNotIn("HandshakeRequest frame on connection waf-1-fwd-1, which only agents send", text)
        self.assertIn(
            "Proxy zentinel-proxy sent an AgentResponse frame on connection waf-1-fwd-1, which only agents send; ignored",
            text,
        )
        self.assertFalse(c.closed)


class RejectionTests(SynchronousTestCase):
    def assert_closed_without_answer(self, c: Connection, reason: str) -> None:
        self.assertTrue(c.closed)
        self.assertEqual(c.sent(), [])
        [error] = c.refused
        self.assertIsInstance(error, HandshakeFailed)
        self.assertIn(reason, str(error))
        self.assertFalse(c.protocol.registered)

    def test_unsupported_version_is_answered_and_closed(self) -> None:
        c = Connection()
        response = c.shake(handshake(supported_versions=[7]))
        self.assertFalse(response["success"])
        self.assertEqual(response["error"], "Protocol version mismatch: expected 2, got [7]")
        self.assertTrue(c.closed)
        self.assertFalse(c.protocol.registered)
        self.assertIn("Protocol version mismatch", str(c.refused[0]))

    def test_a_long_version_list_is_summarised_in_the_answer_and_the_log(self) -> None:
        """
        supported_versions has no length limit of its own: 20,000 entries
        made a 60,000-character answer and log line.  The answer quotes the
        first few and the count; the log line is bounded and escaped.
        """
        from twisted.logger import formatEvent

        from .._proxy_support import captured_log

        factory = ForwardAgentFactory(AgentSettings(agent=Agent(), agent_id="waf-1"), Clock())
        protocol = factory.buildProtocol(UNIXAddress(None))
        transport = StringTransport(peerAddress=UNIXAddress(None))
        protocol.makeConnection(transport)
        with captured_log() as events:
            protocol.dataReceived(frame(HANDSHAKE_REQUEST, handshake(supported_versions=[1] * 20_000)))
        [(kind, payload)] = raw_frames(transport.value())
        self.assertEqual(kind, HANDSHAKE_RESPONSE)
        expected = "Protocol version mismatch: expected 2, got [1, 1, 1, 1, 1, 1, 1, 1, ... (20,000 versions)]"
        self.assertEqual(json.loads(payload)["error"], expected)
        self.assertTrue(transport.disconnecting)
        [line] = [formatEvent(e) or "" for e in events if "closed" in (formatEvent(e) or "")]
        self.assertEqual(line, f"Agent waf-1: forward connection waf-1-fwd-1 closed: Handshake failed: {expected}")

    def test_a_short_version_list_is_quoted_whole(self) -> None:
        c = Connection()
        response = c.shake(handshake(supported_versions=[1, 3, 4, 5, 6, 7, 8, 9]))
        self.assertEqual(
            response["error"], "Protocol version mismatch: expected 2, got [1, 3, 4, 5, 6, 7, 8, 9]"
        )
        c = Connection()
        response = c.shake(handshake(supported_versions=[1, 3, 4, 5, 6, 7, 8, 9, 10]))
        self.assertEqual(
            response["error"], "Protocol version mismatch: expected 2, got [1, 3, 4, 5, 6, 7, 8, 9, ... (9 versions)]"
        )

    def test_an_event_first_closes(self) -> None:
        c = Connection()
        c.feed(frame(REQUEST_HEADERS, headers_event("r1")))
        self.assert_closed_without_answer(c, "expected HandshakeRequest, got RequestHeaders")

    def test_a_registration_request_closes(self) -> None:
        """A reverse agent's RegistrationRequest has the same type byte; it is not a handshake."""
        c = Connection()
        c.feed(frame_bytes(by_name("reg_request_minimal")))
        self.assert_closed_without_answer(c, "malformed HandshakeRequest")

    def test_malformed_json_closes(self) -> None:
        for payload in (b"", b"{", b"[]", b"\xff", json.dumps(handshake(proxy_id=5)).encode()):
            c = Connection()
            c.feed(frame(HANDSHAKE_REQUEST, payload))
            self.assert_closed_without_answer(c, "malformed HandshakeRequest")

    def test_missing_field_closes(self) -> None:
        for field in ("supported_versions", "proxy_id", "proxy_version"):
            request = handshake()
            del request[field]
            c = Connection()
            c.feed(frame(HANDSHAKE_REQUEST, request))
            self.assert_closed_without_answer(c, f"`{field}`")

    def test_no_handshake_in_time_closes(self) -> None:
        c = Connection(handshake_timeout=5)
        c.clock.advance(4.9)
        self.assertFalse(c.closed)
        c.clock.advance(0.1)
        self.assert_closed_without_answer(c, "no HandshakeRequest within 5s")

    def test_a_partial_handshake_times_out_too(self) -> None:
        c = Connection()
        c.feed(frame(HANDSHAKE_REQUEST, handshake())[:-3])
        c.clock.advance(10)
        self.assert_closed_without_answer(c, "no HandshakeRequest within 10s")

    def test_the_timer_stops_after_the_handshake(self) -> None:
        c = Connection()
        c.shake()
        c.clock.advance(60)
        self.assertFalse(c.closed)
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_oversize_handshake_closes_before_buffering(self) -> None:
        c = Connection()
        c.feed(struct.pack("!IB", MAX_HANDSHAKE_SIZE + 1, HANDSHAKE_REQUEST) + b"{" * 100)
        self.assertEqual(c.protocol.buffered_bytes, 0)
        self.assert_closed_without_answer(c, "Message too large")

    def test_the_limit_is_lifted_after_the_handshake(self) -> None:
        c = Connection(max_handshake_size=200)
        c.shake()
        big = headers_event("big", headers={"x": ["a" * 1000]})
        c.feed(frame(REQUEST_HEADERS, big))
        [(kind, payload)] = c.sent()
        self.assertEqual(kind, AGENT_RESPONSE)

    def test_a_large_event_in_the_same_read_as_the_handshake(self) -> None:
        """The limit is lifted for the frames that follow the handshake in the same read."""
        c = Connection(max_handshake_size=200)
        big = headers_event("big", headers={"x": ["a" * 1000]})
        c.feed(frame(HANDSHAKE_REQUEST, handshake()) + frame(REQUEST_HEADERS, big))
        self.assertFalse(c.closed)
        self.assertEqual([kind for kind, _ in c.sent()], [HANDSHAKE_RESPONSE, HEALTH_STATUS, AGENT_RESPONSE])

    def test_closed_before_the_handshake(self) -> None:
        c = Connection()
        c.lose()
        [error] = c.refused
        self.assertIn("before the handshake", str(error))
        self.assertEqual(c.factory.connections, set())
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_capabilities_that_cannot_be_built(self) -> None:
        class Broken(Agent):
            def capabilities(self, agent_id: str) -> Any:
                raise RuntimeError("nope")

        c = Connection(Broken())
        self.assertTrue(c.closed)
        self.assertIn("cannot build the agent's capabilities", str(c.refused[0]))
        self.flushLoggedErrors(RuntimeError)

    def test_bad_factory_options(self) -> None:
        settings = AgentSettings(agent=Agent(), agent_id="a")
        self.assertRaises(ValueError, ForwardAgentFactory, settings, Clock(), handshake_timeout=0)
        self.assertRaises(ValueError, ForwardAgentFactory, settings, Clock(), encodings=("cbor",))


class JsonServingTests(SynchronousTestCase):
    def test_answer_is_the_reference_bytes(self) -> None:
        c = Connection()
        c.shake()
        c.feed(frame_bytes(by_name("fwd_evt_request_headers")))
        self.assertEqual(c.sent(), [(AGENT_RESPONSE, vector_payload("fwd_resp_allow"))])

    def test_ping_and_health(self) -> None:
        c = Connection()
        c.shake()
        ping = b'{"sequence":7,"timestamp_ms":1}'
        c.feed(frame(PING, ping))
        self.assertEqual(c.sent(), [(PONG, ping)])
        c.protocol.send_health()
        self.assertEqual(c.sent(), [(HEALTH_STATUS, b'{"state":1}')])


class MessagePackServingTests(SynchronousTestCase):
    def connect(self, agent: Any = None) -> Connection:
        c = Connection(agent)
        c.shake(frame_bytes(by_name("fwd_handshake_request_msgpack")))
        return c

    def test_request_headers_answer_is_the_reference_bytes(self) -> None:
        c = self.connect()
        c.feed(frame_bytes(by_name("fwd_evt_request_headers_msgpack")))
        self.assertEqual(c.sent(), [(AGENT_RESPONSE, vector_payload("fwd_resp_allow_msgpack"))])

    def test_the_reference_proxys_broken_events_are_answered(self) -> None:
        """Duplicated correlation_id and 11-element metadata: answered, correlated."""
        seen: list[Any] = []

        class Recording(Agent):
            def on_request_headers(self, event: Any) -> Any:
                seen.append(event)
                return allow()

            def on_request_body_chunk(self, event: Any) -> Any:
                seen.append(event)
                return allow()

        c = self.connect(Recording())
        c.feed(frame_bytes(by_name("fwd_evt_request_body_chunk_msgpack")))
        c.feed(frame_bytes(by_name("fwd_evt_request_headers_minimal_metadata_msgpack")))
        frames = c.sent()
        self.assertEqual(frames, [(AGENT_RESPONSE, vector_payload("fwd_resp_allow_msgpack"))] * 2)
        self.assertEqual(seen[0].body, b'{"name":"widget"}')
        self.assertEqual(seen[1].uri, "/login")
        self.assertEqual(c.protocol.stats["invalid_events"], 0)

    def test_a_json_cancel_cancels(self) -> None:
        agent = RecordingAgent()
        c = self.connect(agent)
        c.feed(frame_bytes(by_name("fwd_evt_request_headers_msgpack")))
        self.assertEqual(list(agent.waiting), ["req-7f3a"])
        c.feed(frame_bytes(by_name("fwd_ctl_cancel_msgpack")))
        self.assertEqual(agent.cancelled, ["req-7f3a"])
        self.assertEqual(c.sent(), [])

    def test_ping_is_echoed(self) -> None:
        c = self.connect()
        ping = b'{"sequence":1,"timestamp_ms":2}'
        c.feed(frame(PING, ping))
        self.assertEqual(c.sent(), [(PONG, ping)])

    def test_control_messages_are_messagepack(self) -> None:
        agent = RecordingAgent()
        agent.max_concurrency = 1
        c = self.connect(agent)
        c.protocol.send_health()
        c.feed(frame_bytes(by_name("fwd_evt_request_headers_msgpack")))
        frames = c.sent()
        self.assertEqual(
            [(kind, msgspec.msgpack.decode(body)) for kind, body in frames],
            [(HEALTH_STATUS, {"state": 1}), (FLOW_CONTROL, {"action": 1})],
        )

    def test_an_undecodable_event_with_an_id_gets_the_error_decision(self) -> None:
        c = self.connect()
        event = msgspec.msgpack.decode(vector_payload("fwd_evt_request_headers_msgpack"))
        event["metadata"][3] = "not a port"
        c.feed(frame(REQUEST_HEADERS, msgspec.msgpack.encode(event)))
        [(kind, body)] = c.sent()
        answer = msgspec.msgpack.decode(body)
        self.assertEqual(answer[1], {"block": [500, "agent error", None]})
        self.assertEqual(answer[5][4], {"correlation_id": "req-7f3a"})

    def test_cancel_for_unknown_id_and_garbage_cancel_are_ignored(self) -> None:
        c = self.connect()
        c.feed(frame(CANCEL, msgspec.msgpack.encode({"correlation_id": "x", "reason": 0, "timestamp_ms": 1})))
        c.feed(frame(CANCEL, b"\xc1"))
        self.assertEqual(c.sent(), [])
        self.assertFalse(c.closed)


class DrainTests(SynchronousTestCase):
    def test_drain_closes_every_connection(self) -> None:
        agent = RecordingAgent()
        a, b = Connection(agent), Connection(agent)
        factory = a.factory
        # Both connections in one factory: the second joins the first's.
        factory.connections.add(b.protocol)
        b.protocol.when_lost().addCallback(lambda _: factory.connections.discard(b.protocol))
        a.shake()
        a.feed(frame(REQUEST_HEADERS, headers_event("r1")))
        done = factory.drain(5)
        self.assertNoResult(done)
        self.assertTrue(b.closed)  # still handshaking: closed at once
        b.lose()
        agent.answer("r1")
        self.assertTrue(a.closed)
        a.lose()
        self.successResultOf(done)
        self.assertEqual(factory.connections, set())


SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
handshakes = st.fixed_dictionaries(
    {},
    optional={
        "supported_versions": st.one_of(st.lists(st.integers(-1, 2**33), max_size=3), json_values),
        "proxy_id": st.one_of(st.text(max_size=5), json_values),
        "proxy_version": st.one_of(st.text(max_size=5), json_values),
        "config": json_values,
        "supported_encodings": st.one_of(
            st.lists(st.sampled_from(["json", "msgpack", "cbor", ""]), max_size=3), json_values
        ),
    },
)


class MalformedHandshakeProperties(SynchronousTestCase):
    def check(self, c: Connection) -> None:
        frames = c.sent()
        if c.protocol.registered:
            # The answer, then the first HealthStatus.
            [(kind, body), (health, _)] = frames
            self.assertEqual((kind, health), (HANDSHAKE_RESPONSE, HEALTH_STATUS))
            response = json.loads(body)
            self.assertTrue(response["success"])
            self.assertFalse(c.closed)
        else:
            self.assertTrue(c.closed)
            self.assertEqual(len(c.refused), 1)
            if frames:
                [(kind, body)] = frames
                self.assertEqual(kind, HANDSHAKE_RESPONSE)
                self.assertFalse(json.loads(body)["success"])
            # Only the deadline of the close waits, until the transport goes.
            self.assertEqual(c.pending_calls(), ["_close_overdue"])
            c.lose()
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_a_valid_handshake_passes_the_check(self) -> None:
        c = Connection()
        c.feed(frame(HANDSHAKE_REQUEST, {"supported_versions": [2], "proxy_id": "", "proxy_version": ""}))
        self.check(c)
        self.assertTrue(c.protocol.registered)

    @SETTINGS
    @given(handshakes)
    def test_any_json_handshake(self, request: dict[str, Any]) -> None:
        c = Connection()
        c.feed(frame(HANDSHAKE_REQUEST, request))
        self.check(c)

    @SETTINGS
    @given(st.sampled_from([1, 2, 0x10, 0x11, 0x20, 0x33, 0x40, 0x41]), st.binary(max_size=64))
    def test_any_first_frame(self, message_type: int, payload: bytes) -> None:
        c = Connection()
        c.feed(frame(message_type, payload))
        self.check(c)

    @SETTINGS
    @given(st.binary(min_size=5, max_size=200), st.integers(1, 20))
    def test_any_bytes_in_any_pieces(self, data: bytes, step: int) -> None:
        c = Connection()
        for i in range(0, len(data), step):
            c.feed(data[i : i + step])
        if not c.protocol.registered and not c.closed:
            c.clock.advance(10)
        self.assertTrue(c.protocol.registered or c.closed)
        if not c.protocol.registered:
            self.assertEqual(c.pending_calls(), ["_close_overdue"])
            c.lose()
            self.assertEqual(c.clock.getDelayedCalls(), [])




class ForwardLogRateLimitTests(SynchronousTestCase):
    def test_connections_share_the_listeners_limiter(self) -> None:
        factory = ForwardAgentFactory(AgentSettings(agent=Agent(), agent_id="a"), Clock())
        one = factory.buildProtocol(UNIXAddress(None))
        two = factory.buildProtocol(UNIXAddress(None))
        self.assertIs(one.log_limiter, factory.log_limiter)
        self.assertIs(two.log_limiter, factory.log_limiter)
        self.assertIs(factory.log_limiter.clock, factory.clock)

    def test_failed_handshakes_are_rate_limited(self) -> None:
        from twisted.logger import LogLevel

        from .._proxy_support import captured_log

        clock = Clock()
        factory = ForwardAgentFactory(AgentSettings(agent=Agent(), agent_id="a"), clock)
        with captured_log() as events:
            for _ in range(100):
                protocol = factory.buildProtocol(UNIXAddress(None))
                protocol.makeConnection(StringTransport(peerAddress=UNIXAddress(None)))
                protocol.dataReceived(b"\x00\x00\x00\x02\x01{")
        warnings = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), factory.log_limiter.burst)


class ForwardFrameDeadlineTests(SynchronousTestCase):
    """
    Past the handshake, a frame the proxy starts must be complete within
    C{frame_timeout} of its start, as on a reverse connection: whatever
    dials a listening agent cannot hold a connection and its buffer by
    stopping mid-frame or trickling one.  Before, the handshake timeout
    bounds everything.
    """

    def serving(self, frame_timeout: float = 5.0, **options: Any) -> Connection:
        c = Connection(RecordingAgent(), settings={"frame_timeout": frame_timeout}, **options)
        c.shake()
        return c

    def seen(self, c: Connection) -> list[str]:
        return [e.metadata.correlation_id for e in c.agent.seen]

    def test_a_trickled_frame_closes_the_connection_at_the_deadline(self) -> None:
        from twisted.logger import formatEvent

        from .._proxy_support import captured_log

        c = self.serving()
        c.feed(frame(REQUEST_HEADERS, headers_event("waiting")))
        trickled = frame(REQUEST_HEADERS, headers_event("trickled"))
        ended: list[str] = []
        c.protocol.when_lost().addCallback(lambda _: ended.append("lost"))
        with captured_log() as events:
            for i in range(10):
                self.assertFalse(c.closed, f"closed after {i} bytes")
                c.feed(trickled[i : i + 1])
                c.clock.advance(0.5)
            self.assertTrue(c.closed)
            self.assertEqual(c.agent.cancelled, ["waiting"])
            self.assertEqual(c.protocol.buffered_bytes, 0)
            c.lose()
        self.assertEqual(ended, ["lost"])
        self.assertEqual(c.factory.connections, set())
        lines = [formatEvent(e) for e in events]
        self.assertIn(
            "Agent waf-1 closing connection waf-1-fwd-1 with proxy zentinel-proxy: a frame was not "
            "complete in time (10 bytes of a frame received, and the rest not within 5s)",
            lines,
        )
        self.assertIn(
            "Agent waf-1 connection waf-1-fwd-1 ended: protocol error from proxy: Incomplete frame: "
            "10 bytes of a frame received, and the rest not within 5s",
            lines,
        )
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_a_frame_completed_in_time_is_served_and_the_next_has_its_own_time(self) -> None:
        c = self.serving()
        first = frame(REQUEST_HEADERS, headers_event("first"))
        second = frame(REQUEST_HEADERS, headers_event("second"))
        c.feed(first[:20])
        c.clock.advance(4.9)
        c.feed(first[20:] + second[:20])
        c.clock.advance(4.9)
        self.assertFalse(c.closed)
        c.feed(second[20:])
        c.clock.advance(60)
        self.assertFalse(c.closed)
        self.assertEqual(self.seen(c), ["first", "second"])
        c.feed(first[:20])
        c.clock.advance(5)
        self.assertTrue(c.closed)

    def test_a_large_frame_arriving_steadily_within_the_deadline_is_served(self) -> None:
        big = frame(REQUEST_HEADERS, headers_event("big", headers={"x-big": ["a" * (1024 * 1024)]}))
        c = self.serving()
        for i in range(0, len(big), 64 * 1024):
            c.feed(big[i : i + 64 * 1024])
            c.clock.advance(0.25)  # 17 pieces: 4.25 s
        self.assertFalse(c.closed)
        self.assertEqual(self.seen(c), ["big"])
        c = self.serving()
        for i in range(0, len(big), 64 * 1024):
            if c.closed:
                break
            c.feed(big[i : i + 64 * 1024])
            c.clock.advance(0.5)  # half the rate: the whole frame would take 8.5 s
        self.assertTrue(c.closed)
        self.assertEqual(self.seen(c), [])

    def test_before_the_handshake_the_handshake_timeout_bounds_a_frame(self) -> None:
        c = Connection(settings={"frame_timeout": 1}, handshake_timeout=10)
        c.feed(frame_bytes(by_name("fwd_handshake_request"))[:20])
        c.clock.advance(9.9)
        self.assertFalse(c.closed)
        c.clock.advance(0.1)
        self.assertTrue(c.closed)
        self.assertIn("no HandshakeRequest within 10s", str(c.refused[0]))

    def test_the_warnings_of_many_connections_are_rate_limited(self) -> None:
        from twisted.logger import LogLevel

        from .._proxy_support import captured_log

        clock = Clock()
        settings = AgentSettings(agent=Agent(), agent_id="a", health_interval=0, frame_timeout=5)
        factory = ForwardAgentFactory(settings, clock)
        transports = []
        with captured_log() as events:
            for _ in range(50):
                protocol = factory.buildProtocol(UNIXAddress(None))
                transport = StringTransport(peerAddress=UNIXAddress(None))
                transports.append(transport)
                protocol.makeConnection(transport)
                protocol.dataReceived(frame(HANDSHAKE_REQUEST, handshake()) + b"\x00\x00\x01")
            clock.advance(5)
        self.assertTrue(all(t.disconnecting for t in transports))
        warnings = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), factory.log_limiter.burst)

    def test_the_listener_passes_the_deadline_to_its_connections(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from sentinel_twisted.agent.forward import AgentListener

        listener = AgentListener(Agent(), "tcp:0", "waf-1", reactor=MemoryReactorClock(), frame_timeout=2.5)
        self.assertEqual(listener.settings.frame_timeout, 2.5)
        self.assertIs(listener.factory.settings, listener.settings)
