# -*- test-case-name: tests.gateway.test_channel -*-
"""
L{GatewayChannel}: one client connection of the gateway.  An HTTP/1.1
channel of C{twisted.web} with a deadline for each request head, an idle
timeout kept as one timer per connection, a clear C{431} for a head that is
too large, and responses that leave in one send on a plain socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from .._sending import send_now, writes_through

if TYPE_CHECKING:
    from .resource import GatewaySite

__all__ = ["GatewayChannel"]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")


def _discard(data: bytes) -> None:
    pass


class GatewayChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection with a deadline for each request head and a
    clear answer to a head that is too large.

    The deadline runs whenever a request head is awaited: from the
    connection's start, and from the end of each response on a kept-alive
    connection, until the head's last line.  A client that has sent part of
    a head by then gets C{408}; an idle one is closed without a word.

    @cvar header_timeout: seconds a client has to send a whole request head;
        C{None}: no limit.
    @ivar timeOut: twisted.web's idle timeout: seconds without a read, while
        no request is being handled, before the connection is closed;
        C{None} while a request is handled.
    @ivar persistent: whether the connection stays open after the response
        (C{False} once it is being closed).
    """

    header_timeout: float | None = None
    #: Set by L{GatewaySite.buildProtocol <sentinel_twisted.gateway.resource.GatewaySite.buildProtocol>}.
    site: GatewaySite
    # When the awaited head is due (reactor seconds); None: no head awaited.
    # One timer per connection checks it, instead of a timer per request:
    # it re-arms itself for what is left, and lapses when nothing is due.
    _head_deadline: float | None = None
    _head_timer: IDelayedCall | None = None
    _head_started = False
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
        if writes_through(transport):
            self._outgoing = []
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._await_head()

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
        # head has started.
        if self._idle_deadline is not None:
            self._idle_deadline = self.site.reactor.seconds() + self.timeOut  # type: ignore[operator]
        if self._head_deadline is not None:
            self._head_started = True

    def _check_idle(self) -> None:
        self._idle_timer = None
        deadline = self._idle_deadline
        if deadline is None:
            return
        left = deadline - self.site.reactor.seconds()
        if left > 0:
            self._idle_timer = self.callLater(left, self._check_idle)  # type: ignore[no-untyped-call]
            return
        self._idle_deadline = None
        self.timeoutConnection()  # type: ignore[no-untyped-call]

    def _await_head(self) -> None:
        timeout = self.header_timeout
        if timeout and self._head_deadline is None:
            self._head_started = False
            self._head_deadline = self.site.reactor.seconds() + timeout
            if self._head_timer is None:
                self._head_timer = self.callLater(timeout, self._check_head)  # type: ignore[no-untyped-call]

    def _stop_head_timer(self) -> None:
        self._head_deadline = None
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check_head(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return
        left = deadline - self.site.reactor.seconds()
        if left > 0:
            self._head_timer = self.callLater(left, self._check_head)  # type: ignore[no-untyped-call]
            return
        self._head_deadline = None
        transport: Any = self.transport
        if transport is None:
            return
        self._send_outgoing()
        if self._head_started:
            self.site.gateway.log_limiter.warn(
                log,
                "head_timeout",
                "A client sent no complete request head in {timeout}s; answering 408",
                timeout=self.header_timeout,
            )
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            )
        self.persistent = False
        transport.loseConnection()

    def allHeadersReceived(self) -> None:
        """The head is complete: its deadline no longer applies."""
        self._head_deadline = None
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Any) -> None:
        # The response leaves before the parent closes the connection or
        # replays pipelined data (whose responses come after it).
        if self._outgoing:
            self._send_outgoing()
        # Before the parent replays pipelined data: that may hold the next
        # head already, whose end stops this timer again.
        if self.persistent:
            self._await_head()
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._stop_head_timer()
        self._idle_deadline = None
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._outgoing:
            del self._outgoing[:]
        client_left = getattr(getattr(self, "site", None), "client_left", None)
        if client_left is not None:
            client_left()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

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
        super().loseConnection()  # type: ignore[no-untyped-call]

    def _send100Continue(self) -> None:
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

    # -- heads over the limits: 431, where twisted.web closes or says 400 --
    #
    # twisted.web counts a head's bytes and headers itself and answers 400
    # past its limits; the answer here is 431, chosen when that answer is
    # due rather than by a check of ours on every line and header.

    def _respondToBadRequestAndDisconnect(self) -> None:
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self._head_too_large()
            return
        self._send_outgoing()
        super()._respondToBadRequestAndDisconnect()  # type: ignore[no-untyped-call]

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large()

    def _head_too_large(self) -> None:
        self._stop_head_timer()
        transport: Any = self.transport
        if transport is None:
            return
        self._send_outgoing()
        self.persistent = False
        _stop_parsing(self)
        transport.write(_TOO_LARGE)
        transport.loseConnection()


def _stop_parsing(channel: Any) -> None:
    """No more parsing: whatever else arrives on C{channel} is dropped."""
    channel.dataReceived = channel.lineReceived = _discard


_TOO_LARGE_BODY = b"431 Request Header Fields Too Large\n"
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY)
)
