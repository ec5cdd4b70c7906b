# -*- test-case-name: tests.gateway.test_gateway -*-
"""
The response side of an exchange: once the request body is through, the
upstream's response headers are shown to the agents that list
ResponseHeaders, its body streams to the client through the agents that
list ResponseBodyChunk, and a slow client or agent pauses the upstream.
L{Exchange <sentinel_twisted.gateway.exchange.Exchange>} is the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .. import messages as m
from .._peertext import peer_text
from ._endings import _FORWARDING, _RESPONDING, _RESPONSE_DECIDING, _loggable, log
from .body import (
    Answered,
    BodySink,
    Failed,
    Pressure,
    chunk_sizes,
    inspection_chain,
)
from .decisions import apply_header_ops, drop_hop_by_hop, reason_phrase
from .metadata import header_map
from .shared import Gateway
from .upstream import UpstreamResponse, UpstreamTimeout

if TYPE_CHECKING:

    from .exchange import AgentSlot
    from .resource import GatewayRequest

_RESPONSE_HEADERS = m.EventType.RESPONSE_HEADERS
_RESPONSE_BODY = m.EventType.RESPONSE_BODY_CHUNK

_UPSTREAM_ERROR = m.CancelReason.UPSTREAM_ERROR

#: Statuses whose responses have no body, hence no Content-Length.
_NO_BODY = frozenset([204, 304])

#: Bytes one direction of one exchange may hold beyond its chunk sizes
#: before its source is paused.
_SLACK = 256 * 1024


class _ClientWriter:
    """The last stage of the response body: the client."""

    def __init__(self, exchange: Responding) -> None:
        self.exchange = exchange

    def feed(self, data: bytes) -> None:
        self.exchange._client_write(data)

    def end(self) -> None:
        self.exchange._client_end()

    @property
    def busy(self) -> bool:
        """Whether the client's connection asked the gateway to pause."""
        return "client" in self.exchange._upstream_pauses


class _ResponseProducer:
    """Registered with the client request: the client's pace pauses the upstream."""

    def __init__(self, exchange: Responding) -> None:
        self.exchange = exchange

    def pauseProducing(self) -> None:
        self.exchange._pause_upstream("client")

    def resumeProducing(self) -> None:
        self.exchange._resume_upstream("client")

    def stopProducing(self) -> None:
        self.exchange._pause_upstream("client")


