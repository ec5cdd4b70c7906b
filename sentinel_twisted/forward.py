# -*- test-case-name: tests.test_forward -*-
"""
The forward transport's handshake and payload encodings.

In forward mode the agent listens and the proxy dials it.  The proxy's
first frame is a HandshakeRequest (0x01) and the agent answers with a
HandshakeResponse (0x02); both are always JSON.  The agent picks the
payload encoding of everything after the handshake from the proxy's
C{supported_encodings}: JSON, or MessagePack in the reference's layout.

The reference's MessagePack layout (the C{fwd_*_msgpack} vectors are the
authority): an event is a map, C{correlation_id} first and then the
event's fields in declaration order; nested structs (an event's
C{metadata}, the whole AgentResponse, its C{audit}, body mutations and the
bodies of tagged variants) are positional arrays; variants are maps of one
key (C{{"block": [403, null, null]}}), unit variants their name
(C{"allow"}).  Cancel and Ping stay JSON on a MessagePack connection.

Two bugs of the reference's writer are survived here, never copied: an
event with its own C{correlation_id} field carries that key twice (the
first one is the id the proxy waits on), and a RequestHeaders whose
metadata has no C{traceparent} has 11 metadata elements instead of 12.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar

import msgspec
from msgspec import UNSET, Struct, UnsetType, field

from . import messages as m
from ._values import COUNTED_ABOVE, msgpack_values
from .errors import InvalidMessage, SerializationError
from .messages._codec import check_answer_values

__all__ = [
    "ENCODINGS",
    "JSON",
    "JSON_CODEC",
    "MSGPACK",
    "MSGPACK_CODEC",
    "HandshakeRequest",
    "HandshakeResponse",
    "PayloadCodec",
    "codec_for",
    "decode_handshake_request",
    "negotiate_encoding",
]

#: The name of the JSON payload encoding in a handshake.
JSON: Final = "json"
#: The name of the MessagePack payload encoding in a handshake.
MSGPACK: Final = "msgpack"
#: The encodings this package speaks, in its own order of preference.
ENCODINGS: Final = (MSGPACK, JSON)

_T = TypeVar("_T")


# --------------------------------------------------------------------------
# Handshake (always JSON)


class HandshakeRequest(Struct, kw_only=True):
    """
    The proxy's first frame on a forward connection (0x01).  There is no
    agent id and no token in it: the proxy chose whom to dial.

    @ivar supported_versions: protocol versions the proxy speaks.
    @ivar config: configuration the proxy pushes at connect time (JSON).
    @ivar supported_encodings: payload encodings in the proxy's order of
        preference; absent or empty means JSON only.
    @ivar proxy_id: the proxy's id.
    @ivar proxy_version: the proxy's software version.
    """

    supported_versions: list[m.U32]
    proxy_id: str
    proxy_version: str
    config: Any = None
    supported_encodings: list[str] | UnsetType = UNSET


class HandshakeResponse(Struct, kw_only=True):
    """
    The agent's answer (0x02): its capabilities, whether it accepts, and
    the negotiated C{encoding} of every later event and answer.

    @ivar protocol_version: the protocol version the agent chose.
    @ivar capabilities: what the agent wants and can do.
    @ivar success: whether the agent accepts the connection.
    @ivar error: why it refuses, C{None} when it accepts.
    @ivar encoding: the payload encoding of every later event and answer
        (C{json} or C{msgpack}).
    """

    protocol_version: int
    capabilities: m.AgentCapabilities
    success: bool
    error: str | None = None
    encoding: str = JSON


def decode_handshake_request(payload: bytes) -> HandshakeRequest:
    """
    Parse a HandshakeRequest.

    @raise InvalidMessage: for malformed JSON or a missing or mistyped field.
    """
    return m.decode(payload, HandshakeRequest)


def negotiate_encoding(offered: list[str] | UnsetType, known: tuple[str, ...] = ENCODINGS) -> str:
    """
    The first entry of the proxy's C{offered} list that is in C{known}, as
    the reference agent chooses; JSON when there is none.
    """
    if isinstance(offered, list):
        for name in offered:
            if name in known:
                return name
    return JSON


# --------------------------------------------------------------------------
# Payload codecs


class PayloadCodec(Protocol):
    """
    How one connection's events, answers and control messages are written.

    @cvar resume: a FlowControl resume, ready to send.
    """

    #: The encoding's name in the handshake.
    name: str
    #: A FlowControl pause and resume, ready to send.
    pause: bytes
    resume: bytes

    def decode_event(self, payload: bytes, cls: type[_T]) -> _T:
        """An event of class C{cls}; raises L{InvalidMessage}."""

    def encode_event(self, event: Any, correlation_id: str | None = None) -> bytes:
        """An event with its top-level C{correlation_id} set."""

    def encode_response(self, response: m.AgentResponse) -> bytes:
        """An AgentResponse; raises L{SerializationError}."""

    def decode_response(self, payload: bytes) -> m.AgentResponse:
        """An AgentResponse (C{version} and C{decision} required); raises L{InvalidMessage}."""

    def encode_control(self, message: Any) -> bytes:
        """A FlowControl or HealthStatus message."""

    def decode_control(self, payload: bytes, cls: type[_T]) -> _T:
        """A Cancel, Ping or other control message; raises L{InvalidMessage}."""

    def answer_correlation_id(self, payload: bytes) -> str | None:
        """
        The correlation id an answer that L{decode_response} refused still
        names, or C{None}: enough of a broken answer to fail the request it
        was meant for at once rather than at its timeout.
        """


class _LenientAnswer(Struct):
    """
    Enough of a broken answer, as a map, to find whom it was meant for: the
    way to its id, left undecoded (the rest is skipped, not decoded,
    however large the answer).
    """

    audit: msgspec.Raw = msgspec.Raw()


class _LenientAudit(Struct):
    """An answer's C{audit}, as a map: its C{custom}, undecoded."""

    custom: msgspec.Raw = msgspec.Raw()


