# -*- test-case-name: tests.gateway.test_gateway -*-
"""
The gateway on C{twisted.web}: L{GatewayResource} decides each request
through the agents (an L{Exchange} per request) and L{GatewayRequest} lets
it start as soon as the request headers are in, so that the request body
streams instead of being buffered by C{twisted.web} first.  The client
connection itself is L{GatewayChannel} (L{sentinel_twisted.gateway.channel}).
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from ..endpoints import RefusedConnection
from ..proxy.protocol import send_after_read
from .channel import GatewayChannel, _discard
from .exchange import Exchange
from .shared import Gateway

__all__ = ["GatewayChannel", "GatewayRequest", "GatewayResource", "GatewaySite", "combined_log_line"]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")


_date_second = -1
_date = b""


def _http_date() -> bytes:
    """The Date header's value now (as twisted.web formats it), made once a second."""
    global _date_second, _date
    now = time.time()
    second = int(now)
    if second != _date_second:
        _date = http.datetimeToString(now)
        _date_second = second
    return _date


class GatewayRequest(server.Request):
    """
    A request whose body is handed to its exchange as it arrives.

    C{twisted.web} renders a resource once the whole body is in; for a
    request with a body this class renders at the end of the headers and
    passes each piece of body on (HTTP/1.1 channels only; other channels,
    and bodiless requests, take the usual path).

    @ivar streaming: the body is being streamed to the exchange.
    @ivar body_length: the declared body length (C{None}: chunked).
    @cvar exchange: the request's exchange once it has one, else C{None}.
    @cvar body_complete: the whole body has arrived.
    @cvar client_gone: the client's connection was lost.
    @cvar body_received: bytes of the streamed body received so far.
    @cvar continue_owed: the request expects C{100-continue}, and its
        C{100 Continue} waits until its body is wanted (L{send_continue}).
    @ivar method: the request method (as C{twisted.web} sets it).
    @ivar uri: the request target, as received.
    @ivar clientproto: the HTTP version of the request line.
    @ivar path: the target without its query.
    @ivar site: the gateway's site (as twisted.web sets it).
    @ivar prepath: always empty: the gateway's one resource takes every path.
    @ivar postpath: always empty, likewise.
    @ivar args: query arguments; always empty (the gateway does not parse
        them: the query reaches agents and upstream as it was sent).
    """

    #: Responses keep the upstream's Content-Type, or have none.
    defaultContentType = None
    exchange: Exchange | None = None
    streaming = False
    body_complete = True
    body_length: int | None = 0
    client_gone = False
    body_received = 0
    continue_owed = False
    _in_parser = False
    _closing = False

    # -- the channel's calls ------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        command = getattr(channel, "_command", None)
        if length == 0 or command is None:
            super().gotLength(length)  # type: ignore[no-untyped-call]
            return
        self.streaming = True
        self.body_complete = False
        self.body_length = length
        self.method = command
        self.uri = channel._path
        self.clientproto = channel._version
        self.path = self.uri.split(b"?", 1)[0]
        self.args = {}
        self._in_parser = True
        try:
            self.process()
        finally:
            self._in_parser = False

    def handleContentChunk(self, data: bytes) -> None:
        if not self.streaming:
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]
            return
        self.body_received += len(data)
        exchange = self.exchange
        if exchange is not None:
            self._in_parser = True
            try:
                exchange.request_body_received(data)
            finally:
                self._in_parser = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.streaming:
            # twisted.web's requestReceived, less the parsing of query
            # arguments and form bodies that nobody here reads (the body of
            # a request that comes this way is empty).
            content = self.content
            if content is not None:
                self.body_length = content.tell()
                content.seek(0, 0)
            else:
                self.body_length = 0
            self.args = {}
            self.method, self.uri = command, path
            self.clientproto = version
            self.path = path.split(b"?", 1)[0]
            self.process()
            return
        self.body_complete = True
        exchange = self.exchange
        if exchange is not None:
            exchange.request_body_finished()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.client_gone = True
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        exchange = self.exchange
        if exchange is not None:
            exchange.client_gone()
            exchange.release()

    def write(self, data: bytes) -> None:
        # The head and the first piece of body leave together (see
        # GatewayChannel.writeHeaders).
        channel: Any = getattr(self, "channel", None)
        if channel is None or channel._outgoing is None:
            super().write(data)  # type: ignore[no-untyped-call]
            return
        channel._holding += 1
        try:
            super().write(data)  # type: ignore[no-untyped-call]
        finally:
            channel._holding -= 1
            if not channel._holding and channel._outgoing and not send_after_read(channel):
                channel._send_outgoing()

    def finish(self) -> None:
        channel: Any = getattr(self, "channel", None)
        if channel is None or channel._outgoing is None:
            super().finish()  # type: ignore[no-untyped-call]
        else:
            # A chunked body's last chunk leaves with what came before it.
            channel._holding += 1
            try:
                super().finish()  # type: ignore[no-untyped-call]
            finally:
                channel._holding -= 1
                if not channel._holding and channel._outgoing:
                    channel._send_outgoing()
        exchange = self.exchange
        if exchange is not None:
            exchange.release()

    def process(self) -> None:
        # twisted.web's process, less what a gateway never reads: its one
        # resource takes every path (no traversal, no prepath or postpath),
        # and the Server header never leaves (a proxy passes the upstream's
        # own, or none).  Date is formatted once a second.
        channel: Any = self.channel
        site = channel.site
        self.site = site
        self.responseHeaders._rawHeaders[b"Date"] = [_http_date()]
        self.prepath = []
        self.postpath = []
        if self.path == b"*":
            self._handleStar()
            return
        try:
            self.render(site.resource)  # type: ignore[no-untyped-call]
        except BaseException:
            self.processingFailed(Failure())  # type: ignore[no-untyped-call]

    def _handleStar(self) -> None:
        # twisted.web answers "OPTIONS *" itself (and "GET *" with 405);
        # here the asterisk target is decided like any other (the
        # exchange refuses it but for OPTIONS) and forwarded as "*".
        try:
            site: Any = self.site
            self.render(site.getResourceFor(self))  # type: ignore[no-untyped-call]
        except Exception:
            self.processingFailed(Failure())  # type: ignore[no-untyped-call]

    # -- for the exchange ---------------------------------------------------------------

    @property
    def secure(self) -> bool:
        """Whether the client connection is TLS (asked once per connection)."""
        channel: Any = self.channel
        secure = getattr(channel, "_sentinel_secure", None)
        if secure is None:
            secure = channel._sentinel_secure = bool(self.isSecure())  # type: ignore[no-untyped-call]
        return bool(secure)

    def pause_body(self) -> None:
        """Stop reading the client (the body is arriving faster than it leaves)."""
        transport: Any = self.transport
        if transport is not None and not self.body_complete:
            transport.pauseProducing()
            paused = getattr(self.channel, "body_paused", None)
            if paused is not None:
                paused()

    def resume_body(self) -> None:
        """Read the client again (the body has drained)."""
        transport: Any = self.transport
        if transport is not None and not self.client_gone:
            transport.resumeProducing()
            resumed = getattr(self.channel, "body_resumed", None)
            if resumed is not None:
                resumed()

    def send_continue(self) -> None:
        """
        The request is allowed, its body wanted: the C{100 Continue} owed to
        its C{Expect: 100-continue} leaves now (unless its final response
        has begun, or its body is in already).
        """
        channel: Any = self.channel
        if channel is not None:
            channel.send_continue(self)
        else:
            self.continue_owed = False

    def prepare_answer(self) -> None:
        """
        Before answering a request whose body is still arriving: the
        connection will close after the response, and the rest of the body
        is discarded unread.
        """
        if self.body_complete or self._closing:
            return
        self._closing = True
        self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        channel: Any = self.channel
        channel.persistent = False
        # Like twisted.web's own handling of data after a last request.
        channel.dataReceived = _discard

    def close_after_response(self) -> None:
        """The connection closes once this response is sent."""
        self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        channel: Any = self.channel
        if channel is not None:
            channel.persistent = False

    def end_response(self) -> None:
        """
        Finish the response.  While the channel is still parsing this
        request's body, finishing waits for the next reactor turn: the
        channel must not lose its current request in the middle of a call.
        """
        if self._in_parser and not self.body_complete:
            from twisted.internet import reactor

            reactor.callLater(0, self._finish_later)
            return
        self.finish()

    def _finish_later(self) -> None:
        if not self.finished and not self.client_gone:
            self.finish()

    def abort_connection(self) -> None:
        """Drop the client connection (a response that cannot be completed)."""
        transport = self.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                transport.loseConnection()


