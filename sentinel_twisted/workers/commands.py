# -*- test-case-name: tests.workers.test_commands -*-
"""
The AMP commands between the parent and its workers, over a UNIX socket
(the parent's control socket, in a directory only its user can enter).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.protocols import amp
from twisted.python.compat import nativeString
from twisted.python.failure import Failure

#: The reason of a connection closed cleanly.
CONNECTION_DONE = Failure(ConnectionDone())

__all__ = [
    "AdoptConnection",
    "AdoptionFailed",
    "AgentsSeen",
    "Chunked",
    "ConnectionGone",
    "ControlProtocol",
    "Heartbeat",
    "Hello",
    "NotThatWorker",
    "Release",
    "Snapshot",
    "Stopping",
    "WorkerStopping",
]

#: Bytes of a L{Chunked} value per AMP key (AMP's limit is 65,535).
CHUNK_SIZE = 60_000


class Chunked(amp.Argument):
    """
    Bytes of any length: AMP values are at most 64 KiB, so the value is
    split over the keys C{NAME.0}, C{NAME.1}, ... and C{NAME} holds their
    count.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any) -> None:
        value: bytes = objects[nativeString(name)]
        chunks = [value[i : i + CHUNK_SIZE] for i in range(0, len(value), CHUNK_SIZE)]
        strings[name] = b"%d" % len(chunks)
        for i, chunk in enumerate(chunks):
            strings[b"%s.%d" % (name, i)] = chunk

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any) -> None:
        count = int(strings[name])
        objects[nativeString(name)] = b"".join(strings[b"%s.%d" % (name, i)] for i in range(count))


class NotThatWorker(Exception):
    """
    A L{Hello} the parent refuses: the process that says it is not the
    worker it names (its process id is not the connection's, or not the
    one the parent started as that worker).
    """


class Hello(amp.Command):
    """
    Worker to parent, first: which worker it is.

    @cvar arguments: its index (from 1) and process id.
    @cvar response: C{agents}: the agent ids the other workers hold (a JSON
        list), which a worker that joins a running group waits for before
        it takes HTTP clients; C{seen}: the agents the group has seen (see
        L{AgentsSeen}).
    @cvar errors: L{NotThatWorker}.
    """

    arguments = [(b"index", amp.Integer()), (b"pid", amp.Integer())]
    response = [(b"agents", Chunked()), (b"seen", Chunked())]
    errors = {NotThatWorker: b"NOT_THAT_WORKER"}


class Heartbeat(amp.Command):
    """
    Parent to worker, every few seconds: a worker whose reactor runs
    answers at once.  One that leaves heartbeats unanswered is handed no
    new agent connections, and one that answers none for long is taken
    for hung and killed (see
    L{WorkerProcesses <sentinel_twisted.workers.processes.WorkerProcesses>}).

    @cvar arguments: none.
    @cvar response: nothing.
    """

    arguments = list[tuple[bytes, amp.Argument]]()
    response = list[tuple[bytes, amp.Argument]]()


class AgentsSeen(amp.Command):
    """
    Parent to worker: the agents the group has seen (a JSON list, in order
    of first registration), sent when that changes (one at a time: changes
    made while one is on its way are sent, as the latest list, once it is
    answered).  Without
    C{--agent} a worker consults each of them for every request, whether
    it holds a connection of it or not, so that a request is never decided
    without an agent that another worker holds (it gets C{503} there, fail
    closed).

    @cvar arguments: C{agents}.
    @cvar response: nothing.
    """

    arguments = [(b"agents", Chunked())]
    response = list[tuple[bytes, amp.Argument]]()


class AdoptionFailed(Exception):
    """
    The worker cannot serve a connection it was handed (the agent reset it
    before the worker took it, for one): the parent frees its slot.  A
    declared error, so that the control connection outlives it (AMP ends
    the connection on an error it does not know).
    """


class WorkerStopping(Exception):
    """
    The worker is stopping (it got C{SIGTERM}): it takes no new connection,
    and the parent hands this one to another worker.  Declared, as
    L{AdoptionFailed}.
    """


