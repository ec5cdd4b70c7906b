"""
The forward section of the benchmarks: our pool dialling listening agents
(forward mode, JSON and MessagePack) beside our listener taking agents
that dial in (reverse mode), in one run.

    python -m benchmarks.run --sections forward

Three contenders, each our proxy driver (L{benchmarks.driver}, the same
C{pool.send_request_headers} closed loop) served by C{--agents} reference
agent processes of C{--connections} connections each:

  - C{reverse}: C{rust-agent} processes dial our listener and register;
  - C{forward-json}: our pool dials C{rust-fwd-agent --encoding both}
    processes offering JSON only;
  - C{forward-msgpack}: the same, offering MessagePack first.

Every measurement sends the RequestHeaders event of
C{evt_request_headers.json} (it carries a C{traceparent}, so even the
reference's own MessagePack path could carry it); the contenders alternate
within each round, the order rotating from round to round, and the medians
of the rounds are compared.  The agents differ between the modes (the
reverse one is a small loop of the peers' own, the forward one the crate's
C{UdsAgentServerV2}, which answers one event at a time per connection), so
the ratio says what an operator gets from each mode, not what our code
costs in each.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.reference import _wait_for_socket, alternate, missing_peers, peers_dir

CONTENDERS = ("reverse", "forward-json", "forward-msgpack")


class Contest:
    def __init__(self, harness: Any, peers: str) -> None:
        self.h = harness
        self.a = harness.args
        self.peers = peers
        self.expect = self.a.agents * self.a.connections

    def forward_agents(self) -> tuple[list[Any], list[str]]:
        agents, sockets = [], []
        for i in range(self.a.agents):
            self.h.serial += 1
            path = os.path.join(self.h.workdir, f"fwd-agent-{self.h.serial}.sock")
            agent = self.h._spawn(
                [
                    os.path.join(self.peers, "rust-fwd-agent"),
                    "--listen", f"unix:{path}",
                    "--agent-id", f"bench-{chr(97 + i)}",
                    "--encoding", "both",
                ],
                f"rust-fwd-agent {i + 1}",
            )  # fmt: skip
            agents.append(agent)
            sockets.append(path)
        for agent, path in zip(agents, sockets, strict=True):
            _wait_for_socket(path, agent)
        return agents, sockets

    def measure(self, contender: str, level: int) -> dict[str, Any]:
        a = self.a
        sizes = ["--requests", str(a.requests), "--warmup", str(a.warmup)]
        agents: list[Any] = []
        proxy = None
        try:
            if contender == "reverse":
                proxy, where = self.h.start_proxy(
                    "unix", "roundtrip", "--expect", str(self.expect), "--levels", str(level), *sizes
                )
                path = where[1]
                agents = [
                    self.h._spawn(
                        [
                            os.path.join(self.peers, "rust-agent"),
                            "--connect", f"unix:{path}",
                            "--agent-id", f"bench-{chr(97 + i)}",
                            "--connections", str(a.connections),
                            "--quiet",
                        ],
                        f"rust-agent {i + 1}",
                    )  # fmt: skip
                    for i in range(a.agents)
                ]
            else:
                agents, sockets = self.forward_agents()
                encodings = "json" if contender == "forward-json" else "msgpack,json"
                dials = [arg for path in sockets for arg in ("--dial", f"unix:{path}")]
                proxy, _ = self.h.start_proxy(
                    "unix", "roundtrip", "--expect", str(self.expect), "--levels", str(level), *sizes,
                    *dials, "--dial-connections", str(a.connections), "--encodings", encodings,
                )  # fmt: skip
            line = proxy.expect_where(lambda item: item.get("event") == "level", "benchmark result", 600)
        finally:
            self.h._reap(*([proxy] if proxy is not None else []), *agents)
        from benchmarks.run import HarnessError

        if line.get("errors"):
            raise HarnessError(f"{contender}: {line['errors']} request(s) failed ({line.get('first_error')})")
        return {k: line[k] for k in ("rps", "p50_us", "p99_us", "proxy_cpu")} | {"concurrency": level}


def run(harness: Any) -> dict[str, Any]:
    a = harness.args
    peers = peers_dir(a)
    why = missing_peers(peers)
    if why is None and not os.access(os.path.join(peers, "rust-fwd-agent"), os.X_OK):
        why = f"no executable {os.path.join(peers, 'rust-fwd-agent')}"
    if why is not None:
        harness.log(f"forward: skipped: {why}")
        return {"skipped": why}
    runs, median = alternate(harness, CONTENDERS, Contest(harness, peers).measure, "forward")
    ratios = {
        level: {
            "json_vs_reverse": median["forward-json"][level]["rps"] / median["reverse"][level]["rps"],
            "msgpack_vs_reverse": median["forward-msgpack"][level]["rps"] / median["reverse"][level]["rps"],
            "msgpack_vs_json": median["forward-msgpack"][level]["rps"] / median["forward-json"][level]["rps"],
        }
        for level in median["reverse"]
    }
    return {
        "runs": runs,
        "median": median,
        "ratios": ratios,
        "agents": f"{a.agents} agent processes x {a.connections} connections",
        "requests": a.requests,
        "warmup": a.warmup,
        "rounds": a.runs,
    }


def report(section: dict[str, Any], fmt: Any) -> list[str]:
    if section.get("skipped"):
        return ["", f"forward: not measured ({section['skipped']})"]
    lines = [
        "",
        f"forward mode against reverse mode, same run ({section['agents']}, {section['requests']:,} round trips "
        f"after {section['warmup']:,}, median of {section['rounds']} alternating rounds)",
        "| concurrency | reverse /s | forward json /s | forward msgpack /s | json / reverse | msgpack / reverse "
        "| msgpack / json | p50 us rev / json / msgpack | proxy CPU rev / json / msgpack |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    med = section["median"]
    for level, ratio in section["ratios"].items():
        rev, js, mp = med["reverse"][level], med["forward-json"][level], med["forward-msgpack"][level]
        lines.append(
            f"| {level} | {fmt(rev['rps'])} | {fmt(js['rps'])} | {fmt(mp['rps'])} "
            f"| {ratio['json_vs_reverse']:.2f}x | {ratio['msgpack_vs_reverse']:.2f}x | {ratio['msgpack_vs_json']:.2f}x "
            f"| {fmt(rev['p50_us'], 1)} / {fmt(js['p50_us'], 1)} / {fmt(mp['p50_us'], 1)} "
            f"| {rev['proxy_cpu']:.0%} / {js['proxy_cpu']:.0%} / {mp['proxy_cpu']:.0%} |"
        )
    return lines