class GatewayResource(Resource):
    """
    Every path: one L{Exchange}.

    @cvar isLeaf: C{True}: the resource takes every path itself.
    @ivar gateway: what its exchanges share.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gateway = gateway

    def render(self, request: Any) -> Any:
        exchange = Exchange(self.gateway, request)
        try:
            exchange.start()
        except Exception:
            exchange.internal_error(Failure())
        return server.NOT_DONE_YET


def _quoted(value: bytes | str) -> str:
    """Text for between double quotes in an access log line (C{"} and C{\\} escaped)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.replace("\\", "\\\\").replace('"', '\\"')
    if not (value.isascii() and value.isprintable()):
        value = "".join(c if c.isascii() and c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    return value


def combined_log_line(timestamp: str, request: Any) -> str:
    """
    One access log line in the combined log format of Apache and nginx,
    which log analysers read as it is::

        192.0.2.7 - - [02/Dec/2026:00:53:54 +0000] "GET /x?a=1 HTTP/1.1" 200 512 "-" "curl/8.5.0"

    (Twisted's own format puts the client address in quotes.)  An
    L{twisted.web.iweb.IAccessLogFormatter}.
    """
    address = request.getClientAddress()
    host = getattr(address, "host", None) or "-"
    line = f"{_quoted(request.method)} {_quoted(request.uri)} {_quoted(request.clientproto)}"
    referer = _quoted(request.getHeader(b"referer") or b"-")
    agent = _quoted(request.getHeader(b"user-agent") or b"-")
    size = request.sentLength or "-"
    return f'{host} - - {timestamp} "{line}" {request.code:d} {size} "{referer}" "{agent}"'


class GatewaySite(server.Site):
    """
    A site of L{GatewayRequest}s over L{GatewayChannel}s, holding at most
    C{max_client_connections} clients; an access log (owner-only, in the
    combined log format: L{combined_log_line}) only when a path is given.

    @cvar noisy: C{False}: no log line for each connection.
    @ivar requestFactory: L{GatewayRequest}, which streams bodies.
    @ivar gateway: what its exchanges share.
    @ivar header_timeout: seconds a client has to send a whole request head.
    @ivar min_body_rate: the least average rate of a request body (bytes a
        second, after a grace of C{header_timeout}).
    @ivar send_timeout: seconds a client has to take the response bytes
        buffered for it.
    @ivar max_clients: the most client connections held at once.
    @ivar clients: client connections open now.
    """

    noisy = False
    protocol = GatewayChannel  # type: ignore[assignment]

    def __init__(self, gateway: Gateway, access_log: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", combined_log_line)
        super().__init__(GatewayResource(gateway), logPath=access_log, **kwargs)  # type: ignore[no-untyped-call]
        self.requestFactory = GatewayRequest
        self.gateway = gateway
        self._access_log = access_log is not None
        config = gateway.config
        self.header_timeout = config.header_timeout
        self.min_body_rate = config.min_body_rate
        self.send_timeout = config.send_timeout
        self.max_clients = config.max_client_connections
        self.clients = 0

    def acceptableProtocols(self) -> list[bytes]:
        """
        HTTP/1.1 alone, for TLS to offer (ALPN): L{GatewayChannel} speaks no
        HTTP/2, which Twisted's C{Site} offers when C{h2} is installed.
        """
        return [b"http/1.1"]

    def buildProtocol(self, addr: Any) -> Any:
        if self.clients >= self.max_clients:
            self.gateway.log_limiter.warn(
                log,
                "client_limit",
                "{count} client connections (--max-client-connections); closing new ones",
                count=self.clients,
            )
            return RefusedConnection()
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if channel is not None:
            self.clients += 1
            channel.header_timeout = self.header_timeout
            channel.min_body_rate = self.min_body_rate
            channel.send_timeout = self.send_timeout
        return channel

    def client_left(self) -> None:
        """A client connection closed: one more may be taken."""
        self.clients -= 1

    def _openLogFile(self, path: str | bytes) -> Any:
        # Request lines name clients and paths: owner-only, like the sockets.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", 1, newline="\n")

    def log(self, request: Any) -> None:
        if self._access_log:
            super().log(request)
