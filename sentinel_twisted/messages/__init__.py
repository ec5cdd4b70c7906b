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

The messages live in private modules by concern (registration, events,
answers, control messages, the codec); this package is their one public
path.
"""

from __future__ import annotations

from .._cancel import CancelReason
from ._answers import (
    ALLOW,
    MAX_ANSWER_VALUES,
    MAX_HEADER_OPS,
    AddHeader,
    AgentResponse,
    Allow,
    AuditMetadata,
    Block,
    BodyMutation,
    Challenge,
    Decision,
    HeaderOp,
    Redirect,
    RemoveHeader,
    SetHeader,
    WebSocketAllow,
    WebSocketClose,
    WebSocketDecision,
    WebSocketDrop,
)
from ._answers import _dec_hook as _dec_hook
from ._answers import _RequiredAgentResponse as _RequiredAgentResponse
from ._codec import (
    decode,
    decode_agent_response,
    decode_registration_request,
    encode,
    encode_event,
    event_correlation_id,
)
from ._control import CancelMessage, FlowControlMessage, HealthStatusMessage, PingMessage
from ._events import (
    EVENT_CLASSES,
    ConfigureEvent,
    Event,
    GuardrailInspectEvent,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketFrameEvent,
)
from ._registration import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    RegistrationRequest,
    RegistrationResponse,
)
from ._types import I64, PROTOCOL_VERSION, U16, U32, U64, EventType, FlowAction, HealthState

__all__ = [
    "ALLOW",
    "EVENT_CLASSES",
    "I64",
    "MAX_ANSWER_VALUES",
    "MAX_HEADER_OPS",
    "PROTOCOL_VERSION",
    "U16",
    "U32",
    "U64",
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
    "event_correlation_id",
]
