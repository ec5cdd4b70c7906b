"""
The gateway section of the benchmarks: HTTP requests/s through
C{twistd sentinel-reverse --http} (built-in echo upstream) with one agent
consulted, against the same gateway process with no agent registered
(requests then pass unconsulted: the gateway runs with --fail-open), loaded
by C{wrk} over TCP loopback.

The cases alternate within each round (no agent, one agent, the
reference agent's cases) so that the ratios are measured in one run, each
in a gateway process of its own: a gateway without C{--agent} consults
every agent it has seen, so an agent of an earlier case, gone, would be a
fail-open pass in every later one.  The agent is the C load agent: one
process, four connections, subscribed to RequestHeaders only, answering
allow.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Any


def gateway_available() -> str | None:
    """C{None} if the gateway can be measured, else why not."""
    result = subprocess.run(
        [sys.executable, "-m", "twisted", "sentinel-reverse", "--help"],
        capture_output=True,
        text=True,
    )
    if "--http" not in result.stdout:
        return "twistd sentinel-reverse has no --http option (no gateway in this checkout)"
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian package wrk)"
    return None


# twistd from this interpreter (the venv's twistd script may not be on PATH).
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited ({proc.returncode}) before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the gateway did not listen on port {port} within {timeout:.0f} s")


_RPS = re.compile(r"Requests/sec:\s+([0-9.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_ERRORS = re.compile(r"Socket errors:.*")
_LATENCY = re.compile(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)")


def run_wrk(url: str, connections: int, duration: float) -> dict[str, Any]:
    seconds = max(1, int(round(duration)))
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    out = result.stdout
    rps = _RPS.search(out)
    if result.returncode != 0 or rps is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {out[-500:]} {result.stderr[-500:]}")
    non2xx = _NON_2XX.search(out)
    errors = _ERRORS.search(out)
    latency = _LATENCY.search(out)
    return {
        "rps": float(rps.group(1)),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(0) if errors else None,
        "latency_avg": latency.group(1) if latency else None,
    }


#: The reference agent's cases: the events it subscribes to.
REFERENCE_CASES = (("reference_headers", "1"), ("reference_four_events", "1,3,4,5"))


def reference_cases(harness: Any) -> tuple[tuple[str, str], ...]:
    """The reference-agent cases, when the reference peers are at hand."""
    from benchmarks import reference

    return () if reference.missing_peers(reference.peers_dir(harness.args)) else REFERENCE_CASES


def with_reference_agent(harness: Any, sock: str, url: str, events: str) -> dict[str, Any]:
    """
    wrk against the gateway while one reference agent (C{rust-agent}, four
    connections, subscribed to C{events}) decides every request; checked
    to be consulted (the echo names its decision).
    """
    import json
    import urllib.request

    from benchmarks import reference

    a = harness.args
    agent = harness._spawn(
        [
            os.path.join(reference.peers_dir(a), "rust-agent"),
            "--connect", f"unix:{sock}",
            "--agent-id", "gw-reference",
            "--connections", "4",
            "--events", events,
            "--quiet",
        ],
        "rust-agent",
    )
    try:
        for _ in range(4):
            agent.expect_where(lambda item: "success" in item, "registration", 30)
        time.sleep(0.2)
        with urllib.request.urlopen(url, timeout=10) as response:
            decisions = json.loads(response.read())["decisions"]
        if [d["agent_id"] for d in decisions] != ["gw-reference"]:
            raise RuntimeError(f"the reference agent was not consulted: {decisions}")
        return run_wrk(url, a.gateway_connections, a.gateway_duration)
    finally:
        harness._reap(agent)


class _Gateway:
    """One C{twistd sentinel-reverse --http} process (built-in echo, C{--fail-open})."""

    def __init__(self, harness: Any, name: str) -> None:
        workdir = harness.workdir
        self.sock = os.path.join(workdir, f"{name}.sock")
        port = free_port()
        argv = [
            sys.executable, "-c", _TWISTD,
            "--nodaemon",
            "--logfile", os.path.join(workdir, f"{name}.log"),
            "--pidfile", os.path.join(workdir, f"{name}.pid"),
            "sentinel-reverse",
            "--listen", f"unix:{self.sock}",
            "--http", f"tcp:{port}:interface=127.0.0.1",
            "--status", "none",
            # The "no agent" case measures the pass-through; without an
            # agent a gateway that fails closed would answer 503.
            "--fail-open",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}/bench"
        wait_for_port(port, 60, self.proc)

    def stop(self) -> str:
        """Stop it; the end of its stderr if it had died already."""
        proc = self.proc
        tail = proc.stderr.read()[-2000:] if proc.poll() is not None and proc.stderr else ""
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        return tail


def run(harness: Any) -> dict[str, Any]:
    why = gateway_available()
    if why is not None:
        harness.log(f"gateway: skipped: {why}")
        return {"skipped": why, "ratio": None}
    a = harness.args
    rounds: list[dict[str, Any]] = []
    serial = 0
    gateway: _Gateway | None = None

    def fresh() -> _Gateway:
        nonlocal gateway, serial
        if gateway is not None:
            gateway.stop()
        serial += 1
        gateway = _Gateway(harness, f"gateway-{serial}")
        return gateway

    try:
        for i in range(a.runs):
            harness.host.checkpoint(f"gateway: round {i + 1}")
            harness.log(f"gateway: round {i + 1}/{a.runs}: no agent")
            g = fresh()
            bare = run_wrk(g.url, a.gateway_connections, a.gateway_duration)
            harness.log(f"gateway: round {i + 1}/{a.runs}: one agent")
            g = fresh()
            agent = harness.start_agent(
                ["--unix", g.sock], "--agent-id", "gw-agent", "--connections", "4", "--events", "1",
            )
            try:
                agent.expect("registered", 30)
                time.sleep(0.2)
                consulted = run_wrk(g.url, a.gateway_connections, a.gateway_duration)
            finally:
                agent.stop()
                harness.children.remove(agent)
            final = agent.expect("exit", 10)
            consulted["agent_answered"] = final["answered"]
            consulted["agent_cpu"] = (final["cpu_user"] + final["cpu_sys"]) / max(a.gateway_duration, 1)
            if final["answered"] == 0:
                raise RuntimeError("the agent was never consulted")
            this = {"no_agent": bare, "one_agent": consulted, "ratio": consulted["rps"] / bare["rps"]}
            for name, events in reference_cases(harness):
                harness.log(f"gateway: round {i + 1}/{a.runs}: reference agent, events {events}")
                g = fresh()
                measured = with_reference_agent(harness, g.sock, g.url, events)
                this[name] = measured
                this[f"{name}_ratio"] = measured["rps"] / bare["rps"]
            rounds.append(this)
            time.sleep(0.3)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        harness.log(f"gateway: failed: {e}")
        tail = gateway.stop() if gateway is not None else ""
        gateway = None
        return {"skipped": f"failed: {e}", "failed": True, "ratio": None, "rounds": rounds, "stderr": tail}
    finally:
        if gateway is not None:
            gateway.stop()
    reference = {
        name: statistics.median(r[f"{name}_ratio"] for r in rounds)
        for name, _ in reference_cases(harness)
    }
    return {
        "connections": a.gateway_connections,
        "duration": a.gateway_duration,
        "rounds": rounds,
        "reference_ratios": reference,
        "no_agent_rps": statistics.median(r["no_agent"]["rps"] for r in rounds),
        "one_agent_rps": statistics.median(r["one_agent"]["rps"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "non_2xx": sum(r["no_agent"]["non_2xx"] + r["one_agent"]["non_2xx"] for r in rounds),
    }
