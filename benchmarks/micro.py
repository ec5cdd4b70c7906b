"""
In-process micro-benchmarks of the proxy's per-request work, without
sockets: what one round trip costs in Python, piece by piece, and the JSON
library comparison (msgspec vs orjson vs the standard library).

    python -m benchmarks.micro [--quick] [--json FILE]

Each figure is the median of several repeats of a timed loop, in
nanoseconds per operation.  orjson is optional (C{pip install orjson}).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def timeit(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Median nanoseconds per call of C{fn}."""
    results = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        results.append((time.perf_counter_ns() - t0) / number)
    return statistics.median(results)


def allow_answer(cid: str) -> bytes:
    return (
        b'{"version":2,"decision":"allow","request_headers":[],"response_headers":[],'
        b'"routing_metadata":{},"audit":{"tags":[],"rule_ids":[],"confidence":null,'
        b'"reason_codes":[],"custom":{"correlation_id":"' + cid.encode() + b'"}},'
        b'"needs_more":false,"request_body_mutation":null,"response_body_mutation":null,'
        b'"websocket_decision":null}'
    )


class _Sink:
    """A FrameSink that keeps the last frame, standing in for the protocol."""

    def __init__(self) -> None:
        self.last: tuple[int, bytes] = (0, b"")

    def send_frame(self, message_type: int, payload: bytes) -> None:
        self.last = (message_type, payload)

    def close_connection(self, detail: str, abort: bool = False) -> None:
        pass


def run(number: int, repeat: int) -> dict[str, float]:
    import msgspec
    from twisted.internet.task import Clock

    from benchmarks.driver import load_event
    from sentinel_twisted import messages as m
    from sentinel_twisted.proxy.connection import AgentConnection
    from sentinel_twisted.proxy.pending import PendingTable

    vectors = os.environ.get("SENTINEL_VECTORS") or os.path.join(ROOT, "tests", "data", "vectors")
    event = load_event(vectors if os.path.isdir(vectors) else None)
    answer = allow_answer("5f2a-1")
    results: dict[str, float] = {}

    def bench(name: str, fn: Callable[[], Any]) -> None:
        results[name] = timeit(fn, number, repeat)
        print(f"{results[name]:9.0f} ns  {name}", file=sys.stderr, flush=True)

    # -- JSON: our codec and the libraries on the same messages -------------
    bench("messages.encode_event(RequestHeaders)", lambda: m.encode_event(event, "5f2a-1"))
    bench("messages.decode_agent_response(allow)", lambda: m.decode_agent_response(answer))
    event_dict = json.loads(m.encode_event(event, "5f2a-1"))
    enc = msgspec.json.Encoder()
    bench("msgspec encode RequestHeaders dict", lambda: enc.encode(event_dict))
    bench("json.dumps RequestHeaders dict", lambda: json.dumps(event_dict, separators=(",", ":")).encode())
    bench("msgspec decode AgentResponse to dict", lambda: msgspec.json.decode(answer))
    bench("json.loads AgentResponse to dict", lambda: json.loads(answer))
    try:
        import orjson
    except ImportError:
        print("orjson not installed; skipped", file=sys.stderr)
    else:
        bench("orjson.dumps RequestHeaders dict", lambda: orjson.dumps(event_dict))
        bench("orjson.loads AgentResponse to dict", lambda: orjson.loads(answer))
        # With the same validation as our codec: parse, then check the shape.
        shape = m._RequiredAgentResponse
        bench(
            "orjson.loads + msgspec.convert (validated AgentResponse)",
            lambda: msgspec.convert(orjson.loads(answer), shape, dec_hook=m._dec_hook),
        )
        bench("orjson.dumps(msgspec.to_builtins(event))", lambda: orjson.dumps(msgspec.to_builtins(event)))
    bench(
        "json.loads + msgspec.convert (validated AgentResponse)",
        lambda: msgspec.convert(json.loads(answer), m._RequiredAgentResponse, dec_hook=m._dec_hook),
    )
    bench(
        "json.dumps(msgspec.to_builtins(event))",
        lambda: json.dumps(msgspec.to_builtins(event), separators=(",", ":")).encode(),
    )

    # -- bookkeeping --------------------------------------------------------
    clock = Clock()
    table = PendingTable(clock)
    ids = [f"5f2a-{i:x}" for i in range(number)]
    it = iter(ids * (repeat + 1))

    def add_resolve() -> None:
        cid = next(it)
        table.add(cid, 30.0)
        table.resolve(cid, None)

    bench("PendingTable add + resolve (with its Deferred)", add_resolve)

    from twisted.internet.defer import Deferred

    def deferred_only() -> None:
        d: Deferred[Any] = Deferred()
        d.addCallback(lambda r: None)
        d.callback(None)

    bench("Deferred + addCallback + callback", deferred_only)

    # -- one whole round trip through AgentConnection, no I/O ----------------
    sink = _Sink()
    caps = m.AgentCapabilities(agent_id="bench", name="bench", version="1")
    conn = AgentConnection(
        sink, agent_id="bench", connection_id="bench-1", capabilities=caps, metadata=None,
        clock=clock, request_timeout=30.0, connected_since=0.0,
    )
    prefix, _, suffix = allow_answer("\x00").partition(b"\x00")

    def round_trip() -> None:
        d = conn.send_request_headers(event)
        cid = sink.last[1][19:].split(b'"', 1)[0]
        d.addCallback(lambda r: None)
        conn.frame_received(0x20, prefix + cid + suffix)

    # sanity: the id sits where round_trip expects it
    d = conn.send_request_headers(event)
    assert sink.last[1].startswith(b'{"correlation_id":"'), sink.last[1][:40]
    conn.frame_received(0x20, prefix + sink.last[1][19:].split(b'"', 1)[0] + suffix)
    assert d.called and conn.in_flight == 0
    bench("AgentConnection round trip (send_request_headers + answer)", round_trip)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    number, repeat = (2_000, 3) if args.quick else (50_000, 7)
    results = run(number, repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
