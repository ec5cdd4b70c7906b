# -*- test-case-name: tests.test_messages -*-
"""
Typed messages of the agent protocol and their JSON codec.

Records are L{msgspec.Struct}s: decoding validates every field's type in C
while it parses, so a wrong type becomes an L{InvalidMessage} naming the
field (C{Expected `int`, got `str` - at `$.capabilities.limits.max_concurrency`}).
The externally tagged enums of the reference (C{"allow"},
C{{"block": {...}}}, C{{"set": {...}}}) are small frozen classes converted
at the edge by the codec's hooks.

Field names, nesting, C{null} versus absent, and enum spellings follow the
vectors in C{shared/vectors}; key order does not matter on the wire.
"""

from __future__ import annotations

import base64
import enum
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

from .._cancel import CancelReason
from ..errors import InvalidMessage, SerializationError, VersionMismatch
from ..wire import MessageType

__all__ = [
    "ALLOW",
    "PROTOCOL_VERSION",
    "AddHeader",
    "AgentCapabilities",
    "AgentFeatures",
    "AgentLimits",
    "AgentResponse",
    "Allow",
    "AuditMetadata",
    "Block",
    "BodyMutation",
    "CancelMessage",
    "CancelReason",
    "Challenge",
    "ConfigureEvent",
    "Decision",
    "Event",
    "EventType",
    "FlowAction",
    "FlowControlMessage",
    "GuardrailInspectEvent",
    "HeaderOp",
    "HealthState",
    "HealthStatusMessage",
    "PingMessage",
    "Redirect",
    "RegistrationRequest",
    "RegistrationResponse",
    "RemoveHeader",
    "RequestBodyChunkEvent",
    "RequestCompleteEvent",
    "RequestHeadersEvent",
    "RequestMetadata",
    "ResponseBodyChunkEvent",
    "ResponseHeadersEvent",
    "SetHeader",
    "WebSocketAllow",
    "WebSocketClose",
    "WebSocketDecision",
    "WebSocketDrop",
    "WebSocketFrameEvent",
    "decode",
    "decode_agent_response",
    "decode_registration_request",
    "encode",
    "encode_event",
]

#: The protocol version this package speaks (C{protocol_version} of a registration).
PROTOCOL_VERSION: Final = 2

#: An integer field of the wire contract that is an unsigned 16-bit number.
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
#: An integer field of the wire contract that is an unsigned 32-bit number.
U32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]
# msgspec bounds integers at int64; no real size or count comes near it.
#: An unsigned 64-bit field (bounded at 2**63 - 1, as msgspec reads int64).
U64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
#: A signed 64-bit field (timestamps in milliseconds).
I64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


class EventType(enum.IntEnum):
    """
    Numbers used in C{capabilities.supported_events}.

    @cvar CONFIGURE: configuration pushed to the agent (L{ConfigureEvent}).
    @cvar REQUEST_HEADERS: a request's headers (L{RequestHeadersEvent}).
    @cvar REQUEST_BODY_CHUNK: a piece of a request body
        (L{RequestBodyChunkEvent}).
    @cvar RESPONSE_HEADERS: a response's headers (L{ResponseHeadersEvent}).
    @cvar RESPONSE_BODY_CHUNK: a piece of a response body
        (L{ResponseBodyChunkEvent}).
    @cvar REQUEST_COMPLETE: the end of a request (L{RequestCompleteEvent}).
    @cvar WEBSOCKET_FRAME: a WebSocket frame (L{WebSocketFrameEvent}).
    @cvar GUARDRAIL_INSPECT: text to inspect (L{GuardrailInspectEvent}).
    """

    CONFIGURE = 0
    REQUEST_HEADERS = 1
    REQUEST_BODY_CHUNK = 2
    RESPONSE_HEADERS = 3
    RESPONSE_BODY_CHUNK = 4
    REQUEST_COMPLETE = 5
    WEBSOCKET_FRAME = 6
    GUARDRAIL_INSPECT = 7


