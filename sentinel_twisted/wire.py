# -*- test-case-name: tests.test_wire -*-
"""
Framing of the agent protocol: C{u32 big-endian length | type byte | JSON}.

The length counts the type byte and the payload, exactly as
L{twisted.protocols.basic.Int32StringReceiver} frames its strings, with the
type byte as the first byte of the string.  L{FrameReceiver} keeps that
framing but parses it without the stock receiver's quadratic re-joining
(Twisted issue 6358) and validates the declared length and the type byte
before any body is buffered.

Bounded by design: a small control frame (Ping, Pong, HealthStatus,
FlowControl) longer than L{MAX_CONTROL_FRAME_SIZE} is skipped, its bytes
discarded as they arrive and never buffered (MetricsReport and
ConfigUpdateRequest carry reports of any size and are limited like answers);
a receiver may be given a deadline within which a started frame, skipped or
not, must complete, and an L{IncompleteFrameBudget} shared by every
connection that caps the bytes all of them hold in unfinished frames.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from ._reading import read_plainly
from .errors import (
    AgentProtocolError,
    ControlFrameTooLarge,
    IncompleteFrame,
    InvalidMessage,
    MessageTooLarge,
    format_duration,
)

__all__ = [
    "MAX_CONTROL_FRAME_SIZE",
    "MAX_INCOMPLETE_FRAME_BYTES",
    "MAX_MESSAGE_SIZE",
    "FrameReceiver",
    "IncompleteFrameBudget",
    "MessageType",
    "encode_frame",
    "frame_header",
]

#: Largest allowed value of the length prefix (type byte plus payload).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024

#: Largest length of a small control frame by default: Ping, Pong,
#: HealthStatus and FlowControl are small by nature; a longer one is skipped.
#: (MetricsReport and ConfigUpdateRequest are not held to it: SPEC section 4
#: accepts them, and a report of many counters is large.)
MAX_CONTROL_FRAME_SIZE = 64 * 1024

#: Default budget of bytes that all connections may hold in incomplete frames.
MAX_INCOMPLETE_FRAME_BYTES = 64 * 1024 * 1024

_PREFIX = struct.Struct(">I")
_HEADER = struct.Struct(">IB")


class MessageType(enum.IntEnum):
    """
    The type byte of every frame (SPEC section 2).

    @cvar HANDSHAKE_REQUEST: the first frame of a connection: a registration
        (reverse) or the proxy's handshake (forward).
    @cvar HANDSHAKE_RESPONSE: the answer to it.
    @cvar REQUEST_HEADERS: a request's headers.
    @cvar REQUEST_BODY_CHUNK: a piece of a request body.
    @cvar RESPONSE_HEADERS: a response's headers.
    @cvar RESPONSE_BODY_CHUNK: a piece of a response body.
    @cvar REQUEST_COMPLETE: the end of a request.
    @cvar WEBSOCKET_FRAME: a WebSocket frame.
    @cvar GUARDRAIL_INSPECT: text to inspect.
    @cvar CONFIGURE: configuration pushed to an agent.
    @cvar AGENT_RESPONSE: an agent's answer to an event.
    @cvar HEALTH_STATUS: an agent's report of its health.
    @cvar METRICS_REPORT: an agent's metrics.
    @cvar CONFIG_UPDATE_REQUEST: an agent asks for new configuration.
    @cvar FLOW_CONTROL: an agent pauses or resumes the requests it is sent.
    @cvar CANCEL: the proxy no longer needs an answer.
    @cvar PING: a liveness check; the peer answers with a Pong.
    @cvar PONG: the answer to a Ping.
    """

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

_CONTROL_TYPES = bytes(
    1
    if b
    in (
        MessageType.PING,
        MessageType.PONG,
        MessageType.HEALTH_STATUS,
        MessageType.FLOW_CONTROL,
    )
    else 0
    for b in range(256)
)


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
    be trusted, and the subclass decides how to end the connection.  A small
    control frame longer than C{MAX_CONTROL_LENGTH} is not an error: the
    stream is sound, so the frame is skipped (see
    L{control_frame_too_large}) and the frames after it are read as usual.

    @cvar frame_clock: the clock of C{frame_timeout}; C{None}: no deadline.
    """

    MAX_LENGTH = MAX_MESSAGE_SIZE
    #: Largest length of a small control frame (see L{MAX_CONTROL_FRAME_SIZE});
    #: a longer one is skipped.
    MAX_CONTROL_LENGTH = MAX_CONTROL_FRAME_SIZE

    #: The account of bytes held in incomplete frames shared with other
    #: connections; C{None}: not counted.
    frame_budget: IncompleteFrameBudget | None = None
    #: Seconds within which a started frame must be complete, on
    #: C{frame_clock}; C{None} (either): no deadline.
    frame_timeout: float | None = None
    frame_clock: IReactorTime | None = None

    _buffer: bytearray
    _framing_broken: bool = False
    # The one flag a read checks before parsing: set when the bytes that
    # arrive are not frames to parse, after a framing error (for good) or
    # while the rest of a skipped frame arrives.
    _diverted: bool = False
    # Bytes of an incomplete frame as last accounted, when the current
    # incomplete frame started, and the timer that checks its deadline.
    _held = 0
    _frame_started = 0.0
    _frame_timer: IDelayedCall | None = None
    # A control frame being skipped: its bytes still to come (0: none), and
    # its type byte and declared length, for the errors that name it.
    _skip_left = 0
    _skipping = (0, 0)

    def makeConnection(self, transport: ITransport) -> None:
        self._buffer = bytearray()
        # Frames are bytes only: no file descriptors, and no recvmsg() to take them.
        read_plainly(transport)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame waiting for the rest of it."""
        return len(self._buffer)

    @property
    def mid_frame(self) -> bool:
        """
        Whether part of a frame has arrived and the rest has not (bytes
        held, or a skipped frame's bytes still to come), as of the last read.
        """
        return bool(self._held or self._skip_left)

    def dataReceived(self, data: bytes) -> None:
        if self._diverted:
            if self._framing_broken:
                return
            data = self._skip(data)
            if not data:
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
        control = _CONTROL_TYPES
        unpack = _PREFIX.unpack_from
        while end - offset >= 4:
            (length,) = unpack(view, offset)
            if length == 0:
                self._break(InvalidMessage("Zero-length message"))
                return
            if length > limit:
                # Past the protocol's own limit, say so (as the reference
                # does) even where a smaller limit is in force.
                self._break(MessageTooLarge(length, MAX_MESSAGE_SIZE if length > MAX_MESSAGE_SIZE else limit))
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
            # The control limit is read for control frames alone: a
            # subclass's may be a property, and nearly every frame is not one.
            if control[message_type] and length > (control_limit := self.MAX_CONTROL_LENGTH):
                # Too long for its kind, in a sound stream: skipped, unbuffered.
                if not self._skip_control_frame(message_type, length, control_limit):
                    return
                if frame_end > end:
                    # The frame started in this read unless its first bytes
                    # were buffered by an earlier one.
                    self._start_skip(frame_end - end, offset != 0 or view is not buf)
                    return
                offset = frame_end
                continue
            if frame_end > end:
                break
            payload = bytes(view[offset + 5 : frame_end])
            offset = frame_end
            self.frame_received(message_type, payload)
            if self._framing_broken or self.transport is None:
                return
            # A frame may change the limit (registration or a handshake lifts it).
            limit = self.MAX_LENGTH
        if view is buf:
            if offset:
                del buf[:offset]
        elif offset < end:
            buf += view[offset:] if offset else view
        held = len(buf)
        if held or self._held:
            self._account(held, offset != 0)

    def control_frame_too_large(self, error: ControlFrameTooLarge) -> bool:
        """
        A small control frame (Ping, Pong, HealthStatus, FlowControl)
        declares more than C{MAX_CONTROL_LENGTH}.

        @return: C{True} (the default) to skip it: its bytes are discarded as
            they arrive and never buffered, the frame deadline still
            applies, and the frames after it are read as usual; C{False} to
            end the framing with L{frame_error}C{(error)}.  Subclasses log
            the skip (rate-limited: the peer chooses how often it happens),
            or refuse while a handshake is all that may come.
        """
        return True

    def _skip_control_frame(self, message_type: int, length: int, limit: int) -> bool:
        """Whether the oversize control frame is skipped (see L{control_frame_too_large})."""
        error = ControlFrameTooLarge(MessageType(message_type).wire_name, length, limit)
        if not self.control_frame_too_large(error):
            if not self._framing_broken:
                self._break(error)
            return False
        self._skipping = (message_type, length)
        return not self._framing_broken and self.transport is not None

    def _start_skip(self, left: int, fresh: bool) -> None:
        """
        Discard the next C{left} bytes as they arrive (the rest of a skipped
        frame, which started in this read if C{fresh}); it holds nothing,
        but its deadline runs as any started frame's does.
        """
        self._skip_left = left
        self._diverted = True
        if self._buffer:
            self._buffer = bytearray()
        self._frame_begun(restart=fresh or not self._held)
        if self._held:
            self._held = 0
            if self.frame_budget is not None:
                self.frame_budget.hold(self, 0)

    def _skip(self, data: bytes) -> bytes:
        """Discard what C{data} holds of a skipped frame; the rest follows it."""
        left = self._skip_left
        if len(data) < left:
            self._skip_left = left - len(data)
            return b""
        self._skip_left = 0
        self._diverted = False
        return data[left:]

    def _account(self, held: int, completed: bool) -> None:
        """
        The read left C{held} bytes of an incomplete frame (C{completed}:
        after finishing at least one frame, so a new one has started).
        """
        if held and (completed or not self._held):
            self._frame_begun()
        self._held = held
        budget = self.frame_budget
        if budget is not None:
            budget.hold(self, held)

    def _frame_begun(self, restart: bool = True) -> None:
        """
        A frame is under way: its deadline runs from now if C{restart} (a
        new frame), and the timer that checks it is armed if it is not.
        """
        clock, timeout = self.frame_clock, self.frame_timeout
        if clock is not None and timeout is not None:
            if restart:
                self._frame_started = clock.seconds()
            if self._frame_timer is None:
                self._frame_timer = clock.callLater(timeout, self._frame_overdue)

    def _frame_overdue(self) -> None:
        # The timer is not moved on every new frame: it checks when it fires
        # and waits again for the rest of the current frame's time.
        self._frame_timer = None
        clock, timeout = self.frame_clock, self.frame_timeout
        if not (self._held or self._skip_left) or self._framing_broken or clock is None or timeout is None:
            return
        late = clock.seconds() - self._frame_started
        if late < timeout:
            self._frame_timer = clock.callLater(timeout - late, self._frame_overdue)
            return
        if self._skip_left:
            message_type, length = self._skipping
            received = f"{length + 4 - self._skip_left} bytes of a skipped {MessageType(message_type).wire_name} frame"
        else:
            received = f"{self._held} bytes of a frame"
        self._break(
            IncompleteFrame(f"{received} received, and the rest not within {format_duration(timeout)}")
        )

    def frame_budget_exceeded(self, held: int, total: int, limit: int) -> None:
        """
        The L{IncompleteFrameBudget} chose this connection, which holds the
        most, to bring the bytes held by all of them back under the limit.
        """
        self._break(
            IncompleteFrame(
                f"{held} bytes held by this connection; incomplete frames of all "
                f"connections held {total} bytes (max: {limit})"
            )
        )

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
        if self._skip_left:
            name = MessageType(self._skipping[0]).wire_name
            return f"connection closed mid-frame ({self._skip_left} bytes of a skipped {name} frame to come)"
        if reason.check(ConnectionDone):
            return f"connection closed by {self.peer_role}"
        # Twisted's texts end in a full stop ("... in a non-clean
        # fashion."), and this one is part of a sentence.
        return f"connection lost: {str(reason.value).rstrip('.')}"

    def stop_parsing(self) -> None:
        """Ignore every byte from now on (the connection is being closed)."""
        self._framing_broken = self._diverted = True
        self._release()

    def _release(self) -> None:
        """Drop the incomplete frame: its bytes, its deadline, its account."""
        self._buffer = bytearray()
        self._skip_left = 0
        timer, self._frame_timer = self._frame_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._held:
            self._held = 0
            if self.frame_budget is not None:
                self.frame_budget.hold(self, 0)

    def _break(self, error: AgentProtocolError) -> None:
        self._framing_broken = self._diverted = True
        self._release()
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


class IncompleteFrameBudget:
    """
    The bytes that every connection of a listener holds in incomplete
    frames, against one limit.  Each connection may buffer a frame of up to
    16 MiB; many of them doing so at once must not take the process's
    memory.  When the total goes over the limit, the connection holding the
    most is closed (L{FrameReceiver.frame_budget_exceeded}), again until the
    total is under it.

    @ivar limit: the most bytes all connections together may hold in
        incomplete frames.
    """

    def __init__(self, limit: int = MAX_INCOMPLETE_FRAME_BYTES) -> None:
        if not limit > 0:
            raise ValueError(f"the incomplete frame budget must be positive, got {limit!r}")
        self.limit = limit
        #: Bytes held right now, by all connections.
        self.total = 0
        #: Connections closed because the total went over the limit.
        self.evictions = 0
        self._held: dict[FrameReceiver, int] = {}

    def held_by(self, receiver: FrameReceiver) -> int:
        """Bytes of an incomplete frame that C{receiver} holds now."""
        return self._held.get(receiver, 0)

    def hold(self, receiver: FrameReceiver, size: int) -> None:
        """C{receiver} now holds C{size} bytes of an incomplete frame."""
        held = self._held
        previous = held.pop(receiver, 0) if not size else held.get(receiver, 0)
        if size:
            held[receiver] = size
        self.total += size - previous
        while self.total > self.limit and held:
            victim = max(held, key=held.__getitem__)
            total = self.total
            victim_held = held.pop(victim)
            self.total -= victim_held
            self.evictions += 1
            victim.frame_budget_exceeded(victim_held, total, self.limit)
