# -*- test-case-name: tests.gateway.test_gateway -*-
"""
The gateway on C{twisted.web}: L{GatewayResource} decides each request
through the agents (an L{Exchange} per request) and L{GatewayRequest} lets
it start as soon as the request headers are in, so that the request body
streams instead of being buffered by C{twisted.web} first.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from .exchange import Exchange, Gateway

__all__ = ["GatewayRequest", "GatewayResource", "GatewaySite"]

log = Logger(namespace="sentinel_twisted.gateway")


def _discard(data: bytes) -> None:
    pass


class GatewayRequest(server.Request):
    """
    A request whose body is handed to its exchange as it arrives.

    C{twisted.web} renders a resource once the whole body is in; for a
    request with a body this class renders at the end of the headers and
    passes each piece of body on (HTTP/1.1 channels only; other channels,
    and bodiless requests, take the usual path).

    @ivar streaming: the body is being streamed to the exchange.
    @ivar body_length: the declared body length (C{None}: chunked).
    """

    #: Responses keep the upstream's Content-Type, or have none.
    defaultContentType = None
    exchange: Exchange | None = None
    streaming = False
    body_complete = True
    body_length: int | None = 0
    client_gone = False
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
            self.process()  # type: ignore[no-untyped-call]
        finally:
            self._in_parser = False

    def handleContentChunk(self, data: bytes) -> None:
        if not self.streaming:
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]
            return
        exchange = self.exchange
        if exchange is not None:
            self._in_parser = True
            try:
                exchange.request_body_received(data)
            finally:
                self._in_parser = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.streaming:
            content = self.content
            self.body_length = content.tell() if content is not None else 0
            super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]
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

    def finish(self) -> None:
        super().finish()  # type: ignore[no-untyped-call]
        exchange = self.exchange
        if exchange is not None:
            exchange.release()

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

    def resume_body(self) -> None:
        transport: Any = self.transport
        if transport is not None and not self.client_gone:
            transport.resumeProducing()

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
    """Every path: one L{Exchange}."""

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


class GatewaySite(server.Site):
    """A site of L{GatewayRequest}s; an access log only when a path is given."""

    noisy = False

    def __init__(self, gateway: Gateway, access_log: str | None = None, **kwargs: Any) -> None:
        super().__init__(GatewayResource(gateway), logPath=access_log, **kwargs)  # type: ignore[no-untyped-call]
        self.requestFactory = GatewayRequest
        self.gateway = gateway
        self._access_log = access_log is not None

    def log(self, request: Any) -> None:
        if self._access_log:
            super().log(request)