class HealthState(enum.IntEnum):
    """
    The C{state} of a HealthStatus: what an agent says of itself.  The
    gateway shows it on the status site; it does not route by it.

    @cvar HEALTHY: working normally.
    @cvar DEGRADED: working, with trouble.
    @cvar DRAINING: finishing its work before it stops.
    @cvar UNHEALTHY: not working.
    """

    HEALTHY = 1
    DEGRADED = 2
    DRAINING = 3
    UNHEALTHY = 4


class FlowAction(enum.IntEnum):
    """
    The C{action} of a FlowControl message: pause or resume sending requests.

    @cvar PAUSE: send the agent no new requests.
    @cvar RESUME: send it requests again.
    """

    PAUSE = 1
    RESUME = 2


# --------------------------------------------------------------------------
# Registration


class AgentFeatures(Struct, kw_only=True):
    """
    C{capabilities.features}; every field is required on the wire.

    @ivar streaming_body: the agent inspects bodies chunk by chunk.
    @ivar websocket: the agent inspects WebSocket frames.
    @ivar guardrails: the agent answers GuardrailInspect events.
    @ivar config_push: the agent accepts Configure events.
    @ivar metrics_export: the agent can export metrics.
    @ivar concurrent_requests: how many requests the agent handles at once.
    @ivar cancellation: the agent understands Cancel frames.
    @ivar flow_control: the agent may send FlowControl (pause, resume).
    @ivar health_reporting: the agent sends HealthStatus frames.
    """

    streaming_body: bool = False
    websocket: bool = False
    guardrails: bool = False
    config_push: bool = False
    metrics_export: bool = False
    concurrent_requests: U32 = 1
    cancellation: bool = False
    flow_control: bool = False
    health_reporting: bool = False


class AgentLimits(Struct, kw_only=True):
    """
    C{capabilities.limits}; every field is required on the wire.

    @ivar max_body_size: the most body bytes the agent inspects; the
        gateway answers C{413} to a longer body the agent asked to see.
    @ivar max_concurrency: events the agent handles at once per connection.
    @ivar preferred_chunk_size: the size of the body chunks it is sent.
    """

    max_body_size: U64 = 10 * 1024 * 1024
    max_concurrency: U32 = 100
    preferred_chunk_size: U64 = 64 * 1024


class AgentCapabilities(Struct, kw_only=True):
    """
    What an agent announces in its RegistrationRequest: who it is, which
    events it wants (C{supported_events}, numbers of L{EventType}), its
    features and its limits.  Kept on its L{AgentConnection
    <sentinel_twisted.proxy.connection.AgentConnection>} as C{capabilities}.

    @ivar agent_id: the agent's id (as in its RegistrationRequest).
    @ivar name: a human-readable name of the agent.
    @ivar version: the agent's own software version.
    @ivar supported_events: the L{EventType} numbers the agent wants to be
        sent; only C{request_headers} when absent.
    @ivar features: what the agent can do (L{AgentFeatures}).
    @ivar limits: how much the agent takes (L{AgentLimits}).
    """

    agent_id: str
    name: str
    version: str
    supported_events: list[int] = field(default_factory=lambda: [1])
    features: AgentFeatures = field(default_factory=AgentFeatures)
    limits: AgentLimits = field(default_factory=AgentLimits)

    @property
    def events(self) -> frozenset[EventType]:
        """The known event types the agent handles (unknown numbers are ignored)."""
        events = frozenset(EventType(n) for n in self.supported_events if 0 <= n <= 7)
        # At most 256 distinct sets exist; sharing them saves every registered
        # connection its own copy (a five-element frozenset is 728 bytes).
        return _EVENT_SETS.setdefault(events, events)


_EVENT_SETS: dict[frozenset[EventType], frozenset[EventType]] = {}


class RegistrationRequest(Struct, kw_only=True):
    """
    The first frame of an agent connection (HandshakeRequest).  Its C{repr}
    never shows the token.

    @ivar protocol_version: must be L{PROTOCOL_VERSION}.
    @ivar auth_token: checked by the listener's
        L{ITokenChecker <sentinel_twisted.proxy.auth.ITokenChecker>}, if any.
    @ivar metadata: any JSON the agent sends; shown on the status site.
    @ivar agent_id: the agent's id; the pool keeps its connections under it.
    @ivar capabilities: what the agent wants and can do
        (L{AgentCapabilities}).
    """

    protocol_version: int
    agent_id: str
    capabilities: AgentCapabilities
    auth_token: str | None = None
    metadata: Any = None

    def __repr__(self) -> str:
        # Never show the token, not even in a traceback or a debug log.
        token = "None" if self.auth_token is None else "'<redacted>'"
        return (
            f"RegistrationRequest(protocol_version={self.protocol_version!r}, "
            f"agent_id={self.agent_id!r}, capabilities={self.capabilities!r}, "
            f"auth_token={token}, metadata={self.metadata!r})"
        )