class _LenientCustom(Struct):
    """An answer's C{audit.custom}: its id, undecoded."""

    correlation_id: msgspec.Raw = msgspec.Raw()


# What a lenient look into a broken answer (or, on the agent's side, a
# garbled event) may raise.
_LENIENT_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError, TypeError)


def _leading(fields: tuple[str, ...], name: str) -> type[Struct]:
    """
    The elements of a positional (MessagePack) struct up to C{name}'s,
    undecoded: those after it are skipped.
    """
    upto = fields[: fields.index(name) + 1]
    return msgspec.defstruct(
        f"_Leading_{name}", [(f, msgspec.Raw, msgspec.Raw()) for f in upto], array_like=True
    )


def _lenient_field(module: Any, raw: bytes | msgspec.Raw, shapes: tuple[type[Any], type[Any]], name: str) -> Any:
    """
    Field C{name} of C{raw}, undecoded: read as a map (the first of
    C{shapes}), or, when C{raw} is a MessagePack array (fixarray, array 16,
    array 32), in the positional layout (the second).
    """
    # (A Raw is a buffer, not bytes: its first byte is read through a view.)
    first = memoryview(raw)[:1].tobytes()
    positional = module is msgspec.msgpack and first and (0x90 <= first[0] <= 0x9F or first[0] in (0xDC, 0xDD))
    return getattr(module.decode(raw, type=shapes[1] if positional else shapes[0]), name)


def _answer_id(payload: bytes, module: Any) -> str | None:
    """
    The correlation id in C{audit.custom} of an answer that could not be
    read, found without decoding anything else of it; C{None} if there is
    none that is a string.
    """
    try:
        audit = _lenient_field(module, payload, _ANSWER_SHAPES, "audit")
        if not audit:
            return None
        custom = _lenient_field(module, audit, _AUDIT_SHAPES, "custom")
        if not custom:
            return None
        raw = module.decode(custom, type=_LenientCustom).correlation_id
        cid = module.decode(raw, type=str) if raw else None
    except _LENIENT_ERRORS:
        return None
    return cid if isinstance(cid, str) else None


