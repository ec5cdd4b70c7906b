"""
The worker group's bookkeeping, in memory: which worker gets a connection,
slots freed when connections or workers go, refusals while no worker is
ready, the group's /agents and /metrics, the workers' log lines and the
options that a group needs.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.proxy.factory import rejection_reason
from sentinel_twisted.tap import Options
from sentinel_twisted.workers.commands import (
    CHUNK_SIZE,
    AdoptConnection,
    AdoptionFailed,
    AgentsSeen,
    Chunked,
    Heartbeat,
)
from sentinel_twisted.workers.parent import HandOverFactory, NoWorkerReady, WorkerGroup
from sentinel_twisted.workers.processes import (
    HEARTBEAT_INTERVAL,
    HUNG_AFTER,
    WorkerProcesses,
    relay_line,
    worker_command,
)
from sentinel_twisted.workers.status import group_document, merge_metrics

from .._proxy_support import capabilities, captured_log, log_text


def request(agent_id: str = "waf-1") -> m.RegistrationRequest:
    return m.RegistrationRequest(
        protocol_version=m.PROTOCOL_VERSION,
        agent_id=agent_id,
        capabilities=capabilities(agent_id),
        auth_token=None,
        metadata=None,
    )


class _Control:
    """Stands for a worker's control connection; records the commands sent."""

    worker: Any = None

    def __init__(self) -> None:
        self.sent: list[tuple[Any, dict[str, Any]]] = []
        self.answers: list[Deferred[Any]] = []

    def call(self, command: Any, **arguments: Any) -> Any:
        self.sent.append((command, arguments))
        self.answers.append(Deferred())
        return self.answers[-1]


class _Handing:
    """Stands for the parent's end of a registered connection being handed over."""

    registration = b"{}"
    peer = "127.0.0.1:1"
    peer_credentials = None

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.transport = self
        self.let_go_called = False

    def getHandle(self) -> socket.socket:
        return self.socket

    def let_go(self) -> None:
        self.let_go_called = True


class _Registered:
    """Stands for the registered connection."""

    token_verified = False
    connected_since = 0.0

    def __init__(self, agent_id: str, connection_id: str) -> None:
        self.agent_id = agent_id
        self.connection_id = connection_id


def group(count: int, cap: int = 8) -> WorkerGroup:
    from sentinel_twisted.config import ReverseConnectionConfig

    factory = HandOverFactory(ReverseConnectionConfig(max_connections_per_agent=cap), clock=MemoryReactorClock())
    return WorkerGroup(count, factory, MemoryReactorClock())


def join_all(workers: WorkerGroup) -> list[_Control]:
    controls = []
    for worker in workers.workers:
        control = _Control()
        workers.worker_joined(control, worker.index, 1000 + worker.index)  # type: ignore[arg-type]
        controls.append(control)
    return controls


def place(workers: WorkerGroup, agent_id: str, times: int) -> list[int]:
    """Admit and place C{times} connections of C{agent_id}; the chosen workers' indexes."""
    chosen = []
    for _ in range(times):
        assert workers.factory.admit(request(agent_id)) is None
        worker = workers.choose(agent_id)
        assert worker is not None
        worker.agents[agent_id] += 1
        chosen.append(worker.index)
    return chosen


class PlacementTests(TestCase):
    def test_an_agent_with_as_many_connections_as_workers_has_one_in_each(self) -> None:
        workers = group(3)
        join_all(workers)
        self.assertEqual(sorted(place(workers, "waf-1", 3)), [1, 2, 3])

    def test_connections_are_spread_evenly_per_agent(self) -> None:
        workers = group(2)
        join_all(workers)
        place(workers, "waf-1", 4)
        self.assertEqual([w.agents["waf-1"] for w in workers.workers], [2, 2])

    def test_a_new_agent_goes_first_to_the_worker_holding_fewer_connections(self) -> None:
        workers = group(2)
        join_all(workers)
        place(workers, "waf-1", 3)  # worker 1 holds 2, worker 2 holds 1
        self.assertEqual(place(workers, "auth", 1), [2])

    def test_a_worker_that_is_not_connected_gets_nothing(self) -> None:
        workers = group(2)
        control = _Control()
        workers.worker_joined(control, 2, 4242)  # type: ignore[arg-type]
        self.assertEqual(place(workers, "waf-1", 2), [2, 2])

    def test_a_worker_index_outside_the_group_is_refused(self) -> None:
        workers = group(2)
        self.assertRaises(ValueError, workers.worker_joined, _Control(), 3, 1)


class SlotTests(TestCase):
    def test_a_connection_that_ends_in_a_worker_frees_its_slot_in_the_parent(self) -> None:
        workers = group(2, cap=2)
        controls = join_all(workers)
        place(workers, "waf-1", 2)
        self.assertIsNotNone(workers.factory.admit(request("waf-1")))  # the cap holds across workers
        workers.connection_gone(controls[0], "waf-1")  # type: ignore[arg-type]
        self.assertEqual(workers.factory.registered_connections("waf-1"), 1)
        self.assertIsNone(workers.factory.admit(request("waf-1")))

    def test_a_report_for_a_connection_the_worker_does_not_hold_changes_nothing(self) -> None:
        workers = group(2)
        controls = join_all(workers)
        place(workers, "waf-1", 1)
        workers.connection_gone(controls[1], "waf-1")  # type: ignore[arg-type]
        workers.connection_gone(controls[0], "auth")  # type: ignore[arg-type]
        self.assertEqual(workers.factory.registered_connections("waf-1"), 1)

    def test_a_worker_that_leaves_frees_every_slot_it_held(self) -> None:
        workers = group(2)
        controls = join_all(workers)
        place(workers, "waf-1", 4)
        place(workers, "auth", 1)
        with captured_log() as events:
            workers.worker_left(controls[0])  # type: ignore[arg-type]
        self.assertEqual(workers.factory.registered_connections("waf-1"), 2)
        self.assertEqual(workers.factory.registered_connections("auth"), 0)
        self.assertEqual([w.index for w in workers.ready()], [2])
        self.assertIn("Worker 1 left with 3 agent connection(s); agents reconnect to the others", log_text(events))

    def test_a_worker_that_leaves_as_the_group_stops_is_not_said_to_send_agents_to_the_others(self) -> None:
        workers = group(2)
        controls = join_all(workers)
        place(workers, "waf-1", 4)
        workers.stop()
        with captured_log() as events:
            workers.worker_left(controls[0])  # type: ignore[arg-type]
        self.assertIn("Worker 1 left with 2 agent connection(s); the group is stopping", log_text(events))
        self.assertNotIn("reconnect to the others", log_text(events))

    def waf_1_to_hand_over(self) -> tuple[WorkerGroup, list[_Control], _Handing]:
        """A group of two joined workers, waf-1 admitted, and a connection to hand over."""
        workers = group(2)
        controls = join_all(workers)
        self.assertIsNone(workers.factory.admit(request("waf-1")))
        handover = _Handing()
        self.addCleanup(handover.socket.close)
        return workers, controls, handover

    def test_a_connection_the_worker_cannot_adopt_frees_its_slot_and_descriptor(self) -> None:
        workers, controls, handover = self.waf_1_to_hand_over()
        before = sorted(os.listdir("/proc/self/fd"))
        connection = _Registered("waf-1", "waf-1-1")
        with captured_log() as events:
            workers.hand_over(handover, connection, b"")  # type: ignore[arg-type]
            self.assertTrue(handover.let_go_called)
            (command, arguments), (seen, _) = controls[0].sent
            self.assertEqual((command, seen), (AdoptConnection, AgentsSeen))
            controls[0].answers[0].errback(AdoptionFailed("[Errno 107] Transport endpoint is not connected"))
        self.assertIn("Worker 1 did not take connection waf-1-1 of agent waf-1", log_text(events))
        self.assertEqual(workers.factory.registered_connections("waf-1"), 0)
        self.assertEqual([dict(w.agents) for w in workers.workers], [{}, {}])
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before, "the copy of the socket is closed")

    def test_a_connection_is_said_to_be_served_once_the_worker_has_it(self) -> None:
        # Not when it is sent: a request the worker takes before then finds no agent.
        workers, controls, handover = self.waf_1_to_hand_over()
        with captured_log() as events:
            workers.hand_over(handover, _Registered("waf-1", "waf-1-1"), b"")  # type: ignore[arg-type]
            self.assertNotIn("serves it", log_text(events))
            controls[0].answers[0].callback({})
        self.assertIn(
            "Agent waf-1 registered connection waf-1-1 from 127.0.0.1:1; worker 1 serves it", log_text(events)
        )

    def test_an_agent_that_registers_and_leaves_in_a_loop_logs_a_few_served_lines(self) -> None:
        # Each round is a connection the agent makes at will: limited per agent id.
        workers, controls, _ = self.waf_1_to_hand_over()
        with captured_log() as events:
            for i in range(200):
                handover = _Handing()
                self.addCleanup(handover.socket.close)
                connection = _Registered("waf-1", f"waf-1-{i}")
                workers.hand_over(handover, connection, b"")  # type: ignore[arg-type]
                controls[0].answers[-1].callback({})
                workers.connection_gone(controls[0], "waf-1")
                self.assertIsNone(workers.factory.admit(request("waf-1")))
        served = [e for e in events if "serves it" in (formatEvent(e) or "")]
        self.assertEqual(len(served), 5)

    def test_no_registration_is_admitted_while_no_worker_is_ready(self) -> None:
        workers = group(2)
        refusal = workers.factory.admit(request())
        self.assertIsInstance(refusal, NoWorkerReady)
        assert refusal is not None
        self.assertEqual(rejection_reason(refusal), "no_worker")
        self.assertEqual(workers.factory.registered_connections("waf-1"), 0)