class RegistrationResponse(Struct, kw_only=True):
    """
    The listener's answer to a RegistrationRequest (HandshakeResponse).  On
    success C{error} is C{None} and C{connection_id} names the connection;
    on failure C{error} is the reason and the connection is closed.

    @ivar success: whether the registration was accepted.
    @ivar error: why it was refused, C{None} on success.
    @ivar proxy_id: the proxy's id.
    @ivar proxy_version: the proxy's software version.
    @ivar connection_id: the id the proxy gave the connection.
    """

    success: bool
    error: str | None
    proxy_id: str
    proxy_version: str
    connection_id: str


# --------------------------------------------------------------------------
# Events (proxy -> agent).  Each carries the top-level correlation_id the
# proxy inserts when it sends the event.


class RequestMetadata(Struct, kw_only=True):
    """
    Who asked for what: the client, the TLS parameters and the ids of a
    request, sent in every L{RequestHeadersEvent}.

    @ivar correlation_id: the id every event of the request is sent under.
    @ivar request_id: the client's C{X-Request-Id}, else the correlation id.
    @ivar server_name: the TLS SNI name, else the C{Host} header's name.
    @ivar timestamp: when the request arrived (RFC 3339).
    @ivar client_ip: the client's IP address.
    @ivar client_port: the client's port.
    @ivar protocol: the HTTP version (C{HTTP/1.1}).
    @ivar tls_version: the TLS version, C{None} without TLS.
    @ivar tls_cipher: the TLS cipher suite, C{None} without TLS.
    @ivar route_id: the route the request matched, C{None} if none.
    @ivar upstream_id: the upstream the request goes to, C{None} if not known.
    """

    correlation_id: str
    request_id: str
    client_ip: str
    client_port: U16
    server_name: str | None = None
    protocol: str = "HTTP/1.1"
    tls_version: str | None = None
    tls_cipher: str | None = None
    route_id: str | None = None
    upstream_id: str | None = None
    timestamp: str
    #: The client's W3C C{traceparent}, when it sent one; omitted from the
    #: wire when unset, as the reference does.
    traceparent: str | UnsetType = UNSET


class _Event(Struct, kw_only=True):
    message_type: ClassVar[MessageType]
    event_type: ClassVar[EventType]
    correlation_id: str = ""


class RequestHeadersEvent(_Event, kw_only=True):
    """
    A request's method, target and headers, the first event of every
    request (header names lower-case, each with its list of values)::

        RequestHeadersEvent(metadata=metadata, method="GET", uri="/x?a=1",
                            headers={"host": ["example.com"]})

    @ivar metadata: who asked, and the request's ids (L{RequestMetadata}).
    @ivar method: the HTTP method.
    @ivar uri: the request target (path and query).
    @ivar headers: header names (lower-case) to their values.
    """

    message_type = MessageType.REQUEST_HEADERS
    event_type = EventType.REQUEST_HEADERS
    metadata: RequestMetadata
    method: str
    uri: str
    headers: dict[str, list[str]] = field(default_factory=dict)


def _b64(data: str) -> bytes:
    return base64.b64decode(data, validate=True)


class RequestBodyChunkEvent(_Event, kw_only=True):
    """
    A piece of the request body, base64 in C{data} (use L{body} for the
    bytes); C{is_last} on the final piece, C{bytes_received} counting so far.

    @ivar is_last: this is the body's last chunk.
    @ivar total_size: the whole body's size in bytes, C{None} if not known (no
        C{Content-Length}).
    @ivar chunk_index: the chunk's number, from 0.
    @ivar bytes_received: body bytes received so far, this chunk included.
    """

    message_type = MessageType.REQUEST_BODY_CHUNK
    event_type = EventType.REQUEST_BODY_CHUNK
    #: base64 (standard alphabet, padded)
    data: str
    is_last: bool
    total_size: U64 | None = None
    chunk_index: U32
    bytes_received: U64

    @property
    def body(self) -> bytes:
        """The chunk's bytes (C{data} decoded)."""
        return _b64(self.data)


