# -*- test-case-name: tests.workers.test_handover -*-
"""
A worker's end: it adopts the agent connections the parent hands it,
reports the ones that end, answers the parent's snapshots, and listens for
HTTP clients on the group's shared port (C{SO_REUSEPORT}).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import messages as m
from .._peertext import peer_text
from ..proxy.factory import ReverseConnectionFactory
from ..proxy.protocol import ReverseConnectionProtocol
from .commands import (
    CONNECTION_DONE,
    AdoptConnection,
    AdoptionFailed,
    AgentsSeen,
    ConnectionGone,
    ControlProtocol,
    Heartbeat,
    Hello,
    Release,
    Snapshot,
    Stopping,
    WorkerStopping,
)

if TYPE_CHECKING:
    from ..proxy.connection import AgentConnection

__all__ = [
    "AdoptedConnectionProtocol",
    "Handover",
    "ReusePortEndpoint",
    "WorkerConnectionFactory",
    "WorkerControl",
    "WorkerControlService",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.workers")

#: Seconds a worker that joins a running group waits for the agents the
#: others hold before it takes HTTP clients anyway.
HOLD_TIMEOUT = 5.0
#: How often it looks, in seconds.
HOLD_POLL = 0.05


@attrs.frozen
class Handover:
    """
    What the parent knows of a connection it hands over.

    @ivar registration: the RegistrationRequest's payload.
    @ivar connection_id: the id the parent gave it (the agent was told).
    @ivar peer: the agent's address, for logs.
    @ivar peer_credentials: C{(pid, uid, gid)} of a UNIX socket's peer, or C{None}.
    @ivar token_verified: whether the parent verified its token.
    @ivar connected_since: when it registered, seconds since the epoch.
    @ivar pending: bytes the agent sent after registering that the parent read.
    """

    registration: bytes
    connection_id: str
    peer: str
    peer_credentials: tuple[int, int, int] | None
    token_verified: bool
    connected_since: float
    pending: bytes = b""


class AdoptedConnectionProtocol(ReverseConnectionProtocol):
    """
    A connection the parent registered: it starts in the registered state
    (no handshake timer, no RegistrationResponse: the parent answered).

    @ivar handover: what the parent passed with the socket.
    @ivar request: the RegistrationRequest, decoded from C{handover}.
    @ivar peer: the agent's address for logs, as the parent saw it.
    @ivar peer_credentials: C{(pid, uid, gid)} of a UNIX socket's peer, or C{None}.
    """

    def __init__(
        self, factory: ReverseConnectionFactory, handover: Handover, request: m.RegistrationRequest
    ) -> None:
        super().__init__(factory)
        self.handover = handover
        self.request = request

    def connectionMade(self) -> None:
        handover = self.handover
        self.peer = handover.peer
        self.peer_credentials = handover.peer_credentials
        request = self.request
        self._share_with_agent(request)
        connection = self.factory.create_connection(self, request)
        connection.connection_id = handover.connection_id
        connection.connected_since = handover.connected_since
        connection.token_verified = handover.token_verified
        self._lifecycle.registration_accepted(connection)
        if handover.pending:
            self.dataReceived(handover.pending)

    def enter_registered(self, connection: AgentConnection) -> None:
        """Lifecycle: serve C{connection} (the parent sent the RegistrationResponse)."""
        self._leave_awaiting()
        self._serve(connection)


class WorkerConnectionFactory(ReverseConnectionFactory):
    """
    A worker's listener without a listening port: its connections come
    from the parent (L{adopt}); each one that ends is reported through
    C{on_gone}.

    @ivar on_gone: called with the agent id and the connection id of each
        adopted connection that ends.
    """

    on_gone: Callable[[str, str], None] | None = None

    def adopt(self, reactor: Any, descriptor: int, family: int, handover: Handover) -> AdoptedConnectionProtocol:
        """Serve the connection whose socket is C{descriptor} (a copy: it is closed here)."""
        try:
            request = m.decode_registration_request(handover.registration)
            protocol = AdoptedConnectionProtocol(self, handover, request)
            request_agent = request.agent_id
            self.awaiting_registration += 1
            self._registered_per_agent[request_agent] += 1
            try:
                reactor.adoptStreamConnection(descriptor, family, _Once(protocol))
            except BaseException:
                self.awaiting_registration -= 1
                self._release(request_agent)
                raise
        finally:
            os.close(descriptor)
        return protocol

    def connection_registered(self, connection: AgentConnection) -> None:
        """An adopted connection joins the pool (the parent counted and logged its registration)."""
        log.debug(
            "Serving connection {connection_id} of agent {agent_id}",
            **connection.log_fields(),
        )
        self.pool.add(connection)

    def connection_gone(self, connection: AgentConnection, detail: str, failed: int) -> None:
        super().connection_gone(connection, detail, failed)
        if self.on_gone is not None:
            self.on_gone(connection.agent_id, connection.connection_id)


class _Once(Factory):
    """Builds the one protocol it was given (no log line of its own)."""

    noisy = False

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol



class WorkerControl(ControlProtocol):
    """
    The worker's end of the control connection.

    @ivar control: the worker's control service.
    """

    def __init__(self, control: WorkerControlService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.control = control

    @AdoptConnection.responder
    def adopt(
        self,
        socket: int,
        family: int,
        registration: bytes,
        connection_id: str,
        peer: str,
        peer_credentials: list[int],
        token_verified: bool,
        connected_since: float,
        pending: bytes,
    ) -> dict[str, Any]:
        """
        L{AdoptConnection}: serve the connection (see
        L{WorkerConnectionFactory.adopt}); L{AdoptionFailed} if it cannot be
        (the agent may have reset it meanwhile); L{WorkerStopping} if this
        worker is stopping (the parent hands it to another worker).
        """
        if self.control.leaving:
            os.close(socket)
            raise WorkerStopping(f"worker {self.control.index} is stopping")
        credentials = tuple(peer_credentials) if len(peer_credentials) == 3 else None
        handover = Handover(
            registration,
            connection_id,
            peer,
            credentials,  # type: ignore[arg-type]
            token_verified,
            connected_since,
            pending,
        )
        try:
            protocol = self.control.factory.adopt(self.control.reactor, socket, family, handover)
        except Exception as e:
            # (Not chained: the traceback would keep the socket Twisted made open.)
            raise AdoptionFailed(str(e) or e.__class__.__name__) from None
        self.control.adopted(protocol)
        return {}

    @Heartbeat.responder
    def heartbeat(self) -> dict[str, Any]:
        """L{Heartbeat}: this worker's reactor runs."""
        return {}

    @AgentsSeen.responder
    def agents_seen(self, agents: bytes) -> dict[str, Any]:
        """L{AgentsSeen}: consult these agents from now on."""
        self.control.agents_seen(agents)
        return {}

    @Release.responder
    def release(self, agent_id: str, count: int) -> dict[str, Any]:
        """L{Release}: drain up to C{count} of the agent's connections, the least busy first."""
        return {"released": self.control.release(agent_id, count)}

    @Snapshot.responder
    def snapshot(self) -> dict[str, Any]:
        """L{Snapshot}: this worker's C{/agents}, C{/metrics} and readiness."""
        agents, metrics, ready = self.control.snapshot()
        return {"agents": agents, "metrics": metrics, "ready": ready}

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        super().connectionLost(reason)
        self.control.parent_gone()


