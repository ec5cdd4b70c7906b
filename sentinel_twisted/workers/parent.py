# -*- test-case-name: tests.workers.test_handover -*-
"""
The parent of a worker group: it registers agents (so the allowlist, the
tokens and the per-agent cap hold across the group), hands each registered
connection to the worker holding the fewest connections of that agent,
runs the worker processes (restarting one that dies) and relays their
logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._peertext import peer_text
from ..endpoints import SocketInUse, clear_stale_unix_socket
from ..errors import AgentProtocolError
from ..gateway.known import MAX_KNOWN_AGENTS, KnownAgents, log_forgotten
from ..proxy.factory import ReverseConnectionFactory
from ..proxy.protocol import ReverseConnectionProtocol, peer_credentials
from ..wire import _HEADER
from .commands import (
    CONNECTION_DONE,
    AdoptConnection,
    AgentsSeen,
    ConnectionGone,
    ControlProtocol,
    Hello,
    NotThatWorker,
    Release,
    Snapshot,
    Stopping,
    WorkerStopping,
)

if TYPE_CHECKING:
    from ..proxy.connection import AgentConnection

__all__ = [
    "ControlFactory",
    "ControlService",
    "HandOverFactory",
    "HandOverProtocol",
    "NoWorkerReady",
    "Worker",
    "WorkerGroup",
    "remove_stale_control_directories",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.workers")

#: Seconds after a connection is handed over before the parent checks
#: that every worker holds one of that agent's.
COVERAGE_DELAY = 5.0
#: Seconds after a worker joins before connections are moved to it.
RESPREAD_DELAY = 1.0
#: How long the parent waits for a worker's snapshot, in seconds.
SNAPSHOT_TIMEOUT = 2.0
#: Agent ids named in the line that says connections are moved to a worker.
MOVERS_SHOWN = 5
#: The most bytes of one control message from a worker (its snapshots, the
#: largest, are its C{/agents} and C{/metrics}).
MAX_CONTROL_MESSAGE = 256 * 1024 * 1024
#: The most bytes of one control message before the process at the other
#: end said which worker it is: its first message is L{Hello}, a few dozen.
MAX_HELLO_MESSAGE = 64 * 1024
#: Seconds a control connection has to say L{Hello}; then it is closed.
HELLO_TIMEOUT = 30.0
#: Control connections that have not said L{Hello} yet that the parent
#: holds at once, besides one per worker; past it, new ones are closed.
EXTRA_UNIDENTIFIED = 16


class NoWorkerReady(AgentProtocolError):
    """
    No worker can take a registered connection now (they are starting,
    restarting or stopping).

    @cvar rejection_label: its reason in the registration refusals' metric.
    """

    rejection_label = "no_worker"

    def __init__(self) -> None:
        super().__init__("No worker process is ready to serve the connection; try again")


class Worker:
    """
    One worker as the parent sees it.

    @ivar index: its number, from 1.
    @ivar control: its control connection, C{None} until it said hello.
    @ivar pid: its process id, C{None} while not running.
    @ivar agents: connections it holds, by agent id.
    @ivar restarts: how often it was restarted.
    @ivar late: whether it has left its parent's last heartbeat unanswered
        for a heartbeat interval or more (see
        L{WorkerProcesses <sentinel_twisted.workers.processes.WorkerProcesses>}):
        it is handed no new connection while another worker answers.
    @ivar stopping: whether it said it is stopping (L{Stopping}): it drains
        the connections it holds and is handed none, even when no other
        worker is ready.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.control: ParentControl | None = None
        self.pid: int | None = None
        self.agents: Counter[str] = Counter()
        self.restarts = 0
        self.late = False
        self.stopping = False

    @property
    def connections(self) -> int:
        """Agent connections it holds."""
        return sum(self.agents.values())


