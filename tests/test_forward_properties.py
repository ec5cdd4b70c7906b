"""
Forward mode under hostile peers, as properties: an agent that answers the
proxy's dial with anything (L{sentinel_twisted.proxy.dialled}), a proxy
that dials our listening agent with anything
(L{sentinel_twisted.agent.forward}), and the payload codecs' round trips
(L{sentinel_twisted.forward}) against the C{fwd_*} vectors.  Everything
runs in memory: StringTransports and a MemoryReactorClock.
"""

from __future__ import annotations

import gc
import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sentinel_twisted import forward as f
from sentinel_twisted import messages as m
from sentinel_twisted.agent import Agent
from sentinel_twisted.agent.forward import ForwardAgentFactory, ForwardAgentProtocol
from sentinel_twisted.agent.protocol import AgentSettings
from sentinel_twisted.proxy.dialled import DialledAgentService
from sentinel_twisted.proxy.pool import AgentPool
from sentinel_twisted.wire import MessageType, encode_frame

from ._proxy_support import request_headers
from .test_dialled import Dialler, handshake_response
from .test_forward import vector_payload

# Every property together stays well under the suite's budget; FWD_EXAMPLES=N
# runs N random examples each instead, to search further.
_quick = settings(
    derandomize=not os.environ.get("FWD_EXAMPLES"),
    max_examples=int(os.environ.get("FWD_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies -----------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=12),
)
# Values MessagePack can carry, extension types included.
_msgpack_values = st.recursive(
    st.one_of(_scalars, st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8))),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=12,
)
# JSON has no infinity (it is written as null): not a value to expect back.
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def _deep(depth: int, array: bool) -> bytes:
    # A MessagePack array (or map) nested C{depth} deep, as raw bytes.
    opener = b"\x91" if array else b"\x81\xa1k"
    return opener * depth + b"\xc0"


def _json_deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