class ResponseHeadersEvent(_Event, kw_only=True):
    """
    The upstream's response status and headers, before its body.

    @ivar status: the upstream's status code.
    @ivar headers: header names (lower-case) to their values.
    """

    message_type = MessageType.RESPONSE_HEADERS
    event_type = EventType.RESPONSE_HEADERS
    status: U16
    headers: dict[str, list[str]] = field(default_factory=dict)


class ResponseBodyChunkEvent(_Event, kw_only=True):
    """
    A piece of the response body, base64 in C{data} (use L{body} for the
    bytes); C{is_last} on the final piece, C{bytes_sent} counting so far.

    @ivar data: the chunk in base64 (standard alphabet, padded).
    @ivar is_last: this is the body's last chunk.
    @ivar total_size: the whole body's size in bytes, C{None} if not known.
    @ivar chunk_index: the chunk's number, from 0.
    @ivar bytes_sent: body bytes sent so far, this chunk included.
    """

    message_type = MessageType.RESPONSE_BODY_CHUNK
    event_type = EventType.RESPONSE_BODY_CHUNK
    data: str
    is_last: bool
    total_size: U64 | None = None
    chunk_index: U32
    bytes_sent: U64

    @property
    def body(self) -> bytes:
        """The chunk's bytes (C{data} decoded)."""
        return _b64(self.data)


class RequestCompleteEvent(_Event, kw_only=True):
    """
    A notification that a request is over: the status the client got, how
    long it took, the body sizes, and C{error} if it failed.  Agents answer
    it, but the answer changes nothing.

    @ivar status: the status the client got.
    @ivar duration_ms: from the request's arrival to the end of its response.
    @ivar error: what went wrong (upstream or agent failure), else C{None}.
    @ivar request_body_size: the request body's size in bytes.
    @ivar response_body_size: the response body's size in bytes.
    @ivar upstream_attempts: how many times the upstream was tried.
    """

    message_type = MessageType.REQUEST_COMPLETE
    event_type = EventType.REQUEST_COMPLETE
    status: U16
    duration_ms: U64
    request_body_size: U64 = 0
    response_body_size: U64 = 0
    upstream_attempts: U32 = 1
    error: str | None = None


class WebSocketFrameEvent(_Event, kw_only=True):
    """
    One WebSocket frame, in either direction (C{client_to_server}); its
    payload base64 in C{data} (use L{body} for the bytes).

    @ivar data: the payload in base64 (standard alphabet, padded).
    @ivar client_to_server: the frame goes from the client to the upstream
        (else back).
    @ivar frame_index: the frame's number on the connection, from 0.
    @ivar fin: this frame ends its message.
    @ivar route_id: the route of the connection, C{None} if none.
    @ivar client_ip: the client's IP address.
    """

    message_type = MessageType.WEBSOCKET_FRAME
    event_type = EventType.WEBSOCKET_FRAME
    #: text, binary, ping, pong, close or continuation
    opcode: str
    data: str
    client_to_server: bool
    frame_index: U64
    fin: bool = True
    route_id: str | None = None
    client_ip: str

    @property
    def body(self) -> bytes:
        """The frame's payload (C{data} decoded)."""
        return _b64(self.data)


class GuardrailInspectEvent(_Event, kw_only=True):
    """
    Text for an agent to inspect for prompt injection or personal data
    (C{inspection_type}); the answer's decision says whether it passes.

    @ivar inspection_type: what to look for: C{prompt_injection} or
        C{pii_detection}.
    @ivar content: the text to inspect.
    @ivar categories: categories to check, empty for all.
    @ivar metadata: string key/value context for the agent.
    """

    message_type = MessageType.GUARDRAIL_INSPECT
    event_type = EventType.GUARDRAIL_INSPECT
    inspection_type: Literal["prompt_injection", "pii_detection"]
    content: str
    model: str | UnsetType = UNSET
    categories: list[str] = field(default_factory=list)
    route_id: str | UnsetType = UNSET
    metadata: dict[str, str] = field(default_factory=dict)


