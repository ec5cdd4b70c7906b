"""
Test helpers for the agent side.

L{Harness} drives one L{AgentProtocol} over a L{StringTransport} with a
L{Clock}: frames the agent writes are parsed here with C{struct} and
C{json}, frames the "proxy" sends are built the same way, so the tests
check the wire, not our own codec.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport

from sentinel_twisted.agent import Agent, AgentProtocol, AgentSettings, allow

# Type bytes, straight from SPEC section 2.
HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE = 0x01, 0x02
REQUEST_HEADERS, REQUEST_BODY_CHUNK, RESPONSE_HEADERS, RESPONSE_BODY_CHUNK = 0x10, 0x11, 0x12, 0x13
REQUEST_COMPLETE, WEBSOCKET_FRAME, GUARDRAIL_INSPECT, CONFIGURE = 0x14, 0x15, 0x16, 0x17
AGENT_RESPONSE, HEALTH_STATUS, METRICS_REPORT, FLOW_CONTROL = 0x20, 0x30, 0x31, 0x33
CANCEL, PING, PONG = 0x40, 0x41, 0x42


#: Bound on any wait on the real reactor; each normally takes milliseconds.
WAIT = 5.0


@inlineCallbacks
def wait_for(condition: Callable[[], Any], what: str = "condition") -> Generator[Any, Any, None]:
    """Poll C{condition} on the real reactor until it holds; fail after L{WAIT} seconds."""
    for _ in range(int(WAIT / 0.005)):
        if condition():
            return
        yield deferLater(reactor, 0.005, lambda: None)  # type: ignore[arg-type]
    raise AssertionError(f"timed out waiting for {what}")


def frame(message_type: int, body: Any) -> bytes:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack("!IB", len(payload) + 1, message_type) + payload


def parse_frames(data: bytes) -> list[tuple[int, Any]]:
    """Every complete frame in C{data}, as C{(type, parsed JSON)}."""
    frames = []
    offset = 0
    while len(data) - offset >= 5:
        (length,) = struct.unpack_from("!I", data, offset)
        if len(data) - offset - 4 < length:
            break
        message_type = data[offset + 4]
        payload = data[offset + 5 : offset + 4 + length]
        frames.append((message_type, json.loads(payload)))
        offset += 4 + length
    return frames


def success_response(connection_id: str = "waf-1-abc-1") -> dict[str, Any]:
    return {
        "success": True,
        "error": None,
        "proxy_id": "test-proxy",
        "proxy_version": "9.9",
        "connection_id": connection_id,
    }


def failure_response(error: str) -> dict[str, Any]:
    return {
        "success": False,
        "error": error,
        "proxy_id": "test-proxy",
        "proxy_version": "9.9",
        "connection_id": "",
    }


def headers_event(
    cid: str = "req-1",
    uri: str = "/",
    method: str = "GET",
    headers: dict[str, list[str]] | None = None,
    client_ip: str = "203.0.113.7",
    top_level_cid: str | None = None,
) -> dict[str, Any]:
    """A RequestHeaders event as the proxy sends it (SPEC section 4)."""
    return {
        "correlation_id": cid if top_level_cid is None else top_level_cid,
        "metadata": {
            "correlation_id": cid,
            "request_id": "r-" + cid,
            "client_ip": client_ip,
            "client_port": 40000,
            "server_name": None,
            "protocol": "HTTP/1.1",
            "tls_version": None,
            "tls_cipher": None,
            "route_id": None,
            "upstream_id": None,
            "timestamp": "2026-01-01T00:00:00Z",
        },
        "method": method,
        "uri": uri,
        "headers": headers or {},
    }


def body_chunk_event(cid: str, data: bytes, index: int = 0, last: bool = False) -> dict[str, Any]:
    import base64

    return {
        "correlation_id": cid,
        "data": base64.b64encode(data).decode(),
        "is_last": last,
        "total_size": None,
        "chunk_index": index,
        "bytes_received": len(data),
    }


class RecordingAgent(Agent):
    """
    Each request-headers event waits on a Deferred the test controls;
    C{cancelled} lists the ids whose Deferred was cancelled.
    """

    def __init__(self) -> None:
        self.waiting: dict[str, Deferred[Any]] = {}
        self.cancelled: list[str] = []
        self.seen: list[Any] = []

    def on_request_headers(self, event: Any) -> Deferred[Any]:
        cid = event.metadata.correlation_id
        self.seen.append(event)
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(cid))
        self.waiting[cid] = d
        return d

    def answer(self, cid: str, builder: Any = None) -> None:
        self.waiting.pop(cid).callback(builder if builder is not None else allow())


class Harness:
    """One agent connection over a StringTransport, with a Clock."""

    def __init__(self, agent: Any = None, **settings: Any) -> None:
        self.agent = agent if agent is not None else Agent()
        settings.setdefault("agent_id", "waf-1")
        self.settings = AgentSettings(agent=self.agent, **settings)
        self.clock = Clock()
        self.protocol = AgentProtocol(self.settings, self.clock, self)
        self.transport = StringTransport(peerAddress=UNIXAddress("/tmp/proxy.sock"))
        self.events: list[tuple[str, Any]] = []
        self._read = 0
        self.protocol.makeConnection(self.transport)

    # ConnectionObserver
    def connection_registered(self, protocol: Any) -> None:
        self.events.append(("registered", protocol.connection_id))

    def registration_refused(self, protocol: Any, error: Any) -> None:
        self.events.append(("refused", error))

    def connection_ended(self, protocol: Any, detail: str) -> None:
        self.events.append(("ended", detail))

    def feed(self, message_type: int, body: Any) -> None:
        self.protocol.dataReceived(frame(message_type, body))

    def sent(self) -> list[tuple[int, Any]]:
        """Frames written since the last call."""
        data = self.transport.value()
        frames = parse_frames(data[self._read :])
        self._read = len(data)
        return frames

    def register(self, response: dict[str, Any] | None = None) -> list[tuple[int, Any]]:
        """Answer the registration; returns the RegistrationRequest frames."""
        first = self.sent()
        self.feed(HANDSHAKE_RESPONSE, response or success_response())
        return first

    def lose(self, reason: Any = None) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.disconnecting = True
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    def answers(self, frames: list[tuple[int, Any]] | None = None) -> list[Any]:
        frames = self.sent() if frames is None else frames
        return [body for t, body in frames if t == AGENT_RESPONSE]


def temp_path(case: Any, name: str) -> str:
    """A path in a fresh temporary directory removed after the test."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="sentinel-agent-test-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, name)
