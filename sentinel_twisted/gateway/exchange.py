# -*- test-case-name: tests.gateway.test_gateway -*-
"""
L{Exchange}: one client request on its way through the agents to the
upstream and back.

The order of things:

 1. RequestHeaders goes to every consulted agent at once, over one
    connection per agent picked by the pool (all later events of the
    request to that agent use the same connection and correlation id).
 2. The answers are judged in the agents' order: the first non-allow
    decision wins.  Once all allowed, the request goes upstream with each
    agent's request header operations applied.
 3. Agents that list RequestBodyChunk see the body as it streams (see
    L{sentinel_twisted.gateway.body}); a chunk reaches the upstream only
    after its agents answered it.
 4. Once the request body is through, the upstream's response is shown to
    agents that list ResponseHeaders (same judging), then its body streams
    to the client through agents that list ResponseBodyChunk.
 5. After the response is sent, RequestComplete goes to agents that list it;
    what becomes of it never touches the client.

The request target is parsed once, before anything else (see
L{sentinel_twisted.gateway.target}): the agents are shown, and the upstream
receives, the same bytes; a target, a C{Host} or a header value (not
UTF-8) that cannot be taken is answered C{400} (C{CONNECT}: C{501})
without asking any agent.

An agent that cannot answer (not connected, paused, timed out, gone) ends
the request with C{503} at once, or is left out of it with C{fail_open}.
With no agent to consult at all (none named, none registered) the request
is answered C{503} too, or passes unchecked with C{fail_open}.
A client that goes away cancels (reason 0) whatever agents still decide.

What every exchange shares (L{Gateway}, the metrics sink) is
L{sentinel_twisted.gateway.shared}; its public names are also here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .. import messages as m
from .._peertext import peer_text
from ..errors import AgentProtocolError, InvalidMessage
from ..proxy.connection import AgentConnection, new_correlation_id
from ..proxy.protocol import HOLD_FRAMES_FOR_TURN
from ._endings import (
    _DECIDING,
    _FORWARDING,
    _ID_IN_LOG,
    _OVER,
    _RESPONSE_DECIDING,
    SHUTTING_DOWN,
    Endings,
    _loggable,
)
from ._responding import Responding, _pressure, _ResponseProducer
from .body import (
    Answered,
    BodySink,
    Failed,
    InspectionStage,
    Pressure,
    chunk_sizes,
    inspection_chain,
)
from .decisions import (
    MAX_HEAD_LINES,
    MAX_HEAD_SIZE,
    PROTECTED_REQUEST_HEADERS,
    apply_header_ops,
    decision_label,
    drop_hop_by_hop,
    head_size,
    unusable_value,
)
from .metadata import request_header_map, request_metadata, tls_info
from .shared import Gateway, GatewayMetricsSink, NullMetrics, failure_reason
from .target import BadTarget, RequestTarget, parse_target, valid_host
from .upstream import (
    ForwardRequest,
    StreamingBody,
    UpstreamResponse,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .resource import GatewayRequest

__all__ = ["AgentSlot", "Exchange", "Gateway", "GatewayMetricsSink", "NullMetrics", "failure_reason"]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")

_REQUEST_HEADERS = m.EventType.REQUEST_HEADERS
_REQUEST_BODY = m.EventType.REQUEST_BODY_CHUNK

_UPSTREAM_ERROR = m.CancelReason.UPSTREAM_ERROR
#: An answer allows when its decision is one (AgentResponse.is_allow, without
#: the property's call: this is read per answer).
_ALLOW = m.Allow

#: Headers of the client request the upstream never sees as such.
_NOT_FORWARDED = (b"host", b"content-length", b"expect")

#: The forwarding headers the gateway sets: whatever a client sent under
#: these names is replaced (X-Forwarded-For: appended to) before the agents
#: see the request.
_GATEWAY_FORWARDING = (b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host")
#: ... and the forwarding headers as a WSGI upstream reads any spelling of
#: them (X_Forwarded_Host is its HTTP_X_FORWARDED_HOST too), Forwarded
#: among them: never taken from a client.
_FORWARDING_NAMES = frozenset(
    [b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"]
)

#: A RequestHeaders waits for the end of the reactor's turn, to leave with
#: those of the turn's other client reads (L{HOLD_FRAMES_FOR_TURN}), only
#: while another request is under way: alone, nothing would join it, and the
#: wait costs a timer call per request.
_BATCH_EXCHANGES = 2

_UNDERSCORE = ord("_")

#: The body of the 503 answered when there is no agent to consult.
NO_AGENT = "No agent is available to decide this request."


class AgentSlot:
    """
    One consulted agent within one exchange.

    @ivar agent_id: the agent's id.
    @ivar connection: the agent's connection the request's events go over.
    @ivar events: the event types the agent registered for.
    @ivar stage: its body inspection stage while a body goes through it, else
        C{None}.
    @ivar asked: whether the request's RequestHeaders went to it (only then
        is it told of the request's end, RequestComplete).
    """

    __slots__ = (
        "agent_id",
        "answer",
        "asked",
        "connection",
        "events",
        "_response_ops_count",
        "_response_ops_size",
        "response_ops",
        "skipped",
        "stage",
    )

    def __init__(self, agent_id: str, connection: AgentConnection) -> None:
        self.agent_id = agent_id
        self.connection = connection
        self.events = connection.events
        #: The answer in the current header round.
        self.answer: m.AgentResponse | None = None
        #: Left out after failing (fail-open): its reason.
        self.skipped: str | None = None
        #: Response header operations from its answers so far, by header
        #: name in lower case (see add_response_ops).
        self.response_ops: dict[str, list[m.HeaderOp]] | None = None
        self._response_ops_count = 0
        self._response_ops_size = 0
        self.stage: InspectionStage | None = None
        self.asked = False

    def add_response_ops(self, ops: list[m.HeaderOp]) -> str | None:
        """
        Keep the agent's response header operations for the response, by
        header name: a set or a remove makes what came before it for its
        name moot (an agent may repeat its operations in each answer).
        Returns what is wrong if what is kept is over L{MAX_HEADER_OPS
        <sentinel_twisted.messages.MAX_HEADER_OPS>} operations or
        C{MAX_HEAD_SIZE} bytes of header lines: the agent has failed.
        """
        held = self.response_ops
        if held is None:
            held = self.response_ops = {}
        count = self._response_ops_count
        size = self._response_ops_size
        for op in ops:
            name = op.name.lower()
            kept = held.get(name)
            if kept is not None and _replaces(op):
                count -= len(kept)
                size -= sum(map(_op_size, kept))
                kept = None
            if kept is None:
                held[name] = [op]
            else:
                kept.append(op)
            count += 1
            size += _op_size(op)
        self._response_ops_count = count
        self._response_ops_size = size
        if count > m.MAX_HEADER_OPS or size > MAX_HEAD_SIZE:
            return (
                f"its response header operations come to {count} operations of {size} bytes "
                f"(max: {m.MAX_HEADER_OPS} operations, {MAX_HEAD_SIZE} bytes)"
            )
        return None


#: RFC 9110 section 5.1: a field name is a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _replaces(op: m.HeaderOp) -> bool:
    """
    Whether C{op} makes the operations before it on its header moot: a
    set or a remove, unless it is to be skipped for its value (then the
    header stays as those before it made it: a header removed stays
    removed).
    """
    if _HEADER_NAME.fullmatch(op.name) is None:
        # Not a header name (skipped), though its lower case may be one's:
        # "\u212a" (the Kelvin sign) is a "k" in lower case.
        return False
    if isinstance(op, m.RemoveHeader):
        return True
    return isinstance(op, m.SetHeader) and unusable_value(op.value) is None


def _op_size(op: m.HeaderOp) -> int:
    """The bytes of the header line a header operation stands for."""
    return len(op.name) + 2 + len(getattr(op, "value", ""))


class _RequestTail:
    """The last stage of the request body: the upstream."""

    def __init__(self, exchange: Exchange, body: StreamingBody) -> None:
        self.exchange = exchange
        self.body = body

    def feed(self, data: bytes) -> None:
        self.body.feed(data)

    def end(self) -> None:
        self.body.end()
        self.exchange._request_body_through()

    @property
    def busy(self) -> bool:
        """Whether the upstream has not taken enough of what it was given."""
        return self.body.busy


class Exchange(Responding, Endings):
    """
    One client request; see the module docstring.

    @cvar correlation_id: the id the request's events are sent under (C{""}
        until there is one).
    @cvar slots: the agents consulted, in order (empty until they are chosen).
    @ivar gateway: what every exchange shares.
    @ivar request: the client's request.
    """

    # Defaults as class attributes: most requests never change most of
    # them, and an exchange is made per request.
    correlation_id = ""
    slots: Sequence[AgentSlot] = ()
    _round: Sequence[AgentSlot] = ()
    _body_in = 0
    _max_body: int | None = None
    _request_pressure: Pressure | None = None
    _body_head: BodySink | None = None
    _body: StreamingBody | None = None
    _body_through = False
    _upstream_call: Deferred[UpstreamResponse] | None = None
    _response: UpstreamResponse | None = None
    _response_head: BodySink | None = None
    _response_pressure: Pressure | None = None
    _upstream_pauses: frozenset[str] | set[str] = frozenset()
    _head_written = False
    _producer: _ResponseProducer | None = None
    _status = 0
    _response_bytes = 0
    _error: str | None = None
    _decision: str | None = None
    _forwarded = False
    _forwarded_at = 0.0
    _no_complete = False
    _passed: Sequence[dict[str, Any]] = ()
    _cancelling = False
    _drop_length = False
    _out_headers: Headers
    #: The request target as judged and forwarded (see L{_parse_target}).
    _target = b"/"

    def __init__(self, gateway: Gateway, request: GatewayRequest) -> None:
        self.gateway = gateway
        self.request = request
        self._phase = _DECIDING
        self._started_at = gateway.clock.seconds()
        self._secure = request.secure
        request.exchange = self

    # -- state ------------------------------------------------------------------

    @property
    def is_over(self) -> bool:
        """Whether the request has been answered (or is being cancelled)."""
        return self._phase == _OVER or self._cancelling

    @property
    def wants_body(self) -> bool:
        """Whether the request is allowed, its body wanted (a C{100 Continue} is due)."""
        return self._forwarded and self._phase != _OVER

    @property
    def upstream_answered(self) -> bool:
        """Whether the upstream's response is in (and waits for the request body, if that is still coming)."""
        return self._response is not None

    # -- start --------------------------------------------------------------------

    def start(self) -> None:
        """Begin: pick a connection per agent and send the request headers."""
        request = self.request
        gateway = self.gateway
        if gateway.stopping:
            self._decision = "unavailable"
            self._respond_plain(503, SHUTTING_DOWN)
            return
        gateway.exchanges.add(self)
        try:
            self._target = self._parse_target().target
            self._own_headers()
            agent_ids = self.gateway.agent_ids()
            # Decoded once, strictly, when there are agents to show them:
            # what they see decodes back to the bytes the upstream receives
            # (else 400).
            headers = request_header_map(request.requestHeaders._rawHeaders) if agent_ids else None
        except BadTarget as e:
            self._refuse(e)
            return
        if agent_ids:
            if not self._select(agent_ids):
                return
        elif not self.gateway.fail_open:
            # Fail closed means closed: nobody to ask is no "allow".
            log.debug("No agent registered; answering 503")
            self._unavailable(NO_AGENT)
            return
        slots = self.slots
        length = request.body_length
        if length == 0 and not request.streaming:
            # No body (a GET, or Content-Length: 0).
            self._body_through = True
        else:
            body_slots = [s for s in slots if _REQUEST_BODY in s.events]
            if body_slots:
                limit = min(s.connection.capabilities.limits.max_body_size for s in body_slots)
                self._max_body = limit
                if length is not None and length > limit:
                    self._too_large()
                    return
            self._build_request_body(body_slots, length)
        if slots:
            assert headers is not None  # there were agents to ask
            self._send_request_headers(headers)
            if self._phase == _OVER:
                return
        else:
            self._request_headers_allowed()
            if self._phase == _OVER:
                return
        if not request.streaming:
            content = request.content
            data = b""
            if content is not None and request.body_length:
                data = content.read()
            if data:
                self.request_body_received(data)
            if self._phase != _OVER:
                self.request_body_finished()

    def _parse_target(self) -> RequestTarget:
        """
        The request target and C{Host}, checked once: one C{Host} (none
        only before HTTP/1.1, whatever the target's form: RFC 9112 section
        3.2), a valid C{host[:port]}; an absolute-form target's authority
        agrees with it, and stands for it in an HTTP/1.0 request without
        one.
        """
        request = self.request
        target = parse_target(request.method, request.uri)
        headers = request.requestHeaders
        # getRawHeaders(b"host") without encoding the name again.
        hosts = headers._rawHeaders.get(b"Host") or None
        if hosts is not None and len(hosts) > 1:
            raise BadTarget(400, "more than one Host header")
        if hosts is None and request.clientproto == b"HTTP/1.1":
            raise BadTarget(400, "an HTTP/1.1 request needs a Host header")
        if target.authority is not None:
            if not hosts:
                headers.setRawHeaders(b"Host", [target.authority])
            elif not target.names_host(hosts[0]):
                raise BadTarget(400, "the Host header does not name the request target's host")
        elif hosts and not valid_host(hosts[0]):
            raise BadTarget(400, "the Host header is not a valid host[:port]")
        return target

    def _own_headers(self) -> None:
        """
        Make the request's headers what the agents are shown and the
        upstream receives: names with an C{_} dropped (a WSGI upstream reads
        C{X_User} as C{X-User}, out of the agents' sight; kept with
        C{--allow-underscore-headers}, but for forwarding headers), and the
        forwarding headers the gateway's own: C{Forwarded} removed, the
        client's address appended to C{X-Forwarded-For} (left as the client
        sent it when there is no address: on a UNIX socket, a local front
        proxy), C{X-Forwarded-Proto} set,
        C{X-Forwarded-Host} set to the C{Host} (removed without one).
        """
        request = self.request
        # Names in their canonical case, values that twisted.web checked as
        # it parsed them (no CR, LF or NUL) or that are ours: set in the
        # dict directly, as setRawHeaders would after checking them again.
        raw = request.requestHeaders._rawHeaders
        # One scan of all the names at once: most requests have no "_"
        # (looked for as its value, see gateway.target._HASH).
        if _UNDERSCORE in b"".join(raw):
            self._drop_underscored(raw)
        raw.pop(b"Forwarded", None)
        client_ip = getattr(request.client, "host", None)
        if client_ip:
            value = client_ip.encode("ascii")
            previous = raw.get(b"X-Forwarded-For")
            if previous:
                value = b", ".join([*previous, value])
            raw[b"X-Forwarded-For"] = [value]
        # Without an address (a UNIX socket) the client is a local process
        # the socket's permissions admitted, a front proxy: its chain stays.
        raw[b"X-Forwarded-Proto"] = [b"https" if self._secure else b"http"]
        host = raw.get(b"Host")
        if host:
            raw[b"X-Forwarded-Host"] = [host[0]]
        else:
            raw.pop(b"X-Forwarded-Host", None)

    def _drop_underscored(self, raw: dict[bytes, list[bytes]]) -> None:
        names = [name for name in raw if b"_" in name]
        if self.gateway.allow_underscore_headers:
            names = [n for n in names if n.replace(b"_", b"-").lower() in _FORWARDING_NAMES]
            if not names:
                return
        for name in names:
            del raw[name]
        log.debug(
            "Dropped request header(s) with an underscore in the name from {method} request: "
            "{names}",
            method=_loggable(self.request.method),
            names=peer_text(", ".join(n.decode("latin-1") for n in names)),
        )

    def _refuse(self, error: BadTarget) -> None:
        """A request no agent is asked about: its target, Host or a header value is unusable."""
        log.debug(
            "Refused {method} request: {reason}",
            method=_loggable(self.request.method),
            reason=error.reason,
        )
        self._decision = "bad_request"
        self._respond_plain(error.code, error.reason)

    def _select(self, agent_ids: Sequence[str]) -> bool:
        pool = self.gateway.pool
        slots: list[AgentSlot] = []
        self.slots = slots
        for agent_id in agent_ids:
            try:
                connection = pool.select(agent_id)
            except AgentProtocolError as e:
                reason = failure_reason(Failure(e))
                self.gateway.metrics.agent_failed(agent_id, reason)
                if self.gateway.fail_open:
                    self.gateway.metrics.fail_open_pass(agent_id, reason)
                    self._passed = [
                        *self._passed,
                        {"agent_id": agent_id, "decision": "allow", "fail_open": reason},
                    ]
                    self.gateway.log_limiter.info(
                        log,
                        f"agent-{reason}-pass",
                        "Agent {agent_id} {reason}; request passes (fail-open)",
                        agent_id=peer_text(agent_id, _ID_IN_LOG),
                        reason=reason,
                    )
                    continue
                self.gateway.log_limiter.warn(
                    log,
                    f"agent-{reason}-503",
                    "Agent {agent_id} {reason}; answering 503",
                    agent_id=peer_text(agent_id, _ID_IN_LOG),
                    reason=reason,
                )
                self._unavailable()
                return False
            slots.append(AgentSlot(agent_id, connection))
        if slots:
            self.correlation_id = new_correlation_id()
        return True

    def _build_request_body(self, body_slots: list[AgentSlot], length: int | None) -> None:
        request = self.request
        sizes = chunk_sizes(body_slots)
        pressure = self._request_pressure = _pressure(sizes, request.pause_body, request.resume_body)
        # With inspecting agents the body may change size: it goes chunked.
        body = StreamingBody(None if body_slots else length, pressure)
        self._body = body
        self._body_head = inspection_chain(
            self,
            body_slots,
            sizes,
            response=False,
            total_size=length,
            tail=_RequestTail(self, body),
            pressure=pressure,
            max_size=self.gateway.config.max_replaced_body_size,
        )

    # -- sending to agents ----------------------------------------------------------

    def send_to(self, slot: AgentSlot, event: m.Event, answered: Answered, failed: Failed, arg: Any) -> None:
        """
        Send an event of this request to the slot's agent, under the
        request's correlation id: C{answered(answer, arg)} or
        C{failed(failure, arg)} follows, exactly once (no Deferred: this
        runs per event).
        """
        # One event at a time per agent and request, all under one
        # correlation id: whatever is pending under it is what the agent
        # still decides (see _cancel_pending).
        slot.connection.send_event_with(event, answered, failed, arg, self.correlation_id)

    def _cancel_pending(self, reason: int) -> None:
        """Cancel every agent still deciding; each gets a Cancel frame."""
        cid = self.correlation_id
        if not cid:
            return
        metrics = self.gateway.metrics
        # The cancelled Deferreds fail at once; their handlers must not take
        # that for the agent failing.
        self._cancelling = True
        try:
            for slot in self.slots:
                if slot.connection.cancel_request(cid, reason):
                    metrics.cancel_sent(slot.agent_id, reason)
        finally:
            self._cancelling = False

    # -- request headers ---------------------------------------------------------------

    def _send_request_headers(self, headers: dict[str, list[str]]) -> None:
        request = self.request
        cid = self.correlation_id
        tls = None
        if self._secure:
            channel = request.channel
            tls = tls_info(channel.transport if channel is not None else None)
        event = m.RequestHeadersEvent(
            correlation_id=cid,
            metadata=request_metadata(cid, request.client, headers, request.clientproto, tls),
            method=request.method.decode("ascii", "replace"),
            # Checked to be ASCII; exactly what goes upstream.
            uri=self._target.decode("ascii"),
            headers=headers,
        )
        # The round is the slots themselves: neither list changes after
        # _select, and _judge_round replaces the round rather than change it.
        self._round = self.slots
        if len(self.gateway.exchanges) < _BATCH_EXCHANGES:
            self._send_round(event)
            return
        # Requests read in one reactor turn share a send per agent connection.
        with HOLD_FRAMES_FOR_TURN:
            self._send_round(event)

    def _send_round(self, event: m.Event) -> None:
        """
        Send a headers event to every agent of the round: each answer (or
        failure) comes to L{_header_answered} (L{_header_failed}).  Stops
        once the exchange is over (an agent failed at once, closed).
        """
        answered = self._header_answered
        failed = self._header_failed
        cid = self.correlation_id
        for slot in self._round:
            if self._phase == _OVER:
                return
            slot.asked = True
            # send_to, spelled out: this runs per request and agent.
            slot.connection.send_event_with(event, answered, failed, slot, cid)

    def _header_answered(self, answer: m.AgentResponse, slot: AgentSlot) -> None:
        if self._phase == _OVER:
            return
        try:
            if answer.response_headers:
                problem = slot.add_response_ops(answer.response_headers)
                if problem is not None:
                    self._header_failed(Failure(InvalidMessage(problem)), slot)
                    return
            slot.answer = answer
            decision = answer.decision
            allow = isinstance(decision, _ALLOW)
            self.gateway.metrics.agent_decided(slot.agent_id, "allow" if allow else decision_label(decision))
            if allow and slot.stage is not None:
                # Its body events may follow now that this answer is in.
                slot.stage.start()
                if self._phase == _OVER:
                    return
            self._judge_round()
        except Exception:
            self.internal_error(Failure())

    def _header_failed(self, failure: Failure, slot: AgentSlot) -> None:
        if self._phase == _OVER or self._cancelling:
            return
        try:
            if self._agent_failed(slot, failure):
                if slot.stage is not None:
                    slot.stage.bypass()
                if self._phase != _OVER:
                    self._judge_round()
        except Exception:
            self.internal_error(Failure())

    def _judge_round(self) -> None:
        """The first non-allow answer in agent order wins; all allowed moves on."""
        for slot in self._round:
            if slot.skipped is not None:
                continue
            answer = slot.answer
            if answer is None:
                return
            if not isinstance(answer.decision, _ALLOW):
                self._deny(slot, answer)
                return
        self._round = ()
        if self._phase == _DECIDING:
            self._request_headers_allowed()
        elif self._phase == _RESPONSE_DECIDING:
            self._response_headers_allowed()

    # -- request body -------------------------------------------------------------------

    def request_body_received(self, data: bytes) -> None:
        """A piece of the request body from the client (C{413} past the body limit)."""
        if self._phase == _OVER:
            return
        self._body_in += len(data)
        limit = self._max_body
        if limit is not None and self._body_in > limit:
            self._too_large()
            return
        head = self._body_head
        if head is not None:
            head.feed(data)

    def request_body_finished(self) -> None:
        """The client's request body is complete."""
        if self._phase == _OVER:
            return
        head = self._body_head
        if head is not None:
            head.end()

    def body_answered(self, slot: AgentSlot, answer: m.AgentResponse) -> bool:
        """
        An agent answered a body chunk: C{False} when its stage is done with
        the answer (a denial ended the exchange, or the agent failed).
        """
        if answer.response_headers:
            problem = slot.add_response_ops(answer.response_headers)
            if problem is not None:
                stage = slot.stage
                if self._agent_failed(slot, Failure(InvalidMessage(problem))) and stage is not None:
                    stage.bypass()
                return False
        decision = answer.decision
        if isinstance(decision, _ALLOW):
            self.gateway.metrics.agent_decided(slot.agent_id, "allow")
            return True
        self.gateway.metrics.agent_decided(slot.agent_id, decision_label(decision))
        self._deny(slot, answer)
        return False

    def body_failed(self, slot: AgentSlot, failure: Failure) -> bool:
        """An agent could not answer a body chunk: C{503}, or on with C{--fail-open}."""
        return self._agent_failed(slot, failure)

    def _request_body_through(self) -> None:
        self._body_through = True
        if self._request_pressure is not None:
            self._request_pressure.release()
        self._maybe_respond()

    # -- upstream --------------------------------------------------------------------------

    def _request_headers_allowed(self) -> None:
        request = self.request
        # The forwarding headers are in already (_own_headers): the agents
        # saw them.
        headers = drop_hop_by_hop(request.requestHeaders, _NOT_FORWARDED)
        received = request.requestHeaders._rawHeaders
        if b"Connection" in received:
            # A client cannot have them dropped by naming them in Connection.
            raw = headers._rawHeaders
            for name in _GATEWAY_FORWARDING:
                if name not in raw and name in received:
                    raw[name] = list(received[name])
        decisions: list[dict[str, Any]] | None = (
            list(self._passed) if self.gateway.shows_decisions else None
        )
        measured: tuple[int, int] | None = None
        for slot in self.slots:
            answer = slot.answer
            if slot.skipped is None and answer is not None and answer.request_headers:
                if measured is None:
                    measured = head_size(headers)
                applied = self._apply_request_ops(headers, slot, answer.request_headers, measured)
                if applied is None and self._phase == _OVER:
                    return
                if applied is not None:
                    headers, measured = applied
            if slot.skipped is not None:
                if decisions is not None:
                    decisions.append(
                        {"agent_id": slot.agent_id, "decision": "allow", "fail_open": slot.skipped}
                    )
                continue
            if answer is not None and decisions is not None:
                decisions.append({"agent_id": slot.agent_id, "decision": "allow"})
        self._phase = _FORWARDING
        self._decision = "allow"
        self._forwarded = True
        forward = ForwardRequest(request.method, self._target, headers, self._body, decisions)
        self._forwarded_at = self.gateway.clock.seconds()
        call = self.gateway.upstream.forward(forward)
        self._upstream_call = call
        call.addCallbacks(self._upstream_responded, self._upstream_failed).addErrback(
            self.internal_error
        )
        if request.continue_owed:
            # Expect: 100-continue: the body is wanted now.
            request.send_continue()

    def _apply_request_ops(
        self, headers: Headers, slot: AgentSlot, ops: list[m.HeaderOp], before: tuple[int, int]
    ) -> tuple[Headers, tuple[int, int]] | None:
        """
        Apply an agent's request header operations to C{headers}: the head
        and its size in bytes and lines (L{head_size}) they make, or
        C{None} when they would make it larger than a client's may be
        (C{MAX_HEAD_SIZE}, C{MAX_HEAD_LINES}) unless it was already, and
        then larger than it was: the agent has failed (C{503}, or left out
        with the head as it was, failing open).
        """
        # Failing open, the head must stay as it was if the agent fails.
        target = headers.copy() if self.gateway.fail_open else headers
        apply_header_ops(target, ops, slot.agent_id, PROTECTED_REQUEST_HEADERS, self.gateway.log_limiter)
        size, lines = after = head_size(target)
        if size > max(MAX_HEAD_SIZE, before[0]) or lines > max(MAX_HEAD_LINES, before[1]):
            error = InvalidMessage(
                f"its request header operations make a head of {size} bytes in {lines} lines "
                f"(max: {MAX_HEAD_SIZE} bytes, {MAX_HEAD_LINES} lines)"
            )
            self._agent_failed(slot, Failure(error))
            return None
        return target, after

    def _upstream_responded(self, response: UpstreamResponse) -> None:
        self._upstream_call = None
        gateway = self.gateway
        gateway.metrics.upstream_responded(
            "response", max(gateway.clock.seconds() - self._forwarded_at, 0.0)
        )
        if self._phase == _OVER:
            response.abort()
            return
        self._response = response
        self._maybe_respond()

    def _upstream_failed(self, failure: Failure) -> None:
        self._upstream_call = None
        if self._phase == _OVER:
            return
        timeout = failure.check(UpstreamTimeout) is not None
        gateway = self.gateway
        gateway.metrics.upstream_failed("timeout" if timeout else "error")
        gateway.metrics.upstream_responded(
            "timeout" if timeout else "error", max(gateway.clock.seconds() - self._forwarded_at, 0.0)
        )
        self._error = str(failure.value)
        self._log_upstream_error("timed out" if timeout else "failed", self._error)
        self._cancel_pending(_UPSTREAM_ERROR)
        self._respond_plain(504 if timeout else 502)

    def _abort_upstream(self) -> None:
        call, self._upstream_call = self._upstream_call, None
        if call is not None:
            call.cancel()
        response, self._response = self._response, None
        if response is not None:
            response.abort()
        if self._body is not None:
            self._body.stopProducing()
