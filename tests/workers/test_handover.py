"""
Handing a registered agent connection from the parent to a worker over
their real control connection (a UNIX socket pair, descriptors passed as
AMP does): what an agent that vanishes meanwhile does to it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from sentinel_twisted.config import ReverseConnectionConfig
from sentinel_twisted.proxy._reload import ConfigurationReloader
from sentinel_twisted.workers.child import (
    WorkerConnectionFactory,
    WorkerControl,
    WorkerControlService,
)
from sentinel_twisted.workers.commands import (
    AdoptConnection,
    AdoptionFailed,
    ConnectionGone,
    ControlProtocol,
    Heartbeat,
    Snapshot,
    Stopping,
    WorkerStopping,
)
from sentinel_twisted.workers.parent import HandOverFactory, HandOverProtocol, WorkerGroup

from .._proxy_support import captured_log, log_text
from ..rawagent import HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE, frame, registration

reactor: Any = _reactor


class _Ends(ControlProtocol):
    """The parent's end: says when its connection is lost, records the connections gone."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.lost: Deferred[None] = Deferred()
        self.gone: list[tuple[str, str]] = []
        self.gone_reported: Deferred[None] = Deferred()
        self.stopping: Deferred[None] = Deferred()

    @Stopping.responder
    def worker_stopping(self) -> dict[str, Any]:
        self.stopping.callback(None)
        return {}

    @ConnectionGone.responder
    def connection_gone(self, agent_id: str, connection_id: str) -> dict[str, Any]:
        self.gone.append((agent_id, connection_id))
        self.gone_reported.callback(None)
        return {}

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class _Worker(WorkerControl):
    def __init__(self, control: WorkerControlService) -> None:
        super().__init__(control)
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class _WorkerEnd(TestCase):
    """A worker's control connection to a parent's end, both in this process."""

    #: The agents this worker allows, as it last read them.
    allowed: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.factory = WorkerConnectionFactory(ReverseConnectionConfig(allowed_agents=self.allowed), clock=reactor)
        self.reloader = ConfigurationReloader(
            self.factory, token_file=None, allow=list(self.allowed), allow_file=None, client_ca=None, trusts=[]
        )
        self.service = WorkerControlService(
            "unused",
            1,
            self.factory,
            reactor,
            lambda: (b'{"agents": []}', b"", True),
            self.reloader.drain,
            self.reloader.refusal,
        )
        # The worker must not stop the test's reactor when its control connection ends.
        self.service._stopping = True
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.parent = _Ends()
        self.worker = _Worker(self.service)
        self.service.protocol = self.worker
        for end, protocol in ((parent_end, self.parent), (worker_end, self.worker)):
            end.setblocking(False)
            reactor.adoptStreamConnection(end.fileno(), socket.AF_UNIX, _Factory(protocol))
            end.close()
        self.addCleanup(self._close)

    @inlineCallbacks
    def _close(self) -> Any:
        for protocol in (self.parent, self.worker):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        yield self.parent.lost
        yield self.worker.lost

    def adopt(self, sock: socket.socket) -> Deferred[Any]:
        return self.parent.call(
            AdoptConnection,
            socket=sock.fileno(),
            family=sock.family,
            registration=json.dumps(registration("waf-1")).encode(),
            connection_id="waf-1-1",
            peer="127.0.0.1:1",
            peer_credentials=[],
            token_verified=False,
            connected_since=0.0,
            pending=b"",
        )


class AdoptionTests(_WorkerEnd):
    @inlineCallbacks
    def test_a_connection_gone_before_the_worker_takes_it_is_refused_and_the_control_connection_stays(self) -> Any:
        # A socket that is not connected: what an agent's reset leaves.
        gone = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(gone.close)
        yield self.parent.call(Snapshot)
        before = sorted(os.listdir("/proc/self/fd"))
        error = yield self.assertFailure(self.adopt(gone), AdoptionFailed)
        self.assertIn("not connected", str(error))
        # The worker holds nothing of it: no slot, no descriptor.
        self.assertEqual((self.factory.awaiting_registration, dict(self.factory._registered_per_agent)), (0, {}))
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before)
        # And the worker is still the parent's: it answers the next command.
        answer = yield self.parent.call(Snapshot)
        self.assertTrue(answer["ready"])
        self.assertIsNotNone(self.worker.transport)


