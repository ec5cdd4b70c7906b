"""
Interop in forward mode: the reference proxy (C{rust-proxy --dial}, the
reference crate's own C{AgentPool} and C{AgentClientV2Uds}) dials our
C{twistd sentinel-agent --listen}, in JSON and in MessagePack.  Real
processes, a UNIX socket in a temporary directory.

The reference proxy's MessagePack writer sends two shapes its own agent
cannot read (see the peers' README); ours reads them, so its demo is
answered in full in both encodings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from twisted.trial.unittest import SynchronousTestCase

from ..peers import peer
from ..twistd_support import twistd_command, unix_listening

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_RULES = ROOT / "examples" / "rules.toml"
START_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0
DEMO_EVENTS = {
    "request_headers",
    "request_body_chunk",
    "response_headers",
    "response_body_chunk",
    "request_headers_minimal_metadata",
}


class ListeningAgent:
    """C{twistd -n sentinel-agent --listen unix:DIR/agent.sock ...}, output to a file."""

    def __init__(self, directory: str, *args: str) -> None:
        self.socket = os.path.join(directory, "agent.sock")
        self.log_path = os.path.join(directory, "agent.log")
        self._log: IO[bytes] = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            twistd_command(
                "-n", "--pidfile=", "sentinel-agent", "--listen", f"unix:{self.socket}",
                "--agent-id", "waf-1", *args,
            ),
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not unix_listening(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the agent did not start listening:\n{self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(START_TIMEOUT)
        self._log.close()


def rust_proxy(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [peer("rust-proxy"), "--dial", f"unix:{socket}", "--exit", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def lines(result: subprocess.CompletedProcess[str], key: str) -> list[Any]:
    return [json.loads(line)[key] for line in result.stdout.splitlines() if line.startswith(f'{{"{key}"')]


class ForwardInteropTests(SynchronousTestCase):
    def setUp(self) -> None:
        peer("rust-proxy")  # fail (or skip) before starting anything
        self.dir = tempfile.mkdtemp(prefix="sentinel-fwd-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def start(self, *args: str) -> ListeningAgent:
        agent = ListeningAgent(self.dir, *args)
        self.addCleanup(agent.stop)
        return agent

    def check_demo(self, agent: ListeningAgent, encoding: str, rules: bool = True) -> list[Any]:
        result = rust_proxy(
            agent.socket, "--connections", "2", "--demo", "--request-timeout-ms", "2000",
            "--encoding", encoding,
        )  # fmt: skip
        detail = f"rust-proxy stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nagent:\n{agent.output()[-4000:]}"
        self.assertEqual(result.returncode, 0, detail)
        handshakes = lines(result, "handshake")
        self.assertEqual([h["encoding"] for h in handshakes], [encoding, encoding], detail)
        self.assertEqual(handshakes[0]["capabilities"]["agent_id"], "waf-1")
        demos = lines(result, "demo")
        self.assertEqual(len(demos), 2, detail)
        for demo in demos:
            self.assertEqual(demo["encoding"], encoding)
            self.assertEqual(set(demo["responses"]), DEMO_EVENTS, detail)
            for name, response in demo["responses"].items():
                self.assertEqual(response.get("version"), 2, f"{name}: {response}")
                self.assertEqual(response["audit"]["custom"]["correlation_id"], demo["correlation_id"], name)
            if not rules:
                continue
            # The example rules' decisions, whatever the encoding.
            headers = demo["responses"]["request_headers"]
            self.assertEqual(headers["decision"], {"block": {"status": 401, "body": "API key required", "headers": None}})
            self.assertIn({"set": {"name": "x-sentinel-agent", "value": "sentinel-twisted"}}, headers["response_headers"])
        self.assertNotIn("Traceback", agent.output())
        self.assertNotIn("invalid", agent.output().lower())
        return demos

    def test_demo_in_json(self) -> None:
        agent = self.start("--rules", str(EXAMPLE_RULES))
        self.check_demo(agent, "json")

    def test_demo_in_messagepack(self) -> None:
        """All five events answered, including the two the reference agent cannot read."""
        agent = self.start("--rules", str(EXAMPLE_RULES))
        self.check_demo(agent, "msgpack")

    def test_benchmark_completes_without_errors(self) -> None:
        agent = self.start("--agent", "sentinel_twisted.agent:Agent", "--health-interval", "0")
        result = rust_proxy(
            agent.socket, "--connections", "2", "--encoding", "msgpack", "--bench",
            "--concurrency", "64", "--requests", "20000", "--warmup", "2000",
        )  # fmt: skip
        detail = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nagent:\n{agent.output()[-4000:]}"
        self.assertEqual(result.returncode, 0, detail)
        [bench] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"concurrency"')]
        self.assertEqual(bench["errors"], 0, detail)
        self.assertEqual(bench["requests"], 20000)
        self.assertEqual(bench["encoding"], "msgpack")

    def test_socket_is_owner_only_never_stolen_and_removed_on_stop(self) -> None:
        agent = self.start("--agent", "sentinel_twisted.agent:Agent")
        self.assertEqual(os.stat(agent.socket).st_mode & 0o777, 0o600)
        second = subprocess.run(
            twistd_command(
                "-n", "--pidfile=", "sentinel-agent", "--listen", f"unix:{agent.socket}",
                "--agent-id", "other", "--agent", "sentinel_twisted.agent:Agent",
            ),
            cwd=self.dir, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.assertNotEqual(second.returncode, 0)
        self.assertIn("served by a live process", second.stdout + second.stderr)
        # The first agent still serves.
        self.check_demo(agent, "json", rules=False)
        agent.stop()
        self.assertFalse(os.path.exists(agent.socket))
        self.assertFalse(os.path.lexists(agent.socket + ".lock"))


class PeersLookupTests(SynchronousTestCase):
    """Missing peers fail clearly; only an sdist without ../shared skips."""

    def setUp(self) -> None:
        from .. import peers

        self.peers = peers
        self.root = Path(tempfile.mkdtemp(prefix="sentinel-peers-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.patch(peers, "ROOT", self.root / "repo")
        self.patch(peers, "SHARED", self.root / "shared")
        (self.root / "repo").mkdir()
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != peers.PEERS_ENV})

    def test_a_checkout_without_peers_fails(self) -> None:
        from twisted.trial.unittest import SkipTest

        error = self.assertRaises(AssertionError, self.peers.peer, "rust-proxy")
        self.assertNotIsInstance(error, SkipTest)
        self.assertIn(str(self.root / "shared" / "peers" / "rust-proxy"), str(error))

    def test_an_sdist_without_shared_skips_naming_the_path(self) -> None:
        from twisted.trial.unittest import SkipTest

        (self.root / "repo" / "PKG-INFO").write_text("Metadata-Version: 2.1\n")
        error = self.assertRaises(SkipTest, self.peers.peer, "rust-proxy")
        self.assertIn(str(self.root / "shared" / "peers"), str(error))

    def test_an_sdist_beside_shared_without_peers_fails(self) -> None:
        (self.root / "repo" / "PKG-INFO").write_text("Metadata-Version: 2.1\n")
        (self.root / "shared").mkdir()
        self.assertRaises(self.peers.PeersMissing, self.peers.peer, "rust-proxy")

    def test_found(self) -> None:
        directory = self.root / "shared" / "peers"
        directory.mkdir(parents=True)
        program = directory / "rust-proxy"
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        self.assertEqual(self.peers.peer("rust-proxy"), str(program))
