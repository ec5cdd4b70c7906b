"""
Black-box tests of both sides against SPEC.md alone, over real sockets.

The peer at the other end is written here from the SPEC, byte by byte: a
4-byte big-endian length, a type byte, a JSON payload built with the
standard library.  Nothing of the library's framing or codecs is used to
build or read what crosses the socket; the library is only driven the way a
user drives it (a listener and its pool, an agent and its connector).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.proxy.auth import StaticTokenChecker
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory
from sentinel_twisted.proxy.pool import PoolObserver
from sentinel_twisted.proxy.protocol import ReverseConnectionProtocol

# The frame types and the length limit, written from SPEC sections 1 and 2 in
# the raw test agent (never from the library's wire module).
from .rawagent import (
    AGENT_RESPONSE,
    CANCEL,
    CONFIG_UPDATE_REQUEST,
    CONFIGURE,
    FLOW_CONTROL,
    GUARDRAIL_INSPECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    HEALTH_STATUS,
    MAX_LENGTH,
    METRICS_REPORT,
    PING,
    PONG,
    REQUEST_BODY_CHUNK,
    REQUEST_COMPLETE,
    REQUEST_HEADERS,
    RESPONSE_BODY_CHUNK,
    RESPONSE_HEADERS,
    WEBSOCKET_FRAME,
)
from .vectors import EVENT_VECTORS, vectors_dir

# -- the wire, from SPEC section 1 and 2 ---------------------------------------

EVENT_TYPES = (
    REQUEST_HEADERS,
    REQUEST_BODY_CHUNK,
    RESPONSE_HEADERS,
    RESPONSE_BODY_CHUNK,
    REQUEST_COMPLETE,
    WEBSOCKET_FRAME,
    GUARDRAIL_INSPECT,
    CONFIGURE,
)


def frame(message_type: int, payload: bytes | str | dict[str, Any] | list[Any]) -> bytes:
    """One frame: C{u32 BE length (type byte + payload) | type | payload}."""
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return struct.pack(">IB", len(payload) + 1, message_type) + payload


def vector(name: str) -> dict[str, Any]:
    with open(os.path.join(vectors_dir(), name + ".json"), encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def capabilities(agent_id: str = "waf-1") -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "name": "WAF Agent",
        "version": "1.2.0",
        "supported_events": [1, 2],
        "features": {
            "streaming_body": True,
            "websocket": False,
            "guardrails": False,
            "config_push": False,
            "metrics_export": False,
            "concurrent_requests": 10,
            "cancellation": True,
            "flow_control": True,
            "health_reporting": False,
        },
        "limits": {"max_body_size": 1048576, "max_concurrency": 10, "preferred_chunk_size": 65536},
    }


def registration(agent_id: str = "waf-1", **fields: Any) -> dict[str, Any]:
    request = {
        "protocol_version": 2,
        "agent_id": agent_id,
        "capabilities": capabilities(agent_id),
        "auth_token": None,
        "metadata": None,
    }
    request.update(fields)
    return request


def answer(cid: Any, decision: Any = "allow", **fields: Any) -> dict[str, Any]:
    """A full AgentResponse, as the reference writes one."""
    body: dict[str, Any] = {
        "version": 2,
        "decision": decision,
        "request_headers": [],
        "response_headers": [],
        "routing_metadata": {},
        "audit": {"tags": [], "rule_ids": [], "confidence": None, "reason_codes": [], "custom": {"correlation_id": cid}},
        "needs_more": False,
        "request_body_mutation": None,
        "response_body_mutation": None,
        "websocket_decision": None,
    }
    body.update(fields)
    return body


Frame = tuple[int, bytes]


class RawPeer(Protocol):
    """
    Either end of a connection, knowing the SPEC's framing only.  Frames
    are parsed here with C{struct}; C{next_frame()} fires with the next one,
    or with C{None} once the connection is gone and no frame is left.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.frames: deque[Frame] = deque()
        self.waiters: deque[Deferred[Frame | None]] = deque()
        self.gone = False
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack_from(">I", self.buffer)
            assert 0 < length <= MAX_LENGTH, f"peer sent a frame of declared length {length}"
            if len(self.buffer) < 4 + length:
                break
            item = (self.buffer[4], bytes(self.buffer[5 : 4 + length]))
            del self.buffer[: 4 + length]
            if self.waiters:
                self.waiters.popleft().callback(item)
            else:
                self.frames.append(item)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gone = True
        while self.waiters:
            self.waiters.popleft().callback(None)
        self.lost.callback(None)

    def next_frame(self) -> Deferred[Frame | None]:
        d: Deferred[Frame | None] = Deferred()
        if self.frames:
            d.callback(self.frames.popleft())
        elif self.gone:
            d.callback(None)
        else:
            self.waiters.append(d)
        return d

    @inlineCallbacks
    def next_json(self, expected_type: int) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        got = yield self.next_frame()
        assert got is not None, f"connection closed while waiting for a 0x{expected_type:02x} frame"
        message_type, payload = got
        assert message_type == expected_type, f"got 0x{message_type:02x} {payload[:200]!r}, wanted 0x{expected_type:02x}"
        decoded: dict[str, Any] = json.loads(payload)
        return decoded

    def send(self, message_type: int, payload: bytes | str | dict[str, Any] | list[Any]) -> None:
        self.transport.write(frame(message_type, payload))  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


