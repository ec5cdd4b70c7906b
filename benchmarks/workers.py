"""
The workers section: gateway requests/s of C{twistd sentinel-reverse
--workers 1} and C{--workers 2}, alternating in one run, each served by
one reference agent (C{rust-agent}, four connections, RequestHeaders) and
loaded by C{wrk} over TCP loopback.  With two workers the agent's four
connections are two in each worker.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

from benchmarks.gateway import _TWISTD, free_port, gateway_available, run_wrk, wait_for_port


def _measure(harness: Any, workers: int, round_number: int) -> dict[str, Any]:
    from benchmarks import reference

    a = harness.args
    sock = os.path.join(harness.workdir, f"workers-{workers}-{round_number}.sock")
    log_path = os.path.join(harness.workdir, f"workers-{workers}-{round_number}.log")
    port = free_port()
    argv = [
        sys.executable, "-c", _TWISTD, "--nodaemon", "--logfile", log_path, "--pidfile", "",
        "sentinel-reverse", "--workers", str(workers), "--listen", f"unix:{sock}",
        "--http", f"tcp:{port}:interface=127.0.0.1", "--status", "none",
    ]
    proxy = subprocess.Popen(argv, cwd=harness.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        deadline = time.monotonic() + 60
        while workers > 1 and _read(log_path).count("is ready") < workers:
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {workers} workers did not start: {_read(log_path)[-1500:]}")
            time.sleep(0.1)
        wait_for_port(port, 60, proxy)
        agent = harness._spawn(
            [
                os.path.join(reference.peers_dir(a), "rust-agent"),
                "--connect", f"unix:{sock}", "--agent-id", "gw-reference",
                "--connections", "4", "--events", "1", "--quiet",
            ],
            "rust-agent",
        )
        for _ in range(4):
            agent.expect_where(lambda item: "success" in item, "registration", 30)
        time.sleep(1.0)
        for _ in range(8):  # new connections: the kernel spreads them over the workers
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/bench", timeout=10) as response:
                decisions = json.loads(response.read())["decisions"]
            if [d["agent_id"] for d in decisions] != ["gw-reference"]:
                raise RuntimeError(f"the reference agent was not consulted: {decisions}")
        processes = [proxy.pid, *_children(proxy.pid)]
        before, started = _cpu_seconds(processes), time.monotonic()
        measured = run_wrk(f"http://127.0.0.1:{port}/bench", a.gateway_connections, a.gateway_duration)
        used, wall = _cpu_seconds(processes) - before, time.monotonic() - started
        seconds = max(1, int(round(a.gateway_duration)))
        measured["workers"] = workers
        # CPU the proxy's processes used per second of load, and per request:
        # what a core buys, for the projection to more cores.
        measured["proxy_cpu"] = used / wall
        measured["cpu_us_per_request"] = used / max(measured["rps"] * seconds, 1) * 1e6
        return measured
    finally:
        if agent is not None:
            harness._reap(agent)
        proxy.terminate()
        try:
            proxy.wait(20)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


def _children(pid: int) -> list[int]:
    """The child processes of C{pid} (the workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds the processes have used."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run(harness: Any) -> dict[str, Any]:
    """C{--workers 1} and C{--workers 2}, alternating, C{--runs} rounds; medians and their ratio."""
    from benchmarks import reference

    why = gateway_available() or reference.missing_peers(reference.peers_dir(harness.args))
    if why:
        harness.log(f"workers: skipped: {why}")
        return {"skipped": str(why)}
    rounds = []
    try:
        for i in range(harness.args.runs):
            this = {}
            for workers in (1, 2):
                harness.log(f"workers: round {i + 1}/{harness.args.runs}: --workers {workers}")
                this[str(workers)] = _measure(harness, workers, i)
            this["ratio"] = this["2"]["rps"] / this["1"]["rps"]
            rounds.append(this)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        harness.log(f"workers: failed: {e}")
        return {"skipped": f"failed: {e}", "failed": True, "rounds": rounds}
    return {
        "connections": harness.args.gateway_connections,
        "duration": harness.args.gateway_duration,
        "rounds": rounds,
        "one_worker_rps": statistics.median(r["1"]["rps"] for r in rounds),
        "two_workers_rps": statistics.median(r["2"]["rps"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "non_2xx": sum(r[w]["non_2xx"] for r in rounds for w in ("1", "2")),
        "proxy_cpu": {w: statistics.median(r[w]["proxy_cpu"] for r in rounds) for w in ("1", "2")},
        "cpu_us_per_request": {w: statistics.median(r[w]["cpu_us_per_request"] for r in rounds) for w in ("1", "2")},
        "cpus": os.cpu_count(),
    }


def report(result: dict[str, Any], fmt: Any) -> list[str]:
    """The section's lines in the text report."""
    if result.get("skipped"):
        return [f"workers: not measured ({result['skipped']})"]
    lines = [
        f"workers (wrk, {result['connections']} connections, one reference agent, {result['cpus']} CPUs): "
        f"--workers 1 {fmt(result['one_worker_rps'])} req/s, --workers 2 {fmt(result['two_workers_rps'])} req/s, "
        f"ratio {result['ratio']:.2f}x (non-2xx: {result['non_2xx']})"
    ]
    cpu, cost = result["proxy_cpu"], result["cpu_us_per_request"]
    lines.append(
        f"  proxy CPU (cores busy): {cpu['1']:.2f} with one worker, {cpu['2']:.2f} with two; "
        f"CPU per request: {cost['1']:.0f} us and {cost['2']:.0f} us"
    )
    for i, r in enumerate(result["rounds"], 1):
        lines.append(f"  round {i}: {fmt(r['1']['rps'])} vs {fmt(r['2']['rps'])} req/s ({r['ratio']:.2f}x)")
    return lines