class AdoptConnection(amp.Command):
    """
    Parent to worker: serve this registered agent connection.

    C{socket} is the connection's descriptor; C{registration} the payload of
    its RegistrationRequest (already admitted and answered by the parent);
    C{pending} the bytes the agent sent after it that the parent had read.

    @cvar arguments: the socket and what the worker needs to serve it.
    @cvar response: nothing: the worker serves it from now on.
    @cvar errors: L{AdoptionFailed}: the worker does not hold the connection;
        L{WorkerStopping}: it is stopping and did not take it.
    """

    arguments = [
        (b"socket", amp.Descriptor()),
        (b"family", amp.Integer()),
        (b"registration", Chunked()),
        (b"connection_id", amp.Unicode()),
        (b"peer", amp.Unicode()),
        (b"peer_credentials", amp.ListOf(amp.Integer())),
        (b"token_verified", amp.Boolean()),
        (b"connected_since", amp.Float()),
        (b"pending", Chunked()),
    ]
    response = list[tuple[bytes, amp.Argument]]()
    errors = {AdoptionFailed: b"ADOPTION_FAILED", WorkerStopping: b"WORKER_STOPPING"}


class ConnectionGone(amp.Command):
    """
    Worker to parent: a connection it was handed has ended (its slot is free).

    @cvar arguments: the agent id and the connection id.
    @cvar response: nothing.
    """

    arguments = [(b"agent_id", amp.Unicode()), (b"connection_id", amp.Unicode())]
    response = list[tuple[bytes, amp.Argument]]()


class Stopping(amp.Command):
    """
    Worker to parent: this worker is stopping (it got C{SIGTERM} on its
    own, or the whole group stops): it drains the connections it holds and
    is handed no new one.

    @cvar arguments: none.
    @cvar response: nothing.
    """

    arguments = list[tuple[bytes, amp.Argument]]()
    response = list[tuple[bytes, amp.Argument]]()


class Release(amp.Command):
    """
    Parent to worker: drain C{count} of C{agent_id}'s connections (they end
    once their requests are answered); the agent reconnects and the parent
    places the new connections on a worker that lacks them.

    @cvar arguments: the agent id and how many connections.
    @cvar response: how many are being drained.
    """

    arguments = [(b"agent_id", amp.Unicode()), (b"count", amp.Integer())]
    response = [(b"released", amp.Integer())]


class Snapshot(amp.Command):
    """
    Parent to worker: its C{/agents} document (JSON), its C{/metrics} text
    and whether it is ready (every C{--ready-agent} registered there).

    @cvar arguments: none.
    @cvar response: C{agents}, C{metrics} and C{ready}.
    """

    arguments = list[tuple[bytes, amp.Argument]]()
    response = [(b"agents", Chunked()), (b"metrics", Chunked()), (b"ready", amp.Boolean())]


class ControlProtocol(amp.AMP):
    """
    AMP without its own log lines for each connection made and lost (the
    parent and the worker say what matters in their words), and with a
    limit on the bytes of one message: AMP keeps every key of a message
    until its end, however many come.

    @ivar transport: the UNIX socket (file descriptors pass over it).
    @ivar max_message_bytes: the most bytes of one message (an AMP box,
        its keys and values) taken; past it, L{message_too_large} is
        called, the message is dropped and nothing more is read.
    """

    max_message_bytes: int | None = None
    _message_bytes = 0
    _over = False

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._over:
            amp.BinaryBoxProtocol.dataReceived(self, data)

    def proto_key(self, string: bytes) -> str | None:
        if not string:
            # The message is complete.
            self._message_bytes = 0
        elif self._counted(string):
            return "over"
        state: str | None = amp.BinaryBoxProtocol.proto_key(self, string)
        return state

    def proto_value(self, string: bytes) -> str | None:
        if self._counted(string):
            return "over"
        state: str | None = amp.BinaryBoxProtocol.proto_value(self, string)
        return state

    def proto_over(self, string: bytes) -> str:
        """A message went past the limit: nothing more is taken."""
        return "over"

    def _counted(self, string: bytes) -> bool:
        """Count C{string} in the message; whether the message is now over the limit."""
        self._message_bytes += len(string) + 2
        limit = self.max_message_bytes
        if limit is None or self._message_bytes <= limit:
            return False
        self._over = True
        self._currentBox = None
        self.pauseProducing()  # type: ignore[no-untyped-call]
        self.message_too_large(limit)
        return True

    def message_too_large(self, limit: int) -> None:
        """A message went past L{max_message_bytes}: the connection is closed."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    def call(self, command: type[amp.Command], **arguments: Any) -> Deferred[dict[str, Any]]:
        """C{callRemote}, typed."""
        result: Deferred[dict[str, Any]] = self.callRemote(command, **arguments)  # type: ignore[no-untyped-call]
        return result
