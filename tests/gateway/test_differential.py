"""
A differential test of the gateway over real loopback sockets: what the
agents judged is exactly what the upstream receives.

Hypothesis builds odd but plausible raw HTTP/1.0 and HTTP/1.1 requests
(every target form, duplicate and folded headers, whitespace before a
colon, mixed case, empty values, control characters, very many headers,
C{Host} disagreements, every kind of C{Content-Length} and
C{Transfer-Encoding}, chunk extensions and trailers, C{Expect:
100-continue}, pipelining, HTTP/1.0 keep-alive, odd request lines and
versions, an empty line before the request line) and writes them, in
pieces, to C{twistd sentinel-reverse}'s gateway.  A recording agent (a raw
agent in-process, L{ScriptedAgent}) allows every request and keeps the
RequestHeaders (and, in one of the runs, RequestBodyChunk) events it was
shown; a recording upstream (a plain Twisted protocol) keeps the bytes it
receives and reads them with a strict RFC 9112 parser of its own: bytes
it cannot read (a control character in a value, a folded line, two
framings) are a request that upstreams read in different ways, not
necessarily as the agents did.

For every request the client sent, one of:

 - the gateway answers it C{4xx}/C{5xx}, and nothing of it reaches the
   upstream; or
 - the upstream receives one request that is exactly what the agent was
   shown: the method, the target (the RequestHeaders C{uri}), the header
   names and values (a multiset: order across names aside, the order of
   one name's values kept), the body (the body chunks the agent was shown,
   and the body the client meant).

The gateway's own changes, as documented (README "One request target",
docs/operators.md "How a request is decided"), applied to the agent's view
before comparing (L{forwarded_view}):

 - the hop-by-hop headers (RFC 9110 section 7.6.1: C{Connection},
   C{Keep-Alive}, C{Proxy-Authenticate}, C{Proxy-Authorization},
   C{Proxy-Connection}, C{TE}, C{Trailer}, C{Transfer-Encoding},
   C{Upgrade}) and those the C{Connection} header names are not forwarded,
   but the forwarding headers, which are the gateway's own;
 - C{Host} is the upstream's, C{Content-Length} and C{Transfer-Encoding}
   frame the body as the gateway sends it, C{Expect} is the gateway's to
   answer: the client's are not forwarded;
 - the forwarding headers (C{X-Forwarded-For}, C{-Proto}, C{-Host}) are set
   before the agents are asked: they are in the agent's view already, as
   the upstream gets them.

And, RFC 9112 aside from the agents (docs/operators.md "Where a request
ends"): a request whose framing is invalid (C{Content-Length} not a
number, two different ones, a C{Transfer-Encoding} whose last coding is
not C{chunked}), whose head is invalid (whitespace before a colon, two
C{Host} headers or none in HTTP/1.1, a target with a fragment or
userinfo) is refused; after a request that ends its connection (C{close}
among its C{Connection} options, HTTP/1.0 without keep-alive, an invalid
framing) nothing more from that connection is forwarded.  Nothing
crashes, nothing logs an error, and every connection ends.

The requests of falsifying examples found so far (L{FOUND}) are tried
first in every run.  C{SENTINEL_GATEWAY_DIFF_EXAMPLES=5000} runs more
examples than the suite's (the same ones first: the runs are
derandomized).
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from .._proxy_support import captured_log
from .support import (
    REQUEST_BODY_CHUNK,
    REQUEST_HEADERS,
    Harness,
    ScriptedAgent,
    _OneShot,
    answer,
    listen_for,
    small_chunks,
)

#: Examples per run: the two runs (with and without body events) take a
#: few seconds.
EXAMPLES = int(os.environ.get("SENTINEL_GATEWAY_DIFF_EXAMPLES", "150"))
#: Seconds to wait for an answer, or for the gateway to let go of a connection.
WAIT = 2.0
#: Seconds a run may take, failing examples and their shrinking included.
BUDGET = 60.0 + EXAMPLES / 10
#: The supported_events numbers of RequestHeaders and RequestBodyChunk.
REQUEST_HEADERS_EVENT = 1
REQUEST_BODY_EVENT = 2

# -- what the gateway changes, as documented ------------------------------------------------

#: RFC 9110 section 7.6.1, and the gateway's HOP_BY_HOP.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
#: The client's, never forwarded as such: the upstream's Host, the
#: gateway's framing, the gateway's answer to Expect.
NOT_FORWARDED = {"host", "content-length", "expect"}
#: The gateway's own: in the agent's view already, as forwarded.
FORWARDING = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}


def forwarded_view(shown: dict[str, list[str]]) -> dict[str, list[str]]:
    """The headers the upstream should receive for the ones the agent was shown (see the module)."""
    dropped = HOP_BY_HOP | NOT_FORWARDED
    for value in shown.get("connection", []):
        dropped |= {token.strip(" \t").lower() for token in value.split(",")}
    dropped -= FORWARDING
    return {name: values for name, values in shown.items() if name not in dropped}


# -- a strict RFC 9112 reader, for the upstream -------------------------------------------------

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rb"\A(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/1\.1\Z")
_FIELD_LINE = re.compile(rb"\A(" + _TCHAR + rb"+):[ \t]*(.*?)[ \t]*\Z", re.S)
#: RFC 9110 section 5.5: field-vchar = VCHAR / obs-text, SP and HTAB inside.
_FIELD_VALUE = re.compile(rb"\A(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z")
_CHUNK_SIZE = re.compile(rb"\A([0-9A-Fa-f]+)(?:;[^\r\n]*)?\Z")


class Malformed(Exception):
    """What the gateway sent upstream is not a valid HTTP/1.1 request."""


@dataclass
class Received:
    """One request as the upstream read it."""

    method: bytes
    target: bytes
    fields: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def headers(self) -> dict[str, list[str]]:
        """Lower-case name -> values (UTF-8), in the order received."""
        result: dict[str, list[str]] = {}
        for name, value in self.fields:
            result.setdefault(name.decode("ascii").lower(), []).append(value.decode("utf-8"))
        return result


def _dechunk(data: bytes, start: int) -> tuple[bytes, int] | None:
    body = []
    position = start
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            return None
        size_line = _CHUNK_SIZE.match(data[position:end])
        if size_line is None:
            raise Malformed(f"chunk size line {data[position:end]!r}")
        size = int(size_line.group(1), 16)
        position = end + 2
        if size == 0:
            # Trailer fields, then the empty line.
            while True:
                end = data.find(b"\r\n", position)
                if end < 0:
                    return None
                line = data[position:end]
                position = end + 2
                if not line:
                    return b"".join(body), position
                if not _FIELD_LINE.match(line):
                    raise Malformed(f"trailer line {line!r}")
        if len(data) < position + size + 2:
            return None
        body.append(data[position : position + size])
        if data[position + size : position + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        position += size + 2


def read_request(data: bytes) -> tuple[Received, int] | None:
    """The first request in C{data} and its length, or C{None} if it is not all in."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if b"\n" in data.replace(b"\r\n", b""):
            raise Malformed("a bare LF")
        return None
    lines = data[:end].split(b"\r\n")
    request_line = _REQUEST_LINE.match(lines[0])
    if request_line is None:
        raise Malformed(f"request line {lines[0]!r}")
    fields = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise Malformed(f"obs-fold {line!r}")
        parsed = _FIELD_LINE.match(line)
        if parsed is None or b"\r" in line or b"\n" in line or not _FIELD_VALUE.match(parsed.group(2)):
            raise Malformed(f"field line {line!r}")
        fields.append((parsed.group(1), parsed.group(2)))
    names = [name.lower() for name, _ in fields]
    if names.count(b"host") != 1:
        raise Malformed(f"{names.count(b'host')} Host fields")
    codings = [value for name, value in fields if name.lower() == b"transfer-encoding"]
    lengths = [value for name, value in fields if name.lower() == b"content-length"]
    position = end + 4
    if codings:
        if lengths or codings != [b"chunked"]:
            raise Malformed(f"framing {codings!r} {lengths!r}")
        chunked = _dechunk(data, position)
        if chunked is None:
            return None
        body, position = chunked
    elif lengths:
        if len(lengths) != 1 or not lengths[0].isdigit():
            raise Malformed(f"Content-Length {lengths!r}")
        size = int(lengths[0])
        if len(data) < position + size:
            return None
        body = data[position : position + size]
        position += size
    else:
        body = b""
    return Received(request_line.group(1), request_line.group(2), fields, body, data[:position]), position


