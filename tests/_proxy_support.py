"""
Shared fixtures of the proxy-side unit tests: in-memory connections to a
L{ReverseConnectionFactory}, frame builders, and a log capture.

Everything runs on a L{MemoryReactorClock} and L{StringTransport}s: no
sockets, no real time.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from sentinel_twisted import messages as m
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.connection import AgentConnection
from sentinel_twisted.proxy.factory import ReverseConnectionFactory
from sentinel_twisted.proxy.protocol import ReverseConnectionProtocol
from sentinel_twisted.wire import MessageType, encode_frame

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def capabilities(agent_id: str = "waf-1", **features: Any) -> m.AgentCapabilities:
    return m.AgentCapabilities(
        agent_id=agent_id,
        name="WAF Agent",
        version="1.2.0",
        supported_events=[1, 2],
        features=m.AgentFeatures(**features),
        limits=m.AgentLimits(),
    )


def registration_payload(
    agent_id: str = "waf-1",
    *,
    token: str | None = None,
    version: int = m.PROTOCOL_VERSION,
    metadata: Any = None,
) -> bytes:
    return m.encode(
        m.RegistrationRequest(
            protocol_version=version,
            agent_id=agent_id,
            capabilities=capabilities(agent_id),
            auth_token=token,
            metadata=metadata,
        )
    )


def registration_frame(agent_id: str = "waf-1", **kwargs: Any) -> bytes:
    return encode_frame(MessageType.HANDSHAKE_REQUEST, registration_payload(agent_id, **kwargs))


def answer_payload(correlation_id: str | None, decision: Any = m.ALLOW, **fields: Any) -> bytes:
    custom = {} if correlation_id is None else {"correlation_id": correlation_id}
    return m.encode(
        m.AgentResponse(decision=decision, audit=m.AuditMetadata(custom=custom), **fields)
    )


def answer_frame(correlation_id: str | None, decision: Any = m.ALLOW, **fields: Any) -> bytes:
    return encode_frame(MessageType.AGENT_RESPONSE, answer_payload(correlation_id, decision, **fields))


def request_headers(correlation_id: str = "req-1") -> m.RequestHeadersEvent:
    return m.RequestHeadersEvent(
        metadata=m.RequestMetadata(
            correlation_id=correlation_id,
            request_id="internal-1",
            client_ip="203.0.113.7",
            client_port=54321,
            timestamp="2026-01-01T00:00:00Z",
        ),
        method="GET",
        uri="/items",
        headers={"host": ["example.com"]},
    )


def response_headers(correlation_id: str = "") -> m.ResponseHeadersEvent:
    return m.ResponseHeadersEvent(correlation_id=correlation_id, status=200, headers={})


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte string of whole frames into C{(type, payload)} pairs."""
    frames = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        assert length >= 1, f"zero-length frame at {offset}"
        end = offset + 4 + length
        assert end <= len(data), f"incomplete frame at {offset}: {data[offset:]!r}"
        frames.append((data[offset + 4], bytes(data[offset + 5 : end])))
        offset = end
    return frames


def take_frames(transport: StringTransport) -> list[tuple[int, bytes]]:
    """The frames written since the last call (the transport is cleared)."""
    frames = parse_frames(transport.value())
    transport.clear()
    return frames


def decoded(frames: list[tuple[int, bytes]], message_type: int, shape: Any) -> list[Any]:
    return [m.decode(p, shape) for t, p in frames if t == message_type]


class RecordingTransport(StringTransport):
    """A StringTransport that records the order of writes and closing."""

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)
        self.events: list[str] = []

    def write(self, data: bytes) -> None:
        self.events.append("write")
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.events.append("write")
        super().writeSequence(seq)

    def loseConnection(self) -> None:
        self.events.append("loseConnection")
        super().loseConnection()


class Proxy:
    """A factory on a memory clock, and helpers to connect agents to it."""

    def __init__(self, token_checker: Any = None, **config: Any) -> None:
        self.clock = MemoryReactorClock()
        self.config = ReverseConnectionConfig(**config)
        self.factory = ReverseConnectionFactory(
            self.config, token_checker=token_checker, clock=self.clock, proxy_version="9.9.9"
        )
        self.pool = self.factory.pool

    def connect(self) -> tuple[ReverseConnectionProtocol, RecordingTransport]:
        protocol = self.factory.buildProtocol(PEER)
        assert protocol is not None, "the factory refused the connection"
        transport = RecordingTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def register(
        self, agent_id: str = "waf-1", **kwargs: Any
    ) -> tuple[ReverseConnectionProtocol, RecordingTransport, AgentConnection]:
        protocol, transport = self.connect()
        protocol.dataReceived(registration_frame(agent_id, **kwargs))
        [(kind, payload)] = take_frames(transport)
        assert kind == MessageType.HANDSHAKE_RESPONSE
        response = m.decode(payload, m.RegistrationResponse)
        assert response.success, response.error
        assert protocol.connection is not None
        return protocol, transport, protocol.connection

    def registration_response(
        self, protocol: ReverseConnectionProtocol, transport: StringTransport, data: bytes
    ) -> m.RegistrationResponse:
        protocol.dataReceived(data)
        [(kind, payload)] = take_frames(transport)
        assert kind == MessageType.HANDSHAKE_RESPONSE
        return m.decode(payload, m.RegistrationResponse)


def delayed_calls(clock: MemoryReactorClock) -> list[str]:
    """The names of the functions C{clock} has yet to call, in order."""
    return [getattr(call.func, "__name__", repr(call.func)) for call in clock.getDelayedCalls()]


#: What is left on the clock of a connection the proxy closed and whose
#: transport is not gone yet: the deadline of the close.
CLOSE_DEADLINE = ["_close_overdue"]


def lose(protocol: ReverseConnectionProtocol, reason: BaseException | None = None) -> None:
    """The transport goes away, as the reactor reports it."""
    protocol.connectionLost(Failure(reason if reason is not None else ConnectionDone()))


@contextmanager
def captured_log() -> Iterator[list[LogEvent]]:
    """Every twisted.logger event emitted inside the block."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def log_text(events: list[LogEvent]) -> str:
    """The formatted text of the events plus every field's repr."""
    parts = []
    for event in events:
        parts.append(formatEvent(event) or "")
        parts.extend(f"{k}={v!r}" for k, v in event.items())
    return "\n".join(parts)
