# -*- test-case-name: tests.test_factory -*-
"""
L{ReverseConnectionFactory}: the listener's policy.

It admits or refuses registrations (version, agent id, allowlist, token,
per-agent connection cap, in SPEC section 3's order), hands out connection
ids that are unique for the life of the process, and puts registered
connections into the L{AgentPool}.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from .. import __version__
from .. import messages as m
from .._peertext import first_hidden, peer_text
from .._ratelimit import LogRateLimiter
from ..endpoints import RefusedConnection
from ..errors import (
    AgentProtocolError,
    AuthenticationFailed,
    ConnectionLimitReached,
    InvalidMessage,
    MessageTooLarge,
    RequestTimeout,
    VersionMismatch,
)
from ..wire import IncompleteFrameBudget
from ._identity import identity_problem
from ._interfaces import ITokenChecker
from .auth import _token_digest
from .config import ReverseConnectionConfig
from .connection import AgentConnection
from .pool import AgentPool
from .protocol import ReverseConnectionProtocol

if TYPE_CHECKING:
    pass

__all__ = ["Rejection", "ReverseConnectionFactory", "rejection_reason"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.factory")

_connection_serial = itertools.count(1)


class _NotAllowed(InvalidMessage):
    pass


class _AuthRequired(InvalidMessage):
    pass


class _EmptyAgentId(InvalidMessage):
    pass


class _BadAgentId(InvalidMessage):
    pass


#: The largest capabilities a RegistrationRequest may carry, in bytes of
#: JSON (a reference agent's take about 400).
_MAX_CAPABILITIES_SIZE = 64 * 1024


class _MetadataTooLarge(InvalidMessage):
    pass


#: The most levels of lists and objects registration metadata may nest: it
#: is encoded for C{/agents} (and decoded again by a worker group's parent)
#: at a deeper stack than the registration's, where metadata nested nearly
#: as deep as the decoder takes would fail every time.
MAX_METADATA_DEPTH = 64


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether decoded JSON nests lists and objects more than C{limit} levels deep."""
    level = [value] if isinstance(value, (list, dict)) else []
    for _ in range(limit):
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, (list, dict))
        ]
        if not level:
            return False
    return True


class _ClientCertificateRefused(AuthenticationFailed):
    """The agent's TLS client certificate was not issued for its agent id."""

    def __init__(self, agent_id: str, problem: str) -> None:
        AgentProtocolError.__init__(self, f"Authentication failed: {problem}")
        self.agent_id = agent_id


class _MadeRoom(AgentProtocolError):
    """
    A connection awaiting registration closed to make room for a new one:
    every place was taken and its address held the most of them.
    """

    rejection_label = "pending_evicted"


class _PeerMadeRoom(AgentProtocolError):
    """
    A connection awaiting registration closed to make room for a new one
    from its own address, which held all the places one address may: it
    was the oldest of them that had sent nothing.
    """

    rejection_label = "peer_pending_evicted"


#: Bits of an IPv6 peer's address that name its host's network: a host is
#: handed a whole /64 and may take any address in it.
_IPV6_PREFIX = 64
_IPV6_PREFIX_MASK = ((1 << _IPV6_PREFIX) - 1) << (128 - _IPV6_PREFIX)
#: The well-known NAT64 prefix (RFC 6052): a translator shows each IPv4
#: client as this /96 and its IPv4 address, so every such client would be
#: in one /64.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _pending_key(addr: IAddress) -> str | None:
    """
    What a connection awaiting registration is counted against: a TCP (or
    TLS) peer's IPv4 address, its IPv6 /64 prefix (C{2001:db8:1:2::/64},
    with the zone of a link-local one: C{fe80::%eth0/64}), or the IPv4
    address an IPv4-mapped IPv6 one (C{::ffff:192.0.2.7}) or a NAT64 one
    (C{64:ff9b::192.0.2.7}) stands for; C{None} for a UNIX socket, which has
    no address.
    """
    if isinstance(addr, IPv4Address):
        return addr.host
    if isinstance(addr, IPv6Address):
        return _ipv6_key(addr.host)
    return None


def _ipv6_key(host: str) -> str:
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        # Not what a socket reports; counted as it is.
        return host
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    if address in _NAT64:
        return str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    network = ipaddress.IPv6Address(int(address) & _IPV6_PREFIX_MASK)
    zone = f"%{address.scope_id}" if address.scope_id else ""
    return f"{network}{zone}/{_IPV6_PREFIX}"


