"""
The seam agent authors plug into: L{IAgent}.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Union

from twisted.internet.defer import Deferred
from zope.interface import Interface

from .. import messages as m

if TYPE_CHECKING:
    from .responses import ResponseBuilder

__all__ = ["Answer", "HandlerResult", "IAgent"]

#: What a handler's answer may be: a finished response or a builder.
Answer = Union[m.AgentResponse, "ResponseBuilder"]

#: What a handler may return: an answer, a Deferred of one, or a coroutine.
HandlerResult = Union[
    Answer,
    "Deferred[Answer]",
    "Deferred[m.AgentResponse]",
    "Deferred[ResponseBuilder]",
    Coroutine[Any, Any, Answer],
    Coroutine[Any, Any, m.AgentResponse],
    Coroutine[Any, Any, "ResponseBuilder"],
]


class IAgent(Interface):
    """
    A policy agent: it answers the proxy's events.

    Every C{on_*} handler receives the decoded event and returns an
    L{AgentResponse <sentinel_twisted.messages.AgentResponse>} or a
    L{ResponseBuilder <sentinel_twisted.agent.responses.ResponseBuilder>},
    directly, as a L{Deferred}, or from a coroutine.  Handlers run
    concurrently; a handler's Deferred is cancelled when the proxy cancels
    the request.  The connection routes the answer (it sets
    C{audit.custom.correlation_id}); handlers never do.
    """

    def capabilities(agent_id: str) -> m.AgentCapabilities:
        """What to announce in the RegistrationRequest of each connection."""

    def health() -> int:
        """The current L{HealthState <sentinel_twisted.messages.HealthState>}, reported periodically."""

    def on_request_headers(event: m.RequestHeadersEvent) -> HandlerResult:
        """A request's headers; the usual place to allow, block or redirect."""

    def on_request_body_chunk(event: m.RequestBodyChunkEvent) -> HandlerResult:
        """One chunk of a request body (C{event.body} is the decoded bytes)."""

    def on_response_headers(event: m.ResponseHeadersEvent) -> HandlerResult:
        """The upstream's response status and headers."""

    def on_response_body_chunk(event: m.ResponseBodyChunkEvent) -> HandlerResult:
        """One chunk of a response body."""

    def on_request_complete(event: m.RequestCompleteEvent) -> HandlerResult:
        """A request finished (for logging and clean-up; its decision is ignored)."""

    def on_websocket_frame(event: m.WebSocketFrameEvent) -> HandlerResult:
        """One WebSocket frame; answer with a C{websocket_*} builder method."""

    def on_guardrail_inspect(event: m.GuardrailInspectEvent) -> HandlerResult:
        """Content to inspect for prompt injection or PII."""

    def on_configure(event: m.ConfigureEvent) -> HandlerResult:
        """Configuration pushed by the proxy."""
