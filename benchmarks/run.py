"""
The benchmark harness: our proxy and the load agents as separate processes.

    python -m benchmarks.run            # the full run (several minutes)
    python -m benchmarks.run --quick    # a smoke run with tiny sizes (seconds)

The proxy is L{benchmarks.driver} (a L{ReverseConnectionFactory} plus a
load generator calling C{pool.send_request_headers}); the agents are
C{benchmarks/agent.c}, compiled here with the system C compiler, which
register and answer every event with a pre-encoded allow AgentResponse.
Results are printed as a table and as JSON (also written to C{--json}).
See BENCHMARKS.md for what each section measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

from benchmarks.host import HostMonitor, cpu_model
from benchmarks.host import report as host_report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTIONS = ("roundtrip", "timeouts", "register", "memory", "burst", "reactors", "gateway", "reference", "forward", "workers")

# Our own targets (issue 5).  Comparisons with the reference come only from
# the reference section, measured in the same run (issue 13).
TARGET_RPS_64 = 97_000
TARGET_P50_1_US = 60.0
TARGET_BYTES_PER_CONN = 4096
TARGET_BURST = 10_000
TARGET_REG_RATE = 5_000
TARGET_TIMEOUT_COST = 0.05
TARGET_GATEWAY_RATIO = 0.80
# Against the reference proxy and the floor, measured in the same run.
TARGET_VS_REFERENCE_64 = 1.0
TARGET_P50_VS_REFERENCE_1 = 1.2
TARGET_VS_FLOOR_64 = 0.9
TARGET_GATEWAY_REFERENCE = {"reference_headers": 0.85, "reference_four_events": 0.65}


class HarnessError(Exception):
    pass


# ---------------------------------------------------------------------------
# Processes


class Child:
    """A child process whose stdout lines (JSON objects) arrive in a queue."""

    def __init__(
        self, argv: list[str], name: str, env: dict[str, str] | None = None, cpus: set[int] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        if cpus is not None:
            # Only the CPUs given (--placement of the reference section),
            # set before the program starts any thread.
            taskset = shutil.which("taskset")
            if taskset is None:
                raise HarnessError("--placement needs taskset (util-linux)")
            argv = [taskset, "--cpu-list", ",".join(map(str, sorted(cpus))), *argv]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.stderr.append(line)
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next line whose C{event} is C{event}; an C{error} line or
        the process's exit raises L{HarnessError}."""
        return self.expect_where(lambda item: item.get("event") == event, repr(event), timeout)

    def expect_where(self, wanted: Any, what: str, timeout: float) -> dict[str, Any]:
        """The next line for which C{wanted(line)} holds; an C{error} line
        or the process's exit raises L{HarnessError}."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(f"{self.name}: no {what} within {timeout:.0f} s{self._tail()}")
            try:
                item = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is None:
                self.proc.wait()
                raise HarnessError(
                    f"{self.name} exited ({self.proc.returncode}) before {what}{self._tail()}"
                )
            if item.get("event") == "error":
                raise HarnessError(f"{self.name}: {item.get('error')}{self._tail()}")
            if wanted(item):
                return item

    def _tail(self) -> str:
        time.sleep(0.1)
        tail = "\n".join(self.stderr[-15:])
        return f"\n--- {self.name} stderr ---\n{tail}" if tail else ""

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="sentinel-bench-")
        self.agent_bin = os.path.join(self.workdir, "bench-agent")
        self.children: list[Child] = []
        self.serial = 0
        self.vectors = args.vectors or os.environ.get("SENTINEL_VECTORS") or os.path.join(ROOT, "tests", "data", "vectors")
        #: Steal and calibration between measurements (L{benchmarks.host}).
        self.host = HostMonitor()

    def close(self) -> None:
        for child in self.children:
            child.stop()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def build_agent(self) -> None:
        cc = os.environ.get("CC", "cc")
        source = os.path.join(HERE, "agent.c")
        cmd = [cc, "-O2", "-Wall", "-o", self.agent_bin, source]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"compiling the load agent failed: {' '.join(cmd)}\n{result.stderr}")

    def _spawn(self, argv: list[str], name: str, cpus: set[int] | None = None) -> Child:
        child = Child(argv, name, cpus=cpus)
        self.children.append(child)
        return child

    def _reap(self, *children: Child) -> None:
        for child in children:
            child.stop()
            if child in self.children:
                self.children.remove(child)

    def start_proxy(
        self, transport: str, scenario: str, *extra: str, reactor: str | None = None, cpus: set[int] | None = None
    ) -> tuple[Child, list[str]]:
        """Start the proxy driver; returns it and the agents' address options."""
        self.serial += 1
        if transport == "unix":
            listen = f"unix:{self.workdir}/proxy-{self.serial}.sock"
        else:
            listen = "tcp:0:interface=127.0.0.1"
        argv = [
            sys.executable, "-m", "benchmarks.driver",
            "--listen", listen,
            "--scenario", scenario,
            "--reactor", reactor or self.args.reactor,
            "--log", os.path.join(self.workdir, f"proxy-{self.serial}.log"),
            "--vectors", self.vectors,
            *extra,
        ]
        proxy = self._spawn(argv, f"proxy({scenario}, {transport})", cpus)
        listening = proxy.expect("listening", 60)
        address = listening["address"]
        where = ["--unix", address] if transport == "unix" else ["--tcp", address]
        return proxy, where

    def start_agent(self, where: list[str], *extra: str) -> Child:
        return self._spawn([self.agent_bin, *where, *extra], "agent")

    # -- sections -----------------------------------------------------------

    def roundtrip_once(
        self,
        transport: str,
        levels: Iterable[int],
        requests: int,
        warmup: int,
        variants: str = "table",
        rounds: int = 1,
        reactor: str | None = None,
        timeout_seconds: float | None = None,
    ) -> list[dict[str, Any]]:
        extra = [
            "--expect", str(self.args.agents * self.args.connections),
            "--levels", ",".join(str(x) for x in levels),
            "--requests", str(requests),
            "--warmup", str(warmup),
            "--variants", variants,
            "--rounds", str(rounds),
        ]
        if timeout_seconds is not None:
            extra += ["--request-timeout", str(timeout_seconds)]
        proxy, where = self.start_proxy(transport, "roundtrip", *extra, reactor=reactor)
        agents = [
            self.start_agent(where, "--agent-id", f"bench-{chr(97 + i)}", "--connections", str(self.args.connections))
            for i in range(self.args.agents)
        ]
        try:
            proxy.expect("ready", 60)
            steps = len(list(levels)) * len([v for v in variants.split(",") if v]) * rounds
            results = [proxy.expect("level", 600) for _ in range(steps)]
        finally:
            self._reap(proxy, *agents)
        for r in results:
            r["transport"] = transport
            if r["errors"]:
                raise HarnessError(f"{r['errors']} request(s) failed: {r['first_error']}")
        return results

    def section_roundtrip(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"runs": {}, "median": {}}
        for transport in a.transports:
            runs = []
            for i in range(a.runs):
                self.log(f"roundtrip over {transport}, run {i + 1}/{a.runs}")
                runs.append(self.roundtrip_once(transport, a.levels, a.requests, a.warmup))
            out["runs"][transport] = runs
            out["median"][transport] = {
                str(level): median_of([r for run in runs for r in run if r["concurrency"] == level])
                for level in a.levels
            }
        return out

    def section_timeouts(self) -> dict[str, Any]:
        a = self.args
        self.log("timeouts: pending table vs no timeout vs DelayedCall per request")
        results = self.roundtrip_once(
            "unix", [a.timeout_level], a.requests, a.warmup,
            variants="table,table@1,none,delayedcall", rounds=a.runs,
        )
        by: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            by.setdefault(r["variant"], []).append(r)
        med = {v: median_of(rs) for v, rs in by.items()}
        off = med["none"]["rps"]
        return {
            "concurrency": a.timeout_level,
            "results": results,
            "median": med,
            "timeouts_cost": 1 - med["table"]["rps"] / off,
            "timeouts_cost_1s": 1 - med["table@1"]["rps"] / off,
            "delayedcall_cost": 1 - med["delayedcall"]["rps"] / off,
        }

    def section_reactors(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"runs": {}, "median": {}}
        for reactor in a.reactors:
            runs = []
            for i in range(a.runs):
                self.log(f"reactor {reactor}, run {i + 1}/{a.runs}")
                try:
                    runs.append(self.roundtrip_once("unix", [1, 64], a.requests, a.warmup, reactor=reactor))
                except HarnessError as e:
                    out["median"][reactor] = {"error": str(e).splitlines()[0]}
                    break
            else:
                out["runs"][reactor] = runs
                out["median"][reactor] = {
                    str(level): median_of([r for run in runs for r in run if r["concurrency"] == level])
                    for level in (1, 64)
                }
        return out

    def section_register(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"runs": {}, "median": {}}
        for transport in a.transports:
            runs = []
            for i in range(a.runs):
                self.log(f"registrations over {transport}, run {i + 1}/{a.runs}")
                proxy, where = self.start_proxy(transport, "register", "--expect", str(a.registrations))
                agent = self.start_agent(
                    where, "--mode", "churn", "--total", str(a.registrations),
                    "--parallel", str(a.register_parallel), "--agent-id", "reg", "--per-agent", "1",
                )
                try:
                    proxy_result = proxy.expect("register", 300)
                    agent_result = agent.expect("churn", 60)
                finally:
                    self._reap(proxy, agent)
                if agent_result["failed"] or agent_result["registered"] != a.registrations:
                    raise HarnessError(f"registrations failed: {agent_result}")
                runs.append(
                    {
                        "registrations": a.registrations,
                        "parallel": a.register_parallel,
                        "rate": agent_result["registered"] / agent_result["seconds"],
                        "proxy_rate": proxy_result["rate"],
                        "proxy_cpu": proxy_result["proxy_cpu"],
                        "agent_cpu": (agent_result["cpu_user"] + agent_result["cpu_sys"]) / agent_result["seconds"],
                    }
                )
            out["runs"][transport] = runs
            out["median"][transport] = median_of(runs)
        return out

    def hold_once(self, transport: str, count: int, per_agent: int, backlog: int | None) -> dict[str, Any]:
        extra = ["--expect", str(count), "--max-seconds", "300"]
        if backlog is not None:
            extra += ["--backlog", str(backlog)]
        proxy, where = self.start_proxy(transport, "hold", *extra)
        agent = self.start_agent(
            where, "--mode", "serve", "--connections", str(count),
            "--agent-id", "hold", "--per-agent", str(per_agent), "--max-seconds", "300",
        )
        try:
            result = proxy.expect("hold", 320)
            agent_result = agent.expect("registered", 30)
        finally:
            self._reap(proxy, agent)
        result["agent"] = agent_result
        result["transport"] = transport
        return result

    def section_memory(self) -> dict[str, Any]:
        a = self.args
        runs = []
        for i in range(a.runs):
            self.log(f"memory: {a.idle_connections} idle connections, run {i + 1}/{a.runs}")
            runs.append(self.hold_once("unix", a.idle_connections, 4, None))
        return {"runs": runs, "median": median_of(runs)}

    def section_burst(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {}
        for transport in a.transports:
            self.log(f"burst: {a.burst} connections at once over {transport}")
            out[transport] = self.hold_once(transport, a.burst, 4, None)
        return out

    def section_gateway(self) -> dict[str, Any]:
        from benchmarks import gateway

        return gateway.run(self)

    def section_reference(self) -> dict[str, Any]:
        from benchmarks import reference

        return reference.run(self)

    def section_forward(self) -> dict[str, Any]:
        from benchmarks import forward

        return forward.run(self)

    def section_workers(self) -> dict[str, Any]:
        from benchmarks import workers

        return workers.run(self)


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of the numeric fields of several results."""
    if not results:
        return {}
    out: dict[str, Any] = {}
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(values)
        elif key in ("variant", "transport", "reactor"):
            out[key] = value
    out["n"] = len(results)
    return out


# ---------------------------------------------------------------------------
# Report


def cpu_idle() -> dict[str, Any]:
    """
    How an idle CPU waits: the cpuidle driver and governor, and with the
    C{haltpoll} driver (KVM guests) how long a vCPU polls before it halts.
    On a virtual machine a halted vCPU is slow to wake (an exit to the
    hypervisor and an interrupt), which weighs on every round trip that
    finds the other side idle; see BENCHMARKS.md, "The hypervisor's idle".
    """
    base = "/sys/devices/system/cpu/cpuidle"
    out: dict[str, Any] = {}
    for key, path in (
        ("driver", f"{base}/current_driver"),
        ("governor", f"{base}/current_governor"),
        ("halt_poll_ns", "/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
    ):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        out[key] = int(value) if key == "halt_poll_ns" and value.isdigit() else value
    return out


def cpu_idle_text(idle: dict[str, Any]) -> str:
    """One line for the report's machine header."""
    if not idle:
        return "cpuidle: unknown"
    text = f"cpuidle: {idle.get('driver', '?')} driver, {idle.get('governor', '?')} governor"
    if "halt_poll_ns" in idle:
        polls = idle["halt_poll_ns"]
        text += f", guest halt polling {polls} ns" + (" (an idle vCPU halts at once)" if polls == 0 else "")
    return text


def machine() -> dict[str, Any]:
    model = cpu_model() or "unknown"
    import msgspec

    import twisted

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "twisted": twisted.__version__,
        "msgspec": msgspec.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpuidle": cpu_idle(),
    }


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(name: str, target: str, measured: Any, met: bool | None, unit: str = "") -> None:
        rows.append({"target": name, "goal": target, "measured": measured, "unit": unit, "met": met})

    rt = results.get("roundtrip", {}).get("median", {}).get("unix", {})
    if "64" in rt:
        add("round trips/s at concurrency 64 (UNIX)", f">= {TARGET_RPS_64:,}", round(rt["64"]["rps"]), rt["64"]["rps"] >= TARGET_RPS_64, "/s")
    if "1" in rt:
        add("p50 at concurrency 1 (UNIX)", f"<= {TARGET_P50_1_US:.0f} us", round(rt["1"]["p50_us"], 1), rt["1"]["p50_us"] <= TARGET_P50_1_US, "us")
    mem = results.get("memory", {}).get("median")
    if mem:
        b = mem["bytes_per_connection"]
        add("RSS per idle registered connection", f"<= {TARGET_BYTES_PER_CONN} B", round(b), b <= TARGET_BYTES_PER_CONN, "B")
    burst = results.get("burst", {})
    for transport, r in burst.items():
        ok = r["connections"] >= TARGET_BURST
        add(f"registered connections held, opened as a burst ({transport})", f">= {TARGET_BURST:,}", r["connections"], ok)
    reg = results.get("register", {}).get("median", {}).get("unix")
    if reg:
        add("registrations/s (UNIX)", f">= {TARGET_REG_RATE:,}", round(reg["rate"]), reg["rate"] >= TARGET_REG_RATE, "/s")
    to = results.get("timeouts")
    if to:
        add("throughput cost of per-request timeouts", f"<= {TARGET_TIMEOUT_COST:.0%}", f"{to['timeouts_cost']:.1%}", to["timeouts_cost"] <= TARGET_TIMEOUT_COST)
    ref = results.get("reference")
    if ref and ref.get("ratios"):
        ratios = ref["ratios"]
        if "64" in ratios:
            r = ratios["64"]["rps_vs_reference"]
            add("round trips/s at 64, ours / reference (same run)", f">= {TARGET_VS_REFERENCE_64:.1f}x", f"{r:.2f}x", r >= TARGET_VS_REFERENCE_64)
            r = ratios["64"]["rps_vs_floor"]
            add("round trips/s at 64, ours / floor (same run)", f">= {TARGET_VS_FLOOR_64:.1f}x", f"{r:.2f}x", r >= TARGET_VS_FLOOR_64)
        if "1" in ratios:
            r = ratios["1"]["p50_vs_reference"]
            add("p50 at 1, ours / reference (same run)", f"<= {TARGET_P50_VS_REFERENCE_1:.1f}x", f"{r:.2f}x", r <= TARGET_P50_VS_REFERENCE_1)
            if "busy_p50_vs_reference" in ratios["1"]:
                r = ratios["1"]["busy_p50_vs_reference"]
                add(
                    f"p50 at 1, ours with --busy-poll {ref['busy_poll_us']} / reference (same run)",
                    f"<= {TARGET_P50_VS_REFERENCE_1:.1f}x", f"{r:.2f}x", r <= TARGET_P50_VS_REFERENCE_1,
                )
    elif ref:
        add("round trips/s at 64, ours / reference (same run)", f">= {TARGET_VS_REFERENCE_64:.1f}x", ref.get("skipped", "not measured"), None)
    gw = results.get("gateway")
    for name, ratio in (gw or {}).get("reference_ratios", {}).items():
        from benchmarks.gateway import REFERENCE_CASES

        goal = TARGET_GATEWAY_REFERENCE[name]
        events = dict(REFERENCE_CASES)[name]
        add(f"gateway req/s with one reference agent (events {events}) vs no agent", f">= {goal:.0%}", f"{ratio:.1%}", ratio >= goal)
    if gw and gw.get("ratio") is not None:
        add("gateway req/s with one agent vs no agent", f">= {TARGET_GATEWAY_RATIO:.0%}", f"{gw['ratio']:.1%}", gw["ratio"] >= TARGET_GATEWAY_RATIO)
    elif gw:
        add("gateway req/s with one agent vs no agent", f">= {TARGET_GATEWAY_RATIO:.0%}", gw.get("skipped", "not measured"), None)
    return rows


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    m = results["machine"]
    lines.append(f"machine: {m['nproc']} x {m['cpu']}, Python {m['python']}, Twisted {m['twisted']}, msgspec {m['msgspec']}, {m['date']}")
    lines.append(cpu_idle_text(m.get("cpuidle", {})))
    settings = results["settings"]
    # Each section names its own agents (the reference section: the reference
    # rust-agent); the C agents serve the sections that measure ours alone.
    lines.append(
        f"reactor: {settings['reactor']}; agents of our own sections: {settings['agents']} C processes "
        f"x {settings['connections']} connections"
    )
    rt = results.get("roundtrip")
    if rt:
        lines.append("")
        lines.append("round trips (RequestHeaders ~700 B -> allow AgentResponse), median of runs")
        lines.append("| transport | concurrency | round trips/s | p50 us | p90 us | p99 us | proxy CPU | agents CPU |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for transport, levels in rt["median"].items():
            for level, r in levels.items():
                lines.append(
                    f"| {transport} | {level} | {fmt(r['rps'])} | {fmt(r['p50_us'], 1)} | {fmt(r['p90_us'], 1)} | "
                    f"{fmt(r['p99_us'], 1)} | {r['proxy_cpu']:.0%} | {r['agents_cpu']:.0%} |"
                )
    to = results.get("timeouts")
    if to:
        lines.append("")
        lines.append(f"per-request timeouts at concurrency {to['concurrency']} (UNIX), median of rounds")
        lines.append("| pending table | round trips/s | p50 us | p99 us |")
        lines.append("|---|---|---|---|")
        names = {
            "table": "PendingTable, 30 s timeout (the default)",
            "table@1": "PendingTable, 1 s timeout (its timer fires every second)",
            "none": "no timeouts (a dict only)",
            "delayedcall": "a DelayedCall per request, 30 s timeout",
        }
        for v in ("none", "table", "table@1", "delayedcall"):
            r = to["median"][v]
            lines.append(f"| {names[v]} | {fmt(r['rps'])} | {fmt(r['p50_us'], 1)} | {fmt(r['p99_us'], 1)} |")
        lines.append(
            f"cost of timeouts: {to['timeouts_cost']:.1%} (PendingTable), {to['timeouts_cost_1s']:.1%} "
            f"(PendingTable, 1 s), {to['delayedcall_cost']:.1%} (DelayedCall per request)"
        )
    rx = results.get("reactors")
    if rx:
        lines.append("")
        lines.append("reactors (UNIX), median of runs")
        lines.append("| reactor | /s at 1 | p50 us at 1 | /s at 64 | p99 us at 64 |")
        lines.append("|---|---|---|---|---|")
        for name, r in rx["median"].items():
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | | | |")
                continue
            lines.append(f"| {name} | {fmt(r['1']['rps'])} | {fmt(r['1']['p50_us'], 1)} | {fmt(r['64']['rps'])} | {fmt(r['64']['p99_us'], 1)} |")
    reg = results.get("register")
    if reg:
        lines.append("")
        lines.append("registration handshakes (connect, register, close; 64 at once), median of runs")
        for transport, r in reg["median"].items():
            lines.append(f"  {transport}: {fmt(r['rate'])}/s (proxy CPU {r['proxy_cpu']:.0%}, agent CPU {r['agent_cpu']:.0%})")
    mem = results.get("memory")
    if mem:
        r = mem["median"]
        lines.append("")
        lines.append(
            f"memory: {fmt(r['connections'])} idle registered connections: {fmt(r['bytes_per_connection'])} B of RSS each"
        )
    burst = results.get("burst")
    if burst:
        for transport, r in burst.items():
            lines.append(
                f"burst ({transport}): {fmt(r['connections'])} connections opened at once, all registered in {r['seconds']:.2f} s "
                f"(backlog {r['backlog']}, file limit {r['file_limit']}, {r['agent']['connect_retries']} connect retries, "
                f"rejections {r['rejections'] or 'none'}), {fmt(r['bytes_per_connection'])} B RSS each"
            )
    gw = results.get("gateway")
    if gw:
        lines.append("")
        if gw.get("skipped"):
            lines.append(f"gateway: not measured ({gw['skipped']})")
        else:
            lines.append(
                f"gateway (wrk, {gw['connections']} connections): no agent {fmt(gw['no_agent_rps'])} req/s, "
                f"one agent {fmt(gw['one_agent_rps'])} req/s, ratio {gw['ratio']:.1%}"
            )
            for name, ratio in gw.get("reference_ratios", {}).items():
                from benchmarks.gateway import REFERENCE_CASES

                events = dict(REFERENCE_CASES)[name]
                lines.append(f"  with one reference agent (events {events}): {ratio:.1%} of the no-agent rate")
    if results.get("reference"):
        from benchmarks import reference

        lines.extend(reference.report(results["reference"], fmt))
    if results.get("forward"):
        from benchmarks import forward

        lines.extend(forward.report(results["forward"], fmt))
    if results.get("workers"):
        from benchmarks import workers

        lines.extend(workers.report(results["workers"], fmt))
    lines.append("")
    hosts = results.get("host", {})
    for section, host in hosts.items():
        lines.extend(host_report(section, host))
    contended = [section for section, host in hosts.items() if host["contended"]]
    lines.append("")
    lines.append("targets" + (f" (measured on a contended host in {', '.join(contended)}: no verdict)" if contended else ""))
    lines.append("| target | goal | measured | met |")
    lines.append("|---|---|---|---|")
    for row in results["targets"]:
        met = "yes" if row["met"] else ("no" if row["met"] is False else "-")
        lines.append(f"| {row['target']} | {row['goal']} | {fmt(row['measured'])} {row['unit']} | {met} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test of the harness")
    p.add_argument("--sections", default=",".join(s for s in SECTIONS if s != "reactors"),
                   help=f"comma-separated, from {', '.join(SECTIONS)} (default: all but reactors)")
    p.add_argument("--transports", default="unix,tcp")
    p.add_argument("--levels", default="1,16,64,256")
    p.add_argument("--requests", type=int, default=200_000, help="measured round trips per level")
    p.add_argument("--warmup", type=int, default=None, help="round trips before measuring (default requests/10)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--agents", type=int, default=2, help="agent processes")
    p.add_argument("--connections", type=int, default=4, help="connections per agent process")
    p.add_argument("--timeout-level", type=int, default=64)
    p.add_argument("--registrations", type=int, default=20_000)
    p.add_argument("--register-parallel", type=int, default=64)
    p.add_argument("--idle-connections", type=int, default=5_000)
    p.add_argument("--burst", type=int, default=10_000)
    p.add_argument("--reactor", default="epoll", help="reactor of the proxy (epoll, poll, asyncio, uvloop)")
    p.add_argument("--reactors", default="epoll,asyncio,uvloop", help="reactors compared by the reactors section")
    p.add_argument("--gateway-duration", type=float, default=10.0, help="seconds of wrk load per gateway measurement")
    p.add_argument("--gateway-connections", type=int, default=64)
    p.add_argument("--vectors", default=None, help="vectors directory (default tests/data/vectors or $SENTINEL_VECTORS)")
    p.add_argument("--busy-poll", type=int, default=0, metavar="MICROSECONDS",
                   help="reference section: also measure ours with this much busy polling (ours-busy-poll)")
    p.add_argument("--placement", choices=("free", "same", "apart"), default="free",
                   help="reference section: CPUs of the proxies and agents: free (the scheduler's choice), "
                   "same (all on CPU 0) or apart (proxy on CPU 0, agents on CPU 1)")
    p.add_argument("--peers", default=None, help="the reference peers (default ../shared/peers or $SENTINEL_PEERS)")
    p.add_argument("--json", default=os.path.join(ROOT, "build", "bench-results.json"), help="write all results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, sockets)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 2_000)
        args.runs = 1
        args.registrations = min(args.registrations, 300)
        args.idle_connections = min(args.idle_connections, 200)
        args.burst = min(args.burst, 400)
        args.gateway_duration = min(args.gateway_duration, 1.0)
        args.reactors = "epoll"
    if args.warmup is None:
        args.warmup = max(100, args.requests // 10)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    args.transports = [t for t in args.transports.split(",") if t]
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.reactors = [r for r in args.reactors.split(",") if r]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness = Harness(args)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("json",)
        },
    }
    try:
        harness.build_agent()
        for section in args.sections:
            first = len(harness.host.checkpoints)
            harness.host.checkpoint(f"{section}: start")
            results[section] = getattr(harness, f"section_{section}")()
            harness.host.checkpoint(f"{section}: end")
            results.setdefault("host", {})[section] = harness.host.section(first)
    except HarnessError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    finally:
        harness.close()
    results["targets"] = targets(results)
    text = report(results)
    print(text)
    summary = {k: v for k, v in results.items() if k not in ("roundtrip", "reactors", "timeouts", "register", "memory")}
    for key in ("roundtrip", "reactors", "register"):
        if key in results:
            summary[key] = results[key]["median"]
    if "timeouts" in results:
        summary["timeouts"] = {k: v for k, v in results["timeouts"].items() if k != "results"}
    if "memory" in results:
        summary["memory"] = results["memory"]["median"]
    print(json.dumps(summary, indent=1, sort_keys=True))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        print(f"all results: {args.json}", file=sys.stderr)
    if results.get("gateway", {}).get("failed"):
        print("benchmark failed: the gateway section could not measure", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
