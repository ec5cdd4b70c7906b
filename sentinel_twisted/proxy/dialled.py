# -*- test-case-name: tests.test_dialled -*-
"""
Forward mode on the proxy side: the proxy dials a listening agent.

L{ForwardConnectionProtocol} is the proxy's end of one dialled
connection.  On connect it sends a HandshakeRequest (0x01, JSON) offering
protocol version 2 and its payload encodings (over TLS: once the TLS
handshake is done and the agent's certificate names the host dialled, see
L{sentinel_twisted._tls}), and waits for the agent's
HandshakeResponse (0x02) under the same rules as a registration: a
timeout, a size limit, and the first frame must be the answer.  A valid
answer (C{success}, version 2, capabilities, an encoding that was offered)
makes an L{AgentConnection} speaking the negotiated encoding, which joins
the L{AgentPool} under the configured agent id or the one the agent
announces; from then on it is served exactly as a reverse connection is.
Anything else is logged with the reason and the connection is closed.

L{DialledAgentService} keeps C{N} such connections to one agent, each with
a Twisted L{ClientService <twisted.application.internet.ClientService>}:
jittered exponential backoff between attempts, reset by a connection that
stayed up L{BACKOFF_RESET_AFTER <sentinel_twisted._redial.BACKOFF_RESET_AFTER>}
(10) seconds after its handshake: not by a mere connect, so an agent that accepts and refuses is
not redialled at full speed, and not by the handshake alone, so neither is
one that answers and drops the connection.  The lines each attempt logs
(dialled, disconnected, the retry) are rate-limited per connection slot.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import __version__
from .. import messages as m
from .._peertext import first_hidden, peer_text
from .._ratelimit import LogRateLimiter
from .._redial import BACKOFF_RESET_AFTER, QuietClientService, RedialBackoff
from .._tls import check_server_name, server_identity_error, tls_failure
from ..errors import (
    AgentProtocolError,
    ConnectionLimitReached,
    InvalidMessage,
    MessageTooLarge,
    RequestTimeout,
    VersionMismatch,
)
from ..forward import ENCODINGS, HandshakeRequest, HandshakeResponse, codec_for
from ..wire import MAX_MESSAGE_SIZE, IncompleteFrameBudget, MessageType
from ._registration import new_lifecycle
from .config import ReverseConnectionConfig
from .connection import AgentConnection
from .protocol import _CONNECTION_DONE, _PooledConnectionProtocol, describe_peer

if TYPE_CHECKING:
    from .pool import AgentPool

__all__ = [
    "MAX_HANDSHAKE_RESPONSE_SIZE",
    "DialledAgentService",
    "ForwardConnectionFactory",
    "ForwardConnectionProtocol",
    "HandshakeRefused",
    "TLSFailed",
    "default_retry_policy",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.dialled")

#: Largest HandshakeResponse frame accepted (type byte plus payload).  The
#: reference agent's is about 400 bytes; the limit bounds what a peer that
#: has not yet said who it is can make us buffer.
MAX_HANDSHAKE_RESPONSE_SIZE = 64 * 1024

_ID_IN_LOG = 64
_TEXT_IN_LOG = 160

_serial = itertools.count(1)
# Names each connection slot's kinds of log line in the rate limiter.
_slots = itertools.count(1)


def default_retry_policy() -> Callable[[int], float]:
    """
    Seconds before the next attempt after C{n} failed ones in a row:
    0.5 s doubling up to 30 s, plus up to a quarter of that at random so
    that the connections of many proxies do not dial in step.
    """
    policy = backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0, jitter=lambda: 0.0)
    return lambda attempt: (delay := policy(attempt - 1)) + random.random() * delay / 4


class HandshakeRefused(AgentProtocolError):
    """The agent answered the HandshakeResponse with C{success: false}."""

    def __init__(self, error: str | None) -> None:
        super().__init__(f"Agent refused the handshake: {error or '(no reason given)'}")


class TLSFailed(AgentProtocolError):
    """
    The agent's TLS certificate was not verified (it does not name the host
    dialled, has no subjectAltName, or does not chain to the trusted CAs),
    or the TLS handshake failed otherwise.  Its text says which.
    """


def failure_reason(error: AgentProtocolError) -> str:
    """A short, stable label for metrics and logs: why a handshake failed."""
    if isinstance(error, HandshakeRefused):
        return "refused"
    if isinstance(error, TLSFailed):
        return "tls"
    if isinstance(error, VersionMismatch):
        return "version"
    if isinstance(error, ConnectionLimitReached):
        return "connection_limit"
    if isinstance(error, RequestTimeout):
        return "handshake_timeout"
    if isinstance(error, MessageTooLarge):
        return "frame_too_large"
    if isinstance(error, InvalidMessage):
        return "invalid_message"
    return "other"


class ForwardConnectionProtocol(_PooledConnectionProtocol):
    """
    One dialled agent connection on the proxy side.  Built by L{ForwardConnectionFactory}.

    @ivar factory: the factory of its connection slot.
    @ivar connection: the connection in the pool once the handshake succeeds,
        else C{None}.
    @ivar peer: the agent's address for logs (its endpoint as given for a UNIX
        socket), C{unknown} before the connection is made.
    @ivar MAX_LENGTH: the longest frame accepted, in bytes: the handshake
        limit until the handshake succeeds.
    @ivar MAX_CONTROL_LENGTH: the longest small control frame read, in
        bytes; a longer one is skipped once the handshake succeeded.
    @ivar frame_clock: the factory's clock, for the frame deadline.
    """

    peer_role = "agent"
    # Over TLS the HandshakeRequest waits for the TLS handshake and the
    # check of the agent's certificate (see handshakeCompleted).
    _request_held = False
    # Why the connection failed at the TLS layer before the handshake, if it did.
    _tls_problem: str | None = None

    def __init__(self, factory: ForwardConnectionFactory) -> None:
        self.factory = factory
        self.connection: AgentConnection | None = None
        self.peer = "unknown"
        self._lifecycle, self._core = new_lifecycle(self)
        self.frame_received = self._handshake_frame  # type: ignore[method-assign]
        # Until the handshake a HandshakeResponse is all that may come.
        self.MAX_LENGTH = min(MAX_MESSAGE_SIZE, factory.max_handshake_size)

    def __repr__(self) -> str:
        return f"<ForwardConnectionProtocol {self.factory.description} connection={self.connection!r}>"

    # -- Twisted protocol -----------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = describe_peer(self.transport)
        if self.peer in ("unix", "unknown"):
            self.peer = self.factory.description
        self._core.handshake_timer = self.factory.clock.callLater(
            self.factory.config.handshake_timeout, self._lifecycle.handshake_timed_out
        )
        if self._tls_handshake_pending:
            # Nothing goes out before the agent's certificate is verified:
            # the TLS layer would send it as soon as its handshake is done.
            # The handshake fails unless the certificate names the agent
            # dialled.
            check_server_name(self.transport)
            self._request_held = True
            return
        self.send_frame(MessageType.HANDSHAKE_REQUEST, self.factory.handshake_request)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done: check that the agent's certificate names
        the host dialled (Twisted lets one without any subjectAltName
        through), then send the HandshakeRequest; else fail the handshake
        (C{tls}) and abort.
        """
        super().handshakeCompleted()
        if not self._request_held:
            return
        self._request_held = False
        transport: Any = self.transport
        if transport is None or self._transport_gone or getattr(transport, "disconnecting", False):
            return
        problem = server_identity_error(transport, "agent")
        if problem is not None:
            # Nothing was written: no close handshake to wait for.
            self._abort_on_close = True
            self._lifecycle.registration_refused(TLSFailed(problem), "")
            return
        self.send_frame(MessageType.HANDSHAKE_REQUEST, self.factory.handshake_request)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        error = reason.value
        if self.connection is None and error is not None:
            # A TLS failure before the handshake (a certificate for another
            # host, an untrusted CA) is a TLS failure, not a missing answer.
            self._tls_problem = tls_failure(error, "agent", handshake_done=not self._tls_handshake_pending)
        super().connectionLost(reason)

    # -- the handshake --------------------------------------------------------

    def _handshake_frame(self, message_type: int, payload: bytes) -> None:
        if message_type != MessageType.HANDSHAKE_RESPONSE:
            error = InvalidMessage("Expected HandshakeResponse, got " + MessageType(message_type).wire_name)
            self._lifecycle.registration_refused(error, "")
            return
        try:
            response = m.decode(payload, HandshakeResponse)
        except AgentProtocolError as e:
            self._lifecycle.registration_refused(InvalidMessage(f"Invalid HandshakeResponse: {e}"), "")
            return
        agent_id, refusal = self.factory.admit(response)
        if refusal is not None:
            self._lifecycle.registration_refused(refusal, agent_id)
            return
        connection = self.factory.create_connection(self, agent_id, response)
        self._lifecycle.registration_accepted(connection)

    # -- outputs of the lifecycle machine ----------------------------------

    def enter_registered(self, connection: AgentConnection) -> None:
        """Lifecycle: the handshake succeeded; serve C{connection}."""
        self._serve(connection)

    def reject(self, error: AgentProtocolError, agent_id: str) -> None:
        """Lifecycle: the handshake failed; log it and close."""
        self.frame_received = self._ignore_frame  # type: ignore[method-assign]
        self.stop_parsing()
        self.factory.handshake_failed(error, agent_id)
        self._close_detail = f"handshake failed: {error}"
        self._end_transport()

    def handshake_expired(self) -> None:
        """Lifecycle: no HandshakeResponse within the handshake timeout."""
        self.reject(RequestTimeout(self.factory.config.handshake_timeout), "")

    def drop(self, detail: str) -> None:
        """Lifecycle: closed by the proxy before the handshake completed."""
        self.frame_received = self._ignore_frame  # type: ignore[method-assign]
        self.stop_parsing()
        self._close_detail = detail
        self._end_transport()

    def left_unregistered(self, detail: str) -> None:
        """Lifecycle: the connection ended before the handshake completed."""
        problem = self._tls_problem
        if problem is not None:
            self.factory.handshake_failed(TLSFailed(problem), "")
            return
        self.factory.handshake_failed(InvalidMessage(f"no HandshakeResponse: {detail}"), "")

    def finish_lost(self, detail: str) -> None:
        """Lifecycle: the transport is gone; wake whoever waits for the close."""
        if self.connection is not None:
            self.connection.connection_lost(detail)


