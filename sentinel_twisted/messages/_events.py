# -*- test-case-name: tests.test_messages -*-
"""
The events the proxy sends to agents, each with its top-level
C{correlation_id}.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal

from msgspec import UNSET, Struct, UnsetType, field

from ..wire import MessageType
from ._types import U16, U32, U64, U64_MAX, EventType, _b64, check_u64


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


class RequestBodyChunkEvent(_Event, kw_only=True):
    """
    A piece of the request body, base64 in C{data} (use L{body} for the
    bytes); C{is_last} on the final piece, C{bytes_received} counting so far.

    @ivar is_last: this is the body's last chunk.
    @ivar total_size: the whole body's size in bytes, C{None} if not known (no
        C{Content-Length}).
    @ivar chunk_index: the chunk's number, from 0 (0 when absent).
    @ivar bytes_received: body bytes received so far, this chunk included
        (0 when absent).
    """

    message_type = MessageType.REQUEST_BODY_CHUNK
    event_type = EventType.REQUEST_BODY_CHUNK
    #: base64 (standard alphabet, padded)
    data: str
    is_last: bool
    total_size: U64 | None = None
    # Absent means 0, as the reference's #[serde(default)] reads them.
    chunk_index: U32 = 0
    bytes_received: U64 = 0

    def __post_init__(self) -> None:
        # Compared here first: check_u64 (which names the field) runs per event otherwise.
        if (self.total_size or 0) > U64_MAX or self.bytes_received > U64_MAX:
            check_u64(self, 'total_size', 'bytes_received')

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
    @ivar chunk_index: the chunk's number, from 0 (0 when absent).
    @ivar bytes_sent: body bytes sent so far, this chunk included (0 when
        absent).
    """

    message_type = MessageType.RESPONSE_BODY_CHUNK
    event_type = EventType.RESPONSE_BODY_CHUNK
    data: str
    is_last: bool
    total_size: U64 | None = None
    # Absent means 0, as the reference's #[serde(default)] reads them.
    chunk_index: U32 = 0
    bytes_sent: U64 = 0

    def __post_init__(self) -> None:
        if (self.total_size or 0) > U64_MAX or self.bytes_sent > U64_MAX:
            check_u64(self, 'total_size', 'bytes_sent')

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

    def __post_init__(self) -> None:
        if max(self.duration_ms, self.request_body_size, self.response_body_size) > U64_MAX:
            check_u64(self, 'duration_ms', 'request_body_size', 'response_body_size')


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

    def __post_init__(self) -> None:
        if self.frame_index > U64_MAX:
            check_u64(self, 'frame_index')

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