def snapshot(agent_id: str, connections: list[str], ready: bool = True) -> dict[str, Any]:
    document = {
        "agents": [
            {
                "agent_id": agent_id,
                "in_flight": len(connections),
                "paused_connections": 0,
                "write_blocked_connections": 0,
                "connections": [{"connection_id": c} for c in connections],
            }
        ],
        "gateway": {"fail_open": False},
    }
    return {"agents": json.dumps(document).encode(), "metrics": b"", "ready": ready}


class GroupViewTests(TestCase):
    def test_agents_shows_every_workers_connections_marked_with_the_worker(self) -> None:
        workers = group(2)
        document = group_document(
            [(workers.workers[0], snapshot("waf-1", ["a", "b"])), (workers.workers[1], snapshot("waf-1", ["c"]))]
        )
        (agent,) = document["agents"]
        self.assertEqual(agent["workers"], {"1": 2, "2": 1})
        self.assertEqual(agent["in_flight"], 3)
        self.assertEqual([(c["connection_id"], c["worker"]) for c in agent["connections"]], [("a", 1), ("b", 1), ("c", 2)])
        self.assertEqual(document["gateway"], {"fail_open": False})

    def test_a_worker_that_does_not_answer_is_shown_down(self) -> None:
        workers = group(2)
        document = group_document([(workers.workers[0], snapshot("waf-1", ["a"])), (workers.workers[1], None)])
        self.assertEqual([(w["worker"], w["answering"]) for w in document["workers"]], [(1, True), (2, False)])

    def test_healthz_tells_a_worker_that_is_not_answering_from_one_that_is_not_running(self) -> None:
        # A worker stopped (SIGSTOP) or hung still runs: /healthz and the
        # page say it does not answer, with its pid, and not that it is down.
        from sentinel_twisted.workers.status import GroupStatusResource

        workers = group(2)
        workers.worker_joined(_Control(), 1, 1001)  # type: ignore[arg-type]
        status = GroupStatusResource(workers, lambda: True)
        code, body = status.healthz([(workers.workers[0], None), (workers.workers[1], None)])
        self.assertEqual(code, 503)
        self.assertEqual(
            json.loads(body)["problems"], ["worker 1 (pid 1001) is not answering", "worker 2 is not running"]
        )
        _, page = status.page([(workers.workers[0], None), (workers.workers[1], None)])
        self.assertIn(b"<td>1</td><td>1001</td><td>not answering</td>", page)
        self.assertIn(b"<td>2</td><td>-</td><td>down</td>", page)

    def test_a_worker_that_does_not_answer_is_asked_for_one_snapshot_at_a_time(self) -> None:
        # A stopped or hung worker: each status request used to send it a
        # Snapshot of its own, kept in the parent until answered, and the
        # worker, once it ran again, built every one of them (its metrics
        # each time) before it could answer a heartbeat.
        from sentinel_twisted.workers.commands import Snapshot
        from sentinel_twisted.workers.parent import SNAPSHOT_TIMEOUT

        workers = group(2)
        silent, answering = join_all(workers)
        results: list[Any] = []
        for _ in range(3):
            for _ in range(50):
                workers.snapshots().addCallback(results.append)
            for control in (silent, answering):
                for command, answer in zip(control.sent, control.answers, strict=True):
                    if command[0] is Snapshot and control is answering and not answer.called:
                        answer.callback(snapshot("waf-1", ["b"]))
            workers.clock.advance(SNAPSHOT_TIMEOUT)  # type: ignore[attr-defined]
        self.assertEqual(len(results), 150)
        self.assertEqual({r[0][1] is None and r[1][1] is not None for r in results}, {True})
        self.assertEqual([c for c, _ in silent.sent].count(Snapshot), 1)
        self.assertEqual([c for c, _ in answering.sent].count(Snapshot), 3)

        # Its answer, late, goes to the requests still waiting; the next
        # request asks it again.
        waiting: list[Any] = []
        workers.snapshots().addCallback(waiting.append)
        late = snapshot("waf-1", ["a"])
        (asked,) = [a for (c, _), a in zip(silent.sent, silent.answers, strict=True) if c is Snapshot]
        asked.callback(late)
        for answer in answering.answers:
            if not answer.called:
                answer.callback(snapshot("waf-1", ["b"]))
        self.assertIs(waiting[0][0][1], late)
        workers.snapshots()
        self.assertEqual([c for c, _ in silent.sent].count(Snapshot), 2)

    def test_metrics_of_every_worker_in_one_exposition_labelled_by_worker(self) -> None:
        one = b"# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{decision=\"allow\"} 3.0\n"
        two = b"# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{decision=\"allow\"} 5.0\n"
        merged = merge_metrics([("1", one), ("2", two), ("3", b"not { metrics")])
        (family,) = list(text_string_to_metric_families(merged.decode()))
        values = {s.labels["worker"]: s.value for s in family.samples if s.name == "requests_total"}
        self.assertEqual(values, {"1": 3.0, "2": 5.0})
        self.assertEqual(merged.count(b"# TYPE requests_total counter"), 1)