class ForwardConnectionFactory(Factory):
    """
    Builds the protocol of one dialled connection slot, checks handshakes,
    and puts connections that pass into the pool.

    @ivar agent_id: the id connections join the pool under; C{None}: the
        one the agent announces in C{capabilities.agent_id}.
    @ivar encodings: the payload encodings offered, in order of preference.
    @ivar connection: the slot's connection while it is in the pool.
    @ivar backoff: the attempts in a row that failed, which the delay
        before the next dial grows with: those that ended without a
        successful handshake, and those whose connection was lost less than
        C{backoff_reset_after} seconds after it.
    @ivar failures: failed handshakes counted by L{failure_reason}.
    @cvar noisy: C{False}: no log line for each connection made and lost
        (L{Factory <twisted.internet.protocol.Factory>}).
    @ivar pool: where connections go once their handshake succeeds.
    @ivar description: the agent's endpoint as given, for logs and errors.
    @ivar config: the limits and timeouts it applies (a
        L{ReverseConnectionConfig
        <sentinel_twisted.proxy.config.ReverseConnectionConfig>}).
    @ivar clock: the clock of its timers.
    @ivar max_handshake_size: the longest HandshakeResponse accepted, in
        bytes.
    @ivar frame_budget: the account of bytes held in incomplete frames it
        shares, C{None}: not counted.
    @ivar log_limiter: rate limits the log lines the agent can cause.
    @ivar log_key: names this slot's kinds of line in C{log_limiter} (its
        dialled, disconnected and retry lines are limited apart from other
        slots').
    @ivar retry_policy: seconds to wait before the next dial, from the failed
        attempts in a row.
    @ivar handshake_request: the encoded HandshakeRequest each of its
        connections sends first.
    @ivar handshakes: handshakes that succeeded.
    """

    noisy = False

    def __init__(
        self,
        pool: AgentPool,
        *,
        description: str,
        agent_id: str | None = None,
        config: ReverseConnectionConfig | None = None,
        clock: IReactorTime,
        encodings: tuple[str, ...] = ENCODINGS,
        proxy_version: str = __version__,
        max_handshake_size: int = MAX_HANDSHAKE_RESPONSE_SIZE,
        frame_budget: IncompleteFrameBudget | None = None,
        log_limiter: LogRateLimiter | None = None,
        retry_policy: Callable[[int], float] | None = None,
        backoff_reset_after: float = BACKOFF_RESET_AFTER,
    ) -> None:
        for name in encodings:
            codec_for(name)  # ValueError for an unknown name
        if not encodings:
            raise ValueError("offer at least one payload encoding")
        self.pool = pool
        self.description = description
        self.agent_id = agent_id
        self.config = config if config is not None else ReverseConnectionConfig()
        self.clock = clock
        self.encodings = tuple(encodings)
        self.max_handshake_size = max_handshake_size
        self.frame_budget = frame_budget
        self.log_limiter = log_limiter if log_limiter is not None else LogRateLimiter(clock)
        self.retry_policy = retry_policy if retry_policy is not None else default_retry_policy()
        self.handshake_request = m.encode(
            HandshakeRequest(
                supported_versions=[m.PROTOCOL_VERSION],
                proxy_id=self.config.proxy_id,
                proxy_version=proxy_version,
                config=None,
                supported_encodings=list(self.encodings),
            )
        )
        self.connection: AgentConnection | None = None
        self.backoff = RedialBackoff(clock, backoff_reset_after)
        self.handshakes = 0
        self.log_key = f"dial-{next(_slots)}"
        self.failures: Counter[str] = Counter()

    def buildProtocol(self, addr: IAddress) -> ForwardConnectionProtocol:  # type: ignore[override]
        return ForwardConnectionProtocol(self)

    @property
    def failed_attempts(self) -> int:
        """Attempts in a row that failed (see L{backoff})."""
        return self.backoff.failures

    def retry_delay(self, attempt: int) -> float:
        """
        The L{ClientService <twisted.application.internet.ClientService>}
        retry policy: grows with the attempts that
        failed in a row (L{backoff}), not with those since the last connect.
        """
        return self.retry_policy(self.backoff.attempt_failed())

    # -- the handshake --------------------------------------------------------

    def admit(self, response: HandshakeResponse) -> tuple[str, AgentProtocolError | None]:
        """The pool id of a HandshakeResponse's agent, and why it is refused (C{None}: it is not)."""
        announced = response.capabilities.agent_id
        agent_id = self.agent_id if self.agent_id is not None else announced
        if not response.success:
            return agent_id, HandshakeRefused(response.error)
        if response.protocol_version != m.PROTOCOL_VERSION:
            return agent_id, VersionMismatch(m.PROTOCOL_VERSION, response.protocol_version)
        if response.encoding not in self.encodings:
            return agent_id, InvalidMessage(
                f"Agent chose payload encoding {response.encoding!r}, which was not offered "
                f"(offered: {', '.join(self.encodings)})"
            )
        if self.agent_id is None:
            # The id is the peer's choice: the same bounds as a registration's.
            if not agent_id:
                return agent_id, InvalidMessage("Agent ID cannot be empty (capabilities.agent_id)")
            size = len(agent_id.encode("utf-8", "surrogatepass"))
            if size > self.config.max_agent_id_length:
                return agent_id, InvalidMessage(
                    f"Agent ID is too long: {size} bytes (max: {self.config.max_agent_id_length})"
                )
            hidden = first_hidden(agent_id)
            if hidden is not None:
                return agent_id, InvalidMessage(
                    "Agent ID cannot contain control, format or separator characters "
                    f"(U+{ord(hidden[1]):04X} at position {hidden[0]})"
                )
        limit = self.config.max_connections_per_agent
        if len(self.pool.connections(agent_id)) >= limit:
            return agent_id, ConnectionLimitReached(agent_id, limit)
        return agent_id, None

    def create_connection(
        self, protocol: ForwardConnectionProtocol, agent_id: str, response: HandshakeResponse
    ) -> AgentConnection:
        """The L{AgentConnection} of a handshake that passed, in its negotiated encoding."""
        millis = int(time.time() * 1000)
        return AgentConnection(
            protocol,
            agent_id=agent_id,
            connection_id=f"{agent_id}-{millis:x}-f{next(_serial)}",
            capabilities=response.capabilities,
            metadata=None,
            clock=self.clock,
            request_timeout=self.config.request_timeout,
            connected_since=time.time(),
            peer=protocol.peer,
            log_limiter=self.log_limiter,
            codec=codec_for(response.encoding),
            mode="forward",
            pending_counts=self.pool.pending_counts,
        )

    # -- events from protocols ---------------------------------------------

    def connection_registered(self, connection: AgentConnection) -> None:
        """
        A handshake succeeded: add the connection to the pool.  The backoff
        starts over once it has stayed up C{backoff_reset_after} seconds.
        """
        self.backoff.connection_up()
        self.handshakes += 1
        self.pool.dial_handshakes += 1
        self.connection = connection
        self.log_limiter.info(
            log,
            f"{self.log_key}:dialled",
            "Agent {agent_id} connection {connection_id} dialled at {endpoint} ({encoding})",
            endpoint=self.description,
            encoding=connection.encoding,
            **connection.log_fields(),
        )
        self.pool.add(connection)

    def handshake_failed(self, error: AgentProtocolError, agent_id: str) -> None:
        """A handshake failed (or the connection ended first): count and log it."""
        reason = failure_reason(error)
        self.failures[reason] += 1
        self.pool.dial_failures[reason] += 1
        self.log_limiter.warn(
            log,
            "forward-handshake-failed",
            "Forward handshake with {agent} at {endpoint} failed ({reason}): {error}",
            agent=peer_text(agent_id, _ID_IN_LOG) if agent_id else "agent",
            endpoint=self.description,
            reason=reason,
            error=peer_text(error, _TEXT_IN_LOG),
        )

    def connection_gone(self, connection: AgentConnection, detail: str, failed: int) -> None:
        """A connection in the pool ended: log it and remove it from the pool."""
        if self.connection is connection:
            self.connection = None
            self.backoff.connection_lost()
        self.log_limiter.info(
            log,
            f"{self.log_key}:disconnected",
            "Agent {agent_id} connection {connection_id} disconnected: {detail}"
            " ({failed} pending request(s) failed)",
            detail=peer_text(detail, _TEXT_IN_LOG),
            failed=failed,
            **connection.log_fields(),
        )
        self.pool.remove(connection, detail)


