"""
Properties of the listener and the codec under arbitrary input.

Whatever bytes or frames arrive, in whatever pieces: no exception escapes
into the reactor, and every connection ends up registered or closed (or
still awaiting registration with its handshake timer running, which then
closes it).  Whatever JSON arrives, the decoders only ever raise
L{InvalidMessage} or L{VersionMismatch}.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.errors import (
    AgentProtocolError,
    InvalidMessage,
    VersionMismatch,
)
from sentinel_twisted.wire import MAX_MESSAGE_SIZE, MessageType, encode_frame

from ._proxy_support import (
    CLOSE_DEADLINE,
    Proxy,
    answer_payload,
    captured_log,
    lose,
    registration_frame,
    registration_payload,
    request_headers,
)

SETTINGS = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# -- strategies ----------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

KNOWN_TYPES = [int(t) for t in MessageType]

VALID_PAYLOADS = [
    registration_payload(),
    answer_payload("req-1"),
    answer_payload("req-1", m.Block(403, "no", {"a": "b"})),
    b'{"action":1}',
    b'{"action":2}',
    b'{"action":{"type":"pause"}}',
    b'{"state":4}',
    b'{"sequence":1,"timestamp_ms":2}',
    b'{"counters":[]}',
    b"{}",
    b"",
]


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return [p for p in pieces if p]


payloads = st.one_of(
    st.sampled_from(VALID_PAYLOADS),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)

frames = st.one_of(
    st.tuples(st.sampled_from(KNOWN_TYPES), payloads).map(lambda f: encode_frame(*f)),
    # A declared length that does not match what follows, or a bad type.
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=16)).map(
        lambda f: f[0].to_bytes(4, "big") + bytes([f[1]]) + f[2]
    ),
)

streams = st.tuples(
    st.booleans(),  # start with a valid registration?
    st.lists(frames, max_size=8),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)


class ListenerPropertyTests(TestCase):
    def feed(self, data: bytes, cuts: list[int]) -> tuple[Proxy, Any, Any, list[Any]]:
        proxy = Proxy(max_connections_per_agent=1000)
        protocol, transport = proxy.connect()
        with captured_log() as events:
            for piece in _splits(data, cuts):
                protocol.dataReceived(piece)
        return proxy, protocol, transport, events

    def assertRegisteredOrClosed(self, proxy: Proxy, protocol: Any, transport: Any) -> None:
        connection = protocol.connection
        if transport.disconnecting:
            self.assertEqual(proxy.factory.awaiting_registration, 0)
            # Closed (not aborted): the deadline of the close waits for the
            # transport to go.  The listener's log rate-limiting windows
            # outlive a connection by design (see assertCleanEnd).
            limiter = proxy.factory.log_limiter
            left = [
                getattr(c.func, "__name__", repr(c.func))
                for c in proxy.clock.getDelayedCalls()
                if getattr(c.func, "__self__", None) is not limiter
            ]
            self.assertEqual(left, [] if transport.disconnected else CLOSE_DEADLINE)
        elif connection is not None:
            self.assertFalse(connection.is_closed)
            self.assertIn(connection, proxy.pool.connections(connection.agent_id))
            self.assertEqual(proxy.factory.awaiting_registration, 0)
        else:
            # Still waiting for a whole RegistrationRequest: the handshake
            # timer must be armed, and it closes the connection.
            [timer] = proxy.clock.getDelayedCalls()
            self.assertTrue(timer.active())
            proxy.clock.advance(proxy.config.handshake_timeout)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(proxy.factory.awaiting_registration, 0)

    def assertCleanEnd(self, proxy: Proxy, protocol: Any) -> None:
        connection = protocol.connection
        pending = None
        if connection is not None and connection.can_accept_requests:
            pending = connection.send_request_headers(request_headers("prop-1"))
        lose(protocol)
        if pending is not None:
            self.failureResultOf(pending, AgentProtocolError)
        self.assertEqual(len(proxy.pool), 0)
        self.assertEqual(proxy.factory.awaiting_registration, 0)
        self.assertEqual(proxy.pool.in_flight, 0)
        # The listener's log rate-limiting windows outlive connections by
        # design (one timer per kind of line); stopping the listener ends them.
        proxy.factory.stopFactory()
        self.assertEqual(proxy.clock.getDelayedCalls(), [])
        self.assertEqual(dict(proxy.factory._registered_per_agent), {})

    @SETTINGS
    @given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=16))
    def test_arbitrary_bytes_never_escape_and_end_cleanly(self, data: bytes, cuts: list[int]) -> None:
        proxy, protocol, transport, events = self.feed(data, cuts)
        self.assertEqual([e for e in events if "log_failure" in e], [])
        self.assertRegisteredOrClosed(proxy, protocol, transport)
        self.assertCleanEnd(proxy, protocol)

    @SETTINGS
    @given(streams)
    # A frame only a proxy sends starts a log rate-limiting window.
    @example((True, [registration_frame()] * 6, []))
    # ... and a connection closed after that leaves the window open.
    @example((True, [registration_frame()] * 6 + [b"\x00\x00\x00\x00\x00"], []))
    def test_arbitrary_frames_never_escape_and_end_cleanly(self, stream: Any) -> None:
        register, body, cuts = stream
        data = (registration_frame() if register else b"") + b"".join(body)
        proxy, protocol, transport, events = self.feed(data, cuts)
        self.assertEqual([e for e in events if "log_failure" in e], [])
        self.assertRegisteredOrClosed(proxy, protocol, transport)
        if register and not transport.disconnecting:
            self.assertIsNotNone(protocol.connection)
        self.assertCleanEnd(proxy, protocol)

    @SETTINGS
    @given(st.integers(MAX_MESSAGE_SIZE + 1, 2**32 - 1), st.integers(0, 255))
    def test_oversize_prefix_closes_before_buffering(self, length: int, kind: int) -> None:
        proxy, protocol, transport, _ = self.feed(length.to_bytes(4, "big") + bytes([kind]), [])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.buffered_bytes, 0)


# -- codec ------------------------------------------------------------------------

DECODERS = [
    m.decode_registration_request,
    m.decode_agent_response,
    *[(lambda p, cls=cls: m.decode(p, cls)) for cls in m.EVENT_CLASSES.values()],
    *[
        (lambda p, shape=shape: m.decode(p, shape))
        for shape in (
            m.RegistrationResponse,
            m.HealthStatusMessage,
            m.FlowControlMessage,
            m.CancelMessage,
            m.PingMessage,
            dict,
        )
    ],
]

BASE_DOCUMENTS = [
    json.loads(registration_payload(token="t", metadata={"a": [1]})),
    json.loads(
        m.encode(
            m.AgentResponse(
                decision=m.Challenge("captcha", {"k": "v"}),
                request_headers=[m.SetHeader("a", "1"), m.RemoveHeader("b")],
                response_headers=[m.AddHeader("c", "2")],
                request_body_mutation=m.BodyMutation.drop(0),
                websocket_decision=m.WebSocketClose(1000, "x"),
                audit=m.AuditMetadata(custom={"correlation_id": "c"}),
            )
        )
    ),
    json.loads(m.encode(m.AgentResponse(decision=m.Block(403, "b", {"h": "v"})))),
    json.loads(m.encode(m.AgentResponse(decision=m.Redirect("/x")))),
    json.loads(m.encode_event(request_headers("r"))),
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


@st.composite
def mutated_documents(draw: Any) -> bytes:
    """A valid message with one part replaced by arbitrary JSON."""
    doc = copy.deepcopy(draw(st.sampled_from(BASE_DOCUMENTS)))
    path = draw(st.sampled_from(_paths(doc)))
    replacement = draw(json_values)
    if not path:
        return json.dumps(replacement).encode()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = replacement
    return json.dumps(doc).encode()


class CodecPropertyTests(TestCase):
    def assertOnlyProtocolErrors(self, payload: bytes) -> None:
        for decoder in DECODERS:
            try:
                decoder(payload)
            except (InvalidMessage, VersionMismatch) as e:
                self.assertTrue(str(e))
            # Anything else propagates and fails the property.

    @SETTINGS
    @given(json_values)
    def test_arbitrary_json_only_raises_protocol_errors(self, value: Any) -> None:
        self.assertOnlyProtocolErrors(json.dumps(value).encode())

    @SETTINGS
    @given(mutated_documents())
    def test_almost_valid_messages_only_raise_protocol_errors(self, payload: bytes) -> None:
        self.assertOnlyProtocolErrors(payload)

    @SETTINGS
    @given(st.binary(max_size=256))
    def test_arbitrary_bytes_only_raise_protocol_errors(self, payload: bytes) -> None:
        self.assertOnlyProtocolErrors(payload)

    @SETTINGS
    @given(mutated_documents())
    def test_decoded_answers_round_trip(self, payload: bytes) -> None:
        try:
            response = m.decode_agent_response(payload)
        except InvalidMessage:
            return
        self.assertEqual(m.decode_agent_response(m.encode(response)), response)