class WorkerGroup:
    """
    The workers and the agent connections each holds.

    @ivar workers: every worker, by index - 1.
    @ivar factory: the parent's listener (its slots are released here).
    @ivar clock: the clock of snapshot timeouts.
    @ivar handed_over: connections handed to workers.
    @ivar on_join: called with each worker that joins (L{WorkerProcesses} sets it).
    @ivar seen: every agent a connection was handed over of, which every
        worker consults (L{AgentsSeen}) until a reload forgets it.
    @ivar retired: whether the files in force (the last reload's) retire an
        agent (L{ConfigurationReloader.retired
        <sentinel_twisted.proxy._reload.ConfigurationReloader.retired>});
        C{None} without reloads.  A reload forgets the retired agents no
        worker holds a connection of then (L{forget_absent}); one whose
        connections were still open (a worker drains them) is forgotten
        once the last of them is gone.
    """

    on_join: Callable[[Worker], object] | None = None
    retired: Callable[[str], bool] | None = None

    def __init__(
        self, count: int, factory: HandOverFactory, clock: IReactorTime, max_known_agents: int = MAX_KNOWN_AGENTS
    ) -> None:
        self.workers = [Worker(i) for i in range(1, count + 1)]
        self.factory = factory
        self.clock = clock
        self.handed_over = 0
        self.seen = KnownAgents(max_known_agents)
        self._coverage_checks: dict[str, Any] = {}
        self._respreads: dict[int, Any] = {}
        # The control connection an AgentsSeen is on its way to, by worker,
        # and the workers owed a newer one once it is answered.
        self._seen_sending: dict[int, ParentControl] = {}
        self._seen_stale: set[int] = set()
        # The Snapshot each worker was asked for and not answered yet: the
        # control connection it went to and the status requests waiting.
        self._snapshots: dict[int, tuple[ParentControl, set[Deferred[Any]]]] = {}
        #: Control connections that have not said L{Hello} yet.
        self.unidentified: set[ParentControl] = set()
        self._stopped = False
        factory.group = self

    def _check_coverage(self, agent_id: str) -> None:
        """Say so when an agent holds connections in some workers and none in others."""
        del self._coverage_checks[agent_id]
        ready = self.serving()
        held = sum(w.agents[agent_id] for w in ready)
        without = [str(w.index) for w in ready if not w.agents[agent_id]]
        if held and without:
            self.factory.log_limiter.warn(
                log,
                "worker-coverage",
                "Agent {agent_id} holds {held} connection(s) for {count} workers: worker(s) {without} "
                "hold none and cannot consult it (their requests get 503, fail closed); "
                "run the agent with --connections {count} or more",
                agent_id=peer_text(agent_id, 64),
                held=held,
                count=len(self.workers),
                without=", ".join(without),
            )

    def stop(self) -> None:
        """Cancel the pending coverage checks (the group stops)."""
        self._stopped = True
        for call in [*self._coverage_checks.values(), *self._respreads.values()]:
            if call.active():
                call.cancel()
        self._coverage_checks.clear()
        self._respreads.clear()

    def ready(self) -> list[Worker]:
        """Workers connected to the parent."""
        return [w for w in self.workers if w.control is not None]

    def serving(self) -> list[Worker]:
        """Workers connected to the parent that are not stopping: those handed connections."""
        return [w for w in self.workers if w.control is not None and not w.stopping]

    def choose(self, agent_id: str) -> Worker | None:
        """
        The worker to hand a connection of C{agent_id} to: the one holding
        fewest of that agent's connections, then fewest in all, of those
        that answer their heartbeats (a hung worker would never serve it),
        or of every connected one if none does; never one that is stopping
        (it would close the connection).
        """
        ready = self.serving()
        if not ready:
            return None
        answering = [w for w in ready if not w.late] or ready
        return min(answering, key=lambda w: (w.agents[agent_id], w.connections, w.index))

    def hand_over(self, protocol: HandOverProtocol, connection: AgentConnection, pending: bytes) -> None:
        """Pass C{protocol}'s socket to a worker; the parent's copy is closed."""
        agent_id = connection.agent_id
        worker = self.choose(agent_id)
        transport: Any = protocol.transport
        if worker is None or worker.control is None or transport is None:
            protocol.give_up("no worker is ready")
            return
        handle = transport.getHandle()
        credentials = protocol.peer_credentials
        handover = {
            "socket": os.dup(handle.fileno()),
            "family": handle.family,
            "registration": protocol.registration,
            "connection_id": connection.connection_id,
            "peer": protocol.peer,
            "peer_credentials": list(credentials) if credentials is not None else [],
            "token_verified": bool(getattr(connection, "token_verified", False)),
            "connected_since": connection.connected_since,
            "pending": pending,
        }
        self._send(worker, connection, handover)
        self.handed_over += 1
        protocol.let_go()
        self._see(agent_id)
        if agent_id not in self._coverage_checks:
            self._coverage_checks[agent_id] = self.clock.callLater(
                COVERAGE_DELAY, self._check_coverage, agent_id
            )

    def _send(self, worker: Worker, connection: AgentConnection, handover: dict[str, Any]) -> None:
        """
        Send C{worker} the connection (L{AdoptConnection}); the copy of its
        socket in C{handover} is closed once a worker has it, or none can.
        A worker that is stopping refuses it (L{WorkerStopping}): it goes
        to another, each worker being asked at most once.
        """
        agent_id = connection.agent_id
        control = worker.control
        assert control is not None
        sent = control.call(AdoptConnection, **handover)
        worker.agents[agent_id] += 1

        def failed(failure: Failure) -> None:
            held = worker.control is control and worker.agents[agent_id] > 0
            if failure.check(WorkerStopping) and held:
                self.worker_stopping(control)
                other = self.choose(agent_id)
                if other is not None:
                    # The slot stays taken: it moves with the connection.
                    worker.agents[agent_id] -= 1
                    if not worker.agents[agent_id]:
                        del worker.agents[agent_id]
                    self._send(other, connection, handover)
                    return
            os.close(handover["socket"])
            # An agent that resets its connections at once causes one each: limited.
            self.factory.log_limiter.warn(
                log,
                "handover-failed",
                "Worker {index} did not take connection {connection_id} of agent {agent_id}: {error}",
                index=worker.index,
                connection_id=peer_text(connection.connection_id, 100),
                agent_id=peer_text(agent_id, 64),
                error=peer_text(failure.getErrorMessage()),
            )
            if held:
                self.connection_gone(control, agent_id)

        def served(_: object) -> None:
            os.close(handover["socket"])
            # Said once the worker has it in its pool: its requests consult it
            # from now on.  Limited per agent id, as the listener's own line.
            self.factory.log_limiter.info(
                log,
                f"registered:{agent_id}",
                "Agent {agent_id} registered connection {connection_id} from {peer}; worker {index} serves it",
                agent_id=peer_text(agent_id, 64),
                connection_id=peer_text(connection.connection_id, 100),
                peer=peer_text(handover["peer"], 64),
                index=worker.index,
            )

        sent.addCallbacks(served, failed)

    def _see(self, agent_id: str) -> None:
        """Every worker consults C{agent_id} from now on (if there is room)."""
        seen = self.seen
        if seen.add(agent_id):
            self._tell_seen()
        elif agent_id not in seen:
            self.factory.log_limiter.warn(
                log,
                "agents-full",
                "Agent {agent_id} registered, but the group already knows {limit} agents: "
                "it is consulted while registered, and not when it leaves",
                agent_id=peer_text(agent_id, 64),
                limit=seen.limit,
            )

    def seen_document(self) -> bytes:
        """The agents seen, as L{AgentsSeen} and L{Hello} carry them."""
        return json.dumps(self.seen.ids).encode("utf-8")

    def _tell_seen(self) -> None:
        for worker in self.ready():
            self._send_seen(worker)

    def _send_seen(self, worker: Worker) -> None:
        """
        Send C{worker} the agents seen, one document at a time: while one is
        on its way, a change only marks the worker for the latest document
        once it is answered.  Agent ids come from peers: a flood of new ones
        must not queue a growing document per id (quadratic memory in the
        parent, and work in the worker), least of all for a worker that is
        slow or hung.
        """
        control = worker.control
        if control is None:
            return
        index = worker.index
        if self._seen_sending.get(index) is control:
            self._seen_stale.add(index)
            return
        self._seen_sending[index] = control
        self._seen_stale.discard(index)

        def answered(_: object) -> None:
            # (A failure is the control connection lost: the worker has left.)
            if self._seen_sending.get(index) is not control:
                return
            del self._seen_sending[index]
            if index in self._seen_stale and worker.control is control:
                self._send_seen(worker)

        control.call(AgentsSeen, agents=self.seen_document()).addBoth(answered)

    def forget_absent(self, retired: Callable[[str], bool]) -> list[str]:
        """
        Forget the agents seen that no worker holds a connection of now and
        that are C{retired} (a reload: the operator took them off the
        allowlist or the token file), and tell the workers.  Those forgotten.
        """
        ready = self.ready()
        gone = self.seen.forget_absent(lambda agent_id: any(w.agents[agent_id] for w in ready), retired)
        log_forgotten(log, gone)
        if gone:
            self._tell_seen()
        return gone

    def worker_joined(self, control: ParentControl, index: int, pid: int) -> None:
        """A worker connected and said which it is."""
        if not 1 <= index <= len(self.workers):
            raise ValueError(f"no worker {index} in a group of {len(self.workers)}")
        worker = self.workers[index - 1]
        if worker.control is not None and worker.control is not control:
            self._forget(worker)
        worker.control = control
        worker.pid = pid
        worker.late = False
        worker.stopping = False
        control.worker = worker
        # The answer to its hello carries the agents seen.
        self._seen_sending.pop(index, None)
        self._seen_stale.discard(index)
        log.info("Worker {index} (pid {pid}) is ready", index=index, pid=pid)
        pending = self._respreads.pop(index, None)
        if pending is not None and pending.active():
            pending.cancel()
        self._respreads[index] = self.clock.callLater(RESPREAD_DELAY, self.respread, worker)
        if self.on_join is not None:
            self.on_join(worker)

    def respread(self, newcomer: Worker) -> None:
        """
        Move connections to C{newcomer} (a worker that joined, or came back
        after a restart): for each agent, the busiest workers drain one
        connection each until the newcomer's share is reached; the agent
        reconnects and the parent places its connections on the workers
        that hold fewest, the newcomer first.
        """
        self._respreads.pop(newcomer.index, None)
        if newcomer.control is None:
            return
        ready = self.ready()
        agents = {agent_id for w in ready for agent_id, n in w.agents.items() if n}
        # One line for the whole move: agent ids come from peers, and a
        # line per agent would make a restart log as many lines as agents.
        moved: Counter[int] = Counter()
        movers: list[str] = []
        for agent_id in sorted(agents):
            held = {w.index: w.agents[agent_id] for w in ready}
            share = sum(held.values()) // len(self.workers)
            moves: Counter[int] = Counter()
            while held[newcomer.index] + sum(moves.values()) < share:
                donor = max(held, key=lambda i: (held[i] - moves[i], -i))
                if donor == newcomer.index or held[donor] - moves[donor] <= share:
                    break
                moves[donor] += 1
            for index, count in moves.items():
                control = self.workers[index - 1].control
                if control is not None:
                    if not movers or movers[-1] != agent_id:
                        movers.append(agent_id)
                    moved[index] += count
                    asked = control.call(Release, agent_id=agent_id, count=count)
                    asked.addErrback(lambda _: None)
        if moved:
            shown = ", ".join(peer_text(a, 64) for a in movers[:MOVERS_SHOWN])
            log.info(
                "Moving {count} connection(s) of {agents} agent(s) ({shown}{more}) from worker(s) {donors} "
                "to worker {index}",
                count=sum(moved.values()),
                agents=len(movers),
                shown=shown,
                more=f" and {len(movers) - MOVERS_SHOWN} more" if len(movers) > MOVERS_SHOWN else "",
                donors=", ".join(f"{donor} ({n})" for donor, n in sorted(moved.items())),
                index=newcomer.index,
            )

    def worker_stopping(self, control: ParentControl) -> None:
        """
        A worker says it is stopping (L{Stopping}), or refused a connection
        for that: it is handed no new connection.  When no other worker is
        ready, registrations are refused (L{NoWorkerReady}, which agents
        retry) until one is: a connection handed to a worker that is leaving
        would be closed under its agent.
        """
        worker = control.worker
        if worker is None or worker.control is not control or worker.stopping:
            return
        worker.stopping = True
        if self._stopped:
            # The whole group stops: every worker does, nothing to say of each.
            return
        if self.serving():
            log.warn(
                "Worker {index} (pid {pid}) is stopping: it is handed no new agent connection, and the "
                "agents of those it drains reconnect to the other workers; it is restarted once it has exited",
                index=worker.index,
                pid=worker.pid,
            )
        else:
            log.warn(
                "Worker {index} (pid {pid}) is stopping and no other worker is ready: registrations are "
                "refused (no_worker; agents retry) until one is; it is restarted once it has exited",
                index=worker.index,
                pid=worker.pid,
            )

    def worker_left(self, control: ParentControl) -> None:
        """A worker's control connection is gone: the connections it held are gone too."""
        worker = control.worker
        if worker is not None and worker.control is control:
            self._forget(worker)

    def _forget(self, worker: Worker) -> None:
        held = worker.connections
        gone = list(worker.agents)
        for agent_id, count in worker.agents.items():
            for _ in range(count):
                self.factory._release(agent_id)
        worker.agents.clear()
        worker.control = None
        worker.stopping = False
        self._forget_if_retired(gone)
        if held:
            log.warn(
                "Worker {index} left with {held} agent connection(s); "
                + ("the group is stopping" if self._stopped else "agents reconnect to the others"),
                index=worker.index,
                held=held,
            )

    def connection_gone(self, control: ParentControl, agent_id: str) -> None:
        """A worker reports that a connection it held has ended."""
        worker = control.worker
        if worker is None or worker.control is not control or worker.agents[agent_id] <= 0:
            return
        worker.agents[agent_id] -= 1
        if not worker.agents[agent_id]:
            del worker.agents[agent_id]
        self.factory._release(agent_id)
        self._forget_if_retired((agent_id,))

    def _forget_if_retired(self, agent_ids: Iterable[str]) -> None:
        """
        Of C{agent_ids}, whose connections just ended, forget those the
        last reload retired and no worker holds a connection of now (the
        last of a retired agent's drained connections closed): requests
        stop waiting for them now, not at the next reload.
        """
        retired = self.retired
        if retired is None or self._stopped:
            return
        ready = self.ready()
        if any(retired(a) and not any(w.agents[a] for w in ready) for a in agent_ids):
            self.forget_absent(retired)

    def snapshots(self) -> Deferred[list[tuple[Worker, dict[str, Any] | None]]]:
        """
        Each worker's snapshot (C{agents}, C{metrics}, C{ready}), or
        C{None} for one that is not connected or does not answer within
        L{SNAPSHOT_TIMEOUT}.
        """
        asked = [self._snapshot(worker) for worker in self.workers]
        gathered: Deferred[list[Any]] = DeferredList(asked, consumeErrors=True)
        return gathered.addCallback(
            lambda results: [(w, r[1]) for w, r in zip(self.workers, results, strict=True)]
        )

    def _snapshot(self, worker: Worker) -> Deferred[dict[str, Any] | None]:
        """
        C{worker}'s snapshot, or C{None} after L{SNAPSHOT_TIMEOUT}.  It is
        asked for one at a time: while one is on its way, status requests
        wait for its answer.  A worker that is stopped or hung would
        otherwise be sent one per request, each kept in the parent until
        answered, and would build every one of them once it ran again
        (before it could answer a heartbeat).
        """
        control = worker.control
        if control is None:
            return succeed(None)
        index = worker.index
        asked = self._snapshots.get(index)
        if asked is None or asked[0] is not control:
            waiting: set[Deferred[Any]] = set()
            asked = self._snapshots[index] = (control, waiting)

            def answered(result: object, asked: tuple[ParentControl, set[Deferred[Any]]] = asked) -> None:
                # (A failure is the control connection lost: the worker has left.)
                if self._snapshots.get(index) is asked:
                    del self._snapshots[index]
                for each in list(asked[1]):
                    each.callback(result)
                asked[1].clear()

            control.call(Snapshot).addErrback(lambda _: None).addCallback(answered)
        waiting = asked[1]
        mine: Deferred[Any] = Deferred(canceller=waiting.discard)
        waiting.add(mine)
        mine.addTimeout(SNAPSHOT_TIMEOUT, self.clock)
        return mine.addErrback(lambda _: None)