class ConfigureEvent(_Event, kw_only=True):
    """
    New configuration for an agent (any JSON in C{config}); the agent
    answers with a decision, usually L{Allow}.

    @ivar config: the configuration, any JSON.
    @ivar config_version: an id of that configuration, C{None} if it has none.
    """

    message_type = MessageType.CONFIGURE
    event_type = EventType.CONFIGURE
    config: Any
    config_version: str | None = None


#: Any of the eight events the proxy sends to agents.
Event = (
    RequestHeadersEvent
    | RequestBodyChunkEvent
    | ResponseHeadersEvent
    | ResponseBodyChunkEvent
    | RequestCompleteEvent
    | WebSocketFrameEvent
    | GuardrailInspectEvent
    | ConfigureEvent
)

#: The event class of each event frame's message type.
EVENT_CLASSES: Final[dict[int, type[_Event]]] = {
    cls.message_type: cls
    for cls in (
        RequestHeadersEvent,
        RequestBodyChunkEvent,
        ResponseHeadersEvent,
        ResponseBodyChunkEvent,
        RequestCompleteEvent,
        WebSocketFrameEvent,
        GuardrailInspectEvent,
        ConfigureEvent,
    )
}


# --------------------------------------------------------------------------
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


def _decode_decision(obj: object) -> Decision:
    if obj == "allow":
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


def _decode_header_op(obj: object) -> HeaderOp:
    key, body = _single_key(obj, "header operation", ("set", "add", "remove"))
    if key == "remove":
        return RemoveHeader(_convert(body, _Name, key).name)
    nv = _convert(body, _NameValue, key)
    return SetHeader(nv.name, nv.value) if key == "set" else AddHeader(nv.name, nv.value)


def _decode_websocket_decision(obj: object) -> WebSocketDecision:
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


# --------------------------------------------------------------------------
# Control messages


class CancelMessage(Struct, kw_only=True):
    """
    The proxy tells an agent it no longer needs the answer for
    C{correlation_id} (C{reason}: a L{CancelReason}).

    @ivar correlation_id: the request whose answer is no longer needed.
    @ivar reason: why, a L{CancelReason} number.
    @ivar timestamp_ms: when it was sent, milliseconds since the Unix epoch.
    """

    correlation_id: str
    reason: int
    timestamp_ms: I64


class PingMessage(Struct, kw_only=True):
    """
    Ping and Pong share this body; Pong echoes the Ping's.

    @ivar sequence: the Ping's number; its Pong echoes it.
    @ivar timestamp_ms: when the Ping was sent, milliseconds since the Unix
        epoch.
    """

    sequence: U64
    timestamp_ms: I64


class FlowControlMessage(Struct, kw_only=True, omit_defaults=True):
    """
    C{{"action": 1}} pauses, C{{"action": 2}} resumes.  The crate's struct
    form C{{"action": {"type": "pause"}}} is accepted too, never sent.

    @ivar action: a L{FlowAction} number, or the crate's C{{"type": ...}}
        form; C{None} if absent.
    @ivar correlation_id: the request it concerns, C{None} for the whole
        connection.
    @ivar timestamp_ms: when it was sent, milliseconds since the Unix epoch,
        C{None} if absent.
    """

    action: int | dict[str, Any] | None = None
    correlation_id: str | None = None
    timestamp_ms: I64 | None = None

    @property
    def paused(self) -> bool:
        """Whether the sender asks for a pause (anything else means normal)."""
        action = self.action
        if isinstance(action, dict):
            return action.get("type") == "pause"
        return action == FlowAction.PAUSE


_HEALTH_NAMES = {
    "healthy": HealthState.HEALTHY,
    "degraded": HealthState.DEGRADED,
    "draining": HealthState.DRAINING,
    "unhealthy": HealthState.UNHEALTHY,
}


