# -*- test-case-name: tests.test_errors -*-
"""
Errors of the agent protocol, as values with the texts the reference prints.

Every failure a caller can see is an L{AgentProtocolError}; its C{str()} is the
text SPEC section 5 names, so logs and error messages read the same as the
reference implementation's where the reference has a text, and clearly where
we go beyond it.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError

from ._cancel import CancelReason

__all__ = [
    "AgentProtocolError",
    "AgentUnavailable",
    "AuthenticationFailed",
    "ConnectionClosed",
    "ConnectionFailed",
    "ConnectionLimitReached",
    "ControlFrameTooLarge",
    "DuplicateCorrelationId",
    "FlowControlPaused",
    "IncompleteFrame",
    "InvalidMessage",
    "MessageTooLarge",
    "RequestCancelled",
    "RequestTimeout",
    "SerializationError",
    "VersionMismatch",
    "format_duration",
]


def format_duration(seconds: float) -> str:
    """
    Format a duration the way Rust's C{Duration} C{Debug} does (C{30s},
    C{200ms}, C{1.5s}, C{250µs}), so C{Timeout after ...} texts match the
    reference.
    """
    nanos = round(seconds * 1_000_000_000)
    if nanos >= 1_000_000_000:
        unit, scale = "s", 1_000_000_000
    elif nanos >= 1_000_000:
        unit, scale = "ms", 1_000_000
    elif nanos >= 1_000:
        unit, scale = "µs", 1_000
    else:
        return f"{nanos}ns"
    whole, frac = divmod(nanos, scale)
    if not frac:
        return f"{whole}{unit}"
    digits = str(frac).rjust(len(str(scale)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}{unit}"


class AgentProtocolError(Exception):
    """
    Base of every error of the agent protocol.  C{str(error)} is the
    user-facing text.
    """

    def __str__(self) -> str:
        return self.message

    @property
    def message(self) -> str:
        """The error's text, as it is sent to agents and logged (also C{str(error)})."""
        return str(self.args[0]) if self.args else type(self).__name__


class ConnectionFailed(AgentProtocolError):
    """
    Establishing a connection failed.

    @ivar detail: why the connection could not be made.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"Connection failed: {detail}")
        self.detail = detail


class ConnectionClosed(AgentProtocolError):
    """
    The connection ended while a request was waiting for its answer.

    The text is exactly C{Connection closed}, as the reference prints it;
    C{detail} says why, for logs.

    @ivar detail: why or how the connection closed.
    """

    def __init__(self, detail: str = "") -> None:
        super().__init__("Connection closed")
        self.detail = detail


class VersionMismatch(AgentProtocolError):
    """
    A registration asked for a protocol version other than 2.

    @ivar expected: the protocol version this package speaks.
    @ivar actual: the version the peer asked for.
    """

    def __init__(self, expected: int, actual: object) -> None:
        super().__init__(
            f"Protocol version mismatch: expected {expected}, got {actual}"
        )
        self.expected = expected
        self.actual = actual


class MessageTooLarge(AgentProtocolError):
    """
    A frame longer than the limit, received or about to be sent.

    @ivar size: the frame's length in bytes.
    @ivar limit: the limit in bytes.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"Message too large: {size} bytes (max: {limit})")
        self.size = size
        self.limit = limit


class ControlFrameTooLarge(MessageTooLarge):
    """
    A small control frame (Ping, Pong, HealthStatus, FlowControl) over the
    control frame limit.  The framing skips such a frame on an established
    connection (see L{FrameReceiver.control_frame_too_large
    <sentinel_twisted.wire.FrameReceiver.control_frame_too_large>}, which is
    given this error and may log it); it ends the connection with it only
    where a handshake is all that may come.

    @ivar kind: the frame's type (C{Ping}, C{HealthStatus}, ...).
    @ivar size: the frame's length in bytes.
    @ivar limit: the control frame limit in bytes.
    """

    def __init__(self, kind: str, size: int, limit: int) -> None:
        AgentProtocolError.__init__(
            self, f"Message too large: {size} bytes (max: {limit} for a {kind} frame)"
        )
        self.kind = kind
        self.size = size
        self.limit = limit


