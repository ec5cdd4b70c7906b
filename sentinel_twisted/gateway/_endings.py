# -*- test-case-name: tests.gateway.test_gateway -*-
"""
How an exchange ends: an agent that cannot answer (C{503}, or left out
with C{fail_open}), a denial, an answer of the gateway's own (C{413},
C{500}, C{503}), a client cut off mid-response or gone, the shutdown, and
RequestComplete for the agents that list it.  L{Exchange
<sentinel_twisted.gateway.exchange.Exchange>} is the rest: an exchange's
start, its header rounds, bodies, upstream and response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .. import messages as m
from .._peertext import peer_text
from .body import Pressure
from .decisions import (
    PROTECTED_RESPONSE_HEADERS,
    apply_header_ops,
    decision_problem,
    denial_for,
    ignored_header,
    reason_phrase,
    status_text,
    unusable_value,
)
from .shared import Gateway, failure_reason

if TYPE_CHECKING:
    from ._responding import _ResponseProducer
    from .body import BodySink
    from .exchange import AgentSlot
    from .resource import GatewayRequest

#: The gateway's logger (this is its endings' part).
log = Logger(namespace="sentinel_twisted.gateway")

_REQUEST_COMPLETE = m.EventType.REQUEST_COMPLETE

_CLIENT_DISCONNECT = m.CancelReason.CLIENT_DISCONNECT
_BLOCKED = m.CancelReason.BLOCKED_BY_AGENT
_MANUAL = m.CancelReason.MANUAL

#: The body of the 503 answered while the gateway shuts down.
SHUTTING_DOWN = "The gateway is shutting down."

#: The C{error} of the RequestComplete of a request whose client closed its
#: connection before the response was complete.
CLIENT_GONE = "the client closed its connection before the response was complete"

#: Characters of an agent id a log line quotes (as the listener's lines do).
_ID_IN_LOG = 64


# Phases of an exchange.
_DECIDING = 0  # request headers sent, answers awaited
_FORWARDING = 1  # upstream request under way, request body streaming
_RESPONSE_DECIDING = 2  # response headers shown to agents
_RESPONDING = 3  # response body streaming to the client
_OVER = 4


class Endings:
    """
    The endings of L{Exchange <sentinel_twisted.gateway.exchange.Exchange>},
    which sets every attribute below (in its constructor or as a class
    default).
    """

    gateway: Gateway
    request: GatewayRequest
    correlation_id: str
    slots: Sequence[AgentSlot]
    _phase: int
    _started_at: float
    _body_in: int
    _request_pressure: Pressure | None
    _body_head: BodySink | None
    _response_head: BodySink | None
    _response_pressure: Pressure | None
    _head_written: bool
    _producer: _ResponseProducer | None
    _status: int
    _response_bytes: int
    _error: str | None
    _decision: str | None
    _forwarded: bool
    _no_complete: bool

    if TYPE_CHECKING:

        def _cancel_pending(self, reason: int) -> None: ...

        def _abort_upstream(self) -> None: ...

    def _agent_failed(self, slot: AgentSlot, failure: Failure) -> bool:
        """
        An agent could not answer.  Fail open: leave it out (C{True}).
        Fail closed: C{503} at once (C{False}).
        """
        reason = failure_reason(failure)
        metrics = self.gateway.metrics
        metrics.agent_failed(slot.agent_id, reason)
        if reason == "timeout":
            metrics.cancel_sent(slot.agent_id, m.CancelReason.TIMEOUT)
        if self.gateway.fail_open:
            slot.skipped = reason
            metrics.fail_open_pass(slot.agent_id, reason)
            self.gateway.log_limiter.info(
                log,
                f"agent-{reason}-pass",
                "Agent {agent_id} {reason} on {cid}; request goes on (fail-open)",
                agent_id=peer_text(slot.agent_id, _ID_IN_LOG),
                reason=reason,
                cid=self.correlation_id,
            )
            return True
        self.gateway.log_limiter.warn(
            log,
            f"agent-{reason}-503",
            "Agent {agent_id} {reason} on {cid}: {error}; answering 503",
            agent_id=peer_text(slot.agent_id, _ID_IN_LOG),
            reason=reason,
            cid=self.correlation_id,
            # The error may quote the agent's answer (an unknown decision).
            error=peer_text(failure.value),
        )
        self._error = f"agent {slot.agent_id}: {failure.value}"
        if self._head_written:
            self._cancel_pending(_MANUAL)
            self._abort_client(self._error)
            return False
        self._cancel_pending(_MANUAL)
        self._unavailable()
        return False

    def internal_error(self, failure: Failure) -> None:
        """
        A bug of ours: logged with its traceback; the client gets C{500}
        (or a closed connection if the response had started), never a hang.
        """
        log.failure(
            "Gateway failed on {method} {uri}",
            failure,
            method=_loggable(self.request.method),
            uri=_loggable(self.request.uri),
        )
        if self._phase == _OVER:
            return
        self._decision = "error"
        self._cancel_pending(_MANUAL)
        if self._head_written:
            self._abort_client("internal error")
        else:
            self._respond_plain(500)

    def shut_down(self) -> None:
        """The shutdown grace is over: answer C{503} now, or cut a started response off."""
        self.gateway.exchanges.discard(self)
        if self._phase == _OVER:
            return
        self._error = SHUTTING_DOWN
        # Nothing more goes to the agents: they are about to be disconnected.
        self._no_complete = True
        self._cancel_pending(m.CancelReason.PROXY_SHUTDOWN)
        if self._head_written:
            self._abort_client("the gateway is shutting down")
        else:
            self._unavailable(SHUTTING_DOWN)

    def _unavailable(self, detail: str | None = None) -> None:
        self._decision = "unavailable"
        self._respond_plain(503, detail)

    def _too_large(self) -> None:
        self._decision = "too_large"
        self._cancel_pending(_MANUAL)
        self._respond_plain(413)

    def _deny(self, slot: AgentSlot, answer: m.AgentResponse) -> None:
        denial = denial_for(answer.decision, self.gateway.challenge_status)
        problem = decision_problem(answer.decision)
        if problem is not None:
            # Status 0 or a 200 "block" would go out as such, a redirect
            # to a URL with a NUL or a line end as another Location: the
            # agent is broken, and the client hears that much.
            self.gateway.log_limiter.warn(
                log,
                "decision_status",
                "Agent {agent_id} answered {label} with {problem}; answering 500",
                agent_id=peer_text(slot.agent_id, _ID_IN_LOG),
                label=denial.label,
                problem=peer_text(problem),
            )
            self.gateway.metrics.agent_failed(slot.agent_id, "invalid_answer")
            self._decision = "error"
            self._cancel_pending(_MANUAL)
            if self._head_written:
                self._abort_client(f"agent {slot.agent_id} answered an invalid {denial.label}: {problem}")
            else:
                self._respond_plain(500)
            return
        self._decision = denial.label
        self._cancel_pending(_BLOCKED)
        if self._head_written:
            self._abort_client(f"agent {slot.agent_id} answered {denial.label} after the response started")
            return
        headers = Headers()
        for name, value in denial.headers:
            if ignored_header(name, slot.agent_id, PROTECTED_RESPONSE_HEADERS, self.gateway.log_limiter):
                continue
            try:
                problem = unusable_value(value)
                if problem is not None:
                    raise ValueError(problem)
                headers.setRawHeaders(name, [value])
            except (ValueError, TypeError) as e:
                self.gateway.log_limiter.warn(
                    log,
                    "unusable_header",
                    "Agent {agent_id} sent an unusable header {name!r}: {error}",
                    agent_id=peer_text(slot.agent_id),
                    name=peer_text(name),
                    error=peer_text(str(e)),
                )
        if answer.response_headers:
            apply_header_ops(
                headers, answer.response_headers, slot.agent_id, limiter=self.gateway.log_limiter
            )
        self._respond(denial.code, headers, denial.body)

    def _respond_plain(self, code: int, detail: str | None = None) -> None:
        headers = Headers({b"Content-Type": [b"text/plain; charset=utf-8"]})
        text = status_text(code) + "\n"
        if detail:
            text += detail + "\n"
        self._respond(code, headers, text.encode())

    def _respond(self, code: int, headers: Headers, body: bytes) -> None:
        """Answer the client ourselves (a denial or an error) and end the exchange."""
        if self._phase == _OVER:
            return
        if self._head_written:
            self._abort_client("cannot change a response already started")
            return
        request = self.request
        gone = request.finished or request.client_gone
        if not gone:
            self._status = code
        self._over()
        self._abort_upstream()
        if gone:
            return
        kept = request.responseHeaders
        date = kept.getRawHeaders(b"date")
        if date and not headers.hasHeader(b"date"):
            headers.setRawHeaders(b"Date", date)
        closing = kept.getRawHeaders(b"connection")
        if closing:
            # The close the channel decided on (see check_persistence) is
            # said in the response, whatever an agent's headers say.
            headers.setRawHeaders(b"Connection", closing)
        request.responseHeaders = headers
        headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        if self.gateway.stopping:
            request.close_after_response()
        request.setResponseCode(code, reason_phrase(code))
        request.prepare_answer()
        if body:
            self._response_bytes = len(body)
            request.write(body)
        self._finish()

    def _over(self) -> None:
        """The exchange is decided for good: count it once, stop holding bytes."""
        if self._phase != _OVER:
            self._phase = _OVER
            gateway = self.gateway
            gateway.metrics.request_decided(
                self._decision or "client_closed",
                self._status,
                # The reactor's clock is the wall clock: never below 0.
                max(gateway.clock.seconds() - self._started_at, 0.0),
            )
        if self._request_pressure is not None:
            self._request_pressure.release()

    def _finish(self) -> None:
        self._over()
        request = self.request
        if self._producer is not None:
            self._producer = None
            request.unregisterProducer()  # type: ignore[no-untyped-call]
        if request.client_gone or request.finished:
            return
        request.end_response()
        self._request_complete(None)

    def _abort_client(self, why: str) -> None:
        self._over()
        self._abort_upstream()
        # One a request, and an agent that blocks mid-response (or a client
        # that stops reading) can make one each: limited.
        self.gateway.log_limiter.info(
            log, "client-cut", "Closing the client connection mid-response: {why}", why=peer_text(why)
        )
        request = self.request
        if self._producer is not None:
            self._producer = None
            request.unregisterProducer()  # type: ignore[no-untyped-call]
        request.abort_connection()
        # The agents learn the request ended, and why, as for any other.
        self._request_complete(why)

    def client_timed_out(self, cut: str | None = None) -> None:
        """
        The client was too slow: C{408}, or with C{cut} (or once the
        response has started) the connection is cut, C{cut} saying why.
        The agents are told as when a client goes (reason 0), and the
        upstream request is aborted.
        """
        if self._phase == _OVER:
            return
        self._decision = "client_timeout"
        self._cancel_pending(_CLIENT_DISCONNECT)
        if cut is None and not self._head_written:
            self._respond_plain(408)
        else:
            self._abort_client(cut or "the client sent its request body too slowly")

    def client_gone(self) -> None:
        """The client disconnected before the response was complete."""
        if self._phase == _OVER:
            return
        if self._decision is None:
            self._decision = "client_closed"
        self._over()
        self._cancel_pending(_CLIENT_DISCONNECT)
        self._abort_upstream()
        self._producer = None
        self._request_complete(CLIENT_GONE)

    def release(self) -> None:
        """
        The request is finished or its client is gone: drop the links that
        lead back to this exchange (the request's, the body stages').

        Nothing calls in through them any more, and without them reference
        counting frees the request and all it holds at once; with them each
        request would leave some twenty objects of cyclic garbage for the
        collector, which costs the gateway a tenth of its time under load.
        """
        self.gateway.exchanges.discard(self)
        self.request.exchange = None
        self._body_head = None
        self._response_head = None
        self._request_pressure = None
        self._response_pressure = None
        for slot in self.slots:
            slot.stage = None

    def _request_complete(self, error: str | None) -> None:
        """
        Tell the agents that declared RequestComplete that the request is
        over, once, however it ended: answered, cut off mid-response
        (C{error} says why) or left by its client (L{CLIENT_GONE}); not
        when the gateway shuts down, as their connections are closing.
        Only the agents that were sent its RequestHeaders are told: one
        picked for a request refused before it was asked (C{413} on its
        C{Content-Length}, another agent unavailable) never saw it.
        """
        if not self.slots or self._no_complete:
            return
        self._no_complete = True
        event: m.RequestCompleteEvent | None = None
        for slot in self.slots:
            if not slot.asked or _REQUEST_COMPLETE not in slot.events:
                continue
            connection = slot.connection
            if connection.is_closed:
                continue
            if event is None:
                event = m.RequestCompleteEvent(
                    correlation_id=self.correlation_id,
                    status=self._status,
                    duration_ms=int((self.gateway.clock.seconds() - self._started_at) * 1000),
                    request_body_size=self._body_in,
                    response_body_size=self._response_bytes,
                    upstream_attempts=1 if self._forwarded else 0,
                    error=error or self._error,
                )
            connection.send_event_with(event, _complete_answered, _ignore_complete, slot.agent_id, self.correlation_id)


def _complete_answered(answer: m.AgentResponse, agent_id: str) -> None:
    # RequestComplete is a notification: its answer changes nothing.
    pass


def _ignore_complete(failure: Failure, agent_id: str) -> None:
    # RequestComplete is a notification: its fate never reaches the client.
    log.debug(
        "RequestComplete to agent {agent_id} not answered: {error}",
        agent_id=peer_text(agent_id, _ID_IN_LOG),
        error=peer_text(failure.value),
    )


#: The longest request method or target a log line quotes in full.
_LOGGED_TEXT_MAX = 256


def _loggable(data: bytes) -> str:
    """
    Bytes from a client as log text: C{GET /x}, not C{b'GET' b'/x'}.  Bytes
    that are not printable ASCII are escaped (C{\\xhh}); past C{_LOGGED_TEXT_MAX}
    characters the text is cut short.
    """
    text = data.decode("latin-1")
    if not (text.isascii() and text.isprintable()):
        text = "".join(c if c.isascii() and c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    if len(text) > _LOGGED_TEXT_MAX:
        text = text[:_LOGGED_TEXT_MAX] + "..."
    return text
