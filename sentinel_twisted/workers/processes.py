# -*- test-case-name: tests.workers.test_group -*-
"""
The worker processes of a group: their command line, the supervisor that
starts them, restarts one that exits and stops them all, and the relay
of their log lines into the parent's log.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .._peertext import escape_char, is_clean
from .commands import Heartbeat

if TYPE_CHECKING:
    from .parent import ParentControl, Worker, WorkerGroup

__all__ = ["WorkerProcesses", "relay_line", "worker_command"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.workers")

#: Seconds a worker must have run, having joined its group, for its next
#: restart to be immediate; one that dies sooner, or never joined, is
#: restarted after a delay that doubles up to L{MAX_RESTART_DELAY}.
STEADY_AFTER = 10.0
#: The longest wait before restarting a worker that keeps dying.
MAX_RESTART_DELAY = 30.0
#: The longest log line of a worker relayed whole, in bytes.
MAX_LINE = 64 * 1024
#: Seconds between the parent's heartbeats to each worker (L{Heartbeat}).
HEARTBEAT_INTERVAL = 5.0
#: Heartbeat intervals a worker may leave its heartbeat unanswered before
#: it is taken for hung (stopped, or its reactor blocked) and killed.
#: Counted in the parent's own ticks, not in wall time: a parent that was
#: itself suspended reads the answers waiting for it before it judges.
#: A started worker that has not joined its group (connected to the parent
#: and said L{Hello <sentinel_twisted.workers.commands.Hello>}) after one
#: tick more (the first may come at once) is killed as well.
HUNG_AFTER = 6


def worker_command(arguments: Sequence[str], index: int, control: str, http: str | None) -> list[str]:
    """
    The command line of worker C{index}: the parent's own
    C{sentinel-reverse} arguments, then what makes it a worker (later
    options win over earlier ones).
    """
    code = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
    command = [sys.executable, "-c", code, "--nodaemon", "--pidfile=", "sentinel-reverse", *arguments]
    command += ["--workers", "1", "--worker-control", control, "--worker-index", str(index)]
    command += ["--status", "none", "--log-format", "json", "--http", http if http is not None else "none"]
    return command


# Fields of a worker's JSON log line that are not the event's own.
_LINE_KEYS = frozenset(["time", "level", "namespace", "message", "traceback", "text", "worker", "format"])


# A namespace as Twisted's loggers name them (module paths).
_NAMESPACE = re.compile(r"[A-Za-z_][\w.]{0,199}")


def _shown(text: str) -> str:
    """
    A worker's text for the parent's log: its lines kept (a log file
    indents the ones after the first), every other control, format or
    separator character escaped, so that no carriage return or terminal
    escape can hide the C{[worker N]} prefix or draw a line of the
    parent's.
    """
    if is_clean(text.replace("\n", "").replace("\t", "")):
        return text
    return "\n".join(
        "".join(c if c == "\t" or is_clean(c) else escape_char(c) for c in line) for line in text.split("\n")
    )


def relay_line(index: int, line: bytes) -> None:
    """
    Log a worker's log line (JSON, see C{--log-format}) as an event of the
    parent's, with its level, namespace and fields, prefixed
    C{[worker N]}; any other line is logged as it is, at info.  Control
    characters are shown escaped (see L{_shown}).
    """
    text = line.decode("utf-8", "replace").rstrip("\r")
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        if text:
            log.info("[worker {worker}] {text}", worker=index, text=_shown(text))
        return
    try:
        level = LogLevel.levelWithName(str(event.get("level") or "info"))
    except Exception:
        level = LogLevel.info
    namespace = str(event.get("namespace") or log.namespace)
    if not _NAMESPACE.fullmatch(namespace):
        namespace = log.namespace
    message = str(event.get("message", ""))
    if event.get("traceback"):
        message = f"{message}\n{event['traceback']}"
    message = _shown(message)
    fields = {k: v for k, v in event.items() if k not in _LINE_KEYS and not k.startswith("log_")}
    Logger(namespace=namespace).emit(level, "[worker {worker}] {text}", worker=index, text=message, **fields)


class _WorkerProcess(ProcessProtocol):
    """A worker process: its output lines are relayed to the parent's log."""

    def __init__(self, processes: WorkerProcesses, index: int) -> None:
        self.processes = processes
        self.index = index
        self._partial = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            relay_line(self.index, line[:MAX_LINE])

    def processEnded(self, reason: Failure) -> None:
        for rest in self._partial.values():
            if rest:
                relay_line(self.index, rest)
        self.processes.process_ended(self, reason)
        self.ended.callback(None)


