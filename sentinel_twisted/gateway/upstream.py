# -*- test-case-name: tests.gateway.test_gateway -*-
"""
Forwarding allowed requests upstream over pooled persistent HTTP/1.1
connections (L{twisted.web.client.Agent} with an L{HTTPConnectionPool}),
with bodies streamed both ways.

L{StreamingBody} is the request body as an L{IBodyProducer}: bytes arrive
from the client (through any inspection stages) and leave as fast as the
upstream connection takes them.  L{UpstreamResponse} hands the response
body to the exchange piece by piece and lets it pause the upstream when the
client reads slowly; an upstream that goes quiet while its body is read
(for the upstream's timeout, paused time not counted) is cut off.

A response is read as strictly as a client's request: its head is bounded
and its framing and fields checked (L{_CheckedParser}), a chunked body's
framing as it is read (L{_StrictChunkedDecoder}), and a connection whose
response ended before all its bytes did is closed, never reused.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, HTTPClientParser
from twisted.web.client import (
    HTTPConnectionPool,
    ProxyAgent,
    ResponseDone,
)
from twisted.web.http import (
    PotentialDataLoss,
    _ChunkedTransferDecoder,
    _MalformedChunkedDataError,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from .._persistence import connection_options
from .._ratelimit import LogRateLimiter
from .._tls import client_tls_options, tls_failure
from ..proxy._identity import load_ca_certificates
from .body import STAGE_ROOM, Pressure
from .config import parse_upstream

__all__ = [
    "ForwardRequest",
    "HTTPUpstream",
    "IUpstream",
    "ResponseSink",
    "StreamingBody",
    "UpstreamFailed",
    "UpstreamResponse",
    "UpstreamTimeout",
    "upstream_trust_root",
]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")


class UpstreamFailed(Exception):
    """The upstream could not be reached or broke the exchange (C{502})."""


class UpstreamTimeout(UpstreamFailed):
    """
    The upstream sent no response in time (C{504}), or went quiet for as
    long while its response body was read (the body is cut short).
    """


@implementer(IBodyProducer)
class StreamingBody:
    """
    The request body on its way upstream.  It is fed before the upstream
    connection exists; what the connection cannot take yet is held and
    counted in the exchange's L{Pressure}, which pauses the client.  Past
    L{STAGE_ROOM} held it is L{busy}: the inspection stages before it send
    no more chunks until it has drained.

    It also tells when the upstream holds it up (L{upstream_held_since}):
    the wait for the upstream's response counts only from then.

    @ivar length: the body's length, or C{UNKNOWN_LENGTH} (chunked).
    @ivar sent: body bytes fed to it so far.
    @ivar clock: what times the upstream's holdups (the upstream's
        reactor, set by L{HTTPUpstream.forward}); C{None}: none is timed.
    """

    clock: IReactorTime | None = None
    # Reactor seconds: since when the upstream has paused the body, and
    # when all of it was handed to the upstream connection.
    _paused_at: float | None = None
    _sent_at: float | None = None

    def __init__(self, length: int | None, pressure: Pressure) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._pressure = pressure
        self._held: list[bytes] = []
        self._held_size = 0
        self._consumer: IConsumer | None = None
        self._paused = False
        self._ended = False
        self._stopped = False
        self._done: Deferred[None] | None = None
        self.sent = 0

    # -- from the exchange ----------------------------------------------------

    def feed(self, data: bytes) -> None:
        """More body: written upstream now, or held (and counted) until it can be."""
        if self._stopped:
            return
        self.sent += len(data)
        if self._consumer is not None and not self._paused:
            self._consumer.write(data)
        else:
            self._held.append(data)
            self._held_size += len(data)
            self._pressure.add(len(data))

    @property
    def busy(self) -> bool:
        """Whether it holds more than L{STAGE_ROOM} the upstream has not taken yet."""
        return self._held_size > STAGE_ROOM

    def end(self) -> None:
        """The body is complete."""
        self._ended = True
        if self._consumer is not None and not self._paused:
            self._complete()

    # -- IBodyProducer ----------------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._flush()
        if self._ended:
            self._complete()
            return succeed(None)
        self._done = Deferred()
        return self._done

    def pauseProducing(self) -> None:
        # The upstream connection takes no more for now.
        if not self._paused:
            self._paused_at = self._now()
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._paused_at = None
        self._flush()
        if self._ended:
            self._complete()

    def stopProducing(self) -> None:
        # The upstream connection is gone or answered early; per
        # IBodyProducer the Deferred must not fire any more.
        self._stopped = True
        self._done = None
        self._drop_held()

    def _flush(self) -> None:
        consumer = self._consumer
        if not self._held or consumer is None:
            return
        held, self._held = self._held, []
        size, self._held_size = self._held_size, 0
        for data in held:
            consumer.write(data)
        self._pressure.sub(size)
        self._pressure.drained()

    def _drop_held(self) -> None:
        size, self._held_size = self._held_size, 0
        self._held = []
        if size:
            self._pressure.sub(size)

    def _complete(self) -> None:
        if self._sent_at is None:
            self._sent_at = self._now()
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)

    def _now(self) -> float:
        clock = self.clock
        return 0.0 if clock is None else clock.seconds()

    def upstream_held_since(self, start: float) -> float | None:
        """
        Since when (reactor seconds) the upstream, rather than the client
        or the agents, has kept the body from going on: C{start} (when the
        request was sent) until its connection takes the body, then from
        each pause it makes, and from the body's end once all of it is
        handed over; C{None} while it takes the body as fast as it comes
        (the client sending it is bounded by C{--min-body-rate}).
        """
        if self._sent_at is not None:
            return max(start, self._sent_at)
        if self._consumer is None or self._stopped:
            return start
        if self._paused:
            return start if self._paused_at is None else max(start, self._paused_at)
        return None


class ForwardRequest:
    """
    What goes upstream: method, origin-form URI, headers and body.

    @ivar method: the request method.
    @ivar uri: the origin-form target (path and query).
    @ivar headers: the headers to send.
    @ivar body: the body, C{None} for none.
    @ivar decisions: each agent's decision, for an upstream that shows them
        (the echo); else C{None}.
    """

    __slots__ = ("body", "decisions", "headers", "method", "uri")

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers,
        body: StreamingBody | None,
        decisions: list[dict[str, Any]] | None = None,
    ) -> None:
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = body
        self.decisions = decisions


class ResponseSink(Protocol):
    """The exchange's side of a response body."""

    def response_data(self, data: bytes) -> None:
        """A piece of the response body."""

    def response_end(self, error: Failure | None) -> None:
        """The body ended; C{error} if it broke."""