class ControlTests(TestCase):
    def test_chunked_carries_values_larger_than_an_amp_value(self) -> None:
        value = bytes(range(256)) * (3 * CHUNK_SIZE // 256 + 7)
        strings: dict[bytes, bytes] = {}
        Chunked().toBox(b"metrics", strings, {"metrics": value}, None)
        self.assertTrue(all(len(v) <= 65535 for v in strings.values()))
        objects: dict[str, Any] = {}
        Chunked().fromBox(b"metrics", strings, objects, None)
        self.assertEqual(objects["metrics"], value)

    def test_a_workers_json_log_line_is_logged_with_its_level_namespace_and_worker(self) -> None:
        line = json.dumps(
            {"time": "t", "level": "warn", "namespace": "sentinel_twisted.gateway", "message": "The last agent left",
             "agent_id": "waf-1"}
        ).encode()
        with captured_log() as events:
            relay_line(2, line)
            relay_line(1, b"plain text")
        first, second = events
        self.assertEqual(first["log_level"], LogLevel.warn)
        self.assertEqual(first["log_namespace"], "sentinel_twisted.gateway")
        self.assertEqual((first["worker"], first["text"], first["agent_id"]), (2, "The last agent left", "waf-1"))
        self.assertEqual((second["log_level"], second["text"]), (LogLevel.info, "plain text"))

    def test_a_workers_line_cannot_hide_its_prefix_or_draw_a_line_of_the_parents(self) -> None:
        forged = "2026-12-02T00:00:00+0000 [sentinel_twisted.workers#info] Worker 1 (pid 1) is ready"
        line = json.dumps(
            {"level": "info", "namespace": "x#info] forged [y", "message": f"one\r\x1b[2K{forged}\u2028two\n\tthree"}
        ).encode()
        with captured_log() as events:
            relay_line(2, line)
            relay_line(1, b"plain\rtext\x1b[31m")
        first, second = events
        self.assertEqual(first["text"], f"one\\x0d\\x1b[2K{forged}\\u2028two\n\tthree")
        self.assertEqual(first["log_namespace"], "sentinel_twisted.workers")
        self.assertEqual(second["text"], "plain\\x0dtext\\x1b[31m")

    def test_a_worker_runs_the_parents_arguments_then_what_makes_it_a_worker(self) -> None:
        command = worker_command(["--workers", "2", "--allow", "waf-*"], 2, "/run/x/control.sock", "tcp:8080")
        at = command.index("sentinel-reverse")
        self.assertEqual(command[at + 1 : at + 5], ["--workers", "2", "--allow", "waf-*"])
        tail = command[at + 5 :]
        self.assertEqual(tail[:2], ["--workers", "1"])
        for option, value in [("--worker-control", "/run/x/control.sock"), ("--worker-index", "2"),
                              ("--status", "none"), ("--log-format", "json"), ("--http", "tcp:8080")]:
            self.assertEqual(tail[tail.index(option) + 1], value)
        self.assertIn("--pidfile=", command[:at])


def _control(workers: WorkerGroup) -> tuple[Any, StringTransport]:
    """The parent's end of a new control connection, on a string transport."""
    from sentinel_twisted.workers.parent import ParentControl

    control = ParentControl(workers)
    transport = StringTransport()
    control.makeConnection(transport)
    return control, transport


def _endless_message(keys: int) -> bytes:
    """The start of an AMP message of C{keys} keys of 60,000 bytes each, never ended."""
    return b"".join(struct.pack(">H", len(b"k%d" % i)) + b"k%d" % i + struct.pack(">H", 60_000) + b"v" * 60_000
                    for i in range(keys))


class ControlBoundsTests(TestCase):
    """What reaches the parent's control socket cannot make it grow without bound."""

    def test_a_connection_that_has_not_said_hello_is_closed_past_a_small_message(self) -> None:
        # AMP keeps every key of a message until it ends: a connection
        # sending one endless message grew the parent by a gigabyte in seconds.
        from sentinel_twisted.workers.parent import MAX_HELLO_MESSAGE

        workers = group(2)
        control, transport = _control(workers)
        with captured_log() as events:
            control.dataReceived(_endless_message(MAX_HELLO_MESSAGE // 60_000 + 1))
            control.dataReceived(_endless_message(10))
        self.assertTrue(transport.disconnected, "closed")
        self.assertIsNone(control._currentBox)
        self.assertIn(
            f"A control connection that has not said which worker it is sent a message over {MAX_HELLO_MESSAGE} "
            "bytes; closing it",
            log_text(events),
        )

    def test_a_worker_may_send_large_messages_but_not_endless_ones(self) -> None:
        from twisted.protocols import amp

        from sentinel_twisted.workers import parent

        self.patch(parent, "MAX_CONTROL_MESSAGE", 1_000_000)
        workers = group(2)
        control, transport = _control(workers)
        control.dataReceived(amp.AmpBox(_command=b"Hello", _ask=b"1", index=b"1", pid=b"1001").serialize())
        self.assertIs(workers.workers[0].control, control)
        control.dataReceived(_endless_message(16))
        self.assertFalse(transport.disconnected, "a worker's snapshot may be large")
        with captured_log() as events:
            control.dataReceived(_endless_message(1))
        self.assertTrue(transport.disconnected)
        self.assertIn(
            "Worker 1 (pid 1001) sent a control message over 1000000 bytes; closing its control connection",
            log_text(events),
        )

    def test_a_connection_that_does_not_say_hello_in_time_is_closed(self) -> None:
        from twisted.protocols import amp

        from sentinel_twisted.workers.parent import HELLO_TIMEOUT

        workers = group(2)
        silent, silent_transport = _control(workers)
        worker, worker_transport = _control(workers)
        worker.dataReceived(amp.AmpBox(_command=b"Hello", _ask=b"1", index=b"1", pid=b"1001").serialize())
        with captured_log() as events:
            workers.clock.advance(HELLO_TIMEOUT)  # type: ignore[attr-defined]
        self.assertEqual((silent_transport.disconnected, worker_transport.disconnected), (True, False))
        self.assertIn("A control connection did not say which worker it is within 30 s; closing it", log_text(events))
        silent.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(workers.unidentified, set())

    def test_a_hello_naming_a_worker_the_parent_started_as_another_process_is_refused(self) -> None:
        from twisted.protocols import amp

        workers = group(2)
        workers.workers[0].pid = 4242  # as WorkerProcesses records the process it started
        control, transport = _control(workers)
        with captured_log() as events:
            control.dataReceived(amp.AmpBox(_command=b"Hello", _ask=b"1", index=b"1", pid=b"1001").serialize())
            workers.clock.advance(0)  # type: ignore[attr-defined]
        self.assertIsNone(workers.workers[0].control)
        self.assertIn(b"NOT_THAT_WORKER", transport.value())
        self.assertTrue(transport.disconnected)
        self.assertIn("said it is worker 1 (pid 1001), which the parent started as pid 4242", log_text(events))
        self.assertNotIn("Unhandled", log_text(events))

    def test_a_hello_whose_pid_is_not_the_connections_is_refused(self) -> None:
        from twisted.internet.address import UNIXAddress
        from twisted.protocols import amp

        from sentinel_twisted.proxy.protocol import peer_credentials

        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(here.close)
        self.addCleanup(there.close)

        def on_socket(transport: StringTransport) -> StringTransport:
            transport.peerAddr = UNIXAddress(b"control.sock")
            transport.getHandle = lambda: here  # type: ignore[method-assign]
            return transport

        workers = group(2)
        impostor, transport = _control(workers)
        on_socket(transport)
        self.assertEqual(peer_credentials(transport), (os.getpid(), os.getuid(), os.getgid()))
        with captured_log() as events:
            impostor.dataReceived(amp.AmpBox(_command=b"Hello", _ask=b"1", index=b"1", pid=b"1001").serialize())
            workers.clock.advance(0)  # type: ignore[attr-defined]
        self.assertIsNone(workers.workers[0].control)
        self.assertTrue(transport.disconnected)
        self.assertIn(f"A process (pid {os.getpid()}) said it is worker 1 (pid 1001)", log_text(events))
        # The process that it is may say so.
        worker, transport = _control(workers)
        on_socket(transport)
        worker.dataReceived(
            amp.AmpBox(_command=b"Hello", _ask=b"1", index=b"1", pid=str(os.getpid()).encode()).serialize()
        )
        self.assertIs(workers.workers[0].control, worker)
        self.assertFalse(transport.disconnected)

    def test_connections_that_have_not_said_hello_are_bounded(self) -> None:
        from sentinel_twisted.workers.parent import EXTRA_UNIDENTIFIED, ControlFactory

        workers = group(2)
        factory = ControlFactory(workers)
        held = []
        for _ in range(2 + EXTRA_UNIDENTIFIED):
            control = factory.buildProtocol(None)
            assert control is not None
            control.makeConnection(StringTransport())
            held.append(control)
        with captured_log() as events:
            self.assertIsNone(factory.buildProtocol(None))
        self.assertIn(f"{2 + EXTRA_UNIDENTIFIED} control connections have not said which worker they are", log_text(events))
        held[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(factory.buildProtocol(None))


class OptionTests(TestCase):
    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(list(arguments))
        return options

    def test_workers_are_one_by_default(self) -> None:
        self.assertEqual(self.parse()["workers"], 1)

    def test_the_arguments_are_kept_for_the_workers(self) -> None:
        self.assertEqual(self.parse("--workers", "2").arguments, ["--workers", "2"])

    def test_a_worker_reads_the_files_its_parent_named_from_the_run_directory(self) -> None:
        # twistd -d moves the parent to its run directory before it starts
        # its workers there: relative names reach them made absolute.
        arguments = ["--workers", "2", "--allow-file", "allowed", "--access-log", "logs/access.log"]
        parent = self.parse(*arguments)
        expected = {"allow-file": os.path.abspath("allowed"), "access-log": os.path.abspath("logs/access.log")}
        rundir = os.path.abspath(self.mktemp())
        os.mkdir(rundir)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(rundir)
        command = worker_command(parent.worker_arguments(), 1, "/run/x/control.sock", "tcp:8080")
        worker = self.parse(*command[command.index("sentinel-reverse") + 1 :])
        self.assertEqual({name: worker[name] for name in expected}, expected)

    def test_a_tls_agent_listener_needs_one_worker(self) -> None:
        error = self.assertRaises(
            usage.UsageError, self.parse, "--workers", "2", "--listen", "ssl:7443:privateKey=k.pem:certKey=c.pem"
        )
        self.assertIn("cannot move to a worker process", str(error))

    def test_workers_need_a_tcp_gateway(self) -> None:
        for http in ("none", "unix:gateway.sock"):
            error = self.assertRaises(usage.UsageError, self.parse, "--workers", "2", "--http", http)
            self.assertIn("needs a tcp: or tcp6: --http endpoint", str(error))

    def test_a_worker_of_a_group_with_ready_agents_accepts_its_command_line(self) -> None:
        # The parent serves /healthz; its workers run with --status none.
        arguments = ["--workers", "2", "--http", "tcp:8080", "--status", "tcp:8081", "--ready-agent", "waf-1"]
        self.parse(*arguments)
        command = worker_command(arguments, 1, "/run/x/control.sock", "tcp:8080")
        worker = self.parse(*command[command.index("sentinel-reverse") + 1 :])
        self.assertEqual((worker["ready-agents"], worker["status"], worker["workers"]), (["waf-1"], None, 1))

    def test_agent_ids_a_group_cannot_pass_between_its_processes_are_refused(self) -> None:
        # Ids and connection ids travel as AMP values (65,535 bytes at most).
        error = self.assertRaises(
            usage.UsageError, self.parse, "--workers", "2", "--max-agent-id-length", "70000"
        )
        self.assertIn("at most 65000", str(error))
        self.assertEqual(self.parse("--workers", "2", "--max-agent-id-length", "65000")["max-agent-id-length"], 65000)
        self.assertEqual(self.parse("--max-agent-id-length", "70000")["max-agent-id-length"], 70000)

    def test_zero_workers_is_refused(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--workers", "0")

    def test_more_workers_than_a_host_could_run_are_refused_with_one_line(self) -> None:
        # Not a table of a billion workers, nor as many processes started.
        from sentinel_twisted.tap import MAX_WORKERS

        error = self.assertRaises(usage.UsageError, self.parse, "--workers", "99999999999999")
        self.assertEqual(
            str(error), f"--workers 99999999999999: at most {MAX_WORKERS} (each worker is a process of its own, for one core)"
        )
        workers = str(MAX_WORKERS)
        self.assertEqual(self.parse("--workers", workers, "--max-connections-per-agent", workers)["workers"], MAX_WORKERS)

    def test_more_workers_than_an_agent_may_hold_connections_are_refused(self) -> None:
        # With --max-connections-per-agent 4 (the default), a fifth worker
        # could never hold a connection of any agent: every request it took
        # would be answered 503.
        error = self.assertRaises(usage.UsageError, self.parse, "--workers", "5")
        self.assertIn("--workers 5: --max-connections-per-agent 4 lets an agent hold a connection", str(error))
        self.assertIn("give --max-connections-per-agent 5 or more", str(error))
        self.assertEqual(self.parse("--workers", "4")["workers"], 4)
        self.assertEqual(self.parse("--workers", "5", "--max-connections-per-agent", "5")["workers"], 5)

    def test_the_close_grace_and_the_known_agents_limit_reach_the_parent_and_its_workers(self) -> None:
        from sentinel_twisted.workers.assemble import ReservedPort, make_group, make_worker

        arguments = [
            "--workers", "2", "--listen", "tcp:0:interface=127.0.0.1",
            "--http", "tcp:0:interface=127.0.0.1", "--status", "none",
            "--close-grace", "2.5", "--max-known-agents", "7",
        ]  # fmt: skip
        parent = make_group(self.parse(*arguments), MemoryReactorClock())
        (reserved,) = [s for s in parent if isinstance(s, ReservedPort)]
        self.addCleanup(reserved.socket.close)
        self.assertEqual(parent.factory.config.close_grace, 2.5)
        self.assertEqual(parent.group.seen.limit, 7)  # type: ignore[attr-defined]
        # The group asks the parent's reloader which agents a reload retired.
        self.assertEqual(parent.group.retired, parent.reloader.retired)  # type: ignore[attr-defined]
        command = worker_command(arguments, 1, "/run/x/control.sock", reserved.description)
        worker = make_worker(self.parse(*command[command.index("sentinel-reverse") + 1 :]), MemoryReactorClock())
        self.assertEqual(worker.factory.config.close_grace, 2.5)
        (gateway,) = [s for s in worker if hasattr(s, "gateway")]
        self.assertEqual(gateway.gateway.known.limit, 7)

    def test_an_upstream_ca_file_the_workers_cannot_use_stops_the_parent(self) -> None:
        # The parent builds no gateway: without its own look, the start went
        # on and every worker exited at once and was restarted, forever.
        from sentinel_twisted.services import StartupError
        from sentinel_twisted.workers.assemble import make_group

        directory = self.mktemp()
        os.mkdir(directory)
        missing = os.path.join(directory, "missing.pem")
        arguments = [
            "--workers", "2", "--listen", "tcp:0:interface=127.0.0.1",
            "--http", "tcp:0:interface=127.0.0.1", "--status", "none",
            "--upstream", "https://localhost", "--upstream-ca", missing,
        ]  # fmt: skip
        error = self.assertRaises(StartupError, make_group, self.parse(*arguments), MemoryReactorClock())
        self.assertEqual(
            str(error), f"--upstream-ca: cannot read the upstream CA file {missing}: No such file or directory"
        )

    def test_an_access_log_the_workers_cannot_open_stops_the_parent(self) -> None:
        from sentinel_twisted.services import StartupError
        from sentinel_twisted.workers.assemble import make_group

        directory = self.mktemp()
        log_path = os.path.join(directory, "no-such-dir", "access.log")
        arguments = [
            "--workers", "2", "--listen", "tcp:0:interface=127.0.0.1",
            "--http", "tcp:0:interface=127.0.0.1", "--status", "none", "--access-log", log_path,
        ]  # fmt: skip
        error = self.assertRaises(StartupError, make_group, self.parse(*arguments), MemoryReactorClock())
        self.assertTrue(str(error).startswith(f"--access-log {log_path}: "), str(error))


class ReservedPortTests(TestCase):
    """The group's HTTP port: shared by its own workers, never with another program."""

    def test_a_port_another_group_serves_is_refused_not_shared(self) -> None:
        # Another group's workers (or any program of this user) listening
        # with SO_REUSEPORT: binding the port with SO_REUSEPORT as well
        # succeeded, and the kernel then spread this proxy's clients over
        # both proxies, whatever their rules and upstreams.
        from sentinel_twisted.services import StartupError
        from sentinel_twisted.workers.assemble import ReservedPort
        from sentinel_twisted.workers.child import reuse_port_socket

        other = reuse_port_socket(socket.AF_INET, "127.0.0.1", 0)
        self.addCleanup(other.close)
        other.listen(5)
        port = other.getsockname()[1]
        error = self.assertRaises(StartupError, ReservedPort, f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(
            str(error), f"--http tcp:{port}:interface=127.0.0.1: cannot listen on 127.0.0.1:{port}: address already in use"
        )

    def test_the_workers_share_the_reserved_port_and_nobody_else_takes_it(self) -> None:
        from sentinel_twisted.workers.assemble import ReservedPort
        from sentinel_twisted.workers.child import reuse_port_socket

        reserved = ReservedPort("tcp:0:interface=127.0.0.1")
        self.addCleanup(reserved.socket.close)
        workers = [reuse_port_socket(socket.AF_INET, "127.0.0.1", reserved.port) for _ in range(2)]
        for worker in workers:
            self.addCleanup(worker.close)
            worker.listen(5)
        plain = socket.socket()
        self.addCleanup(plain.close)
        self.assertRaises(OSError, plain.bind, ("127.0.0.1", reserved.port))


class CoverageTests(TestCase):
    def test_an_agent_missing_from_a_worker_is_reported_after_a_while(self) -> None:
        workers = group(2)
        join_all(workers)
        place(workers, "waf-1", 1)
        workers._coverage_checks["waf-1"] = workers.clock.callLater(5, workers._check_coverage, "waf-1")
        with captured_log() as events:
            workers.clock.advance(5)  # type: ignore[attr-defined]
        self.assertIn("worker(s) 2 hold none", log_text(events))
        self.assertIn("--connections 2 or more", log_text(events))

    def test_nothing_is_said_when_every_worker_holds_the_agent(self) -> None:
        workers = group(2)
        join_all(workers)
        place(workers, "waf-1", 2)
        workers._coverage_checks["waf-1"] = workers.clock.callLater(5, workers._check_coverage, "waf-1")
        with captured_log() as events:
            workers.clock.advance(5)  # type: ignore[attr-defined]
        self.assertNotIn("hold none", log_text(events))


class RespreadTests(TestCase):
    def test_a_worker_back_after_a_restart_gets_its_share_of_each_agents_connections(self) -> None:
        from sentinel_twisted.workers.commands import Release

        workers = group(2)
        first, second = join_all(workers)
        workers.workers[1].agents.update({"waf-1": 4, "auth": 1})
        workers.worker_left(first)  # type: ignore[arg-type]
        again = _Control()
        workers.worker_joined(again, 1, 2001)  # type: ignore[arg-type]
        workers.clock.advance(1)  # type: ignore[attr-defined]
        # waf-1: 4 connections for 2 workers, 2 move; auth: 1, its share is 0.
        self.assertEqual(second.sent, [(Release, {"agent_id": "waf-1", "count": 2})])
        self.assertEqual(again.sent, [])

    def test_a_move_of_many_agents_connections_is_one_line(self) -> None:
        # Agent ids come from peers: a restart must not log a line per agent.
        from sentinel_twisted.workers.commands import Release

        workers = group(2)
        first, second = join_all(workers)
        ids = [f"made-up-{i:02d}" for i in range(40)]
        workers.workers[1].agents.update({agent_id: 2 for agent_id in ids})
        workers.worker_left(first)  # type: ignore[arg-type]
        workers.worker_joined(_Control(), 1, 2001)  # type: ignore[arg-type]
        with captured_log() as events:
            workers.clock.advance(1)  # type: ignore[attr-defined]
        self.assertEqual(second.sent, [(Release, {"agent_id": agent_id, "count": 1}) for agent_id in ids])
        moving = [formatEvent(e) for e in events if "Moving" in (formatEvent(e) or "")]
        self.assertEqual(
            moving,
            [
                "Moving 40 connection(s) of 40 agent(s) (made-up-00, made-up-01, made-up-02, made-up-03, "
                "made-up-04 and 35 more) from worker(s) 2 (40) to worker 1"
            ],
        )

    def test_nothing_moves_when_the_connections_are_spread(self) -> None:
        workers = group(3)
        controls = join_all(workers)
        for worker in workers.workers:
            worker.agents["waf-1"] = 1
        workers.clock.advance(1)  # type: ignore[attr-defined]
        self.assertEqual([c.sent for c in controls], [[], [], []])


class _ProcessTransport:
    def __init__(self, pid: int, started: float = 0.0) -> None:
        self.pid = pid
        self.started = started
        self.signals: list[str] = []

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _ProcessReactor(Clock):
    """Spawns nothing: records each worker's process."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, _ProcessTransport]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kwargs: Any) -> _ProcessTransport:
        transport = _ProcessTransport(100 + len(self.spawned), self.seconds())
        protocol.transport = transport
        self.spawned.append((protocol, transport))
        return transport


class ReloadTests(TestCase):
    def test_sighup_reaches_a_worker_that_was_starting_once_it_joins(self) -> None:
        workers = group(2)
        reactor = _ProcessReactor()
        processes = WorkerProcesses(workers, lambda index: ["worker", str(index)], reactor, stop_timeout=5)
        processes.startService()
        (_, first), (_, second) = reactor.spawned
        workers.worker_joined(_Control(), 1, first.pid)  # type: ignore[arg-type]
        processes.reload()
        # Worker 2 is starting: a SIGHUP it does not handle yet would end it.
        self.assertEqual((first.signals, second.signals), (["HUP"], []))
        with captured_log() as events:
            workers.worker_joined(_Control(), 2, second.pid)  # type: ignore[arg-type]
        self.assertEqual(second.signals, ["HUP"])
        self.assertIn("Worker 2 started before the last SIGHUP", log_text(events))
        # A worker started after the last SIGHUP read the files itself.
        protocol, _ = reactor.spawned[0]
        workers.worker_left(workers.workers[0].control)  # type: ignore[arg-type]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        reactor.advance(1)
        (_, again) = reactor.spawned[2]
        workers.worker_joined(_Control(), 1, again.pid)  # type: ignore[arg-type]
        self.assertEqual(again.signals, [])
        processes.stopService()
        self.assertEqual([t.signals for _, t in reactor.spawned], [["HUP"], ["HUP", "TERM"], ["TERM"]])


def heartbeats(control: _Control) -> list[Deferred[Any]]:
    """The answers of the heartbeats C{control} was sent."""
    return [answer for (command, _), answer in zip(control.sent, control.answers, strict=True) if command is Heartbeat]


def answer_heartbeats(control: _Control) -> None:
    for answer in heartbeats(control):
        if not answer.called:
            answer.callback({})


def start_two_workers(case: TestCase) -> tuple[WorkerGroup, _ProcessReactor, WorkerProcesses]:
    """Two workers started on a fake process reactor; stopped (their processes ended) at the test's end."""
    workers = group(2)
    reactor = _ProcessReactor()
    processes = WorkerProcesses(workers, lambda index: ["worker", str(index)], reactor, stop_timeout=5)
    processes.startService()

    def stop() -> None:
        processes.stopService()
        for protocol in list(processes.processes.values()):
            protocol.processEnded(Failure(ProcessTerminated(signal=15)))

    case.addCleanup(stop)
    return workers, reactor, processes


class HeartbeatTests(TestCase):
    """A worker that stops answering its parent (hung, or stopped) is avoided, then killed and restarted."""

    def started(self) -> tuple[WorkerGroup, _ProcessReactor, WorkerProcesses, list[_Control]]:
        workers, reactor, processes = start_two_workers(self)
        controls = []
        for worker, (_, transport) in zip(workers.workers, reactor.spawned, strict=True):
            control = _Control()
            workers.worker_joined(control, worker.index, transport.pid)  # type: ignore[arg-type]
            controls.append(control)
        return workers, reactor, processes, controls

    def test_a_worker_that_answers_no_heartbeat_gets_no_connection_then_is_killed_and_restarted(self) -> None:
        workers, reactor, processes, (hung, alive) = self.started()
        (protocol, hung_process), (_, alive_process) = reactor.spawned
        reactor.advance(HEARTBEAT_INTERVAL)
        answer_heartbeats(alive)
        self.assertEqual(workers.choose("waf-1"), workers.workers[0], "both answer so far: the first")
        reactor.advance(HEARTBEAT_INTERVAL)
        answer_heartbeats(alive)
        # Worker 1 left its heartbeat unanswered for an interval: it would
        # never serve a connection handed to it now.
        self.assertTrue(workers.workers[0].late)
        self.assertEqual(workers.choose("waf-1"), workers.workers[1])
        with captured_log() as events:
            for _ in range(HUNG_AFTER - 1):
                self.assertEqual(hung_process.signals, [])
                reactor.advance(HEARTBEAT_INTERVAL)
                answer_heartbeats(alive)
        self.assertEqual((hung_process.signals, alive_process.signals), (["KILL"], []))
        self.assertIn(
            f"Worker 1 (pid {hung_process.pid}) has not answered its parent for "
            f"{HUNG_AFTER * HEARTBEAT_INTERVAL:.0f} s (hung, or stopped); killing it",
            log_text(events),
        )
        # One heartbeat waits at a time: none piles up in a hung worker's socket.
        self.assertEqual(len(heartbeats(hung)), 1)
        self.assertEqual(len(heartbeats(alive)), HUNG_AFTER + 1)
        # Killed, it goes as any worker that dies: its slots are freed, it is restarted.
        workers.worker_left(hung)  # type: ignore[arg-type]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        reactor.advance(0)
        self.assertEqual(len(reactor.spawned), 3)
        workers.worker_joined(_Control(), 1, reactor.spawned[2][1].pid)  # type: ignore[arg-type]
        self.assertFalse(workers.workers[0].late)
        self.assertEqual(workers.choose("waf-1"), workers.workers[0])

    def test_a_parent_that_was_suspended_reads_the_answers_before_it_judges(self) -> None:
        workers, reactor, processes, controls = self.started()
        reactor.advance(HEARTBEAT_INTERVAL)
        # The parent itself stopped for a long while (SIGSTOP, a suspended
        # machine): its next tick comes once, and the answers are read after.
        reactor.advance(HUNG_AFTER * HEARTBEAT_INTERVAL * 10)
        for control in controls:
            answer_heartbeats(control)
        reactor.advance(HEARTBEAT_INTERVAL)
        self.assertEqual([t.signals for _, t in reactor.spawned], [[], []])
        self.assertEqual([w.late for w in workers.workers], [False, False])

    def test_a_worker_that_does_not_exit_after_sigterm_is_killed_with_one_line(self) -> None:
        workers, reactor, processes, controls = self.started()
        (first, first_process), (_, second_process) = reactor.spawned
        stopped = processes.stopService()
        first.processEnded(Failure(ProcessTerminated(exitCode=0)))
        with captured_log() as events:
            reactor.advance(5)
        self.assertEqual((first_process.signals, second_process.signals), (["TERM"], ["TERM", "KILL"]))
        self.assertIn(
            f"Worker 2 (pid {second_process.pid}) did not exit within 5 s of SIGTERM; killing it", log_text(events)
        )
        self.assertNotIn("Worker 1", log_text(events))
        reactor.spawned[1][0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertTrue(stopped.called)


class StoppingTests(TestCase):
    """A worker that stops on its own (SIGTERM) is handed no new connection."""

    def test_a_worker_that_says_it_is_stopping_is_handed_nothing_and_says_so(self) -> None:
        from sentinel_twisted.workers.parent import ParentControl

        workers = group(2)
        controls = join_all(workers)
        self.assertEqual(workers.choose("waf-1"), workers.workers[0])
        control = ParentControl(workers)
        workers.worker_joined(control, 1, 1001)
        with captured_log() as events:
            self.assertEqual(control.stopping(), {})
        self.assertIn(
            "Worker 1 (pid 1001) is stopping: it is handed no new agent connection", log_text(events)
        )
        self.assertEqual(workers.choose("waf-1"), workers.workers[1])
        # Even when the other is late (a stopping worker would close it).
        workers.workers[1].late = True
        self.assertEqual(workers.choose("waf-1"), workers.workers[1])
        self.assertIsNone(workers.factory.admit(request("waf-1")))
        # Said once.
        with captured_log() as events:
            control.stopping()
        self.assertEqual(log_text(events), "")
        self.assertEqual([c for c, _ in controls[0].sent], [], "the worker of the old connection is told nothing")

    def test_registrations_are_refused_while_the_only_worker_is_stopping(self) -> None:
        from sentinel_twisted.workers.parent import ParentControl

        workers = group(1)
        control = ParentControl(workers)
        workers.worker_joined(control, 1, 1001)
        with captured_log() as events:
            control.stopping()
        self.assertIn(
            "Worker 1 (pid 1001) is stopping and no other worker is ready: registrations are refused "
            "(no_worker; agents retry) until one is",
            log_text(events),
        )
        self.assertIsNone(workers.choose("waf-1"))
        self.assertIsInstance(workers.factory.admit(request("waf-1")), NoWorkerReady)
        # Its replacement joins: registrations are taken again.
        workers.worker_left(control)
        workers.worker_joined(_Control(), 1, 1002)  # type: ignore[arg-type]
        self.assertFalse(workers.workers[0].stopping)
        self.assertIsNone(workers.factory.admit(request("waf-1")))

    def test_workers_stopping_with_their_group_are_not_each_reported(self) -> None:
        from sentinel_twisted.workers.parent import ParentControl

        workers = group(2)
        controls = [ParentControl(workers) for _ in workers.workers]
        for index, control in enumerate(controls, 1):
            workers.worker_joined(control, index, 1000 + index)
        workers.stop()
        with captured_log() as events:
            for control in controls:
                control.stopping()
        self.assertEqual(log_text(events), "")
        self.assertEqual(workers.serving(), [])

    def test_a_connection_a_stopping_worker_refuses_goes_to_another_with_its_slot(self) -> None:
        # Handed over before the worker's notice reached the parent: the
        # worker refuses it, and the parent hands the same socket on.
        from sentinel_twisted.workers.commands import WorkerStopping

        workers = group(2)
        first, second = join_all(workers)
        workers.workers[1].agents["other"] = 1  # worker 1 is chosen first
        self.assertIsNone(workers.factory.admit(request("waf-1")))
        handing = _Handing()
        self.addCleanup(handing.socket.close)
        before = sorted(os.listdir("/proc/self/fd"))
        with captured_log() as events:
            workers.hand_over(handing, _Registered("waf-1", "waf-1-1"), b"")  # type: ignore[arg-type]
            (command, arguments), _ = first.sent
            self.assertEqual(command, AdoptConnection)
            first.answers[0].errback(WorkerStopping("worker 1 is stopping"))
            self.assertTrue(workers.workers[0].stopping)
            (again, moved), = [(c, a) for c, a in second.sent if c is AdoptConnection]
            self.assertEqual(moved, arguments)
            self.assertEqual([dict(w.agents) for w in workers.workers], [{}, {"other": 1, "waf-1": 1}])
            self.assertEqual(workers.factory.registered_connections("waf-1"), 1)
            second.answers[second.sent.index((again, moved))].callback({})
        self.assertIn("worker 2 serves it", log_text(events))
        self.assertIn("Worker 1 (pid 1001) is stopping", log_text(events))
        self.assertNotIn("did not take", log_text(events))
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before, "the copy of the socket is closed")

    def test_a_connection_refused_by_the_only_worker_frees_its_slot(self) -> None:
        from sentinel_twisted.workers.commands import WorkerStopping

        workers = group(1)
        (control,) = join_all(workers)
        self.assertIsNone(workers.factory.admit(request("waf-1")))
        handing = _Handing()
        self.addCleanup(handing.socket.close)
        before = sorted(os.listdir("/proc/self/fd"))
        with captured_log() as events:
            workers.hand_over(handing, _Registered("waf-1", "waf-1-1"), b"")  # type: ignore[arg-type]
            control.answers[0].errback(WorkerStopping("worker 1 is stopping"))
        self.assertIn("Worker 1 did not take connection waf-1-1 of agent waf-1: worker 1 is stopping", log_text(events))
        self.assertEqual([c for c, _ in control.sent].count(AdoptConnection), 1)
        self.assertEqual(workers.factory.registered_connections("waf-1"), 0)
        self.assertEqual(dict(workers.workers[0].agents), {})
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before, "the copy of the socket is closed")

    def test_the_status_site_says_which_worker_is_stopping(self) -> None:
        from sentinel_twisted.workers.parent import ParentControl
        from sentinel_twisted.workers.status import GroupStatusResource

        workers = group(2)
        join_all(workers)
        control = ParentControl(workers)
        workers.worker_joined(control, 2, 1002)
        control.stopping()
        answers = [(workers.workers[0], snapshot("waf-1", ["a"])), (workers.workers[1], snapshot("waf-1", ["b"]))]
        status = GroupStatusResource(workers, lambda: True)
        code, body = status.healthz(answers)
        self.assertEqual((code, json.loads(body)["problems"]), (503, ["worker 2 (pid 1002) is stopping"]))
        self.assertEqual([w["stopping"] for w in group_document(answers)["workers"]], [False, True])
        self.assertIn(b"<td>2</td><td>1002</td><td>stopping</td>", status.page(answers)[1])


class StartDeadlineTests(TestCase):
    """A worker that never joins its group (stuck starting, or stopped) is killed and restarted, with back-off."""

    def test_a_worker_that_does_not_join_is_killed_with_one_line_and_restarted(self) -> None:
        workers, reactor, processes = start_two_workers(self)
        (stuck, stuck_process), (_, joined_process) = reactor.spawned
        # Worker 2 joins and answers; worker 1 never connects (SIGSTOPped
        # right after it was started, or its imports hang).
        joined = _Control()
        workers.worker_joined(joined, 2, joined_process.pid)  # type: ignore[arg-type]
        with captured_log() as events:
            for _ in range(HUNG_AFTER):
                reactor.advance(HEARTBEAT_INTERVAL)
                answer_heartbeats(joined)
            self.assertEqual(stuck_process.signals, [])
            reactor.advance(HEARTBEAT_INTERVAL)
            answer_heartbeats(joined)
        self.assertEqual((stuck_process.signals, joined_process.signals), (["KILL"], []))
        killing = [formatEvent(e) for e in events if "killing it" in (formatEvent(e) or "")]
        self.assertEqual(
            killing,
            [
                f"Worker 1 (pid {stuck_process.pid}) has not joined its group within "
                f"{HUNG_AFTER * HEARTBEAT_INTERVAL:.0f} s of its start (stuck starting, or stopped); "
                "killing it: it is restarted"
            ],
        )
        # Killed once, not again at each tick until it is gone.
        reactor.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(stuck_process.signals, ["KILL"])
        stuck.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(len(reactor.spawned), 2, "not at once: it never joined")
        reactor.advance(1)
        self.assertEqual(len(reactor.spawned), 3)
        # The new one joins in time: it is left alone.
        workers.worker_joined(_Control(), 1, reactor.spawned[2][1].pid)  # type: ignore[arg-type]
        for _ in range(HUNG_AFTER * 2):
            reactor.advance(HEARTBEAT_INTERVAL)
            for control in (joined, workers.workers[0].control):
                answer_heartbeats(control)  # type: ignore[arg-type]
        self.assertEqual([t.signals for _, t in reactor.spawned], [["KILL"], [], []])

    def test_a_worker_that_never_joins_is_restarted_after_a_bounded_doubling_delay(self) -> None:
        from sentinel_twisted.workers.processes import MAX_RESTART_DELAY

        workers, reactor, processes = start_two_workers(self)
        workers.worker_joined(_Control(), 2, reactor.spawned[1][1].pid)  # type: ignore[arg-type]
        deadline = HUNG_AFTER * HEARTBEAT_INTERVAL
        delays = []
        for _ in range(8):
            protocol, process = reactor.spawned[-1] if reactor.spawned[-1][0].index == 1 else reactor.spawned[0]
            while not process.signals and reactor.seconds() - process.started <= deadline + HEARTBEAT_INTERVAL:
                reactor.advance(0.5)
            # Never before the deadline, whenever the heartbeat's ticks come.
            self.assertEqual(process.signals, ["KILL"])
            self.assertTrue(deadline <= reactor.seconds() - process.started <= deadline + HEARTBEAT_INTERVAL)
            spawned = len(reactor.spawned)
            protocol.processEnded(Failure(ProcessTerminated(signal=9)))
            waited = 0.0
            while len(reactor.spawned) == spawned and waited <= MAX_RESTART_DELAY:
                reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        self.assertEqual(workers.workers[0].restarts, 8)

    def test_a_parent_that_was_suspended_counts_one_tick_before_it_judges(self) -> None:
        # As for heartbeats: a long suspension of the parent is one tick,
        # and a hello waiting for it is read before it judges.
        workers, reactor, processes = start_two_workers(self)
        (_, first), (_, second) = reactor.spawned
        reactor.advance(HEARTBEAT_INTERVAL)
        reactor.advance(HUNG_AFTER * HEARTBEAT_INTERVAL * 10)
        workers.worker_joined(_Control(), 2, second.pid)  # type: ignore[arg-type]
        self.assertEqual((first.signals, second.signals), ([], []))
        # Worker 1 still does not join: it is killed, once the parent has
        # run for as long.
        for _ in range(HUNG_AFTER - 1):
            reactor.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(first.signals, ["KILL"])
        self.assertEqual(second.signals, [])


class HttpHoldTests(TestCase):
    """A worker that joins a running group takes HTTP clients once it holds the group's agents."""

    def worker(self) -> tuple[Any, list[str], set[str], MemoryReactorClock]:
        from types import SimpleNamespace

        from sentinel_twisted.workers.child import WorkerControlService

        clock = MemoryReactorClock()
        pool: set[str] = set()
        served: list[str] = []
        control = WorkerControlService(
            "/nowhere", 1, SimpleNamespace(pool=pool), clock, lambda: (b"", b"", True),  # type: ignore[arg-type]
            serve_http=lambda: served.append("http"),
        )
        return control, served, pool, clock

    def test_it_waits_for_the_agents_the_others_hold(self) -> None:
        control, served, pool, clock = self.worker()
        control._hold_http(b'["waf-1", "auth"]')
        pool.add("waf-1")
        clock.advance(1)
        self.assertEqual(served, [])
        pool.add("auth")
        clock.advance(0.1)
        self.assertEqual(served, ["http"])
        clock.advance(10)
        self.assertEqual(served, ["http"])

    def test_a_first_worker_takes_clients_at_once(self) -> None:
        control, served, pool, clock = self.worker()
        control._hold_http(b"[]")
        self.assertEqual(served, ["http"])

    def test_it_takes_clients_after_the_hold_timeout_and_says_so(self) -> None:
        from sentinel_twisted.workers.child import HOLD_TIMEOUT

        control, served, pool, clock = self.worker()
        control._hold_http(b'["waf-1"]')
        with captured_log() as events:
            clock.pump([0.5] * int(HOLD_TIMEOUT * 2 + 2))
        self.assertEqual(served, ["http"])
        self.assertIn("without agent(s) waf-1", log_text(events))


def hand_over(workers: WorkerGroup, agent_id: str, connection_id: str) -> None:
    """Hand a connection of C{agent_id} over, the worker taking it at once."""
    assert workers.factory.admit(request(agent_id)) is None
    handing = _Handing()
    try:
        workers.hand_over(handing, _Registered(agent_id, connection_id), b"")  # type: ignore[arg-type]
    finally:
        handing.socket.close()


def seen_lists(control: _Control) -> list[list[str]]:
    """The lists of agents seen that a worker was sent, answering every command."""
    for answer in control.answers:
        if not answer.called:
            answer.callback({})
    return [json.loads(arguments["agents"]) for command, arguments in control.sent if command is AgentsSeen]


class SeenTests(TestCase):
    """Every worker consults every agent the group has seen, held by it or not."""

    def test_every_worker_is_told_of_each_agent_handed_over_once(self) -> None:
        workers = group(2)
        controls = join_all(workers)
        hand_over(workers, "waf", "waf-1")
        hand_over(workers, "auth", "auth-1")
        hand_over(workers, "waf", "waf-2")
        self.assertEqual([seen_lists(c) for c in controls], [[["waf"], ["waf", "auth"]]] * 2)

    def test_a_flood_of_new_agent_ids_sends_one_list_at_a_time(self) -> None:
        # Made-up agent ids, faster than a worker (slow, or hung) answers:
        # no growing list is queued per id, the latest goes once it answers.
        workers = group(2)
        controls = join_all(workers)
        ids = [f"made-up-{i}" for i in range(50)]
        for agent_id in ids:
            hand_over(workers, agent_id, f"{agent_id}-1")
        sent = [[a for c, a in control.sent if c is AgentsSeen] for control in controls]
        self.assertEqual([[json.loads(a["agents"]) for a in s] for s in sent], [[ids[:1]], [ids[:1]]])
        # Worker 1 answers; worker 2 does not (hung): only worker 1 is sent more.
        first = controls[0]
        first.answers[[c for c, _ in first.sent].index(AgentsSeen)].callback({})
        self.assertEqual(json.loads(first.sent[-1][1]["agents"]), ids)
        self.assertEqual(len([c for c, _ in first.sent if c is AgentsSeen]), 2)
        self.assertEqual(len([c for c, _ in controls[1].sent if c is AgentsSeen]), 1)
        # Answered with nothing new: nothing more is sent.
        first.answers[-1].callback({})
        self.assertEqual(len([c for c, _ in first.sent if c is AgentsSeen]), 2)
        # A worker that restarts learns them from its hello, and is sent changes again.
        workers.worker_left(controls[1])  # type: ignore[arg-type]
        again = _Control()
        workers.worker_joined(again, 2, 4242)  # type: ignore[arg-type]
        hand_over(workers, "late-comer", "late-comer-1")
        self.assertEqual(json.loads(again.sent[-1][1]["agents"]), [*ids, "late-comer"])

    def test_a_worker_that_joins_learns_them_in_the_answer_to_its_hello(self) -> None:
        from sentinel_twisted.workers.parent import ParentControl

        workers = group(2)
        (first, _) = join_all(workers)
        hand_over(workers, "waf", "waf-1")
        seen_lists(first)
        workers.worker_left(workers.workers[1].control)  # type: ignore[arg-type]
        workers.workers[1].pid = 4242  # restarted: WorkerProcesses records the new process
        answer = ParentControl(workers).hello(2, 4242)
        self.assertEqual(json.loads(answer["seen"]), ["waf"])
        self.assertEqual(json.loads(answer["agents"]), ["waf"])

    def test_an_agent_no_worker_holds_is_still_seen(self) -> None:
        workers = group(2)
        controls = join_all(workers)
        hand_over(workers, "waf", "waf-1")
        workers.connection_gone(controls[0], "waf")  # type: ignore[arg-type]
        self.assertEqual(workers.seen.ids, ("waf",))

    def test_a_reload_forgets_the_retired_agents_no_worker_holds_and_tells_the_workers(self) -> None:
        workers = group(2)
        controls = join_all(workers)
        hand_over(workers, "waf", "waf-1")
        hand_over(workers, "auth", "auth-1")
        workers.connection_gone(controls[0], "waf")  # type: ignore[arg-type]
        # Away but not retired (restarting): kept.
        self.assertEqual(workers.forget_absent(lambda agent_id: False), [])
        with captured_log() as events:
            self.assertEqual(workers.forget_absent(lambda agent_id: True), ["waf"])
        self.assertIn(
            "Forgot 1 agent(s) retired by the reload: waf; requests no longer wait for them", log_text(events)
        )
        self.assertEqual([seen_lists(c)[-1] for c in controls], [["auth"], ["auth"]])
        # Nothing to forget: nothing is sent.
        self.assertEqual(workers.forget_absent(lambda agent_id: True), [])
        self.assertEqual([len(seen_lists(c)) for c in controls], [2, 2])

    def test_a_retired_agent_is_forgotten_once_its_last_connection_is_gone(self) -> None:
        # The reload found the agent busy: its workers drain its connections.
        # Forgotten only at the next reload, every request until then would
        # have waited for an agent that can no longer register (503).
        workers = group(2)
        controls = join_all(workers)
        for connection_id in ("waf-1", "waf-2"):
            hand_over(workers, "waf", connection_id)
        hand_over(workers, "auth", "auth-1")
        workers.retired = lambda agent_id: agent_id == "waf"
        holders = [c for c, w in zip(controls, workers.workers, strict=True) if w.agents["waf"]]
        # One drained connection closed, another still open: kept.
        workers.connection_gone(holders[0], "waf")  # type: ignore[arg-type]
        self.assertEqual(workers.seen.ids, ("waf", "auth"))
        # Not retired, away: kept.
        workers.connection_gone(next(c for c in controls if c.worker.agents["auth"]), "auth")  # type: ignore[arg-type, union-attr]
        self.assertEqual(workers.seen.ids, ("waf", "auth"))
        with captured_log() as events:
            workers.connection_gone(holders[-1], "waf")  # type: ignore[arg-type]
        self.assertEqual(workers.seen.ids, ("auth",))
        self.assertIn("Forgot 1 agent(s) retired by the reload: waf", log_text(events))
        self.assertEqual([seen_lists(c)[-1] for c in controls], [["auth"], ["auth"]])

    def test_a_retired_agent_whose_worker_left_is_forgotten(self) -> None:
        workers = group(1)
        (control,) = join_all(workers)
        hand_over(workers, "waf", "waf-1")
        workers.retired = lambda agent_id: True
        workers.worker_left(control)  # type: ignore[arg-type]
        self.assertEqual(workers.seen.ids, ())

    def test_without_reloads_an_agent_away_is_kept(self) -> None:
        workers = group(1)
        (control,) = join_all(workers)
        hand_over(workers, "waf", "waf-1")
        self.assertIsNone(workers.retired)
        workers.worker_left(control)  # type: ignore[arg-type]
        self.assertEqual(workers.seen.ids, ("waf",))

    def test_the_group_remembers_a_bounded_number_of_agents(self) -> None:
        from sentinel_twisted.config import ReverseConnectionConfig

        factory = HandOverFactory(ReverseConnectionConfig(), clock=MemoryReactorClock())
        workers = WorkerGroup(1, factory, MemoryReactorClock(), max_known_agents=2)
        (control,) = join_all(workers)
        with captured_log() as events:
            for agent_id in ("a", "b", "c"):
                hand_over(workers, agent_id, f"{agent_id}-1")
        self.assertEqual(workers.seen.ids, ("a", "b"))
        self.assertEqual(seen_lists(control), [["a"], ["a", "b"]])
        self.assertIn("Agent c registered, but the group already knows 2 agents", log_text(events))


class _Pool:
    """A worker's pool holding connections of some agents only."""

    def __init__(self, held: dict[str, Any]) -> None:
        self.held = held

    def add_observer(self, observer: Any) -> None:
        """Its agents never come or go."""

    def agent_ids(self) -> list[str]:
        return list(self.held)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self.held

    def select(self, agent_id: str) -> Any:
        from sentinel_twisted.errors import AgentUnavailable

        if agent_id not in self.held:
            raise AgentUnavailable(agent_id)
        return self.held[agent_id]


class WorkerConsultsTests(TestCase):
    """A worker without a connection of an agent its group has seen answers 503 (fail closed)."""

    def worker(self, *argv: str) -> tuple[Any, Any, Any]:
        from types import SimpleNamespace

        from twisted.internet.testing import StringTransport

        from sentinel_twisted.gateway.resource import GatewaySite
        from sentinel_twisted.gateway.shared import Gateway
        from sentinel_twisted.workers.child import WorkerControlService

        from ..gateway.test_target import _RecordingConnection, _RecordingUpstream

        options = Options()
        options.parseOptions(["--http", "tcp:0", *argv])
        clock = MemoryReactorClock()
        auth = _RecordingConnection()
        upstream = _RecordingUpstream()
        pool = _Pool({"auth": auth})
        gateway = Gateway(pool, options["gateway"], upstream, clock=clock)  # type: ignore[arg-type]
        control = WorkerControlService(
            "/nowhere", 2, SimpleNamespace(pool=pool), clock, lambda: (b"", b"", True),  # type: ignore[arg-type]
            serve_http=lambda: None, consult=gateway.take_known_agents,
        )
        # The parent's answer to its hello: worker 1 holds waf, this one auth.
        control._welcomed({"agents": b'["waf"]', "seen": b'["waf", "auth"]'})
        channel = GatewaySite(gateway, reactor=clock).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport.value(), auth, upstream

    def test_a_request_is_answered_503_without_asking_the_agents_it_holds(self) -> None:
        response, auth, upstream = self.worker()
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response)
        self.assertEqual((auth.seen, upstream.targets), ([], []))

    def test_with_fail_open_it_goes_on_without_that_agent(self) -> None:
        response, auth, upstream = self.worker("--fail-open")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
        self.assertEqual(len(auth.seen), 1)

    def test_named_agents_are_consulted_as_before(self) -> None:
        response, auth, upstream = self.worker("--agent", "auth")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)

    def test_a_workers_own_reload_forgets_nothing_its_parent_forgets_for_the_group(self) -> None:
        # A SIGHUP reaches every process; a worker must not forget an agent
        # another worker holds.
        from sentinel_twisted.workers.assemble import make_worker

        arguments = ["--workers", "2", "--http", "tcp:0:interface=127.0.0.1", "--status", "none"]
        command = worker_command(arguments, 2, "/run/x/control.sock", "tcp:0:interface=127.0.0.1")
        options = Options()
        options.parseOptions(command[command.index("sentinel-reverse") + 1 :])
        top = make_worker(options, MemoryReactorClock())
        (gateway,) = [s for s in top if hasattr(s, "gateway")]
        gateway.gateway.take_known_agents(["waf", "auth"])
        self.assertTrue(top.reloader.reload())
        self.assertEqual(gateway.gateway.agent_ids(), ("waf", "auth"))


class StaleControlDirectoryTests(TestCase):
    """A control directory left by a parent that died is removed when the next starts; nothing else is."""

    def setUp(self) -> None:
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="sw-")
        self.addCleanup(__import__("shutil").rmtree, self.tmp, True)

    def dead_pid(self) -> int:
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        return child.pid

    def control_directory(self, pid: int, suffix: str = "abc") -> str:
        path = os.path.join(self.tmp, f"sentinel-workers-{pid}-{suffix}")
        os.mkdir(path, 0o700)
        with open(os.path.join(path, "left"), "w") as f:
            f.write("x")
        return path

    def test_a_dead_parents_directory_is_removed_and_a_live_ones_kept(self) -> None:
        from sentinel_twisted.workers.parent import remove_stale_control_directories

        dead = self.control_directory(self.dead_pid())
        live = self.control_directory(os.getppid())
        older = os.path.join(self.tmp, "sentinel-workers-k2j4l5")  # no pid in its name
        os.mkdir(older)
        other = os.path.join(self.tmp, "unrelated-1-x")
        os.mkdir(other)
        self.assertEqual(remove_stale_control_directories(self.tmp), [dead])
        self.assertFalse(os.path.lexists(dead))
        for kept in (live, older, other):
            self.assertTrue(os.path.isdir(kept), kept)

    def test_a_directory_whose_socket_is_listened_on_is_kept(self) -> None:
        # A parent in another pid namespace: its pid is not seen, its socket is live.
        from sentinel_twisted.workers.parent import remove_stale_control_directories

        path = self.control_directory(self.dead_pid())
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(os.path.join(path, "control.sock"))
        listening.listen(1)
        self.assertEqual(remove_stale_control_directories(self.tmp), [])
        self.assertTrue(os.path.isdir(path))
        listening.close()
        self.assertEqual(remove_stale_control_directories(self.tmp), [path])

    def test_a_symbolic_link_is_not_followed(self) -> None:
        from sentinel_twisted.workers.parent import remove_stale_control_directories

        target = os.path.join(self.tmp, "precious")
        os.mkdir(target)
        with open(os.path.join(target, "data"), "w") as f:
            f.write("keep")
        link = os.path.join(self.tmp, f"sentinel-workers-{self.dead_pid()}-lnk")
        os.symlink(target, link)
        self.assertEqual(remove_stale_control_directories(self.tmp), [])
        self.assertTrue(os.path.exists(os.path.join(target, "data")))
        self.assertTrue(os.path.islink(link))

    def test_the_service_removes_stale_directories_and_names_its_own_after_its_pid(self) -> None:
        import tempfile

        from twisted.internet import reactor

        from sentinel_twisted.workers.parent import ControlService

        stale = self.control_directory(self.dead_pid())
        self.patch(tempfile, "tempdir", self.tmp)
        service = ControlService(group(1), reactor)
        with captured_log() as events:
            service.startService()
        self.addCleanup(service.stopService)
        self.assertFalse(os.path.lexists(stale))
        self.assertIn(f"Removed {stale}, the control directory of a worker group that is gone", log_text(events))
        assert service.directory is not None
        self.assertTrue(os.path.basename(service.directory).startswith(f"sentinel-workers-{os.getpid()}-"))
        self.assertEqual(os.path.dirname(service.directory), self.tmp)
