# -*- test-case-name: tests.gateway.test_decisions -*-
"""
Applying agents' answers: header operations, the response a non-allow
decision stands for, and body mutations.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from http import HTTPStatus

import msgspec
from twisted.logger import Logger
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.http_headers import Headers

from .. import messages as m
from .._peertext import peer_text
from .._persistence import connection_options
from .._ratelimit import LogRateLimiter
from .config import CHALLENGE_HEADER

__all__ = [
    "HOP_BY_HOP",
    "MAX_HEAD_LINES",
    "MAX_HEAD_SIZE",
    "PROTECTED_REQUEST_HEADERS",
    "PROTECTED_RESPONSE_HEADERS",
    "Denial",
    "apply_body_mutation",
    "apply_header_ops",
    "decision_label",
    "decision_problem",
    "ignored_header",
    "denial_for",
    "drop_hop_by_hop",
    "head_size",
    "reason_phrase",
    "status_text",
    "unusable_value",
    "valid_status",
]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")

#: RFC 9110 section 7.6.1 connection-specific headers, never forwarded.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ]
)


#: Headers that frame a message or belong to one connection.  The gateway
#: sets them itself; an agent's operations on them are ignored (a
#: Content-Length of an agent's choosing would desynchronise the client).
PROTECTED_RESPONSE_HEADERS = frozenset(
    [
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
    ]
)
#: ... and on the request, C{Host} (the upstream's).
PROTECTED_REQUEST_HEADERS = PROTECTED_RESPONSE_HEADERS | {b"host"}

#: A control character a header value may not hold (RFC 9110 section 5.5:
#: a tab, spaces, visible characters): the gateway refuses a client's
#: request with one.  CR and LF are not among them: L{Headers} turns them
#: into spaces.
_VALUE_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: ... and in a redirect's URL, none at all.
_URL_CONTROL = re.compile("[\x00-\x1f\x7f]")


def unusable_value(value: str) -> str | None:
    """What is wrong with an agent's header value (a control character), or C{None}."""
    found = _VALUE_CONTROL.search(value)
    if found is None:
        return None
    return f"its value holds the control character {found.group()!r}"


def _warn(limiter: LogRateLimiter | None, kind: str, text: str, **fields: object) -> None:
    if limiter is None:
        log.warn(text, **fields)
    else:
        limiter.warn(log, kind, text, **fields)


def ignored_header(
    name: str, agent_id: str, protected: frozenset[bytes], limiter: LogRateLimiter | None = None
) -> bool:
    """
    Whether an agent's header C{name} is C{protected}: then it is ignored,
    and said so (through C{limiter}, the gateway's, when given).
    """
    if name.strip().lower().encode("latin-1", "replace") not in protected:
        return False
    _warn(
        limiter,
        "protected_header",
        "Agent {agent_id} tried to change the {name!r} header; ignored "
        "(the gateway frames messages itself)",
        agent_id=peer_text(agent_id),
        name=peer_text(name),
    )
    return True


def drop_hop_by_hop(source: Headers, also: Iterable[bytes] = ()) -> Headers:
    """
    A copy of C{source} without hop-by-hop headers, without the headers the
    C{Connection} header names, and without the lower-case names in C{also}.
    """
    skip: frozenset[bytes] | set[bytes] = _skip_set(also)
    raw_source = source._rawHeaders
    # Header names are kept in their canonical case: this is
    # getRawHeaders(b"connection") without encoding the name each time.
    connection = raw_source.get(b"Connection")
    if connection:
        named = set(skip)
        named.update(connection_options(connection))
        skip = named
    result = Headers()
    raw = result._rawHeaders  # a plain dict; copying by hand skips re-validation
    for name, values in raw_source.items():
        if name.lower() not in skip:
            raw[name] = list(values)
    return result


# The names drop_hop_by_hop leaves out, by the names asked for besides the
# hop-by-hop ones: the callers ask for a few fixed tuples.
_skip_sets: dict[object, frozenset[bytes]] = {(): HOP_BY_HOP}
_MAX_SKIP_SETS = 64


def _skip_set(also: Iterable[bytes]) -> frozenset[bytes]:
    if not isinstance(also, (tuple, frozenset)):
        return HOP_BY_HOP | frozenset(also)
    found = _skip_sets.get(also)
    if found is None:
        found = HOP_BY_HOP | frozenset(also)
        if len(_skip_sets) < _MAX_SKIP_SETS:
            _skip_sets[also] = found
    return found


#: The largest head agents' header operations may make, in bytes of header
#: lines (without line ends) and in lines: the limits of a client's request
#: head (twisted.web's, kept by the gateway's channel), so that an answer
#: cannot make the gateway send heads larger than any it takes in.
MAX_HEAD_SIZE = HTTPChannel.totalHeadersSize
MAX_HEAD_LINES = HTTPChannel.maxHeaders


def head_size(headers: Headers) -> tuple[int, int]:
    """The bytes of C{headers}' lines as sent, without line ends, and how many lines."""
    size = lines = 0
    for name, values in headers.getAllRawHeaders():
        lines += len(values)
        size += (len(name) + 2) * len(values) + sum(map(len, values))
    return size, lines


