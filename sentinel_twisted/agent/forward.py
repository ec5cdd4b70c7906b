# -*- test-case-name: tests.agent.test_forward -*-
"""
Forward mode on the agent side: the agent listens and the proxy dials it.

For each proxy connection L{ForwardAgentProtocol} waits (with a timeout and
a size limit) for the HandshakeRequest, answers a HandshakeResponse with
the agent's capabilities and the negotiated payload encoding, and from
then on serves events exactly as a reverse connection does: it is an
L{AgentProtocol} whose registration phase is replaced by the handshake.

What the reference agent (C{UdsAgentServerV2}) would answer, we answer:
a HandshakeRequest it can parse gets a HandshakeResponse, with
C{success: false} and the reason if we refuse it (ours, beyond the
reference: a proxy that does not offer protocol version 2).  What it
cannot parse (a wrong first frame, malformed JSON, a missing field) ends
the connection without an answer, as it does; so does a handshake that is
too large or does not arrive in time.  Each of these is logged with the
reason.

L{AgentListener} is the service: a server endpoint, a factory, and a
drain of every connection when it stops.

Whoever can reach the endpoint can complete a handshake (it carries no
credentials) and then hold the connection without sending anything, and
neither the reference proxy nor ours sends anything on a connection that
has no traffic (no Ping, no health check), nor answers silence.  So the
listener does not time idle connections out unless told to
(C{idle_timeout}): the reference proxy never dials a closed connection
again.  Instead, when every place is taken, a newcomer takes the place of
the connection that has been idle longest, if one has had no event in
flight for C{eviction_idle_age} seconds (one that never carried an event
first): connections held without use cannot keep a proxy out, and one
with traffic keeps its connections.  (A flood of new connections faster
than C{max_connections} per C{eviction_idle_age} still takes every place
as soon as it may be taken: an unauthenticated endpoint belongs on a
network only proxies reach.)
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .. import messages as m
from .._peertext import peer_text
from .._ratelimit import LogRateLimiter
from ..endpoints import RefusedConnection, remove_abandoned_unix_socket
from ..errors import AgentProtocolError, InvalidMessage, format_duration
from ..forward import (
    ENCODINGS,
    JSON,
    HandshakeResponse,
    codec_for,
    decode_handshake_request,
    negotiate_encoding,
)
from ..wire import MAX_INCOMPLETE_FRAME_BYTES, MAX_MESSAGE_SIZE, IncompleteFrameBudget, MessageType
from ._interfaces import IAgent
from ._serving import _PROXY_TEXT_IN_LOG
from .budget import DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES, HeldEventBudget
from .errors import HandshakeFailed
from .protocol import AgentProtocol, AgentSettings, ConnectionObserver

__all__ = [
    "DEFAULT_EVICTION_IDLE_AGE",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_HANDSHAKE_SIZE",
    "AgentListener",
    "ForwardAgentFactory",
    "ForwardAgentProtocol",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.agent.forward")

#: Largest HandshakeRequest frame accepted (type byte plus payload).  The
#: reference proxy's is about 150 bytes; the limit only bounds what an
#: unauthenticated peer can make us buffer before it has said anything.
MAX_HANDSHAKE_SIZE = 64 * 1024
#: Seconds a proxy has to send its HandshakeRequest after connecting.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Proxy connections a listener holds at once by default, handshaking or
#: serving: 64 proxies dialling with the usual 4 connections each.  The
#: handshake carries no credentials, so whoever can reach the endpoint
#: can connect.
DEFAULT_MAX_CONNECTIONS = 256
#: Seconds a connection must have had no event in flight (nor a frame
#: partly read) before a newcomer may take its place when every place is
#: taken: a proxy's handshake or event on its way, not read yet, is not cut
#: short.  A frame partly read counts from when the first one since the
#: connection's last event began: frames that are no event (a Pong, an
#: invalid event), each write ending partway through the next, do not
#: keep a connection from being idle.
DEFAULT_EVICTION_IDLE_AGE = 1.0


class ForwardAgentProtocol(AgentProtocol):
    """
    One proxy connection to a listening agent.  Built by L{ForwardAgentFactory}.

    @ivar connection_id: the connection's id, for logs.
    @ivar handshake_timeout: seconds the proxy has to send its
        HandshakeRequest.
    @ivar encodings: the payload encodings it may choose.
    @ivar MAX_LENGTH: the longest frame accepted, in bytes: the handshake
        limit until the handshake is done.
    @ivar proxy_id: the proxy's id, from its HandshakeRequest.
    @ivar proxy_version: the proxy's version, from its HandshakeRequest.
    @ivar codec: the negotiated payload encoding's codec.
    @ivar log_key: C{"forward"}: its serving and ended lines go through the
        listener's rate limiter, a few per period for all its connections,
        since whoever can reach the endpoint can open and close connections
        in a loop.
    """

    log_key = "forward"
    _opening = "the proxy's handshake"
    # Entries of a HandshakeRequest's supported_versions quoted in a refusal.
    _VERSIONS_SHOWN = 8

    def __init__(
        self,
        settings: AgentSettings,
        clock: IReactorTime,
        observer: ConnectionObserver | None = None,
        *,
        connection_id: str = "",
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshake_size: int = MAX_HANDSHAKE_SIZE,
        encodings: tuple[str, ...] = ENCODINGS,
        log_limiter: LogRateLimiter | None = None,
        frame_budget: IncompleteFrameBudget | None = None,
        held_event_budget: HeldEventBudget | None = None,
    ) -> None:
        super().__init__(
            settings,
            clock,
            observer,
            log_limiter,
            frame_budget=frame_budget,
            held_event_budget=held_event_budget,
        )
        self.connection_id = connection_id
        self.handshake_timeout = handshake_timeout
        self.encodings = encodings
        #: The negotiated payload encoding (JSON until the handshake says otherwise).
        self.encoding = JSON
        # Bounded from the first byte: the framing refuses a longer
        # handshake before buffering it.
        self.MAX_LENGTH = min(max_handshake_size, MAX_MESSAGE_SIZE)
        self._on_frame = self._handshake_frame
        #: The listener's check of its idle time, C{None} when none waits.
        self.idle_timer: IDelayedCall | None = None
        # When the first frame partly read since its last event began
        # (see quiet_since).
        self._partial_since: float | None = None
        #: Whether an event has been in flight on it (a newcomer takes the
        #: place of a connection that has never carried one first).
        self.carried_events = False

    def __repr__(self) -> str:
        return (
            f"<ForwardAgentProtocol agent={self.settings.agent_id} connection={self.connection_id} "
            f"encoding={self.encoding} in_flight={self.in_flight}>"
        )

    def connectionMade(self) -> None:
        try:
            capabilities = self.agent.capabilities(self.settings.agent_id)
        except Exception as e:
            # Once per connection a proxy opens: a few lines per period.
            self.log_limiter.emit(
                log,
                LogLevel.critical,
                "capabilities-failed",
                "Agent {agent_id}: cannot build its capabilities",
                log_failure=Failure(),
                agent_id=self.settings.agent_id,
            )
            self._lifecycle.refused(HandshakeFailed(f"cannot build the agent's capabilities: {e}"))
            return
        self.take_capabilities(capabilities)
        timeout = self.handshake_timeout
        self._core.timer = self.clock.callLater(
            timeout,
            self._lifecycle.refused,
            HandshakeFailed(f"no HandshakeRequest within {format_duration(timeout)}"),
        )

    def frame_error(self, error: AgentProtocolError) -> None:
        if not self.registered:
            error = HandshakeFailed(str(error))
        super().frame_error(error)

    def handshakeCompleted(self) -> None:
        # A TLS server has nothing to send first: the proxy speaks first.
        pass

    # -- the handshake ----------------------------------------------------------

    def _handshake_frame(self, message_type: int, payload: bytes) -> None:
        if message_type != MessageType.HANDSHAKE_REQUEST:
            self._lifecycle.refused(
                HandshakeFailed("expected HandshakeRequest, got " + MessageType(message_type).wire_name)
            )
            return
        try:
            request = decode_handshake_request(payload)
        except InvalidMessage as e:
            self._lifecycle.refused(HandshakeFailed(f"malformed HandshakeRequest: {e}"))
            return
        self.proxy_id = request.proxy_id
        self.proxy_version = request.proxy_version
        encoding = negotiate_encoding(request.supported_encodings, self.encodings)
        if m.PROTOCOL_VERSION not in request.supported_versions:
            reason = (
                f"Protocol version mismatch: expected {m.PROTOCOL_VERSION}, "
                f"got {self._versions_text(request.supported_versions)}"
            )
            self._answer(False, reason, encoding)
            self._lifecycle.refused(HandshakeFailed(reason))
            return
        self._answer(True, None, encoding)
        self.encoding = encoding
        self.codec = codec_for(encoding)
        self.MAX_LENGTH = MAX_MESSAGE_SIZE
        # Idle from its handshake until its first event.
        self.idle_since = self.clock.seconds()
        self._went_idle()
        # The lifecycle's "registered" input carries who the proxy is and
        # the connection's name, as a reverse registration's answer does.
        self._lifecycle.registered(
            m.RegistrationResponse(
                success=True,
                error=None,
                proxy_id=request.proxy_id,
                proxy_version=request.proxy_version,
                connection_id=self.connection_id,
            )
        )

    def _versions_text(self, versions: list[int]) -> str:
        # The proxy's list as it sent it ("[7]", "[1, 3]"), or its first
        # entries and their count: the list has no length limit of its own,
        # and this text is logged and sent back in the answer's error.
        if len(versions) <= self._VERSIONS_SHOWN:
            return str(versions)
        shown = ", ".join(str(v) for v in versions[: self._VERSIONS_SHOWN])
        return f"[{shown}, ... ({len(versions):,} versions)]"

    def _answer(self, success: bool, error: str | None, encoding: str) -> None:
        assert self.capabilities is not None
        response = HandshakeResponse(
            protocol_version=m.PROTOCOL_VERSION,
            capabilities=self.capabilities,
            success=success,
            error=error,
            encoding=encoding,
        )
        self.send_frame(MessageType.HANDSHAKE_RESPONSE, m.encode(response))

    # -- the listener's idle policy ----------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether it is closing or gone (the agent or the proxy ended it)."""
        return self._close_detail is not None or self._transport_gone or self.draining

    @property
    def quiet_since(self) -> float | None:
        """
        Since when it has carried nothing, for the listener's idle policy;
        C{None} while an event is in flight.  A frame partly read counts
        from when the first frame since its last event began, not from the
        latest: a peer that sends a Pong (or an invalid event) and the first
        bytes of the next frame in each write, never a whole event, would
        otherwise always be partway through a frame, never idle.
        """
        if self._active or self._queue:
            return None
        since = self.idle_since
        partial = self._partial_since
        if self.mid_frame and partial is not None and partial > since:
            return partial
        return since

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.mid_frame:
            partial = self._partial_since
            if partial is None or partial < self.idle_since:
                # The first frame partly read since the last event ended
                # (or since the handshake, or the connection was made).
                self._partial_since = self.clock.seconds()

    def _went_busy(self) -> None:
        self.carried_events = True
        factory = self.factory
        if isinstance(factory, ForwardAgentFactory):
            factory.went_busy(self)

    def _went_idle(self) -> None:
        factory = self.factory
        if isinstance(factory, ForwardAgentFactory) and not self.closing:
            factory.went_idle(self)

    def evict(self, detail: str) -> None:
        """
        Abort it to make room for a new connection: it is idle, so nothing
        in flight is lost, and its place is free at once.
        """
        self.stats["evicted"] += 1
        self._abort_on_close = True
        self._lifecycle.close(detail)

    def stop_idle_timer(self) -> None:
        """Cancel the listener's idle check, if one waits."""
        timer, self.idle_timer = self.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- lifecycle outputs that differ from a reverse connection ----------------

    def _log_serving(self) -> None:
        self.log_limiter.info(
            log,
            f"{self.log_key}:registered",
            "Agent {agent_id} serving proxy {proxy_id} {proxy_version} on forward connection "
            "{connection_id} ({encoding}; up to {limit} events at once)",
            agent_id=self.settings.agent_id,
            proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
            proxy_version=peer_text(self.proxy_version, _PROXY_TEXT_IN_LOG),
            connection_id=self.connection_id,
            encoding=self.encoding,
            limit=self.limit,
        )

    def lost_unregistered(self, detail: str) -> None:
        """Lifecycle: the connection ended before the proxy's handshake."""
        self._on_frame = self._ignore_frame
        if self.observer is not None:
            self.observer.registration_refused(self, HandshakeFailed(f"{detail} before the handshake"))