class IncompleteFrame(AgentProtocolError):
    """
    A frame was started and not finished in time, or the bytes held in
    unfinished frames went over their budget: the connection is closed.

    @ivar detail: what was missing.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"Incomplete frame: {detail}")
        self.detail = detail


class InvalidMessage(AgentProtocolError):
    """
    A frame or a payload that does not follow the wire contract.

    @ivar detail: what was wrong with the message (msgspec's text, with the
        field's path).
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"Invalid message format: {detail}")
        self.detail = detail


class AuthenticationFailed(AgentProtocolError):
    """
    A registration carried a token that the configured checker refused.
    The text names the agent, never the token.

    @ivar agent_id: the agent that failed to authenticate.
    """

    def __init__(self, agent_id: str) -> None:
        super().__init__(
            f"Authentication failed: invalid token for agent '{agent_id}'"
        )
        self.agent_id = agent_id


class ConnectionLimitReached(AgentProtocolError):
    """
    An agent tried to register more connections than the proxy allows.

    @ivar agent_id: the agent that tried to register one connection too many.
    @ivar limit: the most connections an agent may have.
    """

    def __init__(self, agent_id: str, limit: int) -> None:
        super().__init__(
            f"Connection limit reached: agent '{agent_id}' already holds "
            f"{limit} registered connection{'s' if limit != 1 else ''} "
            f"(max: {limit})"
        )
        self.agent_id = agent_id
        self.limit = limit


class RequestTimeout(AgentProtocolError):
    """
    No answer within the timeout (C{seconds}); the agent was sent a Cancel.
    Also a registration that did not arrive within the handshake timeout.

    @ivar seconds: the timeout that passed, in seconds.
    @ivar correlation_id: the request that was not answered.
    """

    def __init__(self, seconds: float, correlation_id: str = "") -> None:
        super().__init__(f"Timeout after {format_duration(seconds)}")
        self.seconds = seconds
        self.correlation_id = correlation_id


class AgentUnavailable(AgentProtocolError):
    """
    No registered connection of the agent exists.

    @ivar agent_id: the agent asked for (C{""} if not said).
    """

    def __init__(self, agent_id: str = "") -> None:
        super().__init__("Agent unavailable")
        self.agent_id = agent_id


class SerializationError(AgentProtocolError):
    """
    A message that cannot be encoded as JSON.

    @ivar detail: why the message could not be encoded.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"Serialization error: {detail}")
        self.detail = detail


class FlowControlPaused(AgentProtocolError):
    """
    No open connection of the agent takes a request: each asked the proxy
    to pause (FlowControl), or stopped reading what it is sent.

    @ivar agent_id: the paused agent.
    @ivar not_reading: whether none of them asked for a pause: every one
        is held back because the agent does not read it (its write buffer
        is full), and the text says so rather than the reference's
        "requested backpressure".
    """

    def __init__(self, agent_id: str, not_reading: bool = False) -> None:
        if not_reading:
            why = "is not reading its connections (write buffers full)"
        else:
            why = "requested backpressure"
        super().__init__(f"Flow control paused: agent '{agent_id}' {why}")
        self.agent_id = agent_id
        self.not_reading = not_reading


class DuplicateCorrelationId(AgentProtocolError):
    """
    A request was sent under a correlation id already waiting for an answer.

    @ivar correlation_id: the id already in use.
    """

    def __init__(self, correlation_id: str) -> None:
        super().__init__(
            f"Invalid message format: correlation id '{correlation_id}' is "
            f"already in flight on this connection"
        )
        self.correlation_id = correlation_id


class RequestCancelled(AgentProtocolError, CancelledError):
    """
    The proxy cancelled a request (a Cancel frame went to the agent).

    It is also a L{CancelledError}, so code that already handles Twisted
    cancellation handles this too.

    @ivar correlation_id: the cancelled request.
    @ivar reason: the L{CancelReason <sentinel_twisted.messages.CancelReason>}
        sent to the agent.
    """

    def __init__(self, correlation_id: str, reason: int) -> None:
        try:
            name = CancelReason(reason).name.lower()
        except ValueError:
            name = str(reason)
        super().__init__(f"Request cancelled: '{correlation_id}' ({name})")
        self.correlation_id = correlation_id
        self.reason = reason
