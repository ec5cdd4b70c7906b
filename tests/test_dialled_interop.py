"""
Interop in forward mode, proxy side: our gateway (C{twistd sentinel-reverse
--agent-endpoint waf=unix:PATH}) dials the reference agent
(C{rust-fwd-agent}, the reference crate's own C{UdsAgentServerV2}) in
MessagePack and in JSON and decides HTTP requests through it; and it dials
our own C{twistd sentinel-agent --listen} in MessagePack.  Real processes,
UNIX sockets in a temporary directory, free TCP ports.

The reference agent's C{--log-events} lines prove it decoded each event
(it answers allow even to an event it could not decode, so the HTTP status
alone would not): a MessagePack body chunk with a duplicated
C{correlation_id} key, as the reference's own proxy writes it, never
reaches that log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from twisted.trial.unittest import SynchronousTestCase

from .peers import peer
from .test_readme_demo import fetch, free_port, wait_for
from .twistd_support import stop_process, twistd_command, unix_listening

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class Program:
    """A process with its output in a file, stopped (SIGTERM) at cleanup."""

    def __init__(self, test: SynchronousTestCase, cwd: Path, name: str, argv: list[str], stderr: bool = True) -> None:
        self.name = name
        self.path = cwd / f"{name}.out"
        self.err_path = cwd / f"{name}.err"
        self._out: IO[bytes] = self.path.open("wb")
        self._err: IO[bytes] = self.err_path.open("wb")
        self.process = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err if stderr else subprocess.STDOUT
        )
        test.addCleanup(self.stop)

    def output(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace") + self.err_path.read_text(
            encoding="utf-8", errors="replace"
        )

    def lines(self, key: str) -> list[Any]:
        """The stdout JSON lines with this top-level key."""
        found = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                value = json.loads(line)
                if key in value:
                    found.append(value[key])
        return found

    def stop(self) -> int:
        status = stop_process(self.process, STOP_TIMEOUT)
        self._out.close()
        self._err.close()
        return status


class ForwardGatewayInteropTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Short: a UNIX socket path has at most 107 bytes.
        self.work = Path(tempfile.mkdtemp(prefix="st-fwd-"))
        self.addCleanup(shutil.rmtree, self.work, True)
        self.socket = str(self.work / "agent.sock")
        self.http, self.status = free_port(), free_port()

    def start_reference_agent(self, encoding: str) -> Program:
        agent = Program(
            self,
            self.work,
            "rust-fwd-agent",
            [peer("rust-fwd-agent"), "--listen", f"unix:{self.socket}", "--agent-id", "waf-1",
             "--encoding", encoding, "--log-events"],
        )  # fmt: skip
        wait_for(lambda: unix_listening(self.socket), START_TIMEOUT, "the reference agent to listen", agent)
        return agent

    def start_gateway(self, *extra: str) -> Program:
        gateway = Program(
            self,
            self.work,
            "gateway",
            twistd_command(
                "-n", "--pidfile=", "sentinel-reverse",
                "--listen", f"unix:{self.work / 'reverse.sock'}",
                "--http", f"tcp:{self.http}:interface=127.0.0.1",
                "--status", f"tcp:{self.status}:interface=127.0.0.1",
                "--agent-endpoint", f"waf=unix:{self.socket}",
                "--agent-connections", "2",
                "--agent", "waf",
                *extra,
            ),
            stderr=False,
        )  # fmt: skip
        wait_for(
            lambda: self.gateway_output(gateway).count("dialled at") >= 2,
            START_TIMEOUT,
            "the gateway to dial the agent twice",
            gateway,
        )
        return gateway

    def gateway_output(self, gateway: Program) -> str:
        return gateway.path.read_text(encoding="utf-8", errors="replace")

    def agents(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status}/agents", timeout=10) as response:
            agents: list[dict[str, Any]] = json.load(response)["agents"]
            return agents

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()

    def decide_through_the_reference_agent(self, encoding: str, negotiated: str) -> None:
        agent = self.start_reference_agent(encoding)
        gateway = self.start_gateway()
        [waf] = self.agents()
        self.assertEqual(waf["agent_id"], "waf")
        self.assertEqual(
            [(c["mode"], c["encoding"]) for c in waf["connections"]], [("forward", negotiated)] * 2
        )
        code, _, body = fetch(f"http://127.0.0.1:{self.http}/items?id=1")
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["path"], "/items")
        code, body = self.post("/form", b'{"name":"widget"}')
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["body_bytes"], 17)

        # What the agent saw: our offer, its choice, and every event decoded.
        handshakes = agent.lines("handshake")
        self.assertEqual(len(handshakes), 2, agent.output())
        for handshake in handshakes:
            self.assertEqual(handshake["request"]["supported_encodings"], ["msgpack", "json"])
            self.assertEqual(handshake["request"]["supported_versions"], [2])
            self.assertEqual(handshake["encoding"], negotiated)
            self.assertTrue(handshake["success"])
        events = agent.lines("event")
        kinds = [e["type"] for e in events]
        self.assertEqual(kinds.count("request_headers"), 2, agent.output())
        self.assertIn("request_body_chunk", kinds, agent.output())
        self.assertTrue(all(e["correlation_id"] for e in events), events)
        self.assertNotIn("Failed to deserialize", agent.output())

        self.assertNotIn("Traceback", self.gateway_output(gateway))
        self.assertEqual(gateway.stop(), 0, gateway.output())
        self.assertEqual(agent.stop(), 0, agent.output())

    def test_messagepack(self) -> None:
        self.decide_through_the_reference_agent("both", "msgpack")

    def test_json_with_a_default_features_agent(self) -> None:
        """Upstream's agents are built without MessagePack: they answer json to any offer."""
        self.decide_through_the_reference_agent("json", "json")

    def test_our_agent_in_messagepack(self) -> None:
        agent = Program(
            self,
            self.work,
            "agent",
            twistd_command(
                "-n", "--pidfile=", "sentinel-agent", "--listen", f"unix:{self.socket}",
                "--agent-id", "waf-1", "--rules", str(ROOT / "examples" / "rules.toml"),
            ),
            stderr=False,
        )  # fmt: skip
        wait_for(lambda: unix_listening(self.socket), START_TIMEOUT, "our agent to listen", agent)
        gateway = self.start_gateway()
        [waf] = self.agents()
        self.assertEqual([c["encoding"] for c in waf["connections"]], ["msgpack", "msgpack"])
        self.assertEqual(waf["connections"][0]["capabilities"]["agent_id"], "waf-1")
        code, _, body = fetch(f"http://127.0.0.1:{self.http}/items")
        self.assertEqual(code, 200, body)
        code, _, body = fetch(f"http://127.0.0.1:{self.http}/admin")
        self.assertEqual((code, body), (403, b"Forbidden"))
        code, body = self.post("/form", b"x" * 100)
        self.assertEqual(code, 200, body)
        self.assertNotIn("Traceback", self.gateway_output(gateway) + agent.output())
        self.assertEqual(gateway.stop(), 0, gateway.output())
        self.assertEqual(agent.stop(), 0, agent.output())

    def test_agent_restart_is_redialled(self) -> None:
        agent = self.start_reference_agent("both")
        gateway = self.start_gateway()
        agent.stop()
        wait_for(
            lambda: "disconnected" in self.gateway_output(gateway), START_TIMEOUT, "the gateway to notice", gateway
        )
        code, _, _ = fetch(f"http://127.0.0.1:{self.http}/items")
        self.assertEqual(code, 503)
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        started = time.monotonic()
        agent = self.start_reference_agent("both")
        wait_for(
            lambda: self.gateway_output(gateway).count("dialled at") >= 4,
            START_TIMEOUT,
            "the gateway to dial again",
            gateway,
        )
        self.assertLess(time.monotonic() - started, START_TIMEOUT)
        code, _, _ = fetch(f"http://127.0.0.1:{self.http}/items")
        self.assertEqual(code, 200)
        self.assertEqual(gateway.stop(), 0, gateway.output())