class ParentControl(ControlProtocol):
    """
    The parent's end of one worker's control connection.

    @ivar group: the workers.
    @ivar worker: the worker at the other end, once it said hello.
    @ivar max_message_bytes: L{MAX_HELLO_MESSAGE} until the worker said
        hello, then L{MAX_CONTROL_MESSAGE}.
    """

    max_message_bytes = MAX_HELLO_MESSAGE
    _hello_deadline: Any = None

    def __init__(self, group: WorkerGroup) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.group = group
        self.worker: Worker | None = None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.group.unidentified.add(self)
        self._hello_deadline = self.group.clock.callLater(HELLO_TIMEOUT, self._no_hello)

    def _identified(self) -> None:
        self.group.unidentified.discard(self)
        deadline, self._hello_deadline = self._hello_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _no_hello(self) -> None:
        self._hello_deadline = None
        self.group.factory.log_limiter.warn(
            log,
            "control-no-hello",
            "A control connection did not say which worker it is within {timeout:.0f} s; closing it",
            timeout=HELLO_TIMEOUT,
        )
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def message_too_large(self, limit: int) -> None:
        """Past L{max_message_bytes}: the connection is closed, and the worker (if one) stops."""
        worker = self.worker
        if worker is None:
            self.group.factory.log_limiter.warn(
                log,
                "control-too-large",
                "A control connection that has not said which worker it is sent a message over {limit} bytes; "
                "closing it",
                limit=limit,
            )
        else:
            log.error(
                "Worker {index} (pid {pid}) sent a control message over {limit} bytes; closing its control "
                "connection: it stops, and is restarted",
                index=worker.index,
                pid=worker.pid,
                limit=limit,
            )
        super().message_too_large(limit)

    @Hello.responder
    def hello(self, index: int, pid: int) -> dict[str, Any]:
        """L{Hello}: the worker joins the group; the agents the others hold."""
        self._check_peer(index, pid)
        self.group.worker_joined(self, index, pid)
        self._identified()
        self.max_message_bytes = MAX_CONTROL_MESSAGE
        held = {a for w in self.group.serving() if w.index != index for a, n in w.agents.items() if n}
        return {"agents": json.dumps(sorted(held)).encode("utf-8"), "seen": self.group.seen_document()}

    def _check_peer(self, index: int, pid: int) -> None:
        """
        Refuse a L{Hello} from a process that is not the worker it names:
        its pid must be the connection's (C{SO_PEERCRED}, where the
        platform has it) and, for a worker the parent started, the pid it
        started.  Another process of the same user could otherwise take a
        worker's place and be handed agent connections.

        @raise NotThatWorker: refused; the connection is closed.
        """
        credentials = peer_credentials(self.transport)
        peer = credentials[0] if credentials is not None else None
        started = self.group.workers[index - 1].pid if 1 <= index <= len(self.group.workers) else None
        if (peer is None or peer == pid) and (started is None or started == pid):
            return
        self.group.factory.log_limiter.warn(
            log,
            "control-not-that-worker",
            "A process (pid {peer}) said it is worker {index} (pid {pid}), which the parent started as pid "
            "{started}; closing its control connection",
            peer=peer if peer is not None else "unknown",
            index=index,
            pid=pid,
            started=started if started is not None else "none",
        )
        transport: Any = self.transport
        if transport is not None:
            self.group.clock.callLater(0, transport.abortConnection)
        raise NotThatWorker(f"not worker {index}")

    @Stopping.responder
    def stopping(self) -> dict[str, Any]:
        """L{Stopping}: hand the worker no new connection."""
        self.group.worker_stopping(self)
        return {}

    @ConnectionGone.responder
    def gone(self, agent_id: str, connection_id: str) -> dict[str, Any]:
        """L{ConnectionGone}: free the connection's slot."""
        self.group.connection_gone(self, agent_id)
        return {}

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        super().connectionLost(reason)
        self._identified()
        self.group.worker_left(self)


