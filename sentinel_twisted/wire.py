# -*- test-case-name: tests.test_wire -*-
"""
Framing of the agent protocol: C{u32 big-endian length | type byte | JSON}.

The length counts the type byte and the payload, exactly as
L{twisted.protocols.basic.Int32StringReceiver} frames its strings, with the
type byte as the first byte of the string.  L{FrameReceiver} keeps that
framing but parses it without the stock receiver's quadratic re-joining
(Twisted issue 6358) and validates the declared length and the type byte
before any body is buffered.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITransport
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from .errors import AgentProtocolError, InvalidMessage, MessageTooLarge

__all__ = [
    "MAX_MESSAGE_SIZE",
    "FrameReceiver",
    "MessageType",
    "encode_frame",
    "frame_header",
]

#: Largest allowed value of the length prefix (type byte plus payload).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024

_PREFIX = struct.Struct(">I")
_HEADER = struct.Struct(">IB")


class MessageType(enum.IntEnum):
    """The type byte of every frame (SPEC section 2)."""

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

    @property
    def wire_name(self) -> str:
        """The reference's name for the type, used in error texts."""
        return _WIRE_NAMES[self]


_WIRE_NAMES = {
    MessageType.HANDSHAKE_REQUEST: "HandshakeRequest",
    MessageType.HANDSHAKE_RESPONSE: "HandshakeResponse",
    MessageType.REQUEST_HEADERS: "RequestHeaders",
    MessageType.REQUEST_BODY_CHUNK: "RequestBodyChunk",
    MessageType.RESPONSE_HEADERS: "ResponseHeaders",
    MessageType.RESPONSE_BODY_CHUNK: "ResponseBodyChunk",
    MessageType.REQUEST_COMPLETE: "RequestComplete",
    MessageType.WEBSOCKET_FRAME: "WebSocketFrame",
    MessageType.GUARDRAIL_INSPECT: "GuardrailInspect",
    MessageType.CONFIGURE: "Configure",
    MessageType.AGENT_RESPONSE: "AgentResponse",
    MessageType.HEALTH_STATUS: "HealthStatus",
    MessageType.METRICS_REPORT: "MetricsReport",
    MessageType.CONFIG_UPDATE_REQUEST: "ConfigUpdateRequest",
    MessageType.FLOW_CONTROL: "FlowControl",
    MessageType.CANCEL: "Cancel",
    MessageType.PING: "Ping",
    MessageType.PONG: "Pong",
}

# Payloads up to this size are sent joined to their header (see send_frame).
_JOIN_LIMIT = 16 * 1024

# One flag per possible type byte: a table lookup is the cheapest check.
_KNOWN_TYPES = bytes(1 if b in MessageType._value2member_map_ else 0 for b in range(256))


def frame_header(message_type: int, payload_length: int) -> bytes:
    """
    The five bytes that precede a payload: length prefix and type byte.

    @raise MessageTooLarge: if the frame would exceed L{MAX_MESSAGE_SIZE};
        we refuse to send any frame our own reader would refuse.
    """
    length = payload_length + 1
    if length > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(length, MAX_MESSAGE_SIZE)
    return _HEADER.pack(length, message_type)


def encode_frame(message_type: int, payload: bytes) -> bytes:
    """A whole frame as one byte string (tests and tools; hot paths use
    L{FrameReceiver.send_frame})."""
    return frame_header(message_type, len(payload)) + payload


