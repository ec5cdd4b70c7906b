# -*- test-case-name: tests.gateway.test_gateway -*-
"""
The built-in upstream used when no C{--upstream} is given: every allowed
request is answered C{200} with a JSON description of what an upstream
would have received (method, path, query, the headers after the agents'
header operations) and each agent's decision.
"""

from __future__ import annotations

from typing import Any

import msgspec
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.http_headers import Headers
from zope.interface import implementer

from .metadata import header_map
from .upstream import ForwardRequest, ResponseSink, UpstreamResponse

__all__ = ["EchoUpstream"]

_encoder = msgspec.json.Encoder()


@implementer(IConsumer)
class _Counter:
    """Takes the request body and keeps only its size."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class _EchoResponse(UpstreamResponse):
    def __init__(self, body: bytes) -> None:
        self.code = 200
        self.phrase = b"OK"
        self.headers = headers = Headers()
        headers._rawHeaders = {
            b"Content-Type": [b"application/json"],
            b"Content-Length": [b"%d" % len(body)],
        }
        self.length = len(body)
        self._body = body

    def deliver(self, sink: ResponseSink) -> None:
        body, self._body = self._body, b""
        if body:
            sink.response_data(body)
        sink.response_end(None)


class EchoUpstream:
    """
    The upstream when none is configured: answers every request with a JSON
    description of what would have gone upstream (method, path, query,
    headers, body size and each agent's decision), for trying rules out.

    @cvar shows_decisions: C{True}: the echo shows each agent's decision, so
        the gateway passes them on (L{ForwardRequest.decisions
        <sentinel_twisted.gateway.upstream.ForwardRequest.decisions>}).
    """

    shows_decisions = True

    def describe(self) -> str:
        """C{built-in echo}, for log lines and the status site."""
        return "built-in echo"

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        """Read the request body and answer with the JSON description."""
        counter = _Counter()
        done = request.body.startProducing(counter) if request.body is not None else succeed(None)

        def respond(_: object) -> UpstreamResponse:
            path, _sep, query = request.uri.partition(b"?")
            description = {
                "method": request.method.decode("ascii", "replace"),
                "path": path.decode("utf-8", "replace"),
                "query": query.decode("utf-8", "replace"),
                "headers": header_map(request.headers.getAllRawHeaders()),
                "body_bytes": counter.size,
                "decisions": request.decisions or [],
            }
            return _EchoResponse(_encoder.encode(description) + b"\n")

        result: Deferred[UpstreamResponse] = done.addCallback(respond)
        return result

    def close(self) -> Deferred[None]:
        """Nothing to close."""
        return succeed(None)