class HealthStatusMessage(Struct, kw_only=True, omit_defaults=True):
    """
    C{{"state": 1}} (the wire contract) or the crate's C{{"state": {"status": "healthy"}}}.

    @ivar state: a L{HealthState} number, or the crate's C{{"status": name}}
        form; C{None} if absent (see L{state_code}).
    @ivar agent_id: the sending agent's id, C{None} if absent.
    @ivar message: a human-readable detail, C{None} if absent.
    @ivar timestamp_ms: when it was sent, milliseconds since the Unix epoch,
        C{None} if absent.
    """

    state: int | dict[str, Any] | None = None
    agent_id: str | None = None
    message: str | None = None
    timestamp_ms: I64 | None = None

    @property
    def state_code(self) -> int | None:
        """The L{HealthState} number of either form, C{None} if it cannot be read."""
        state = self.state
        if isinstance(state, dict):
            name = state.get("status")
            return _HEALTH_NAMES.get(name) if isinstance(name, str) else None
        return state


# --------------------------------------------------------------------------
# Codec

_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_T = TypeVar("_T")
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(shape: Any) -> msgspec.json.Decoder[Any]:
    decoder = _decoders.get(shape)
    if decoder is None:
        decoder = _decoders[shape] = msgspec.json.Decoder(shape, dec_hook=_dec_hook)
    return decoder


def encode(message: object) -> bytes:
    """JSON of any message of this module."""
    try:
        return _encoder.encode(message)
    except (TypeError, ValueError, OverflowError, NotImplementedError) as e:
        raise SerializationError(str(e)) from None


# What a decoder may raise on bad input.  Besides its own errors, some
# msgspec releases let invalid UTF-8 out as UnicodeDecodeError and very
# deep nesting as RecursionError; both are the peer's fault, not ours.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


def decode(payload: bytes, shape: type[_T]) -> _T:
    """
    Parse C{payload} as C{shape}, validating every field's type.

    @raise InvalidMessage: for malformed JSON or a field of the wrong type.
    """
    try:
        result: _T = _decoder(shape).decode(payload)
        return result
    except _DECODE_ERRORS as e:
        raise InvalidMessage(_error_text(e, payload)) from None


def _error_text(error: Exception, payload: bytes) -> str:
    """
    Describe a decoding failure by our own rules where they apply, so the
    text does not change with the JSON library's wording: nesting, invalid
    UTF-8 and an empty or truncated document are recognised here; only the
    schema errors (a field's type, a missing field) keep msgspec's text,
    which names the field's path.
    """
    if isinstance(error, RecursionError):
        return "JSON nested too deeply"
    # Only on the error path: a second look at the bytes costs nothing on
    # the hot path.  Invalid UTF-8 is named first, wherever it is (msgspec
    # may skip an unknown key unread and report a missing field instead).
    try:
        bytes(payload).decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 at byte {bad.start} ({bad.reason})"
    text = str(error)
    if not bytes(payload).strip() or text == "Input data was truncated":
        return "EOF while parsing a value (empty or truncated JSON)"
    if _SUBPATH in text:
        # "<error>\0<.inner.path> - at `$.outer`" -> "<error> - at `$.outer.inner.path`"
        text, _, rest = text.partition(_SUBPATH)
        inner, _, outer = rest.partition(" - at `$")
        return f"{text} - at `${outer.rstrip('`')}{inner}`"
    return text


class _VersionOnly(Struct):
    protocol_version: Any = None


def _required(cls: type[Struct], **nested: Any) -> Any:
    """A decoding shape of C{cls} in which every field is required."""
    return msgspec.defstruct(
        f"_Required{cls.__name__}",
        [(f.name, nested.get(f.name, f.type)) for f in msgspec.structs.fields(cls)],
        kw_only=True,
    )


# The reference parser requires every field of capabilities, features and
# limits (SPEC section 6); the Structs' defaults are for building messages.
_RequiredCapabilities = _required(
    AgentCapabilities,
    features=_required(AgentFeatures),
    limits=_required(AgentLimits),
)
_StrictRegistrationRequest = msgspec.defstruct(
    "_StrictRegistrationRequest",
    [
        ("protocol_version", int),
        ("agent_id", str),
        ("capabilities", _RequiredCapabilities),
        ("auth_token", str | None, None),
        ("metadata", Any, None),
    ],
    kw_only=True,
)