def _oldest_idle(
    held: dict[ReverseConnectionProtocol, float], since: float | None = None
) -> ReverseConnectionProtocol | None:
    """
    The oldest of C{held} (oldest first, each with the time it came) that
    has sent nothing yet, and came at C{since} or before if given; C{None}
    if there is none.
    """
    for protocol, came in held.items():
        if since is not None and came > since:
            return None
        if not protocol.mid_frame:
            return protocol
    return None


#: Characters of peer-supplied text (agent ids, error texts) a log line of
#: the listener carries.
_ID_IN_LOG = 64
_TEXT_IN_LOG = 120


class Rejection:
    """
    The last refused registration, for the status page: the agent id and
    peer as a log line carries them (escaped, cut short), the reason label
    and when (seconds since the epoch).

    @ivar agent_id: the agent id, escaped and cut short as in a log line.
    @ivar peer: the peer's address, escaped and cut short.
    @ivar reason: the reason label (see L{rejection_reason}).
    @ivar at: when, in seconds since the epoch.
    """

    __slots__ = ("agent_id", "at", "peer", "reason")

    def __init__(self, agent_id: str, peer: str, reason: str, at: float) -> None:
        self.agent_id = agent_id
        self.peer = peer
        self.reason = reason
        self.at = at


def rejection_reason(error: AgentProtocolError) -> str:
    """A short, stable label for metrics: why a registration was refused."""
    if isinstance(error, VersionMismatch):
        return "version"
    if isinstance(error, _EmptyAgentId):
        return "empty_agent_id"
    if isinstance(error, _BadAgentId):
        return "bad_agent_id"
    if isinstance(error, _MetadataTooLarge):
        return "metadata_too_large"
    if isinstance(error, _NotAllowed):
        return "not_allowed"
    if isinstance(error, _AuthRequired):
        return "auth_required"
    if isinstance(error, _ClientCertificateRefused):
        return "client_certificate"
    if isinstance(error, AuthenticationFailed):
        return "auth_failed"
    if isinstance(error, ConnectionLimitReached):
        return "connection_limit"
    if isinstance(error, RequestTimeout):
        return "handshake_timeout"
    if isinstance(error, MessageTooLarge):
        return "frame_too_large"
    if isinstance(error, InvalidMessage):
        return "invalid_message"
    # Others name their own (_MadeRoom: "pending_evicted", _PeerMadeRoom:
    # "peer_pending_evicted").
    return getattr(error, "rejection_label", "other")


