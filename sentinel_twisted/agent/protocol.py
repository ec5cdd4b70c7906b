# -*- test-case-name: tests.agent.test_protocol -*-
"""
L{AgentProtocol}: the agent's end of one reverse connection.

It sends the RegistrationRequest, waits (with a timeout) for the
RegistrationResponse, then serves the proxy's events: each event runs its
handler at once, up to a concurrency limit, and its answer goes back as
soon as it is ready, so answers may leave in any order.  At the limit the
connection asks the proxy to pause (FlowControl) and resumes when the
load has drained to half the limit.  Ping gets a Pong with the same body,
Cancel cancels the handler's Deferred (and nothing is sent for that id),
and a HealthStatus goes out periodically.

Handler failures never leave the proxy waiting: a handler that raises,
fails, or returns something that is not an answer is logged with its
traceback (a few per handler per period: the proxy chooses the events)
and answered with a safe decision.  The default is fail-closed,
C{block 500 "agent error"}, because an inspecting agent (a WAF) that
fails open lets exactly the traffic it could not judge through; set
C{fail_open=True} for agents whose failure must not stop traffic.
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import messages as m
from .._peertext import peer_text
from .._ratelimit import LogRateLimiter
from .._tls import check_server_name, server_identity_error, tls_failure
from ..errors import (
    AgentProtocolError,
    ControlFrameTooLarge,
    IncompleteFrame,
    InvalidMessage,
    format_duration,
)
from ..forward import JSON_CODEC, PayloadCodec
from ..wire import MAX_MESSAGE_SIZE, FrameReceiver, IncompleteFrameBudget, MessageType
from ._interfaces import IAgent
from ._lifecycle import new_lifecycle
from ._serving import _CONNECTION_ID_IN_LOG, _PROXY_TEXT_IN_LOG, EventServing, _Entry, routing_id
from .budget import HeldEventBudget
from .errors import RegistrationFailed, RegistrationRejected
from .responses import allow, block

__all__ = [
    "DEFAULT_MAX_EVENT_VALUES",
    "MAX_REGISTRATION_RESPONSE_SIZE",
    "AgentClientFactory",
    "AgentProtocol",
    "AgentSettings",
    "ConnectionObserver",
    "routing_id",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.agent.protocol")

_AGENT_ONLY = frozenset(
    {
        MessageType.AGENT_RESPONSE,
        MessageType.HEALTH_STATUS,
        MessageType.METRICS_REPORT,
        MessageType.CONFIG_UPDATE_REQUEST,
        MessageType.FLOW_CONTROL,
        MessageType.HANDSHAKE_REQUEST,
    }
)

_CONNECTION_DONE = Failure(ierror.ConnectionDone())

#: Largest RegistrationResponse frame accepted (type byte plus payload),
#: as a listening agent's handshake is bounded: a proxy's is about 150
#: bytes, and what comes before the registration is not read as events.
MAX_REGISTRATION_RESPONSE_SIZE = 64 * 1024

#: The most values one event may hold by default (see
#: L{AgentSettings.max_event_values}): a frame of 16 MiB of ordinary
#: content (text, headers, a list of addresses) holds fewer.
DEFAULT_MAX_EVENT_VALUES = 1_000_000



def _positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value!r}")


@attrs.frozen(kw_only=True)
class AgentSettings:
    """
    How an agent's connections behave.

    @ivar agent: the L{IAgent} that answers events.
    @ivar agent_id: the id to register under.
    @ivar auth_token: sent in the RegistrationRequest (C{null} if unset).
    @ivar metadata: free-form JSON sent in the RegistrationRequest.
    @ivar registration_timeout: seconds to wait for the RegistrationResponse.
    @ivar health_interval: seconds between HealthStatus reports (0: only
        the one after registration); sent only if the capabilities announce
        C{health_reporting}.
    @ivar max_concurrency: handlers running at once per connection; C{None}
        takes the agent's announced C{limits.max_concurrency}.
    @ivar max_queued: events held beyond the limit (they arrive while the
        pause travels to the proxy, or from a proxy that ignores pauses);
        beyond it an event is answered at once with the error decision and
        status 503.  C{None} means as many as C{max_concurrency}.
    @ivar max_held_event_bytes: the bytes of events a connection holds at
        once, running and queued: an event that would go past it is
        answered at once with the error decision and status 503, as one
        over C{max_queued} is, unless it is the only one (a frame is at most
        16 MiB); so a proxy cannot make the agent hold C{max_concurrency +
        max_queued} frames of 16 MiB while its handlers are slow.  An event
        counts its frame's payload, plus 64 bytes for each value decoding
        makes of it (each string, number, list and map, each key) when it
        may hold many: one over 4 KiB with headers, guardrail metadata or
        a configuration, or any over 4 KiB in MessagePack.  All the
        connections of a connector and a listener are bounded together as
        well, by the L{HeldEventBudget
        <sentinel_twisted.agent.budget.HeldEventBudget>} they share.
    @ivar max_event_values: the most values (as above) one event may hold:
        one that holds more is answered at once with the error decision,
        without being decoded (its correlation id is looked for without
        decoding anything else).  A JSON event is counted by its commas,
        colons and opening brackets, those inside strings too, and once
        that count is past the limit, again without those.  Decoding
        makes some 60 to 80 bytes of each value: a frame of 16 MiB could
        otherwise take more than 1 GiB, and seconds of the reactor.
    @ivar fail_open: answer handler errors with allow instead of block 500.
    @ivar close_grace: seconds a connection the agent closes has to be gone
        (what it still holds sent, its TLS session shut down) before it is
        aborted: a proxy that reads nothing cannot keep it open.
    @ivar frame_timeout: seconds within which a frame the proxy has started,
        once registered (or past the handshake), must be complete, however
        steadily its bytes come; then the connection is closed, so that a
        proxy that stops mid-frame or trickles one cannot hold the
        connection and its buffer.  (The proxy holds its agents to the same
        rule, by default its request timeout: 30 s.  Before registration
        the registration or handshake timeout bounds the whole exchange.)
    @ivar write_stall_timeout: seconds the proxy may leave what the agent
        writes unread (the transport's buffer full) before the connection is
        aborted.  Until then its Pings get no Pong and no more of its frames
        are read, so that what the agent buffers for it stays bounded.  (The
        proxy holds its agents to the same rule, by default its request
        timeout: 30 s.)
    """

    agent: IAgent
    agent_id: str = attrs.field()
    auth_token: str | None = None
    metadata: Any = None
    registration_timeout: float = attrs.field(default=10.0, validator=_positive)
    health_interval: float = attrs.field(default=10.0, validator=_not_negative)
    max_concurrency: int | None = attrs.field(default=None, validator=_positive)
    max_queued: int | None = attrs.field(default=None, validator=_not_negative)
    max_held_event_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    max_event_values: int = attrs.field(default=DEFAULT_MAX_EVENT_VALUES, validator=_positive)
    fail_open: bool = False
    close_grace: float = attrs.field(default=5.0, validator=_positive)
    frame_timeout: float = attrs.field(default=30.0, validator=_positive)
    write_stall_timeout: float = attrs.field(default=30.0, validator=_positive)

    @agent_id.validator
    def _check_agent_id(self, attribute: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("agent_id must be a non-empty string")

    def registration_request(self, capabilities: m.AgentCapabilities) -> m.RegistrationRequest:
        """The RegistrationRequest these settings make, announcing C{capabilities}."""
        return m.RegistrationRequest(
            protocol_version=m.PROTOCOL_VERSION,
            agent_id=self.agent_id,
            capabilities=capabilities,
            auth_token=self.auth_token,
            metadata=self.metadata,
        )

    def error_answer(self, status: int = 500, text: str = "agent error") -> m.AgentResponse:
        """The safe answer for an event the agent could not judge."""
        builder = allow() if self.fail_open else block(status, text)
        return builder.tag("agent_error").reason("AGENT_ERROR").build()


class ConnectionObserver(Protocol):
    """Who hears about a connection's registration and end (the connector)."""

    def connection_registered(self, protocol: AgentProtocol) -> None:
        """The proxy accepted the registration."""

    def registration_refused(self, protocol: AgentProtocol, error: AgentProtocolError) -> None:
        """The registration failed (C{error} says whether to retry)."""

    def connection_ended(self, protocol: AgentProtocol, detail: str) -> None:
        """A registered connection ended."""




@implementer(IHandshakeListener, IPushProducer)
class AgentProtocol(EventServing, FrameReceiver):
    """
    One agent connection.  Built by L{AgentClientFactory}.

    Once serving it is its transport's producer: when the proxy stops
    reading and the transport's buffer fills, the transport pauses it
    (L{pauseProducing}), and until the buffer drains the proxy's Pings get
    no Pong and its frames are no longer read, so that TCP pushes back on
    the proxy.  The answers to the events already taken still go out: at
    most C{limit} running and C{max_queued} waiting, and the error decision
    for the events of the read under way.  A connection still blocked after
    C{write_stall_timeout} seconds is aborted.

    @ivar settings: how it registers and serves.
    @ivar agent: the agent that answers the events.
    @ivar clock: the clock of its timers.
    @ivar observer: told of its registration and end, C{None} for nobody.
    @ivar capabilities: what it announces, C{None} until built.
    @ivar connection_id: the id the proxy gave the connection (C{""} before
        registration).
    @ivar proxy_id: the proxy's id (C{""} before registration).
    @ivar proxy_version: the proxy's version (C{""} before registration).
    @ivar registered: the proxy accepted the registration (or the handshake).
    @ivar MAX_LENGTH: the longest frame accepted, in bytes:
        L{MAX_REGISTRATION_RESPONSE_SIZE} until registered (a longer answer
        ends the connection before it is buffered), 16 MiB after.
    @ivar draining: it is draining: finishing the events in flight before it
        closes.
    @ivar paused: it asked the proxy to pause (FlowControl) and has not
        resumed yet.
    @ivar limit: events handled at once.
    @ivar resume_at: the load at or below which a paused connection resumes
        (half the limit).
    @ivar max_queued: events held beyond the limit at most.
    @ivar write_blocked: the proxy is not reading what the agent writes
        (the transport paused it): its Pings are not answered and its
        frames not read until it catches up.
    @ivar held_event_budget: the account of held events it shares with the
        other connections of its process (L{HeldEventBudget
        <sentinel_twisted.agent.budget.HeldEventBudget>}); C{None}: only
        C{settings.max_held_event_bytes} bounds what it holds.
    @ivar idle_since: when it last had no event in flight, on its clock:
        when it was made, registered (or past its handshake), or its last
        event ended.
    @ivar log_key: when set (by a connector's slot), its registered and
        ended lines go through C{log_limiter} under this key, a few per
        period: a proxy that drops every connection at once cannot flood the
        log.  C{None}: each is logged.
    """

    _registration_payload: bytes | None = None
    log_key: str | None = None
    # Aborts a close that is overdue (see _lose); None when no close waits.
    _close_timer: IDelayedCall | None = None
    _transport_gone = False
    peer_role = "proxy"
    #: How events, answers and control messages are written on this
    #: connection: always JSON here; a forward connection may negotiate
    #: MessagePack.
    codec: PayloadCodec = JSON_CODEC
    #: How the phase before serving is named in errors.
    _opening = "the proxy answered the registration"

    def __init__(
        self,
        settings: AgentSettings,
        clock: IReactorTime,
        observer: ConnectionObserver | None = None,
        log_limiter: LogRateLimiter | None = None,
        *,
        frame_budget: IncompleteFrameBudget | None = None,
        held_event_budget: HeldEventBudget | None = None,
    ) -> None:
        self.settings = settings
        self.agent = settings.agent
        self.clock = clock
        self.observer = observer
        #: Rate limits the warnings a proxy can cause frame by frame
        #: (invalid events, Cancels, Pings; events over the limit): shared
        #: by the connections of one factory, on the agent's reactor clock.
        self.log_limiter = log_limiter if log_limiter is not None else LogRateLimiter(clock)
        self.capabilities: m.AgentCapabilities | None = None
        self.connection_id = ""
        self.proxy_id = ""
        self.proxy_version = ""
        self.registered = False
        self.draining = False
        self.paused = False
        self.limit = settings.max_concurrency or 1
        self.resume_at = 0
        self.max_queued = 0
        #: Counters, for status and tests.
        self.stats: collections.Counter[str] = collections.Counter()
        self._lifecycle, self._core = new_lifecycle(self)
        self._on_frame = self._registration_frame
        # Bounded from the first byte, until the registration lifts it.
        self.MAX_LENGTH = MAX_REGISTRATION_RESPONSE_SIZE
        self._serial = 0
        self._active: dict[int, _Entry] = {}
        self._queue: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._held_bytes = 0
        self.held_event_budget = held_event_budget
        self.idle_since = clock.seconds()
        self._by_id: dict[str, _Entry] = {}
        self._health: LoopingCall | None = None
        self._releasing = False
        self._close_detail: str | None = None
        if frame_budget is not None:
            #: The bytes this connection and the others of its factory hold
            #: in incomplete frames, against one limit.
            self.frame_budget = frame_budget
        self.write_blocked = False
        # Back-pressure: registered as the transport's producer; when the
        # write buffer filled (for the stall's log line); the abort of a
        # connection blocked too long.
        self._producing = False
        self._blocked_since = 0.0
        self._stall_timer: IDelayedCall | None = None
        # A close that aborts rather than waits on the proxy (it reads
        # nothing); the frame budget chose this connection.
        self._abort_on_close = False
        self._evicted = False

    def __repr__(self) -> str:
        return (
            f"<AgentProtocol agent={self.settings.agent_id} "
            f"connection={self.connection_id or '(registering)'} in_flight={len(self._active)}>"
        )

    # -- Twisted protocol ------------------------------------------------------

    def connectionMade(self) -> None:
        try:
            capabilities = self.agent.capabilities(self.settings.agent_id)
            payload = m.encode(self.settings.registration_request(capabilities))
        except Exception as e:
            log.failure("Agent {agent_id}: cannot build the RegistrationRequest", agent_id=self.settings.agent_id)
            self._lifecycle.refused(
                RegistrationRejected(f"cannot build the RegistrationRequest: {e}", retryable=False)
            )
            return
        self.take_capabilities(capabilities)
        timeout = self.settings.registration_timeout
        self._core.timer = self.clock.callLater(
            timeout,
            self._lifecycle.refused,
            RegistrationFailed(f"no RegistrationResponse within {format_duration(timeout)}"),
        )
        if ISSLTransport.providedBy(self.transport):
            # Nothing, above all not the token, goes out before the proxy's
            # certificate is verified: wait for the TLS handshake, which
            # fails unless the certificate names the proxy dialled.
            check_server_name(self.transport)
            self._registration_payload = payload
            return
        self.send_frame(MessageType.HANDSHAKE_REQUEST, payload)

    def take_capabilities(self, capabilities: m.AgentCapabilities) -> None:
        """Announce C{capabilities}; the concurrency limit follows from them unless set."""
        self.capabilities = capabilities
        if self.settings.max_concurrency is None:
            self.limit = max(1, capabilities.limits.max_concurrency)
        self.resume_at = self.limit // 2
        self.max_queued = self.limit if self.settings.max_queued is None else self.settings.max_queued

    def handshakeCompleted(self) -> None:
        payload, self._registration_payload = self._registration_payload, None
        transport = self.transport
        if payload is None or transport is None or getattr(transport, "disconnecting", False):
            return
        problem = server_identity_error(transport)
        if problem is not None:
            log.error(
                "Agent {agent_id}: not registering over TLS: {problem}",
                agent_id=self.settings.agent_id,
                problem=problem,
            )
            self._lifecycle.refused(RegistrationFailed(f"TLS: {problem}"))
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.send_frame(MessageType.HANDSHAKE_REQUEST, payload)

    def frame_received(self, message_type: int, payload: bytes) -> None:
        self._on_frame(message_type, payload)

    # The frame deadline (see FrameReceiver): once registered, a frame the
    # proxy starts must be complete within settings.frame_timeout; before,
    # the registration (or handshake) timeout bounds everything that comes.

    @property
    def frame_clock(self) -> IReactorTime | None:  # type: ignore[override]
        """The connection's clock once registered: a started frame must end within the deadline."""
        return self.clock if self.registered else None

    @property
    def frame_timeout(self) -> float | None:  # type: ignore[override]
        """The frame deadline (L{AgentSettings.frame_timeout}) once registered; C{None} before."""
        return self.settings.frame_timeout if self.registered else None

    def frame_error(self, error: AgentProtocolError) -> None:
        if isinstance(error, IncompleteFrame) and self.write_blocked and not self._evicted:
            # The frame could not come: the agent stopped reading because
            # the proxy reads nothing.  That is what ends the connection.
            self._write_stalled()
            return
        if isinstance(error, IncompleteFrame) and not self._evicted:
            # A peer can cause this once per connection, and connect again.
            self.log_limiter.warn(
                log,
                "frame-deadline",
                "Agent {agent_id} closing connection {connection_id} with proxy {proxy_id}: "
                "a frame was not complete in time ({detail})",
                agent_id=self.settings.agent_id,
                connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
                proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
                detail=error.detail,
            )
        self._lifecycle.protocol_violated(error)

    def frame_budget_exceeded(self, held: int, total: int, limit: int) -> None:
        """
        The connections sharing this one's L{IncompleteFrameBudget} held
        more than its limit in incomplete frames, and this one the most:
        it is aborted (its proxy sent much and is not done).
        """
        self.log_limiter.warn(
            log,
            "frame-budget",
            "Incomplete frames of all proxy connections held {total} bytes (max: {limit}); "
            "agent {agent_id} closing connection {connection_id} with proxy {proxy_id}, "
            "which held {held} of them",
            total=total,
            limit=limit,
            agent_id=self.settings.agent_id,
            connection_id=peer_text(self.connection_id or "(registering)", _CONNECTION_ID_IN_LOG),
            proxy_id=peer_text(self.proxy_id or "(unknown)", _PROXY_TEXT_IN_LOG),
            held=held,
        )
        self._evicted = True
        self._abort_on_close = True
        super().frame_budget_exceeded(held, total, limit)

    def control_frame_too_large(self, error: ControlFrameTooLarge) -> bool:
        """
        A Ping, Pong, HealthStatus or FlowControl over the control frame
        limit: skipped once registered (the stream is sound, and the events
        in flight carry on), refused before (only the answer to our
        registration, or the proxy's handshake, may come).
        """
        if not self.registered:
            return False
        self.log_limiter.warn(
            log,
            "control-frame-skipped",
            "Proxy {proxy_id} sent a {kind} frame of {size} bytes on connection {connection_id}, "
            "over the limit of {limit} for a {kind} frame; skipped it",
            proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
            kind=error.kind,
            size=error.size,
            limit=error.limit,
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
        )
        return True

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._transport_gone = True
        # The transport drops its producer itself.
        self._producing = False
        self._stop_stall_timer()
        timer, self._close_timer = self._close_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        detail = None
        error = reason.value
        if self._close_detail is None and error is not None:
            # A TLS failure in words (the proxy's certificate, OpenSSL's
            # reason) rather than the exception's repr.
            held = self._registration_payload is not None
            detail = tls_failure(error, "proxy", handshake_done=not held)
        if detail is None:
            detail = self.lost_detail(reason)
        # Whatever part of a frame is left goes, and its deadline with it.
        self.stop_parsing()
        self._lifecycle.connection_lost(detail)

    # -- back-pressure (IPushProducer) --------------------------------------------

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: the proxy is not reading.
        Until it catches up, no Pong and no reading of its frames; after
        L{AgentSettings.write_stall_timeout} the connection is aborted.
        """
        if self.write_blocked or not self._producing:
            return
        self.write_blocked = True
        self.stats["write_blocks"] += 1
        self._blocked_since = self.clock.seconds()
        timeout = self.settings.write_stall_timeout
        self._stall_timer = self.clock.callLater(timeout, self._write_stalled)
        self.log_limiter.warn(
            log,
            "proxy-not-reading",
            "Proxy {proxy_id} is not reading connection {connection_id} of agent {agent_id}; "
            "its frames are left unread and its Pings unanswered until it catches up "
            "(aborting the connection after {timeout})",
            proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            agent_id=self.settings.agent_id,
            timeout=format_duration(timeout),
        )
        # What the proxy sends waits in the sockets' buffers, and then in
        # the proxy: it cannot make the agent buffer more than it has read.
        self._pause_reading(True)

    def resumeProducing(self) -> None:
        """The transport's write buffer drained: the proxy reads again."""
        if not self.write_blocked:
            return
        self.write_blocked = False
        self._stop_stall_timer()
        self.log_limiter.info(
            log,
            "proxy-reading-again",
            "Proxy {proxy_id} is reading connection {connection_id} of agent {agent_id} again",
            proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            agent_id=self.settings.agent_id,
        )
        self._pause_reading(False)

    def stopProducing(self) -> None:
        """The transport is going away; L{connectionLost} does the rest."""

    def _pause_reading(self, pause: bool) -> None:
        transport: Any = self.transport
        if transport is None or self._transport_gone or getattr(transport, "disconnecting", False):
            return
        # A socket transport is a producer of what it reads; a TLS
        # transport passes the call to the socket's.
        method = getattr(transport, "pauseProducing" if pause else "resumeProducing", None)
        if method is not None:
            method()

    def _write_stalled(self) -> None:
        """The proxy left our writes unread too long: abort (a dialled connection is dialled again)."""
        self._stop_stall_timer()
        blocked = format_duration(round(self.clock.seconds() - self._blocked_since, 3))
        detail = f"proxy stopped reading: write buffer full for {blocked}"
        self.stats["write_stalls"] += 1
        self.log_limiter.warn(
            log,
            "proxy-stalled",
            "Agent {agent_id} aborting connection {connection_id} with proxy {proxy_id}: {detail}",
            agent_id=self.settings.agent_id,
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
            detail=detail,
        )
        self._abort_on_close = True
        self._lifecycle.close(detail)

    def _stop_stall_timer(self) -> None:
        timer, self._stall_timer = self._stall_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- public control ---------------------------------------------------------

    def drain(self, grace: float) -> Deferred[None]:
        """
        Stop taking events (FlowControl pause, HealthStatus draining), let
        in-flight handlers finish for up to C{grace} seconds, cancel what
        is left, and close.  Fires when the connection is gone.
        """
        waiter = self._core.wait_lost()
        self._lifecycle.drain(grace)
        return waiter

    def when_lost(self) -> Deferred[None]:
        """Fires when the connection is gone (at once if it is)."""
        return self._core.wait_lost()

    def close(self, detail: str = "closed by agent") -> Deferred[None]:
        """Close now, cancelling in-flight handlers; fires when gone."""
        waiter = self._core.wait_lost()
        self._lifecycle.close(detail)
        return waiter

    # -- registration -------------------------------------------------------------

    def _registration_frame(self, message_type: int, payload: bytes) -> None:
        if message_type != MessageType.HANDSHAKE_RESPONSE:
            self._lifecycle.refused(
                RegistrationFailed(
                    "expected registration response (HandshakeResponse), got "
                    + MessageType(message_type).wire_name
                )
            )
            return
        try:
            response = m.decode(payload, m.RegistrationResponse)
        except InvalidMessage as e:
            self._lifecycle.refused(RegistrationFailed(f"malformed RegistrationResponse: {e}"))
            return
        if response.success:
            self._lifecycle.registered(response)
        else:
            self._lifecycle.refused(
                RegistrationRejected(response.error or "(no reason given)", response.proxy_id)
            )

    # -- outputs of the lifecycle machine ------------------------------------------

    def enter_serving(self, response: m.RegistrationResponse) -> None:
        """Lifecycle: the proxy accepted the registration; serve events."""
        self.registered = True
        self.MAX_LENGTH = MAX_MESSAGE_SIZE
        self.connection_id = response.connection_id
        self.proxy_id = response.proxy_id
        self.proxy_version = response.proxy_version
        self._on_frame = self._serving_frame
        transport = self.transport
        if transport is not None:
            # Back-pressure: the transport pauses us when the proxy stops
            # reading and the write buffer fills, and resumes us when it drains.
            transport.registerProducer(self, True)  # type: ignore[attr-defined]
            self._producing = True
        self._log_serving()
        if self.capabilities is not None and self.capabilities.features.health_reporting:
            self._health = LoopingCall(self.send_health)
            self._health.clock = self.clock
            if self.settings.health_interval > 0:
                self._health.start(self.settings.health_interval, now=True)
            else:
                self.send_health()
        if self.observer is not None:
            self.observer.connection_registered(self)

    def _log_cycle(self, kind: str, format: str, /, **fields: Any) -> None:
        if self.log_key is None:
            log.info(format, **fields)
        else:
            self.log_limiter.info(log, f"{self.log_key}:{kind}", format, **fields)

    def _log_serving(self) -> None:
        self._log_cycle(
            "registered",
            "Agent {agent_id} registered connection {connection_id} with proxy {proxy_id} "
            "{proxy_version} (serving up to {limit} events at once)",
            agent_id=self.settings.agent_id,
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
            proxy_version=peer_text(self.proxy_version, _PROXY_TEXT_IN_LOG),
            limit=self.limit,
        )

    def refuse(self, error: AgentProtocolError) -> None:
        """Lifecycle: the proxy refused the registration (C{error}); close."""
        self._on_frame = self._ignore_frame
        self.stop_parsing()
        self._close_detail = str(error)
        if self.observer is not None:
            self.observer.registration_refused(self, error)
        self._lose()

    def abandon(self, detail: str) -> None:
        """Lifecycle: give up before registering (unreadable answer, timeout); close."""
        self._on_frame = self._ignore_frame
        self.stop_parsing()
        self._close_detail = detail
        self._lose()

    def lost_unregistered(self, detail: str) -> None:
        """Lifecycle: the connection ended before the proxy answered the registration."""
        self._on_frame = self._ignore_frame
        if self.observer is not None:
            self.observer.registration_refused(
                self, RegistrationFailed(f"{detail} before {self._opening}")
            )

    def begin_drain(self, grace: float) -> IDelayedCall:
        """
        Lifecycle: report C{draining}, finish the events in flight, and close
        when they are done or after C{grace} seconds (the returned call).
        """
        self.draining = True
        log.info(
            "Agent {agent_id} draining connection {connection_id}: {count} event(s) in flight, "
            "grace period {grace}",
            agent_id=self.settings.agent_id,
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            count=self.load,
            grace=format_duration(grace),
        )
        if not self.paused:
            self.paused = True
            self._send(MessageType.FLOW_CONTROL, self.codec.pause)
        self.send_health()
        timer = self.clock.callLater(grace, self._lifecycle.drained)
        if self.load == 0:
            self._lifecycle.drained()
        return timer

    def shut(self, detail: str) -> None:
        """Lifecycle: close now, cancelling the events still in flight."""
        self._on_frame = self._ignore_frame
        self._stop_health()
        cut = self._cancel_everything()
        if cut:
            # A proxy can make this happen once per connection (an event,
            # then a frame that breaks the protocol), and connect again.
            self.log_limiter.warn(
                log,
                "closed-with-handlers",
                "Agent {agent_id} closing connection {connection_id} ({detail}); "
                "{count} unfinished handler(s) cancelled",
                agent_id=self.settings.agent_id,
                connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
                detail=detail,
                count=cut,
            )
        self.stop_parsing()
        self._close_detail = detail
        self._lose()

    def lost_serving(self, detail: str) -> None:
        """Lifecycle: a registered connection was lost; its events are cancelled."""
        self._on_frame = self._ignore_frame
        self._stop_health()
        cut = self._cancel_everything()
        self._ended(detail, cut)

    def finish_lost(self, detail: str) -> None:
        """Lifecycle: the transport is gone; tell the observer."""
        if self.registered:
            self._ended(detail, 0)

    def _ended(self, detail: str, cut: int) -> None:
        self._log_cycle(
            "connection-ended",
            "Agent {agent_id} connection {connection_id} ended: {detail}{cut}",
            agent_id=self.settings.agent_id,
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            detail=detail,
            cut=f" ({cut} unfinished handler(s) cancelled)" if cut else "",
        )
        if self.observer is not None:
            self.observer.connection_ended(self, detail)

    def _lose(self) -> None:
        """
        Close; abort if the connection is not gone C{close_grace} seconds
        later (the proxy reads nothing, or the TLS layer waits on it).
        """
        self._stop_stall_timer()
        transport: Any = self.transport
        if transport is None or self._transport_gone:
            return
        if self._producing:
            # A registered producer would hold the close back: a socket
            # resumes it rather than closing, TLS waits for it to go.
            self._producing = False
            transport.unregisterProducer()
        if self._abort_on_close:
            transport.abortConnection()
            return
        transport.loseConnection()
        if self._close_timer is None and not self._transport_gone:
            self._close_timer = self.clock.callLater(self.settings.close_grace, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_timer = None
        transport: Any = self.transport
        if transport is None or self._transport_gone:
            return
        self.log_limiter.info(
            log,
            "close-overdue",
            "Agent {agent_id} connection {connection_id} was not gone {grace} after it was closed; "
            "aborting it",
            agent_id=self.settings.agent_id,
            connection_id=peer_text(self.connection_id or "(registering)", _CONNECTION_ID_IN_LOG),
            grace=format_duration(self.settings.close_grace),
        )
        transport.abortConnection()

    def _stop_health(self) -> None:
        health, self._health = self._health, None
        if health is not None and health.running:
            health.stop()

    def _ignore_frame(self, message_type: int, payload: bytes) -> None:
        pass


class AgentClientFactory(Factory):
    """
    Builds an L{AgentProtocol} for each connection attempt.

    @cvar noisy: C{False}: no log line for each connection.
    @ivar settings: how its connections register and serve.
    @ivar clock: the clock of their timers.
    @ivar observer: told of registrations and ends of its connections, C{None}
        for nobody.
    @ivar frame_budget: the bytes its connections (and those of the
        factories it is shared with) hold in incomplete frames, against one
        limit; C{None}: not counted.
    @ivar held_event_budget: the bytes of events its connections (and
        those of the factories it is shared with) hold, against one limit;
        C{None}: only each connection's own bound applies.
    """

    noisy = False

    def __init__(
        self,
        settings: AgentSettings,
        clock: IReactorTime,
        observer: ConnectionObserver | None = None,
        log_limiter: LogRateLimiter | None = None,
        *,
        frame_budget: IncompleteFrameBudget | None = None,
        held_event_budget: HeldEventBudget | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.observer = observer
        #: Shared by every connection this factory builds.
        self.log_limiter = log_limiter if log_limiter is not None else LogRateLimiter(clock)
        self.frame_budget = frame_budget
        self.held_event_budget = held_event_budget

    def buildProtocol(self, addr: IAddress) -> AgentProtocol:  # type: ignore[override]
        protocol = AgentProtocol(
            self.settings,
            self.clock,
            self.observer,
            self.log_limiter,
            frame_budget=self.frame_budget,
            held_event_budget=self.held_event_budget,
        )
        protocol.factory = self
        return protocol