class UpstreamResponse:
    """
    Status, headers, and a body delivered on request.

    @cvar code: the status code.
    @cvar phrase: the reason phrase.
    @cvar headers: the response headers.
    @cvar length: the body's length, C{None} or C{UNKNOWN_LENGTH} if not
        known.
    """

    code: int
    phrase: bytes
    headers: Headers
    length: int | None

    def deliver(self, sink: ResponseSink) -> None:
        """Start delivering the body to C{sink}, piece by piece."""
        raise NotImplementedError

    def pause(self) -> None:
        """
        Stop reading the upstream for now (the client reads slowly, or the
        agents inspecting the body are behind): the upstream's silence does
        not count until L{resume}.
        """
        pass

    def resume(self) -> None:
        """Read the upstream again."""
        pass

    def abort(self) -> None:
        """Give up on the body (the upstream connection is closed, not reused)."""


class IUpstream(Protocol):
    """Where allowed requests go: L{HTTPUpstream} or the built-in echo."""

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        """Send a request; fires with the response, fails with L{UpstreamFailed}."""

    def close(self) -> Deferred[None]:
        """Release the connections; fires when done."""

    def describe(self) -> str:
        """What to call it in log lines and on the status site."""


def _no_clock() -> float:
    return 0.0


def _body_failure(reason: Failure) -> Failure:
    """
    Why a response body broke, told plainly: twisted.web wraps the reason
    (a malformed chunked framing, a lost connection) in a
    C{ResponseFailed} whose text is the repr of a list of failures, which
    the log line and RequestComplete would give instead of the reason.
    """
    inners = [f for f in getattr(reason.value, "reasons", None) or () if isinstance(f, Failure)]
    for inner in inners:
        if inner.check(_MalformedChunkedDataError):
            return Failure(UpstreamFailed(f"a malformed chunked body: {inner.getErrorMessage()}"))
    # The words of each reason that has some (twisted.web's _DataLoss has none).
    words = [text for text in (inner.getErrorMessage() for inner in inners) if text]
    if words:
        return Failure(UpstreamFailed("; ".join(words)))
    return reason