class HeartbeatAnswerTests(_WorkerEnd):
    @inlineCallbacks
    def test_a_worker_answers_its_parents_heartbeat(self) -> Any:
        answer = yield self.parent.call(Heartbeat).addTimeout(10, reactor)
        self.assertEqual(answer, {})


class StoppingWorkerTests(_WorkerEnd):
    @inlineCallbacks
    def test_a_worker_that_stops_tells_its_parent_and_refuses_new_connections(self) -> Any:
        # SIGTERM stops the worker's services: it drains what it holds, and
        # a connection handed to it meanwhile would be closed under its agent.
        self.service.stopService()
        yield self.parent.stopping.addTimeout(10, reactor)
        agent, handed = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(agent.close)
        before = sorted(os.listdir("/proc/self/fd"))
        error = yield self.assertFailure(self.adopt(handed), WorkerStopping)
        self.assertEqual(str(error), "worker 1 is stopping")
        self.assertEqual((self.factory.awaiting_registration, dict(self.factory._registered_per_agent)), (0, {}))
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before, "the worker closed its copy")
        # The parent's copy is whole: it can hand it to another worker.
        handed.sendall(b"still open")
        agent.settimeout(5)
        self.assertEqual(agent.recv(100), b"still open")
        # The control connection stays while the worker drains.
        answer = yield self.parent.call(Snapshot)
        self.assertTrue(answer["ready"])


class _Factory:
    """Builds the one protocol it was given."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


class AdoptionAfterReloadTests(_WorkerEnd):
    allowed = ("auth-*",)

    @inlineCallbacks
    def test_a_connection_the_worker_no_longer_allows_is_drained_when_adopted(self) -> Any:
        # The parent admitted waf-1; this worker has reread an allowlist
        # without it meanwhile (each process gets the SIGHUP on its own).
        agent, handed = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(agent.close)
        with captured_log() as events:
            yield self.adopt(handed)
            handed.close()
            yield self.parent.gone_reported.addTimeout(10, reactor)
        self.assertEqual(self.parent.gone, [("waf-1", "waf-1-1")])
        self.assertIn("the agent is no longer allowed (allowlist)", log_text(events))
        agent.settimeout(5)
        self.assertEqual(agent.recv(100), b"", "the agent's connection is closed")
        self.assertNotIn("waf-1", self.factory.pool)


class _Recording:
    """Stands for a worker's control connection: keeps what it is sent."""

    worker: Any = None

    def __init__(self) -> None:
        self.adopted: list[dict[str, Any]] = []
        self.answers: list[Deferred[Any]] = []

    def call(self, command: Any, **arguments: Any) -> Deferred[Any]:
        self.adopted.append(arguments)
        self.answers.append(Deferred())
        return self.answers[-1]


