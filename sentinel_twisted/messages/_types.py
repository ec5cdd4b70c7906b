# -*- test-case-name: tests.test_messages -*-
"""
The protocol's version, its integer field types and its small enums.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Annotated, Final

from msgspec import Meta

from ..errors import InvalidMessage

#: The protocol version this package speaks (C{protocol_version} of a registration).
PROTOCOL_VERSION: Final = 2

#: An integer field of the wire contract that is an unsigned 16-bit number.
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
#: An integer field of the wire contract that is an unsigned 32-bit number.
U32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]
#: The largest unsigned 64-bit number.
U64_MAX: Final = 2**64 - 1
# msgspec takes no upper bound past int64 (and reads integers past u64 in
# JSON): the structs with U64 fields check theirs with check_u64.
#: An unsigned 64-bit field (every value up to U64_MAX, as a Rust u64).
U64 = Annotated[int, Meta(ge=0)]


def check_u64(struct: object, *names: str) -> None:
    """
    Raise C{ValueError} (an invalid message, when decoding) if one of the
    named U64 fields of C{struct} is past L{U64_MAX}.
    """
    for name in names:
        value = getattr(struct, name)
        if value is not None and value > U64_MAX:
            raise ValueError(f"Expected `int` <= {U64_MAX} in `{name}`")
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


class InvalidBase64(InvalidMessage, binascii.Error):
    """
    A message's base64 C{data} does not decode: an invalid message (the
    peer's fault, not that of the code that read it), and still the
    C{binascii.Error} (a C{ValueError}) it used to be.
    """


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise InvalidBase64(f"{e} - at `$.data`") from None
