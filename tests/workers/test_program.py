"""
C{twistd sentinel-reverse --workers 2} as operators run it, with a real
agent: connections spread over the workers, requests decided in both,
one scrape for the group, a killed worker restarted and given its share
again, and a clean SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from ..test_readme_demo import (
    ROOT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Process,
    fetch,
    free_port,
    wait_for,
)
from ..twistd_support import twistd_command


def agents(status: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{status}/agents", timeout=10) as response:
        document: dict[str, Any] = json.load(response)
        return document


def spread(status: int) -> dict[str, int] | None:
    """waf-1's connections per worker, once every worker answers; else None."""
    try:
        document = agents(status)
    except OSError:
        return None
    if not all(w["answering"] for w in document["workers"]):
        return None
    for agent in document["agents"]:
        if agent["agent_id"] == "waf-1":
            held: dict[str, int] = agent["workers"]
            return held
    return None


class WorkerGroupTests(TestCase):
    def test_two_workers_share_the_agents_and_the_clients(self) -> None:
        work = Path(self.mktemp())
        (work / "examples").mkdir(parents=True)
        shutil.copy(ROOT / "examples" / "rules.toml", work / "examples" / "rules.toml")
        http, status = free_port(), free_port()
        proxy = Process(
            self,
            work,
            "proxy",
            ["-n", "sentinel-reverse", "--workers", "2", "--shutdown-grace", "1",
             "--http", f"tcp:{http}:interface=127.0.0.1", "--status", f"tcp:{status}:interface=127.0.0.1"],
        )
        wait_for(lambda: proxy.output().count("is ready") >= 2, START_TIMEOUT, "both workers", proxy)
        agent = Process(
            self,
            work,
            "agent",
            ["-n", "sentinel-agent", "--connect", "unix:sentinel-reverse.sock", "--agent-id", "waf-1",
             "--connections", "4", "--rules", "examples/rules.toml"],
        )
        held = wait_for(lambda: spread(status) == {"1": 2, "2": 2} and spread(status), START_TIMEOUT,
                        "waf-1 to hold two connections in each worker", proxy, agent)
        self.assertEqual(held, {"1": 2, "2": 2})

        # Clients: each request on a new connection, so the kernel spreads them.
        codes = [fetch(f"http://127.0.0.1:{http}/items?id={i}")[0] for i in range(20)]
        codes += [fetch(f"http://127.0.0.1:{http}/admin")[0] for _ in range(6)]
        self.assertEqual(codes, [200] * 20 + [403] * 6)

        with urllib.request.urlopen(f"http://127.0.0.1:{status}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        requests = {}
        for family in text_string_to_metric_families(metrics):
            if family.name == "sentinel_gateway_requests":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        key = (sample.labels["worker"], sample.labels["decision"])
                        requests[key] = requests.get(key, 0) + sample.value
        self.assertEqual(sum(v for (w, d), v in requests.items() if d == "allow"), 20, requests)
        self.assertEqual(sum(v for (w, d), v in requests.items() if d == "block"), 6, requests)
        self.assertIn('sentinel_worker_up{index="2",worker="parent"} 1.0', metrics)
        with urllib.request.urlopen(f"http://127.0.0.1:{status}/healthz", timeout=10) as response:
            self.assertEqual(json.load(response)["workers"], {"1": True, "2": True})

        # A worker killed outright is restarted and gets its share back.
        before = {w["worker"]: w["pid"] for w in agents(status)["workers"]}
        os.kill(before[1], signal.SIGKILL)
        # (A connection the kernel queued on the dying worker's socket is
        # reset: SO_REUSEPORT moves nothing from a closed listener.)
        wait_for(lambda: not running(before[1]), START_TIMEOUT, "worker 1 to be gone", proxy)
        # Clients meanwhile (one request at a time, none in flight at the
        # kill): worker 2 serves them until worker 1 is back and holds the
        # agent again; worker 1 takes no client before that, so no 503.
        during: list[int] = []

        def back_and_spread() -> bool:
            during.append(fetch(f"http://127.0.0.1:{http}/items?id=x")[0])
            document = _try(lambda: agents(status))
            return (
                document is not None
                and document["workers"][0]["pid"] not in (None, before[1])
                and document["workers"][0]["ready"]
                and spread(status) == {"1": 2, "2": 2}
            )

        wait_for(back_and_spread, START_TIMEOUT, "worker 1 to be back with its share", proxy, agent)
        during += [fetch(f"http://127.0.0.1:{http}/items?id=x")[0] for _ in range(20)]
        self.assertEqual(set(during), {200}, during)

        output = proxy.output()
        self.assertIn("Worker 1 exited", output)
        self.assertNotIn("Traceback", output)
        (control,) = re.findall(r"'(/[^']*/control\.sock)'", output)
        for process in (agent, proxy):
            process.process.terminate()
            self.assertEqual(process.process.wait(STOP_TIMEOUT), 0, process.output())
        self.assertFalse((work / "sentinel-reverse.sock").exists())
        self.assertEqual(list(work.glob("*.pid")), [])
        self.assertFalse(Path(control).parent.exists(), "the control socket's directory is removed")
        self.assertEqual(proxy.output().count("Server Shut Down"), 3, "the parent and both workers stopped")


def _try(call: Any) -> Any:
    try:
        return call()
    except OSError:
        return None


class GroupAdmissionTests(TestCase):
    def test_tcp_agents_the_cap_across_workers_frames_sent_with_the_registration_and_sighup(self) -> None:
        from ..rawagent import HANDSHAKE_REQUEST, PING, PONG, BlockingAgent, frame, registration

        work = Path(self.mktemp())
        work.mkdir(parents=True)
        agents_port, http, status = free_port(), free_port(), free_port()
        proxy = Process(
            self,
            work,
            "proxy",
            ["-n", "sentinel-reverse", "--workers", "2", "--max-connections-per-agent", "2",
             "--listen", f"tcp:{agents_port}:interface=127.0.0.1",
             "--http", f"tcp:{http}:interface=127.0.0.1", "--status", f"tcp:{status}:interface=127.0.0.1"],
        )
        wait_for(lambda: proxy.output().count("is ready") >= 2, START_TIMEOUT, "both workers", proxy)
        address = ("127.0.0.1", agents_port)
        with BlockingAgent(address) as first, BlockingAgent(address) as second:
            # A Ping right behind the registration, in one write: the parent
            # reads both, answers the registration, and the worker the Ping.
            first.send_raw(frame(HANDSHAKE_REQUEST, registration("raw-1")) + frame(PING, {"sequence": 7, "timestamp_ms": 1}))
            kind, response = first.recv_frame()
            self.assertTrue(response["success"], response)
            self.assertEqual(first.recv_frame(), (PONG, {"sequence": 7, "timestamp_ms": 1}))
            self.assertTrue(second.register("raw-1")["success"])
            wait_for(lambda: spread_of(status, "raw-1") == {"1": 1, "2": 1}, START_TIMEOUT,
                     "one connection in each worker", proxy)
            with BlockingAgent(address) as third:
                refused = third.register("raw-1")
                self.assertFalse(refused["success"])
                self.assertIn("limit", refused["error"].lower())
            first.close()
            # The worker reports the end; the parent frees the slot.
            wait_for(lambda: spread_of(status, "raw-1") is not None
                     and sum(spread_of(status, "raw-1").values()) == 1,  # type: ignore[union-attr]
                     START_TIMEOUT, "the first connection to end", proxy)
            with BlockingAgent(address) as fourth:
                self.assertTrue(fourth.register("raw-1")["success"])

        os.kill(proxy.process.pid, signal.SIGHUP)
        wait_for(lambda: proxy.output().count("Received SIGHUP") >= 3, START_TIMEOUT,
                 "the parent and both workers to reload", proxy)
        proxy.process.terminate()
        self.assertEqual(proxy.process.wait(STOP_TIMEOUT), 0, proxy.output())
        self.assertNotIn("Traceback", proxy.output())


def spread_of(status: int, agent_id: str) -> dict[str, int] | None:
    document = _try(lambda: agents(status))
    for agent in (document or {}).get("agents", ()):
        if agent["agent_id"] == agent_id:
            held: dict[str, int] = agent["workers"]
            return held
    return None


def running(pid: int) -> bool:
    """Whether C{pid} is a live process (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def short_temporary_directory(test: TestCase) -> Path:
    """A directory removed after C{test}, with a path short enough for the control socket in it."""
    directory = Path(tempfile.mkdtemp(prefix="sw-"))
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class OrphanTests(TestCase):
    def test_workers_stop_when_their_parent_is_killed(self) -> None:
        work = Path(self.mktemp())
        work.mkdir(parents=True)
        status = free_port()
        # A parent killed outright cannot remove its control directory: one
        # the test removes.
        temporary = short_temporary_directory(self)
        previous = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(temporary)
        try:
            proxy = Process(
                self,
                work,
                "proxy",
                ["-n", "sentinel-reverse", "--workers", "2", "--shutdown-grace", "0",
                 "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--status", f"tcp:{status}:interface=127.0.0.1"],
            )
        finally:
            if previous is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = previous
        wait_for(lambda: proxy.output().count("is ready") >= 2, START_TIMEOUT, "both workers", proxy)
        pids = [w["pid"] for w in agents(status)["workers"]]
        self.assertTrue(all(running(pid) for pid in pids), pids)
        proxy.process.kill()
        proxy.process.wait(STOP_TIMEOUT)
        wait_for(lambda: not any(running(pid) for pid in pids), START_TIMEOUT, "the orphaned workers to stop")


class StartupFailureTests(TestCase):
    def group_failing_on(self, taken: str) -> tuple[int, str, list[str]]:
        """
        Start a group whose --listen or --status port is taken; its exit
        status, its output and what it left in its temporary directory.
        """
        work = Path(self.mktemp())
        work.mkdir(parents=True)
        temporary = short_temporary_directory(self)
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            ports = {"listen": free_port(), "status": free_port(), taken: holder.getsockname()[1]}
            run = subprocess.run(
                twistd_command(
                    "-n", "--pidfile=", "sentinel-reverse", "--workers", "2",
                    "--listen", f"tcp:{ports['listen']}:interface=127.0.0.1",
                    "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                    "--status", f"tcp:{ports['status']}:interface=127.0.0.1",
                ),
                cwd=work, env={**os.environ, "TMPDIR": str(temporary)}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=STOP_TIMEOUT,
            )
        return run.returncode, run.stdout.decode(errors="replace"), sorted(p.name for p in temporary.iterdir())

    def test_an_agent_listener_that_cannot_listen_leaves_no_control_directory(self) -> None:
        status, output, left = self.group_failing_on("listen")
        self.assertEqual(status, 1, output)
        self.assertIn("--listen tcp:", output)
        self.assertEqual(left, [], "the control socket's directory is removed")

    def test_a_status_site_that_cannot_listen_is_named_and_leaves_no_control_directory(self) -> None:
        status, output, left = self.group_failing_on("status")
        self.assertEqual(status, 1, output)
        self.assertIn("--status tcp:", output)
        self.assertNotIn("[worker", output, "no worker is started")
        self.assertEqual(left, [], "the control socket's directory is removed")


class VanishingAgentTests(TestCase):
    def test_agents_that_vanish_right_after_registering_stop_no_worker_and_leak_nothing(self) -> None:
        from ..rawagent import HANDSHAKE_REQUEST, frame, registration

        work = Path(self.mktemp())
        work.mkdir(parents=True)
        agents_port, status = free_port(), free_port()
        proxy = Process(
            self,
            work,
            "proxy",
            # 150 connections from one address in a row: the per-address cap
            # on connections awaiting registration would reset some.
            ["-n", "sentinel-reverse", "--workers", "2", "--max-connections-per-agent", "1000",
             "--max-pending-registrations-per-peer", "1000",
             "--listen", f"tcp:{agents_port}:interface=127.0.0.1",
             "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--status", f"tcp:{status}:interface=127.0.0.1"],
        )
        wait_for(lambda: proxy.output().count("is ready") >= 2, START_TIMEOUT, "both workers", proxy)
        pids = [w["pid"] for w in agents(status)["workers"]]
        descriptors = len(os.listdir(f"/proc/{proxy.process.pid}/fd"))
        for i in range(150):
            with socket.create_connection(("127.0.0.1", agents_port)) as agent:
                # Gone at once: its RegistrationResponse, unread, makes its end reset the connection.
                tail = b"" if i % 3 else b"\x00\x00\x01\x00\x41{"  # or with part of a frame behind
                agent.sendall(frame(HANDSHAKE_REQUEST, registration(f"gone-{i % 7}")) + tail)

        def settled() -> bool:
            document = _try(lambda: agents(status))
            return (
                document is not None
                and all(w["answering"] and w["connections"] == 0 for w in document["workers"])
                and not document["agents"]
                and len(os.listdir(f"/proc/{proxy.process.pid}/fd")) == descriptors
            )

        wait_for(settled, START_TIMEOUT, "every slot and descriptor to be freed", proxy)
        document = agents(status)
        self.assertEqual([(w["pid"], w["restarts"]) for w in document["workers"]], [(pid, 0) for pid in pids])
        self.assertNotIn("Traceback", proxy.output())
        proxy.process.terminate()
        self.assertEqual(proxy.process.wait(STOP_TIMEOUT), 0, proxy.output())


def worker_of(status: int, connection_id: str) -> int | None:
    """The worker holding connection C{connection_id}, as the group's /agents says."""
    document = _try(lambda: agents(status))
    for agent in (document or {}).get("agents", ()):
        for connection in agent["connections"]:
            if connection["connection_id"] == connection_id:
                worker: int = connection["worker"]
                return worker
    return None


class StoppingWorkerTests(TestCase):
    def test_a_worker_stopping_on_its_own_is_handed_no_new_connection(self) -> None:
        # One worker gets SIGTERM on its own (an operator recycling it, an
        # out-of-memory helper): it drains its requests for the shutdown
        # grace.  An agent connection registered meanwhile goes to the other
        # worker, not to the one that is leaving (which would close it).
        from ..rawagent import PING, PONG, REQUEST_HEADERS, BlockingAgent

        work = Path(self.mktemp())
        work.mkdir(parents=True)
        agents_port, http, status = free_port(), free_port(), free_port()
        proxy = Process(
            self,
            work,
            "proxy",
            ["-n", "sentinel-reverse", "--workers", "2", "--shutdown-grace", "60", "--request-timeout", "60",
             "--listen", f"tcp:{agents_port}:interface=127.0.0.1",
             "--http", f"tcp:{http}:interface=127.0.0.1", "--status", f"tcp:{status}:interface=127.0.0.1"],
        )
        wait_for(lambda: proxy.output().count("is ready") >= 2, START_TIMEOUT, "both workers", proxy)
        address = ("127.0.0.1", agents_port)
        # One connection of an agent that never answers in each worker (the
        # first goes to worker 1: both hold none, the lower index wins).
        held = BlockingAgent(address)
        self.addCleanup(held.close)
        in_one = held.register("slow")["connection_id"]
        wait_for(lambda: worker_of(status, in_one) == 1, START_TIMEOUT, "worker 1 to hold it", proxy)
        other = BlockingAgent(address)
        self.addCleanup(other.close)
        in_two = other.register("slow")["connection_id"]
        wait_for(lambda: worker_of(status, in_two) == 2, START_TIMEOUT, "worker 2 to hold it", proxy)
        # HTTP clients until worker 1 has a request in flight (the kernel
        # picks the worker of each client connection): it waits for the
        # agent's answer, so worker 1 drains for as long as it is not given.
        clients: list[socket.socket] = []

        def request_in_worker_1() -> bool:
            client = socket.create_connection(("127.0.0.1", http), timeout=5)
            clients.append(client)
            self.addCleanup(client.close)
            client.sendall(b"GET /items?id=1 HTTP/1.1\r\nHost: example\r\n\r\n")
            held.sock.settimeout(0.2)
            try:
                kind, _ = held.recv_frame()
            except TimeoutError:
                return False
            return kind == REQUEST_HEADERS

        held.timeout = 0.2
        wait_for(lambda: len(clients) < 64 and request_in_worker_1(), START_TIMEOUT, "a request in worker 1", proxy)
        held.timeout = 5.0
        pids = {w["worker"]: w["pid"] for w in agents(status)["workers"]}
        os.kill(pids[1], signal.SIGTERM)
        wait_for(lambda: "[worker 1] Received SIGTERM" in proxy.output(), START_TIMEOUT, "worker 1 to stop", proxy)

        with BlockingAgent(address) as late:
            answer = late.register("late")
            self.assertTrue(answer["success"], answer)
            wait_for(lambda: worker_of(status, answer["connection_id"]) is not None, START_TIMEOUT,
                     "a worker to hold the late connection", proxy)
            self.assertEqual(worker_of(status, answer["connection_id"]), 2)
            self.assertTrue(running(pids[1]), "worker 1 still drains")
            late.send(PING, {"sequence": 1, "timestamp_ms": 1})
            self.assertEqual(late.recv_frame(), (PONG, {"sequence": 1, "timestamp_ms": 1}))
            # Worker 1's agent goes: its request is answered, it exits and is
            # restarted; the late connection stays where it is.
            held.close()
            wait_for(lambda: proxy.output().count("is ready") >= 3, START_TIMEOUT, "worker 1 to be back", proxy)
            late.send(PING, {"sequence": 2, "timestamp_ms": 2})
            self.assertEqual(late.recv_frame(), (PONG, {"sequence": 2, "timestamp_ms": 2}))
        self.assertIn(f"Worker 1 (pid {pids[1]}) is stopping", proxy.output())
        for client in clients:
            client.close()
        other.close()
        proxy.process.terminate()
        self.assertEqual(proxy.process.wait(STOP_TIMEOUT), 0, proxy.output())
        self.assertNotIn("Traceback", proxy.output())