class FrameReceiver(Int32StringReceiver):
    """
    An L{Int32StringReceiver} for agent protocol frames.

    Subclasses implement L{frame_received} and L{frame_error}.  After a
    framing error no further data is parsed: the byte stream can no longer
    be trusted, and the subclass decides how to end the connection.
    """

    MAX_LENGTH = MAX_MESSAGE_SIZE

    _buffer: bytearray
    _framing_broken: bool = False

    def makeConnection(self, transport: ITransport) -> None:
        self._buffer = bytearray()
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame waiting for the rest of it."""
        return len(self._buffer)

    def dataReceived(self, data: bytes) -> None:
        if self._framing_broken:
            return
        buf = self._buffer
        view: bytes | bytearray
        if buf:
            buf += data
            view = buf
        else:
            view = data
        end = len(view)
        offset = 0
        limit = self.MAX_LENGTH
        known = _KNOWN_TYPES
        unpack = _PREFIX.unpack_from
        while end - offset >= 4:
            (length,) = unpack(view, offset)
            if length == 0:
                self._break(InvalidMessage("Zero-length message"))
                return
            if length > limit:
                self._break(MessageTooLarge(length, limit))
                return
            if end - offset == 4:
                break
            message_type = view[offset + 4]
            if not known[message_type]:
                self._break(
                    InvalidMessage(f"Unknown message type: 0x{message_type:02x}")
                )
                return
            frame_end = offset + 4 + length
            if frame_end > end:
                break
            payload = bytes(view[offset + 5 : frame_end])
            offset = frame_end
            self.frame_received(message_type, payload)
            if self._framing_broken or self.transport is None:
                return
            # A frame may change the limit (a handshake lifts its own).
            limit = self.MAX_LENGTH
        if view is buf:
            if offset:
                del buf[:offset]
        elif offset < end:
            buf += view[offset:] if offset else view

    #: Who is at the other end, for loss descriptions ("agent", "proxy").
    peer_role = "peer"
    #: Set when we close the connection ourselves: the reason we closed it.
    _close_detail: str | None = None

    def lost_detail(self, reason: Failure) -> str:
        """Why the connection ended, in words for a log line or an error."""
        if self._close_detail is not None:
            return self._close_detail
        partial = self.buffered_bytes
        if partial:
            return f"connection closed mid-frame ({partial} bytes of an incomplete frame)"
        if reason.check(ConnectionDone):
            return f"connection closed by {self.peer_role}"
        return f"connection lost: {reason.value}"

    def stop_parsing(self) -> None:
        """Ignore every byte from now on (the connection is being closed)."""
        self._framing_broken = True
        self._buffer = bytearray()

    def _break(self, error: AgentProtocolError) -> None:
        self._framing_broken = True
        self._buffer = bytearray()
        self.frame_error(error)

    def stringReceived(self, string: bytes) -> None:
        """Compatibility with the L{Int32StringReceiver} interface."""
        if not string:
            self._break(InvalidMessage("Zero-length message"))
        elif not _KNOWN_TYPES[string[0]]:
            self._break(InvalidMessage(f"Unknown message type: 0x{string[0]:02x}"))
        else:
            self.frame_received(string[0], string[1:])

    def lengthLimitExceeded(self, length: int) -> None:
        self._break(MessageTooLarge(length, self.MAX_LENGTH))

    def send_frame(self, message_type: int, payload: bytes) -> None:
        """
        Write one frame.  A large payload goes out after its header without
        being copied; a small one (every request event, typically) is joined
        to it, which costs less than a second buffer entry does.
        """
        size = len(payload)
        if size >= MAX_MESSAGE_SIZE:
            raise MessageTooLarge(size + 1, MAX_MESSAGE_SIZE)
        header = _HEADER.pack(size + 1, message_type)
        if size <= _JOIN_LIMIT:
            self.transport.write(header + payload)  # type: ignore[union-attr]
        else:
            self.transport.writeSequence((header, payload))  # type: ignore[union-attr]

    def send_frames(self, frames: Iterable[tuple[int, bytes]]) -> None:
        """Write several frames in one call."""
        chunks: list[bytes] = []
        for message_type, payload in frames:
            chunks.append(frame_header(message_type, len(payload)))
            chunks.append(payload)
        self.transport.writeSequence(chunks)  # type: ignore[union-attr]

    def frame_received(self, message_type: int, payload: bytes) -> None:
        """One complete frame arrived; C{message_type} is a known type."""
        raise NotImplementedError

    def frame_error(self, error: AgentProtocolError) -> None:
        """The byte stream broke the framing rules; no more frames follow."""
        raise NotImplementedError