class ReverseConnectionFactory(Factory):
    """
    Builds a L{ReverseConnectionProtocol} per accepted connection.

    @ivar pool: where registered connections go.
    @ivar rejections: refused registrations counted by L{rejection_reason}.
    @ivar frame_budget: the bytes every connection holds in incomplete
        frames, against C{config.max_incomplete_frame_bytes} (pass one to
        share it between listeners).
    @ivar log_limiter: rate limits the log lines peers can cause.
    @cvar noisy: C{False}: no log line for each connection made and lost
        (L{Factory <twisted.internet.protocol.Factory>}).
    @ivar config: the listener's limits, timeouts and policy (a
        L{ReverseConnectionConfig
        <sentinel_twisted.proxy.config.ReverseConnectionConfig>}).
    @ivar token_checker: checks the agents' tokens; C{None}: tokens are not
        checked.
    @ivar clock: the clock of the timeouts (the reactor by default).
    @ivar proxy_version: the version sent in RegistrationResponses.
    @ivar awaiting_registration: connections accepted that have not registered
        yet.
    @ivar pending_by_peer: the TCP and TLS connections awaiting registration
        by what they are counted against, oldest first, each with the time
        it came (C{key -> {protocol: seconds}}): the peer's IPv4 address, or
        its IPv6 /64 prefix (C{2001:db8:1:2::/64}); a key leaves the table
        with its last connection, so it holds at most
        C{config.max_pending_registrations} entries.
    @ivar registrations: registrations accepted.
    """

    protocol = ReverseConnectionProtocol
    noisy = False

    def __init__(
        self,
        config: ReverseConnectionConfig | None = None,
        pool: AgentPool | None = None,
        token_checker: ITokenChecker | None = None,
        clock: IReactorTime | None = None,
        proxy_version: str = __version__,
        frame_budget: IncompleteFrameBudget | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.config = config if config is not None else ReverseConnectionConfig()
        self.pool = pool if pool is not None else AgentPool()
        self.token_checker = token_checker
        self.clock: IReactorTime = clock
        self.proxy_version = proxy_version
        self.awaiting_registration = 0
        self.registrations = 0
        self.rejections: Counter[str] = Counter()
        self.pending_by_peer: dict[str, dict[ReverseConnectionProtocol, float]] = {}
        #: The last refused registration (L{Rejection}), C{None} before any.
        self.last_rejection: Rejection | None = None
        self._registered_per_agent: Counter[str] = Counter()
        self._cap_logged = False
        self.frame_budget = (
            frame_budget
            if frame_budget is not None
            else IncompleteFrameBudget(self.config.max_incomplete_frame_bytes)
        )
        self.log_limiter = LogRateLimiter(clock)

    def startFactory(self) -> None:
        self.log_limiter.start()

    def stopFactory(self) -> None:
        # No rate-limit timer outlives the listener.
        self.log_limiter.stop()

    # -- connections awaiting registration ---------------------------------

    def buildProtocol(self, addr: IAddress) -> ReverseConnectionProtocol | RefusedConnection:  # type: ignore[override]
        config = self.config
        key = _pending_key(addr)
        held = self.pending_by_peer.get(key) if key is not None else None
        if held is not None and len(held) >= config.max_pending_registrations_per_peer:
            # One address cannot take every place (SPEC section 3 has no
            # answer for a connection that never registers).
            assert key is not None
            if not self._make_room_at(key, held):
                self.rejections["peer_pending_limit"] += 1
                self.log_limiter.warn(
                    log,
                    "peer-pending-limit",
                    "{count} connections from {peer} are awaiting registration "
                    "(limit {limit} per address), none of them idle for {age}s or more; "
                    "closing new connections from it",
                    count=len(held),
                    peer=peer_text(key, _ID_IN_LOG),
                    limit=config.max_pending_registrations_per_peer,
                    age=config.pending_eviction_age,
                )
                return RefusedConnection()
            held = self.pending_by_peer.get(key)
        limit = config.max_pending_registrations
        if self.awaiting_registration >= limit and not self._make_room(
            0 if held is None else len(held)
        ):
            self.rejections["pending_limit"] += 1
            if not self._cap_logged:
                self._cap_logged = True
                log.warn(
                    "{count} connections are awaiting registration (limit {limit}); "
                    "closing new connections until some register or time out",
                    count=self.awaiting_registration,
                    limit=limit,
                )
            return RefusedConnection()
        self.awaiting_registration += 1
        protocol = self.protocol(self)
        if key is not None:
            protocol.pending_key = key
            self.pending_by_peer.setdefault(key, {})[protocol] = self.clock.seconds()
        return protocol

    def _make_room_at(self, key: str, held: dict[ReverseConnectionProtocol, float]) -> bool:
        """
        The address C{key} holds all the places one address may: close its
        oldest connection that has sent nothing for the config's
        C{pending_eviction_age}, if it has one; whether there is room now.

        An agent sends its registration at once, so it is never the oldest
        idle one for long, while an idle flood only closes its own
        connections.  Younger connections are left alone: in a burst of
        agents from one host they may simply not have been read yet.  A
        connection partway through its first frame is never
        closed here: it may be an agent's registration on its way, and a
        newcomer from the same address, which could be anyone sharing it,
        must not be able to cut that short.  With all of them partway, the
        newcomer is closed instead; each of them goes at the handshake
        timeout at the latest.
        """
        victim = _oldest_idle(held, self.clock.seconds() - self.config.pending_eviction_age)
        if victim is None:
            return False
        count = len(held)
        victim.make_room(
            _PeerMadeRoom(
                "Too many connections from this address are awaiting registration; "
                "closed to make room"
            )
        )
        self.log_limiter.warn(
            log,
            "peer-pending-evicted",
            "{count} connections from {peer} are awaiting registration "
            "(limit {limit} per address); closed the oldest one that had sent nothing "
            "to make room for a new one",
            count=count,
            peer=peer_text(key, _ID_IN_LOG),
            limit=self.config.max_pending_registrations_per_peer,
        )
        return victim not in held

    def _make_room(self, holding: int) -> bool:
        """
        Every place is taken: close a connection awaiting registration from
        the address that holds the most places, if it holds more than
        C{holding} (the newcomer's address's); whether there is room now.
        The one closed is that address's oldest that has sent nothing yet,
        else its oldest: an attacker spread over a few addresses then loses
        its own connections to newcomers, and an agent, which registers at
        once, is never the oldest for long.
        """
        if not self.pending_by_peer:
            return False
        busiest = max(self.pending_by_peer.values(), key=len)
        if len(busiest) <= holding:
            return False
        victim = _oldest_idle(busiest)
        if victim is None:
            victim = next(iter(busiest))
        victim.make_room(
            _MadeRoom("Too many connections are awaiting registration; closed to make room")
        )
        return self.awaiting_registration < self.config.max_pending_registrations

    def registration_finished(self, protocol: ReverseConnectionProtocol) -> None:
        """
        Called by a protocol that no longer awaits registration (registered, rejected or gone).
        """
        self.awaiting_registration -= 1
        key = protocol.pending_key
        if key is not None:
            held = self.pending_by_peer.get(key)
            if held is not None:
                held.pop(protocol, None)
                if not held:
                    del self.pending_by_peer[key]
        if self._cap_logged and self.awaiting_registration < self.config.max_pending_registrations:
            self._cap_logged = False
            log.info("Connections awaiting registration are below the limit again")

    # -- admission ------------------------------------------------------------

    def admit(
        self, request: m.RegistrationRequest, client_certificate: Any = None
    ) -> AgentProtocolError | None:
        """
        Check a RegistrationRequest in SPEC section 3's order; the first
        failure wins.  The spec's own checks (version, empty id, allowlist,
        missing token) come first, so that an agent learns what the spec
        says it should; ours (the id's size and characters, the size of
        its metadata and capabilities, the token's value, the connection
        limit) follow.  On success a connection slot of the agent is reserved
        (released by L{connection_gone}).

        @param client_certificate: the agent's verified TLS client
            certificate (pyOpenSSL C{X509}), if any; with
            C{config.require_client_cert} the agent id must be one of its
            names, checked after the allowlist, before the token.
        """
        config = self.config
        if request.protocol_version != m.PROTOCOL_VERSION:
            return VersionMismatch(m.PROTOCOL_VERSION, request.protocol_version)
        agent_id = request.agent_id
        if not agent_id:
            return _EmptyAgentId("Agent ID cannot be empty")
        if config.allowed_agents and not config.allowed_agents.allows(agent_id):
            return _NotAllowed(f"Agent '{agent_id}' is not in the allowed list")
        if config.require_client_cert:
            problem = identity_problem(agent_id, client_certificate)
            if problem is not None:
                return _ClientCertificateRefused(agent_id, problem)
        token = request.auth_token
        if token is None and config.require_auth:
            return _AuthRequired("Authentication required but no token provided")
        # Ours: ids end up in log lines, metric labels and status pages;
        # a huge one bloats them all, and a newline, U+2028 or an escape
        # sequence there could forge or garble them.
        size = len(agent_id.encode("utf-8", "surrogatepass"))
        if size > config.max_agent_id_length:
            return _BadAgentId(
                f"Agent ID is too long: {size} bytes (max: {config.max_agent_id_length})"
            )
        hidden = first_hidden(agent_id)
        if hidden is not None:
            position, character = hidden
            return _BadAgentId(
                "Agent ID cannot contain control, format or separator characters "
                f"(U+{ord(character):04X} at position {position})"
            )
        if request.metadata is not None:
            metadata_size = len(m.encode(request.metadata))
            if metadata_size > config.max_metadata_size:
                return _MetadataTooLarge(
                    f"Registration metadata is too large: {metadata_size} bytes "
                    f"(max: {config.max_metadata_size})"
                )
            if _nested_deeper(request.metadata, MAX_METADATA_DEPTH):
                return _MetadataTooLarge(
                    "Registration metadata is nested too deeply: more than "
                    f"{MAX_METADATA_DEPTH} levels of lists and objects"
                )
        # Ours: the capabilities are the agent's text as well (a name, a
        # version, a list of events), kept per connection and shown on the
        # status site; a real agent's take a few hundred bytes.
        capabilities_size = len(m.encode(request.capabilities))
        if capabilities_size > _MAX_CAPABILITIES_SIZE:
            return _MetadataTooLarge(
                f"Agent capabilities are too large: {capabilities_size} bytes "
                f"(max: {_MAX_CAPABILITIES_SIZE})"
            )
        if token is not None and self.token_checker is not None and not self._token_valid(agent_id, token):
            return AuthenticationFailed(agent_id)
        limit = config.max_connections_per_agent
        held = self._registered_per_agent[agent_id]
        if held < limit and agent_id in self.pool:
            # Connections the pool dialled to this agent (forward mode) count too.
            held += sum(1 for c in self.pool.connections(agent_id) if c.mode == "forward")
        if held >= limit:
            return ConnectionLimitReached(agent_id, limit)
        self._registered_per_agent[agent_id] += 1
        return None

    def _token_valid(self, agent_id: str, token: str) -> bool:
        assert self.token_checker is not None
        try:
            return bool(self.token_checker.check_token(agent_id, token))
        except Exception:
            # A broken checker refuses (fail closed); the traceback never
            # holds the token because it is not formatted into the log.
            log.failure(
                "Token checker {checker!r} failed for agent {agent_id}; registration refused",
                checker=self.token_checker,
                agent_id=peer_text(agent_id, _ID_IN_LOG),
            )
            return False

    def _release(self, agent_id: str) -> None:
        """Free one of C{agent_id}'s connection slots (reserved by L{admit})."""
        remaining = self._registered_per_agent[agent_id] - 1
        if remaining > 0:
            self._registered_per_agent[agent_id] = remaining
        else:
            self._registered_per_agent.pop(agent_id, None)

    def registered_connections(self, agent_id: str) -> int:
        """How many registered connections C{agent_id} holds."""
        return self._registered_per_agent[agent_id]

    def new_connection_id(self, agent_id: str) -> str:
        """A connection id unique for the life of the process: C{AGENT-HEXMILLIS-SERIAL}."""
        # The reference's "<agent>-<hex millis>" plus a serial, so that two
        # connections registered in one millisecond still differ.
        millis = int(time.time() * 1000)
        return f"{agent_id}-{millis:x}-{next(_connection_serial)}"

    def create_connection(
        self, protocol: ReverseConnectionProtocol, request: m.RegistrationRequest
    ) -> AgentConnection:
        """The L{AgentConnection} for a registration that was admitted."""
        connection = AgentConnection(
            protocol,
            agent_id=request.agent_id,
            connection_id=self.new_connection_id(request.agent_id),
            capabilities=request.capabilities,
            metadata=request.metadata,
            clock=self.clock,
            request_timeout=self.config.request_timeout,
            connected_since=time.time(),
            peer=protocol.peer,
            log_limiter=self.log_limiter,
            pending_counts=self.pool.pending_counts,
        )
        connection.peer_credentials = getattr(protocol, "peer_credentials", None)
        connection.token_verified = request.auth_token is not None and self.token_checker is not None
        if request.auth_token is not None:
            connection.token_digest = _token_digest(request.auth_token)
        return connection

    def success_response(self, connection_id: str) -> m.RegistrationResponse:
        """The RegistrationResponse that accepts a registration."""
        return m.RegistrationResponse(
            success=True,
            error=None,
            proxy_id=self.config.proxy_id,
            proxy_version=self.proxy_version,
            connection_id=connection_id,
        )

    def failure_response(self, error: AgentProtocolError) -> m.RegistrationResponse:
        """The RegistrationResponse that refuses a registration, with the error's text."""
        return m.RegistrationResponse(
            success=False,
            error=str(error),
            proxy_id=self.config.proxy_id,
            proxy_version=self.proxy_version,
            connection_id="",
        )

    # -- events from protocols ---------------------------------------------

    def connection_registered(self, connection: AgentConnection) -> None:
        """Called by a protocol whose registration succeeded: logs it and adds it to the pool."""
        self.registrations += 1
        # An agent may register and leave in a loop: its lines are limited
        # (per agent id, so that a fleet starting at once is logged whole).
        self.log_limiter.info(
            log,
            f"registered:{connection.agent_id}",
            "Agent {agent_id} registered connection {connection_id} from {peer}",
            peer=peer_text(connection.peer, _ID_IN_LOG),
            **connection.log_fields(),
        )
        self.pool.add(connection)

    def registration_rejected(self, error: AgentProtocolError, agent_id: str, peer: str) -> None:
        """Called by a protocol whose registration was refused: counts and logs it."""
        reason = rejection_reason(error)
        self.rejections[reason] += 1
        self.last_rejection = Rejection(
            peer_text(agent_id, _ID_IN_LOG), peer_text(peer, _ID_IN_LOG), reason, time.time()
        )
        self.log_limiter.info(
            log,
            "registration-rejected",
            "Rejected registration of agent {agent_id} from {peer} ({reason}): {error}",
            agent_id=peer_text(agent_id, _ID_IN_LOG) if agent_id else "(unknown)",
            peer=peer_text(peer, _ID_IN_LOG),
            reason=reason,
            error=peer_text(error, _TEXT_IN_LOG),
        )

    def connection_gone(self, connection: AgentConnection, detail: str, failed: int) -> None:
        """
        Called by a protocol whose registered connection ended: logs it with
        the count of C{failed} waiting requests and removes it from the pool.
        """
        self._release(connection.agent_id)
        self.log_limiter.info(
            log,
            f"disconnected:{connection.agent_id}",
            "Agent {agent_id} connection {connection_id} disconnected: {detail}"
            " ({failed} pending request(s) failed)",
            detail=peer_text(detail, _TEXT_IN_LOG),
            failed=failed,
            **connection.log_fields(),
        )
        self.pool.remove(connection, detail)