def _json_answer_id(payload: bytes) -> str | None:
    return _answer_id(payload, msgspec.json)


class _JsonCodec:
    name = JSON
    pause = m.encode(m.FlowControlMessage(action=m.FlowAction.PAUSE))
    resume = m.encode(m.FlowControlMessage(action=m.FlowAction.RESUME))
    decode_event = staticmethod(m.decode)
    encode_event = staticmethod(m.encode_event)
    encode_response = staticmethod(m.encode)
    decode_response = staticmethod(m.decode_agent_response)
    encode_control = staticmethod(m.encode)
    decode_control = staticmethod(m.decode)
    answer_correlation_id = staticmethod(_json_answer_id)


# -- MessagePack -------------------------------------------------------------

_METADATA_FIELDS: Final = m.RequestMetadata.__struct_fields__


class _MetadataArray(Struct, array_like=True):
    """RequestMetadata as the reference writes it: 12 elements, or 11 without traceparent."""

    correlation_id: str
    request_id: str
    client_ip: str
    client_port: m.U16
    server_name: str | None
    protocol: str
    tls_version: str | None
    tls_cipher: str | None
    route_id: str | None
    upstream_id: str | None
    timestamp: str
    traceparent: str | None | UnsetType = UNSET


if _MetadataArray.__struct_fields__ != _METADATA_FIELDS:  # pragma: no cover
    raise ImportError("_MetadataArray must list RequestMetadata's fields in order")


def _shape(cls: type[Struct]) -> type[Struct]:
    """C{cls} as it is decoded from MessagePack: positional or named metadata, binary or base64 data."""
    fields: list[Any] = []
    for info in msgspec.structs.fields(cls):
        kind: Any = info.type
        if info.name == "metadata" and cls is m.RequestHeadersEvent:
            kind = _MetadataArray | dict[str, Any]
        elif info.name == "data" and kind is str:
            kind = Any  # text (base64) or binary; checked in decode_event
        if info.default is not msgspec.NODEFAULT:
            fields.append((info.name, kind, info.default))
        elif info.default_factory is not msgspec.NODEFAULT:
            fields.append((info.name, kind, field(default_factory=info.default_factory)))
        else:
            fields.append((info.name, kind))
    return msgspec.defstruct(f"_Msgpack{cls.__name__}", fields, kw_only=True)


_SHAPES: dict[type[Any], tuple[msgspec.msgpack.Decoder[Any], tuple[str, ...]]] = {
    cls: (msgspec.msgpack.Decoder(_shape(cls)), cls.__struct_fields__)
    for cls in m.EVENT_CLASSES.values()
}
# What a MessagePack decoder may raise on bad input.  Besides its own
# errors: invalid UTF-8, deep nesting, and (in older msgspec releases, 0.18
# among them) a TypeError for a map key that cannot be hashed, such as an
# extension value: all the peer's fault, not ours.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError, TypeError)
_CID_KEY: Final = b"\xaecorrelation_id"


def _first_correlation_id(payload: bytes) -> str | None:
    """
    The value of the map's first key when that key is C{correlation_id}:
    the id the reference proxy waits on, even when the map repeats the key
    with the event's own id.
    """
    head = payload[:1]
    if not head or not (0x80 <= head[0] <= 0x8F):
        return None
    if payload[1:16] != _CID_KEY or len(payload) < 17:
        return None
    marker = payload[16]
    if 0xA0 <= marker <= 0xBF:
        start, size = 17, marker - 0xA0
    elif marker == 0xD9 and len(payload) > 17:
        start, size = 18, payload[17]
    else:
        return None
    raw = payload[start : start + size]
    if len(raw) != size:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _metadata(value: Any) -> m.RequestMetadata:
    if isinstance(value, dict):
        # A map, as a writer without the reference's positional layout sends it.
        try:
            return msgspec.convert(value, m.RequestMetadata)
        except msgspec.ValidationError as e:
            text, _, path = str(e).partition(" - at `$")
            raise InvalidMessage(f"{text} - at `$.metadata{path}" if path else text) from None
    values = {name: getattr(value, name) for name in _METADATA_FIELDS}
    if values["traceparent"] is None:
        values["traceparent"] = UNSET
    return m.RequestMetadata(**values)