class ForwardAgentFactory(Factory):
    """
    Builds a L{ForwardAgentProtocol} for each proxy connection, logs the
    handshakes that fail, and keeps the connections so that they can be
    drained together.

    @cvar noisy: C{False}: no log line for each connection.
    @ivar settings: how its connections serve.
    @ivar clock: the clock of their timers.
    @ivar handshake_timeout: seconds a proxy has to send its HandshakeRequest.
    @ivar max_handshake_size: the longest HandshakeRequest accepted, in bytes.
    @ivar encodings: the payload encodings it may choose, in order of
        preference.
    @ivar frame_budget: the bytes its connections hold in incomplete frames
        (each may declare up to 16 MiB once past its handshake), against one
        limit (pass one to share it, with a connector for instance); over
        it the connection holding the most is aborted.
    @ivar held_event_budget: the bytes of events its connections hold
        (pass one to share it, with a connector for instance), against one
        limit; past it an event is answered at once with the error
        decision, status 503.
    @ivar max_connections: connections held at once, handshaking or
        serving.  With every place taken, a new connection takes the place
        of the one idle longest (see C{eviction_idle_age}), or is closed as
        soon as it is made if none is idle long enough.
    @ivar eviction_idle_age: seconds a connection must have been idle (no
        event in flight, no frame partly read, see
        L{ForwardAgentProtocol.quiet_since}) before a new connection may
        take its place; C{None}: never, new connections are closed instead.
        A connection that has never carried an event goes first (one still
        waiting for its handshake, or one that has sent nothing since, or
        only events answered at once: invalid, or over a limit),
        then the one idle longest; one with an event in flight never.
    @ivar idle_timeout: seconds a connection past its handshake may go
        without an event in flight (see L{ForwardAgentProtocol.quiet_since})
        before it is closed; 0: never.  Pings do not count: neither the reference proxy nor ours sends any on a
        connection without traffic, and the reference proxy does not dial
        a closed connection again, so only set it when every proxy that
        dials redials (ours does, see C{AgentPool.connect_agent}).
    @ivar refused_connections: connections closed for being over
        C{max_connections}, none being idle long enough to make room.
    @ivar evicted_connections: idle connections closed to make room for a
        new one.
    @ivar idle_closed_connections: connections closed for being idle
        C{idle_timeout} seconds.
    """

    noisy = False

    def __init__(
        self,
        settings: AgentSettings,
        clock: IReactorTime,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshake_size: int = MAX_HANDSHAKE_SIZE,
        encodings: tuple[str, ...] = ENCODINGS,
        frame_budget: IncompleteFrameBudget | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        held_event_budget: HeldEventBudget | None = None,
        idle_timeout: float = 0.0,
        eviction_idle_age: float | None = DEFAULT_EVICTION_IDLE_AGE,
    ) -> None:
        if not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive, got {handshake_timeout!r}")
        if not max_connections >= 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
        if not (isinstance(idle_timeout, (int, float)) and 0 <= idle_timeout < float("inf")):
            raise ValueError(f"idle_timeout must be 0 (never) or a positive number, got {idle_timeout!r}")
        if eviction_idle_age is not None and not 0 <= eviction_idle_age < float("inf"):
            raise ValueError(f"eviction_idle_age must be None or not negative, got {eviction_idle_age!r}")
        for name in encodings:
            codec_for(name)
        self.settings = settings
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.max_handshake_size = max_handshake_size
        self.encodings = encodings
        #: Rate limits the warnings proxies can cause per frame or per
        #: connection, across all of this listener's connections.
        self.log_limiter = LogRateLimiter(clock)
        #: Every connection from accept to close, handshaking or serving.
        self.connections: set[ForwardAgentProtocol] = set()
        # The connections without an event in flight, in the order of their
        # idle_since (each goes to the end when it changes, to now): those
        # that have never had one in flight, and the others.  So a newcomer
        # finds the one to close from the oldest on, without a scan of
        # every connection (with many places and a flood of connections,
        # that scan would take the reactor).
        # (OrderedDicts: a plain dict's iteration walks past the holes its
        # deletions from the front leave, until it is resized.)
        self._never_used: OrderedDict[ForwardAgentProtocol, None] = OrderedDict()
        self._used: OrderedDict[ForwardAgentProtocol, None] = OrderedDict()
        self.frame_budget = frame_budget if frame_budget is not None else IncompleteFrameBudget()
        self.held_event_budget = held_event_budget if held_event_budget is not None else HeldEventBudget()
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.eviction_idle_age = eviction_idle_age
        self.refused_connections = 0
        self.evicted_connections = 0
        self.idle_closed_connections = 0
        self._serial = itertools.count(1)

    def buildProtocol(self, addr: IAddress) -> ForwardAgentProtocol | RefusedConnection:  # type: ignore[override]
        if len(self.connections) >= self.max_connections and not self._make_room():
            # The handshake carries no credentials: anyone who can reach
            # the endpoint could otherwise open connections without end.
            self.refused_connections += 1
            if self.eviction_idle_age is None:
                text = "Agent {agent_id} holds {count} proxy connections (limit {limit}); closing new ones until some end"
            else:
                text = (
                    "Agent {agent_id} holds {count} proxy connections (limit {limit}), none of them "
                    "idle for {age} or more; closing new ones until some end or go idle"
                )
            self.log_limiter.warn(
                log,
                "forward-connection-cap",
                text,
                agent_id=self.settings.agent_id,
                count=len(self.connections),
                limit=self.max_connections,
                age=format_duration(self.eviction_idle_age or 0),
            )
            return RefusedConnection()
        protocol = ForwardAgentProtocol(
            self.settings,
            self.clock,
            self,
            connection_id=f"{self.settings.agent_id}-fwd-{next(self._serial)}",
            handshake_timeout=self.handshake_timeout,
            max_handshake_size=self.max_handshake_size,
            encodings=self.encodings,
            log_limiter=self.log_limiter,
            frame_budget=self.frame_budget,
            held_event_budget=self.held_event_budget,
        )
        protocol.factory = self
        self.connections.add(protocol)
        self._never_used[protocol] = None
        protocol.when_lost().addCallback(lambda _: self._forget(protocol))
        return protocol

    def _forget(self, protocol: ForwardAgentProtocol) -> None:
        protocol.stop_idle_timer()
        self.connections.discard(protocol)
        self.went_busy(protocol)

    def went_busy(self, protocol: ForwardAgentProtocol) -> None:
        """
        C{protocol} has an event in flight (or is gone): no newcomer takes
        its place until it ends.
        """
        self._never_used.pop(protocol, None)
        self._used.pop(protocol, None)

    def went_idle(self, protocol: ForwardAgentProtocol) -> None:
        """C{protocol} is idle from now (its handshake, or the end of its events)."""
        if protocol not in self.connections:
            return
        idle = self._used if protocol.carried_events else self._never_used
        idle[protocol] = None
        idle.move_to_end(protocol)

    # -- the idle policy ----------------------------------------------------------

    def _make_room(self) -> bool:
        """
        Every place is taken: abort the connection idle longest, if one has
        been idle C{eviction_idle_age} seconds or more, preferring one that
        has never carried an event; whether there is room now.

        A proxy with traffic has its connections busy or idle only briefly,
        so a flood of connections that hold their places without using
        them makes room for it, while it keeps its own.  A connection with
        an event in flight is never closed here, nor one with a frame partly
        read (an event, or a handshake, on its way) for less than
        C{eviction_idle_age} since the first frame after its last event
        began.  The idle connections are kept in the order they went idle,
        so the search starts with the oldest and stops at the first idle
        for less than the age: its cost does not grow with the number of
        places, which a flood of connections would otherwise make the
        reactor pay for each one.
        """
        age = self.eviction_idle_age
        if age is None:
            return False
        latest = self.clock.seconds() - age
        victim: ForwardAgentProtocol | None = None
        since: float | None = None
        for candidates in (self._never_used, self._used):
            # Oldest first; the rest are idle for less than the age.
            for protocol in candidates:
                if protocol.idle_since > latest:
                    break
                since = protocol.quiet_since
                if since is not None and since <= latest and not protocol.closing:
                    victim = protocol
                    break
            if victim is not None:
                break
        if victim is None or since is None:
            return False
        self._forget(victim)
        self.evicted_connections += 1
        idle = format_duration(round(self.clock.seconds() - since, 3))
        detail = f"closed to make room for a new connection, idle for {idle}"
        self.log_limiter.warn(
            log,
            "forward-connection-evicted",
            "Agent {agent_id} holds {count} proxy connections (limit {limit}); closing connection "
            "{connection_id} of proxy {proxy_id}, idle for {idle}, to make room for a new one",
            agent_id=self.settings.agent_id,
            count=len(self.connections) + 1,
            limit=self.max_connections,
            connection_id=victim.connection_id,
            proxy_id=peer_text(victim.proxy_id or "(no handshake yet)", _PROXY_TEXT_IN_LOG),
            idle=idle,
        )
        victim.evict(detail)
        return True

    def _check_idle(self, protocol: ForwardAgentProtocol) -> None:
        """
        The idle timeout of C{protocol} may be due: close it if it has had
        no event in flight for C{idle_timeout} seconds, else look again
        when it could be.
        """
        protocol.idle_timer = None
        if protocol.closing:
            return
        timeout = self.idle_timeout
        now = self.clock.seconds()
        since = protocol.quiet_since
        if since is None or since + timeout > now:
            left = timeout if since is None else since + timeout - now
            protocol.idle_timer = self.clock.callLater(left, self._check_idle, protocol)
            return
        self.idle_closed_connections += 1
        idle = format_duration(round(now - since, 3))
        self.log_limiter.info(
            log,
            "forward-idle-timeout",
            "Agent {agent_id} closing forward connection {connection_id} of proxy {proxy_id}: "
            "no event for {idle} (idle timeout {timeout})",
            agent_id=self.settings.agent_id,
            connection_id=protocol.connection_id,
            proxy_id=peer_text(protocol.proxy_id, _PROXY_TEXT_IN_LOG),
            idle=idle,
            timeout=format_duration(timeout),
        )
        protocol.close(f"idle for {idle} (idle timeout {format_duration(timeout)})")

    @property
    def serving(self) -> list[ForwardAgentProtocol]:
        """The connections past their handshake."""
        return [p for p in self.connections if p.registered]

    def drain(self, grace: float) -> Deferred[None]:
        """Drain every connection (see L{AgentProtocol.drain}); fires when all are gone."""
        drains = [p.drain(grace) for p in list(self.connections)]
        if not drains:
            return succeed(None)
        done: Deferred[Any] = DeferredList(drains, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # -- ConnectionObserver ------------------------------------------------------

    def connection_registered(self, protocol: AgentProtocol) -> None:
        """A proxy completed its handshake: its idle time counts from now; see L{ConnectionObserver}."""
        if self.idle_timeout > 0 and isinstance(protocol, ForwardAgentProtocol):
            protocol.idle_timer = self.clock.callLater(self.idle_timeout, self._check_idle, protocol)

    def registration_refused(self, protocol: AgentProtocol, error: AgentProtocolError) -> None:
        """A proxy's handshake failed: say why; see L{ConnectionObserver}."""
        self.log_limiter.warn(
            log,
            "forward-handshake-failed",
            "Agent {agent_id}: forward connection {connection_id} closed: {error}",
            agent_id=self.settings.agent_id,
            connection_id=protocol.connection_id,
            error=peer_text(error),
        )

    def connection_ended(self, protocol: AgentProtocol, detail: str) -> None:
        """A served connection ended (its protocol logged it); see L{ConnectionObserver}."""


class AgentListener(Service):
    """
    Serves an agent in forward mode: listens on a server endpoint and
    answers every proxy that connects.  Stopping stops listening, then
    drains the connections (in-flight handlers get C{drain_grace} seconds).

    @param agent: the L{IAgent} that answers the events.
    @param endpoint: a server endpoint string (C{unix:/run/waf.sock:mode=600})
        or endpoint object.
    @param agent_id: the id announced in the capabilities.
    @param encodings: payload encodings offered to the proxy's choice
        (JSON is always possible).
    @param max_connections: proxy connections held at once (see
        L{ForwardAgentFactory}).
    @param max_incomplete_frame_bytes: the bytes all its connections may
        hold in incomplete frames (see L{ForwardAgentFactory}).
    @param frame_budget: an L{IncompleteFrameBudget
        <sentinel_twisted.wire.IncompleteFrameBudget>} to share (with a
        connector, say) instead of one of C{max_incomplete_frame_bytes}.
    @param max_total_held_event_bytes: the bytes of events all its
        connections may hold at once (see L{ForwardAgentFactory}).
    @param held_event_budget: a L{HeldEventBudget
        <sentinel_twisted.agent.budget.HeldEventBudget>} to share (with a
        connector, say) instead of one of C{max_total_held_event_bytes}.
    @param idle_timeout: seconds a connection may go without an event in
        flight before it is closed; 0 (the default): never (see
        L{ForwardAgentFactory}).
    @param eviction_idle_age: seconds a connection must have been idle for
        a new one to take its place when every place is taken; C{None}:
        never (see L{ForwardAgentFactory}).
    @param settings_options: the rest of L{AgentSettings} (C{health_interval},
        C{max_concurrency}, C{max_queued}, C{max_held_event_bytes},
        C{max_event_values}, C{fail_open}, C{close_grace}, C{frame_timeout},
        C{write_stall_timeout}).
    @ivar reactor: the reactor it listens on.
    @ivar settings: how its connections serve (L{AgentSettings
        <sentinel_twisted.agent.protocol.AgentSettings>}).
    @ivar endpoint_description: the endpoint as given, for logs.
    @ivar endpoint: the server endpoint.
    @ivar drain_grace: seconds in-flight handlers get when it stops.
    @ivar factory: builds the protocol of each proxy connection.
    @ivar port: the listening port, C{None} when not listening.
    @ivar running: whether the service runs (as for any L{Service
        <twisted.application.service.Service>}); reset when listening fails.
    """

    def __init__(
        self,
        agent: IAgent,
        endpoint: str | IStreamServerEndpoint,
        agent_id: str,
        *,
        reactor: Any = None,
        drain_grace: float = 30.0,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshake_size: int = MAX_HANDSHAKE_SIZE,
        encodings: tuple[str, ...] = ENCODINGS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_incomplete_frame_bytes: int = MAX_INCOMPLETE_FRAME_BYTES,
        frame_budget: IncompleteFrameBudget | None = None,
        max_total_held_event_bytes: int = DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES,
        held_event_budget: HeldEventBudget | None = None,
        idle_timeout: float = 0.0,
        eviction_idle_age: float | None = DEFAULT_EVICTION_IDLE_AGE,
        **settings_options: Any,
    ) -> None:
        if drain_grace < 0:
            raise ValueError(f"drain_grace must not be negative, got {drain_grace!r}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.settings = AgentSettings(agent=agent, agent_id=agent_id, **settings_options)
        if isinstance(endpoint, str):
            self.endpoint_description = endpoint
            self.endpoint: IStreamServerEndpoint = serverFromString(reactor, endpoint)
        else:
            self.endpoint_description = repr(endpoint)
            self.endpoint = endpoint
        self.drain_grace = drain_grace
        self.factory = ForwardAgentFactory(
            self.settings,
            reactor,
            handshake_timeout=handshake_timeout,
            max_handshake_size=max_handshake_size,
            encodings=encodings,
            frame_budget=(
                frame_budget if frame_budget is not None else IncompleteFrameBudget(max_incomplete_frame_bytes)
            ),
            max_connections=max_connections,
            held_event_budget=(
                held_event_budget
                if held_event_budget is not None
                else HeldEventBudget(max_total_held_event_bytes)
            ),
            idle_timeout=idle_timeout,
            eviction_idle_age=eviction_idle_age,
        )
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None

    def __repr__(self) -> str:
        return f"<AgentListener {self.settings.agent_id} on {self.endpoint_description}>"

    def startService(self) -> None:
        """Listen; a failure to listen is raised at once (or logged, for a slow endpoint)."""
        super().startService()  # type: ignore[no-untyped-call]
        listening = self.endpoint.listen(self.factory)
        failure: list[Any] = []
        listening.addCallbacks(self._listening_on, failure.append)
        if failure:
            self.running = 0
            remove_abandoned_unix_socket(self.endpoint_description, failure[0].value)
            failure[0].raiseException()
        self._listening = listening

    def _listening_on(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info(
            "Agent {agent_id} listening for proxies on {endpoint} (forward mode; encodings {encodings})",
            agent_id=self.settings.agent_id,
            endpoint=self.endpoint_description,
            encodings=", ".join(self.factory.encodings),
        )
        return port

    def stopService(self) -> Deferred[None]:
        """Stop listening, then drain every connection."""
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        stopped: Deferred[Any] = succeed(None) if port is None else maybeDeferred(port.stopListening)
        stopped.addCallback(lambda _: self.factory.drain(self.drain_grace))
        return stopped.addCallback(lambda _: None)
