# -*- test-case-name: tests.test_messages -*-
"""
The agent's answer, L{AgentResponse}, and its decisions and header
operations: the reference's externally tagged enums, converted at the
edge by the codec's hooks.
"""

from __future__ import annotations

import base64
import threading
from typing import Any, ClassVar, Final

import msgspec
from msgspec import Struct, field

from ._types import PROTOCOL_VERSION, U16, U32, _b64

# Decisions and header operations: externally tagged enums on the wire.


class _Variant:
    """
    A small immutable value class.  Deliberately not attrs or a dataclass:
    msgspec would encode those natively, and these must go through the
    codec's hook to get their externally tagged wire form.
    """

    __slots__: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} arguments")
        values = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected argument {name!r}")
            values[name] = value
        defaults = getattr(self, "_defaults", {})
        for name in names:
            if name in values:
                value = values[name]
            elif name in defaults:
                value = defaults[name]()
            else:
                raise TypeError(f"{type(self).__name__}: missing argument {name!r}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Variant)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), repr(self._values())))

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({args})"

    def to_wire(self) -> object:
        """The externally tagged JSON form (C{"allow"}, C{{"block": {...}}})."""
        raise NotImplementedError


class Decision(_Variant):
    """Base of the four decisions an agent can take."""

    __slots__ = ()


class Allow(Decision):
    """Let the request go on (L{ALLOW} is the one instance anyone needs)."""

    __slots__ = ()

    def to_wire(self) -> object:
        return "allow"


#: The L{Allow} decision (it has no fields, so one instance serves all).
ALLOW: Final = Allow()


class Block(Decision):
    """
    Answer the client at once with C{status} (default C{403}), an optional
    C{body} and optional response C{headers}; the request never reaches the
    upstream::

        AgentResponse(decision=Block(status=403, body="Forbidden"))

    @ivar status: the HTTP status the client gets (default C{403}).
    @ivar body: the response body, C{None} for the gateway's own.
    @ivar headers: response headers to send, C{None} for none.
    """

    __slots__ = ("status", "body", "headers")
    _defaults: ClassVar[dict[str, Any]] = {
        "status": lambda: 403,
        "body": lambda: None,
        "headers": lambda: None,
    }
    status: int
    body: str | None
    headers: dict[str, str] | None

    def to_wire(self) -> object:
        return {"block": {"status": self.status, "body": self.body, "headers": self.headers}}


class Redirect(Decision):
    """
    Answer the client with a redirect to C{url} (C{status}, default C{302}).

    @ivar url: where the client is sent (the C{Location} header).
    @ivar status: the redirect status (default C{302}).
    """

    __slots__ = ("url", "status")
    _defaults: ClassVar[dict[str, Any]] = {"status": lambda: 302}
    url: str
    status: int

    def to_wire(self) -> object:
        return {"redirect": {"url": self.url, "status": self.status}}


class Challenge(Decision):
    """
    Ask the client to prove something first (a CAPTCHA, a JavaScript
    check): C{challenge_type} and its C{params} go to the client in the
    gateway's challenge response.

    @ivar challenge_type: the kind of challenge (a CAPTCHA, a JavaScript
        check).
    @ivar params: its parameters, passed on to the client.
    """

    __slots__ = ("challenge_type", "params")
    _defaults: ClassVar[dict[str, Any]] = {"params": dict}
    challenge_type: str
    params: dict[str, str]

    def to_wire(self) -> object:
        return {"challenge": {"challenge_type": self.challenge_type, "params": self.params}}


class HeaderOp(_Variant):
    """
    Base of the header operations C{set}, C{add} and C{remove}.

    @ivar name: the header's name (case does not matter).
    """

    __slots__ = ()
    name: str


class SetHeader(HeaderOp):
    """
    Set header C{name} to C{value}, replacing any values it had.

    @ivar value: the header's one value from now on.
    """

    __slots__ = ("name", "value")
    value: str

    def to_wire(self) -> object:
        return {"set": {"name": self.name, "value": self.value}}


class AddHeader(HeaderOp):
    """
    Add C{value} to header C{name}, keeping the values it had.

    @ivar value: the value added to the header.
    """

    __slots__ = ("name", "value")
    value: str

    def to_wire(self) -> object:
        return {"add": {"name": self.name, "value": self.value}}


class RemoveHeader(HeaderOp):
    """Remove header C{name}."""

    __slots__ = ("name",)

    def to_wire(self) -> object:
        return {"remove": {"name": self.name}}


class WebSocketDecision(_Variant):
    """Base of the decisions on a WebSocket frame: allow, drop or close."""

    __slots__ = ()


class WebSocketAllow(WebSocketDecision):
    """Let the frame through."""

    __slots__ = ()

    def to_wire(self) -> object:
        return "allow"


class WebSocketDrop(WebSocketDecision):
    """Drop the frame silently; the connection stays open."""

    __slots__ = ()

    def to_wire(self) -> object:
        return "drop"


class WebSocketClose(WebSocketDecision):
    """
    Close the WebSocket with C{code} and C{reason}.

    @ivar code: the WebSocket close code.
    @ivar reason: the close reason text.
    """

    __slots__ = ("code", "reason")
    code: int
    reason: str

    def to_wire(self) -> object:
        return {"close": {"code": self.code, "reason": self.reason}}


# Wire shapes of the tagged variants' bodies, used to validate them.
class _BlockBody(Struct):
    status: U16
    body: str | None = None
    headers: dict[str, str] | None = None


class _RedirectBody(Struct):
    url: str
    status: U16 = 302


class _ChallengeBody(Struct):
    challenge_type: str
    params: dict[str, str] = field(default_factory=dict)


class _NameValue(Struct):
    name: str
    value: str


class _Name(Struct):
    name: str


class _CloseBody(Struct):
    code: U16
    reason: str


def _single_key(obj: object, what: str, choices: tuple[str, ...]) -> tuple[str, Any]:
    if isinstance(obj, dict) and len(obj) == 1:
        ((key, value),) = obj.items()
        if key in choices:
            return key, value
    raise ValueError(f"unknown {what} {_describe(obj)}; expected one of {', '.join(choices)}")


def _describe(obj: object) -> str:
    text = msgspec.json.encode(obj).decode("utf-8", "replace")
    return text if len(text) <= 60 else text[:57] + "..."


# Joins a variant body's own error path to the one msgspec appends for the
# field that holds the variant; see _error_text.
_SUBPATH = "\x00"


def _convert(obj: object, shape: type[Struct], key: str) -> Any:
    try:
        return msgspec.convert(obj, shape)
    except msgspec.ValidationError as e:
        # Raised as-is, msgspec would report the path inside the body
        # (``$.status``) as if it were the whole message's; a ValueError gets
        # the outer path appended, and _error_text splices the two.
        text, _, inner = str(e).partition(" - at `$")
        raise ValueError(f"{text}{_SUBPATH}.{key}{inner.rstrip('`')}") from None


def _unit_variant(obj: object, names: tuple[str, ...]) -> object:
    """
    A unit variant written as a map, C{{"allow": null}}, as its name: the
    reference's parser (serde) reads either form.
    """
    if isinstance(obj, dict) and len(obj) == 1:
        ((key, value),) = obj.items()
        if value is None and key in names:
            return key
    return obj


def _decode_decision(obj: object) -> Decision:
    if obj == "allow" or _unit_variant(obj, ("allow",)) == "allow":
        return ALLOW
    key, body = _single_key(obj, "decision", ("block", "redirect", "challenge"))
    if key == "block":
        b = _convert(body, _BlockBody, key)
        return Block(b.status, b.body, b.headers)
    if key == "redirect":
        r = _convert(body, _RedirectBody, key)
        return Redirect(r.url, r.status)
    c = _convert(body, _ChallengeBody, key)
    return Challenge(c.challenge_type, c.params)


#: The most header operations (request and response together) an answer
#: read by L{decode_agent_response
#: <sentinel_twisted.messages.decode_agent_response>} may carry: more is an
#: invalid answer.  A client's head is capped at 16 KiB; an agent's answer,
#: at up to 16 MiB, could otherwise make the gateway build and send heads of
#: hundreds of thousands of headers.
MAX_HEADER_OPS: Final = 100

#: The most values (each string, number, boolean, null, list and map, and
#: each key of a map) an answer read by L{decode_agent_response
#: <sentinel_twisted.messages.decode_agent_response>} may hold: more is an
#: invalid answer, refused before it is decoded.  Decoding makes an object
#: of some 64 bytes of every value: 16 MiB of empty lists in C{audit.custom}
#: would decode to some 360 MiB (JSON; more in MessagePack), held for as
#: long as its request is.  At this bound, what an answer decodes to stays
#: within a few MiB of its own size.
MAX_ANSWER_VALUES: Final = 100_000


class _HeaderOpCount(threading.local):
    """
    The header operations of the answer L{decode_agent_response
    <sentinel_twisted.messages.decode_agent_response>} is decoding on this
    thread, counted as they are decoded: an answer over the limit is refused
    at the first operation too many, not once all are read.  Reset after an
    answer that had some (an answer without any costs nothing).
    """

    used = 0


_op_count: Final = _HeaderOpCount()


def _decode_header_op(obj: object) -> HeaderOp:
    key, body = _single_key(obj, "header operation", ("set", "add", "remove"))
    if key == "remove":
        return RemoveHeader(_convert(body, _Name, key).name)
    nv = _convert(body, _NameValue, key)
    return SetHeader(nv.name, nv.value) if key == "set" else AddHeader(nv.name, nv.value)


def _decode_websocket_decision(obj: object) -> WebSocketDecision:
    obj = _unit_variant(obj, ("allow", "drop"))
    if obj == "allow":
        return WebSocketAllow()
    if obj == "drop":
        return WebSocketDrop()
    _, body = _single_key(obj, "websocket decision", ("close",))
    c = _convert(body, _CloseBody, "close")
    return WebSocketClose(c.code, c.reason)


_CUSTOM_DECODERS: dict[type, Any] = {
    Decision: _decode_decision,
    HeaderOp: _decode_header_op,
    WebSocketDecision: _decode_websocket_decision,
}


def _dec_hook(type_: type, obj: object) -> object:
    if obj == "allow" and type_ is Decision:
        # Most answers: no lookup, no second call.
        return ALLOW
    decoder = _CUSTOM_DECODERS.get(type_)
    if decoder is None:
        raise NotImplementedError(f"cannot decode {type_!r}")
    return decoder(obj)


def _answer_dec_hook(type_: type, obj: object) -> object:
    """L{_dec_hook} counting header operations against L{MAX_HEADER_OPS}."""
    if type_ is Decision and obj == "allow":
        # Most answers, as in _dec_hook: without a second call.
        return ALLOW
    if type_ is HeaderOp:
        used = _op_count.used + 1
        if used > MAX_HEADER_OPS:
            raise ValueError(f"more than {MAX_HEADER_OPS} header operations in one answer")
        _op_count.used = used
        return _decode_header_op(obj)
    return _dec_hook(type_, obj)


def _enc_hook(obj: object) -> object:
    to_wire = getattr(obj, "to_wire", None)
    if to_wire is None:
        raise NotImplementedError(f"cannot encode {type(obj).__name__}")
    return to_wire()


# --------------------------------------------------------------------------
# Agent response


class AuditMetadata(Struct, kw_only=True):
    """
    What an agent says about its decision, for logs and metrics: C{tags},
    the C{rule_ids} that matched, a C{confidence}, C{reason_codes}, and
    anything else in C{custom} (where the correlation id travels).

    @ivar tags: free-form labels for logs and metrics.
    @ivar rule_ids: ids of the agent's rules that matched.
    @ivar confidence: how sure the agent is (0 to 1), C{None} if it does not
        say.
    @ivar reason_codes: machine-readable reasons for the decision.
    @ivar custom: any other JSON; the correlation id travels here.
    """

    tags: list[str] = field(default_factory=list)
    rule_ids: list[str] = field(default_factory=list)
    confidence: float | None = None
    reason_codes: list[str] = field(default_factory=list)
    custom: dict[str, Any] = field(default_factory=dict)


class BodyMutation(Struct, kw_only=True):
    """
    C{data}: base64 replacement, C{""} drops the chunk, C{None} passes it.

    @ivar data: the replacement chunk in base64, C{""} to drop the chunk,
        C{None} to pass it as it is.
    @ivar chunk_index: the index of the chunk it applies to.
    """

    data: str | None = None
    chunk_index: U32 = 0

    @classmethod
    def replace(cls, chunk_index: int, data: bytes) -> BodyMutation:
        """
        Replace chunk C{chunk_index} with C{data}::

            AgentResponse(request_body_mutation=BodyMutation.replace(0, b"redacted"))
        """
        return cls(data=base64.b64encode(data).decode("ascii"), chunk_index=chunk_index)

    @classmethod
    def drop(cls, chunk_index: int) -> BodyMutation:
        """Drop chunk C{chunk_index} from the body."""
        return cls(data="", chunk_index=chunk_index)

    @classmethod
    def pass_through(cls, chunk_index: int) -> BodyMutation:
        """Leave chunk C{chunk_index} as it is."""
        return cls(data=None, chunk_index=chunk_index)

    @property
    def is_pass_through(self) -> bool:
        """Whether the chunk is left as it is."""
        return self.data is None

    @property
    def is_drop(self) -> bool:
        """Whether the chunk is dropped."""
        return self.data == ""

    @property
    def replacement(self) -> bytes | None:
        """The replacement bytes, C{b""} for a drop, C{None} to pass through."""
        return None if self.data is None else _b64(self.data)


class AgentResponse(Struct, kw_only=True):
    """
    An agent's answer to one event: its L{Decision}, header operations for
    the request and the response, body mutations, audit data, and
    C{needs_more} when it wants to see more of the body before deciding.
    The L{Deferred <twisted.internet.defer.Deferred>} of every C{send_*}
    method fires with one::

        answer = await pool.send_request_headers("waf", event)
        if not answer.is_allow:
            ...  # answer.decision is a Block, Redirect or Challenge

    @ivar request_headers: L{HeaderOp}s applied to the request before it
        goes upstream.
    @ivar response_headers: L{HeaderOp}s applied to the response (and to a
        block's response).
    @ivar routing_metadata: key/value hints for the proxy's routing.
    @ivar version: the protocol version of the answer (L{PROTOCOL_VERSION}).
    @ivar decision: what happens to the request: L{Allow}, L{Block},
        L{Redirect} or L{Challenge}.
    @ivar audit: what the agent says about its decision (L{AuditMetadata}).
    @ivar needs_more: the agent wants to see more of the body before it
        decides.
    @ivar request_body_mutation: what to do with the request body chunk it
        answers, C{None} to leave it.
    @ivar response_body_mutation: what to do with the response body chunk it
        answers, C{None} to leave it.
    @ivar websocket_decision: for a WebSocket frame: allow, drop or close;
        C{None} means allow.
    """

    version: int = PROTOCOL_VERSION
    decision: Decision = ALLOW
    request_headers: list[HeaderOp] = field(default_factory=list)
    response_headers: list[HeaderOp] = field(default_factory=list)
    routing_metadata: dict[str, str] = field(default_factory=dict)
    audit: AuditMetadata = field(default_factory=AuditMetadata)
    needs_more: bool = False
    request_body_mutation: BodyMutation | None = None
    response_body_mutation: BodyMutation | None = None
    websocket_decision: WebSocketDecision | None = None

    @property
    def correlation_id(self) -> str | None:
        """The id the answer is routed by (C{audit.custom.correlation_id})."""
        cid = self.audit.custom.get("correlation_id")
        return cid if isinstance(cid, str) else None

    @property
    def is_allow(self) -> bool:
        """Whether the decision is L{Allow}."""
        return isinstance(self.decision, Allow)


class _RequiredAgentResponse(AgentResponse, kw_only=True):
    """The decoding shape: C{version} and C{decision} have no default."""

    version: int
    decision: Decision


