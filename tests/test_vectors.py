"""
The reference vectors (C{tests/data/vectors}, a copy of C{../shared/vectors}), in both directions.

For every positive vector: its frame parses, its payload decodes with our
codec and re-encodes to the same JSON (ignoring C{varying_fields}), and
the proxy really acts on it (agent -> proxy) or really sends it, written by
our own sending code (proxy -> agent).  Every negative vector is fed to a
L{ReverseConnectionProtocol}: it ends with the error the vector names and a
closed connection, with a C{success: false} answer whenever the stream still
allowed writing (SPEC section 6).

One test is generated per vector; a missing vector directory is a failure
(L{test_vectors_are_present}), never a skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from twisted.trial.unittest import SkipTest, TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.errors import InvalidMessage, RequestTimeout
from sentinel_twisted.proxy.connection import AgentConnection
from sentinel_twisted.proxy.pool import PoolObserver
from sentinel_twisted.wire import MessageType, encode_frame

from . import vectors as V
from ._proxy_support import (
    CLOSE_DEADLINE,
    Proxy,
    captured_log,
    delayed_calls,
    lose,
    request_headers,
    take_frames,
)
from .test_connection import SENDERS
from .test_wire import connected

_DECODERS: dict[int, Callable[[bytes], Any]] = {
    MessageType.HANDSHAKE_REQUEST: m.decode_registration_request,
    MessageType.HANDSHAKE_RESPONSE: lambda p: m.decode(p, m.RegistrationResponse),
    MessageType.AGENT_RESPONSE: m.decode_agent_response,
    MessageType.HEALTH_STATUS: lambda p: m.decode(p, m.HealthStatusMessage),
    MessageType.METRICS_REPORT: lambda p: m.decode(p, dict),
    MessageType.CONFIG_UPDATE_REQUEST: lambda p: m.decode(p, dict),
    MessageType.FLOW_CONTROL: lambda p: m.decode(p, m.FlowControlMessage),
    MessageType.CANCEL: lambda p: m.decode(p, m.CancelMessage),
    MessageType.PING: lambda p: m.decode(p, m.PingMessage),
    MessageType.PONG: lambda p: m.decode(p, m.PingMessage),
    **{
        t: (lambda p, cls=cls: m.decode(p, cls))  # type: ignore[misc]
        for t, cls in m.EVENT_CLASSES.items()
    },
}

_SENDER_BY_TYPE = {
    cls.message_type: sender
    for sender, cls in zip(
        SENDERS,
        [
            m.RequestHeadersEvent,
            m.RequestBodyChunkEvent,
            m.ResponseHeadersEvent,
            m.ResponseBodyChunkEvent,
            m.RequestCompleteEvent,
            m.WebSocketFrameEvent,
            m.GuardrailInspectEvent,
            m.ConfigureEvent,
        ],
        strict=True,
    )
}

#: How to make the listener write each RegistrationResponse vector.
_REGISTRATION_CONFIGS: dict[str, dict[str, Any]] = {
    "reg_response_success": {},
    "reg_response_success_live": {},
    "reg_response_failure_version": {},
    "reg_response_failure_empty_agent_id": {},
    "reg_response_failure_not_allowed": {"allowed_agents": ["waf-*"]},
    "reg_response_failure_auth_required": {"require_auth": True},
}

_DECODE_ONLY_SUFFIX = "_serde_struct_not_understood"


def _is_decode_only(vector: dict[str, Any]) -> bool:
    return str(vector["name"]).endswith(_DECODE_ONLY_SUFFIX)


def _request_frame_of(vector: dict[str, Any]) -> bytes:
    """The request a RegistrationResponse vector answered: named in its
    notes, else the minimal request vector."""
    found = re.search(r"Request frame sent: ([0-9a-f]+)", vector.get("notes", ""))
    if found:
        return bytes.fromhex(found.group(1))
    return V.frame_bytes(V.by_name("reg_request_minimal"))


_SERDE_POSITION = re.compile(r" at line \d+ column \d+$")


def matches_reference(ours: str, expected: str) -> bool:
    """
    Whether our error text says what the reference's does: the same text,
    or (where serde's wording differs from msgspec's) the same
    C{Invalid message format:} prefix naming the same fields.
    """
    if ours.startswith(expected):
        return True
    if ours.startswith(_SERDE_POSITION.sub("", expected)):
        return True
    prefix = "Invalid message format: "
    if ours.startswith(prefix) and expected.startswith(prefix):
        return all(name in ours for name in re.findall(r"`([^`]+)`", expected))
    return False


class Metrics(PoolObserver):
    def __init__(self) -> None:
        self.reports: list[Any] = []

    def metrics_reported(self, connection: AgentConnection, report: dict[str, Any]) -> None:
        self.reports.append(report)

    def config_update_requested(self, connection: AgentConnection, request: dict[str, Any]) -> None:
        self.reports.append(request)


class VectorSuiteTests(TestCase):
    def test_vectors_are_present(self) -> None:
        vectors = V.load_all()  # raises VectorsMissing with a clear message
        self.assertGreaterEqual(len(vectors), 50)

    def test_index_lists_every_vector(self) -> None:
        names = {v["name"] for v in V.load_all()}
        index = V.index_names()
        self.assertTrue(index, "index.json is missing or empty")
        self.assertEqual(set(index), names)

    def test_every_positive_vector_type_has_a_decoder(self) -> None:
        for vector in V.positive():
            self.assertIn(vector["message_type"], _DECODERS, vector["name"])

    def test_every_registration_response_vector_has_a_recipe(self) -> None:
        for vector in V.positive():
            if vector["message_type"] == MessageType.HANDSHAKE_RESPONSE:
                self.assertIn(vector["name"], _REGISTRATION_CONFIGS)

    def test_the_shipped_copy_is_byte_identical_to_the_shared_vectors(self) -> None:
        # The copy in tests/data/vectors is what a fresh clone tests with;
        # wherever the published vectors sit beside the repository (CI has
        # them), the copy must be exactly them: same files, same bytes.
        if not V.SHARED_DIR.is_dir():
            raise SkipTest(f"{V.SHARED_DIR} is not here to compare with")
        shared = {p.name: p.read_bytes() for p in V.SHARED_DIR.iterdir() if p.is_file()}
        shipped = {p.name: p.read_bytes() for p in V.DEFAULT_DIR.iterdir() if p.is_file()}
        self.assertTrue(shared, f"{V.SHARED_DIR} is empty")
        self.assertEqual(sorted(shipped), sorted(shared))
        changed = sorted(name for name in shared if shipped[name] != shared[name])
        self.assertEqual(changed, [], "these shipped vectors differ from the shared ones")

    def test_the_tests_read_the_shipped_copy_by_default(self) -> None:
        self.patch(V.os, "environ", {})
        self.assertEqual(V.vectors_dir(), V.DEFAULT_DIR)
        self.assertEqual(V.DEFAULT_DIR, Path(V.__file__).parent / "data" / "vectors")

    def test_missing_vectors_fail_clearly(self) -> None:
        self.patch(V.os, "environ", {V.VECTORS_ENV: self.mktemp()})
        with self.assertRaises(V.VectorsMissing) as caught:
            V.load_all()
        self.assertIn(V.VECTORS_ENV, str(caught.exception))

    def test_matches_reference_rules(self) -> None:
        self.assertTrue(matches_reference("Message too large: 5 bytes (max: 4)", "Message too large: 5 bytes (max: 4"))
        self.assertTrue(
            matches_reference(
                "Invalid message format: EOF while parsing a value (empty)",
                "Invalid message format: EOF while parsing a value at line 1 column 0",
            )
        )
        self.assertTrue(
            matches_reference(
                "Invalid message format: Object missing required field `x` - at `$.a`",
                "Invalid message format: missing field `x` at line 1 column 9",
            )
        )
        self.assertFalse(
            matches_reference(
                "Invalid message format: Object missing required field `y`",
                "Invalid message format: missing field `x` at line 1 column 9",
            )
        )
        self.assertFalse(matches_reference("Timeout after 1s", "Invalid message format: x"))


class PositiveVectorTests(TestCase):
    """One generated test per positive vector (see the end of the module)."""

    def check_positive(self, name: str) -> None:
        vector = V.by_name(name)
        message_type = vector["message_type"]
        payload = vector["payload"].encode("utf-8")
        self.check_frame(vector, payload)
        decoded = _DECODERS[message_type](payload)
        if _is_decode_only(vector):
            self.check_decode_only(vector, decoded)
        else:
            ours, theirs = V.same_json(m.encode(decoded), vector)
            self.assertEqual(ours, theirs, "decode + re-encode differs from the vector")
        if vector["direction"] == "proxy->agent":
            self.check_we_send_it(vector, decoded)
        else:
            self.check_we_act_on_it(vector, decoded)

    def check_frame(self, vector: dict[str, Any], payload: bytes) -> None:
        receiver, _ = connected()
        receiver.dataReceived(V.frame_bytes(vector))
        self.assertEqual(receiver.errors, [])
        self.assertEqual(receiver.frames, [(vector["message_type"], payload)])

    def check_decode_only(self, vector: dict[str, Any], decoded: Any) -> None:
        # The crate's struct forms are accepted and understood, never sent.
        if vector["message_type"] == MessageType.FLOW_CONTROL:
            self.assertTrue(decoded.paused)
            self.assertIsInstance(json.loads(m.encode(m.FlowControlMessage(action=1)))["action"], int)
        elif vector["message_type"] == MessageType.HEALTH_STATUS:
            self.assertEqual(decoded.state_code, m.HealthState.HEALTHY)
        else:
            self.fail(f"no decode-only check for {vector['name']}")

    # -- proxy -> agent: our sending code writes the vector ------------------

    def check_we_send_it(self, vector: dict[str, Any], decoded: Any) -> None:
        message_type = vector["message_type"]
        if message_type == MessageType.HANDSHAKE_RESPONSE:
            frames = self.registration_answer(vector)
        elif message_type in m.EVENT_CLASSES:
            frames = self.send_event(vector, decoded)
        elif message_type == MessageType.CANCEL:
            frames = self.send_cancel(decoded)
        elif message_type == MessageType.PING:
            frames = self.send_ping()
        else:
            self.fail(f"no sending recipe for {vector['name']}")
        kinds = [t for t, _ in frames]
        self.assertIn(message_type, kinds, f"we wrote {kinds}")
        [payload] = [p for t, p in frames if t == message_type]
        ours, theirs = V.same_json(payload, vector)
        self.assertEqual(ours, theirs, "our frame differs from the vector")

    def registration_answer(self, vector: dict[str, Any]) -> list[tuple[int, bytes]]:
        proxy = Proxy(**_REGISTRATION_CONFIGS[vector["name"]])
        protocol, transport = proxy.connect()
        protocol.dataReceived(_request_frame_of(vector))
        frames = take_frames(transport)
        response = m.decode(frames[0][1], m.RegistrationResponse)
        if response.success:
            self.assertTrue(response.connection_id.startswith("waf-1-"))
            self.assertFalse(transport.disconnecting)
        else:
            self.assertEqual(response.connection_id, "")
            self.assertTrue(transport.disconnecting)
        return frames

    def registered(self) -> tuple[Proxy, Any, Any, AgentConnection]:
        proxy = Proxy()
        protocol, transport, connection = proxy.register("waf-1")
        return proxy, protocol, transport, connection

    def send_event(self, vector: dict[str, Any], event: Any) -> list[tuple[int, bytes]]:
        _, _, transport, connection = self.registered()
        wanted = json.loads(vector["payload"])["correlation_id"]
        # Strip the ids: our sending code must put them back where they go.
        if isinstance(event, m.RequestHeadersEvent):
            event = msgspec.structs.replace(
                event, metadata=msgspec.structs.replace(event.metadata, correlation_id="")
            )
        event = msgspec.structs.replace(
            event, correlation_id="struct-cid" if "override" in vector["name"] else ""
        )
        sender = getattr(connection, _SENDER_BY_TYPE[vector["message_type"]])
        sender(event, wanted)
        self.assertEqual(connection.pending_ids(), [wanted])
        return take_frames(transport)

    def send_cancel(self, cancel: m.CancelMessage) -> list[tuple[int, bytes]]:
        proxy, _, transport, connection = self.registered()
        deferred = connection.send_request_headers(request_headers(cancel.correlation_id), timeout=1)
        deferred.addErrback(lambda f: None)
        take_frames(transport)
        if cancel.reason == m.CancelReason.TIMEOUT:
            proxy.clock.advance(1)
        else:
            self.assertTrue(connection.cancel_request(cancel.correlation_id, cancel.reason))
        self.assertEqual(connection.in_flight, 0)
        return take_frames(transport)

    def send_ping(self) -> list[tuple[int, bytes]]:
        _, _, transport, connection = self.registered()
        connection.ping()
        return take_frames(transport)

    # -- agent -> proxy: the listener acts on the vector ---------------------

    def check_we_act_on_it(self, vector: dict[str, Any], decoded: Any) -> None:
        message_type = vector["message_type"]
        frame = V.frame_bytes(vector)
        if message_type == MessageType.HANDSHAKE_REQUEST:
            proxy = Proxy()
            protocol, transport = proxy.connect()
            response = proxy.registration_response(protocol, transport, frame)
            self.assertTrue(response.success, response.error)
            assert protocol.connection is not None
            self.assertEqual(protocol.connection.agent_id, decoded.agent_id)
            self.assertEqual(protocol.connection.metadata, decoded.metadata)
            return
        proxy, protocol, transport, connection = self.registered()
        observer = Metrics()
        proxy.pool.add_observer(observer)
        if message_type == MessageType.AGENT_RESPONSE:
            cid = decoded.correlation_id
            self.assertIsNotNone(cid)
            deferred = connection.send_request_headers(request_headers(cid))
            protocol.dataReceived(frame)
            self.assertEqual(self.successResultOf(deferred), decoded)
            self.assertEqual(connection.in_flight, 0)
        elif message_type == MessageType.FLOW_CONTROL:
            if not decoded.paused:
                protocol.dataReceived(encode_frame(MessageType.FLOW_CONTROL, b'{"action":1}'))
            protocol.dataReceived(frame)
            self.assertEqual(connection.is_paused, decoded.paused)
        elif message_type == MessageType.HEALTH_STATUS:
            protocol.dataReceived(frame)
            self.assertEqual(connection.health_state, decoded.state_code)
            self.assertIsNotNone(connection.health_state)
        elif message_type in (MessageType.METRICS_REPORT, MessageType.CONFIG_UPDATE_REQUEST):
            protocol.dataReceived(frame)
            self.assertEqual(observer.reports, [decoded])
        elif message_type == MessageType.PONG:
            # The answer to our first Ping (sequence 0) ...
            waiter = connection.ping()
            take_frames(transport)
            protocol.dataReceived(frame)
            self.successResultOf(waiter)
            # ... and what we answer to the matching Ping: the same body.
            ping = V.by_name("ctl_ping")
            protocol.dataReceived(V.frame_bytes(ping))
            [(kind, payload)] = take_frames(transport)
            self.assertEqual(kind, MessageType.PONG)
            ours, theirs = V.same_json(payload, vector)
            self.assertEqual(ours, theirs)
        else:
            self.fail(f"no recipe for agent -> proxy vector {vector['name']}")
        self.assertFalse(transport.disconnecting)


class NegativeVectorTests(TestCase):
    """One generated test per negative vector (see the end of the module)."""

    def check_negative(self, name: str) -> None:
        vector = V.by_name(name)
        expected = vector["expected_error"]
        if not vector.get("frame_hex") and expected.startswith("Timeout after"):
            self.check_handshake_timeout(expected)
        elif vector.get("message_type") == MessageType.AGENT_RESPONSE and expected.startswith("Timeout"):
            self.check_answer_after_registration(vector, expected)
        else:
            self.check_refused_stream(vector, expected)

    def check_handshake_timeout(self, expected: str) -> None:
        seconds = _duration_seconds(expected.removeprefix("Timeout after "))
        proxy = Proxy(handshake_timeout=seconds)
        protocol, transport = proxy.connect()
        proxy.clock.advance(seconds)
        [(kind, payload)] = take_frames(transport)
        response = m.decode(payload, m.RegistrationResponse)
        self.assertFalse(response.success)
        self.assertEqual(response.error, expected)
        self.assertTrue(transport.disconnecting)
        lose(protocol)
        self.assertEqual(proxy.factory.awaiting_registration, 0)

    def check_answer_after_registration(self, vector: dict[str, Any], expected: str) -> None:
        proxy = Proxy()
        protocol, transport, connection = proxy.register("waf-1")
        deferred = connection.send_request_headers(request_headers("req-7f3a"))
        protocol.dataReceived(V.frame_bytes(vector))
        payload = json.loads(vector["payload"])
        names_pending = (
            isinstance(payload.get("audit"), dict)
            and payload["audit"].get("custom", {}).get("correlation_id") == "req-7f3a"
        )
        if names_pending:
            self.failureResultOf(deferred, InvalidMessage)
        else:
            self.assertNoResult(deferred)
            proxy.clock.advance(proxy.config.request_timeout)
            failure = self.failureResultOf(deferred, RequestTimeout)
            self.assertEqual(str(failure.value), expected)
        self.assertEqual(connection.in_flight, 0)
        self.assertFalse(transport.disconnecting, "a bad answer does not end the connection")
        # Ours goes further than the reference: an invalid answer that names
        # its request fails that request at once.
        payload.setdefault("audit", {}).setdefault("custom", {})["correlation_id"] = "req-8"
        second = connection.send_request_headers(request_headers("req-8"))
        protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, json.dumps(payload).encode()))
        if "version" in payload and "decision" in payload:
            self.assertTrue(self.successResultOf(second).is_allow)
        else:
            self.failureResultOf(second, InvalidMessage)
        self.assertEqual(connection.in_flight, 0)

    def check_refused_stream(self, vector: dict[str, Any], expected: str) -> None:
        proxy = Proxy()
        protocol, transport = proxy.connect()
        with captured_log() as events:
            protocol.dataReceived(V.frame_bytes(vector))
            writable = not transport.disconnecting
            if writable:
                # The stream stopped mid-frame: the agent closed it.
                self.assertEqual(transport.value(), b"")
                lose(protocol)
        self.assertIsNone(protocol.connection)
        self.assertEqual(proxy.factory.awaiting_registration, 0)
        # Closed by the proxy: only the deadline of the close waits, until the transport goes.
        self.assertEqual(delayed_calls(proxy.clock), [] if writable else CLOSE_DEADLINE)
        if writable:
            details = [e.get("detail", "") for e in events]
            self.assertTrue(
                any(_eof_equivalent(expected, d) for d in details),
                f"no log line says {expected!r}: {details}",
            )
            return
        [(kind, payload)] = take_frames(transport)
        self.assertEqual(kind, MessageType.HANDSHAKE_RESPONSE)
        response = m.decode(payload, m.RegistrationResponse)
        self.assertFalse(response.success)
        self.assertEqual(response.connection_id, "")
        assert response.error is not None
        self.assertTrue(
            matches_reference(response.error, expected), f"{response.error!r} vs {expected!r}"
        )
        self.assertEqual(transport.events, ["write", "loseConnection"])
        lose(protocol)


def _eof_equivalent(expected: str, detail: str) -> bool:
    # The reference's reader errors for a stream that ends early, and ours.
    ours = {"Connection closed": "connection closed", "IO error: early eof": "mid-frame"}
    return ours.get(expected, expected) in detail


def _duration_seconds(text: str) -> float:
    for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)


def _generate() -> None:
    try:
        vectors = V.load_all()
    except V.VectorsMissing:
        return  # test_vectors_are_present fails and says why
    for vector in vectors:
        name = vector["name"]
        if vector.get("kind") == "positive":
            setattr(
                PositiveVectorTests,
                f"test_{name}",
                lambda self, name=name: self.check_positive(name),
            )
        elif vector.get("kind") == "negative":
            setattr(
                NegativeVectorTests,
                f"test_{name}",
                lambda self, name=name: self.check_negative(name),
            )


_generate()