def _msgpack_error(error: Exception) -> InvalidMessage:
    if isinstance(error, RecursionError):
        return InvalidMessage("MessagePack nested too deeply")
    return InvalidMessage(str(error))


def _variant(wire: Any) -> Any:
    """The MessagePack form of a tagged variant's JSON form: struct bodies become arrays."""
    if isinstance(wire, dict):
        ((key, body),) = wire.items()
        return {key: list(body.values()) if isinstance(body, dict) else body}
    return wire


def _mutation(mutation: m.BodyMutation | None) -> Any:
    return None if mutation is None else [mutation.data, mutation.chunk_index]


# Field names of the positional forms, to read them back as maps.
_RESPONSE_FIELDS: Final = m.AgentResponse.__struct_fields__
_AUDIT_FIELDS: Final = m.AuditMetadata.__struct_fields__
# How _answer_id reads an answer and its audit, as maps and as arrays.
_ANSWER_SHAPES: Final = (_LenientAnswer, _leading(_RESPONSE_FIELDS, "audit"))
_AUDIT_SHAPES: Final = (_LenientAudit, _leading(_AUDIT_FIELDS, "custom"))
_MUTATION_FIELDS: Final = m.BodyMutation.__struct_fields__
_VARIANT_FIELDS: Final = {
    "block": ("status", "body", "headers"),
    "redirect": ("url", "status"),
    "challenge": ("challenge_type", "params"),
    "set": ("name", "value"),
    "add": ("name", "value"),
    "remove": ("name",),
    "close": ("code", "reason"),
}


def _named(value: Any, names: tuple[str, ...], what: str) -> Any:
    if not isinstance(value, list):
        return value
    if len(value) > len(names):
        raise InvalidMessage(f"{what} has {len(value)} elements, expected at most {len(names)}")
    return dict(zip(names, value, strict=False))


def _named_variant(value: Any, what: str) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        ((key, body),) = value.items()
        names = _VARIANT_FIELDS.get(key) if isinstance(key, str) else None
        if names is not None:
            return {key: _named(body, names, f"{what} {key}")}
    return value


class _MetadataOut(Struct, array_like=True):
    """RequestMetadata as we write it: always all 12 elements."""

    correlation_id: str
    request_id: str
    client_ip: str
    client_port: int
    server_name: str | None
    protocol: str
    tls_version: str | None
    tls_cipher: str | None
    route_id: str | None
    upstream_id: str | None
    timestamp: str
    traceparent: str | None


class _RequestHeadersOut(Struct):
    """A RequestHeaders event in the reference's layout, built without a dict."""

    correlation_id: str
    metadata: _MetadataOut
    method: str
    uri: str
    headers: dict[str, list[str]]


if (
    _MetadataOut.__struct_fields__ != _METADATA_FIELDS
    or _RequestHeadersOut.__struct_fields__ != m.RequestHeadersEvent.__struct_fields__
):  # pragma: no cover
    raise ImportError("_RequestHeadersOut must list RequestHeadersEvent's fields in order")


class _AuditArray(Struct, array_like=True):
    tags: list[str]
    rule_ids: list[str]
    confidence: float | None
    reason_codes: list[str]
    custom: dict[str, Any]


_NO_OPS = msgspec.Meta(max_length=0)


