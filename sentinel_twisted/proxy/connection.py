# -*- test-case-name: tests.test_connection -*-
"""
L{AgentConnection}: one registered reverse connection, seen from the proxy.

This is what the reference calls C{ReverseConnectionClient}: it sends the
eight event types, matches each AgentResponse to its waiting Deferred by
correlation id, and honours the agent's control messages (FlowControl,
HealthStatus, Ping).  Nothing pending is ever left without an outcome:
every request ends with its answer, a timeout, a cancellation, or a
L{ConnectionClosed} error when the connection goes away.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import messages as m
from .._peertext import peer_text
from .._ratelimit import LogRateLimiter
from ..errors import (
    AgentProtocolError,
    ConnectionClosed,
    RequestCancelled,
    RequestTimeout,
    format_duration,
)
from ..forward import JSON_CODEC, PayloadCodec
from ..wire import MessageType
from ._receiving import _CONNECTION_ID_IN_LOG, _ID_IN_LOG, AgentFrames
from .pending import PendingTable, Waiter

__all__ = ["AgentConnection", "ConnectionInfo"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.connection")

#: A RequestComplete is a notice: no Cancel follows it (see send_event).
_REQUEST_COMPLETE_FRAME = MessageType.REQUEST_COMPLETE

_cid_prefix = os.urandom(4).hex()
_cid_counter = itertools.count(1)
# The prefix and its dash, joined once: "%x" formats the counter for less
# than an f-string's format spec does (this runs per request).
_cid_start = _cid_prefix + "-"


def new_correlation_id() -> str:
    """A correlation id unique in this process (and unlikely across)."""
    return _cid_start + "%x" % next(_cid_counter)  # noqa: UP031 (see _cid_start)


class FrameSink(Protocol):
    """What the connection needs from its protocol."""

    def send_frame(self, message_type: int, payload: bytes) -> None:
        """Write one frame (header and payload) to the agent."""

    def close_connection(self, detail: str, abort: bool = False) -> None:
        """Close the transport, or abort it when C{abort}; C{detail} says why."""


class _ConnectionListener(Protocol):
    """Who hears about a connection's control messages (the pool)."""

    #: What hears of each answer (its connection, correlation id and time
    #: in seconds), C{None} if nothing does: the one observer's own
    #: callback, or L{_connection_answered} for several.
    _answer_observer: Callable[[AgentConnection, str, float], object] | None

    def _connection_flow_changed(self, connection: AgentConnection, paused: bool) -> None: ...

    def _connection_health_changed(self, connection: AgentConnection, state: int | None) -> None: ...

    def _connection_metrics(self, connection: AgentConnection, report: dict[str, Any]) -> None: ...

    def _connection_config_update(self, connection: AgentConnection, request: dict[str, Any]) -> None: ...

    def _connection_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None: ...

    def _answer_observer_failed(self, observer: Callable[..., object]) -> None: ...


class ConnectionInfo(msgspec.Struct, kw_only=True):
    """
    A snapshot of one connection, for status pages and observers.

    @ivar in_flight: requests sent and not answered yet.
    @ivar paused: the agent asked for no new requests (FlowControl).
    @ivar health: the last HealthStatus state, C{None} before any.
    @ivar connected_since: when it registered (seconds since the epoch).
    @ivar peer: C{unix}, or C{HOST:PORT} of a TCP agent.
    @ivar write_blocked: the agent has stopped reading what it is sent.
    @ivar mode: C{reverse} (the agent dialled and registered) or
        C{forward} (the proxy dialled the agent).
    @ivar encoding: the payload encoding of events and answers, C{json} or
        C{msgpack} (forward mode only).
    @ivar connection_id: the id the proxy gave the connection.
    @ivar agent_id: the agent it belongs to.
    @ivar capabilities: what the agent announced when it registered.
    @ivar metadata: the JSON metadata of its registration (C{None} if none).
    @ivar peer_uid: uid of a UNIX socket's peer (C{SO_PEERCRED}), C{None} if
        not known.
    @ivar timeouts: events not answered in time (a RequestComplete aside: a
        notice, its timeout fails its caller alone).
    @ivar cancels_sent: Cancel frames sent.
    """

    connection_id: str
    agent_id: str
    in_flight: int
    paused: bool
    health: int | None
    capabilities: m.AgentCapabilities
    metadata: Any
    connected_since: float
    peer: str
    write_blocked: bool = False
    #: pid and uid of a UNIX socket's peer (C{SO_PEERCRED}), if known.
    peer_pid: int | None = None
    peer_uid: int | None = None
    #: Events sent, timed out and cancelled on this connection.
    events_sent: int = 0
    timeouts: int = 0
    cancels_sent: int = 0
    mode: str = "reverse"
    encoding: str = "json"