class WorkerProcesses(service.Service):
    """
    Runs the workers: starts each, restarts one that ends while the
    service runs (at once after a steady run, else after a delay that
    doubles), and on stop sends each C{SIGTERM} (their requests get the
    shutdown grace) and C{SIGKILL} after C{stop_timeout}.

    Every L{HEARTBEAT_INTERVAL} seconds it sends each connected worker a
    L{Heartbeat}, one at a time: a worker that has not answered by the
    next one is marked L{late <sentinel_twisted.workers.parent.Worker.late>}
    (handed no new agent connection), and one that has not answered for
    L{HUNG_AFTER} intervals is killed (C{SIGKILL}) and restarted as any
    worker that exits: a hung worker would hold its agents' connection
    slots and its share of the clients for ever.  So is one that has not
    joined its group L{HUNG_AFTER} intervals or more after it was started
    (stuck starting, or stopped): its place would stay empty for ever.  A
    worker that never joined is restarted after the doubling delay,
    however long it ran.

    @ivar group: the workers.
    @ivar command: the command line of worker N.
    @ivar reactor: the reactor (processes and time).
    @ivar stop_timeout: seconds a worker has to exit after C{SIGTERM}.
    @ivar processes: the running workers' processes, by index.
    """

    def __init__(
        self,
        group: WorkerGroup,
        command: Callable[[int], list[str]],
        reactor: Any,
        stop_timeout: float,
    ) -> None:
        self.group = group
        self.command = command
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.processes: dict[int, _WorkerProcess] = {}
        #: SIGHUPs forwarded to the workers so far.
        self.reloads = 0
        # The value of reloads when each worker was started.
        self._spawned_at: dict[int, int] = {}
        self._started: dict[int, float] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        # The heartbeat waiting for its answer, by worker: the control
        # connection it went to and the heartbeat ticks since it was sent.
        self._beats: dict[int, tuple[ParentControl, int]] = {}
        # The heartbeat ticks since each worker that has not joined yet was
        # started.
        self._starting: dict[int, int] = {}
        self._heartbeat = LoopingCall(self.beat)
        self._heartbeat.clock = reactor
        group.on_join = self._joined

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for worker in self.group.workers:
            self.spawn(worker.index)
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=False)

    def beat(self) -> None:
        """
        A heartbeat tick: send each connected worker a L{Heartbeat} unless
        its last one is unanswered; mark a worker late whose last one is,
        and kill one that has left it unanswered for L{HUNG_AFTER} ticks, or
        that has not joined L{HUNG_AFTER} intervals or more after it was
        started (one tick more than that: the first may come at once).
        """
        for index, ticks in list(self._starting.items()):
            self._starting[index] = ticks = ticks + 1
            if ticks == HUNG_AFTER + 1 and index in self.processes:
                log.error(
                    "Worker {index} (pid {pid}) has not joined its group within {seconds:.0f} s of its start "
                    "(stuck starting, or stopped); killing it: it is restarted",
                    index=index,
                    pid=self.group.workers[index - 1].pid,
                    seconds=HUNG_AFTER * HEARTBEAT_INTERVAL,
                )
                self._signal(index, "KILL")
        for worker in self.group.workers:
            index, control = worker.index, worker.control
            beat = self._beats.get(index)
            if control is None:
                self._beats.pop(index, None)
                worker.late = False
                continue
            if beat is not None and beat[0] is control:
                missed = beat[1] + 1
                self._beats[index] = (control, missed)
                worker.late = True
                if missed == HUNG_AFTER:
                    log.error(
                        "Worker {index} (pid {pid}) has not answered its parent for {seconds:.0f} s "
                        "(hung, or stopped); killing it: its agents reconnect to the others, and it is restarted",
                        index=index,
                        pid=worker.pid,
                        seconds=HUNG_AFTER * HEARTBEAT_INTERVAL,
                    )
                    self._signal(index, "KILL")
                continue
            self._beats[index] = (control, 0)
            answer = control.call(Heartbeat)
            answer.addBoth(self._answered, worker, control)

    def _answered(self, result: object, worker: Worker, control: ParentControl) -> None:
        # (A failure is the control connection lost: the worker has left.)
        beat = self._beats.get(worker.index)
        if beat is not None and beat[0] is control:
            del self._beats[worker.index]
            worker.late = False

    def spawn(self, index: int) -> None:
        """Start worker C{index}."""
        self._restarts.pop(index, None)
        argv = self.command(index)
        protocol = _WorkerProcess(self, index)
        self._started[index] = self.reactor.seconds()
        self._spawned_at[index] = self.reloads
        self._starting[index] = 0
        transport = self.reactor.spawnProcess(
            protocol, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"}
        )
        transport.closeStdin()
        self.processes[index] = protocol
        self.group.workers[index - 1].pid = transport.pid

    def process_ended(self, protocol: _WorkerProcess, reason: Failure) -> None:
        """A worker process exited: restart it if the group still runs."""
        index = protocol.index
        if self.processes.get(index) is protocol:
            del self.processes[index]
        worker = self.group.workers[index - 1]
        worker.pid = None
        joined = self._starting.pop(index, None) is None
        if not self.running:
            return
        lived = self.reactor.seconds() - self._started.get(index, 0.0)
        if lived >= STEADY_AFTER and joined:
            delay = 0.0
            self._delays[index] = 1.0
        else:
            delay = self._delays.get(index, 1.0)
            self._delays[index] = min(delay * 2, MAX_RESTART_DELAY)
        worker.restarts += 1
        log.warn(
            "Worker {index} exited ({reason}); restarting it in {delay:.0f} s",
            index=index,
            reason="exit 0" if reason.check(ProcessDone) else reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[index] = self.reactor.callLater(delay, self.spawn, index)

    def reload(self) -> None:
        """
        Forward a SIGHUP to the workers that have joined; one still starting
        gets it when it joins (before that it may not handle the signal yet,
        and a SIGHUP it does not handle ends it).
        """
        self.reloads += 1
        for worker in self.group.workers:
            if worker.control is not None:
                self._signal(worker.index, "HUP")

    def _joined(self, worker: Worker) -> None:
        self._starting.pop(worker.index, None)
        if self._spawned_at.get(worker.index, self.reloads) < self.reloads:
            log.info("Worker {index} started before the last SIGHUP: it rereads its files now", index=worker.index)
            self._spawned_at[worker.index] = self.reloads
            self._signal(worker.index, "HUP")

    def _signal(self, index: int, signal_name: str) -> None:
        protocol = self.processes.get(index)
        if protocol is not None:
            try:
                protocol.transport.signalProcess(signal_name)  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass

    def signal_all(self, signal_name: str) -> None:
        """Send every running worker a signal (C{"HUP"}, C{"TERM"}...)."""
        for protocol in list(self.processes.values()):
            try:
                protocol.transport.signalProcess(signal_name)  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass

    def _kill_remaining(self) -> None:
        """The stop timeout is over: kill the workers still running, saying which."""
        for index in sorted(self.processes):
            log.warn(
                "Worker {index} (pid {pid}) did not exit within {timeout:.0f} s of SIGTERM; killing it",
                index=index,
                pid=self.group.workers[index - 1].pid,
                timeout=self.stop_timeout,
            )
        self.signal_all("KILL")

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._heartbeat.running:
            self._heartbeat.stop()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        running = list(self.processes.values())
        self.signal_all("TERM")
        kill = self.reactor.callLater(self.stop_timeout, self._kill_remaining)
        ended: Deferred[Any] = DeferredList([p.ended for p in running])

        def done(result: object) -> object:
            if kill.active():
                kill.cancel()
            return result

        return ended.addBoth(done)