class HandOverProtocol(ReverseConnectionProtocol):
    """
    Registers an agent connection in the parent, answers it, then hands
    its socket to a worker (L{WorkerGroup.hand_over}).

    @ivar registration: the RegistrationRequest's payload.
    """

    factory: HandOverFactory
    registration = b""
    _handing: AgentConnection | None = None
    _handed = False
    _given_up = False

    def _registration_frame(self, message_type: int, payload: bytes) -> None:
        self.registration = payload
        super()._registration_frame(message_type, payload)

    def enter_registered(self, connection: AgentConnection) -> None:
        """Lifecycle: answer the registration, stop reading, hand over once the answer is out."""
        self._leave_awaiting()
        self._handing = connection
        self._kept: list[bytes] = []
        self.frame_received = self._keep_frame  # type: ignore[method-assign]
        transport: Any = self.transport
        transport.pauseProducing()
        self._write_response(self.factory.success_response(connection.connection_id))
        self.factory.registrations += 1
        self.factory.clock.callLater(0, self._hand_over, 0)

    def _keep_frame(self, message_type: int, payload: bytes) -> None:
        # Frames that came with the registration: the worker reads them.
        self._kept.append(_HEADER.pack(len(payload) + 1, message_type) + payload)

    def _hand_over(self, attempt: int) -> None:
        connection = self._handing
        transport: Any = self.transport
        if connection is None or self._handed or transport is None or not transport.connected:
            return
        self._send_held()
        if transport._tempDataBuffer or len(transport.dataBuffer) > transport.offset:
            # The RegistrationResponse is not out yet (a full socket buffer).
            if attempt < 200:
                self.factory.clock.callLater(0.01, self._hand_over, attempt + 1)
            else:
                self.give_up("the agent does not read its RegistrationResponse")
            return
        pending = b"".join(self._kept) + bytes(self._buffer)
        self.factory.group.hand_over(self, connection, pending)

    def let_go(self) -> None:
        """A worker has the socket: close this process's copy without shutting the connection down."""
        self._handed = True
        transport: Any = self.transport
        # Twisted shuts a socket down before closing it, which would end
        # the connection for the worker too; adopted sockets are closed
        # the same way (their flag is set by adoptStreamConnection).
        transport._shouldShutdown = False
        transport.loseConnection()

    def give_up(self, why: str) -> None:
        """The connection cannot be handed over: close it (the agent reconnects)."""
        connection = self._handing
        self._given_up = True
        log.warn(
            "Closing connection {connection_id} of agent {agent_id}: {why}",
            connection_id=peer_text(connection.connection_id if connection else "", 100),
            agent_id=peer_text(connection.agent_id if connection else "", 64),
            why=why,
        )
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def leave_registered(self, detail: str, close: bool) -> None:
        """Lifecycle: the parent's copy is closed; the slot is the worker's unless handing over failed."""
        connection = self._handing
        if self._handed:
            # The worker has the socket, and the parent's copy is closing: an
            # abort would set SO_LINGER to 0 on the socket they share, and
            # the worker's close would then reset the connection.
            return
        self._handed = True
        if connection is not None:
            self.factory._release(connection.agent_id)
            if not self._given_up:
                # No worker will say it ended: said here, as a single
                # process says it (limited per agent id alike).
                self.factory.log_limiter.info(
                    log,
                    f"disconnected:{connection.agent_id}",
                    "Agent {agent_id} connection {connection_id} disconnected before a worker took it: {detail}",
                    agent_id=peer_text(connection.agent_id, 64),
                    connection_id=peer_text(connection.connection_id, 100),
                    detail=peer_text(detail, 200),
                )
        if close:
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()

    def finish_lost(self, detail: str) -> None:
        """Lifecycle: nothing is left to wake (no request ever went through the parent)."""
        self._leave_awaiting()


