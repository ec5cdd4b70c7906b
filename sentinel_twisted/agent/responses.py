# -*- test-case-name: tests.agent.test_responses -*-
"""
Builders for AgentResponses, so that no agent author writes the JSON.

Start from a decision and chain what else the answer carries::

    return block(403, "Forbidden").tag("sqli").rule("942100")
    return allow().set_request_header("x-user", uid).remove_response_header("server")

Handlers may return the builder itself or call L{ResponseBuilder.build}.
The connection adds C{audit.custom.correlation_id}; builders leave it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import messages as m

__all__ = [
    "ResponseBuilder",
    "allow",
    "block",
    "challenge",
    "redirect",
    "respond",
]


def _check_header(name: str, value: str | None = None) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"header name must be a non-empty string, got {name!r}")
    if any(c in name for c in "\r\n:\0 \t"):
        raise ValueError(f"header name {name!r} contains a forbidden character")
    if value is not None:
        if not isinstance(value, str):
            raise ValueError(f"header {name!r}: value must be a string, got {type(value).__name__}")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"header {name!r}: value contains CR, LF or NUL")


def _check_status(status: int, low: int, high: int, what: str) -> None:
    if isinstance(status, bool) or not isinstance(status, int) or not low <= status <= high:
        raise ValueError(f"{what} status must be an integer from {low} to {high}, got {status!r}")


class ResponseBuilder:
    """
    An AgentResponse under construction.  Every method returns the builder,
    so calls chain; L{build} makes the immutable-in-spirit message.
    """

    __slots__ = (
        "_decision",
        "_request_headers",
        "_response_headers",
        "_routing",
        "_tags",
        "_rule_ids",
        "_reason_codes",
        "_confidence",
        "_custom",
        "_needs_more",
        "_request_body",
        "_response_body",
        "_websocket",
    )

    def __init__(self, decision: m.Decision = m.ALLOW) -> None:
        if not isinstance(decision, m.Decision):
            raise TypeError(f"decision must be a Decision, got {type(decision).__name__}")
        self._decision = decision
        self._request_headers: list[m.HeaderOp] = []
        self._response_headers: list[m.HeaderOp] = []
        self._routing: dict[str, str] = {}
        self._tags: list[str] = []
        self._rule_ids: list[str] = []
        self._reason_codes: list[str] = []
        self._confidence: float | None = None
        self._custom: dict[str, Any] = {}
        self._needs_more = False
        self._request_body: m.BodyMutation | None = None
        self._response_body: m.BodyMutation | None = None
        self._websocket: m.WebSocketDecision | None = None

    def __repr__(self) -> str:
        return f"<ResponseBuilder {self._decision!r}>"

    @property
    def decision(self) -> m.Decision:
        """The decision the response carries."""
        return self._decision

    # -- header operations -------------------------------------------------

    def set_request_header(self, name: str, value: str) -> ResponseBuilder:
        """Replace the request header C{name} before it goes upstream."""
        _check_header(name, value)
        self._request_headers.append(m.SetHeader(name, value))
        return self

    def add_request_header(self, name: str, value: str) -> ResponseBuilder:
        """
        Add a value to the request header C{name}, keeping those it has.

        @raise ValueError: an empty name, or a name or value with CR, LF or NUL.
        """
        _check_header(name, value)
        self._request_headers.append(m.AddHeader(name, value))
        return self

    def remove_request_header(self, name: str) -> ResponseBuilder:
        """
        Remove the request header C{name} before it goes upstream.

        @raise ValueError: an empty name, or a name or value with CR, LF or NUL.
        """
        _check_header(name)
        self._request_headers.append(m.RemoveHeader(name))
        return self

    def set_response_header(self, name: str, value: str) -> ResponseBuilder:
        """Replace the response header C{name} before it goes to the client."""
        _check_header(name, value)
        self._response_headers.append(m.SetHeader(name, value))
        return self

    def add_response_header(self, name: str, value: str) -> ResponseBuilder:
        """
        Add a value to the response header C{name}, keeping those it has.

        @raise ValueError: an empty name, or a name or value with CR, LF or NUL.
        """
        _check_header(name, value)
        self._response_headers.append(m.AddHeader(name, value))
        return self

    def remove_response_header(self, name: str) -> ResponseBuilder:
        """
        Remove the response header C{name} before it goes to the client::

            return allow().remove_response_header("server")

        @raise ValueError: an empty name, or a name or value with CR, LF or NUL.
        """
        _check_header(name)
        self._response_headers.append(m.RemoveHeader(name))
        return self

    def request_header_ops(self, ops: list[m.HeaderOp] | tuple[m.HeaderOp, ...]) -> ResponseBuilder:
        """Append ready-made header operations for the request."""
        self._request_headers.extend(ops)
        return self

    def response_header_ops(self, ops: list[m.HeaderOp] | tuple[m.HeaderOp, ...]) -> ResponseBuilder:
        """Append ready-made header operations for the response."""
        self._response_headers.extend(ops)
        return self

    # -- routing and audit -------------------------------------------------

    def route(self, key: str, value: str) -> ResponseBuilder:
        """Add a C{routing_metadata} entry (e.g. C{upstream=canary})."""
        self._routing[key] = value
        return self

    def tag(self, *tags: str) -> ResponseBuilder:
        """Add C{audit.tags} (C{"sqli"}), for the proxy's logs and metrics."""
        self._tags.extend(tags)
        return self

    def rule(self, *rule_ids: str) -> ResponseBuilder:
        """Add the ids of the rules that matched (C{audit.rule_ids})."""
        self._rule_ids.extend(rule_ids)
        return self

    def reason(self, *codes: str) -> ResponseBuilder:
        """Add machine-readable reason codes (C{audit.reason_codes})."""
        self._reason_codes.extend(codes)
        return self

    def confidence(self, value: float) -> ResponseBuilder:
        """
        How sure the agent is, from 0 to 1 (C{audit.confidence}).

        @raise ValueError: outside 0 to 1.
        """
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"confidence must be between 0 and 1, got {value!r}")
        self._confidence = float(value)
        return self

    def custom(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> ResponseBuilder:
        """Add free-form audit values (JSON-serialisable)."""
        if values:
            self._custom.update(values)
        self._custom.update(more)
        return self

    # -- streaming and bodies ----------------------------------------------

    def needs_more(self, flag: bool = True) -> ResponseBuilder:
        """Ask for more body chunks before the final decision."""
        self._needs_more = flag
        return self

    def replace_request_body(self, chunk_index: int, data: bytes) -> ResponseBuilder:
        """Replace request body chunk C{chunk_index} with C{data}."""
        self._request_body = m.BodyMutation.replace(chunk_index, data)
        return self

    def drop_request_body_chunk(self, chunk_index: int) -> ResponseBuilder:
        """Leave request body chunk C{chunk_index} out."""
        self._request_body = m.BodyMutation.drop(chunk_index)
        return self

    def pass_request_body_chunk(self, chunk_index: int) -> ResponseBuilder:
        """Let request body chunk C{chunk_index} through unchanged."""
        self._request_body = m.BodyMutation.pass_through(chunk_index)
        return self

    def replace_response_body(self, chunk_index: int, data: bytes) -> ResponseBuilder:
        """Replace response body chunk C{chunk_index} with C{data}."""
        self._response_body = m.BodyMutation.replace(chunk_index, data)
        return self

    def drop_response_body_chunk(self, chunk_index: int) -> ResponseBuilder:
        """Leave response body chunk C{chunk_index} out."""
        self._response_body = m.BodyMutation.drop(chunk_index)
        return self

    def pass_response_body_chunk(self, chunk_index: int) -> ResponseBuilder:
        """Let response body chunk C{chunk_index} through unchanged."""
        self._response_body = m.BodyMutation.pass_through(chunk_index)
        return self

    # -- websocket -----------------------------------------------------------

    def websocket_allow(self) -> ResponseBuilder:
        """Let the WebSocket frame through."""
        self._websocket = m.WebSocketAllow()
        return self

    def websocket_drop(self) -> ResponseBuilder:
        """Drop the WebSocket frame; the connection stays open."""
        self._websocket = m.WebSocketDrop()
        return self

    def websocket_close(self, code: int = 1008, reason: str = "") -> ResponseBuilder:
        """
        Close the WebSocket with C{code} (default 1008, policy violation) and
        C{reason}.

        @raise ValueError: a code outside 1000 to 4999.
        """
        _check_status(code, 1000, 4999, "websocket close")
        self._websocket = m.WebSocketClose(code, reason)
        return self

    # -- result ----------------------------------------------------------------

    def build(self) -> m.AgentResponse:
        """The AgentResponse; the builder can be reused afterwards."""
        return m.AgentResponse(
            decision=self._decision,
            request_headers=list(self._request_headers),
            response_headers=list(self._response_headers),
            routing_metadata=dict(self._routing),
            audit=m.AuditMetadata(
                tags=list(self._tags),
                rule_ids=list(self._rule_ids),
                confidence=self._confidence,
                reason_codes=list(self._reason_codes),
                custom=dict(self._custom),
            ),
            needs_more=self._needs_more,
            request_body_mutation=self._request_body,
            response_body_mutation=self._response_body,
            websocket_decision=self._websocket,
        )


def respond(decision: m.Decision) -> ResponseBuilder:
    """A builder for any decision object."""
    return ResponseBuilder(decision)


def allow() -> ResponseBuilder:
    """Let the request through (headers operations may still apply)."""
    return ResponseBuilder(m.ALLOW)


def block(
    status: int = 403,
    body: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> ResponseBuilder:
    """Answer the client with C{status} (and C{body}) instead of the upstream."""
    _check_status(status, 100, 599, "block")
    if headers is not None:
        for name, value in headers.items():
            _check_header(name, value)
    return ResponseBuilder(m.Block(status, body, dict(headers) if headers is not None else None))


def redirect(url: str, status: int = 302) -> ResponseBuilder:
    """Send the client to C{url} with a 3xx status."""
    if not isinstance(url, str) or not url or "\r" in url or "\n" in url:
        raise ValueError(f"redirect url must be a non-empty single-line string, got {url!r}")
    _check_status(status, 300, 399, "redirect")
    return ResponseBuilder(m.Redirect(url, status))


def challenge(challenge_type: str, params: Mapping[str, str] | None = None) -> ResponseBuilder:
    """Ask the client to solve a challenge (captcha, JavaScript, ...)."""
    if not challenge_type:
        raise ValueError("challenge_type must be a non-empty string")
    return ResponseBuilder(m.Challenge(challenge_type, dict(params or {})))