def decode_registration_request(payload: bytes) -> RegistrationRequest:
    """
    Parse a RegistrationRequest.  A request from another protocol version
    is reported as a version mismatch even when its shape differs from ours,
    so that an old agent learns the real reason.
    """
    try:
        _decoder(_StrictRegistrationRequest).decode(payload)
        return _decoder(RegistrationRequest).decode(payload)  # type: ignore[no-any-return]
    except _DECODE_ERRORS as e:
        error = InvalidMessage(_error_text(e, payload))
    try:
        version = _decoder(_VersionOnly).decode(payload).protocol_version
    except _DECODE_ERRORS:
        raise error from None
    if isinstance(version, int) and not isinstance(version, bool) and version != PROTOCOL_VERSION:
        raise VersionMismatch(PROTOCOL_VERSION, version)
    raise error


def decode_agent_response(payload: bytes) -> AgentResponse:
    """Parse an AgentResponse; C{version} and C{decision} are required."""
    # decode() spelled out with the decoder at hand: this runs per answer.
    try:
        p: _RequiredAgentResponse = _response_decoder.decode(payload)
    except _DECODE_ERRORS as e:
        raise InvalidMessage(_error_text(e, payload)) from None
    # Hand out a plain AgentResponse: the decoding shape's instances would
    # never compare equal to one (msgspec compares the exact type).  The
    # shape adds no field, so its instance becomes one in place (checked
    # once at import); otherwise a copy, keyword arguments spelled out.
    if _RETYPE:
        p.__class__ = AgentResponse  # type: ignore[assignment]
        return p
    return AgentResponse(
        version=p.version,
        decision=p.decision,
        request_headers=p.request_headers,
        response_headers=p.response_headers,
        routing_metadata=p.routing_metadata,
        audit=p.audit,
        needs_more=p.needs_more,
        request_body_mutation=p.request_body_mutation,
        response_body_mutation=p.response_body_mutation,
        websocket_decision=p.websocket_decision,
    )


_response_decoder = _decoder(_RequiredAgentResponse)


def _can_retype() -> bool:
    """Whether a decoded L{_RequiredAgentResponse} can become an L{AgentResponse} in place."""
    try:
        probe = _response_decoder.decode(b'{"version":2,"decision":"allow"}')
        probe.__class__ = AgentResponse
    except TypeError:
        return False
    return probe == AgentResponse(version=2) and type(probe) is AgentResponse


_RETYPE: Final = _can_retype()
_RESPONSE_FIELDS: Final = AgentResponse.__struct_fields__
# decode_agent_response copies these fields by name: a new field must be
# added there too.
if _RESPONSE_FIELDS != (
    "version",
    "decision",
    "request_headers",
    "response_headers",
    "routing_metadata",
    "audit",
    "needs_more",
    "request_body_mutation",
    "response_body_mutation",
    "websocket_decision",
):  # pragma: no cover
    raise ImportError("decode_agent_response does not copy every AgentResponse field")


def encode_event(event: _Event, correlation_id: str | None = None) -> bytes:
    """
    JSON of an event with its top-level C{correlation_id} set (SPEC section
    4).  For RequestHeaders, C{metadata.correlation_id} carries the same id,
    since reference agents route their answer by it.
    """
    if isinstance(event, RequestHeadersEvent):
        metadata = event.metadata
        cid = correlation_id if correlation_id is not None else metadata.correlation_id
        if metadata.correlation_id != cid:
            # One copy of the event with both ids set (this runs per request).
            return encode(
                msgspec.structs.replace(
                    event,
                    correlation_id=cid,
                    metadata=msgspec.structs.replace(metadata, correlation_id=cid),
                )
            )
    else:
        cid = correlation_id if correlation_id is not None else event.correlation_id
    if event.correlation_id != cid:
        event = msgspec.structs.replace(event, correlation_id=cid)
    return encode(event)


def event_correlation_id(event: _Event) -> str:
    """The id a reference agent routes its answer by for this event."""
    if isinstance(event, RequestHeadersEvent):
        return event.metadata.correlation_id or event.correlation_id
    return event.correlation_id