class Responding:
    """
    The response side of L{Exchange
    <sentinel_twisted.gateway.exchange.Exchange>}, which sets every
    attribute below (in its constructor or as a class default).
    """

    gateway: Gateway
    request: GatewayRequest
    correlation_id: str
    slots: Sequence[AgentSlot]
    _round: Sequence[AgentSlot]
    _phase: int
    _body_through: bool
    _response: UpstreamResponse | None
    _response_head: BodySink | None
    _response_pressure: Pressure | None
    _upstream_pauses: frozenset[str] | set[str]
    _head_written: bool
    _producer: _ResponseProducer | None
    _status: int
    _response_bytes: int
    _error: str | None
    _drop_length: bool
    _out_headers: Headers

    if TYPE_CHECKING:

        @property
        def is_over(self) -> bool: ...

        def send_to(self, slot: AgentSlot, event: m.Event, answered: Answered, failed: Failed, arg: Any) -> None: ...

        def body_answered(self, slot: AgentSlot, answer: m.AgentResponse) -> bool: ...

        def body_failed(self, slot: AgentSlot, failure: Failure) -> bool: ...

        def internal_error(self, failure: Failure) -> None: ...

        def _header_answered(self, answer: m.AgentResponse, slot: AgentSlot) -> None: ...

        def _header_failed(self, failure: Failure, slot: AgentSlot) -> None: ...

        def _send_round(self, event: m.Event) -> None: ...

        def _cancel_pending(self, reason: int) -> None: ...

        def _respond_plain(self, code: int, detail: str | None = None) -> None: ...

        def _abort_client(self, why: str) -> None: ...

        def _finish(self) -> None: ...

    def _maybe_respond(self) -> None:
        if self._phase != _FORWARDING or self._response is None or not self._body_through:
            return
        response = self._response
        self._phase = _RESPONSE_DECIDING
        headers = drop_hop_by_hop(response.headers)
        if (
            response.length is not None
            and self.request.method != b"HEAD"
            and response.code not in _NO_BODY
        ):
            # twisted.web.client keeps Content-Length out of the headers.
            headers._rawHeaders[b"Content-Length"] = [b"%d" % response.length]
        self._out_headers = headers
        # One pass over the agents: those left out (failing open) see
        # nothing more; the others by the response events they listed.
        body_slots: list[AgentSlot] = []
        header_slots: list[AgentSlot] = []
        for slot in self.slots:
            slot.stage = None
            if slot.skipped is None:
                events = slot.events
                if _RESPONSE_BODY in events:
                    body_slots.append(slot)
                if _RESPONSE_HEADERS in events:
                    header_slots.append(slot)
        # Response body stages, chained in agent order, ending at the client.
        head: BodySink = _ClientWriter(self)
        if body_slots:
            # Inspected bodies may change size: the client gets them chunked
            # (agents are still shown the upstream's length).
            self._drop_length = True
            sizes = chunk_sizes(body_slots)
            pressure = _pressure(
                sizes, lambda: self._pause_upstream("agents"), lambda: self._resume_upstream("agents")
            )
            self._response_pressure = pressure
            head = inspection_chain(
                self,
                body_slots,
                sizes,
                response=True,
                total_size=response.length,
                tail=head,
                pressure=pressure,
                max_size=self.gateway.config.max_replaced_body_size,
            )
        self._response_head = head
        for slot in body_slots:
            if slot.stage is not None and _RESPONSE_HEADERS not in slot.events:
                slot.stage.start()
        if not header_slots:
            self._response_headers_allowed()
            return
        event = m.ResponseHeadersEvent(
            correlation_id=self.correlation_id,
            status=response.code,
            headers=header_map(headers._rawHeaders.items()),
        )
        for slot in header_slots:
            slot.answer = None
        self._round = header_slots
        self._send_round(event)

    def _response_headers_allowed(self) -> None:
        response = self._response
        if response is None:
            return
        self._phase = _RESPONDING
        self._status = response.code
        response.deliver(self)
        if self._phase == _RESPONDING:
            # The body is still coming: from now on a slow client slows the
            # upstream down (a body delivered at once needs no producer).
            self._producer = _ResponseProducer(self)
            self.request.registerProducer(self._producer, True)  # type: ignore[no-untyped-call]

    # ResponseSink
    def response_data(self, data: bytes) -> None:
        """A piece of the upstream's response body."""
        if self._phase != _RESPONDING:
            return
        head = self._response_head
        if head is not None:
            head.feed(data)

    def response_end(self, error: Failure | None) -> None:
        """The upstream's response body ended (C{error} if it broke)."""
        if self._phase != _RESPONDING:
            return
        if error is not None:
            # The upstream connection is gone, or the upstream went quiet
            # for --upstream-timeout while its body was read (an
            # UpstreamTimeout: its connection is aborted already).
            self._response = None
            timeout = error.check(UpstreamTimeout) is not None
            if timeout:
                self._error = f"upstream timed out: {error.getErrorMessage()}"
            else:
                self._error = f"upstream response broke: {error.getErrorMessage()}"
            self.gateway.metrics.upstream_failed("timeout" if timeout else "error")
            self._cancel_pending(_UPSTREAM_ERROR)
            if self._head_written:
                self._abort_client(self._error)
                return
            if timeout:
                self._log_upstream_error("timed out", error.getErrorMessage())
            self._respond_plain(504 if timeout else 502)
            return
        head = self._response_head
        if head is not None:
            head.end()

    def _log_upstream_error(self, what: str, error: str) -> None:
        """
        The line of a request answered 502 or 504 for the upstream: it
        C{what} (timed out, failed).  One a request, while the upstream
        fails: limited.
        """
        self.gateway.log_limiter.info(
            log,
            "upstream-failed",
            "Upstream {what} for {method} {uri}: {error}",
            what=what,
            method=_loggable(self.request.method),
            uri=_loggable(self.request.uri),
            # It may quote what the upstream sent (a status line).
            error=peer_text(error),
        )

    def _pause_upstream(self, why: str) -> None:
        if not self._upstream_pauses and self._response is not None:
            self._response.pause()
        self._upstream_pauses = {*self._upstream_pauses, why}

    def _resume_upstream(self, why: str) -> None:
        pauses = self._upstream_pauses
        if why in pauses:
            self._upstream_pauses = pauses = pauses - {why}
            if not pauses and self._response is not None:
                self._response.resume()
            if why == "client" and self._response_pressure is not None:
                # Stages that waited for the client may send chunks again.
                self._response_pressure.drained()

    def _write_head(self) -> None:
        self._head_written = True
        request = self.request
        response = self._response
        assert response is not None
        # The upstream's headers over twisted.web's Date (not its Server:
        # a proxy passes the upstream's own, or none), then the agents'
        # operations on the result.
        out = request.responseHeaders
        raw = out._rawHeaders
        raw.pop(b"Server", None)
        for name, values in self._out_headers.getAllRawHeaders():
            raw[name] = list(values)
        if self._drop_length:
            raw.pop(b"Content-Length", None)
        for slot in self.slots:
            held = slot.response_ops
            if held is not None and slot.skipped is None:
                ops = [op for kept in held.values() for op in kept]
                apply_header_ops(out, ops, slot.agent_id, limiter=self.gateway.log_limiter)
        request.setResponseCode(response.code, response.phrase or reason_phrase(response.code))

    def _client_write(self, data: bytes) -> None:
        if self._phase != _RESPONDING:
            return
        if not self._head_written:
            self._write_head()
        self._response_bytes += len(data)
        self.request.write(data)

    def _client_end(self) -> None:
        if self._phase != _RESPONDING:
            return
        if not self._head_written:
            self._write_head()
        self._response = None
        self._finish()


def _pressure(chunk_sizes: list[int], pause: Any, resume: Any) -> Pressure:
    """
    Bounds for one direction: room for every stage's chunk plus slack, so
    a stage never waits for bytes its own pause keeps away.
    """
    total = sum(chunk_sizes)
    return Pressure(pause, resume, 2 * total + _SLACK, total + _SLACK // 2)
