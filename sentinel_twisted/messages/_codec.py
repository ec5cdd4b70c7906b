# -*- test-case-name: tests.test_messages -*-
"""
The JSON codec of every message: encoding, decoding with the reference's
required fields, and the texts of decoding errors.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec
from msgspec import Struct

from .._values import COUNTED_ABOVE, json_values
from ..errors import InvalidMessage, SerializationError, VersionMismatch
from ._answers import (
    _SUBPATH,
    MAX_ANSWER_VALUES,
    AgentResponse,
    _answer_dec_hook,
    _dec_hook,
    _enc_hook,
    _op_count,
    _RequiredAgentResponse,
)
from ._events import RequestHeadersEvent, _Event
from ._registration import AgentCapabilities, AgentFeatures, AgentLimits, RegistrationRequest
from ._types import PROTOCOL_VERSION

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


def check_answer_values(values: int, kind: str = "AgentResponse") -> None:
    """
    Refuse an answer (or another message of the agent's, of type C{kind})
    counted (L{sentinel_twisted._values}) to hold more than
    L{MAX_ANSWER_VALUES <sentinel_twisted.messages.MAX_ANSWER_VALUES>}
    values: L{InvalidMessage}.
    """
    if values > MAX_ANSWER_VALUES:
        raise InvalidMessage(f"{kind} holds more than {MAX_ANSWER_VALUES:,} values")


def decode_agent_response(payload: bytes) -> AgentResponse:
    """
    Parse an AgentResponse; C{version} and C{decision} are required, and
    it may carry at most L{MAX_HEADER_OPS
    <sentinel_twisted.messages.MAX_HEADER_OPS>} header operations and hold
    at most L{MAX_ANSWER_VALUES <sentinel_twisted.messages.MAX_ANSWER_VALUES>}
    values (more is an L{InvalidMessage}, the values told before anything
    is decoded).
    """
    if len(payload) > COUNTED_ABOVE:
        check_answer_values(json_values(payload, MAX_ANSWER_VALUES))
    # decode() spelled out with the decoder at hand: this runs per answer.
    try:
        p: _RequiredAgentResponse = _response_decoder.decode(payload)
    except _DECODE_ERRORS as e:
        _op_count.used = 0
        raise InvalidMessage(_error_text(e, payload)) from None
    except BaseException:
        _op_count.used = 0
        raise
    if p.request_headers or p.response_headers:
        _op_count.used = 0
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


# Its own decoder: only answers read here have their header operations counted.
_response_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    _RequiredAgentResponse, dec_hook=_answer_dec_hook
)


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
            event = _replace(event, correlation_id=cid, metadata=_replace(metadata, correlation_id=cid))
        elif event.correlation_id != cid:
            event = _replace(event, correlation_id=cid)
    else:
        cid = correlation_id if correlation_id is not None else event.correlation_id
        if event.correlation_id != cid:
            event = _replace(event, correlation_id=cid)
    # encode() spelled out with the encoder at hand, into a buffer kept for
    # the next event: this runs per request.
    try:
        buffer = _buffers.pop()
    except IndexError:
        buffer = bytearray()
    try:
        _encoder.encode_into(event, buffer)
        return bytes(buffer)
    except (TypeError, ValueError, OverflowError, NotImplementedError) as e:
        raise SerializationError(str(e)) from None
    finally:
        if len(buffer) <= _BUFFER_KEPT:
            _buffers.append(buffer)


_replace = msgspec.structs.replace
# The buffers encode_event encodes into.  msgspec's encode() starts each
# message in a buffer of a few bytes and grows it several times over for
# a typical RequestHeaders; a buffer kept from the last event is already
# as large.  A list, not one buffer: an encoding under way (in another
# thread) keeps its own, and the next one takes another.
_buffers: list[bytearray] = []
#: The largest buffer kept for the next event (the rare larger event gets
#: its own, which goes with it).
_BUFFER_KEPT: Final = 64 * 1024


def event_correlation_id(event: _Event) -> str:
    """The id a reference agent routes its answer by for this event."""
    if isinstance(event, RequestHeadersEvent):
        return event.metadata.correlation_id or event.correlation_id
    return event.correlation_id