class UpstreamLog:
    """What the recording upstream received, over all its connections."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.malformed: list[tuple[str, bytes]] = []
        self.connections: list[RecordingUpstream] = []

    def partial(self) -> list[bytes]:
        """Bytes of requests begun and not finished, on open connections or lost ones."""
        return [bytes(c.buffer) for c in self.connections if c.buffer]


class RecordingUpstream(Protocol):
    """Reads requests strictly; answers each C{200 ok} with its number in C{X-Upstream-Seq}."""

    def __init__(self, log: UpstreamLog) -> None:
        self.log = log
        self.buffer = bytearray()
        self.broken = False
        log.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.broken:
            return
        self.buffer += data
        while self.buffer:
            try:
                read = read_request(bytes(self.buffer))
            except Malformed as e:
                self.log.malformed.append((str(e), bytes(self.buffer)))
                self.broken = True
                del self.buffer[:]
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                self.transport.loseConnection()
                return
            if read is None:
                return
            request, used = read
            del self.buffer[:used]
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream-Seq: %d\r\n\r\n" % len(self.log.requests)
            self.log.requests.append(request)
            self.transport.write(head if request.method == b"HEAD" else head + b"ok")


# -- the client ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes


class DiffClient(Protocol):
    """Writes raw bytes; reads the final responses (interim ones skipped)."""

    def __init__(self, methods: Sequence[bytes]) -> None:
        self.methods = methods
        self.buffer = b""
        self.received = b""
        self.answers: list[Answer] = []
        self.is_lost = False
        #: Closed by the test, all its requests answered.
        self.closed_by_us = False
        #: Neither all answered nor closed by the gateway in time.
        self.no_end = False
        #: What the gateway still held after the client had left.
        self.held: str | None = None
        self.changed: Callable[[], None] = lambda: None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.buffer += data
        self._read()
        self.changed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.is_lost = True
        self._read()
        self.changed()

    def _read(self) -> None:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers: dict[bytes, list[bytes]] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            rest = self.buffer[end + 4 :]
            if 100 <= status < 200:
                self.buffer = rest
                continue
            index = len(self.answers)
            method = self.methods[index] if index < len(self.methods) else b"GET"
            if method == b"HEAD" or status in (204, 304):
                body, used = b"", 0
            elif b"content-length" in headers:
                size = int(headers[b"content-length"][0])
                if len(rest) < size:
                    return
                body, used = rest[:size], size
            elif b"transfer-encoding" in headers:
                chunked = _dechunk(rest, 0)
                if chunked is None:
                    return
                body, used = chunked
            elif self.is_lost:
                body, used = rest, len(rest)
            else:
                return
            self.answers.append(Answer(status, headers, body))
            self.buffer = rest[used:]


# -- the requests ------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One request as the client wrote it, and what it means (RFC 9112)."""

    raw: bytes
    method: bytes
    #: The target the upstream must receive if the request is forwarded.
    target: bytes
    #: The body the client meant.
    body: bytes
    #: RFC 9112 leaves a server no choice but to refuse it (why).
    refuse: str | None = None
    #: RFC 9112 has the server close the connection after its response.
    closes: bool = False
    #: Lower-case name -> the values the agent must be shown, if forwarded.
    meant: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Sent:
    specs: list[Spec]
    pieces: list[bytes]

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