class HandOverFactory(ReverseConnectionFactory):
    """
    The parent's listener: the admission of L{ReverseConnectionFactory}
    (in the whole group's name), with registered connections handed to
    workers instead of joining a pool of this process.

    @ivar group: the workers (set by L{WorkerGroup}).
    """

    group: WorkerGroup
    protocol = HandOverProtocol

    def admit(self, request: Any, client_certificate: Any = None) -> AgentProtocolError | None:
        if not self.group.serving():
            return NoWorkerReady()
        return super().admit(request, client_certificate)


class ControlFactory(Factory):
    """
    The control socket's connections: closed at once while as many as
    L{EXTRA_UNIDENTIFIED} more than there are workers have not said which
    worker they are (each may hold a message of L{MAX_HELLO_MESSAGE}).

    @cvar noisy: C{False}: no log line of its own.
    @ivar group: the workers.
    """

    noisy = False

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    def buildProtocol(self, addr: Any) -> ParentControl | None:
        group = self.group
        if len(group.unidentified) >= len(group.workers) + EXTRA_UNIDENTIFIED:
            group.factory.log_limiter.warn(
                log,
                "control-unidentified",
                "{count} control connections have not said which worker they are; closing a new one",
                count=len(group.unidentified),
            )
            return None
        return ParentControl(group)


