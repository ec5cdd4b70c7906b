"""
The reference section of the benchmarks: our proxy beside the reference
proxy, in one run, served by the same reference agents.

    python -m benchmarks.run --sections reference

Three contenders, each a proxy process that listens on a UNIX socket and
drives round trips from inside itself:

  - C{reference}: C{rust-proxy --listen ... --bench} from the reference
    peers (the reference crate's listener and pool, one worker thread);
  - C{ours}: L{benchmarks.driver} (our L{ReverseConnectionFactory} and
    C{pool.send_request_headers});
  - C{floor}: L{benchmarks.floor}, the least a Twisted proxy must do.

Each is served by the same agents: C{--agents} processes of the reference
C{rust-agent}, C{--connections} connections each, answering allow.  Every
measurement sends the RequestHeaders event of C{evt_request_headers.json};
the contenders alternate within each round (the order rotates from round
to round, so none is always first), and the medians of the rounds are
compared.  Ratios are ours / reference and ours / floor.

With C{--busy-poll N} a fourth contender, C{ours-busy-poll}, is our driver
with N microseconds of busy polling (L{sentinel_twisted.busypoll}).  With
C{--placement same} every process runs on CPU 0, with C{apart} the proxy
on CPU 0 and the agents on CPU 1: at concurrency 1 the round trip is
mostly the wake-ups, which cost a few microseconds on one CPU and tens
across two on a virtual machine, so where the scheduler puts the processes
moves p50 more than the proxy does.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

CONTENDERS = ("reference", "ours", "floor")
#: The contender measured besides the others with C{--busy-poll}.
BUSY = "ours-busy-poll"


def contenders(args: Any) -> tuple[str, ...]:
    return CONTENDERS + ((BUSY,) if args.busy_poll else ())
PEERS_ENV = "SENTINEL_PEERS"


def peers_dir(args: Any) -> str:
    from benchmarks.run import ROOT

    return args.peers or os.environ.get(PEERS_ENV) or os.path.join(ROOT, "..", "shared", "peers")


def missing_peers(peers: str) -> str | None:
    for name in ("rust-proxy", "rust-agent"):
        path = os.path.join(peers, name)
        if not os.access(path, os.X_OK):
            return f"no executable {path} (the reference peers; --peers or ${PEERS_ENV})"
    return None


def _wait_for_socket(path: str, child: Any, timeout: float = 30.0) -> None:
    from benchmarks.run import HarnessError

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if child.proc.poll() is not None:
            raise HarnessError(f"{child.name} exited ({child.proc.returncode}) before listening{child._tail()}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{child.name}: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.02)


class Contest:
    def __init__(self, harness: Any, peers: str) -> None:
        self.h = harness
        self.a = harness.args
        self.peers = peers
        self.expect = self.a.agents * self.a.connections
        placement = self.a.placement
        #: The CPUs of the proxies and of the agents (None: any).
        self.proxy_cpus = None if placement == "free" else {0}
        self.agent_cpus = {"free": None, "same": {0}, "apart": {1}}[placement]

    def agents(self, socket_path: str) -> list[Any]:
        return [
            self.h._spawn(
                [
                    os.path.join(self.peers, "rust-agent"),
                    "--connect", f"unix:{socket_path}",
                    "--agent-id", f"bench-{chr(97 + i)}",
                    "--connections", str(self.a.connections),
                    "--quiet",
                ],
                f"rust-agent {i + 1}",
                self.agent_cpus,
            )
            for i in range(self.a.agents)
        ]

    def socket_path(self, name: str) -> str:
        self.h.serial += 1
        return os.path.join(self.h.workdir, f"{name}-{self.h.serial}.sock")

    def measure(self, contender: str, level: int) -> dict[str, Any]:
        a = self.a
        sizes = ["--requests", str(a.requests), "--warmup", str(a.warmup)]
        agents: list[Any] = []
        if contender == "reference":
            path = self.socket_path("reference")
            proxy = self.h._spawn(
                [
                    os.path.join(self.peers, "rust-proxy"),
                    "--listen", f"unix:{path}",
                    "--expect-agents", str(self.expect),
                    "--expect-timeout-ms", "30000",
                    "--bench", "--concurrency", str(level), *sizes,
                    "--exit",
                ],
                "rust-proxy",
                self.proxy_cpus,
            )
        elif contender in ("ours", BUSY):
            busy = ["--busy-poll", str(a.busy_poll)] if contender == BUSY else []
            proxy, where = self.h.start_proxy(
                "unix", "roundtrip", "--expect", str(self.expect), "--levels", str(level), *sizes, *busy,
                cpus=self.proxy_cpus,
            )
            path = where[1]
        else:
            path = self.socket_path("floor")
            proxy = self.h._spawn(
                [
                    sys.executable, "-m", "benchmarks.floor",
                    "--listen", f"unix:{path}",
                    "--expect", str(self.expect),
                    "--levels", str(level),
                    "--reactor", a.reactor,
                    "--vectors", self.h.vectors,
                    *sizes,
                ],
                "floor",
                self.proxy_cpus,
            )
        try:
            _wait_for_socket(path, proxy)
            agents = self.agents(path)
            line = proxy.expect_where(lambda item: "concurrency" in item and "rps" in item, "benchmark result", 600)
        finally:
            self.h._reap(proxy, *agents)
        from benchmarks.run import HarnessError

        if line.get("errors"):
            raise HarnessError(f"{contender}: {line['errors']} request(s) failed ({line.get('first_error')})")
        if contender == "reference":
            cpu = line["proxy_cpu_s"] / line["elapsed_s"] if line.get("elapsed_s") else 0.0
        else:
            cpu = line["proxy_cpu"]
        return {
            "concurrency": level,
            "rps": line["rps"],
            "p50_us": line["p50_us"],
            "p99_us": line["p99_us"],
            "proxy_cpu": cpu,
        }


def alternate(
    harness: Any, contenders: tuple[str, ...], measure: Any, section: str
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], dict[str, dict[str, dict[str, float]]]]:
    """
    C{measure(contender, level)} for every level and round, the contenders
    alternating within a round and their order rotating from round to
    round; returns every measurement and the medians per contender and
    level.
    """
    a = harness.args
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {str(level): [] for level in a.levels} for c in contenders}
    count = len(contenders)
    for level in a.levels:
        for r in range(a.runs):
            harness.host.checkpoint(f"{section}: concurrency {level}, round {r + 1}")
            for contender in contenders[r % count :] + contenders[: r % count]:
                harness.log(f"{section}: {contender} at concurrency {level}, round {r + 1}/{a.runs}")
                runs[contender][str(level)].append(measure(contender, level))
    median = {
        c: {
            level: {k: statistics.median(m[k] for m in results) for k in ("rps", "p50_us", "p99_us", "proxy_cpu")}
            for level, results in by_level.items()
        }
        for c, by_level in runs.items()
    }
    return runs, median


def run(harness: Any) -> dict[str, Any]:
    a = harness.args
    peers = peers_dir(a)
    why = missing_peers(peers)
    if why is not None:
        harness.log(f"reference: skipped: {why}")
        return {"skipped": why}
    runs, median = alternate(harness, contenders(a), Contest(harness, peers).measure, "reference")
    ratios = {
        level: {
            **(
                {
                    "busy_p50_vs_reference": median[BUSY][level]["p50_us"] / median["reference"][level]["p50_us"],
                    "busy_rps_vs_reference": median[BUSY][level]["rps"] / median["reference"][level]["rps"],
                }
                if BUSY in median
                else {}
            ),
            "rps_vs_reference": median["ours"][level]["rps"] / median["reference"][level]["rps"],
            "p50_vs_reference": median["ours"][level]["p50_us"] / median["reference"][level]["p50_us"],
            "p99_vs_reference": median["ours"][level]["p99_us"] / median["reference"][level]["p99_us"],
            "rps_vs_floor": median["ours"][level]["rps"] / median["floor"][level]["rps"],
            "floor_vs_reference": median["floor"][level]["rps"] / median["reference"][level]["rps"],
        }
        for level in median["ours"]
    }
    return {
        "runs": runs,
        "median": median,
        "ratios": ratios,
        "agents": f"{a.agents} rust-agent processes x {a.connections} connections",
        "requests": a.requests,
        "warmup": a.warmup,
        "rounds": a.runs,
        "placement": a.placement,
        "busy_poll_us": a.busy_poll,
    }


def report(section: dict[str, Any], fmt: Any) -> list[str]:
    if section.get("skipped"):
        return ["", f"reference: not measured ({section['skipped']})"]
    lines = [
        "",
        f"against the reference proxy, same run ({section['agents']}, {section['requests']:,} round trips "
        f"after {section['warmup']:,}, median of {section['rounds']} alternating rounds"
        + ("" if section.get("placement", "free") == "free" else f", placement {section['placement']}")
        + ")",
        "| concurrency | reference /s | ours /s | ours / ref | floor /s | ours / floor "
        "| p50 us ref / ours / floor | p99 us ref / ours / floor | proxy CPU ref / ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    med = section["median"]
    for level, ratio in section["ratios"].items():
        ref, ours, floor = med["reference"][level], med["ours"][level], med["floor"][level]
        lines.append(
            f"| {level} | {fmt(ref['rps'])} | {fmt(ours['rps'])} | {ratio['rps_vs_reference']:.2f}x "
            f"| {fmt(floor['rps'])} | {ratio['rps_vs_floor']:.2f}x "
            f"| {fmt(ref['p50_us'], 1)} / {fmt(ours['p50_us'], 1)} / {fmt(floor['p50_us'], 1)} "
            f"| {fmt(ref['p99_us'], 1)} / {fmt(ours['p99_us'], 1)} / {fmt(floor['p99_us'], 1)} "
            f"| {ref['proxy_cpu']:.0%} / {ours['proxy_cpu']:.0%} |"
        )
    if BUSY in med:
        lines += [
            "",
            f"ours with --busy-poll {section['busy_poll_us']} (same run)",
            "| concurrency | ours-busy-poll /s | / ref | p50 us | / ref | p99 us | proxy CPU |",
            "|---|---|---|---|---|---|---|",
        ]
        for level, ratio in section["ratios"].items():
            busy = med[BUSY][level]
            lines.append(
                f"| {level} | {fmt(busy['rps'])} | {ratio['busy_rps_vs_reference']:.2f}x "
                f"| {fmt(busy['p50_us'], 1)} | {ratio['busy_p50_vs_reference']:.2f}x "
                f"| {fmt(busy['p99_us'], 1)} | {busy['proxy_cpu']:.0%} |"
            )
    return lines