_hostile_payloads = st.one_of(
    st.binary(max_size=64),
    _msgpack_values.map(msgspec.msgpack.encode),
    _json_values.map(msgspec.json.encode),
    st.integers(1, 5000).map(lambda d: _deep(d, True)),
    st.integers(1, 5000).map(lambda d: _deep(d, False)),
    st.integers(1, 5000).map(_json_deep),
    # Huge declared lengths: str32, bin32, array32, map32 heads with nothing behind.
    st.sampled_from([b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"]),
    # An extension where a string or a map key is expected.
    st.just(b"\x81\xd4\x01\x00\xa1x"),
    st.just(b"\x92\xd4\x01\x00\xc0"),
)


@st.composite
def _splits(draw: Any, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces, last = [], 0
    for cut in cuts + [len(data)]:
        pieces.append(data[last:cut])
        last = cut
    return [p for p in pieces if p]


# -- log checks -----------------------------------------------------------------


@contextmanager
def _unhandled() -> Iterator[list[LogEvent]]:
    """Collect the events that record an unhandled failure (or a critical line)."""
    bad: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("isError") or event.get("log_level") is LogLevel.critical:
            bad.append(event)
        elif "log_failure" in event and event.get("log_level") is not LogLevel.debug:
            bad.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield bad
        gc.collect()  # Deferreds that die holding a failure log it now
    finally:
        globalLogPublisher.removeObserver(observe)


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while len(data) - offset >= 5:
        (length,) = struct.unpack_from("!I", data, offset)
        out.append((data[offset + 4], data[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    assert offset == len(data), "a partial frame was written"
    return out


# -- 1. a hostile agent answering the proxy ----------------------------------------

_handshake_answers = st.one_of(
    _hostile_payloads,
    st.builds(
        lambda version, success, encoding, caps: msgspec.json.encode(
            {"protocol_version": version, "capabilities": caps, "success": success, "error": None, "encoding": encoding}
        ),
        st.sampled_from([2, 2, 1, 3, -1, 2**40, "2", None]),
        st.sampled_from([True, True, False, 1, None]),
        st.sampled_from(["json", "msgpack", "cbor", "JSON", "", None, 1]),
        st.one_of(
            st.just(json.loads(msgspec.json.encode(m.AgentCapabilities(agent_id="waf-1", name="w", version="1")))),
            _json_values,
        ),
    ),
)

_reply_types = st.sampled_from(
    [
        MessageType.HANDSHAKE_RESPONSE,
        MessageType.HANDSHAKE_REQUEST,
        MessageType.AGENT_RESPONSE,
        MessageType.HEALTH_STATUS,
        MessageType.FLOW_CONTROL,
        MessageType.PONG,
        MessageType.PING,
        MessageType.CANCEL,
        MessageType.REQUEST_HEADERS,
        0x7F,
        0xFF,
    ]
)


class HostileAgentTests(SynchronousTestCase):
    """The proxy's end of a dialled connection, fed whatever an agent may send."""

    def settle(self, dialler: Dialler, protocol: Any, transport: StringTransport) -> None:
        """
        The handshake ends one way or the other: the connection is in the
        pool and open, or it is closed after one failure line.
        """
        if protocol.connection is None:
            dialler.clock.advance(11)  # past the handshake timeout
            self.assertTrue(transport.disconnecting)
            self.assertEqual(sum(dialler.factory.failures.values()), 1, dialler.factory.failures)
        else:
            self.assertEqual(dialler.factory.failures, {})

    @_quick
    @given(
        answer=_handshake_answers,
        message_type=_reply_types,
        cuts=st.data(),
        prefix=st.binary(max_size=8),
        after=st.lists(st.tuples(_reply_types, _hostile_payloads), max_size=3),
        encodings=st.sampled_from([("msgpack", "json"), ("json",), ("msgpack",)]),
    )
    def test_any_handshake_answer_ends_in_the_pool_or_closed(
        self,
        answer: bytes,
        message_type: int,
        cuts: Any,
        prefix: bytes,
        after: list[tuple[int, bytes]],
        encodings: tuple[str, ...],
    ) -> None:
        dialler = Dialler(encodings=encodings)
        protocol, transport = dialler.connect()
        data = encode_frame(message_type, answer)
        if prefix and prefix[0] & 1:
            data = prefix + data  # garbage before the frame: any length header
        # Whatever follows in the same reads: frames before the handshake is done.
        data += b"".join(encode_frame(t, p) for t, p in after)
        with _unhandled() as bad:
            for piece in cuts.draw(_splits(data)):
                protocol.dataReceived(piece)
                self.assertLessEqual(protocol.buffered_bytes, protocol.MAX_LENGTH + 4)
            self.settle(dialler, protocol, transport)
            protocol.connectionLost(Failure(ConnectionDone()))
            dialler.clock.advance(60)
        self.assertEqual(bad, [])
        self.assertEqual(len(dialler.pool), 0)
        self.assertEqual(dialler.clock.getDelayedCalls(), [])
        self.assertLessEqual(sum(dialler.factory.failures.values()), 1)

    @_quick
    @given(
        encoding=st.sampled_from(["json", "msgpack"]),
        requests=st.integers(1, 4),
        replies=st.lists(st.tuples(_reply_types, _hostile_payloads, st.booleans()), max_size=6),
        cuts=st.data(),
        end=st.sampled_from(["lost", "timeout"]),
    )
    def test_every_request_gets_exactly_one_outcome(
        self, encoding: str, requests: int, replies: list[tuple[int, bytes, bool]], cuts: Any, end: str
    ) -> None:
        dialler = Dialler()
        protocol, transport, connection = dialler.handshake(encoding)
        other = f.codec_for("json" if encoding == "msgpack" else "msgpack")
        outcomes: list[list[Any]] = []
        with _unhandled() as bad:
            for i in range(requests):
                results: list[Any] = []
                outcomes.append(results)
                d = connection.send_request_headers(request_headers(f"req-{i}"))
                d.addBoth(results.append)
            stream = b""
            for i, (message_type, payload, routed) in enumerate(replies):
                if routed and message_type == MessageType.AGENT_RESPONSE:
                    # A well-formed answer for a request, in either encoding.
                    answer = m.AgentResponse(audit=m.AuditMetadata(custom={"correlation_id": f"req-{i % requests}"}))
                    codec = f.codec_for(encoding) if i % 2 else other
                    payload = codec.encode_response(answer)
                stream += encode_frame(message_type, payload)
            for piece in cuts.draw(_splits(stream)):
                protocol.dataReceived(piece)
                self.assertLessEqual(protocol.buffered_bytes, protocol.MAX_LENGTH + 4)
            if end == "timeout":
                dialler.clock.advance(dialler.factory.config.request_timeout + 1)
            protocol.connectionLost(Failure(ConnectionDone()))
            dialler.clock.advance(60)
        self.assertEqual(bad, [])
        for results in outcomes:
            self.assertEqual(len(results), 1, results)
        self.assertEqual(len(dialler.pool), 0)
        self.assertEqual(connection.in_flight, 0)

    @_quick
    @given(behaviour=st.sampled_from(["refuse", "drop_after_handshake", "garbage", "silent", "close_at_once"]))
    def test_redialling_a_hostile_agent_backs_off(self, behaviour: str) -> None:
        clock = MemoryReactorClock()
        pool = AgentPool()
        attempts: list[float] = []

        @implementer(IStreamClientEndpoint)
        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                attempts.append(clock.seconds())
                protocol = factory.buildProtocol(None)
                transport = StringTransport()
                protocol.makeConnection(transport)

                def behave() -> None:
                    if behaviour == "refuse":
                        protocol.dataReceived(handshake_response(success=False, error="no"))
                    elif behaviour == "drop_after_handshake":
                        protocol.dataReceived(handshake_response())
                    elif behaviour == "garbage":
                        protocol.dataReceived(b"\xff" * 9)
                    if behaviour != "silent" or transport.disconnecting:
                        clock.callLater(0, protocol.connectionLost, Failure(ConnectionDone()))
                    else:
                        # Closed when the proxy gives up on the handshake.
                        def lost_when_closed() -> None:
                            if transport.disconnecting:
                                protocol.connectionLost(Failure(ConnectionDone()))
                            else:
                                clock.callLater(1, lost_when_closed)

                        clock.callLater(1, lost_when_closed)

                clock.callLater(0, behave)
                return succeed(protocol)

        service = DialledAgentService(Endpoint(), pool, description="unix:/x", clock=clock, connections=2)
        with _unhandled() as bad:
            service.startService()
            for _ in range(600):
                clock.advance(1)
            service.stopService()
            clock.advance(60)
        self.assertEqual(bad, [])
        # Two slots; doubling from 0.5 s to 30 s: a handful in the first
        # minute, then about two a minute each.
        self.assertLess(len(attempts), 2 * (8 + 600 // 30), attempts)
        gaps = [b - a for a, b in zip(attempts[-6:], attempts[-4:], strict=False)]
        self.assertTrue(all(gap >= 20 for gap in gaps), attempts[-8:])


# -- 2. a hostile proxy dialling our agent ------------------------------------------

_event_types = st.sampled_from(
    [
        MessageType.REQUEST_HEADERS,
        MessageType.REQUEST_BODY_CHUNK,
        MessageType.RESPONSE_HEADERS,
        MessageType.RESPONSE_BODY_CHUNK,
        MessageType.REQUEST_COMPLETE,
        MessageType.WEBSOCKET_FRAME,
        MessageType.CONFIGURE,
        MessageType.GUARDRAIL_INSPECT,
        MessageType.CANCEL,
        MessageType.PING,
        MessageType.PONG,
        MessageType.HANDSHAKE_REQUEST,
        MessageType.AGENT_RESPONSE,
        MessageType.METRICS_REPORT,
        MessageType.CONFIG_UPDATE_REQUEST,
        0x7E,
    ]
)

_handshake_requests = st.one_of(
    _hostile_payloads,
    st.builds(
        lambda versions, encodings, proxy: msgspec.json.encode(
            {"supported_versions": versions, "proxy_id": proxy, "proxy_version": "1", "config": None, "supported_encodings": encodings}
        ),
        st.one_of(st.just([2]), st.lists(st.integers(-3, 2**33), max_size=12), st.just("2")),
        st.one_of(
            st.none(),
            st.lists(st.sampled_from(["msgpack", "json", "cbor", "", "JSON"]), max_size=4),
            st.just("msgpack"),
        ),
        st.one_of(st.text(max_size=10), st.none(), st.integers()),
    ),
)

_AGENT_SENDS = {
    MessageType.HANDSHAKE_RESPONSE,
    MessageType.AGENT_RESPONSE,
    MessageType.HEALTH_STATUS,
    MessageType.FLOW_CONTROL,
    MessageType.PONG,
    MessageType.PING,
}


class ListeningAgent:
    """A ForwardAgentFactory on a memory clock, and connections to it."""

    def __init__(self, **options: Any) -> None:
        self.clock = MemoryReactorClock()
        self.settings = AgentSettings(agent=Agent(), agent_id="waf-1", health_interval=0)
        self.factory = ForwardAgentFactory(self.settings, self.clock, **options)

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def _check_answers(test: SynchronousTestCase, written: bytes) -> str | None:
    """Every frame the agent wrote is one it may send, well formed; the encoding it agreed."""
    encoding = None
    for message_type, payload in _frames(written):
        test.assertIn(message_type, _AGENT_SENDS)
        if message_type == MessageType.HANDSHAKE_RESPONSE:
            response = m.decode(payload, f.HandshakeResponse)
            if response.success:
                encoding = response.encoding
            continue
        codec = f.codec_for(encoding or "json")
        if message_type == MessageType.AGENT_RESPONSE:
            codec.decode_response(payload)
            test.assertIsNotNone(codec.answer_correlation_id(payload))
        elif message_type == MessageType.HEALTH_STATUS:
            codec.decode_control(payload, m.HealthStatusMessage)
        elif message_type == MessageType.FLOW_CONTROL:
            codec.decode_control(payload, m.FlowControlMessage)
    return encoding


class HostileProxyTests(SynchronousTestCase):
    """Our listening agent, fed whatever a proxy may send."""

    @_quick
    @given(
        request=_handshake_requests,
        message_type=st.sampled_from([MessageType.HANDSHAKE_REQUEST] * 3 + [MessageType.REQUEST_HEADERS, 0x02, 0x99]),
        cuts=st.data(),
    )
    def test_any_handshake_is_answered_well_formed_or_closed(self, request: bytes, message_type: int, cuts: Any) -> None:
        agent = ListeningAgent()
        protocol, transport = agent.connect()
        with _unhandled() as bad:
            for piece in cuts.draw(_splits(encode_frame(message_type, request))):
                protocol.dataReceived(piece)
            agent.clock.advance(11)
            encoding = _check_answers(self, transport.value())
            if encoding is None:
                self.assertTrue(transport.disconnecting)
            else:
                self.assertTrue(protocol.registered)
                self.assertFalse(transport.disconnecting)
            protocol.connectionLost(Failure(ConnectionDone()))
            agent.clock.advance(60)
        self.assertEqual(bad, [])
        self.assertEqual(agent.factory.connections, set())

    @_quick
    @given(
        encoding=st.sampled_from(["json", "msgpack"]),
        events=st.lists(st.tuples(_event_types, _hostile_payloads), max_size=8),
        valid=st.lists(st.booleans(), max_size=4),
        cuts=st.data(),
    )
    def test_events_of_any_shape_get_well_formed_answers(
        self, encoding: str, events: list[tuple[int, bytes]], valid: list[bool], cuts: Any
    ) -> None:
        agent = ListeningAgent()
        protocol, transport = agent.connect()
        name = "fwd_handshake_request_msgpack" if encoding == "msgpack" else "fwd_handshake_request"
        protocol.dataReceived(encode_frame(MessageType.HANDSHAKE_REQUEST, vector_payload(name)))
        codec = f.codec_for(encoding)
        other = f.codec_for("json" if encoding == "msgpack" else "msgpack")
        stream = b""
        for i, use_other in enumerate(valid):
            event = request_headers(f"ok-{i}")
            stream += encode_frame(MessageType.REQUEST_HEADERS, (other if use_other else codec).encode_event(event))
        for message_type, payload in events:
            stream += encode_frame(message_type, payload)
        with _unhandled() as bad:
            for piece in cuts.draw(_splits(stream)):
                protocol.dataReceived(piece)
                self.assertLessEqual(protocol.buffered_bytes, protocol.MAX_LENGTH + 4)
            agent.clock.advance(1)
            self.assertEqual(_check_answers(self, transport.value()), encoding)
            protocol.connectionLost(Failure(ConnectionDone()))
            agent.clock.advance(60)
        self.assertEqual(bad, [])
        self.assertEqual(agent.factory.connections, set())
        self.assertEqual(protocol.in_flight, 0)

    @_quick
    @given(
        plan=st.lists(
            st.sampled_from(["connect", "handshake", "event", "advance", "lose", "stop_reading"]), max_size=40
        )
    )
    def test_floods_of_connections_stay_within_max_connections(self, plan: list[str]) -> None:
        agent = ListeningAgent(max_connections=4, idle_timeout=5.0)
        live: list[tuple[Any, StringTransport]] = []
        refused = 0
        with _unhandled() as bad:
            for step in plan:
                if step == "connect":
                    protocol = agent.factory.buildProtocol(None)  # type: ignore[arg-type]
                    transport = StringTransport()
                    protocol.makeConnection(transport)
                    if isinstance(protocol, ForwardAgentProtocol):
                        live.append((protocol, transport))
                    else:
                        refused += 1
                elif not live:
                    continue
                elif step == "handshake":
                    protocol, _ = live[-1]
                    protocol.dataReceived(frame_of("fwd_handshake_request"))
                elif step == "event":
                    protocol, _ = live[0]
                    protocol.dataReceived(
                        encode_frame(MessageType.REQUEST_HEADERS, m.encode(request_headers("r")))
                    )
                elif step == "advance":
                    agent.clock.advance(1.5)
                elif step == "stop_reading":
                    live[-1][0].pauseProducing()
                else:
                    protocol, _ = live.pop(0)
                    protocol.connectionLost(Failure(ConnectionDone()))
                self.assertLessEqual(len(agent.factory.connections), 4)
                # Transports closed by the agent go away as the reactor would report it.
                for protocol, transport in list(live):
                    if transport.disconnecting and not protocol._transport_gone:
                        protocol.connectionLost(Failure(ConnectionDone()))
                        live.remove((protocol, transport))
            for protocol, _ in live:
                _check_answers(self, _.value())
                protocol.connectionLost(Failure(ConnectionDone()))
            agent.clock.advance(60)
        self.assertEqual(bad, [])
        self.assertEqual(agent.factory.connections, set())
        self.assertEqual(agent.clock.getDelayedCalls(), [])


def frame_of(name: str) -> bytes:
    return encode_frame(MessageType.HANDSHAKE_REQUEST, vector_payload(name))


# -- 3. round trips ---------------------------------------------------------------

_texts = st.text(max_size=16)
_opt = st.one_of(st.none(), _texts)
_headers = st.dictionaries(_texts, st.lists(_texts, max_size=3), max_size=4)

_metadata = st.builds(
    m.RequestMetadata,
    correlation_id=_texts,
    request_id=_texts,
    client_ip=_texts,
    client_port=st.integers(0, 65535),
    server_name=_opt,
    protocol=_texts,
    tls_version=_opt,
    tls_cipher=_opt,
    route_id=_opt,
    upstream_id=_opt,
    timestamp=_texts,
    traceparent=st.one_of(st.just(msgspec.UNSET), _texts),
)

_events = st.one_of(
    st.builds(m.RequestHeadersEvent, metadata=_metadata, method=_texts, uri=_texts, headers=_headers),
    st.builds(
        m.ResponseHeadersEvent,
        correlation_id=_texts,
        status=st.integers(100, 599),
        headers=_headers,
    ),
)

_decisions = st.one_of(
    st.just(m.ALLOW),
    st.builds(m.Block, status=st.integers(100, 599), body=_opt, headers=st.one_of(st.none(), st.dictionaries(_texts, _texts, max_size=2))),
    st.builds(m.Redirect, url=_texts, status=st.integers(300, 399)),
)

_answers = st.builds(
    m.AgentResponse,
    decision=_decisions,
    needs_more=st.booleans(),
    routing_metadata=st.dictionaries(_texts, _texts, max_size=3),
    audit=st.builds(
        m.AuditMetadata,
        tags=st.lists(_texts, max_size=3),
        rule_ids=st.lists(_texts, max_size=3),
        confidence=st.one_of(st.none(), st.floats(0, 1)),
        reason_codes=st.lists(_texts, max_size=3),
        custom=st.dictionaries(_texts, _json_values, max_size=3),
    ),
)


class RoundTripTests(SynchronousTestCase):
    """What one side encodes, the other decodes to the same value."""

    @_quick
    @given(event=_events, encoding=st.sampled_from(["json", "msgpack"]))
    def test_events_round_trip(self, event: Any, encoding: str) -> None:
        codec = f.codec_for(encoding)
        payload = codec.encode_event(event)
        decoded = codec.decode_event(payload, type(event))
        self.assertEqual(m.event_correlation_id(decoded), m.event_correlation_id(event))
        self.assertEqual(codec.encode_event(decoded), payload)

    @_quick
    @given(answer=_answers, encoding=st.sampled_from(["json", "msgpack"]))
    def test_answers_round_trip(self, answer: m.AgentResponse, encoding: str) -> None:
        codec = f.codec_for(encoding)
        payload = codec.encode_response(answer)
        decoded = codec.decode_response(payload)
        self.assertEqual(codec.encode_response(decoded), payload)
        self.assertEqual(decoded, answer)

    def test_vectors_round_trip(self) -> None:
        for name, cls, encoding in (
            ("fwd_evt_request_headers", m.RequestHeadersEvent, "json"),
            ("fwd_evt_request_headers_msgpack", m.RequestHeadersEvent, "msgpack"),
            ("fwd_evt_request_body_chunk_msgpack", m.RequestBodyChunkEvent, "msgpack"),
        ):
            codec = f.codec_for(encoding)
            payload = vector_payload(name)
            event = codec.decode_event(payload, cls)
            again = codec.decode_event(codec.encode_event(event), cls)
            self.assertEqual(again, event, name)
        for name, encoding in (("fwd_resp_allow", "json"), ("fwd_resp_allow_msgpack", "msgpack")):
            codec = f.codec_for(encoding)
            payload = vector_payload(name)
            answer = codec.decode_response(payload)
            self.assertEqual(codec.decode_response(codec.encode_response(answer)), answer, name)
            self.assertEqual(codec.encode_response(answer), payload, name)