class ParentEndTests(TestCase):
    @inlineCallbacks
    def test_the_parent_never_aborts_a_connection_it_handed_over(self) -> Any:
        factory = HandOverFactory(ReverseConnectionConfig(), clock=reactor)
        group = WorkerGroup(1, factory, reactor)
        self.addCleanup(group.stop)
        control = _Recording()
        group.worker_joined(control, 1, 4242)  # type: ignore[arg-type]
        agent, parent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(agent.close)
        parent_end.setblocking(False)
        protocol = HandOverProtocol(factory)
        let_go = protocol.let_go

        def let_go_then_over_budget() -> None:
            let_go()
            # The incomplete-frame budget (shared by every connection) picks
            # it before the parent's copy is closed (another connection's
            # read in the same turn of the reactor).
            protocol.frame_budget_exceeded(1, 2, 1)

        protocol.let_go = let_go_then_over_budget  # type: ignore[method-assign]
        reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, _Factory(protocol))
        parent_end.close()
        agent.sendall(frame(HANDSHAKE_REQUEST, registration("waf-1")))
        for _ in range(100):
            if control.adopted:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        # The connection, then the agents seen (now with waf-1).
        handed, seen = control.adopted
        self.assertEqual(seen, {"agents": b'["waf-1"]'})
        for _ in range(100):
            if protocol.transport.disconnected:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(protocol.transport.disconnected, "the parent's copy is closed")
        worker_copy = socket.socket(fileno=os.dup(handed["socket"]))
        self.addCleanup(worker_copy.close)
        # An abort sets SO_LINGER to 0 on the socket, which the worker shares:
        # its close would then reset the connection.
        self.assertEqual(
            struct.unpack("ii", worker_copy.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)), (0, 0)
        )
        control.answers[0].callback({})
        self.assertEqual(factory.registered_connections("waf-1"), 1, "the worker holds the slot")
        agent.settimeout(5)
        (length,) = struct.unpack("!I", agent.recv(4))
        self.assertEqual(agent.recv(length)[0], HANDSHAKE_RESPONSE)
        # The parent's close shut nothing down (Twisted's _shouldShutdown):
        # the worker's copy still reaches the agent, both ways.
        worker_copy.sendall(b"from the worker")
        self.assertEqual(agent.recv(100), b"from the worker")
        agent.sendall(b"to the worker")
        worker_copy.settimeout(5)
        self.assertEqual(worker_copy.recv(100), b"to the worker")


class _Unread(StringTransport):
    """A socket transport whose RegistrationResponse has not left: the agent does not read."""

    def __init__(self) -> None:
        super().__init__()
        self._tempDataBuffer = [b"the RegistrationResponse"]
        self.dataBuffer = b""
        self.offset = 0


def _one_worker() -> tuple[MemoryReactorClock, HandOverFactory, _Recording, HandOverProtocol]:
    """A group of one joined worker, and a parent connection not handed over yet."""
    clock = MemoryReactorClock()
    factory = HandOverFactory(ReverseConnectionConfig(), clock=clock)
    group = WorkerGroup(1, factory, clock)
    control = _Recording()
    group.worker_joined(control, 1, 4242)  # type: ignore[arg-type]
    return clock, factory, control, HandOverProtocol(factory)


class NotReadingTests(TestCase):
    def test_an_agent_that_does_not_read_its_answer_is_given_up_and_its_slot_freed(self) -> None:
        clock, factory, control, protocol = _one_worker()
        transport = _Unread()
        protocol.makeConnection(transport)
        protocol.dataReceived(frame(HANDSHAKE_REQUEST, registration("waf-1")))
        self.assertEqual(factory.registered_connections("waf-1"), 1)
        with captured_log() as events:
            clock.advance(0)
            for _ in range(300):
                if transport.disconnected:
                    break
                clock.advance(0.01)
        self.assertTrue(transport.disconnected, "given up")
        self.assertIn("the agent does not read its RegistrationResponse", log_text(events))
        with captured_log() as events:
            protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(events, [], "said once, by the line that gives up")
        self.assertEqual((factory.registered_connections("waf-1"), control.adopted), (0, []))


class ClosedBeforeHandOverTests(TestCase):
    def test_a_connection_the_agent_breaks_before_a_worker_takes_it_is_logged(self) -> None:
        # A single process says why such a connection ended; the parent
        # said nothing at all: the agent was told it registered, and the
        # proxy's log had no line of it.
        clock, factory, control, protocol = _one_worker()
        transport = StringTransport()
        protocol.makeConnection(transport)
        with captured_log() as events:
            protocol.dataReceived(frame(HANDSHAKE_REQUEST, registration("waf-1")) + struct.pack(">IB", 0xFFFFFFFF, 0x20))
            protocol.connectionLost(Failure(ConnectionAborted()))
            clock.advance(0)
        text = log_text(events)
        self.assertRegex(
            text,
            r"Agent waf-1 connection waf-1-\S+ disconnected before a worker took it: "
            r"Message too large: 4294967295 bytes \(max: 16777216\)",
        )
        self.assertEqual(len([e for e in events if "disconnected" in formatEvent(e)]), 1, text)
        self.assertEqual((factory.registered_connections("waf-1"), control.adopted), (0, []))
