"""
A minimal policy agent written from SPEC.md alone: C{struct} framing and
C{json}, nothing from C{sentinel_twisted}.

Tests use it to talk to the proxy side over real sockets, so that a bug
shared by our encoder and our decoder cannot hide itself.  Two flavours:

  - L{BlockingAgent}: a plain blocking socket with timeouts, for talking
    to a C{twistd} subprocess from a synchronous test;
  - L{RawAgentProtocol}: a Twisted protocol (no framing helpers from
    Twisted either), for loopback tests that run the listener in-process.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

# SPEC section 2.
HANDSHAKE_REQUEST = 0x01
HANDSHAKE_RESPONSE = 0x02
REQUEST_HEADERS = 0x10
REQUEST_BODY_CHUNK = 0x11
RESPONSE_HEADERS = 0x12
RESPONSE_BODY_CHUNK = 0x13
REQUEST_COMPLETE = 0x14
WEBSOCKET_FRAME = 0x15
GUARDRAIL_INSPECT = 0x16
CONFIGURE = 0x17
AGENT_RESPONSE = 0x20
HEALTH_STATUS = 0x30
METRICS_REPORT = 0x31
CONFIG_UPDATE_REQUEST = 0x32
FLOW_CONTROL = 0x33
CANCEL = 0x40
PING = 0x41
PONG = 0x42

MAX_LENGTH = 16 * 1024 * 1024

_PREFIX = struct.Struct("!I")

Frame = tuple[int, Any]


def frame(message_type: int, body: Any) -> bytes:
    """One frame: u32 BE length (type byte + payload), type byte, JSON payload."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    return _PREFIX.pack(len(payload) + 1) + bytes([message_type]) + payload


def capabilities(
    agent_id: str, events: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 0)
) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "name": "raw test agent",
        "version": "0.0.1",
        "supported_events": list(events),
        "features": {
            "streaming_body": True,
            "websocket": True,
            "guardrails": True,
            "config_push": True,
            "metrics_export": False,
            "concurrent_requests": 16,
            "cancellation": True,
            "flow_control": True,
            "health_reporting": True,
        },
        "limits": {"max_body_size": 1048576, "max_concurrency": 16, "preferred_chunk_size": 65536},
    }


def registration(
    agent_id: str,
    *,
    version: int = 2,
    token: str | None = None,
    metadata: Any = None,
) -> dict[str, Any]:
    """A RegistrationRequest (SPEC section 3)."""
    return {
        "protocol_version": version,
        "agent_id": agent_id,
        "capabilities": capabilities(agent_id),
        "auth_token": token,
        "metadata": metadata,
    }


def answer(correlation_id: str, decision: Any = "allow", **fields: Any) -> dict[str, Any]:
    """An AgentResponse routed by C{audit.custom.correlation_id} (SPEC section 4)."""
    audit = fields.pop("audit", {})
    custom = dict(audit.get("custom", {}), correlation_id=correlation_id)
    body: dict[str, Any] = {"version": 2, "decision": decision}
    body.update(fields)
    body["audit"] = dict(audit, custom=custom)
    return body


class FrameParser:
    """Splits a byte stream into C{(type, decoded JSON or raw bytes)} frames."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 5:
            (length,) = _PREFIX.unpack_from(self._buffer)
            if not 0 < length <= MAX_LENGTH:
                raise ValueError(f"peer sent a frame of declared length {length}")
            if len(self._buffer) < 4 + length:
                break
            message_type = self._buffer[4]
            payload = self._buffer[5 : 4 + length]
            self._buffer = self._buffer[4 + length :]
            try:
                body: Any = json.loads(payload)
            except ValueError:
                body = payload
            frames.append((message_type, body))
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


class PeerClosed(Exception):
    """The other end closed the connection."""


class BlockingAgent:
    """An agent on a blocking socket; every wait is bounded by C{timeout}."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 5.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.sock.connect(address)
        self._parser = FrameParser()
        self._frames: list[Frame] = []
        self.eof = False

    def __enter__(self) -> BlockingAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message_type: int, body: Any) -> None:
        self.sock.sendall(frame(message_type, body))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> Frame:
        """The next frame; L{PeerClosed} at EOF, C{socket.timeout} if none comes."""
        deadline = time.monotonic() + self.timeout
        while not self._frames:
            if self.eof:
                raise PeerClosed()
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                continue
            self._frames.extend(self._parser.feed(data))
        return self._frames.pop(0)

    def register(self, agent_id: str, **kwargs: Any) -> dict[str, Any]:
        """Send a RegistrationRequest and return the RegistrationResponse."""
        self.send(HANDSHAKE_REQUEST, registration(agent_id, **kwargs))
        message_type, body = self.recv_frame()
        if message_type != HANDSHAKE_RESPONSE:
            raise AssertionError(f"expected a HandshakeResponse, got type 0x{message_type:02x}")
        return body  # type: ignore[no-any-return]

    def wait_closed(self) -> list[Frame]:
        """Read until EOF; returns the frames that came before it."""
        frames: list[Frame] = []
        while True:
            try:
                frames.append(self.recv_frame())
            except PeerClosed:
                return frames

    def close(self) -> None:
        self.sock.close()


class RawAgentProtocol(Protocol):
    """
    The same agent as a Twisted protocol, for in-process loopback tests.

    L{next_frame} returns a Deferred for the next frame from the proxy;
    L{closed} fires once the connection is gone, L{close_reason} says how.
    """

    def __init__(self) -> None:
        self._parser = FrameParser()
        self._frames: list[Frame] = []
        self._waiting: list[Deferred[Frame]] = []
        self.closed: Deferred[None] = Deferred()
        self.close_reason: Failure | None = None
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self._frames.extend(self._parser.feed(data))
        while self._frames and self._waiting:
            self._waiting.pop(0).callback(self._frames.pop(0))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.close_reason = reason
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(PeerClosed())
        self.closed.callback(None)

    def next_frame(self) -> Deferred[Frame]:
        d: Deferred[Frame] = Deferred()
        if self._frames:
            d.callback(self._frames.pop(0))
        elif self.lost:
            d.errback(PeerClosed())
        else:
            self._waiting.append(d)
        return d

    def unread_frames(self) -> list[Frame]:
        frames, self._frames = self._frames, []
        return frames

    def send(self, message_type: int, body: Any) -> None:
        assert self.transport is not None
        self.transport.write(frame(message_type, body))

    def send_raw(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def register(self, agent_id: str, **kwargs: Any) -> Deferred[Frame]:
        self.send(HANDSHAKE_REQUEST, registration(agent_id, **kwargs))
        return self.next_frame()