def apply_header_ops(
    headers: Headers,
    ops: Sequence[m.HeaderOp],
    agent_id: str = "",
    protected: frozenset[bytes] = PROTECTED_RESPONSE_HEADERS,
    limiter: LogRateLimiter | None = None,
) -> None:
    """
    Apply set/add/remove operations in order.  An operation with an invalid
    header name, or a value with a control character other than a tab, is
    skipped with a warning (as the gateway refuses a client's request with
    one); CR/LF in values is neutralised by L{Headers}.  Operations on
    C{protected} headers (framing and hop-by-hop ones) are ignored, with a
    warning.  An agent triggers these
    warnings at will: C{limiter} (the gateway's) keeps them to a few.
    """
    for op in ops:
        if ignored_header(op.name, agent_id, protected, limiter):
            continue
        try:
            if isinstance(op, (m.SetHeader, m.AddHeader)):
                problem = unusable_value(op.value)
                if problem is not None:
                    raise ValueError(problem)
            if isinstance(op, m.SetHeader):
                headers.setRawHeaders(op.name, [op.value])
            elif isinstance(op, m.AddHeader):
                headers.addRawHeader(op.name, op.value)
            elif isinstance(op, m.RemoveHeader):
                headers.removeHeader(op.name)
        except (ValueError, TypeError, UnicodeError) as e:
            _warn(
                limiter,
                "unusable_header_operation",
                "Agent {agent_id} sent an unusable header operation {op}: {error}",
                agent_id=peer_text(agent_id),
                op=peer_text(repr(op)),
                error=peer_text(str(e)),
            )


def valid_status(decision: m.Decision) -> bool:
    """Whether a block's status is 4xx/5xx and a redirect's 3xx."""
    if isinstance(decision, m.Block):
        return 400 <= decision.status <= 599
    if isinstance(decision, m.Redirect):
        return 300 <= decision.status <= 399
    return True


def decision_problem(decision: m.Decision) -> str | None:
    """
    Why a denial cannot go out as the agent gave it (C{status 200, outside
    400-599}; a redirect's URL with a control character, which would make
    its C{Location} something else), or C{None}.
    """
    if not valid_status(decision):
        allowed = "400-599" if isinstance(decision, m.Block) else "300-399"
        return f"status {getattr(decision, 'status', 0)}, outside {allowed}"
    if isinstance(decision, m.Redirect):
        found = _URL_CONTROL.search(decision.url)
        if found is not None:
            return f"a URL holding the control character {found.group()!r}"
    return None


def status_text(code: int) -> str:
    """C{"403 Forbidden"}: a status code with its reason phrase, when it has one."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def reason_phrase(code: int) -> bytes | None:
    """
    C{b"Too Many Requests"}: the reason phrase of a status code, twisted.web's
    own where it has one, or C{None} for a code without one.  twisted.web
    knows no phrase for several codes agents answer with (429, 431, 451),
    and would send C{Unknown Status}.
    """
    phrase = RESPONSES.get(code)
    if phrase is not None:
        return phrase
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return None


class Denial:
    """
    The response that stands for a non-allow decision.

    @ivar label: the decision's name for metrics and logs (C{block},
        C{redirect}, C{challenge}).
    @ivar code: the response's status code.
    @ivar headers: the response's headers, as C{(name, value)} pairs.
    @ivar body: the response's body.
    """

    __slots__ = ("body", "code", "headers", "label")

    def __init__(self, label: str, code: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.label = label
        self.code = code
        self.headers = headers
        self.body = body


def decision_label(decision: m.Decision) -> str:
    """C{allow}, C{block}, C{redirect} or C{challenge}: the name metrics and logs use."""
    if isinstance(decision, m.Block):
        return "block"
    if isinstance(decision, m.Redirect):
        return "redirect"
    if isinstance(decision, m.Challenge):
        return "challenge"
    return "allow"


def denial_for(decision: m.Decision, challenge_status: int = 403) -> Denial:
    """
    Block: its status, body and headers.  Redirect: its status and
    C{Location}.  Challenge: C{challenge_status} with the challenge type in
    the C{X-Sentinel-Challenge} header and a small JSON body with the type
    and parameters.
    """
    if isinstance(decision, m.Block):
        headers = list((decision.headers or {}).items())
        if decision.body is None:
            body = (status_text(decision.status) + "\n").encode()
        else:
            body = decision.body.encode("utf-8")
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        return Denial("block", decision.status, headers, body)
    if isinstance(decision, m.Redirect):
        return Denial("redirect", decision.status, [("Location", decision.url)], b"")
    if isinstance(decision, m.Challenge):
        body = msgspec.json.encode(
            {"challenge": decision.challenge_type, "params": decision.params}
        )
        return Denial(
            "challenge",
            challenge_status,
            [
                (CHALLENGE_HEADER, decision.challenge_type),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    raise ValueError(f"{decision!r} does not deny anything")


def apply_body_mutation(chunk: bytes, mutation: m.BodyMutation | None) -> bytes:
    """
    The bytes to forward for one inspected chunk: the replacement (base64
    C{data}), nothing (C{""}: drop) or the chunk itself (C{null}: pass).

    @raise ValueError: when C{data} is not valid base64.
    """
    if mutation is None or mutation.data is None:
        return chunk
    if mutation.data == "":
        return b""
    try:
        return base64.b64decode(mutation.data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"body mutation data is not base64: {e}") from None
