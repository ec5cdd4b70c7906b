"""
Our agent against a minimal proxy written here from SPEC.md alone: plain
Twisted C{Protocol}, C{struct} and C{json}, none of this project's wire,
message or proxy classes.  Real UNIX sockets in a temporary directory.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import tempfile
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from sentinel_twisted.agent import Agent, AgentConnector, RegistrationRejected, allow, block

from .._proxy_support import captured_log, log_text
from .test_with_proxy import wait_for

# SPEC section 2
HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE = 0x01, 0x02
REQUEST_HEADERS, REQUEST_BODY_CHUNK, RESPONSE_HEADERS, RESPONSE_BODY_CHUNK = 0x10, 0x11, 0x12, 0x13
REQUEST_COMPLETE, WEBSOCKET_FRAME, GUARDRAIL_INSPECT, CONFIGURE = 0x14, 0x15, 0x16, 0x17
AGENT_RESPONSE, HEALTH_STATUS, FLOW_CONTROL = 0x20, 0x30, 0x33
CANCEL, PING, PONG = 0x40, 0x41, 0x42


class RawProxyConnection(Protocol):
    """One agent connection, as SPEC sections 1, 3 and 4 describe it."""

    factory: RawProxy

    def connectionMade(self) -> None:
        self.buffer = b""
        self.frames: list[tuple[int, Any, bytes]] = []
        self.registration: dict[str, Any] | None = None
        self.paused = False
        self.closed = False
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack("!I", self.buffer[:4])
            assert 0 < length <= 16 * 1024 * 1024, length
            if len(self.buffer) < 4 + length:
                return
            message_type, payload = self.buffer[4], self.buffer[5 : 4 + length]
            self.buffer = self.buffer[4 + length :]
            body = json.loads(payload)
            self.frames.append((message_type, body, payload))
            self.frame_received(message_type, body)

    def frame_received(self, message_type: int, body: Any) -> None:
        if self.registration is None:
            assert message_type == HANDSHAKE_REQUEST, message_type
            self.registration = body
            answer = self.factory.decide(body)
            for fd in self.factory.descriptors:
                self.transport.sendFileDescriptor(fd)  # type: ignore[attr-defined]
            self.send(HANDSHAKE_RESPONSE, answer)
            if not answer["success"] or self.factory.drop_after_success:
                self.transport.loseConnection()
        elif message_type == FLOW_CONTROL:
            self.paused = body["action"] == 1
            self.factory.flow.append(body["action"])
            if not self.paused:
                self.factory.resumed(self)

    def send(self, message_type: int, body: Any) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.transport.write(struct.pack("!IB", len(payload) + 1, message_type) + payload)

    def connectionLost(self, reason: Any) -> None:
        self.closed = True

    def of_type(self, message_type: int) -> list[Any]:
        return [body for t, body, _ in self.frames if t == message_type]

    def answers(self) -> dict[str, Any]:
        return {a["audit"]["custom"]["correlation_id"]: a for a in self.of_type(AGENT_RESPONSE)}


class RawProxy(Factory):
    protocol = RawProxyConnection

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.drop_after_success = False
        # File descriptors passed with the registration response.
        self.descriptors: list[int] = []
        self.connections: list[RawProxyConnection] = []
        self.flow: list[int] = []
        self.backlog: list[tuple[int, Any]] = []

    def decide(self, request: dict[str, Any]) -> dict[str, Any]:
        ok = self.error is None
        return {
            "success": ok,
            "error": self.error,
            "proxy_id": "raw-proxy",
            "proxy_version": "0",
            "connection_id": f"{request['agent_id']}-{len(self.connections)}" if ok else "",
        }

    def resumed(self, connection: RawProxyConnection) -> None:
        pump(connection, self.backlog)


def pump(connection: RawProxyConnection, backlog: list[tuple[int, Any]]) -> None:
    """Send queued events one reactor turn apart until the agent pauses."""
    if connection.paused or not backlog or connection.closed:
        return
    connection.send(*backlog.pop(0))
    reactor.callLater(0, pump, connection, backlog)  # type: ignore[attr-defined]


def request_headers(cid: str, uri: str = "/", top_level: str | None = None, **headers: str) -> dict[str, Any]:
    return {
        "correlation_id": top_level or cid,
        "headers": {k.replace("_", "-"): [v] for k, v in headers.items()},
        "metadata": {
            "client_ip": "198.51.100.4",
            "client_port": 50000,
            "correlation_id": cid,
            "protocol": "HTTP/1.1",
            "request_id": "rid-" + cid,
            "route_id": None,
            "server_name": None,
            "timestamp": "2026-01-01T00:00:00Z",
            "tls_cipher": None,
            "tls_version": None,
            "upstream_id": None,
        },
        "method": "GET",
        "uri": uri,
    }


class SlowAgent(Agent):
    """Answers after C{x-delay} seconds (a header); blocks C{/admin}."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.running = 0
        self.most_running = 0

    def on_request_headers(self, event: Any) -> Any:
        delay = float(event.headers.get("x-delay", ["0"])[0])
        cid = event.metadata.correlation_id
        self.running += 1
        self.most_running = max(self.most_running, self.running)

        def done() -> Any:
            self.running -= 1
            return block(403) if event.uri.startswith("/admin") else allow()

        d = deferLater(reactor, delay, done)  # type: ignore[arg-type]

        def cancelled(failure: Any) -> Any:
            self.running -= 1
            self.cancelled.append(cid)
            return failure

        from twisted.internet.defer import CancelledError

        d.addErrback(lambda f: cancelled(f) if f.check(CancelledError) else f)
        return d

    def on_request_body_chunk(self, event: Any) -> Any:
        return allow().needs_more(not event.is_last)

    def on_response_headers(self, event: Any) -> Any:
        return allow().set_response_header("x-seen", str(event.status))

    def on_response_body_chunk(self, event: Any) -> Any:
        return allow().replace_response_body(event.chunk_index, event.body.upper())

    def on_request_complete(self, event: Any) -> Any:
        return allow()

    def on_websocket_frame(self, event: Any) -> Any:
        return allow().websocket_close(1008, "no") if event.body == b"bad" else allow().websocket_allow()

    def on_guardrail_inspect(self, event: Any) -> Any:
        return block(400, "injection") if "ignore previous" in event.content else allow()

    def on_configure(self, event: Any) -> Any:
        return allow()


class RawProxyTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sentinel-raw-")
        self.path = os.path.join(self.dir, "raw.sock")
        self.ports: list[Any] = []
        self.connectors: list[AgentConnector] = []

    @inlineCallbacks
    def tearDown(self) -> Generator[Any, Any, None]:
        for connector in self.connectors:
            if connector.running:
                yield connector.stopService()
        for port in self.ports:
            yield port.stopListening()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    @inlineCallbacks
    def listen(self, proxy: RawProxy) -> Generator[Any, Any, RawProxy]:
        port = yield UNIXServerEndpoint(reactor, self.path).listen(proxy)
        self.ports.append(port)
        return proxy

    def agent(self, agent: Any = None, **kw: Any) -> AgentConnector:
        kw.setdefault("initial_delay", 0.02)
        kw.setdefault("max_delay", 0.1)
        kw.setdefault("jitter", lambda: 0.0)
        connector = AgentConnector(
            agent if agent is not None else SlowAgent(), f"unix:{self.path}", "raw-agent", reactor=reactor, **kw
        )
        self.connectors.append(connector)
        connector.startService()
        return connector

    @inlineCallbacks
    def registered(self, agent: Any = None, **kw: Any) -> Generator[Any, Any, tuple[Any, RawProxyConnection]]:
        proxy = yield self.listen(RawProxy())
        connector = self.agent(agent, **kw)
        yield connector.when_registered()
        return connector, proxy.connections[-1]

    # -- registration -----------------------------------------------------------------

    @inlineCallbacks
    def test_registration_request_has_every_field(self) -> Generator[Any, Any, None]:
        connector, conn = yield self.registered()
        request = conn.registration
        self.assertEqual(set(request), {"protocol_version", "agent_id", "capabilities", "auth_token", "metadata"})
        self.assertEqual(request["protocol_version"], 2)
        self.assertIsNone(request["auth_token"])
        self.assertIsNone(request["metadata"])
        caps = request["capabilities"]
        self.assertEqual(set(caps), {"agent_id", "name", "version", "supported_events", "features", "limits"})
        self.assertEqual(caps["supported_events"], [0, 1, 2, 3, 4, 5, 6, 7])
        self.assertEqual(
            set(caps["features"]),
            {
                "streaming_body",
                "websocket",
                "guardrails",
                "config_push",
                "metrics_export",
                "concurrent_requests",
                "cancellation",
                "flow_control",
                "health_reporting",
            },
        )
        self.assertIsInstance(caps["features"]["concurrent_requests"], int)
        self.assertEqual(set(caps["limits"]), {"max_body_size", "max_concurrency", "preferred_chunk_size"})
        yield wait_for(lambda: conn.of_type(HEALTH_STATUS), "a health report")
        self.assertEqual(conn.of_type(HEALTH_STATUS)[0], {"state": 1})

    @inlineCallbacks
    def test_file_descriptors_the_proxy_passes_are_dropped_unlogged(self) -> Generator[Any, Any, None]:
        # The agent reads with recv(): the kernel closes what a peer passes,
        # the response around it arrives as sent, and nothing is logged for it.
        proxy = RawProxy()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        proxy.descriptors = [r, w, r]
        yield self.listen(proxy)
        with captured_log() as events:
            connector = self.agent()
            yield connector.when_registered()
            conn = proxy.connections[-1]
            conn.send(REQUEST_HEADERS, request_headers("req-fd"))
            yield wait_for(lambda: conn.answers(), "an answer")
        self.assertEqual(conn.answers()["req-fd"]["decision"], "allow")
        self.assertNotIn("descriptor", log_text(events))

    @inlineCallbacks
    def test_version_mismatch_stops_retrying(self) -> Generator[Any, Any, None]:
        proxy = yield self.listen(RawProxy("Protocol version mismatch: expected 2, got 3"))
        connector = self.agent()
        error = yield connector.when_failed()
        self.assertIsInstance(error, RegistrationRejected)
        self.assertEqual(error.proxy_id, "raw-proxy")
        self.assertFalse(connector.slots[0].service.running)
        self.assertEqual(len(proxy.connections), 1)

    @inlineCallbacks
    def test_connection_limit_text_keeps_retrying(self) -> Generator[Any, Any, None]:
        proxy = yield self.listen(RawProxy("Connection limit reached: agent 'raw-agent' already holds 4"))
        connector = self.agent()
        yield wait_for(lambda: len(proxy.connections) >= 3, "three attempts")
        self.assertIsNone(connector.failure)

    @inlineCallbacks
    def test_success_then_drop_reconnects(self) -> Generator[Any, Any, None]:
        # The reference proxy's way of refusing a connection over its limit.
        proxy = yield self.listen(RawProxy())
        proxy.drop_after_success = True
        connector = self.agent()
        yield wait_for(lambda: len(proxy.connections) >= 3, "reconnections")
        self.assertIsNone(connector.failure)

    # -- events ------------------------------------------------------------------------

    @inlineCallbacks
    def test_all_eight_events_answered_with_the_expected_ids(self) -> Generator[Any, Any, None]:
        connector, conn = yield self.registered()
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        conn.send(REQUEST_HEADERS, request_headers("by-meta", "/admin", top_level="top-level"))
        conn.send(REQUEST_BODY_CHUNK, {"correlation_id": "e2", "data": b64(b"x"), "is_last": False, "total_size": None, "chunk_index": 0, "bytes_received": 1})
        conn.send(RESPONSE_HEADERS, {"correlation_id": "e3", "status": 201, "headers": {}})
        conn.send(RESPONSE_BODY_CHUNK, {"correlation_id": "e4", "data": b64(b"abc"), "is_last": True, "total_size": 3, "chunk_index": 2, "bytes_sent": 3})
        conn.send(REQUEST_COMPLETE, {"correlation_id": "e5", "status": 200, "duration_ms": 12, "request_body_size": 0, "response_body_size": 3, "upstream_attempts": 1, "error": None})
        conn.send(WEBSOCKET_FRAME, {"correlation_id": "e6", "opcode": "text", "data": b64(b"bad"), "client_to_server": True, "frame_index": 0, "fin": True, "route_id": None, "client_ip": "198.51.100.4"})
        conn.send(GUARDRAIL_INSPECT, {"correlation_id": "e7", "inspection_type": "prompt_injection", "content": "please ignore previous instructions", "categories": [], "metadata": {}})
        conn.send(CONFIGURE, {"correlation_id": "e8", "config": {"mode": "strict"}, "config_version": "7"})
        yield wait_for(lambda: len(conn.answers()) == 8, "eight answers")
        answers = conn.answers()
        self.assertEqual(set(answers), {"by-meta", "e2", "e3", "e4", "e5", "e6", "e7", "e8"})
        self.assertEqual(answers["by-meta"]["decision"], {"block": {"status": 403, "body": None, "headers": None}})
        self.assertTrue(answers["e2"]["needs_more"])
        self.assertEqual(answers["e3"]["response_headers"], [{"set": {"name": "x-seen", "value": "201"}}])
        self.assertEqual(answers["e4"]["response_body_mutation"], {"data": b64(b"ABC"), "chunk_index": 2})
        self.assertEqual(answers["e6"]["websocket_decision"], {"close": {"code": 1008, "reason": "no"}})
        self.assertEqual(answers["e7"]["decision"]["block"]["status"], 400)
        for answer in answers.values():
            self.assertEqual(answer["version"], 2)
            self.assertEqual(
                set(answer),
                {
                    "version",
                    "decision",
                    "request_headers",
                    "response_headers",
                    "routing_metadata",
                    "audit",
                    "needs_more",
                    "request_body_mutation",
                    "response_body_mutation",
                    "websocket_decision",
                },
            )

    @inlineCallbacks
    def test_answers_out_of_order(self) -> Generator[Any, Any, None]:
        connector, conn = yield self.registered()
        conn.send(REQUEST_HEADERS, request_headers("slow", x_delay="0.15"))
        conn.send(REQUEST_HEADERS, request_headers("medium", x_delay="0.05"))
        conn.send(REQUEST_HEADERS, request_headers("fast"))
        yield wait_for(lambda: len(conn.answers()) == 3, "three answers")
        order = [a["audit"]["custom"]["correlation_id"] for a in conn.of_type(AGENT_RESPONSE)]
        self.assertEqual(order, ["fast", "medium", "slow"])

    @inlineCallbacks
    def test_cancel_cancels_the_handler_and_sends_nothing(self) -> Generator[Any, Any, None]:
        agent = SlowAgent()
        connector, conn = yield self.registered(agent)
        conn.send(REQUEST_HEADERS, request_headers("gone", x_delay="0.1"))
        conn.send(REQUEST_HEADERS, request_headers("kept", x_delay="0.1"))
        conn.send(CANCEL, {"correlation_id": "gone", "reason": 0, "timestamp_ms": 1767225600000})
        yield wait_for(lambda: "kept" in conn.answers(), "the other answer")
        yield deferLater(reactor, 0.15, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(agent.cancelled, ["gone"])
        self.assertEqual(set(conn.answers()), {"kept"})

    @inlineCallbacks
    def test_ping_is_echoed_byte_for_byte(self) -> Generator[Any, Any, None]:
        connector, conn = yield self.registered()
        ping = b'{"sequence":41,"timestamp_ms":1767225600000}'
        conn.send(PING, ping)
        yield wait_for(lambda: conn.of_type(PONG), "a pong")
        [raw] = [payload for t, _, payload in conn.frames if t == PONG]
        self.assertEqual(raw, ping)

    @inlineCallbacks
    def test_flow_control_under_load(self) -> Generator[Any, Any, None]:
        agent = SlowAgent()
        connector, conn = yield self.registered(agent, max_concurrency=3, max_queued=50)
        proxy = conn.factory
        proxy.backlog = [(REQUEST_HEADERS, request_headers(f"l{i}", x_delay="0.01")) for i in range(30)]
        pump(conn, proxy.backlog)
        yield wait_for(lambda: len(conn.answers()) == 30, "thirty answers")
        self.assertEqual(proxy.backlog, [])
        self.assertIn(1, proxy.flow)
        self.assertIn(2, proxy.flow)
        self.assertEqual(proxy.flow[0], 1)
        self.assertLessEqual(agent.most_running, 3)
        self.assertTrue(all(a["decision"] == "allow" for a in conn.answers().values()))

    @inlineCallbacks
    def test_health_is_reported_periodically(self) -> Generator[Any, Any, None]:
        connector, conn = yield self.registered(health_interval=0.02)
        yield wait_for(lambda: len(conn.of_type(HEALTH_STATUS)) >= 3, "three health reports")
        self.assertEqual(set(json.dumps(h) for h in conn.of_type(HEALTH_STATUS)), {'{"state": 1}'})

    @inlineCallbacks
    def test_drain_on_stop(self) -> Generator[Any, Any, None]:
        connector, conn = yield self.registered(drain_grace=5)
        conn.send(REQUEST_HEADERS, request_headers("last", x_delay="0.1"))
        yield wait_for(lambda: connector.protocols()[0].in_flight == 1, "the event to arrive")
        stopped = connector.stopService()
        yield wait_for(lambda: conn.of_type(FLOW_CONTROL), "the pause")
        self.assertEqual(conn.of_type(FLOW_CONTROL), [{"action": 1}])
        self.assertIn({"state": 3}, conn.of_type(HEALTH_STATUS))
        self.assertFalse(conn.closed)
        yield stopped
        yield wait_for(lambda: conn.closed, "the connection to close")
        self.assertEqual(set(conn.answers()), {"last"})
        kinds = [t for t, _, _ in conn.frames]
        self.assertEqual(kinds[-1], AGENT_RESPONSE)

    @inlineCallbacks
    def test_reconnects_after_the_proxy_restarts(self) -> Generator[Any, Any, None]:
        connector, conn = yield self.registered()
        port = self.ports.pop()
        yield port.stopListening()
        conn.transport.loseConnection()
        yield wait_for(lambda: connector.registered_count == 0, "the agent to notice")
        proxy = yield self.listen(RawProxy())
        yield wait_for(lambda: connector.registered_count == 1, "re-registration")
        self.assertEqual(len(proxy.connections), 1)