class DialledAgentService(MultiService):
    """
    Keeps C{connections} dialled connections to one agent, each with its
    own L{ClientService <twisted.application.internet.ClientService>}; see
    L{AgentPool.connect_agent
    <sentinel_twisted.proxy.pool.AgentPool.connect_agent>}.

    Stopping it stops the redialling, gives the requests in flight on its
    connections up to C{grace} seconds, cancels the rest (Cancel reason
    4, proxy shutdown) and closes the connections.

    @ivar factories: one L{ForwardConnectionFactory} per connection slot.
    @ivar description: the agent's endpoint as given, for logs and errors.
    @ivar agent_id: the id its connections join the pool under; C{None}: the
        one the agent announces.
    @ivar grace: seconds the requests in flight get to finish when it stops.
    @ivar clock: the clock of its timers and redialling.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        pool: AgentPool,
        *,
        description: str,
        agent_id: str | None = None,
        connections: int = 1,
        grace: float = 0.0,
        clock: IReactorTime,
        **factory_options: Any,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections!r}")
        self.description = description
        self.agent_id = agent_id
        self.grace = grace
        self.clock = clock
        self.factories: list[ForwardConnectionFactory] = []
        for index in range(1, connections + 1):
            factory = ForwardConnectionFactory(
                pool, description=description, agent_id=agent_id, clock=clock, **factory_options
            )
            limit = factory.config.max_connections_per_agent
            if connections > limit:
                raise ValueError(
                    f"{connections} connections to {description} exceed the per-agent cap "
                    f"of {limit} (max_connections_per_agent)"
                )
            self.factories.append(factory)
            QuietClientService(
                endpoint, factory, retryPolicy=partial(self._retry_delay, index, factory), clock=clock
            ).setServiceParent(self)  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"<DialledAgentService {self.description} connections={len(self.factories)}>"

    def startService(self) -> None:
        factory = self.factories[0]
        log.info(
            "Dialling agent {agent_id} at {endpoint}: {count} connection(s), offering {encodings}",
            agent_id=self.agent_id if self.agent_id is not None else "(the id it announces)",
            endpoint=self.description,
            count=len(self.factories),
            encodings=", ".join(factory.encodings),
        )
        super().startService()  # type: ignore[no-untyped-call]

    def _retry_delay(self, index: int, factory: ForwardConnectionFactory, attempt: int) -> float:
        # The slot's own count (attempt is ClientService's, which starts
        # over at every connect), logged once per retry, a few per period.
        delay = factory.retry_delay(attempt)
        if self.running:
            factory.log_limiter.info(
                log,
                f"{factory.log_key}:retry",
                "Dialling {agent} at {endpoint} (connection {index}): retry {attempt} in {delay:.2f}s",
                agent=f"agent {self.agent_id}" if self.agent_id is not None else "the agent",
                endpoint=self.description,
                index=index,
                attempt=factory.failed_attempts,
                delay=delay,
            )
        return delay

    def connections(self) -> list[AgentConnection]:
        """The slots' connections that are in the pool now."""
        return [f.connection for f in self.factories if f.connection is not None]

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        done: Deferred[None] = Deferred()
        started = self.clock.seconds()

        def wait() -> None:
            live = self.connections()
            if any(c.in_flight for c in live) and self.clock.seconds() - started < self.grace:
                self.clock.callLater(min(0.05, self.grace), wait)
                return
            for connection in live:
                connection.cancel_all(m.CancelReason.PROXY_SHUTDOWN)
                connection.close("proxy shutting down", abort=connection.is_write_blocked)
            stopping = [succeed(None) if s is None else s for s in (c.stopService() for c in list(self))]
            gatherResults(stopping, consumeErrors=True).addBoth(stopped)

        def stopped(_: object) -> None:
            # Counts of rate-limited lines are reported now: no timer outlives the service.
            for factory in self.factories:
                factory.log_limiter.flush()
            done.callback(None)

        wait()
        return done