class _AllowArray(Struct, array_like=True):
    """The usual answer, positional: allow, no header operation, no mutation."""

    version: int
    decision: Literal["allow"]
    request_headers: Annotated[list[Any], _NO_OPS]
    response_headers: Annotated[list[Any], _NO_OPS]
    routing_metadata: dict[str, str]
    audit: _AuditArray
    needs_more: bool
    request_body_mutation: None
    response_body_mutation: None
    websocket_decision: None


if tuple(_AllowArray.__struct_fields__) != _RESPONSE_FIELDS or _AuditArray.__struct_fields__ != _AUDIT_FIELDS:  # pragma: no cover
    raise ImportError("_AllowArray and _AuditArray must list AgentResponse's and AuditMetadata's fields in order")

_allow_decoder = msgspec.msgpack.Decoder(_AllowArray)


class _MsgpackCodec:
    name = MSGPACK
    pause = msgspec.msgpack.encode(m.FlowControlMessage(action=m.FlowAction.PAUSE))
    resume = msgspec.msgpack.encode(m.FlowControlMessage(action=m.FlowAction.RESUME))

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._control: dict[Any, msgspec.msgpack.Decoder[Any]] = {}

    def decode_event(self, payload: bytes, cls: type[_T]) -> _T:
        shape = _SHAPES.get(cls)
        if shape is None:
            return self.decode_control(payload, cls)
        decoder, names = shape
        try:
            decoded = decoder.decode(payload)
        except _DECODE_ERRORS as e:
            raise _msgpack_error(e) from None
        values = {name: getattr(decoded, name) for name in names}
        if "data" in values:
            data = values["data"]
            if isinstance(data, bytes):
                values["data"] = base64.b64encode(data).decode("ascii")
            elif not isinstance(data, str):
                raise InvalidMessage(f"Expected `str | bytes`, got `{type(data).__name__}` - at `$.data`")
        if cls is m.RequestHeadersEvent:
            values["metadata"] = _metadata(values["metadata"])
        else:
            first = _first_correlation_id(payload)
            if first is not None:
                values["correlation_id"] = first
        return cls(**values)

    def encode_event(self, event: Any, correlation_id: str | None = None) -> bytes:
        cid = m.event_correlation_id(event) if correlation_id is None else correlation_id
        if event.__class__ is m.RequestHeadersEvent:
            # The first event of every request: its own shape, no dict built.
            md = event.metadata
            traceparent = md.traceparent
            return self._encode(
                _RequestHeadersOut(
                    cid,
                    _MetadataOut(
                        cid,
                        md.request_id,
                        md.client_ip,
                        md.client_port,
                        md.server_name,
                        md.protocol,
                        md.tls_version,
                        md.tls_cipher,
                        md.route_id,
                        md.upstream_id,
                        md.timestamp,
                        None if traceparent is UNSET else traceparent,
                    ),
                    event.method,
                    event.uri,
                    event.headers,
                )
            )
        out: dict[str, Any] = {"correlation_id": cid}
        for name in event.__struct_fields__:
            if name == "correlation_id":
                continue
            value = getattr(event, name)
            if value is UNSET:
                continue
            if isinstance(value, m.RequestMetadata):
                meta = [getattr(value, f) for f in _METADATA_FIELDS]
                meta[0] = cid
                meta[-1] = None if meta[-1] is UNSET else meta[-1]
                value = meta
            out[name] = value
        return self._encode(out)

    def encode_response(self, response: m.AgentResponse) -> bytes:
        audit = response.audit
        ws = response.websocket_decision
        return self._encode(
            [
                response.version,
                _variant(response.decision.to_wire()),
                [_variant(op.to_wire()) for op in response.request_headers],
                [_variant(op.to_wire()) for op in response.response_headers],
                response.routing_metadata,
                [audit.tags, audit.rule_ids, audit.confidence, audit.reason_codes, audit.custom],
                response.needs_more,
                _mutation(response.request_body_mutation),
                _mutation(response.response_body_mutation),
                None if ws is None else _variant(ws.to_wire()),
            ]
        )

    def decode_response(self, payload: bytes) -> m.AgentResponse:
        if len(payload) > COUNTED_ABOVE:
            check_answer_values(msgpack_values(payload, m.MAX_ANSWER_VALUES))
        # Most answers are a plain allow: read those with one typed decoder
        # (about six times faster); anything else takes the general path.
        try:
            allow = _allow_decoder.decode(payload)
        except _DECODE_ERRORS:
            pass
        else:
            audit = allow.audit
            return m.AgentResponse(
                version=allow.version,
                routing_metadata=allow.routing_metadata,
                audit=m.AuditMetadata(
                    tags=audit.tags,
                    rule_ids=audit.rule_ids,
                    confidence=audit.confidence,
                    reason_codes=audit.reason_codes,
                    custom=audit.custom,
                ),
                needs_more=allow.needs_more,
            )
        try:
            raw = msgspec.msgpack.decode(payload)
        except _DECODE_ERRORS as e:
            raise _msgpack_error(e) from None
        value = _named(raw, _RESPONSE_FIELDS, "AgentResponse")
        if not isinstance(value, dict):
            raise InvalidMessage(f"AgentResponse must be an array or a map, got {type(value).__name__}")
        value = dict(value)
        if "audit" in value:
            value["audit"] = _named(value["audit"], _AUDIT_FIELDS, "audit")
        for key in ("request_body_mutation", "response_body_mutation"):
            if key in value:
                value[key] = _named(value[key], _MUTATION_FIELDS, key)
        for key in ("decision", "websocket_decision"):
            if key in value:
                value[key] = _named_variant(value[key], key)
        lists = [key for key in ("request_headers", "response_headers") if isinstance(value.get(key), list)]
        # Counted before each is rewritten (decode_agent_response counts again).
        if sum(len(value[key]) for key in lists) > m.MAX_HEADER_OPS:
            raise InvalidMessage(
                f"Invalid message format: more than {m.MAX_HEADER_OPS} header operations in one answer"
            )
        for key in lists:
            value[key] = [_named_variant(op, key) for op in value[key]]
        # The JSON decoder validates the rest (types, required fields, variants).
        try:
            as_json = msgspec.json.encode(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidMessage(f"AgentResponse cannot be read: {e}") from None
        return m.decode_agent_response(as_json)

    def encode_control(self, message: Any) -> bytes:
        return self._encode(message)

    def decode_control(self, payload: bytes, cls: type[_T]) -> _T:
        if payload[:1] == b"{":
            # Cancel and Ping: the reference writes them as JSON on every connection.
            return m.decode(payload, cls)
        decoder = self._control.get(cls)
        if decoder is None:
            decoder = self._control[cls] = msgspec.msgpack.Decoder(cls)
        try:
            result: _T = decoder.decode(payload)
        except _DECODE_ERRORS as e:
            raise _msgpack_error(e) from None
        return result

    def answer_correlation_id(self, payload: bytes) -> str | None:
        if payload[:1] == b"{":
            # A JSON answer where MessagePack was agreed: still one we can route.
            return _json_answer_id(payload)
        return _answer_id(payload, msgspec.msgpack)

    def _encode(self, value: Any) -> bytes:
        try:
            return self._encoder.encode(value)
        except (TypeError, ValueError, OverflowError, NotImplementedError) as e:
            raise SerializationError(str(e)) from None


#: The JSON payload codec (reverse connections, and forward ones that negotiated JSON).
JSON_CODEC: Final[PayloadCodec] = _JsonCodec()
#: The MessagePack payload codec, in the reference's layout.
MSGPACK_CODEC: Final[PayloadCodec] = _MsgpackCodec()


def codec_for(encoding: str) -> PayloadCodec:
    """The codec of a negotiated encoding name."""
    if encoding == MSGPACK:
        return MSGPACK_CODEC
    if encoding == JSON:
        return JSON_CODEC
    raise ValueError(f"unknown payload encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