#: The control directory's name: its parent's pid, then what makes it unique.
_CONTROL_PREFIX = "sentinel-workers-{pid}-"
_CONTROL_NAME = re.compile(r"sentinel-workers-([0-9]{1,10})-[^/]+")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        # (PermissionError: another user's process holds the pid.)
        return True
    return True


def remove_stale_control_directories(directory: str) -> list[str]:
    """
    Remove the control directories in C{directory} whose parent has died
    without removing its own (killed with C{SIGKILL}, or the machine lost
    power): those this user owns, named after a pid no process has, whose
    socket no process listens on.  A directory of a live parent is never
    touched, nor anything that is not a plain directory of this user's (a
    symbolic link, another user's).

    @return: the paths removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        matched = _CONTROL_NAME.fullmatch(name)
        if matched is None:
            continue
        pid = int(matched.group(1))
        path = os.path.join(directory, name)
        try:
            status = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != uid or pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            clear_stale_unix_socket(os.path.join(path, "control.sock"))
        except SocketInUse:
            # A parent whose pid this process cannot see (another pid
            # namespace sharing the directory) still listens there, or
            # whether one does cannot be told.
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


class ControlService(service.Service):
    """
    The parent's control socket, in a directory of its own that only its
    user can enter (made when the service starts, removed when it stops or
    cannot start; one left by a parent that died is removed when the next
    starts: see L{remove_stale_control_directories}).

    @ivar group: the workers that connect to it.
    @ivar reactor: the reactor.
    @ivar directory: the directory holding the socket, C{None} when not started.
    @ivar port: the listening port, C{None} when not listening.
    """

    def __init__(self, group: WorkerGroup, reactor: Any) -> None:
        self.group = group
        self.reactor = reactor
        self.directory: str | None = None
        self.port: IListeningPort | None = None

    @property
    def path(self) -> str:
        """The socket's path (the service has started)."""
        if self.directory is None:
            raise RuntimeError("the control socket exists once its service has started")
        return os.path.join(self.directory, "control.sock")

    def startService(self) -> None:
        for path in remove_stale_control_directories(tempfile.gettempdir()):
            log.info("Removed {path}, the control directory of a worker group that is gone", path=path)
        self.directory = tempfile.mkdtemp(prefix=_CONTROL_PREFIX.format(pid=os.getpid()))
        endpoint = UNIXServerEndpoint(self.reactor, self.path, mode=0o600)
        factory = ControlFactory(self.group)
        listening = endpoint.listen(factory)
        failures: list[Failure] = []
        listening.addCallbacks(lambda port: setattr(self, "port", port), failures.append)
        if failures:
            self._remove()
            failures[0].raiseException()
        super().startService()  # type: ignore[no-untyped-call]

    def _remove(self) -> None:
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.group.stop()
        port, self.port = self.port, None
        stopped = port.stopListening() if port is not None else None
        if stopped is None:
            self._remove()
            return succeed(None)
        # The port unlinks its socket once it has stopped: the directory
        # goes after that (removed first, the unlink would fail).
        def removed(result: object) -> object:
            self._remove()
            return result

        stopped.addBoth(removed)
        return stopped