class WorkerControlService(service.Service):
    """
    Connects to the parent's control socket and says which worker this
    is.  Losing the parent stops the worker (its requests get the shutdown
    grace): a worker never outlives its group.

    @ivar path: the parent's control socket.
    @ivar index: this worker's number, from 1.
    @ivar factory: where adopted connections go.
    @ivar reactor: the reactor.
    @ivar snapshot: returns C{(agents JSON, metrics text, ready)}.
    @ivar drain: drains a connection (closes it once its requests are
        answered), given the connection and why.
    @ivar refusal: why a connection may no longer stay (the allowlist and
        the token file as this worker last read them), or C{None}.
    @ivar protocol: the control connection, C{None} while not connected.
    @ivar leaving: set once this worker stops (C{SIGTERM}): it has told its
        parent (L{Stopping}) and refuses the connections still handed to it
        (L{WorkerStopping}), which it could not serve for long.
    @ivar serve_http: starts the gateway's HTTP listener; called once this
        worker holds every agent the rest of the group holds, or after
        L{HOLD_TIMEOUT} (clients of a worker without them would get 503).
    @ivar consult: given the agent ids the group has seen (L{AgentsSeen}),
        makes the gateway consult them.
    """

    def __init__(
        self,
        path: str,
        index: int,
        factory: WorkerConnectionFactory,
        reactor: Any,
        snapshot: Callable[[], tuple[bytes, bytes, bool]],
        drain: Callable[[AgentConnection, str], object] | None = None,
        refusal: Callable[[AgentConnection], str | None] | None = None,
        serve_http: Callable[[], None] | None = None,
        consult: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.path = path
        self.index = index
        self.factory = factory
        self.reactor = reactor
        self.snapshot = snapshot
        self.drain = drain
        self.refusal = refusal
        self.serve_http = serve_http
        self.consult = consult
        self._awaited: set[str] = set()
        self._hold_until = 0.0
        self.protocol: WorkerControl | None = None
        self.leaving = False
        self._stopping = False
        factory.on_gone = self._connection_gone

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        endpoint = UNIXClientEndpoint(self.reactor, self.path)
        connecting = endpoint.connect(_Once(WorkerControl(self)))
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: WorkerControl) -> Deferred[Any]:
        self.protocol = protocol
        log.info("Worker {index} (pid {pid}) joined its group", index=self.index, pid=os.getpid())
        hello = protocol.call(Hello, index=self.index, pid=os.getpid())
        return hello.addCallback(self._welcomed)

    def _welcomed(self, answer: dict[str, Any]) -> None:
        # The agents to consult before any client is taken.
        self.agents_seen(answer["seen"])
        self._hold_http(answer["agents"])

    def agents_seen(self, agents: bytes) -> None:
        """The group's agents seen (JSON), from the parent: the gateway consults them."""
        if self.consult is None:
            return
        try:
            seen = json.loads(agents)
        except ValueError:
            seen = None
        if not isinstance(seen, list) or not all(isinstance(a, str) for a in seen):
            # The parent wrote it: a bug, not a peer.  Keep what is known.
            log.error("Worker {index}: unreadable list of agents seen from the parent", index=self.index)
            return
        self.consult(seen)

    def _hold_http(self, agents: bytes) -> None:
        """Take HTTP clients once this worker holds every agent in C{agents} (JSON), or after a while."""
        try:
            awaited = {str(a) for a in json.loads(agents)}
        except ValueError:
            awaited = set()
        self._awaited = awaited
        self._hold_until = self.reactor.seconds() + HOLD_TIMEOUT
        if awaited:
            log.info(
                "Worker {index} takes HTTP clients once it holds {count} agent(s) the group holds",
                index=self.index,
                count=len(awaited),
            )
        self._check_hold()

    def _check_hold(self) -> None:
        if self.serve_http is None or self._stopping:
            return
        pool = self.factory.pool
        missing = [a for a in self._awaited if a not in pool]
        if missing and self.reactor.seconds() < self._hold_until:
            self.reactor.callLater(HOLD_POLL, self._check_hold)
            return
        if missing:
            log.warn(
                "Worker {index} takes HTTP clients without agent(s) {agents} after {timeout:.0f} s",
                index=self.index,
                agents=", ".join(peer_text(a, 64) for a in sorted(missing)[:5]),
                timeout=HOLD_TIMEOUT,
            )
        serve, self.serve_http = self.serve_http, None
        try:
            serve()
        except Exception as e:
            log.error("Worker {index} cannot take HTTP clients: {error}; stopping", index=self.index, error=str(e))
            self._stop_reactor()

    def _failed(self, failure: Failure) -> None:
        log.error(
            "Worker {index} cannot reach its parent at {path}: {error}; stopping",
            index=self.index,
            path=self.path,
            error=failure.getErrorMessage(),
        )
        self._stop_reactor()

    def _connection_gone(self, agent_id: str, connection_id: str) -> None:
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.call(ConnectionGone, agent_id=agent_id, connection_id=connection_id)

    def adopted(self, protocol: AdoptedConnectionProtocol) -> None:
        """
        A connection was adopted: the parent admitted it, but this worker
        may have reread the allowlist or the token file since (a SIGHUP
        reaches every process on its own): drain it if they refuse it now.
        """
        connection = protocol.connection
        if connection is None or connection.is_closed or self.refusal is None or self.drain is None:
            return
        why = self.refusal(connection)
        if why is not None:
            self.drain(connection, why)

    def release(self, agent_id: str, count: int) -> int:
        """Drain up to C{count} of C{agent_id}'s connections; how many."""
        pool = self.factory.pool
        if self.drain is None or agent_id not in pool:
            return 0
        live = [c for c in pool.connections(agent_id) if not c.is_closed]
        chosen = sorted(live, key=lambda c: c.in_flight)[: max(count, 0)]
        for connection in chosen:
            self.drain(connection, "moved to a worker that holds none of this agent's connections")
        return len(chosen)

    def parent_gone(self) -> None:
        """The control connection is lost: the parent is gone or stopping."""
        self.protocol = None
        if not self._stopping:
            log.warn("Worker {index}: the parent process is gone; stopping", index=self.index)
            self._stop_reactor()

    def _stop_reactor(self) -> None:
        if not self._stopping and self.reactor.running:
            self._stopping = True
            self.reactor.stop()

    def stopService(self) -> None:
        self._stopping = True
        self.leaving = True
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            # The control connection stays while the worker drains (its
            # connections' ends are reported over it).
            protocol.call(Stopping).addErrback(lambda _: None)
        super().stopService()  # type: ignore[no-untyped-call]


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    Listens on a TCP port that other processes of the same user listen on
    too (C{SO_REUSEPORT}): the kernel spreads new connections over them.

    @ivar reactor: the reactor.
    @ivar port: the TCP port.
    @ivar interface: the address to listen on (C{""}: every IPv4 address).
    @ivar backlog: the listen backlog.
    """

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 50) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: Any) -> Deferred[Any]:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        try:
            listener = reuse_port_socket(family, self.interface, self.port)
            try:
                listener.listen(self.backlog)
                listener.setblocking(False)
                port = self.reactor.adoptStreamPort(listener.fileno(), family, protocolFactory)
            finally:
                listener.close()
        except Exception:
            return fail()
        return succeed(port)


def reuse_port_socket(family: int, interface: str, port: int) -> socket.socket:
    """A TCP socket bound with C{SO_REUSEADDR} and C{SO_REUSEPORT} (not listening yet)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
    except BaseException:
        sock.close()
        raise
    return sock