class _BodyReader(TwistedProtocol):
    """
    Hands the upstream's response body to the exchange (C{sink}), and gives
    up on an upstream that goes quiet while it is read: no body bytes (and
    no end) for C{timeout} seconds of reading, and the upstream connection
    is aborted and the sink told with an L{UpstreamTimeout}.

    Time while the gateway does not read (L{pause}: a slow client, agents
    behind) does not count: the timer stops while paused, and the silence
    counts anew from L{resume}.  Each read only notes the time; one timer
    call per C{timeout} looks at it (never a timer call per read).

    @ivar sink: where the body goes; C{None} once it has ended or been
        given up on.
    @ivar heard: reactor seconds of the last body bytes read (or of when
        reading began or resumed).
    """

    heard = 0.0
    _timer: IDelayedCall | None = None
    _paused = False

    def __init__(
        self,
        sink: ResponseSink | None,
        clock: IReactorTime | None = None,
        timeout: float = 0.0,
        upstream: str = "",
    ) -> None:
        self.sink = sink
        self._clock = clock
        self._seconds = _no_clock if clock is None else clock.seconds
        self._timeout = timeout
        self._upstream = upstream

    def dataReceived(self, data: bytes) -> None:
        # A hot path: a read notes the time, nothing more (see _check).
        self.heard = self._seconds()
        sink = self.sink
        if sink is not None:
            sink.response_data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._stop_watching()
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            sink.response_end(None)
        else:
            sink.response_end(_body_failure(reason))

    # -- the upstream's silence ---------------------------------------------------

    def watch(self) -> None:
        """Reading begins (or begins again): the upstream's silence counts from now."""
        self._paused = False
        clock = self._clock
        if clock is None or self.sink is None:
            return
        self.heard = clock.seconds()
        if self._timer is None:
            self._timer = clock.callLater(self._timeout, self._check)

    def pause(self) -> None:
        """Stop reading the upstream: its silence does not count until L{resume}."""
        # The timer is left to find the reader paused, and stop (flow
        # control pauses and resumes often: no cancelled call each time).
        self._paused = True
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()

    def resume(self) -> None:
        """Read the upstream again."""
        self.watch()
        transport: Any = self.transport
        if transport is not None:
            transport.resumeProducing()

    def give_up(self) -> None:
        """The body is not wanted any more: stop watching, stop reading."""
        self.sink = None
        self._stop_watching()
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def _stop_watching(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check(self) -> None:
        self._timer = None
        sink = self.sink
        clock = self._clock
        if sink is None or self._paused or clock is None:
            return
        now = clock.seconds()
        due = self.heard + self._timeout
        if due > now:
            # Bytes came (or reading resumed) meanwhile: look again when
            # that is a timeout ago.
            self._timer = clock.callLater(due - now, self._check)
            return
        self.sink = None
        self._abort()
        sink.response_end(
            Failure(UpstreamTimeout(f"{self._upstream} went quiet for {self._timeout:g}s in its response body"))
        )

    def _abort(self) -> None:
        """Abort the upstream connection: a quiet peer would not complete a clean close (TLS)."""
        transport: Any = self.transport
        if transport is None:
            return
        # twisted.web.client hands the body protocol a TransportProxyProducer
        # of the connection's transport (its documented _producer: None once
        # the response is over).
        connection = getattr(transport, "_producer", None)
        abort = getattr(connection, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.stopProducing()


#: A reason phrase as RFC 9112 section 4 has it, or a header value as RFC
#: 9110 section 5.5 does: tabs, spaces, visible ASCII and obs-text.
#: twisted.web.client splits lines at LF alone and keeps anything else, a
#: CR or a NUL too.
_REASON_PHRASE = _FIELD_TEXT = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")

#: The largest response head an upstream may send, its interim (1xx)
#: responses' included: in bytes (line ends counted) and in lines.  Past
#: either the exchange is the upstream's failure (C{502}); twisted.web.client
#: bounds a line (16 KiB) and nothing else, so an upstream could have the
#: gateway hold headers, or skip interim responses, until --upstream-timeout.
MAX_RESPONSE_HEAD_SIZE = 64 * 1024
#: ... and the most lines it may have (a client's request head has as many).
MAX_RESPONSE_HEAD_LINES = 500

#: A status line as RFC 9112 section 4 has it, of an HTTP/1.x response:
#: twisted.web.client takes any protocol name (C{XTTP/1.0}), any version
#: numbers (C{HTTP/01.1}, C{HTTP/2.0}) and anything C{int} reads as the
#: code (C{+200}, C{2_00}).  The reason phrase is checked apart.
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] [0-9]{3}(?: .*)?", re.DOTALL)

#: The final status codes an upstream may answer with (RFC 9110 section 15).
_FINAL_STATUS_MIN = 200
_FINAL_STATUS_MAX = 599

#: Statuses whose responses have no body, whatever their headers say.
_NO_BODY_STATUS = (204, 304)


class _BadResponse(Exception):
    """What an upstream sent cannot be taken as a response (its connection is closed)."""


#: The longest chunk-size line (chunk extensions included, its CRLF not)
#: an upstream may send.
MAX_CHUNK_LINE = 1024

#: A whole chunk-size line (RFC 9112 section 7.1), its CRLF left off: the
#: size in hex digits, then any chunk extensions, whitespace allowed
#: before their first C{;} (C{BWS}), their text one line of tabs, visible
#: ASCII and obs-text (what a C{quoted-string} may hold, backslash
#: included); the gateway drops them.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?")
#: The longest start of a chunk-size line that could still become one.
_CHUNK_LINE_START = re.compile(rb"[0-9A-Fa-f]+(?:[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?)?")


class _StrictChunkedDecoder(_ChunkedTransferDecoder):
    """
    twisted.web's decoder of a chunked body, judging a chunk-size line and
    the CRLF after chunk data by the bytes already read.  twisted.web looks
    for a CRLF and parses the line once one comes: a line that ends in a
    bare LF, or goes on with junk (C{5 junk}), kept the gateway waiting for
    a CRLF that a broken upstream never sends, until C{--upstream-timeout}
    or 1 KiB more; chunk data followed by one wrong byte, for a second one.
    A line that can no longer be a chunk-size line is refused at once
    (L{_MalformedChunkedDataError}: the upstream connection is closed, the
    request fails), and so is a bare LF in the trailer section (a last
    chunk C{0} and CRLF, then LF: the same wait); a line RFC 9112 allows
    is taken, whitespace before a chunk extension and a backslash in a
    quoted one too (twisted.web refuses both).  Trailer fields are
    otherwise read as twisted.web reads them (and dropped).
    """

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        buffer = self._buffer
        start = _CHUNK_LINE_START.match(buffer, 0, MAX_CHUNK_LINE + 1)
        size = 0 if start is None else start.end()
        if size > MAX_CHUNK_LINE:
            raise _MalformedChunkedDataError(f"a chunk-size line longer than {MAX_CHUNK_LINE} bytes")
        end = bytes(buffer[size : size + 2])
        if end in (b"", b"\r"):
            return False
        if end != b"\r\n":
            if end[:1] == b"\n":
                raise _MalformedChunkedDataError("a chunk-size line ending in a bare LF, not CRLF")
            raise _MalformedChunkedDataError(
                f"a chunk-size line with {end[:1]!r} after {bytes(buffer[: min(size, 32)])!r}, "
                "not hex digits and chunk extensions"
            )
        line = _CHUNK_LINE.fullmatch(buffer, 0, size)
        if line is None:
            # Whitespace with no chunk extension after it, or an empty line.
            raise _MalformedChunkedDataError(
                f"a chunk-size line {bytes(buffer[: min(size, 32)])!r}, not hex digits and chunk extensions"
            )
        self.length = int(line.group(1), 16)
        self.state = "BODY" if self.length else "TRAILER"
        del buffer[: size + 2]
        self._start = 0
        return True

    def _dataReceived_TRAILER(self) -> bool:
        # twisted.web ends a trailer line at CRLF alone: a bare LF (the
        # end of the body written as "0\r\n\n") kept the gateway waiting.
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end == 0 or end > 0 and buffer[end - 1] != 0x0D:
            raise _MalformedChunkedDataError("a trailer section line ending in a bare LF, not CRLF")
        return super()._dataReceived_TRAILER()

    def _dataReceived_CRLF(self) -> bool:
        if not b"\r\n".startswith(self._buffer[:2]):
            raise _MalformedChunkedDataError("chunk data not followed by CRLF")
        if len(self._buffer) < 2:
            return False
        del self._buffer[:2]
        self.state = "CHUNK_LENGTH"
        return True


class _CheckedParser(HTTPClientParser):
    """
    twisted.web.client's response parser of one upstream request, checking
    the head as it reads it: its size and lines are bounded
    (L{MAX_RESPONSE_HEAD_SIZE}, L{MAX_RESPONSE_HEAD_LINES}, interim
    responses included), its status lines must be C{HTTP/1.x} with a
    three-digit code, and a final head whose framing or fields a client
    or the gateway could read in two ways is refused: C{101} (the gateway
    never asks for an upgrade), C{Transfer-Encoding} with C{Content-Length},
    a transfer coding other than C{chunked} alone (or any in an HTTP/1.0
    response), a header value with a control character other than a tab;
    so is a status code outside 100 to 599.  A chunked body is read by
    L{_StrictChunkedDecoder}.

    Refusing raises L{_BadResponse} in the parser: the upstream connection
    gives up (closed, never reused) and the request fails with it.
    """

    _head_size = 0
    _head_lines = 0
    _transferDecoders = {b"chunked": _StrictChunkedDecoder}

    def statusReceived(self, status: bytes) -> None:
        # What twisted.web.client refuses keeps its words ("non-integer
        # status code").
        super().statusReceived(status)  # type: ignore[no-untyped-call]
        if not _STATUS_LINE.fullmatch(status):
            raise _BadResponse(f"a status line {status!r}, not HTTP/1.x and a three-digit status code")

    def lineReceived(self, line: bytes) -> None:
        size = self._head_size = self._head_size + len(line) + 1
        lines = self._head_lines = self._head_lines + 1
        if size > MAX_RESPONSE_HEAD_SIZE or lines > MAX_RESPONSE_HEAD_LINES:
            raise _BadResponse(
                f"a response head over {MAX_RESPONSE_HEAD_SIZE} bytes or "
                f"{MAX_RESPONSE_HEAD_LINES} lines (interim responses included)"
            )
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        code = self.response.code
        if code == 101:
            raise _BadResponse("a 101 Switching Protocols response, but no upgrade was asked for")
        if not 100 <= code <= _FINAL_STATUS_MAX:
            # twisted.web.client would take it as a final status: checked
            # here, not once the response is handed over, so that its
            # connection is closed even when its body is in already.
            raise _BadResponse(
                f"an invalid status code {code} (final ones are {_FINAL_STATUS_MIN} to {_FINAL_STATUS_MAX})"
            )
        if code >= _FINAL_STATUS_MIN:
            self._check_fields(self.headers)
            self._check_fields(self.connHeaders)
            if code not in _NO_BODY_STATUS and self.request.method != b"HEAD":
                self._check_framing(self.connHeaders, self.response.version)
            # RFC 9110 section 7.6.1: what the Connection header names is
            # for this connection alone (twisted.web keeps only the
            # hop-by-hop headers it knows apart): the agents and the
            # client never get it.
            named = connection_options(self.connHeaders.getRawHeaders(b"Connection", ()))
            for name in named:
                if name:
                    self.headers.removeHeader(name)
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    @staticmethod
    def _check_fields(headers: Headers) -> None:
        for name, values in headers.getAllRawHeaders():
            for value in values:
                if not _FIELD_TEXT.fullmatch(value):
                    raise _BadResponse(
                        f"a response header {name.decode('latin-1')!r} with a control character"
                    )

    @staticmethod
    def _check_framing(connection: Headers, version: Any) -> None:
        codings = connection.getRawHeaders(b"Transfer-Encoding")
        if codings is None:
            return
        if connection.hasHeader(b"Content-Length"):
            raise _BadResponse("a response with both Transfer-Encoding and Content-Length")
        if tuple(version) < (b"HTTP", 1, 1):
            raise _BadResponse("an HTTP/1.0 response with a Transfer-Encoding")
        named = [c.strip().lower() for value in codings for c in value.split(b",")]
        if named != [b"chunked"]:
            text = b", ".join(codings).decode("latin-1")
            raise _BadResponse(f"a response with Transfer-Encoding {text!r}, not chunked alone")


class _HTTPResponse(UpstreamResponse):
    def __init__(
        self, response: IResponse, clock: IReactorTime | None = None, timeout: float = 0.0, upstream: str = ""
    ) -> None:
        self._response = response
        self.code = response.code
        # Another phrase would go to the client as it is: a bare CR in it
        # starts a line of the upstream's making for some clients.  The
        # client gets the status code's own phrase instead.
        phrase = response.phrase
        self.phrase = phrase if _REASON_PHRASE.fullmatch(phrase) else b""
        self.headers = response.headers
        length = response.length
        self.length = length if isinstance(length, int) else None
        self._reader: _BodyReader | None = None
        self._clock = clock
        self._timeout = timeout
        self._upstream = upstream
        self._paused = False

    def deliver(self, sink: ResponseSink) -> None:
        reader = self._reader = _BodyReader(sink, self._clock, self._timeout, self._upstream)
        self._response.deliverBody(reader)
        # What was read already may have ended the body.
        if reader.sink is not None:
            if self._paused:
                reader.pause()
            else:
                reader.watch()

    def pause(self) -> None:
        self._paused = True
        reader = self._reader
        if reader is not None:
            reader.pause()

    def resume(self) -> None:
        self._paused = False
        reader = self._reader
        if reader is not None:
            reader.resume()

    def abort(self) -> None:
        if self._reader is None:
            self._reader = _BodyReader(None)
            self._response.deliverBody(self._reader)
        self._reader.give_up()


@implementer(ILogObserver)
class _InterimResponses:
    """
    Where the response parser of an upstream connection logs: its one line,
    an interim (1xx) response ignored, goes through the gateway's limiter.
    An upstream can send any number of them before its answer, and
    C{twisted.web} logs each.
    """

    def __init__(self, upstream: HTTPUpstream) -> None:
        self._upstream = upstream

    def __call__(self, event: LogEvent) -> None:
        upstream = self._upstream
        upstream.log_limiter.info(
            log,
            "upstream_interim",
            "The upstream {upstream} sent an interim {code} response; ignoring it",
            upstream=upstream.url,
            code=event.get("code"),
        )


class _UpstreamProtocol(HTTP11ClientProtocol):
    """An upstream connection whose response parser logs through L{_InterimResponses}."""

    def __init__(self, quiescentCallback: Any, parser_log: Logger) -> None:
        super().__init__(quiescentCallback)  # type: ignore[no-untyped-call]
        self._parser_log = parser_log

    def request(self, request: Any) -> Any:
        result = super().request(request)
        parser: Any = self._parser
        if parser is not None:
            parser._log = self._parser_log
            # HTTP11ClientProtocol.request builds its parser itself: it
            # becomes one that checks the response head (a subclass adding
            # no state but two counters).
            parser.__class__ = _CheckedParser
        return result

    def dataReceived(self, data: bytes) -> None:
        if self.state == "QUIESCENT":
            # Bytes while no request is out (a 408 before an idle close,
            # garbage): nothing may go out on this connection now.
            # twisted.web would close it but leave it in the pool, where
            # only the QUIESCENT state is checked, until the close is done,
            # and a request picked in between would be written to it.
            self.abort()  # type: ignore[no-untyped-call]
            return
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        request = self._currentRequest
        if request is not None and (rest or not _persists(self._parser)):
            # Bytes past the end of the response (a body longer than its
            # Content-Length, a HEAD or 204 answered with one): twisted.web
            # drops them and would reuse the connection, whose next bytes
            # could be taken for the next request's response.  Or a
            # response with the close option, or an HTTP/1.0 one without
            # keep-alive, after which the upstream closes (RFC 9112
            # section 9.3), perhaps only once the next request is on its
            # way.  It closes.
            request.persistent = False
        super()._finishResponse_WAITING(rest)

    _finishResponse_TRANSMITTING = _finishResponse_WAITING


def _persists(parser: Any) -> bool:
    """
    Whether the connection of the response C{parser} read may carry another
    request as far as its version and C{Connection} options say: never
    with C{close} among them (in any case, in any of its fields:
    twisted.web looks for a field that is C{close} and nothing else),
    HTTP/1.1 and later otherwise, HTTP/1.0 only with keep-alive.
    """
    response = getattr(parser, "response", None)
    if response is None:
        return True
    options = set(connection_options(parser.connHeaders.getRawHeaders(b"Connection", ())))
    if b"close" in options:
        return False
    return tuple(response.version[1:]) >= (1, 1) or b"keep-alive" in options


class _UpstreamFactory(Factory):
    """
    Twisted's factory of pooled connections (C{_HTTP11ClientFactory}), of
    L{_UpstreamProtocol}s, and without a "Starting factory" and "Stopping
    factory" line for every upstream connection.
    """

    noisy = False

    def __init__(self, quiescentCallback: Any, metadata: Any, parser_log: Logger) -> None:
        self._quiescentCallback = quiescentCallback
        self._metadata = metadata
        self._parser_log = parser_log

    def __repr__(self) -> str:
        return f"_UpstreamFactory({self._quiescentCallback}, {self._metadata})"

    def buildProtocol(self, addr: Any) -> _UpstreamProtocol:
        return _UpstreamProtocol(self._quiescentCallback, self._parser_log)


class _QuietConnectionPool(HTTPConnectionPool):
    """A connection pool of L{_UpstreamFactory} connections."""

    def __init__(self, reactor: Any, upstream: HTTPUpstream) -> None:
        super().__init__(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self._parser_log = Logger(namespace=log.namespace, observer=_InterimResponses(upstream))

    def _factory(self, quiescentCallback: Any, metadata: Any) -> Any:  # type: ignore[override]
        return _UpstreamFactory(quiescentCallback, metadata, self._parser_log)


class _ResponseWait:
    """
    The wait for an upstream's response headers: C{requested} is cancelled
    once the upstream has held things up for C{timeout} seconds (see
    L{StreamingBody.upstream_held_since}): from when it was sent, or while
    a request body still arrives from the client, only from when the
    upstream stopped taking it, or from the body's end.

    @ivar timed_out: whether it cancelled the request.
    """

    timed_out = False

    def __init__(
        self, reactor: IReactorTime, timeout: float, body: StreamingBody | None, requested: Deferred[Any]
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._body = body
        self._requested: Deferred[Any] | None = requested
        self._start = reactor.seconds()
        self._timer: IDelayedCall | None = reactor.callLater(timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        requested = self._requested
        if requested is None:
            return
        body = self._body
        held_since = self._start if body is None else body.upstream_held_since(self._start)
        now = self._reactor.seconds()
        if held_since is None or held_since + self._timeout > now:
            # A body the upstream takes as it comes is still arriving (the
            # client is bound by --min-body-rate): an upload may last longer.
            due = self._timeout if held_since is None else held_since + self._timeout - now
            self._timer = self._reactor.callLater(due, self._expire)
            return
        self.timed_out = True
        requested.cancel()

    def stop(self) -> None:
        """The response is in, or the request failed: no more waiting."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._body = self._requested = None


class HTTPUpstream:
    """
    An upstream HTTP(S) server.  The client's path and query are appended
    to the URL's path; idle connections are kept for reuse.

    The request target goes out exactly as the agents were shown it (with
    the URL's path in front): it is handed to the connection as it is
    (L{ProxyAgent} does that), never parsed and rebuilt the way
    L{Agent} does, which would drop an empty query's C{?}, say.

    C{timeout} bounds the wait for a response's headers (counted while the
    upstream holds things up: from the end of the request body, or while
    it takes none of a body still arriving; see
    L{StreamingBody.upstream_held_since}), and then the
    upstream's silence while its body is read (time while the exchange has
    it paused does not count): the connection is aborted and the
    exchange's L{ResponseSink} told with an L{UpstreamTimeout}.

    An C{https} upstream's certificate must chain to C{trust_root} (an
    C{IOpenSSLTrustRoot}, as C{optionsForClientTLS} takes it; the platform's
    CAs by default) and name the URL's host in a subjectAltName.

    @ivar url: the upstream's URL as given.
    @ivar pool: the idle upstream connections kept for reuse.
    @ivar log_limiter: keeps the lines an upstream triggers at will (an
        interim response ignored) to a few per period; the gateway's own
        once the gateway is built.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        timeout: float = 30.0,
        max_connections: int = 64,
        trust_root: Any = None,
    ) -> None:
        parsed = parse_upstream(url)
        self.url = url
        self._reactor: IReactorTime = reactor
        self._timeout = timeout
        path = "/".join(parsed.path).rstrip("/")
        self._path_prefix = b"/" + path.encode("ascii") if path else b""
        host = parsed.host
        secure = parsed.scheme == "https"
        port = parsed.port or (443 if secure else 80)
        netloc = f"[{host}]" if ":" in host else host
        if port != (443 if secure else 80):
            netloc += f":{port}"
        self._host = netloc.encode("ascii")  # an encoded URL: IDNA is done
        endpoint: Any = HostnameEndpoint(reactor, host, port)
        if secure:
            endpoint = wrapClientTLS(client_tls_options(host, trust_root), endpoint)
        self.log_limiter = LogRateLimiter(reactor)
        self.pool: HTTPConnectionPool = _QuietConnectionPool(reactor, self)
        self.pool.maxPersistentPerHost = max_connections
        self.pool.cachedConnectionTimeout = 60
        self._agent = ProxyAgent(endpoint, reactor, pool=self.pool)

    def describe(self) -> str:
        """The upstream's URL."""
        return self.url

    def target(self, uri: bytes) -> bytes:
        """The request target the upstream receives for a judged one."""
        if uri == b"*":
            return uri
        return self._path_prefix + uri

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        """
        Send the request upstream.

        @return: fires with the response once its headers are in; fails with
            L{UpstreamTimeout} (no response in time) or L{UpstreamFailed} (not
            reachable, or the connection broke).
        """
        headers = request.headers
        headers.setRawHeaders(b"Host", [self._host])
        body = request.body
        if body is not None:
            body.clock = self._reactor
        requested = self._agent.request(request.method, self.target(request.uri), headers, body)
        wait = _ResponseWait(self._reactor, self._timeout, body, requested)

        def got(response: IResponse) -> UpstreamResponse:
            wait.stop()
            return _HTTPResponse(response, self._reactor, self._timeout, self.url)

        def failed(failure: Failure) -> Failure:
            wait.stop()
            if wait.timed_out:
                return Failure(UpstreamTimeout(f"no response from {self.url} in {self._timeout:g}s"))
            return Failure(UpstreamFailed(_describe_failure(failure)))

        result: Deferred[UpstreamResponse] = requested.addCallbacks(got, failed)
        return result

    def close(self) -> Deferred[None]:
        """Close the idle connections; fires when they are closed."""
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


def upstream_trust_root(path: str | None) -> Any:
    """
    What an C{https} upstream's certificate must chain to: the CA
    certificates of the PEM file at C{path} (for L{HTTPUpstream}'s
    C{trust_root}), or C{None} without one (the system's trusted CAs).

    @raise ValueError: if the file cannot be read or holds no certificate.
    """
    if path is None:
        return None
    from twisted.internet.ssl import trustRootFromCertificates

    return trustRootFromCertificates(load_ca_certificates(path, "upstream CA file"))


def _describe_failure(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_describe_failure(r) for r in reasons)
    error = failure.value
    described = tls_failure(error, "upstream") if error is not None else None
    return described or str(error) or type(error).__name__