def short_dir(test: TestCase) -> str:
    """A directory whose socket paths fit the 108 bytes of sun_path."""
    path = tempfile.mkdtemp(prefix="sbb-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def capture_log(test: TestCase) -> list[str]:
    """Every log event emitted until the test ends, formatted, with each field's repr."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")
        lines.extend(f"{key}={value!r}" for key, value in event.items())

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


# -- our proxy side ------------------------------------------------------------


class Observer(PoolObserver):
    """Records what the pool tells observers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.waiting: dict[str, list[Deferred[Any]]] = {}

    def _record(self, kind: str, value: Any) -> None:
        self.seen.append((kind, value))
        for d in self.waiting.pop(kind, []):
            d.callback(value)

    def wait(self, kind: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.setdefault(kind, []).append(d)
        return d

    def agent_registered(self, connection: Any) -> None:
        self._record("registered", connection)

    def agent_disconnected(self, connection: Any, reason: str) -> None:
        self._record("disconnected", (connection, reason))

    def health_changed(self, connection: Any, state: int | None) -> None:
        self._record("health", state)

    def flow_control_changed(self, connection: Any, paused: bool) -> None:
        self._record("flow", paused)

    def metrics_reported(self, connection: Any, report: dict[str, Any]) -> None:
        self._record("metrics", report)

    def config_update_requested(self, connection: Any, request: dict[str, Any]) -> None:
        self._record("config_update", request)


class TrackingFactory(ReverseConnectionFactory):
    """The listener, with a Deferred per accepted connection that fires once it is gone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gone: list[Deferred[None]] = []
        self._accept_waiters: list[tuple[int, Deferred[None]]] = []

    def accepted(self, count: int) -> Deferred[None]:
        """Fires once C{count} connections have been accepted."""
        d: Deferred[None] = Deferred()
        if len(self.gone) >= count:
            d.callback(None)
        else:
            self._accept_waiters.append((count, d))
        return d

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if isinstance(protocol, ReverseConnectionProtocol):
            gone: Deferred[None] = Deferred()
            self.gone.append(gone)
            original = protocol.connectionLost

            def lost(reason: Any = None) -> None:
                if reason is None:
                    original()
                else:
                    original(reason)
                gone.callback(None)

            protocol.connectionLost = lost  # type: ignore[method-assign]
            ready = [w for w in self._accept_waiters if w[0] <= len(self.gone)]
            for w in ready:
                self._accept_waiters.remove(w)
                w[1].callback(None)
        return protocol


class ProxySideTestCase(TestCase):
    """A listener on a UNIX socket, and raw agents dialling it."""

    timeout = 60

    def listen(self, token_checker: Any = None, **config: Any) -> Deferred[TrackingFactory]:
        path = os.path.join(short_dir(self), "proxy.sock")
        self.factory = TrackingFactory(ReverseConnectionConfig(**config), token_checker=token_checker)
        self.observer = Observer()
        self.factory.pool.add_observer(self.observer)
        self.path = path
        self.peers: list[RawPeer] = []
        d = UNIXServerEndpoint(reactor, path).listen(self.factory)

        def listening(port: Any) -> TrackingFactory:
            self.addCleanup(self._stop, port)
            return self.factory

        return d.addCallback(listening)

    @inlineCallbacks
    def _stop(self, port: Any) -> Generator[Deferred[Any], Any, None]:
        for peer in self.peers:
            if not peer.gone:
                peer.transport.abortConnection()  # type: ignore[union-attr]
        yield gatherResults(self.factory.gone)
        yield port.stopListening()

    @inlineCallbacks
    def dial(self) -> Generator[Deferred[Any], Any, RawPeer]:
        peer = RawPeer()
        self.peers.append(peer)
        yield connectProtocol(UNIXClientEndpoint(reactor, self.path), peer)
        yield self.factory.accepted(len(self.peers))
        return peer

    @inlineCallbacks
    def register(self, agent_id: str = "waf-1", **fields: Any) -> Generator[Deferred[Any], Any, tuple[RawPeer, dict[str, Any]]]:
        peer = yield self.dial()
        peer.send(HANDSHAKE_REQUEST, registration(agent_id, **fields))
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        return peer, response

    @inlineCallbacks
    def registered(self, agent_id: str = "waf-1") -> Generator[Deferred[Any], Any, RawPeer]:
        peer, response = yield self.register(agent_id)
        self.assertTrue(response["success"], response)
        return peer

    @inlineCallbacks
    def refused(self, peer: RawPeer) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """The RegistrationResponse of a refusal; the connection is then closed."""
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertEqual(
            set(response), {"success", "error", "proxy_id", "proxy_version", "connection_id"}
        )
        self.assertIs(response["success"], False)
        self.assertEqual(response["connection_id"], "")
        self.assertIsInstance(response["error"], str)
        after = yield peer.next_frame()
        self.assertIsNone(after)
        return response


class RegistrationTests(ProxySideTestCase):
    """SPEC section 3, as a raw agent sees it."""

    @inlineCallbacks
    def test_reference_registration_accepted(self) -> Generator[Deferred[Any], Any, None]:
        """The reference's minimal RegistrationRequest, byte for byte, is accepted with a full response."""
        yield self.listen()
        peer = yield self.dial()
        peer.write(bytes.fromhex(vector("reg_request_minimal")["frame_hex"]))
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertEqual(list(response), ["success", "error", "proxy_id", "proxy_version", "connection_id"])
        self.assertIs(response["success"], True)
        self.assertIsNone(response["error"])
        self.assertEqual(response["proxy_id"], "sentinel-proxy")
        self.assertIsInstance(response["proxy_version"], str)
        self.assertTrue(response["connection_id"])
        self.assertEqual(self.factory.pool.agent_ids(), ["waf-1"])

    @inlineCallbacks
    def test_vectors_with_token_and_metadata_accepted(self) -> Generator[Deferred[Any], Any, None]:
        yield self.listen()
        for name in ("reg_request_with_auth_token", "reg_request_with_metadata"):
            peer = yield self.dial()
            peer.write(bytes.fromhex(vector(name)["frame_hex"]))
            response = yield peer.next_json(HANDSHAKE_RESPONSE)
            self.assertIs(response["success"], True, name)

    @inlineCallbacks
    def test_connection_ids_unique_for_one_agent(self) -> Generator[Deferred[Any], Any, None]:
        """Several connections of one agent registered together get distinct ids."""
        yield self.listen()
        peers = []
        for _ in range(4):
            peer = yield self.dial()
            peers.append(peer)
        # All four requests in flight before any answer is read.
        for peer in peers:
            peer.send(HANDSHAKE_REQUEST, registration())
        ids = []
        for peer in peers:
            response = yield peer.next_json(HANDSHAKE_RESPONSE)
            self.assertTrue(response["success"])
            ids.append(response["connection_id"])
        self.assertEqual(len(set(ids)), 4)

    @inlineCallbacks
    def test_optional_fields_absent(self) -> Generator[Deferred[Any], Any, None]:
        """C{auth_token} and C{metadata} may be omitted."""
        yield self.listen()
        request = registration()
        del request["auth_token"], request["metadata"]
        peer = yield self.dial()
        peer.send(HANDSHAKE_REQUEST, request)
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertIs(response["success"], True)

    @inlineCallbacks
    def test_unknown_fields_ignored(self) -> Generator[Deferred[Any], Any, None]:
        """Unknown fields at every level are ignored, as serde does by default."""
        yield self.listen()
        request = registration(extra={"x": 1}, another=[1, 2])
        request["capabilities"]["extra"] = "x"
        request["capabilities"]["features"]["teleport"] = True
        request["capabilities"]["limits"]["max_moons"] = 3
        peer = yield self.dial()
        peer.send(HANDSHAKE_REQUEST, request)
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertIs(response["success"], True, response)

    @inlineCallbacks
    def test_free_form_metadata(self) -> Generator[Deferred[Any], Any, None]:
        """C{metadata} is any JSON value."""
        yield self.listen()
        for i, metadata in enumerate(([1, "two"], "text", 42, True, {"nested": {"deep": [None]}})):
            peer = yield self.dial()
            peer.send(HANDSHAKE_REQUEST, registration(f"waf-{i}", metadata=metadata))
            response = yield peer.next_json(HANDSHAKE_RESPONSE)
            self.assertIs(response["success"], True, (metadata, response))

    @inlineCallbacks
    def test_unknown_event_numbers_ignored(self) -> Generator[Deferred[Any], Any, None]:
        yield self.listen()
        request = registration()
        request["capabilities"]["supported_events"] = [1, 99, -1, 7, 0]
        peer = yield self.dial()
        peer.send(HANDSHAKE_REQUEST, request)
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertIs(response["success"], True, response)

    @inlineCallbacks
    def check_refused(
        self, request: Any, error_start: str, message_type: int = HANDSHAKE_REQUEST
    ) -> Generator[Deferred[Any], Any, str]:
        peer = yield self.dial()
        peer.send(message_type, request)
        response = yield self.refused(peer)
        self.assertTrue(response["error"].startswith(error_start), response["error"])
        error: str = response["error"]
        return error

    @inlineCallbacks
    def test_wrong_field_types(self) -> Generator[Deferred[Any], Any, None]:
        """Each required field of the wrong type: a clear "Invalid message format" refusal."""
        yield self.listen()
        cases: list[dict[str, Any]] = []
        for key, bad in (("agent_id", 7), ("capabilities", []), ("auth_token", 5), ("protocol_version", "2")):
            cases.append(registration(**{key: bad}))
        for key, bad in (("name", None), ("version", 1), ("supported_events", "1"), ("agent_id", None)):
            request = registration()
            request["capabilities"][key] = bad
            cases.append(request)
        for key, bad in (("streaming_body", 1), ("concurrent_requests", -1), ("concurrent_requests", 2**32), ("health_reporting", None)):
            request = registration()
            request["capabilities"]["features"][key] = bad
            cases.append(request)
        for key, bad in (("max_body_size", -1), ("max_body_size", 2**64), ("max_concurrency", 2**32), ("preferred_chunk_size", 1.5)):
            request = registration()
            request["capabilities"]["limits"][key] = bad
            cases.append(request)
        for request in cases:
            yield self.check_refused(request, "Invalid message format: ")

    @inlineCallbacks
    def test_missing_required_fields(self) -> Generator[Deferred[Any], Any, None]:
        """Every field of capabilities, features and limits is required (SPEC section 6)."""
        yield self.listen()
        for key in ("protocol_version", "agent_id", "capabilities"):
            request = registration()
            del request[key]
            yield self.check_refused(request, "Invalid message format: ")
        for key in list(capabilities()):
            request = registration()
            del request["capabilities"][key]
            yield self.check_refused(request, "Invalid message format: ")
        for part in ("features", "limits"):
            for key in list(capabilities()[part]):
                request = registration()
                del request["capabilities"][part][key]
                error = yield self.check_refused(request, "Invalid message format: ")
                self.assertIn(key, error)

    @inlineCallbacks
    def test_reference_negative_vectors(self) -> Generator[Deferred[Any], Any, None]:
        """Malformed, empty, wrong-type first frames: refused with the reference's error texts."""
        yield self.listen()
        for name in (
            "neg_registration_missing_required_field",
            "neg_registration_malformed_json",
            "neg_registration_empty_payload",
            "neg_registration_wrong_message_type",
        ):
            peer = yield self.dial()
            peer.write(bytes.fromhex(vector(name)["frame_hex"]))
            response = yield self.refused(peer)
            self.assertTrue(response["error"].startswith("Invalid message format: "), (name, response))
        peer = yield self.dial()
        peer.write(bytes.fromhex(vector("neg_registration_wrong_message_type")["frame_hex"]))
        response = yield self.refused(peer)
        self.assertEqual(
            response["error"],
            "Invalid message format: Expected registration request (HandshakeRequest), got AgentResponse",
        )

    @inlineCallbacks
    def test_every_other_first_frame_refused(self) -> Generator[Deferred[Any], Any, None]:
        yield self.listen()
        names = {
            HANDSHAKE_RESPONSE: "HandshakeResponse",
            REQUEST_HEADERS: "RequestHeaders",
            REQUEST_BODY_CHUNK: "RequestBodyChunk",
            RESPONSE_HEADERS: "ResponseHeaders",
            RESPONSE_BODY_CHUNK: "ResponseBodyChunk",
            REQUEST_COMPLETE: "RequestComplete",
            WEBSOCKET_FRAME: "WebSocketFrame",
            GUARDRAIL_INSPECT: "GuardrailInspect",
            CONFIGURE: "Configure",
            AGENT_RESPONSE: "AgentResponse",
            HEALTH_STATUS: "HealthStatus",
            METRICS_REPORT: "MetricsReport",
            CONFIG_UPDATE_REQUEST: "ConfigUpdateRequest",
            FLOW_CONTROL: "FlowControl",
            CANCEL: "Cancel",
            PING: "Ping",
            PONG: "Pong",
        }
        for message_type, name in names.items():
            error = yield self.check_refused(registration(), "", message_type)
            self.assertEqual(
                error, f"Invalid message format: Expected registration request (HandshakeRequest), got {name}"
            )

    @inlineCallbacks
    def test_validation_order(self) -> Generator[Deferred[Any], Any, None]:
        """Version, then empty id, then allowlist, then missing token: the first failure wins."""
        yield self.listen(allowed_agents=["waf-*"], require_auth=True, token_checker=StaticTokenChecker({"waf-1": "s3cret"}))
        error = yield self.check_refused(registration("", protocol_version=1), "")
        self.assertEqual(error, "Protocol version mismatch: expected 2, got 1")
        error = yield self.check_refused(registration("", protocol_version=3), "")
        self.assertEqual(error, "Protocol version mismatch: expected 2, got 3")
        error = yield self.check_refused(registration(""), "")
        self.assertEqual(error, "Invalid message format: Agent ID cannot be empty")
        error = yield self.check_refused(registration("intruder"), "")
        self.assertEqual(error, "Invalid message format: Agent 'intruder' is not in the allowed list")
        error = yield self.check_refused(registration("waf-1"), "")
        self.assertEqual(error, "Invalid message format: Authentication required but no token provided")
        lines = capture_log(self)
        error = yield self.check_refused(registration("waf-1", auth_token="wrong-T0KEN"), "")
        self.assertNotIn("wrong-T0KEN", error)
        self.assertIn("uthenticat", error)
        self.assertTrue(lines)
        self.assertNotIn("wrong-T0KEN", "\n".join(lines))
        peer, response = yield self.register("waf-1", auth_token="s3cret")
        self.assertIs(response["success"], True)

    @inlineCallbacks
    def test_connection_limit(self) -> Generator[Deferred[Any], Any, None]:
        """Over C{max_connections_per_agent}: refused with the limit in the text."""
        yield self.listen(max_connections_per_agent=2)
        for _ in range(2):
            yield self.registered()
        error = yield self.check_refused(registration(), "")
        self.assertIn("2", error)
        self.assertIn("waf-1", error)
        self.assertEqual(len(self.factory.pool.connections("waf-1")), 2)

    @inlineCallbacks
    def test_oversize_values(self) -> Generator[Deferred[Any], Any, None]:
        """A huge agent id or metadata is refused with a clear error, not taken in."""
        yield self.listen()
        yield self.check_refused(registration("a" * 100_000), "Invalid message format: ")
        yield self.check_refused(registration(metadata={"blob": "x" * 200_000}), "Invalid message format: ")
        big = registration()
        big["capabilities"]["name"] = "n" * 200_000
        yield self.check_refused(big, "Invalid message format: ")

    @inlineCallbacks
    def test_not_json_payloads(self) -> Generator[Deferred[Any], Any, None]:
        yield self.listen()
        for payload in (b"\xff\xfe", b"[]", b"null", b"2", b'"text"', b"{", b'{"protocol_version": 2}' + b" x"):
            yield self.check_refused(payload, "Invalid message format: ")




def typed_event(name: str) -> Any:
    """The event of a vector, as a user of the pool would build it."""
    v = vector(name)
    return m.decode(v["payload"].encode("utf-8"), m.EVENT_CLASSES[v["message_type"]])


def with_cid(payload: dict[str, Any], cid: str) -> dict[str, Any]:
    """The vector payload with its correlation ids set to C{cid}."""
    payload = dict(payload, correlation_id=cid)
    if isinstance(payload.get("metadata"), dict) and "client_ip" in payload["metadata"]:
        payload["metadata"] = dict(payload["metadata"], correlation_id=cid)
    return payload


class FramingBeforeRegistrationTests(ProxySideTestCase):
    """SPEC section 1 on a connection that has not registered yet."""

    @inlineCallbacks
    def framing_error(self, data: bytes) -> Generator[Deferred[Any], Any, str]:
        yield self.listen()
        peer = yield self.dial()
        peer.write(data)
        response = yield self.refused(peer)
        yield self.factory.gone[-1]
        self.assertEqual(self.factory.awaiting_registration, 0)
        error: str = response["error"]
        return error

    @inlineCallbacks
    def test_zero_length(self) -> Generator[Deferred[Any], Any, None]:
        error = yield self.framing_error(b"\x00\x00\x00\x00")
        self.assertEqual(error, "Invalid message format: Zero-length message")

    @inlineCallbacks
    def test_unknown_type(self) -> Generator[Deferred[Any], Any, None]:
        error = yield self.framing_error(bytes.fromhex(vector("neg_unknown_message_type")["frame_hex"]))
        self.assertEqual(error, "Invalid message format: Unknown message type: 0xff")

    @inlineCallbacks
    def test_over_16_mib_dropped_before_body(self) -> Generator[Deferred[Any], Any, None]:
        """The length alone (and the type byte) is enough to refuse; no body is awaited."""
        error = yield self.framing_error(struct.pack(">IB", MAX_LENGTH + 1, HANDSHAKE_REQUEST))
        self.assertEqual(error, f"Message too large: {MAX_LENGTH + 1} bytes (max: {MAX_LENGTH})")

    @inlineCallbacks
    def test_over_16_mib_length_alone(self) -> Generator[Deferred[Any], Any, None]:
        error = yield self.framing_error(struct.pack(">I", 0xFFFFFFFF))
        self.assertTrue(error.startswith("Message too large: 4294967295 bytes"), error)

    @inlineCallbacks
    def test_eof_mid_frame(self) -> Generator[Deferred[Any], Any, None]:
        """An agent gone mid-frame or mid-prefix leaves nothing behind."""
        yield self.listen()
        for data in (b"\x00\x00", frame(HANDSHAKE_REQUEST, registration())[:40]):
            peer = yield self.dial()
            peer.write(data)
            peer.transport.loseConnection()  # type: ignore[union-attr]
            yield self.factory.gone[-1]
        self.assertEqual(self.factory.awaiting_registration, 0)
        self.assertEqual(self.factory.frame_budget.total, 0)
        self.assertEqual(len(self.factory.pool), 0)

    @inlineCallbacks
    def test_handshake_timeout(self) -> Generator[Deferred[Any], Any, None]:
        """Silence, or a registration never finished: refused with the timeout, then closed."""
        yield self.listen(handshake_timeout=0.2)
        for data in (b"", frame(HANDSHAKE_REQUEST, registration())[:-1]):
            peer = yield self.dial()
            if data:
                peer.write(data)
            response = yield self.refused(peer)
            self.assertEqual(response["error"], "Timeout after 200ms")
        self.assertEqual(self.factory.awaiting_registration, 0)
        self.assertEqual(self.factory.frame_budget.total, 0)

    @inlineCallbacks
    def test_registration_one_byte_per_write(self) -> Generator[Deferred[Any], Any, None]:
        yield self.listen()
        peer = yield self.dial()
        for byte in frame(HANDSHAKE_REQUEST, registration()):
            peer.write(bytes([byte]))
            yield deferLater(reactor, 0, lambda: None)
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertIs(response["success"], True)

    @inlineCallbacks
    def test_registration_and_more_in_one_write(self) -> Generator[Deferred[Any], Any, None]:
        """Frames after the registration in the same write are read once registered."""
        yield self.listen()
        peer = yield self.dial()
        ping = b'{"sequence":7,"timestamp_ms":1}'
        peer.write(
            frame(HANDSHAKE_REQUEST, registration())
            + frame(HEALTH_STATUS, {"state": 2})
            + frame(PING, ping)
            + frame(FLOW_CONTROL, {"action": 1})
        )
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertIs(response["success"], True)
        pong = yield peer.next_frame()
        self.assertEqual(pong, (PONG, ping))
        (conn,) = self.factory.pool.connections("waf-1")
        self.assertEqual(conn.health_state, 2)
        self.assertTrue(conn.is_paused)
        self.assertFalse(conn.can_accept_requests)


class RegisteredTests(ProxySideTestCase):
    """SPEC section 4: events, answers and control on a registered connection."""

    @inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        yield self.listen(request_timeout=30)
        self.agent = yield self.registered()

    def send(self, name: str, cid: str | None = None, timeout: float | None = None) -> Deferred[Any]:
        return self.factory.pool.send_event("waf-1", typed_event(name), cid, timeout)

    @inlineCallbacks
    def test_every_event_type_as_the_vectors(self) -> Generator[Deferred[Any], Any, None]:
        """Each event arrives with its type byte, equal as JSON to its vector with the id inserted."""
        for name in EVENT_VECTORS:
            v = vector(name)
            d = self.send(name, f"cid-{name}")
            message_type, payload = yield self.agent.next_frame()
            self.assertEqual(message_type, v["message_type"], name)
            self.assertEqual(json.loads(payload), with_cid(json.loads(v["payload"]), f"cid-{name}"), name)
            self.agent.send(AGENT_RESPONSE, answer(f"cid-{name}"))
            response = yield d
            self.assertTrue(response.is_allow)
        self.assertEqual(self.factory.pool.in_flight, 0)

    @inlineCallbacks
    def test_override_correlation_id(self) -> Generator[Deferred[Any], Any, None]:
        """The id given to send wins over the event's own (vector evt_response_headers_correlation_override)."""
        d = self.send("evt_response_headers", "arg-cid")
        got = yield self.agent.next_json(RESPONSE_HEADERS)
        self.assertEqual(got, json.loads(vector("evt_response_headers_correlation_override")["payload"]))
        self.agent.send(AGENT_RESPONSE, answer("arg-cid"))
        yield d

    @inlineCallbacks
    def test_every_answer_vector(self) -> Generator[Deferred[Any], Any, None]:
        """Each reference answer reaches its caller, read as the reference meant it."""
        names = [n for n in json.loads(open(os.path.join(vectors_dir(), "index.json")).read())["files"] if n.startswith("resp_")]
        self.assertEqual(len(names), 13)
        for name in names:
            d = self.send("evt_request_headers", "req-7f3a")
            yield self.agent.next_frame()
            self.agent.write(bytes.fromhex(vector(name)["frame_hex"]) if "frame_hex" in vector(name) else frame(AGENT_RESPONSE, vector(name)["payload"]))
            response = yield d
            wire = json.loads(vector(name)["payload"])
            self.assertEqual(json.loads(m.encode(response)), wire, name)

    @inlineCallbacks
    def test_minimal_answer_shapes(self) -> Generator[Deferred[Any], Any, None]:
        """Only C{version} and C{decision} are required; every decision and header op variant."""
        decisions = [
            "allow",
            {"block": {"status": 403, "body": None, "headers": None}},
            {"block": {"status": 451}},
            {"redirect": {"url": "https://example.com/", "status": 307}},
            {"redirect": {"url": "https://example.com/"}},
            {"challenge": {"challenge_type": "js", "params": {}}},
            {"challenge": {"challenge_type": "js"}},
        ]
        for i, decision in enumerate(decisions):
            d = self.send("evt_request_headers", f"c{i}")
            yield self.agent.next_frame()
            self.agent.send(AGENT_RESPONSE, {"version": 2, "decision": decision, "audit": {"custom": {"correlation_id": f"c{i}"}}})
            response = yield d
            wire = json.loads(m.encode(response.decision))
            if decision == "allow":
                self.assertEqual(wire, "allow")
            else:
                ((kind, body),) = decision.items()
                ((got_kind, got_body),) = wire.items()
                self.assertEqual(got_kind, kind)
                self.assertEqual({k: got_body[k] for k in body}, body)
        d = self.send("evt_request_headers", "ops")
        yield self.agent.next_frame()
        ops = [{"set": {"name": "a", "value": "1"}}, {"add": {"name": "b", "value": "2"}}, {"remove": {"name": "c"}}]
        self.agent.send(AGENT_RESPONSE, answer("ops", request_headers=ops, response_headers=ops[::-1],
                                                 routing_metadata={"upstream": "canary"}, needs_more=True,
                                                 request_body_mutation={"data": "", "chunk_index": 0},
                                                 response_body_mutation={"data": None, "chunk_index": 4},
                                                 websocket_decision={"close": {"code": 1008, "reason": "x"}}))
        response = yield d
        wire = json.loads(m.encode(response))
        self.assertEqual(wire["request_headers"], ops)
        self.assertEqual(wire["response_headers"], ops[::-1])
        self.assertIs(wire["needs_more"], True)
        self.assertEqual(wire["request_body_mutation"], {"data": "", "chunk_index": 0})
        self.assertEqual(wire["websocket_decision"], {"close": {"code": 1008, "reason": "x"}})

    @inlineCallbacks
    def test_audit_fields(self) -> Generator[Deferred[Any], Any, None]:
        d = self.send("evt_request_headers", "aud")
        yield self.agent.next_frame()
        audit = {"tags": ["t"], "rule_ids": ["r1", "r2"], "confidence": 0.5, "reason_codes": ["X"],
                 "custom": {"correlation_id": "aud", "score": 5, "nested": {"a": [1, None]}}}
        self.agent.send(AGENT_RESPONSE, {"version": 2, "decision": "allow", "audit": audit})
        response = yield d
        self.assertEqual(json.loads(m.encode(response.audit)), audit)

    @inlineCallbacks
    def test_out_of_order_answers(self) -> Generator[Deferred[Any], Any, None]:
        """Pipelined requests answered in reverse order each get their own answer."""
        ds = [self.send("evt_request_headers", f"o{i}") for i in range(5)]
        for i in range(5):
            got = yield self.agent.next_json(REQUEST_HEADERS)
            self.assertEqual(got["correlation_id"], f"o{i}")
            self.assertEqual(got["metadata"]["correlation_id"], f"o{i}")
        for i in reversed(range(5)):
            self.agent.send(AGENT_RESPONSE, answer(f"o{i}", routing_metadata={"n": str(i)}))
        for i, d in enumerate(ds):
            response = yield d
            self.assertEqual(response.routing_metadata, {"n": str(i)})

    @inlineCallbacks
    def test_unknown_duplicate_and_unroutable_answers_dropped(self) -> Generator[Deferred[Any], Any, None]:
        """Answers for unknown ids, second answers, and answers without a usable id change nothing."""
        d = self.send("evt_request_headers", "one")
        yield self.agent.next_frame()
        self.agent.send(AGENT_RESPONSE, answer("nobody"))
        self.agent.send(AGENT_RESPONSE, answer(17))
        self.agent.send(AGENT_RESPONSE, answer(None))
        self.agent.send(AGENT_RESPONSE, {"version": 2, "decision": "allow"})
        self.agent.send(AGENT_RESPONSE, bytes.fromhex(vector("neg_agent_response_without_correlation_id")["frame_hex"])[5:])
        self.agent.send(AGENT_RESPONSE, answer("one", decision={"block": {"status": 401}}))
        self.agent.send(AGENT_RESPONSE, answer("one"))
        response = yield d
        self.assertFalse(response.is_allow)
        # The connection carries on.
        d = self.send("evt_request_headers", "two")
        yield self.agent.next_frame()
        self.agent.send(AGENT_RESPONSE, answer("two"))
        yield d
        self.assertEqual(len(self.factory.pool.connections("waf-1")), 1)
        self.assertEqual(self.factory.pool.in_flight, 0)

    @inlineCallbacks
    def test_invalid_answer_fails_its_request(self) -> Generator[Deferred[Any], Any, None]:
        """An answer that cannot be read but names its id fails that request at once (ours)."""
        bad_answers = [
            {"decision": "allow", "audit": {"custom": {"correlation_id": "bad"}}},
            {"version": 2, "audit": {"custom": {"correlation_id": "bad"}}},
            answer("bad", decision="deny"),
            answer("bad", decision={"block": {"status": "403"}}),
            answer("bad", request_headers=[{"rename": {"name": "a"}}]),
            answer("bad", needs_more="yes"),
        ]
        for bad in bad_answers:
            d = self.send("evt_request_headers", "bad")
            yield self.agent.next_frame()
            self.agent.send(AGENT_RESPONSE, bad)
            failure = yield self.assertFailure(d, m.InvalidMessage if hasattr(m, "InvalidMessage") else Exception)
            self.assertTrue(str(failure).startswith("Invalid message format: "), str(failure))
        self.assertEqual(self.factory.pool.in_flight, 0)

    @inlineCallbacks
    def test_duplicate_correlation_id_refused(self) -> Generator[Deferred[Any], Any, None]:
        """A second request under an id still waiting fails at once, clearly; the first is unaffected."""
        first = self.send("evt_request_headers", "same")
        yield self.agent.next_frame()
        failure = yield self.assertFailure(self.send("evt_response_headers", "same"), Exception)
        self.assertIn("same", str(failure))
        self.assertTrue(str(failure).startswith("Invalid message format: "), str(failure))
        self.agent.send(AGENT_RESPONSE, answer("same"))
        yield first
        self.assertEqual(self.factory.pool.in_flight, 0)

    @inlineCallbacks
    def test_timeout_frees_the_request(self) -> Generator[Deferred[Any], Any, None]:
        """No answer: the caller gets "Timeout after D", nothing stays pending; the agent is told."""
        d = self.send("evt_request_headers", "slow", timeout=0.1)
        yield self.agent.next_frame()
        failure = yield self.assertFailure(d, Exception)
        self.assertEqual(str(failure), "Timeout after 100ms")
        self.assertEqual(self.factory.pool.in_flight, 0)
        cancel = yield self.agent.next_json(CANCEL)
        self.assertEqual(set(cancel), {"correlation_id", "reason", "timestamp_ms"})
        self.assertEqual((cancel["correlation_id"], cancel["reason"]), ("slow", 1))
        # A late answer is dropped, and the same id may be used again.
        self.agent.send(AGENT_RESPONSE, answer("slow"))
        d = self.send("evt_request_headers", "slow")
        yield self.agent.next_frame()
        self.agent.send(AGENT_RESPONSE, answer("slow"))
        yield d

    @inlineCallbacks
    def test_cancel(self) -> Generator[Deferred[Any], Any, None]:
        """Cancel sends 0x40 with reason and timestamp; the caller fails at once."""
        for reason in range(6):
            d = self.send("evt_request_headers", f"x{reason}")
            yield self.agent.next_frame()
            self.assertTrue(self.factory.pool.cancel_request(f"x{reason}", reason))
            self.assertTrue(d.called)
            yield self.assertFailure(d, Exception)
            cancel = yield self.agent.next_json(CANCEL)
            self.assertEqual(set(cancel), {"correlation_id", "reason", "timestamp_ms"})
            self.assertEqual((cancel["correlation_id"], cancel["reason"]), (f"x{reason}", reason))
            self.assertIsInstance(cancel["timestamp_ms"], int)
        self.assertFalse(self.factory.pool.cancel_request("nobody"))
        # A caller that cancels its own Deferred: the agent is told (reason 5, manual).
        d = self.send("evt_request_headers", "mine")
        yield self.agent.next_frame()
        d.cancel()
        yield self.assertFailure(d, Exception)
        cancel = yield self.agent.next_json(CANCEL)
        self.assertEqual((cancel["correlation_id"], cancel["reason"]), ("mine", 5))
        ds = [self.send("evt_request_headers", f"all{i}") for i in range(3)]
        for _ in ds:
            yield self.agent.next_frame()
        self.assertEqual(self.factory.pool.cancel_all(4), 3)
        for d in ds:
            yield self.assertFailure(d, Exception)
        for _ in range(3):
            cancel = yield self.agent.next_json(CANCEL)
            self.assertEqual(cancel["reason"], 4)
        self.assertEqual(self.factory.pool.in_flight, 0)

    @inlineCallbacks
    def test_flow_control(self) -> Generator[Deferred[Any], Any, None]:
        """Pause refuses new requests with the SPEC's text; resume lets them through; struct form too."""
        for pause, resume in (({"action": 1}, {"action": 2}), ({"action": {"type": "pause"}}, {"action": {"type": "resume"}}),
                              (json.loads(vector("ctl_flow_control_serde_struct_not_understood")["payload"]), {"action": 2})):
            waiting = self.observer.wait("flow")
            self.agent.send(FLOW_CONTROL, pause)
            paused = yield waiting
            self.assertIs(paused, True)
            failure = yield self.assertFailure(self.send("evt_request_headers", "p"), Exception)
            self.assertEqual(str(failure), "Flow control paused: agent 'waf-1' requested backpressure")
            waiting = self.observer.wait("flow")
            self.agent.send(FLOW_CONTROL, resume)
            paused = yield waiting
            self.assertIs(paused, False)
            d = self.send("evt_request_headers", "r")
            yield self.agent.next_frame()
            self.agent.send(AGENT_RESPONSE, answer("r"))
            yield d

    @inlineCallbacks
    def test_health_metrics_config_update(self) -> Generator[Deferred[Any], Any, None]:
        """HealthStatus is kept per connection; MetricsReport and ConfigUpdateRequest reach observers."""
        (conn,) = self.factory.pool.connections("waf-1")
        for state in (1, 2, 3, 4):
            waiting = self.observer.wait("health")
            self.agent.send(HEALTH_STATUS, {"state": state, "message": "m", "extra": [1]})
            got = yield waiting
            self.assertEqual((got, conn.health_state), (state, state))
        waiting = self.observer.wait("health")
        self.agent.send(HEALTH_STATUS, json.loads(vector("ctl_health_status_serde_struct_not_understood")["payload"]))
        got = yield waiting
        self.assertEqual(got, 1)
        waiting = self.observer.wait("metrics")
        self.agent.write(bytes.fromhex(vector("ctl_metrics_report")["frame_hex"]))
        report = yield waiting
        self.assertEqual(report, json.loads(vector("ctl_metrics_report")["payload"]))
        waiting = self.observer.wait("config_update")
        self.agent.send(CONFIG_UPDATE_REQUEST, {"request_id": "u1", "update": {"rules": [1]}})
        request = yield waiting
        self.assertEqual(request["request_id"], "u1")

    @inlineCallbacks
    def test_health_without_a_state_keeps_the_last(self) -> Generator[Deferred[Any], Any, None]:
        """A HealthStatus without a readable state changes nothing, as the reference's C{if let Some(state)}."""
        (conn,) = self.factory.pool.connections("waf-1")
        waiting = self.observer.wait("health")
        self.agent.send(HEALTH_STATUS, {"state": 2})
        self.assertEqual((yield waiting), 2)
        for payload in ({"message": "no state"}, {"state": None}, {"state": {"status": "sideways"}}):
            self.agent.send(HEALTH_STATUS, payload)
        # A round trip: everything sent before it has been read.
        self.agent.send(PING, {"sequence": 9, "timestamp_ms": 0})
        yield self.agent.next_json(PONG)
        self.assertEqual(conn.health_state, 2)
        self.assertEqual([v for k, v in self.observer.seen if k == "health"], [2])

    @inlineCallbacks
    def test_ping_pong(self) -> Generator[Deferred[Any], Any, None]:
        """Pings either way; Pong carries the same body."""
        body = bytes.fromhex(vector("ctl_ping")["frame_hex"])[5:]
        self.agent.send(PING, body)
        pong = yield self.agent.next_frame()
        self.assertEqual(pong, (PONG, body))
        (conn,) = self.factory.pool.connections("waf-1")
        d = conn.ping()
        message_type, payload = yield self.agent.next_frame()
        self.assertEqual(message_type, PING)
        ping = json.loads(payload)
        self.assertEqual(set(ping), {"sequence", "timestamp_ms"})
        self.agent.send(PONG, payload)
        rtt = yield d
        self.assertGreaterEqual(rtt, 0)

    @inlineCallbacks
    def test_frames_only_the_proxy_sends_are_ignored(self) -> Generator[Deferred[Any], Any, None]:
        """Event, Cancel and handshake frames from the agent do not end the connection."""
        for message_type in (*EVENT_TYPES, CANCEL, HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE):
            self.agent.send(message_type, {"correlation_id": "x"})
        self.agent.send(HANDSHAKE_REQUEST, registration())
        d = self.send("evt_request_headers", "after")
        got = yield self.agent.next_json(REQUEST_HEADERS)
        self.assertEqual(got["correlation_id"], "after")
        self.agent.send(AGENT_RESPONSE, answer("after"))
        yield d

    @inlineCallbacks
    def test_invalid_control_frames_are_ignored(self) -> Generator[Deferred[Any], Any, None]:
        for message_type in (HEALTH_STATUS, METRICS_REPORT, CONFIG_UPDATE_REQUEST, FLOW_CONTROL, PING, PONG):
            for payload in (b"", b"not json", b"[]", b"\xff", b'{"state": "x", "action": "y", "sequence": -1}'):
                self.agent.send(message_type, payload)
        self.agent.send(FLOW_CONTROL, {"action": 3})
        self.agent.send(FLOW_CONTROL, {})
        d = self.send("evt_request_headers", "after")
        yield self.agent.next_frame()
        self.agent.send(AGENT_RESPONSE, answer("after"))
        yield d

    @inlineCallbacks
    def test_empty_payload_of_every_type(self) -> Generator[Deferred[Any], Any, None]:
        """Length 1 (the type byte alone) of every type: no crash, no close, no answer to a Ping."""
        all_types = (HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE, *EVENT_TYPES, AGENT_RESPONSE, HEALTH_STATUS,
                     METRICS_REPORT, CONFIG_UPDATE_REQUEST, FLOW_CONTROL, CANCEL, PING, PONG)
        self.agent.write(b"".join(struct.pack(">IB", 1, t) for t in all_types))
        d = self.send("evt_request_headers", "after")
        got = yield self.agent.next_frame()
        self.assertEqual(got[0], REQUEST_HEADERS)
        self.agent.send(AGENT_RESPONSE, answer("after"))
        yield d

    @inlineCallbacks
    def test_answer_split_into_single_bytes(self) -> Generator[Deferred[Any], Any, None]:
        d = self.send("evt_request_headers", "split")
        yield self.agent.next_frame()
        for byte in frame(AGENT_RESPONSE, answer("split")):
            self.agent.write(bytes([byte]))
            yield deferLater(reactor, 0, lambda: None)
        yield d

    @inlineCallbacks
    def test_many_answers_in_one_write(self) -> Generator[Deferred[Any], Any, None]:
        ds = [self.send("evt_request_headers", f"m{i}") for i in range(40)]
        for _ in ds:
            yield self.agent.next_frame()
        self.agent.write(b"".join(frame(AGENT_RESPONSE, answer(f"m{i}")) for i in range(40)))
        yield gatherResults(ds)
        self.assertEqual(self.factory.pool.in_flight, 0)

    @inlineCallbacks
    def test_largest_frame_accepted(self) -> Generator[Deferred[Any], Any, None]:
        """An answer of exactly the largest length (16 MiB with the type byte) is read."""
        d = self.send("evt_request_headers", "big")
        yield self.agent.next_frame()
        body = json.dumps(answer("big")).encode()
        padded = body[:-1] + b" " * (MAX_LENGTH - 1 - len(body)) + b"}"
        self.assertEqual(len(padded) + 1, MAX_LENGTH)
        self.agent.send(AGENT_RESPONSE, padded)
        response = yield d
        self.assertTrue(response.is_allow)

    @inlineCallbacks
    def check_connection_ends(self, data: bytes) -> Generator[Deferred[Any], Any, Any]:
        """Pending requests fail at once with "Connection closed", and the connection leaves the pool."""
        ds = [self.send("evt_request_headers", f"p{i}") for i in range(3)]
        for _ in ds:
            yield self.agent.next_frame()
        if data:
            self.agent.write(data)
        else:
            self.agent.transport.loseConnection()  # type: ignore[union-attr]
        for d in ds:
            failure = yield self.assertFailure(d, Exception)
            self.assertEqual(str(failure), "Connection closed")
        yield self.agent.lost
        yield self.factory.gone[-1]
        self.assertEqual(len(self.factory.pool), 0)
        self.assertEqual(self.factory.pool.in_flight, 0)
        self.assertEqual(self.factory.frame_budget.total, 0)
        failure = yield self.assertFailure(self.send("evt_request_headers", "later"), Exception)
        self.assertEqual(str(failure), "Agent unavailable")
        return failure

    def test_closed_by_agent(self) -> Deferred[Any]:
        return self.check_connection_ends(b"")

    def test_zero_length_after_registration(self) -> Deferred[Any]:
        return self.check_connection_ends(b"\x00\x00\x00\x00")

    def test_unknown_type_after_registration(self) -> Deferred[Any]:
        return self.check_connection_ends(frame(0x99, {}))

    def test_over_max_declared_then_not_sent(self) -> Deferred[Any]:
        return self.check_connection_ends(struct.pack(">IB", MAX_LENGTH + 1, AGENT_RESPONSE))

    def test_closed_mid_frame(self) -> Deferred[Any]:
        self.addCleanup(lambda: None)
        return self.check_connection_ends_mid_frame()

    @inlineCallbacks
    def check_connection_ends_mid_frame(self) -> Generator[Deferred[Any], Any, None]:
        d = self.send("evt_request_headers", "mid")
        yield self.agent.next_frame()
        self.agent.write(frame(AGENT_RESPONSE, answer("mid"))[:-3])
        self.agent.transport.loseConnection()  # type: ignore[union-attr]
        failure = yield self.assertFailure(d, Exception)
        self.assertEqual(str(failure), "Connection closed")
        yield self.factory.gone[-1]
        self.assertEqual(self.factory.frame_budget.total, 0)


class FrameDeadlineTests(ProxySideTestCase):
    @inlineCallbacks
    def test_declared_then_not_sent(self) -> Generator[Deferred[Any], Any, None]:
        """A frame within the limit, declared and never finished: the connection ends at the frame deadline."""
        yield self.listen(frame_timeout=0.2)
        agent = yield self.registered()
        d = self.factory.pool.send_event("waf-1", typed_event("evt_request_headers"), "dl")
        yield agent.next_frame()
        agent.write(struct.pack(">IB", 1000, AGENT_RESPONSE) + b"{")
        failure = yield self.assertFailure(d, Exception)
        self.assertEqual(str(failure), "Connection closed")
        yield agent.lost
        self.assertEqual(self.factory.frame_budget.total, 0)


# -- our agent side ------------------------------------------------------------


class RawProxyFactory(Factory):
    """A raw proxy listening for agents: C{next_peer()} fires with each connection accepted."""

    def __init__(self) -> None:
        self.peers: list[RawPeer] = []
        self._waiting: deque[Deferred[RawPeer]] = deque()
        self._ready: deque[RawPeer] = deque()

    def buildProtocol(self, addr: Any) -> RawPeer:
        peer = RawPeer()
        self.peers.append(peer)
        if self._waiting:
            self._waiting.popleft().callback(peer)
        else:
            self._ready.append(peer)
        return peer

    def next_peer(self) -> Deferred[RawPeer]:
        d: Deferred[RawPeer] = Deferred()
        if self._ready:
            d.callback(self._ready.popleft())
        else:
            self._waiting.append(d)
        return d


def success(connection_id: str = "waf-1-abc-1") -> dict[str, Any]:
    return {"success": True, "error": None, "proxy_id": "raw-proxy", "proxy_version": "0.0.1", "connection_id": connection_id}


class AgentSideTestCase(TestCase):
    """Our agent, dialling a raw proxy on a UNIX socket."""

    timeout = 60

    @inlineCallbacks
    def start_agent(self, agent: Any = None, **options: Any) -> Generator[Deferred[Any], Any, RawPeer]:
        from sentinel_twisted.agent import Agent, AgentConnector

        path = os.path.join(short_dir(self), "proxy.sock")
        self.proxy = RawProxyFactory()
        port = yield UNIXServerEndpoint(reactor, path).listen(self.proxy)
        options.setdefault("drain_grace", 0.5)
        options.setdefault("jitter", lambda: 0.0)
        options.setdefault("initial_delay", 0.05)
        self.connector = AgentConnector(agent if agent is not None else Agent(), f"unix:{path}", "waf-1", **options)
        self.connector.startService()

        @inlineCallbacks
        def stop() -> Generator[Deferred[Any], Any, None]:
            yield self.connector.stopService()
            for peer in self.proxy.peers:
                if not peer.gone:
                    peer.transport.abortConnection()  # type: ignore[union-attr]
                yield peer.lost
            yield port.stopListening()

        self.addCleanup(stop)
        peer = yield self.proxy.next_peer()
        return peer

    @inlineCallbacks
    def serving(self, agent: Any = None, **options: Any) -> Generator[Deferred[Any], Any, RawPeer]:
        """A raw proxy connection on which the agent has registered."""
        peer = yield self.start_agent(agent, **options)
        yield peer.next_json(HANDSHAKE_REQUEST)
        registered = self.connector.when_registered()
        peer.send(HANDSHAKE_RESPONSE, success())
        yield registered
        return peer


class AgentRegistrationTests(AgentSideTestCase):
    """SPEC section 3 from the agent's side."""

    @inlineCallbacks
    def test_registration_request(self) -> Generator[Deferred[Any], Any, None]:
        """Every field the reference parser requires, with C{null} for the unset options."""
        peer = yield self.start_agent()
        request = yield peer.next_json(HANDSHAKE_REQUEST)
        self.assertEqual(set(request), {"protocol_version", "agent_id", "capabilities", "auth_token", "metadata"})
        self.assertEqual(request["protocol_version"], 2)
        self.assertEqual(request["agent_id"], "waf-1")
        self.assertIsNone(request["auth_token"])
        self.assertIsNone(request["metadata"])
        caps = request["capabilities"]
        self.assertEqual(set(caps), set(capabilities()))
        self.assertEqual(caps["agent_id"], "waf-1")
        self.assertIsInstance(caps["name"], str)
        self.assertIsInstance(caps["version"], str)
        self.assertTrue(all(isinstance(n, int) and 0 <= n <= 7 for n in caps["supported_events"]))
        self.assertEqual(set(caps["features"]), set(capabilities()["features"]))
        for key, value in caps["features"].items():
            self.assertIsInstance(value, int if key == "concurrent_requests" else bool, key)
        self.assertEqual(set(caps["limits"]), set(capabilities()["limits"]))
        for value in caps["limits"].values():
            self.assertIsInstance(value, int)
            self.assertGreaterEqual(value, 0)

    @inlineCallbacks
    def test_token_and_metadata_sent(self) -> Generator[Deferred[Any], Any, None]:
        peer = yield self.start_agent(auth_token="s3cret", metadata={"region": "eu", "n": [1]})
        request = yield peer.next_json(HANDSHAKE_REQUEST)
        self.assertEqual((request["auth_token"], request["metadata"]), ("s3cret", {"region": "eu", "n": [1]}))

    @inlineCallbacks
    def test_response_vectors_accepted(self) -> Generator[Deferred[Any], Any, None]:
        peer = yield self.start_agent()
        yield peer.next_json(HANDSHAKE_REQUEST)
        registered = self.connector.when_registered()
        peer.write(bytes.fromhex(vector("reg_response_success")["frame_hex"]))
        protocol = yield registered
        self.assertEqual(protocol.connection_id, "waf-1-19b76daa800")

    @inlineCallbacks
    def test_response_without_error_field(self) -> Generator[Deferred[Any], Any, None]:
        """C{error} is an Option: the reference agent accepts a response without it."""
        peer = yield self.start_agent()
        yield peer.next_json(HANDSHAKE_REQUEST)
        response = success("c-1")
        del response["error"]
        peer.send(HANDSHAKE_RESPONSE, response)
        # Registered: its first HealthStatus comes (a refusal would close).
        yield peer.next_json(HEALTH_STATUS)
        (protocol,) = self.connector.protocols()
        self.assertEqual(protocol.connection_id, "c-1")


def held_agent() -> Any:
    """An agent that answers every event type, holding those whose id starts with "hold"."""
    from sentinel_twisted.agent import Agent, allow, routing_id

    class Holding(Agent):
        events = list(range(8))

        def __init__(self) -> None:
            self.held: dict[str, Deferred[Any]] = {}
            self.cancelled: list[str] = []
            self.seen: list[Any] = []

        def _answer(self, event: Any) -> Any:
            self.seen.append(event)
            cid = routing_id(event)
            if cid.startswith("hold"):
                d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(cid))
                self.held[cid] = d
                return d
            return allow().tag(type(event).__name__)

        on_request_headers = on_request_body_chunk = on_response_headers = _answer
        on_response_body_chunk = on_request_complete = on_guardrail_inspect = on_configure = _answer

        def on_websocket_frame(self, event: Any) -> Any:
            return self._answer(event)

    return Holding()


class AgentServingTests(AgentSideTestCase):
    """SPEC section 4 from the agent's side: every event, its answer, and control frames."""

    @inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        self.agent = held_agent()
        self.peer = yield self.serving(self.agent, health_interval=0)
        health = yield self.peer.next_json(HEALTH_STATUS)
        self.assertEqual(health["state"], 1)

    @inlineCallbacks
    def check_answer(self, cid: str) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        response = yield self.peer.next_json(AGENT_RESPONSE)
        self.assertEqual(set(response), set(json.loads(vector("resp_allow")["payload"])))
        self.assertEqual(response["version"], 2)
        self.assertEqual(response["audit"]["custom"]["correlation_id"], cid)
        return response

    @inlineCallbacks
    def test_every_event_vector_answered(self) -> Generator[Deferred[Any], Any, None]:
        for name in EVENT_VECTORS:
            self.peer.write(bytes.fromhex(vector(name)["frame_hex"]))
            response = yield self.check_answer(json.loads(vector(name)["payload"])["correlation_id"])
            self.assertEqual(response["decision"], "allow", name)
        self.assertEqual(len(self.agent.seen), len(EVENT_VECTORS))

    @inlineCallbacks
    def test_request_headers_answered_by_metadata_id(self) -> Generator[Deferred[Any], Any, None]:
        """Reference agents answer RequestHeaders by C{metadata.correlation_id} (SPEC section 6)."""
        event = json.loads(vector("evt_request_headers")["payload"])
        event["correlation_id"] = "top"
        event["metadata"]["correlation_id"] = "meta"
        self.peer.send(REQUEST_HEADERS, event)
        yield self.check_answer("meta")

    @inlineCallbacks
    def test_edge_case_contents(self) -> Generator[Deferred[Any], Any, None]:
        """Unknown fields, absent options, empty and non-ASCII values, extreme numbers: all answered."""
        headers = json.loads(vector("evt_request_headers_minimal_metadata")["payload"])
        headers.update(correlation_id="e1", uri="/\u00e9\u4e2d?\u0000=1", headers={"x": [], "": ["\u2028"]}, extra={"a": 1})
        headers["metadata"].update(correlation_id="e1", client_port=65535)
        for key in ("server_name", "tls_version", "tls_cipher", "route_id", "upstream_id"):
            del headers["metadata"][key]
        chunk = json.loads(vector("evt_request_body_chunk")["payload"])
        chunk.update(correlation_id="e2", data="", total_size=None, chunk_index=2**32 - 1, bytes_received=2**64 - 1)
        complete = json.loads(vector("evt_request_complete")["payload"])
        complete.update(correlation_id="e3", error="upstream \u00e9", duration_ms=0)
        del complete["error"]
        ws = json.loads(vector("evt_websocket_frame")["payload"])
        ws.update(correlation_id="e4", opcode="continuation", route_id=None, data="")
        guard = json.loads(vector("evt_guardrail_inspect_pii_minimal")["payload"])
        guard.update(correlation_id="e5", content="")
        configure = {"correlation_id": "e6", "config": None}
        for message_type, event in (
            (REQUEST_HEADERS, headers),
            (REQUEST_BODY_CHUNK, chunk),
            (REQUEST_COMPLETE, complete),
            (WEBSOCKET_FRAME, ws),
            (GUARDRAIL_INSPECT, guard),
            (CONFIGURE, configure),
        ):
            self.peer.send(message_type, event)
            response = yield self.check_answer(event["correlation_id"])
            self.assertEqual(response["decision"], "allow", event)

    @inlineCallbacks
    def test_body_chunk_counters_default_to_zero(self) -> Generator[Deferred[Any], Any, None]:
        """C{chunk_index} and the byte counts of body chunks are C{#[serde(default)]} in the reference: may be absent."""
        for message_type, name, counter in (
            (REQUEST_BODY_CHUNK, "evt_request_body_chunk", "bytes_received"),
            (RESPONSE_BODY_CHUNK, "evt_response_body_chunk", "bytes_sent"),
        ):
            event = json.loads(vector(name)["payload"])
            del event["chunk_index"], event[counter]
            self.peer.send(message_type, event)
            response = yield self.check_answer(event["correlation_id"])
            self.assertEqual(response["decision"], "allow")
            self.assertEqual((self.agent.seen[-1].chunk_index, getattr(self.agent.seen[-1], counter)), (0, 0))

    @inlineCallbacks
    def test_reference_binary_chunk_json_shape(self) -> Generator[Deferred[Any], Any, None]:
        """The reference proxy's binary body chunk path writes both byte counts, the other one null."""
        chunk = {"correlation_id": "bin-1", "data": "AAEC", "is_last": True, "total_size": 3,
                 "chunk_index": 0, "bytes_received": 3, "bytes_sent": None}
        self.peer.send(REQUEST_BODY_CHUNK, chunk)
        response = yield self.check_answer("bin-1")
        self.assertEqual(response["decision"], "allow")
        chunk.update(correlation_id="bin-2", bytes_received=None, bytes_sent=3)
        self.peer.send(RESPONSE_BODY_CHUNK, chunk)
        response = yield self.check_answer("bin-2")
        self.assertEqual(response["decision"], "allow")
        self.assertEqual(self.agent.seen[-1].body, b"\x00\x01\x02")

    @inlineCallbacks
    def test_invalid_event_with_id_gets_error_decision(self) -> Generator[Deferred[Any], Any, None]:
        """An event that cannot be read but names its id is answered, failing closed (ours)."""
        bad = json.loads(vector("evt_request_body_chunk")["payload"])
        bad.update(correlation_id="bad", chunk_index=-1)
        self.peer.send(REQUEST_BODY_CHUNK, bad)
        response = yield self.check_answer("bad")
        self.assertEqual(response["decision"]["block"]["status"], 500)
        # Without a usable id there is nobody to answer; the connection carries on.
        self.peer.send(REQUEST_HEADERS, b"not json")
        self.peer.send(RESPONSE_HEADERS, b"")
        self.peer.send(RESPONSE_HEADERS, {"status": "x"})
        # An event without any id is answered under the empty id, as the
        # reference's agent loop does (no proxy waits on it).
        self.peer.send(RESPONSE_HEADERS, {"status": 200})
        yield self.check_answer("")
        self.peer.write(bytes.fromhex(vector("evt_response_headers")["frame_hex"]))
        yield self.check_answer("req-7f3a")

    @inlineCallbacks
    def test_ping(self) -> Generator[Deferred[Any], Any, None]:
        body = bytes.fromhex(vector("ctl_ping")["frame_hex"])[5:]
        self.peer.send(PING, body)
        self.assertEqual((yield self.peer.next_frame()), (PONG, body))
        odd = b'{"sequence": 18446744073709551615, "timestamp_ms": -1, "more": [1]}'
        self.peer.send(PING, odd)
        self.assertEqual((yield self.peer.next_frame()), (PONG, odd))

    @inlineCallbacks
    def test_cancel(self) -> Generator[Deferred[Any], Any, None]:
        """A Cancel stops the handler and nothing is sent for it; unknown ids are ignored."""
        event = json.loads(vector("evt_request_headers")["payload"])
        event["metadata"]["correlation_id"] = event["correlation_id"] = "hold-1"
        self.peer.send(REQUEST_HEADERS, event)
        self.peer.send(PING, {"sequence": 1, "timestamp_ms": 1})
        yield self.peer.next_json(PONG)
        self.assertIn("hold-1", self.agent.held)
        self.peer.write(bytes.fromhex(vector("ctl_cancel_client_disconnect")["frame_hex"]))
        self.peer.send(CANCEL, {"correlation_id": "hold-1", "reason": 0, "timestamp_ms": 1})
        self.peer.send(CANCEL, {"correlation_id": "hold-1", "reason": 0, "timestamp_ms": 1})
        self.peer.send(CANCEL, {"bogus": True})
        self.peer.send(PING, {"sequence": 2, "timestamp_ms": 1})
        yield self.peer.next_json(PONG)
        self.assertEqual(self.agent.cancelled, ["hold-1"])
        self.peer.write(bytes.fromhex(vector("evt_response_headers")["frame_hex"]))
        yield self.check_answer("req-7f3a")

    @inlineCallbacks
    def test_out_of_order_answers(self) -> Generator[Deferred[Any], Any, None]:
        """Events are served concurrently; answers leave as they are ready."""
        for cid in ("hold-a", "hold-b"):
            chunk = json.loads(vector("evt_request_body_chunk")["payload"])
            chunk["correlation_id"] = cid
            self.peer.send(REQUEST_BODY_CHUNK, chunk)
        self.peer.send(PING, {"sequence": 1, "timestamp_ms": 1})
        yield self.peer.next_json(PONG)
        from sentinel_twisted.agent import block

        self.agent.held["hold-b"].callback(block(403, "b"))
        response = yield self.check_answer("hold-b")
        self.assertEqual(response["decision"], {"block": {"status": 403, "body": "b", "headers": None}})
        self.agent.held["hold-a"].callback(None)
        response = yield self.check_answer("hold-a")
        self.assertEqual(response["decision"]["block"]["status"], 500)

    @inlineCallbacks
    def test_answer_too_large_to_send(self) -> Generator[Deferred[Any], Any, None]:
        """An answer whose frame would pass 16 MiB is not sent: the error decision goes instead."""
        from sentinel_twisted.agent import block

        chunk = json.loads(vector("evt_request_body_chunk")["payload"])
        chunk["correlation_id"] = "hold-big"
        self.peer.send(REQUEST_BODY_CHUNK, chunk)
        self.peer.send(PING, {"sequence": 1, "timestamp_ms": 1})
        yield self.peer.next_json(PONG)
        self.agent.held["hold-big"].callback(block(403, "x" * MAX_LENGTH))
        response = yield self.check_answer("hold-big")
        self.assertEqual(response["decision"]["block"]["status"], 500)

    @inlineCallbacks
    def test_agent_only_frames_ignored(self) -> Generator[Deferred[Any], Any, None]:
        for message_type in (AGENT_RESPONSE, HEALTH_STATUS, METRICS_REPORT, CONFIG_UPDATE_REQUEST, FLOW_CONTROL, PONG, HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE):
            self.peer.send(message_type, {"action": 1, "state": 1, "correlation_id": "x"})
        self.peer.send(HANDSHAKE_RESPONSE, success())
        self.peer.write(bytes.fromhex(vector("evt_response_headers")["frame_hex"]))
        yield self.check_answer("req-7f3a")

    @inlineCallbacks
    def test_split_and_batched_frames(self) -> Generator[Deferred[Any], Any, None]:
        data = bytes.fromhex(vector("evt_request_headers")["frame_hex"])
        for byte in data:
            self.peer.write(bytes([byte]))
            yield deferLater(reactor, 0, lambda: None)
        yield self.check_answer("req-7f3a")
        events = []
        for i in range(30):
            event = json.loads(vector("evt_response_headers")["payload"])
            event["correlation_id"] = f"b{i}"
            events.append(frame(RESPONSE_HEADERS, event))
        self.peer.write(b"".join(events))
        seen = set()
        for _ in range(30):
            response = yield self.peer.next_json(AGENT_RESPONSE)
            seen.add(response["audit"]["custom"]["correlation_id"])
        self.assertEqual(seen, {f"b{i}" for i in range(30)})

    @inlineCallbacks
    def test_largest_event(self) -> Generator[Deferred[Any], Any, None]:
        event = json.loads(vector("evt_request_body_chunk")["payload"])
        event["correlation_id"] = "big"
        body = json.dumps(event).encode()
        padded = body[:-1] + b" " * (MAX_LENGTH - 1 - len(body)) + b"}"
        self.peer.send(REQUEST_BODY_CHUNK, padded)
        yield self.check_answer("big")

    @inlineCallbacks
    def check_closed(self, data: bytes) -> Generator[Deferred[Any], Any, None]:
        """The agent ends the connection (and dials again)."""
        self.peer.write(data)
        got = yield self.peer.next_frame()
        while got is not None:
            self.assertIn(got[0], (FLOW_CONTROL, HEALTH_STATUS))
            got = yield self.peer.next_frame()
        again = yield self.proxy.next_peer()
        request = yield again.next_json(HANDSHAKE_REQUEST)
        self.assertEqual(request["agent_id"], "waf-1")

    @inlineCallbacks
    def test_empty_payload_of_every_type(self) -> Generator[Deferred[Any], Any, None]:
        all_types = (HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE, *EVENT_TYPES, AGENT_RESPONSE, HEALTH_STATUS,
                     METRICS_REPORT, CONFIG_UPDATE_REQUEST, FLOW_CONTROL, CANCEL, PING, PONG)
        self.peer.write(b"".join(struct.pack(">IB", 1, t) for t in all_types))
        self.peer.write(bytes.fromhex(vector("evt_response_headers")["frame_hex"]))
        yield self.check_answer("req-7f3a")

    def test_zero_length(self) -> Deferred[Any]:
        return self.check_closed(b"\x00\x00\x00\x00")

    def test_unknown_type(self) -> Deferred[Any]:
        return self.check_closed(frame(0xFF, {}))

    def test_over_max(self) -> Deferred[Any]:
        return self.check_closed(struct.pack(">IB", MAX_LENGTH + 1, REQUEST_HEADERS))


class AgentRefusalTests(AgentSideTestCase):
    """What the agent does with the proxy's answers to its registration."""

    @inlineCallbacks
    def test_final_refusals_stop_the_agent(self) -> Generator[Deferred[Any], Any, None]:
        for name in ("reg_response_failure_version", "reg_response_failure_not_allowed", "reg_response_failure_auth_required"):
            peer = yield self.start_agent()
            yield peer.next_json(HANDSHAKE_REQUEST)
            failed = self.connector.when_failed()
            peer.write(bytes.fromhex(vector(name)["frame_hex"]))
            error = yield failed
            self.assertIn(json.loads(vector(name)["payload"])["error"], str(error))
            yield peer.lost
            yield self.connector.stopService()

    @inlineCallbacks
    def test_token_never_logged(self) -> Generator[Deferred[Any], Any, None]:
        lines = capture_log(self)
        peer = yield self.start_agent(auth_token="agent-S3CRET")
        request = yield peer.next_json(HANDSHAKE_REQUEST)
        self.assertEqual(request["auth_token"], "agent-S3CRET")
        failed = self.connector.when_failed()
        peer.send(HANDSHAKE_RESPONSE, {"success": False, "error": "Authentication failed: invalid token for agent 'waf-1'",
                                       "proxy_id": "p", "proxy_version": "1", "connection_id": ""})
        yield failed
        self.assertTrue(lines)
        self.assertNotIn("agent-S3CRET", "\n".join(lines))

    @inlineCallbacks
    def test_unreadable_answers_close_and_redial(self) -> Generator[Deferred[Any], Any, None]:
        peer = yield self.start_agent()
        for data in (
            frame(HANDSHAKE_RESPONSE, b"not json"),
            frame(HANDSHAKE_RESPONSE, {"success": True}),
            bytes.fromhex(vector("evt_request_headers")["frame_hex"]),
            frame(PING, {"sequence": 0, "timestamp_ms": 0}),
            b"\x00\x00\x00\x00",
            frame(0xFF, b"{}"),
        ):
            yield peer.next_json(HANDSHAKE_REQUEST)
            peer.write(data)
            self.assertIsNone((yield peer.next_frame()), data)
            peer = yield self.proxy.next_peer()
        request = yield peer.next_json(HANDSHAKE_REQUEST)
        self.assertEqual(request["protocol_version"], 2)


class MoreProxySideTests(ProxySideTestCase):
    @inlineCallbacks
    def test_tcp_listener(self) -> Generator[Deferred[Any], Any, None]:
        """The same registration over TCP on port 0."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

        self.factory = TrackingFactory(ReverseConnectionConfig())
        self.peers = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.addCleanup(self._stop, port)
        peer = RawPeer()
        self.peers.append(peer)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), peer)
        peer.send(HANDSHAKE_REQUEST, registration())
        response = yield peer.next_json(HANDSHAKE_RESPONSE)
        self.assertIs(response["success"], True)
        d = self.factory.pool.send_event("waf-1", typed_event("evt_request_complete"), "tcp")
        got = yield peer.next_json(REQUEST_COMPLETE)
        self.assertEqual(got["correlation_id"], "tcp")
        peer.send(AGENT_RESPONSE, answer("tcp"))
        yield d

    @inlineCallbacks
    def test_paused_connection_routed_around(self) -> Generator[Deferred[Any], Any, None]:
        """A paused connection gets no new requests, while its requests in flight are still answered."""
        yield self.listen()
        first = yield self.registered()
        d = self.factory.pool.send_event("waf-1", typed_event("evt_request_headers"), "before")
        yield first.next_frame()
        waiting = self.observer.wait("flow")
        first.send(FLOW_CONTROL, {"action": 1})
        yield waiting
        second = yield self.registered()
        ds = [self.factory.pool.send_event("waf-1", typed_event("evt_request_headers"), f"r{i}") for i in range(5)]
        for i in range(5):
            got = yield second.next_json(REQUEST_HEADERS)
            self.assertEqual(got["correlation_id"], f"r{i}")
            second.send(AGENT_RESPONSE, answer(f"r{i}"))
        yield gatherResults(ds)
        first.send(AGENT_RESPONSE, answer("before"))
        yield d
        self.assertEqual(first.frames, deque())

    @inlineCallbacks
    def test_refuses_to_send_what_a_reader_would_refuse(self) -> Generator[Deferred[Any], Any, None]:
        """An event whose frame would pass 16 MiB fails at once; one of exactly 16 MiB goes out."""
        yield self.listen()
        agent = yield self.registered()
        overhead = len(json.dumps({"config": "", "config_version": None, "correlation_id": "max"}, separators=(",", ":")))
        fits = m.ConfigureEvent(config="x" * (MAX_LENGTH - 1 - overhead))
        too_big = m.ConfigureEvent(config="x" * (MAX_LENGTH - overhead))
        failure = yield self.assertFailure(self.factory.pool.send_event("waf-1", too_big, "max"), Exception)
        self.assertEqual(str(failure), f"Message too large: {MAX_LENGTH + 1} bytes (max: {MAX_LENGTH})")
        self.assertEqual(self.factory.pool.in_flight, 0)
        d = self.factory.pool.send_event("waf-1", fits, "max")
        message_type, payload = yield agent.next_frame()
        self.assertEqual((message_type, len(payload) + 1), (CONFIGURE, MAX_LENGTH))
        agent.send(AGENT_RESPONSE, answer("max"))
        yield d

    @inlineCallbacks
    def test_unanswered_ping_ends(self) -> Generator[Deferred[Any], Any, None]:
        """A Ping the agent never answers fails at the request timeout instead of waiting forever."""
        yield self.listen(request_timeout=0.1)
        agent = yield self.registered()
        (conn,) = self.factory.pool.connections("waf-1")
        d = conn.ping()
        ping = yield agent.next_json(PING)
        agent.send(PONG, dict(ping, sequence=ping["sequence"] + 1))
        failure = yield self.assertFailure(d, Exception)
        self.assertEqual(str(failure), "Timeout after 100ms")


class AgentControlTests(AgentSideTestCase):
    """The agent's own control frames: FlowControl, HealthStatus, and its registration deadline."""

    def event(self, cid: str) -> bytes:
        chunk = json.loads(vector("evt_request_body_chunk")["payload"])
        chunk["correlation_id"] = cid
        return frame(REQUEST_BODY_CHUNK, chunk)

    @inlineCallbacks
    def test_flow_control_at_the_limit(self) -> Generator[Deferred[Any], Any, None]:
        """At its concurrency limit the agent sends {"action": 1}; at half of it, {"action": 2}."""
        agent = held_agent()
        peer = yield self.serving(agent, max_concurrency=4, health_interval=0)
        yield peer.next_json(HEALTH_STATUS)
        peer.write(b"".join(self.event(f"hold-{i}") for i in range(4)))
        pause = yield peer.next_json(FLOW_CONTROL)
        self.assertEqual(pause, {"action": 1})
        for i in range(2):
            agent.held[f"hold-{i}"].callback(None)
            yield peer.next_json(AGENT_RESPONSE)
        resume = yield peer.next_json(FLOW_CONTROL)
        self.assertEqual(resume, {"action": 2})
        for i in range(2, 4):
            agent.held[f"hold-{i}"].callback(None)
            yield peer.next_json(AGENT_RESPONSE)

    @inlineCallbacks
    def test_drain_on_stop(self) -> Generator[Deferred[Any], Any, None]:
        """Stopping: pause, HealthStatus draining (3), the event in flight answered, then close."""
        agent = held_agent()
        peer = yield self.serving(agent, health_interval=0, drain_grace=30)
        yield peer.next_json(HEALTH_STATUS)
        peer.write(self.event("hold-d"))
        peer.send(PING, {"sequence": 1, "timestamp_ms": 0})
        yield peer.next_json(PONG)
        stopped = self.connector.stopService()
        self.assertEqual((yield peer.next_json(FLOW_CONTROL)), {"action": 1})
        health = yield peer.next_json(HEALTH_STATUS)
        self.assertEqual(health["state"], 3)
        agent.held["hold-d"].callback(None)
        response = yield peer.next_json(AGENT_RESPONSE)
        self.assertEqual(response["audit"]["custom"]["correlation_id"], "hold-d")
        self.assertIsNone((yield peer.next_frame()))
        yield stopped

    @inlineCallbacks
    def test_frame_never_finished(self) -> Generator[Deferred[Any], Any, None]:
        """A frame the proxy starts and never finishes ends the connection at the frame deadline."""
        peer = yield self.serving(frame_timeout=0.3, health_interval=0)
        yield peer.next_json(HEALTH_STATUS)
        peer.write(struct.pack(">IB", 1000, REQUEST_HEADERS) + b"{")
        self.assertIsNone((yield peer.next_frame()))
        again = yield self.proxy.next_peer()
        yield again.next_json(HANDSHAKE_REQUEST)

    @inlineCallbacks
    def test_no_registration_response(self) -> Generator[Deferred[Any], Any, None]:
        """A proxy that never answers the registration is left after the registration timeout, and dialled again."""
        peer = yield self.start_agent(registration_timeout=0.2)
        yield peer.next_json(HANDSHAKE_REQUEST)
        self.assertIsNone((yield peer.next_frame()))
        again = yield self.proxy.next_peer()
        yield again.next_json(HANDSHAKE_REQUEST)

    @inlineCallbacks
    def test_response_and_events_in_one_write(self) -> Generator[Deferred[Any], Any, None]:
        peer = yield self.start_agent(held_agent(), health_interval=0)
        yield peer.next_json(HANDSHAKE_REQUEST)
        peer.write(frame(HANDSHAKE_RESPONSE, success()) + self.event("e1") + frame(PING, b'{"sequence":3,"timestamp_ms":0}'))
        seen = []
        for _ in range(3):
            message_type, payload = yield peer.next_frame()
            seen.append(message_type)
            if message_type == AGENT_RESPONSE:
                self.assertEqual(json.loads(payload)["audit"]["custom"]["correlation_id"], "e1")
        self.assertEqual(sorted(seen), sorted([HEALTH_STATUS, AGENT_RESPONSE, PONG]))

    @inlineCallbacks
    def test_connection_limit_refusal_is_retried(self) -> Generator[Deferred[Any], Any, None]:
        peer = yield self.start_agent()
        yield peer.next_json(HANDSHAKE_REQUEST)
        peer.send(HANDSHAKE_RESPONSE, {"success": False, "error": "Connection limit reached: agent 'waf-1' already holds 4 registered connections (max: 4)", "proxy_id": "p", "proxy_version": "1", "connection_id": ""})
        self.assertIsNone((yield peer.next_frame()))
        again = yield self.proxy.next_peer()
        yield again.next_json(HANDSHAKE_REQUEST)

    @inlineCallbacks
    def test_an_event_of_too_many_values_is_answered_undecoded(self) -> Generator[Deferred[Any], Any, None]:
        """
        A Configure of 16 MiB of empty lists would decode to some 400 MiB:
        past max_event_values it gets the error decision at once, the
        handler never sees it, and the next event is served.
        """
        agent = held_agent()
        peer = yield self.serving(agent, health_interval=0)
        yield peer.next_json(HEALTH_STATUS)
        head = b'{"correlation_id":"lists","config":['
        count = (MAX_LENGTH - 1 - len(head) - 2) // 3
        peer.send(CONFIGURE, head + b"[]," * (count - 1) + b"[]]}")
        peer.write(self.event("next"))
        refused = yield peer.next_json(AGENT_RESPONSE)
        self.assertEqual(refused["audit"]["custom"]["correlation_id"], "lists")
        self.assertEqual(refused["decision"], {"block": {"status": 500, "body": "agent error", "headers": None}})
        served = yield peer.next_json(AGENT_RESPONSE)
        self.assertEqual(served["audit"]["custom"]["correlation_id"], "next")
        self.assertEqual([type(e).__name__ for e in agent.seen], ["RequestBodyChunkEvent"])


class ConnectionSlotTests(ProxySideTestCase):
    @inlineCallbacks
    def test_slot_freed_when_a_connection_leaves(self) -> Generator[Deferred[Any], Any, None]:
        yield self.listen(max_connections_per_agent=1)
        first = yield self.registered()
        peer, response = yield self.register()
        self.assertIs(response["success"], False)
        first.transport.loseConnection()  # type: ignore[union-attr]
        yield self.factory.gone[0]
        yield self.registered()