class AgentConnection(AgentFrames):
    """
    A registered agent connection.  Created by the listener on successful
    registration; users get it from the L{AgentPool} or from observers.

    @ivar agent_id: the id the agent registered with.
    @ivar connection_id: unique for the life of the process; the agent is
        told it in the RegistrationResponse.
    @ivar capabilities: what the agent announced.
    @ivar metadata: the registration's C{metadata} (any JSON).
    @ivar request_timeout: the default timeout of L{send_event}, in seconds.
    @ivar connected_since: when it registered (seconds since the epoch).
    @ivar peer: C{unix}, or C{HOST:PORT} of a TCP agent.
    @ivar health_state: the last HealthStatus state (L{HealthState
        <sentinel_twisted.messages.HealthState>} number), C{None} before any.
    @ivar listener: the pool it belongs to (set by L{AgentPool.add}).
    @ivar peer_credentials: C{(pid, uid, gid)} of a UNIX socket's peer
        (C{SO_PEERCRED}), C{None} elsewhere.
    @ivar events_sent: events sent on this connection.
    @ivar timeouts: events that were not answered in time (a RequestComplete
        aside: a notice, its timeout fails its caller alone).
    @ivar cancels_sent: Cancel frames sent on it.
    @ivar last_health: the agent's last HealthStatus message, C{None} before
        any.
    @ivar events: the L{EventType <sentinel_twisted.messages.EventType>}s the
        agent registered for.
    """

    # Counters kept as class defaults: most connections never time out.
    events_sent = 0
    timeouts = 0
    cancels_sent = 0
    peer_credentials: tuple[int, int, int] | None = None
    #: Whether the agent registered with a token the token checker verified.
    token_verified = False
    #: The SHA-256 of the token it registered with (never the token), or
    #: C{None}: a reload closes the connection once the token is changed.
    token_digest: bytes | None = None
    #: C{reverse} (the agent dialled and registered) or C{forward} (the
    #: proxy dialled the agent).
    mode = "reverse"
    #: The payload encoding of events and answers: C{json} or C{msgpack}.
    encoding = "json"
    # Control messages (cold): JSON unless a codec says otherwise.
    _decode_control: Callable[..., Any] = staticmethod(m.decode)

    def __init__(
        self,
        sink: FrameSink,
        *,
        agent_id: str,
        connection_id: str,
        capabilities: m.AgentCapabilities,
        metadata: Any,
        clock: IReactorTime,
        request_timeout: float,
        connected_since: float,
        peer: str = "",
        log_limiter: LogRateLimiter | None = None,
        codec: PayloadCodec | None = None,
        mode: str = "reverse",
        pending_counts: list[int] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.connection_id = connection_id
        self.capabilities = capabilities
        self.metadata = metadata
        self.request_timeout = request_timeout
        #: Seconds the agent may leave our write buffer full before the
        #: connection is aborted.
        self.write_stall_timeout = request_timeout
        self._write_blocked = False
        self._stall_timer: IDelayedCall | None = None
        self.connected_since = connected_since
        self.peer = peer
        self.listener: _ConnectionListener | None = None
        self._sink = sink
        self._clock = clock
        self._pending: PendingTable = PendingTable(
            clock, on_cancel=self._caller_cancelled, on_timeout=self._timed_out, counts=pending_counts
        )
        self._paused = False
        self._closed: ConnectionClosed | None = None
        #: Closed, paused or write-blocked: kept up to date on each change,
        #: so the pool's selection reads one attribute per connection.
        self._unavailable = False
        self._gone = False
        # Created when first needed: most connections never ping or close
        # themselves, and every registered connection carries these.
        self._lost_waiters: list[Deferred[None]] | None = None
        self.health_state: int | None = None
        self.last_health: m.HealthStatusMessage | None = None
        self._ping_sequence = 0
        self._pings: dict[int, tuple[float, Deferred[float], IDelayedCall]] | None = None
        self.events = self.capabilities.events
        self._log_limiter = log_limiter
        # The payload encoding's per-message functions, bound once: the JSON
        # path calls the same functions it always has.
        if codec is None:
            codec = JSON_CODEC
        self._encode_event = codec.encode_event
        self._decode_answer = codec.decode_response
        if mode != "reverse" or codec is not JSON_CODEC:
            # Set only where they differ from the class's defaults: every
            # attribute more costs each registered connection memory, and
            # past 30 its attributes no longer share their keys.
            self.mode = mode
            self.encoding = codec.name
            self._decode_control = codec.decode_control

    def __repr__(self) -> str:
        return f"<AgentConnection {self.connection_id} agent={self.agent_id} in_flight={len(self._pending)}>"

    # -- logging ------------------------------------------------------------

    @property
    def log_limiter(self) -> LogRateLimiter:
        """Rate limits this connection's per-frame warnings (the listener's
        limiter, shared by every connection, when it made this one)."""
        limiter = self._log_limiter
        if limiter is None:
            limiter = self._log_limiter = LogRateLimiter(self._clock)
        return limiter

    def log_fields(self) -> dict[str, str]:
        """The agent and connection ids, as a log line may carry them."""
        return {
            "agent_id": peer_text(self.agent_id, _ID_IN_LOG),
            "connection_id": peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
        }

    # -- state --------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, timed out or cancelled."""
        return len(self._pending)

    @property
    def is_paused(self) -> bool:
        """Whether the agent asked (FlowControl pause) for no new requests."""
        return self._paused

    @property
    def is_closed(self) -> bool:
        """Whether the connection is closed or closing: nothing more can be sent."""
        return self._closed is not None

    @property
    def can_accept_requests(self) -> bool:
        """
        Whether a new request may be sent now: not closed, not paused by the
        agent, and the agent reads what it is sent.
        """
        return self._closed is None and not self._paused and not self._write_blocked

    def _selection_load(self) -> int:
        """
        L{in_flight}, or -1 when the connection cannot take requests: what
        the pool's selection asks every connection of an agent, per request,
        in one call instead of three.
        """
        if self._unavailable:
            return -1
        return len(self._pending._entries)

    def _update_availability(self) -> None:
        self._unavailable = self._closed is not None or self._paused or self._write_blocked

    @property
    def is_write_blocked(self) -> bool:
        """Whether the agent stopped reading and our write buffer is full."""
        return self._write_blocked

    def set_write_blocked(self, blocked: bool) -> None:
        """
        The transport's buffer filled up (or drained again): the agent is
        not reading.  New requests are routed around the connection; if it
        stays blocked for C{write_stall_timeout} seconds it is aborted, so
        unsent data never grows without bound.
        """
        if blocked == self._write_blocked or self._closed is not None:
            return
        self._write_blocked = blocked
        self._update_availability()
        if blocked:
            self.log_limiter.warn(
                log,
                "agent-not-reading",
                "Agent {agent_id} is not reading connection {connection_id}; "
                "new requests go elsewhere until it catches up",
                **self.log_fields(),
            )
            self._stall_timer = self._clock.callLater(self.write_stall_timeout, self._write_stalled)
        else:
            timer, self._stall_timer = self._stall_timer, None
            if timer is not None and timer.active():
                timer.cancel()
            self.log_limiter.info(
                log,
                "agent-reading-again",
                "Agent {agent_id} is reading connection {connection_id} again",
                **self.log_fields(),
            )

    def _write_stalled(self) -> None:
        self._stall_timer = None
        detail = (
            f"agent stopped reading: write buffer full for "
            f"{format_duration(self.write_stall_timeout)}"
        )
        self.log_limiter.warn(
            log,
            "agent-stalled",
            "Aborting connection {connection_id} of agent {agent_id}: {detail}",
            detail=detail,
            **self.log_fields(),
        )
        self._sink.close_connection(detail, abort=True)

    def pending_ids(self) -> list[str]:
        """The correlation ids of the requests waiting for an answer."""
        return self._pending.correlation_ids()

    def info(self) -> ConnectionInfo:
        """A snapshot for status pages and observers."""
        return ConnectionInfo(
            connection_id=self.connection_id,
            agent_id=self.agent_id,
            in_flight=len(self._pending),
            paused=self._paused,
            health=self.health_state,
            capabilities=self.capabilities,
            metadata=self.metadata,
            connected_since=self.connected_since,
            peer=self.peer,
            write_blocked=self._write_blocked,
            peer_pid=self.peer_credentials[0] if self.peer_credentials else None,
            peer_uid=self.peer_credentials[1] if self.peer_credentials else None,
            events_sent=self.events_sent,
            timeouts=self.timeouts,
            cancels_sent=self.cancels_sent,
            mode=self.mode,
            encoding=self.encoding,
        )

    # -- sending events -----------------------------------------------------

    def send_event(
        self,
        event: m.Event,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> Deferred[m.AgentResponse]:
        """
        Send any event and wait for its AgentResponse.

        The correlation id is C{correlation_id} if given, else the event's
        own (C{metadata.correlation_id} for RequestHeaders), else a fresh
        one.  Errors (closed connection, duplicate id, oversize frame)
        arrive as a failed Deferred, never as an exception::

            answer = await connection.send_event(event, timeout=2.0)

        @param timeout: seconds to wait for the answer; the connection's
            C{request_timeout} by default.
        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}.  Fails with
            L{RequestTimeout <sentinel_twisted.errors.RequestTimeout>} (no
            answer in time; the agent is sent a Cancel, unless the event is
            a RequestComplete: the request it names is over, and a Cancel
            after it would name a request the agent was told had ended),
            L{ConnectionClosed} (closed before or while waiting),
            L{RequestCancelled} (the Deferred was cancelled or
            L{cancel_request} was called), L{InvalidMessage
            <sentinel_twisted.errors.InvalidMessage>} (the answer could not
            be read), L{DuplicateCorrelationId
            <sentinel_twisted.errors.DuplicateCorrelationId>} (the id is
            already waiting), L{MessageTooLarge
            <sentinel_twisted.errors.MessageTooLarge>} (the event does not
            fit a frame) or C{ValueError} (a timeout that is not positive).
        """
        if self._closed is not None:
            return fail(self._closed)
        try:
            deferred: Deferred[m.AgentResponse] = self._send(event, correlation_id, timeout)
        except (AgentProtocolError, ValueError) as e:
            return fail(e)
        return deferred

    def send_event_with(
        self,
        event: m.Event,
        answered: Callable[[m.AgentResponse, Any], object],
        failed: Callable[[Failure, Any], object],
        arg: Any = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """
        L{send_event} without a Deferred, for callers on a hot path: the
        answer goes to C{answered(answer, arg)}, any failure (the same as
        L{send_event}'s, including one at once) to C{failed(failure, arg)}.
        Exactly one of the two is called, once.  An exception either raises
        is logged and goes no further: handle your own errors.  Cancel with
        L{cancel_request}.
        """
        # A failure at once goes through a waiter too: its handler's
        # exception is logged, as a later failure's is, never raised here.
        if self._closed is not None:
            Waiter(answered, failed, arg).errback(Failure(self._closed))
            return
        try:
            self._send(event, correlation_id, timeout, answered, failed, arg)
        except (AgentProtocolError, ValueError) as e:
            Waiter(answered, failed, arg).errback(Failure(e))

    def _send(
        self,
        event: m.Event,
        correlation_id: str | None,
        timeout: float | None,
        answered: Callable[[m.AgentResponse, Any], object] | None = None,
        failed: Callable[[Failure, Any], object] | None = None,
        arg: Any = None,
    ) -> Any:
        """Encode, register and write one event: its Deferred, or C{None} with handlers."""
        if timeout is None:
            timeout = self.request_timeout
        elif not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        cid = correlation_id or m.event_correlation_id(event) or new_correlation_id()
        payload = self._encode_event(event, cid)
        pending = self._pending
        result = pending.add(
            cid, timeout, None, answered, failed, arg, event.message_type == _REQUEST_COMPLETE_FRAME
        )
        try:
            self._sink.send_frame(event.message_type, payload)
        except BaseException:
            # Not sent, whatever the reason: nothing may wait for an answer
            # (its timeout would end the request a second time).
            pending.pop(cid)
            raise
        self.events_sent += 1
        return result

    def send_request_headers(
        self, event: m.RequestHeadersEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{RequestHeadersEvent <sentinel_twisted.messages.RequestHeadersEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    def send_request_body_chunk(
        self, event: m.RequestBodyChunkEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{RequestBodyChunkEvent <sentinel_twisted.messages.RequestBodyChunkEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    def send_response_headers(
        self, event: m.ResponseHeadersEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{ResponseHeadersEvent <sentinel_twisted.messages.ResponseHeadersEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    def send_response_body_chunk(
        self, event: m.ResponseBodyChunkEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{ResponseBodyChunkEvent <sentinel_twisted.messages.ResponseBodyChunkEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    def send_request_complete(
        self, event: m.RequestCompleteEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{RequestCompleteEvent <sentinel_twisted.messages.RequestCompleteEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    def send_websocket_frame(
        self, event: m.WebSocketFrameEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{WebSocketFrameEvent <sentinel_twisted.messages.WebSocketFrameEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    def send_guardrail_inspect(
        self, event: m.GuardrailInspectEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{GuardrailInspectEvent <sentinel_twisted.messages.GuardrailInspectEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    def send_configure(
        self, event: m.ConfigureEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{ConfigureEvent <sentinel_twisted.messages.ConfigureEvent>}; see L{send_event}.
        """
        return self.send_event(event, correlation_id, timeout)

    # -- cancellation -------------------------------------------------------

    def _send_cancel(self, correlation_id: str, reason: int) -> None:
        if self._closed is not None:
            return
        body = m.CancelMessage(
            correlation_id=correlation_id,
            reason=int(reason),
            timestamp_ms=int(self._clock.seconds() * 1000),
        )
        self._sink.send_frame(MessageType.CANCEL, m.encode(body))
        self.cancels_sent += 1

    def cancel_request(
        self, correlation_id: str, reason: int = m.CancelReason.MANUAL
    ) -> bool:
        """
        Cancel one request: the agent gets a Cancel frame and the waiting
        caller a L{RequestCancelled} at once.  C{False} if no such request
        is waiting.
        """
        deferred = self._pending.pop(correlation_id)
        if deferred is None:
            return False
        self._send_cancel(correlation_id, reason)
        deferred.errback(Failure(RequestCancelled(correlation_id, int(reason))))
        return True

    def cancel_all(self, reason: int = m.CancelReason.MANUAL) -> int:
        """Cancel every waiting request; returns how many were cancelled."""
        ids = self._pending.correlation_ids()
        for cid in ids:
            self._send_cancel(cid, reason)
        return self._pending.fail_all(lambda cid: RequestCancelled(cid, int(reason)))

    def _caller_cancelled(self, correlation_id: str) -> None:
        self._send_cancel(correlation_id, m.CancelReason.MANUAL)

    def _timed_out(self, correlation_id: str) -> None:
        # Tell the agent to stop working on it (before the caller hears of it).
        self.timeouts += 1
        self._send_cancel(correlation_id, m.CancelReason.TIMEOUT)

    # -- ping ---------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> Deferred[float]:
        """
        Send a Ping; the Deferred fires with the round-trip seconds, or
        fails with L{RequestTimeout <sentinel_twisted.errors.RequestTimeout>}
        when no Pong comes within C{timeout} seconds (the connection's
        C{request_timeout} by default): an agent that never answers does
        not leave its caller waiting, nor the Ping held, for ever.
        """
        if self._closed is not None:
            return fail(self._closed)
        if timeout is None:
            timeout = self.request_timeout
        elif not timeout > 0:
            return fail(ValueError(f"timeout must be a positive number of seconds, got {timeout!r}"))
        sequence = self._ping_sequence
        self._ping_sequence = sequence + 1
        now = self._clock.seconds()
        pings = self._pings
        if pings is None:
            pings = self._pings = {}
        def forget(_: Deferred[float]) -> None:
            if self._pings is not None:
                entry = self._pings.pop(sequence, None)
                if entry is not None and entry[2].active():
                    entry[2].cancel()

        def expire() -> None:
            entry = self._pings.pop(sequence, None) if self._pings is not None else None
            if entry is not None:
                entry[1].errback(Failure(RequestTimeout(timeout)))

        waiter: Deferred[float] = Deferred(forget)
        pings[sequence] = (now, waiter, self._clock.callLater(timeout, expire))
        body = m.PingMessage(sequence=sequence, timestamp_ms=int(now * 1000))
        self._sink.send_frame(MessageType.PING, m.encode(body))
        return waiter

    # -- closing ------------------------------------------------------------

    def close(self, detail: str = "closed by proxy", abort: bool = False) -> Deferred[None]:
        """
        Close the connection.  Waiting requests fail with
        L{ConnectionClosed}; the Deferred fires once the connection is gone.
        C{abort} drops it without flushing what is still buffered (for an
        agent that does not read), also when an earlier close still waits
        for the agent to read.
        """
        if self._gone:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._lost_waiters is None:
            self._lost_waiters = []
        self._lost_waiters.append(waiter)
        self._sink.close_connection(detail, abort)
        return waiter

    def connection_lost(self, detail: str, transport_gone: bool = True) -> int:
        """
        The connection ended (called by the protocol).  Every waiting
        request fails at once; returns how many did.  L{close} waiters fire
        only once the transport is really gone (C{transport_gone}), not when
        the proxy has merely started closing it.
        """
        if self._closed is None:
            self._closed = ConnectionClosed(detail)
            self._unavailable = True
        closed = self._closed
        timer, self._stall_timer = self._stall_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        failed = self._pending.fail_all(lambda cid: ConnectionClosed(closed.detail))
        pings, self._pings = self._pings, None
        if pings:
            for _, waiter, expiry in pings.values():
                if expiry.active():
                    expiry.cancel()
                waiter.errback(Failure(ConnectionClosed(closed.detail)))
        if transport_gone:
            self._gone = True
            waiters, self._lost_waiters = self._lost_waiters, None
            for w in waiters or ():
                w.callback(None)
        return failed

    def mark_closing(self, detail: str) -> None:
        """Refuse new requests from now on (the transport is closing)."""
        if self._closed is None:
            self._closed = ConnectionClosed(detail)
            self._unavailable = True