def _cases(name: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([name, name.lower(), name.upper(), name.swapcase()])


_CLEAN_SEGMENTS = [b"a", b"items", b"admin", b"%61", b"~u", b"a.b", b"x-y_z", b"42"]
_CLEAN_QUERIES = [b"", b"", b"?", b"?a=1&b=2", b"?q=/../x", b"?x=%2F&y=[1]{2}|"]
_ODD_SEGMENTS = [
    b"%2F", b"%2f", b"%2e", b"%2E%2e", b"..", b".", b"a..b", b";p=1", b"!$&'()*+,=:@", b"%zz",
    b"\\", b"\xc3\xa9", b"[x]", b"", b"|",
]  # fmt: skip
_ODD_QUERIES = [b'?a="b"', b"??", b"?%zz", b"?a#b", b"?\x7f"]


@st.composite
def origin_targets(draw: st.DrawFn, odd: bool = False) -> bytes:
    pieces = _CLEAN_SEGMENTS + _ODD_SEGMENTS if odd else _CLEAN_SEGMENTS
    queries = _CLEAN_QUERIES + _ODD_QUERIES if odd else _CLEAN_QUERIES
    segments = draw(st.lists(st.sampled_from(pieces), max_size=4))
    return b"/" + b"/".join(segments) + draw(st.sampled_from(queries))


_AUTHORITY_HOSTS = [b"example.com", b"Example.COM", b"127.0.0.1", b"[::1]", b"ex%61mple.com", b"xn--bcher-kva.example"]
_HOSTS = [b"example.com", b"Example.COM:8080", b"127.0.0.1:80", b"[::1]:8443", b"x%41", b"shop.example:443"]

_VALUE_PIECES = [b"a", b"admin", b" ", b"\t", b",", b";", b"=", b'"q v"', b"\xc3\xa9", b"\xe2\x9c\x93", b"/", b"*", b"%", b"1"]
_CONTROLS = [b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x1b", b"\x1f", b"\x7f"]
_EXTENSION_NAMES = [
    b"X-A", b"X-Role", b"Accept", b"Cookie", b"User-Agent", b"Accept-Language",
    b"If-None-Match", b"Authorization", b"X-Custom-Header-With-A-Long-Name", b"Dnt", b"Etag",
]  # fmt: skip
_OWS = [b"", b"", b" ", b"\t", b"  \t"]


@dataclass
class Line:
    """A field line as sent (obs-fold included), and its value as meant (C{None}: not looked at)."""

    raw: bytes
    name: str | None = None
    value: str | None = None


def _line(name: bytes, sent_name: bytes, value: bytes, before: bytes = b" ", after: bytes = b"") -> Line:
    raw = sent_name + b":" + before + value + after
    try:
        return Line(raw, name.decode().lower(), value.strip(b" \t").decode("utf-8"))
    except UnicodeDecodeError:
        return Line(raw)


@st.composite
def values(draw: st.DrawFn) -> bytes:
    return b"".join(draw(st.lists(st.sampled_from(_VALUE_PIECES), min_size=1, max_size=5))).strip(b" \t")


@st.composite
def extension_lines(draw: st.DrawFn) -> Line:
    name = draw(st.sampled_from(_EXTENSION_NAMES))
    return _line(name, draw(_cases(name)), draw(values()), draw(st.sampled_from(_OWS)), draw(st.sampled_from(_OWS)))


@st.composite
def folded_lines(draw: st.DrawFn) -> Line:
    """obs-fold: one value over several lines (RFC 9112 section 5.2: each fold is a space)."""
    name = draw(st.sampled_from(_EXTENSION_NAMES))
    parts = draw(st.lists(st.one_of(st.just(b""), values()), min_size=2, max_size=3))
    raw = draw(_cases(name)) + b":" + draw(st.sampled_from(_OWS)) + parts[0]
    for part in parts[1:]:
        raw += b"\r\n" + draw(st.sampled_from([b" ", b"\t", b"  "])) + part
    return Line(raw, name.decode().lower(), b" ".join(parts).strip(b" \t").decode("utf-8"))


@dataclass
class Framing:
    lines: list[bytes]
    encoded: bytes
    #: The body the client meant.
    body: bytes
    refuse: str | None = None
    closes: bool = False


_EXTENSIONS = [b"", b"", b";a", b";a=b", b';n="v w"', b"; a=b"]


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """C{body} in chunks: sizes in either case or with leading zeros, extensions, trailers."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    out = b""
    for piece in pieces:
        size = draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % len(piece)
        out += size + draw(st.sampled_from(_EXTENSIONS)) + b"\r\n" + piece + b"\r\n"
    out += draw(st.sampled_from([b"0", b"000"])) + draw(st.sampled_from(_EXTENSIONS)) + b"\r\n"
    out += draw(st.sampled_from([b"", b"", b"X-Trailer: v\r\n", b"X-T: 1\r\nX-U: 2\r\n"]))
    return out + b"\r\n"


_TE = b"Transfer-Encoding"
_PLAIN_FRAMINGS = ["none", "length", "chunked"]
_ODD_FRAMINGS = [
    "length0", "length_forms", "length_twice", "length_list", "length_differs", "length_signed",
    "length_hex", "chunked_and_length", "coding_not_last", "identity_and_length", "identity_and_length", "chunked_twice",
    "identity_then_chunked", "folded_chunked", "chunked_cases",
]  # fmt: skip


@st.composite
def framings(draw: st.DrawFn, kind: str, version: bytes) -> Framing:
    body = draw(st.binary(max_size=100))
    size = len(body)
    if kind == "none":
        return Framing([], b"", b"")
    if kind == "length0":
        return Framing([b"Content-Length: 0"], b"", b"")
    if kind == "length":
        return Framing([draw(_cases(b"Content-Length")) + b": %d" % size], body, body)
    if kind == "length_forms":
        form = draw(st.sampled_from([b"000%d", b" %d ", b"\t%d", b"%d\t"]))
        return Framing([b"Content-Length:" + form % size], body, body)
    if kind == "length_twice":
        return Framing([b"Content-Length: %d" % size] * 2, body, body)
    if kind == "length_list":
        return Framing([b"Content-Length: %d, %d" % (size, size)], body, body)
    if kind == "length_differs":
        lines = [b"Content-Length: %d" % size, b"Content-Length: %d" % (size + 1)]
        return Framing(lines, body, body, "two Content-Lengths", True)
    if kind == "length_signed":
        return Framing([b"Content-Length: +%d" % size], body, body, "a Content-Length with a sign", True)
    if kind == "length_hex":
        return Framing([b"Content-Length: 0x%x" % size], body, body, "a Content-Length in hex", True)
    encoded = draw(chunked(body))
    # A Transfer-Encoding in HTTP/1.0 is faulty framing: the connection closes.
    closes = version == b"HTTP/1.0"
    if kind == "chunked":
        return Framing([_TE + b": chunked"], encoded, body, closes=closes)
    if kind == "chunked_cases":
        coding = draw(st.sampled_from([b"Chunked", b"CHUNKED", b" chunked ", b"chunked\t"]))
        return Framing([draw(_cases(_TE)) + b":" + coding], encoded, body, closes=closes)
    if kind == "folded_chunked":
        return Framing([_TE + b":\r\n chunked"], encoded, body, closes=closes)
    if kind == "chunked_and_length":
        # The coding overrides the length; the connection closes after.
        length = draw(st.sampled_from([size, len(encoded), 0, 5]))
        return Framing([_TE + b": chunked", b"Content-Length: %d" % length], encoded, body, closes=True)
    if kind == "coding_not_last":
        coding = draw(st.sampled_from([b"chunked, identity", b"gzip", b"chunked, gzip", b"gzip, chunked"]))
        return Framing([_TE + b": " + coding], encoded, body, "chunked is not the last coding", True)
    if kind == "identity_and_length":
        # RFC 9112 section 6.3: a Transfer-Encoding whose last coding is not
        # chunked leaves the length unknown, whatever the Content-Length.
        lines = [_TE + b": identity", b"Content-Length: %d" % size]
        return Framing(lines, body, body, "chunked is not the last coding", True)
    if kind == "chunked_twice":
        return Framing([_TE + b": chunked", _TE + b": chunked"], encoded, body, "chunked applied twice", True)
    assert kind == "identity_then_chunked"
    # An unknown coding before chunked (a server SHOULD answer 501).
    return Framing([_TE + b": identity", _TE + b": chunked"], encoded, body, closes=closes)


_FORWARDING_LINES = [
    b"X-Forwarded-For: 10.0.0.1",
    b"X-Forwarded-For: 10.0.0.1, 10.0.0.2",
    b"X-Forwarded-Host: evil.example",
    b"X-Forwarded-Proto: https",
    b"Forwarded: for=192.0.2.1;host=evil.example",
    b"X_Forwarded_Host: evil.example",
    b"X_Internal_User: admin",
]
_HOP_BY_HOP_LINES = [
    b"Keep-Alive: timeout=5",
    b"TE: trailers",
    b"Proxy-Connection: keep-alive",
    b"Upgrade: websocket",
    b"Trailer: X-Trailer",
    b"Proxy-Authorization: Basic eDp5",
]
_CONNECTION_TOKENS = [b"keep-alive", b"Keep-Alive", b"X-A", b"upgrade", b"X-Forwarded-For", b"TE", b"x-role", b"Cookie"]
_CLOSING = [
    [b"close"], [b"Close"], [b"keep-alive, close"], [b"close, X-A"], [b"X-A,close"], [b"X-A", b"close"],
    [b"TE", b"close, X-A"], [b"close,TE"],
]  # fmt: skip

#: What may be odd about a request; each request has a few of these (the
#: likelier twice).
ODDITIES = [
    "control", "connection_close", "absolute",
    "absolute", "absolute_userinfo", "absolute_fragment", "asterisk", "authority", "odd_path",
    "no_host", "two_hosts", "empty_host", "invalid_host", "odd_host",
    "lowercase_method", "head", "odd_method", "connect", "options",
    "http10", "http10_keepalive",
    "folded", "control", "not_utf8", "empty_values", "many_headers", "too_many_headers", "bad_line",
    "bare_line_end", "odd_request_line", "leading_empty_line",
    "forwarding", "hop_by_hop", "connection_names", "connection_close", "expect",
]  # fmt: skip


def _tokens(values: list[bytes]) -> set[bytes]:
    return {token.strip(b" \t").lower() for value in values for token in value.split(b",")}


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    odd = set(draw(st.lists(st.sampled_from(ODDITIES), max_size=3, unique=True)))
    refusals: list[str] = []
    version = b"HTTP/1.0" if odd & {"http10", "http10_keepalive"} else b"HTTP/1.1"
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
    if "lowercase_method" in odd:
        method = method.lower()
    if "head" in odd:
        method = b"HEAD"
    if "odd_method" in odd:
        method = draw(st.sampled_from([b"PROPFIND", b"M-SEARCH", b"TRACE", b"X!#$%&'*+-.^_`|~1"]))
    if "options" in odd:
        method = b"OPTIONS"
    if "connect" in odd:
        method = b"CONNECT"
        refusals.append("CONNECT")
    # The target: one form (the first of the forms drawn, in this order).
    target = draw(origin_targets("odd_path" in odd))
    forwarded = target
    authority = None
    if "authority" in odd:
        target = b"example.com:443"
        refusals.append("authority-form is for CONNECT")
    elif "asterisk" in odd:
        target = forwarded = b"*"
        if method != b"OPTIONS":
            refusals.append("* is for OPTIONS")
    elif odd & {"absolute", "absolute_userinfo", "absolute_fragment"}:
        scheme = draw(st.sampled_from([b"http", b"HTTP", b"https", b"Http"]))
        host = draw(st.sampled_from(_AUTHORITY_HOSTS))
        authority = host + draw(st.sampled_from([b"", b"", b":80", b":443", b":8080", b":", b":0080"]))
        path = draw(st.sampled_from([b"", b"", target, b"?q=1", b"?"]))
        forwarded = path if path.startswith(b"/") else b"/" + path
        if method == b"OPTIONS" and not path:
            # The server itself: the asterisk-form (RFC 9112 section 3.2.4).
            forwarded = b"*"
        userinfo = b""
        if "absolute_userinfo" in odd:
            userinfo = draw(st.sampled_from([b"user@", b"user:pw@", b"%75ser@"]))
            refusals.append("userinfo in an http(s) URI")
        fragment = b""
        if "absolute_fragment" in odd:
            fragment = draw(st.sampled_from([b"#", b"#frag", b"#/admin"]))
        target = scheme + b"://" + userinfo + authority + path + fragment
    if b"#" in target:
        refusals.append("a fragment")
    lines: list[Line] = []
    # Host.
    if authority is not None:
        host = draw(st.sampled_from([authority, authority.upper(), authority.split(b":")[0], b"other.example", None]))
    else:
        host = draw(st.sampled_from(_HOSTS)) if "odd_host" in odd else b"example.com"
    if "no_host" in odd:
        host = None
    elif "invalid_host" in odd:
        host = draw(st.sampled_from([b"a b", b"a@b", b"a/b"]))
        refusals.append("an invalid Host")
    elif "empty_host" in odd:
        host = b""
    if host is not None:
        lines.append(Line(draw(_cases(b"Host")) + b":" + draw(st.sampled_from([b" ", b"", b" \t"])) + host))
        if "two_hosts" in odd:
            lines.append(Line(b"Host: " + draw(st.sampled_from([host, b"other.example"]))))
            refusals.append("two Host fields")
    elif version == b"HTTP/1.1":
        # Whatever the target's form (RFC 9112 section 3.2).
        refusals.append("no Host in HTTP/1.1")
    # Fields.
    lines += draw(st.lists(extension_lines(), max_size=4))
    if "folded" in odd:
        lines.append(draw(folded_lines()))
    if "control" in odd:
        name = draw(st.sampled_from(_EXTENSION_NAMES))
        value = draw(values())
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.sampled_from(_CONTROLS)) + value[at:]
        lines.append(_line(name, name, value))
    if "not_utf8" in odd:
        lines.append(Line(b"X-Name: caf\xe9"))
    if "empty_values" in odd:
        lines += [_line(b"X-Empty", b"X-Empty", b"", b""), _line(b"X-Empty", b"x-empty", b"", b"  \t")]
    if "many_headers" in odd:
        count = draw(st.sampled_from([40, 300, 480]))
        lines += [_line(b"X-Many-%d" % i, b"X-Many-%d" % i, b"%d" % i) for i in range(count)]
    if "too_many_headers" in odd:
        lines += [Line(b"X-Lot: %d" % i) for i in range(520)]
        refusals.append("over 500 fields")
    if "bad_line" in odd:
        # Whitespace before a colon, no colon, no name, a NUL.
        bad = [b"X-A : v", b"X-A\t: v", b"Host : evil.example", b"X-No-Colon", b": v", b"X-A: a\x00b"]
        lines.append(Line(draw(st.sampled_from(bad))))
        refusals.append("an invalid field line")
    if "forwarding" in odd:
        lines += [Line(raw) for raw in draw(st.lists(st.sampled_from(_FORWARDING_LINES), min_size=1, max_size=3))]
    if "hop_by_hop" in odd:
        lines += [Line(raw) for raw in draw(st.lists(st.sampled_from(_HOP_BY_HOP_LINES), min_size=1, max_size=3))]
    connection: list[bytes] = []
    if "connection_names" in odd:
        tokens = draw(st.lists(st.sampled_from(_CONNECTION_TOKENS), min_size=1, max_size=3))
        connection.append(draw(st.sampled_from([b",", b", ", b" , "])).join(tokens))
    if "http10_keepalive" in odd:
        connection.append(draw(st.sampled_from([b"keep-alive", b"Keep-Alive"])))
    if "connection_close" in odd:
        connection += draw(st.sampled_from(_CLOSING))
    lines += [Line(b"Connection: " + value) for value in connection]
    if "expect" in odd:
        lines.append(Line(b"Expect: " + draw(st.sampled_from([b"100-continue", b"100-Continue", b"something"]))))
    # The body.
    kind = draw(st.sampled_from(_PLAIN_FRAMINGS * 5 + _ODD_FRAMINGS))
    framing = draw(framings(kind, version))
    lines += [Line(raw) for raw in framing.lines]
    if framing.refuse:
        refusals.append(framing.refuse)
    lines = draw(st.permutations(lines))
    request_line = method + b" " + target + b" " + version
    if "odd_request_line" in odd:
        # Servers may take the odd spacing or the newer minor version, or
        # not; a version that is no HTTP-version, never (RFC 9112 section 2.3).
        odd_line = draw(
            st.sampled_from(["double", "tab", "trailing", "lower", "newer", "two_digits", "major", "none"])
        )
        if odd_line == "double":
            request_line = method + b"  " + target + b" " + version
        elif odd_line == "tab":
            request_line = method + b"\t" + target + b" " + version
        elif odd_line == "trailing":
            request_line += b" "
        elif odd_line == "lower":
            request_line = method + b" " + target + b" " + version.lower()
            refusals.append("the protocol name is HTTP in capitals")
        elif odd_line == "two_digits":
            request_line = method + b" " + target + b" HTTP/1.10"
            refusals.append("a minor version of two digits")
        elif odd_line == "major":
            request_line = method + b" " + target + b" HTTP/2.0"
        elif odd_line == "none":
            # HTTP/0.9's request line, with a head after it.
            request_line = method + b" " + target
            refusals.append("no HTTP version")
        else:
            request_line = method + b" " + target + b" HTTP/1.2"
    head = request_line + b"\r\n" + b"".join(line.raw + b"\r\n" for line in lines)
    if "leading_empty_line" in odd:
        # RFC 9112 section 2.2: a server SHOULD ignore one before the request line.
        head = b"\r\n" + head
    if "bare_line_end" in odd:
        # A line ended by a bare LF (which a server may take as the end of
        # the line) or a bare CR (which it must not).
        # (Not the last line's: its CRLF and the empty line's would be one
        # line end to a server that takes no bare LF, the head never over.)
        ends = [found.start() for found in re.finditer(b"\r\n", head)][:-1]
        if ends:
            at = draw(st.sampled_from(ends))
            head = head[:at] + draw(st.sampled_from([b"\n", b"\r"])) + head[at + 2 :]
    meant: dict[str, list[str]] = {}
    for line in lines:
        if line.name is not None and line.value is not None:
            meant.setdefault(line.name, []).append(line.value)
    tokens = _tokens(connection)
    closes = (
        framing.closes
        or b"close" in tokens
        # What follows a CONNECT is a tunnel's, never read as requests.
        or method == b"CONNECT"
        or (version == b"HTTP/1.0" and b"keep-alive" not in tokens)
    )
    refuse = ", ".join(refusals) or None
    return Spec(head + b"\r\n" + framing.encoded, method, forwarded, framing.body, refuse, closes, meant)


@st.composite
def sendings(draw: st.DrawFn) -> Sent:
    requests = draw(st.lists(specs(), min_size=1, max_size=3))
    data = b"".join(spec.raw for spec in requests)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
    return Sent(requests, pieces)


def _sent(*specs: Spec) -> Sent:
    return Sent(list(specs), [b"".join(spec.raw for spec in specs)])


_BYTES = b"\x11V\x03\x8c\xe8yUk\x0e\xbc\x7f"

#: Requests of falsifying examples the property found, always tried first
#: (test_target and test_hardening have a test of each fix of their own).
FOUND = [
    # A control character in a value: forwarded as it was.
    _sent(Spec(b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: \x01a\r\n\r\n", b"GET", b"/", b"", meant={"x-a": ["\x01a"]})),
    # close among other options: the request pipelined behind it was forwarded.
    _sent(
        Spec(b"GET /one HTTP/1.1\r\nHost: example.com\r\nConnection: close, X-A\r\n\r\n", b"GET", b"/one", b"", closes=True),
        Spec(b"GET /two HTTP/1.1\r\nHost: example.com\r\n\r\n", b"GET", b"/two", b""),
    ),
    # Transfer-Encoding: identity, taken as framed by the Content-Length.
    _sent(
        Spec(
            b"PUT /a.b? HTTP/1.1\r\nhost: \texample.com\r\nTransfer-Encoding: identity\r\nContent-Length: 11\r\n\r\n" + _BYTES,
            b"PUT",
            b"/a.b?",
            _BYTES,
            refuse="chunked is not the last coding",
            closes=True,
        ),
        Spec(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", b"GET", b"/", b""),
    ),
    # An HTTP/1.1 request in absolute-form without Host: forwarded, its
    # authority standing for the Host.
    _sent(Spec(b"GET http://example.com/a HTTP/1.1\r\n\r\n", b"GET", b"/a", b"", refuse="no Host in HTTP/1.1")),
    # OPTIONS for the server in absolute-form: forwarded as "OPTIONS /".
    _sent(Spec(b"OPTIONS http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", b"OPTIONS", b"*", b"")),
]


# -- the test ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One example's exchange: the client's side, what the agent was shown, what the upstream received."""

    client: DiffClient
    shown: list[tuple[int, dict[str, Any]]]
    #: The number of the upstream's first request of the example.
    first: int
    received: list[Received]
    malformed: list[tuple[str, bytes]]
    partial: list[bytes]


class DifferentialTests(TestCase):
    """The property of the module, for an agent shown the headers only and one shown the body too."""

    timeout = BUDGET + 60

    async def _start(self, events: tuple[int, ...], path: str) -> tuple[Harness, ScriptedAgent, UpstreamLog]:
        log = UpstreamLog()
        port = await listen_for(self, Factory.forProtocol(lambda: RecordingUpstream(log)))
        self.upstream_host = f"127.0.0.1:{port.getHost().port}"
        self.upstream_path = path.encode()
        # Bodies in chunks of 7 bytes, several to a body.
        small_chunks(self)
        h = await Harness(self).start("--upstream", f"http://{self.upstream_host}{path}")
        # It asks for every chunk of a body (needs_more), to be shown all of it.
        agent = await h.agent(
            "recorder", events=events, chunk_size=7, decide=lambda a, t, b: answer(needs_more=True)
        )
        return h, agent, log

    async def _send(self, h: Harness, sent: Sent) -> DiffClient:
        """Write C{sent} in its pieces; read until all are answered or the gateway closes."""
        client = DiffClient([spec.method for spec in sent.specs])
        done: Deferred[None] = Deferred()

        def changed() -> None:
            answered = sent.specs[: len(client.answers)]
            # After a request that ends the connection, the gateway closes it.
            over = len(answered) == len(sent.specs) and not any(spec.closes for spec in answered)
            if not done.called and (client.is_lost or over):
                done.callback(None)

        client.changed = changed
        await TCP4ClientEndpoint(reactor, "127.0.0.1", h.http_port).connect(_OneShot(client))
        for piece in sent.pieces:
            if client.is_lost:
                break
            client.transport.write(piece)
            await deferLater(reactor, 0, lambda: None)
        changed()
        try:
            await done.addTimeout(WAIT, reactor)
        except Exception:
            client.no_end = True
        if not client.is_lost:
            client.closed_by_us = True
            client.transport.abortConnection()
        # Every connection ends, and the gateway is done with its requests.
        gateway = h.gateway_service.gateway
        for _ in range(int(WAIT * 1000)):
            if client.is_lost and not h.live_http and not gateway.exchanges:
                break
            await deferLater(reactor, 0.001, lambda: None)
        else:
            client.held = f"{len(h.live_http)} client connections, {len(gateway.exchanges)} requests"
            for channel in list(h.live_http):
                channel.transport.abortConnection()
        return client

    def behind(self, target: bytes) -> bytes:
        """The target the upstream receives for one the agents judged."""
        return target if target == b"*" else self.upstream_path + target

    def check(self, sent: Sent, outcome: Outcome, body_events: bool) -> None:
        """The property, for one example."""
        client = outcome.client
        note(f"sent: {sent.data!r}")
        note(f"answers: {client.received!r}")
        note(f"upstream received: {[r.raw for r in outcome.received]!r}")
        self.assertFalse(client.no_end, "the gateway neither answered every request nor closed the connection")
        self.assertIsNone(client.held, "the gateway held on after the client left")
        self.assertEqual(outcome.malformed, [], "the gateway sent the upstream something that is not HTTP/1.1")
        self.assertEqual(outcome.partial, [], "the upstream received part of a request")
        headers_events = [body for t, body in outcome.shown if t == REQUEST_HEADERS]
        chunks: dict[str, list[bytes]] = {}
        for t, body in outcome.shown:
            if t == REQUEST_BODY_CHUNK:
                chunks.setdefault(body["correlation_id"], []).append(base64.b64decode(body["data"]))
        # The answers, in order, to the requests sent.
        self.assertLessEqual(len(client.answers), len(sent.specs), "more answers than requests")
        forwarded: list[tuple[Spec, int]] = []
        for index, (spec, got) in enumerate(zip(sent.specs, client.answers, strict=False)):
            seq = got.headers.get(b"x-upstream-seq")
            if seq is not None:
                self.assertEqual((got.status, got.body), (200, b"" if spec.method == b"HEAD" else b"ok"))
                self.assertIsNone(spec.refuse, f"request {index} was forwarded, though it has {spec.refuse}")
                forwarded.append((spec, int(seq[0])))
            else:
                self.assertGreaterEqual(got.status, 400, f"request {index}: {got}")
            if spec.closes:
                self.assertEqual(len(client.answers), index + 1, f"request {index} ends the connection: nothing after it")
                self.assertFalse(client.closed_by_us, f"request {index} ends the connection")
        # Everything forwarded was answered to the client, once, in order.
        self.assertEqual(
            [seq for _, seq in forwarded], list(range(outcome.first, outcome.first + len(outcome.received)))
        )
        # The agent was shown each forwarded request, and no other.
        self.assertEqual(len(headers_events), len(forwarded), "requests the agent judged that did not go upstream")
        for (spec, seq), event in zip(forwarded, headers_events, strict=True):
            upstream = outcome.received[seq - outcome.first]
            # What the agent judged is what the upstream received (the
            # target behind the --upstream URL's path)...
            self.assertEqual(upstream.method, event["method"].encode())
            self.assertEqual(upstream.target, self.behind(event["uri"].encode()))
            headers = upstream.headers()
            self.assertEqual(headers.pop("host"), [self.upstream_host])
            for name in ("content-length", "transfer-encoding"):
                headers.pop(name, None)
            self.assertEqual(headers, forwarded_view(event["headers"]))
            if body_events:
                self.assertEqual(b"".join(chunks.get(event["metadata"]["correlation_id"], [])), upstream.body)
            # ... and what the client meant.
            self.assertEqual(
                (upstream.method, upstream.target, upstream.body), (spec.method, self.behind(spec.target), spec.body)
            )
            for name, meant in spec.meant.items():
                self.assertEqual(event["headers"].get(name), meant, name)

    def run_property(self, events: tuple[int, ...], path: str = "") -> Any:
        async def go() -> None:
            h, agent, log = await self._start(events, path)

            async def one(sent: Sent) -> Outcome:
                # A clean slate: no upstream connection left part-way through a request.
                for connection in log.connections:
                    if connection.buffer and connection.transport is not None:
                        connection.transport.abortConnection()
                    del connection.buffer[:]
                log.malformed.clear()
                shown, first = len(agent.events), len(log.requests)
                client = await self._send(h, sent)
                received = log.requests[first:]
                return Outcome(client, agent.events[shown:], first, received, list(log.malformed), log.partial())

            # Hypothesis runs in a thread of its own, each example on the
            # reactor: the trial test waits for it without blocking the reactor.
            budget = time.monotonic() + BUDGET

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            )
            @given(sendings())
            @example(FOUND[0])
            @example(FOUND[1])
            @example(FOUND[2])
            @example(FOUND[3])
            @example(FOUND[4])
            def prop(sent: Sent) -> None:
                # Failing examples, shrunk, may wait WAIT seconds each: stop
                # in time rather than at the test's timeout.
                if time.monotonic() > budget:
                    raise AssertionError(f"out of time ({BUDGET} s)")
                outcome = blockingCallFromThread(reactor, lambda: ensureDeferred(one(sent)))
                self.check(sent, outcome, REQUEST_BODY_EVENT in events)

            with captured_log() as logged:
                await deferToThread(prop)
            problems = [
                formatEvent(e)
                for e in logged
                if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)
            ]
            self.assertEqual(problems, [])

        return ensureDeferred(go())

    def test_agent_shown_the_headers(self) -> Any:
        # Behind an --upstream URL with a path, too.
        return self.run_property((REQUEST_HEADERS_EVENT,), "/base")

    def test_agent_shown_the_headers_and_body(self) -> Any:
        return self.run_property((REQUEST_HEADERS_EVENT, REQUEST_BODY_EVENT))
