"""
Soak: the listener under steady load for a long time, with agents churning,
sampling its memory (RSS) and open file descriptors.

    python -m benchmarks.soak                          # 10 minutes at half the peak
    python -m benchmarks.soak --duration 15 --peak-seconds 4 --warmup 5 --sample-every 1 --churn-every 3 --check
                                                       # the CI version (.ci/steps/60-fuzz.sh)

This process is the proxy: a L{ReverseConnectionFactory} on a UNIX socket
and a load generator that calls C{pool.send_request_headers} at a fixed
rate, as a real proxy would.  The agents are C{benchmarks/agent.c}
processes (compiled here with the system C compiler) that answer every
event at once.  Every C{--churn-every} seconds one agent process is killed
(SIGKILL and SIGTERM in turn), with requests in flight, and a new one
takes its place.

The rate is half the peak throughput measured first, in this same set-up
(C{--rate auto}, a closed loop of 64 requests in flight), or C{--rate N}
requests per second.

At the end it prints the samples, the least-squares slopes of RSS and of
open descriptors after the warm-up, and the accounting: every request
sent got exactly one outcome (answered, or "connection closed" for those
on a killed agent), nothing is left in flight or in the pool, and no
descriptor is left open.  With C{--check} it exits 1 if the accounting
fails, if descriptors grew, or if RSS grows faster than
C{--max-rss-slope} MiB per minute.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
_PAGE = os.sysconf("SC_PAGE_SIZE")



#: The share of requests the soak accepts being refused by back-pressure
#: (every connection of the agent write-blocked or paused).
MAX_PAUSED_SHARE = 0.05

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of C{(x, y)} points (0 for fewer than two)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def build_agent(workdir: str) -> str:
    binary = os.path.join(workdir, "soak-agent")
    cc = os.environ.get("CC", "cc")
    command = [cc, "-O2", "-o", binary, os.path.join(HERE, "agent.c")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"soak: compiling the load agent failed: {' '.join(command)}\n{done.stderr}")
    return binary


class Soak:
    def __init__(self, args: argparse.Namespace, reactor: Any, factory: Any, path: str, agent_binary: str) -> None:
        from sentinel_twisted import messages as m

        self.args = args
        self.reactor = reactor
        self.factory = factory
        self.pool = factory.pool
        self.path = path
        self.agent_binary = agent_binary
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.outcomes: Counter[str] = Counter()
        self.sent = 0
        self.refused = 0
        self.samples: list[dict[str, Any]] = []
        self.churned = 0
        self.event = m.RequestHeadersEvent(
            metadata=m.RequestMetadata(
                correlation_id="", request_id="soak", client_ip="203.0.113.1", client_port=1,
                timestamp="2026-01-01T00:00:00Z",
            ),
            method="GET",
            uri="/soak",
            headers={"host": ["example.com"], "user-agent": ["soak"]},
        )  # fmt: skip
        self._turn = 0
        self._ids = [f"soak-{i}" for i in range(args.agents)]

    # -- agents -------------------------------------------------------------------

    def start_agent(self, agent_id: str) -> None:
        self.agents[agent_id] = subprocess.Popen(
            [self.agent_binary, "--unix", self.path, "--mode", "serve", "--agent-id", agent_id,
             "--connections", str(self.args.connections)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop_agent(self, agent_id: str, signum: int) -> None:
        process = self.agents.pop(agent_id)
        process.send_signal(signum)
        process.wait(10)

    def churn(self) -> None:
        agent_id = self._ids[self.churned % len(self._ids)]
        self.stop_agent(agent_id, signal.SIGKILL if self.churned % 2 == 0 else signal.SIGTERM)
        self.churned += 1
        self.start_agent(agent_id)

    # -- requests -------------------------------------------------------------------

    def send_one(self) -> Any:
        ids = self.pool.agent_ids()
        if not ids:
            self.refused += 1
            return None
        self._turn += 1
        agent_id = ids[self._turn % len(ids)]
        self.sent += 1
        d = self.pool.send_request_headers(agent_id, self.event, correlation_id=f"s{self.sent}", timeout=10.0)
        d.addBoth(self._outcome)
        return d

    def _outcome(self, result: Any) -> None:
        from twisted.python.failure import Failure

        if isinstance(result, Failure):
            self.outcomes[type(result.value).__name__] += 1
        else:
            self.outcomes["answered"] += 1

    def ended(self) -> int:
        return sum(self.outcomes.values())

    # -- samples -----------------------------------------------------------------------

    def sample(self, started: float) -> None:
        self.samples.append(
            {
                "t": round(time.monotonic() - started, 2),
                "rss_mib": round(rss_bytes() / 2**20, 2),
                "fds": open_fds(),
                "connections": len(self.pool),
                "in_flight": self.pool.in_flight,
                "sent": self.sent,
                "answered": self.outcomes["answered"],
            }
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, inlineCallbacks
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.task import deferLater
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from sentinel_twisted.proxy.config import ReverseConnectionConfig
    from sentinel_twisted.proxy.factory import ReverseConnectionFactory
    from sentinel_twisted.tap import raise_file_limit

    # Without an observer twisted.logger keeps the first 65536 events in
    # memory, which would show up as growth.
    log_file = open(args.log, "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    raise_file_limit()
    workdir = tempfile.mkdtemp(prefix="sentinel-soak-")
    agent_binary = build_agent(workdir)
    path = os.path.join(workdir, "soak.sock")
    factory = ReverseConnectionFactory(ReverseConnectionConfig(request_timeout=10.0), clock=reactor)
    report: dict[str, Any] = {}

    def sleep(seconds: float) -> Deferred[None]:
        return deferLater(reactor, seconds, lambda: None)

    @inlineCallbacks
    def wait_for(condition: Any, what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what}")
            yield sleep(0.02)

    @inlineCallbacks
    def measure_peak(soak: Soak) -> Any:
        """Round trips per second with 64 requests in flight (closed loop)."""
        state = {"done": 0, "stop": False}

        def again(_: object) -> None:
            state["done"] += 1
            if not state["stop"]:
                d = soak.send_one()
                if d is not None:
                    d.addBoth(again)

        for _ in range(64):
            d = soak.send_one()
            if d is not None:
                d.addBoth(again)
        yield sleep(2.0)
        first, t0 = state["done"], time.monotonic()
        yield sleep(args.peak_seconds)
        rate = (state["done"] - first) / (time.monotonic() - t0)
        state["stop"] = True
        yield wait_for(lambda: soak.pool.in_flight == 0, "the peak run to finish", 30)
        return rate

    @inlineCallbacks
    def main() -> Any:
        port = yield serverFromString(reactor, f"unix:{path}:mode=600:backlog=1024").listen(factory)
        yield sleep(0.2)
        gc.collect()
        fds_baseline = open_fds()
        soak = Soak(args, reactor, factory, path, agent_binary)
        expected = args.agents * args.connections
        for agent_id in soak._ids:
            soak.start_agent(agent_id)
        yield wait_for(lambda: len(factory.pool) == expected, "the agents to register", 30)

        rate = args.rate
        peak = None
        if rate == "auto":
            peak = yield measure_peak(soak)
            rate = peak / 2
            print(f"soak: peak {peak:,.0f} round trips/s (64 in flight); soaking at {rate:,.0f}/s", file=sys.stderr)
        rate = float(rate)
        report.update(peak_rps=peak and round(peak), rate=round(rate))
        sent_before = soak.sent
        outcomes_before = Counter(soak.outcomes)

        started = time.monotonic()
        next_churn = started + args.churn_every
        next_sample = started
        sent_at_start = soak.sent
        max_in_flight = 0
        print(f"soak: {args.duration:g} s at {rate:,.0f} requests/s, {args.agents} agents x {args.connections} "
              f"connections, one agent replaced every {args.churn_every:g} s", file=sys.stderr)  # fmt: skip
        while True:
            now = time.monotonic()
            elapsed = now - started
            if elapsed >= args.duration:
                break
            due = int(rate * elapsed) - (soak.sent - sent_at_start)
            # Catch up after a slow iteration, but never in one huge burst.
            for _ in range(min(due, max(1, int(rate / 50)))):
                soak.send_one()
            max_in_flight = max(max_in_flight, factory.pool.in_flight)
            if now >= next_churn:
                soak.churn()
                next_churn += args.churn_every
            if now >= next_sample:
                soak.sample(started)
                next_sample += args.sample_every
            yield sleep(0.005)
        soak.sample(started)
        seconds = time.monotonic() - started
        achieved = (soak.sent - sent_at_start) / seconds

        # Wind down: let the last answers in, stop the agents, close up.
        yield wait_for(lambda: factory.pool.in_flight == 0, "requests in flight to end", 30)
        for agent_id in list(soak.agents):
            soak.stop_agent(agent_id, signal.SIGTERM)
        yield wait_for(lambda: len(factory.pool) == 0, "the agents to leave", 30)
        yield port.stopListening()
        yield sleep(0.5)
        gc.collect()
        fds_after = open_fds()

        warm = [s for s in soak.samples if s["t"] >= args.warmup]
        rss_slope = slope([(s["t"] / 60, s["rss_mib"]) for s in warm])
        fd_slope = slope([(s["t"] / 60, s["fds"]) for s in warm])
        report.update(
            duration=args.duration,
            seconds=round(seconds, 1),
            achieved_rps=round(achieved),
            answered_rps=round((soak.outcomes["answered"] - outcomes_before["answered"]) / seconds),
            agents=args.agents,
            connections_per_agent=args.connections,
            agents_replaced=soak.churned,
            max_in_flight=max_in_flight,
            sent=soak.sent - sent_before,
            outcomes=dict(soak.outcomes - outcomes_before),
            refused_no_agent=soak.refused,
            rss_start_mib=warm[0]["rss_mib"] if warm else None,
            rss_end_mib=soak.samples[-1]["rss_mib"],
            rss_max_mib=max(s["rss_mib"] for s in soak.samples),
            rss_slope_mib_per_min=round(rss_slope, 3),
            fds_baseline=fds_baseline,
            fds_max=max(s["fds"] for s in soak.samples),
            fds_after=fds_after,
            fd_slope_per_min=round(fd_slope, 3),
            warmup=args.warmup,
            samples=soak.samples,
        )
        problems = []
        if soak.ended() != soak.sent:
            problems.append(f"{soak.sent} request(s) sent, {soak.ended()} outcome(s)")
        # FlowControlPaused is back-pressure doing its job: when the machine
        # is busier than when the peak was measured, the agents fall behind,
        # stop reading, and their connections are routed around until none
        # is left for that agent.  A few are expected under overload; a
        # connection wrongly left unavailable would refuse far more.
        paused = soak.outcomes.get("FlowControlPaused", 0)
        if paused > MAX_PAUSED_SHARE * soak.sent:
            problems.append(
                f"{paused} of {soak.sent} requests refused as FlowControlPaused "
                f"(more than {MAX_PAUSED_SHARE:.0%})"
            )
        unexpected = {
            k: v
            for k, v in soak.outcomes.items()
            if k not in ("answered", "ConnectionClosed", "FlowControlPaused")
        }
        if unexpected:
            problems.append(f"unexpected outcomes: {unexpected}")
        if factory.pool.in_flight or len(factory.pool) or factory.awaiting_registration:
            problems.append("requests or connections left over")
        if fds_after > fds_baseline:
            problems.append(f"file descriptors: {fds_baseline} before, {fds_after} after")
        if args.check and rss_slope > args.max_rss_slope:
            problems.append(f"RSS grows {rss_slope:.2f} MiB/min (limit {args.max_rss_slope:g})")
        if args.check and abs(fd_slope) > args.max_fd_slope:
            problems.append(f"open descriptors drift {fd_slope:.2f}/min (limit {args.max_fd_slope:g})")
        report["problems"] = problems

    def stop(result: Any) -> None:
        from twisted.python.failure import Failure

        if isinstance(result, Failure):
            report["error"] = result.getTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(stop))
    try:
        reactor.run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        log_file.close()
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as the lines of BENCHMARKS.md's soak section."""
    peak = f"{report['peak_rps']:,} round trips/s measured first" if report.get("peak_rps") else "given"
    lines = [
        f"- {report['seconds']:g} s at {report['achieved_rps']:,} requests/s (half the peak: {peak}), "
        f"{report['agents']} C agents x {report['connections_per_agent']} connections, "
        f"{report['agents_replaced']} agent processes replaced (SIGKILL and SIGTERM in turn)",
        f"- {report['sent']:,} requests: {report['outcomes'].get('answered', 0):,} answered, "
        f"{report['outcomes'].get('ConnectionClosed', 0):,} failed with \"Connection closed\" on killed agents, "
        f"{report['outcomes'].get('FlowControlPaused', 0):,} refused by back-pressure, "
        f"{sum(v for k, v in report['outcomes'].items() if k not in ('answered', 'ConnectionClosed', 'FlowControlPaused'))} other; "
        f"at most {report['max_in_flight']:,} in flight",
        f"- RSS {report['rss_start_mib']} MiB after the {report['warmup']:g} s warm-up, {report['rss_end_mib']} MiB "
        f"at the end (max {report['rss_max_mib']}); slope **{report['rss_slope_mib_per_min']:+.3f} MiB/min**",
        f"- open descriptors: {report['fds_baseline']} before the agents, at most {report['fds_max']}, "
        f"{report['fds_after']} after; slope **{report['fd_slope_per_min']:+.3f}/min**",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of steady load (default 600)")
    parser.add_argument("--rate", default="auto", help="requests per second, or 'auto': half the measured peak")
    parser.add_argument("--peak-seconds", type=float, default=8.0, help="length of the peak measurement")
    parser.add_argument("--agents", type=int, default=4, help="agent processes")
    parser.add_argument("--connections", type=int, default=4, help="connections per agent")
    parser.add_argument("--churn-every", type=float, default=10.0, help="seconds between agent replacements")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slopes")
    parser.add_argument("--check", action="store_true", help="exit 1 on descriptor growth or RSS slope")
    parser.add_argument("--max-rss-slope", type=float, default=8.0, help="MiB per minute (with --check)")
    parser.add_argument("--max-fd-slope", type=float, default=20.0, help="descriptors per minute (with --check)")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--log", default=os.devnull, help="file for the library's log lines")
    args = parser.parse_args(argv)
    report = run(args)
    if "error" in report:
        sys.stderr.write(report["error"])
        return 2
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    print(markdown(report))
    for problem in report["problems"]:
        print(f"soak: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
