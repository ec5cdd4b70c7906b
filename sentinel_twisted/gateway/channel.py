# -*- test-case-name: tests.gateway.test_channel -*-
"""
L{GatewayChannel}: one client connection of the gateway.  An HTTP/1.1
channel of C{twisted.web} with a deadline for each request head (that of
L{DeadlineChannel <sentinel_twisted._deadlines.DeadlineChannel>}), a least
average rate for each request body, a deadline for a client that takes no
response bytes (all checked by one timer per connection), an idle timeout
kept as one timer per connection, a clear C{431} for a head that is too
large, and responses that leave in one send on a plain socket.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .._deadlines import TIMEOUT_RESPONSE, DeadlineChannel
from .._persistence import check_persistence
from .._reading import read_plainly
from .._sending import send_now, writes_through

if TYPE_CHECKING:
    from .resource import GatewayRequest, GatewaySite

__all__ = ["GatewayChannel"]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")


def _discard(data: bytes) -> None:
    pass


class GatewayChannel(DeadlineChannel):
    """
    An HTTP/1.1 connection with deadlines for a slow client and a clear
    answer to a head that is too large.

    The head's deadline runs whenever a request head is awaited: from the
    connection's start, and from the end of each response on a kept-alive
    connection, until the head's last line.  A client that has sent part of
    a head by then gets C{408}; an idle one is closed without a word.

    A request body must then arrive at C{min_body_rate} bytes a second on
    average, counted from C{header_timeout} seconds after its head, or
    after the C{100 Continue} of a request that expects one (time while the
    gateway itself stops reading it does not count, unless the upstream has
    answered already).  A client
    that falls behind gets C{408} and the connection closes; its exchange
    ends as if the client had gone (agents' events cancelled, the upstream
    request aborted).

    While the client takes no response bytes (the transport, its buffer
    full, paused the channel) it has C{send_timeout} seconds to take all
    that is buffered; a connection being closed has as long to take its
    last bytes.  Then the connection is aborted.  Taking a byte now and then
    does not count: only an emptied buffer does.

    One timer per connection checks all these deadlines: it re-arms itself
    for the earliest one, and lapses when none runs.

    @cvar min_body_rate: the least average rate (bytes a second) of a
        request body after its grace of C{header_timeout}; C{None}: no limit.
    @cvar send_timeout: seconds a client has to take the response bytes
        buffered for it, and a closing connection its last bytes; C{None}:
        no limit.
    @ivar timeOut: twisted.web's idle timeout: seconds without a read, while
        no request is being handled, before the connection is closed;
        C{None} while a request is handled.
    @ivar persistent: whether the connection stays open after the response
        (C{False} once it is being closed).
    """

    min_body_rate: float | None = None
    send_timeout: float | None = None
    #: Set by L{GatewaySite.buildProtocol <sentinel_twisted.gateway.resource.GatewaySite.buildProtocol>}.
    site: GatewaySite
    # The timer of the head's deadline checks the deadlines below too,
    # instead of a timer per request.
    # The request whose body is arriving, and when its body's clock started
    # (moved on by the time the gateway stopped reading); None: no body.
    _body_request: GatewayRequest | None = None
    _body_since = 0.0
    _body_paused_at: float | None = None
    # Since when the transport has held response bytes the client does not
    # take (it paused the channel); None: it takes them.
    _stalled_since: float | None = None
    # Since when the connection is being closed; None: it is not.
    _closing_since: float | None = None
    # twisted.web's idle timeout (timeOut), kept the same way: a deadline
    # that each read moves, checked by one timer per connection.
    # twisted.web's own turns the timeout off and on around every request,
    # a timer cancelled and a new one scheduled per request.
    _idle_deadline: float | None = None
    _idle_timer: IDelayedCall | None = None
    # Bytes written and not sent yet, while a response is being written
    # (see GatewayRequest.write); None: this transport takes the usual path.
    _outgoing: list[bytes] | None = None
    _holding = 0
    # The connection's two addresses, asked of the transport once: each
    # request wants both, and the local one costs a system call.
    _host: Any = None
    _peer: Any = None

    def makeConnection(self, transport: Any) -> None:
        read_plainly(transport)
        if writes_through(transport):
            self._outgoing = []
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = super().getHost()  # type: ignore[no-untyped-call]
        return host

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()  # type: ignore[no-untyped-call]
        return peer

    # -- the idle timeout and the head's deadline -------------------------------

    def setTimeout(self, period: float | None) -> float | None:
        previous = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        if period is None:
            # The timer, if any, lapses when it finds no deadline.
            self._idle_deadline = None
        else:
            self._idle_deadline = self.site.reactor.seconds() + period
            if self._idle_timer is None:
                self._idle_timer = self.callLater(period, self._check_idle)  # type: ignore[no-untyped-call]
        return previous

    def resetTimeout(self) -> None:
        # Called on every read: the idle deadline moves, and an awaited
        # head has started (twisted.web's timer, never set, is not asked).
        if self._idle_deadline is not None:
            self._idle_deadline = self.site.reactor.seconds() + self.timeOut  # type: ignore[operator]
        if self._head_deadline is not None:
            self._head_started = True

    def _check_idle(self) -> None:
        self._idle_timer = None
        deadline = self._idle_deadline
        if deadline is None:
            return
        now = self.site.reactor.seconds()
        left = deadline - now
        if left <= 0 and self.requests and self.requests[-1].continue_owed:
            # The client waits for its 100 Continue while the agents
            # decide: it is not idle (send_continue moves the deadline on).
            left = self.timeOut  # type: ignore[assignment]
            self._idle_deadline = now + left
        if left > 0:
            self._idle_timer = self.callLater(left, self._check_idle)  # type: ignore[no-untyped-call]
            return
        self._idle_deadline = None
        self.timeoutConnection()  # type: ignore[no-untyped-call]

    def _stop_timer(self) -> None:
        self._stalled_since = self._closing_since = None
        self._body_request = None
        super()._stop_timer()

    def _check_other_deadlines(self, now: float) -> float | None:
        # The send timeout, then the body's (a body and an awaited head
        # never overlap: the head's end stops its deadline, and the end of
        # the response, which starts the next one, ends the body's).
        due = math.inf
        send_timeout = self.send_timeout
        for since in (self._closing_since, self._stalled_since):
            if since is not None and send_timeout is not None:
                if since + send_timeout <= now:
                    self._send_timed_out()
                    return None
                due = min(due, since + send_timeout)
        request = self._body_request
        body_due = None if request is None else self._body_due(request, now)
        if body_due is not None:
            if body_due <= now:
                assert request is not None
                self._body_timed_out(request)
                return None
            due = min(due, body_due)
        return due

    def _head_timed_out(self) -> None:
        self._send_outgoing()
        super()._head_timed_out()

    def _warn(self, kind: str, format: str, /, **fields: Any) -> None:
        self.site.gateway.log_limiter.warn(log, kind, format, **fields)

    # -- the request body's least rate ------------------------------------------

    def _body_due(self, request: GatewayRequest, now: float) -> float | None:
        """When C{request}'s body is due to have come as far as it has; C{None}: no deadline."""
        if request.body_complete or request.finished or request.client_gone:
            self._body_request = None
            return None
        exchange = request.exchange
        if exchange is None or exchange.is_over:
            # Answered already (the rest is discarded): the client is not late.
            return None
        grace = self.header_timeout or 0.0
        if request.continue_owed:
            # The client may wait for its 100 Continue: it is not late.
            # Look again later (send_continue starts the clock anew).
            return now + max(grace, 1.0)
        if self._body_paused_at is not None and not exchange.upstream_answered:
            # The gateway stopped reading: the client is not late.  Look
            # again later: once the upstream has answered, a stop counts
            # (an upstream that answers early and reads no more must not
            # hold the client).
            return now + max(grace, 1.0)
        rate = self.min_body_rate
        assert rate is not None
        return self._body_since + grace + request.body_received / rate

    def body_paused(self) -> None:
        """The gateway stopped reading the body: its clock stops."""
        if self._body_request is not None and self._body_paused_at is None:
            self._body_paused_at = self.site.reactor.seconds()

    def body_resumed(self) -> None:
        """The gateway reads the body again: its clock goes on."""
        paused_at = self._body_paused_at
        if paused_at is not None:
            self._body_paused_at = None
            now = self.site.reactor.seconds()
            request = self._body_request
            if request is None:
                return
            exchange = request.exchange
            if exchange is None or not exchange.upstream_answered:
                self._body_since += now - paused_at
            due = self._body_due(request, now)
            if due is not None:
                self._arm(now, due)

    def _body_timed_out(self, request: GatewayRequest) -> None:
        self._body_request = None
        self._warn(
            "body_timeout",
            "A client sent its request body slower than {rate} bytes/s; answering 408",
            rate=self.min_body_rate,
        )
        exchange = request.exchange
        if exchange is not None:
            exchange.client_timed_out()
        transport: Any = self.transport
        if transport is not None and not transport.disconnecting and not request.finished:
            # No exchange to answer (never the case for a streamed body).
            self._send_outgoing()
            transport.write(TIMEOUT_RESPONSE)
            self.persistent = False
            self._close(transport)

    # -- a client that takes no response bytes ----------------------------------

    def pauseProducing(self) -> None:
        # The transport holds more than it wants to: the client is not
        # taking the response as fast as it comes.
        if self._stalled_since is None and self.send_timeout is not None:
            now = self._stalled_since = self.site.reactor.seconds()
            self._arm(now, now + self.send_timeout)
        super().pauseProducing()  # type: ignore[no-untyped-call]

    def resumeProducing(self) -> None:
        # All that was buffered is sent: the timer, if any, lapses.
        self._stalled_since = None
        super().resumeProducing()  # type: ignore[no-untyped-call]

    def _close(self, transport: Any) -> None:
        """Close the connection once its last bytes are taken, or C{send_timeout} from now."""
        self._closing()
        transport.loseConnection()

    def _closing(self) -> None:
        # A client that takes no more bytes does not hold the connection open.
        if self._closing_since is None and self.send_timeout is not None:
            now = self._closing_since = self.site.reactor.seconds()
            self._arm(now, now + self.send_timeout)

    def _send_timed_out(self) -> None:
        self._stalled_since = self._closing_since = None
        self._warn(
            "send_timeout",
            "A client took no response bytes in {timeout}s; closing its connection",
            timeout=self.send_timeout,
        )
        self.persistent = False
        for request in list(self.requests):
            exchange = request.exchange
            if exchange is not None:
                exchange.client_timed_out(f"the client took no response bytes in {self.send_timeout}s")
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # -- the framing of requests ---------------------------------------------

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Whether the connection stays open after C{request}'s response: not
        after C{close} among the options of any C{Connection} field (see
        L{check_persistence <sentinel_twisted._persistence.check_persistence>}).
        """
        return check_persistence(request, version, self._command)

    def headerReceived(self, line: bytes) -> bool:
        """
        A header line: one with a CR or LF in it (a bare line end the line
        reader left in) is answered 400 and the connection closed, as
        twisted.web does itself from 26.10 on.  Before, a C{Host} value of
        C{example.com}, a bare LF and C{Content-Length: +0} reached the
        request: the agents saw one header where a parser that ends lines
        at LF reads two.
        """
        if b"\n" in line or b"\r" in line:
            self._respondToBadRequestAndDisconnect()
            return False
        return super().headerReceived(line)  # type: ignore[no-any-return,no-untyped-call]

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        # A Transfer-Encoding field that is not "chunked" alone is answered
        # 400, which closes the connection: the request's length cannot be
        # known when its last coding is not chunked, whatever its
        # Content-Length (RFC 9112 section 6.3), and the gateway decodes no
        # other coding.  twisted.web ignored "identity", and took the
        # Content-Length after it.
        if header == b"Transfer-Encoding" and data.lower() != b"chunked":
            return self._failChooseTransferDecoder()
        return super()._maybeChooseTransferDecoder(header, data)  # type: ignore[no-any-return,no-untyped-call]

    def allHeadersReceived(self) -> None:
        """The head is complete: its deadline no longer applies; its body's starts."""
        if self.length != 0 and self.min_body_rate is not None:
            # Before the request is handled: it may be answered at once.
            now = self.site.reactor.seconds()
            self._body_request = self.requests[-1]
            self._body_since = now
            self._body_paused_at = None
            self._arm(now, now + (self.header_timeout or 0.0))
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # The response leaves before the parent closes the connection or
        # replays pipelined data (whose responses come after it).
        if self._outgoing:
            self._send_outgoing()
        # Its body, if any, is no longer awaited (nor the request kept).
        # The parent awaits the next head.
        self._body_request = None
        super().requestDone(request)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._idle_deadline = None
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._outgoing:
            del self._outgoing[:]
        client_left = getattr(getattr(self, "site", None), "client_left", None)
        if client_left is not None:
            client_left()
        super().connectionLost(reason)

    # -- writing at once --------------------------------------------------------
    #
    # A Twisted transport buffers every write until the reactor's next turn
    # and watches the socket for writability meanwhile: per response an
    # extra turn, two epoll_ctl calls, and the head and the body as separate
    # pieces.  On a plain socket whose buffer is empty, a response's bytes
    # are joined and sent at once (one send per response); whatever the
    # socket does not take goes to the transport, which carries on as usual.

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        outgoing = self._outgoing
        if outgoing is None or not isinstance(headers, Headers):
            self._send_outgoing()
            super().writeHeaders(version, code, reason, headers)  # type: ignore[no-untyped-call]
            return
        outgoing += (version, b" ", code, b" ", reason, b"\r\n")
        for name, values in headers.getAllRawHeaders():
            for value in values:
                outgoing += (name, b": ", value, b"\r\n")
        outgoing.append(b"\r\n")
        if not self._holding:
            self._send_outgoing()

    def write(self, data: bytes) -> None:
        outgoing = self._outgoing
        if outgoing is None:
            super().write(data)  # type: ignore[no-untyped-call]
            return
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        outgoing.append(data)
        if not self._holding:
            self._send_outgoing()

    def writeSequence(self, iovec: Any) -> None:
        outgoing = self._outgoing
        if outgoing is None:
            super().writeSequence(iovec)  # type: ignore[no-untyped-call]
            return
        for data in iovec:
            if not isinstance(data, bytes):
                raise TypeError(f"Data must be bytes, not {type(data).__name__}")
            outgoing.append(data)
        if not self._holding:
            self._send_outgoing()

    def loseConnection(self) -> None:
        self._send_outgoing()
        if self.transport is not None:
            self._closing()
        super().loseConnection()

    def _send100Continue(self) -> None:
        # twisted.web calls this for an HTTP/1.1 request with Expect:
        # 100-continue once the request is handled (its exchange started).
        # The 100 Continue is owed, not sent, until the body is wanted: the
        # agents allow the request (see send_continue).  A client that waits
        # for it sends no body they may yet refuse; one answered first has
        # its final response alone (and the connection closes: see
        # GatewayRequest.prepare_answer), as no interim response may follow
        # a final one (RFC 9110 sections 10.1.1, 15.2).
        request = self.requests[-1] if self.requests else None
        if request is None or request.startedWriting or request.finished:
            # Answered at once (a 400, a 413, a 503).
            return
        if self.length == 0:
            # No content to ask for (RFC 9110 section 10.1.1).
            return
        exchange = request.exchange
        if exchange is not None and not exchange.wants_body:
            request.continue_owed = True
            return
        self._send_outgoing()
        super()._send100Continue()  # type: ignore[no-untyped-call]

    def send_continue(self, request: GatewayRequest) -> None:
        """
        Send the C{100 Continue} owed to C{request}, whose body is wanted
        now: unless its final response has begun or its body is in already.
        The body's least rate counts from now, as it would from the end of
        the head of a request that awaits nothing.
        """
        request.continue_owed = False
        transport: Any = self.transport
        if (
            transport is None
            or transport.disconnecting
            or request.startedWriting
            or request.finished
            or request.body_complete
        ):
            return
        # Its wait is over: the idle timeout counts from now.
        self.resetTimeout()
        if request is self._body_request:
            now = self.site.reactor.seconds()
            self._body_since = now
            if self._body_paused_at is not None:
                self._body_paused_at = now
        self._send_outgoing()
        super()._send100Continue()  # type: ignore[no-untyped-call]

    def _send_held(self) -> None:
        """What L{send_after_read <sentinel_twisted.protocol.send_after_read>} calls once the agents' answers are read."""
        self._send_outgoing()

    def _send_outgoing(self) -> None:
        """Send what is held: at once if the transport holds nothing, else through it."""
        outgoing = self._outgoing
        if not outgoing:
            return
        data = b"".join(outgoing)
        del outgoing[:]
        transport: Any = self.transport
        if transport is not None:
            send_now(transport, data)

    # -- heads over the limits: 414 or 431, where twisted.web closes or says 400 --
    #
    # twisted.web counts a head's bytes and headers itself and answers 400
    # past its limits; the answer here is 431, chosen when that answer is
    # due rather than by a check of ours on every line and header.

    def _respondToBadRequestAndDisconnect(self) -> None:
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self._head_too_large(_TOO_LARGE)
            return
        self._send_outgoing()
        super()._respondToBadRequestAndDisconnect()  # type: ignore[no-untyped-call]
        # Nothing after the 400 is parsed.  The reactor may still hand the
        # channel bytes read in the turn that closed the connection (a read
        # event polled with the one whose handling refused the request):
        # twisted.web would parse them on from the refused line, making a
        # request of the rest of a head it answered 400 (shown to the
        # agents and forwarded), or fail on a request line never parsed.
        _stop_parsing(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted.web's own flag (name-mangled): the request line is still
        # awaited, so the line over the limit is that one, and its target
        # is what is too long (RFC 9110 section 15.5.15).
        if getattr(self, "_HTTPChannel__first_line", 0):
            self._head_too_large(_URI_TOO_LONG)
            return
        self._head_too_large(_TOO_LARGE)

    def _head_too_large(self, answer: bytes) -> None:
        self._head_deadline = None
        transport: Any = self.transport
        if transport is None:
            return
        self._send_outgoing()
        _stop_parsing(self)
        transport.write(answer)
        self._close(transport)


def _stop_parsing(channel: Any) -> None:
    """No more requests on C{channel}: whatever else arrives is dropped, unparsed."""
    channel.persistent = False
    channel.dataReceived = channel.lineReceived = _discard


def _closing_answer(status: bytes) -> bytes:
    """A whole response that says C{status} (code and phrase) in its body too, and closes."""
    body = status + b"\n"
    return (
        b"HTTP/1.1 %s\r\nConnection: close\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
    )


_TOO_LARGE = _closing_answer(b"431 Request Header Fields Too Large")
_URI_TOO_LONG = _closing_answer(b"414 URI Too Long")