# -- command-line values ------------------------------------------------------


def parse_agent_endpoint(value: str) -> tuple[str, str]:
    """
    C{ID=ENDPOINT} (C{waf=unix:/run/agents/waf.sock}) as C{(id, endpoint)}.

    @raise ValueError: no C{=}, an empty or unprintable id, or an endpoint
        that is not a C{unix:}, C{tcp:} or C{tls:} client endpoint.
    """
    agent_id, sep, endpoint = value.partition("=")
    if not sep or not agent_id:
        raise ValueError("expected ID=ENDPOINT, e.g. waf=unix:/run/agents/waf.sock")
    hidden = first_hidden(agent_id)
    if hidden is not None:
        raise ValueError(f"the agent id cannot contain U+{ord(hidden[1]):04X}")
    kind = endpoint.partition(":")[0].lower()
    if kind not in ("unix", "tcp", "tls", "ssl"):
        raise ValueError(
            f"expected a unix:PATH, tcp:HOST:PORT or tls:HOST:PORT client endpoint, got {endpoint!r}"
        )
    return agent_id, endpoint


def encoding_list(value: str) -> tuple[str, ...]:
    """C{msgpack,json} as a tuple of known payload encodings, in the order given."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise ValueError("give at least one payload encoding (msgpack, json)")
    for name in names:
        codec_for(name)
    return names
