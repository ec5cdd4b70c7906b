# -*- test-case-name: tests.agent.test_protocol -*-
"""
Errors of the agent side: why a registration did not go through, and
whether trying again can help.
"""

from __future__ import annotations

from .._peertext import peer_text
from ..errors import AgentProtocolError

__all__ = [
    "AgentHandlerError",
    "HandshakeFailed",
    "RegistrationFailed",
    "RegistrationRejected",
    "is_retryable_rejection",
]

# Rejections that another attempt with the same settings cannot fix.  The
# texts are the ones SPEC section 3 gives the proxy (ours and the reference).
_FATAL_PREFIXES = (
    "Protocol version mismatch",
    "Invalid message format",
    "Authentication",
)


def is_retryable_rejection(reason: str) -> bool:
    """
    Whether a proxy's rejection text describes a condition that may go
    away by itself (a connection limit, a handshake timeout, an unknown
    reason) rather than a configuration error (version, allowlist,
    authentication, a malformed registration).
    """
    return not reason.startswith(_FATAL_PREFIXES)


class RegistrationFailed(AgentProtocolError):
    """
    The registration did not complete: no answer in time, a malformed
    answer, or the connection ended first.  Always worth retrying.

    @cvar retryable: C{True}: always worth retrying.
    @ivar detail: what went wrong.
    """

    retryable = True

    def __init__(self, detail: str) -> None:
        super().__init__(f"Registration failed: {detail}")
        self.detail = detail


class RegistrationRejected(AgentProtocolError):
    """
    The proxy answered C{success: false}.  C{reason} is the proxy's text;
    C{retryable} says whether reconnecting can help.

    @ivar reason: the proxy's text.
    @ivar proxy_id: the proxy's id (C{""} if not known).
    @ivar retryable: whether reconnecting can help (see
        L{is_retryable_rejection}).
    """

    def __init__(self, reason: str, proxy_id: str = "", retryable: bool | None = None) -> None:
        # The proxy's texts, cut and escaped: this message goes to log lines.
        who = f"proxy '{peer_text(proxy_id, 64)}'" if proxy_id else "the proxy"
        super().__init__(f"Registration rejected by {who}: {peer_text(reason)}")
        self.reason = reason
        self.proxy_id = proxy_id
        self.retryable = is_retryable_rejection(reason) if retryable is None else retryable


class HandshakeFailed(AgentProtocolError):
    """
    A proxy's forward connection did not complete its handshake: wrong
    first frame, a malformed or unacceptable HandshakeRequest, none in time.

    @cvar retryable: C{True}: the next connection may do better.
    @ivar detail: what went wrong.
    """

    retryable = True

    def __init__(self, detail: str) -> None:
        super().__init__(f"Handshake failed: {detail}")
        self.detail = detail


class AgentHandlerError(AgentProtocolError):
    """
    An agent's handler raised, or returned something that is not an answer.

    @ivar handler: the handler that failed (C{on_request_headers}, ...).
    @ivar correlation_id: the event it failed on.
    @ivar detail: what went wrong.
    """

    def __init__(self, handler: str, correlation_id: str, detail: str) -> None:
        # The id is the proxy's choice: cut and escaped, as in every log line.
        super().__init__(f"Agent handler {handler} failed for '{peer_text(correlation_id, 64)}': {detail}")
        self.handler = handler
        self.correlation_id = correlation_id
        self.detail = detail
