"""
The floor: the least a Twisted proxy must do per round trip, and nothing more.

    python -m benchmarks.floor --listen unix:/tmp/floor.sock --expect 8 --levels 1,64

A UNIX (or TCP) listener whose protocol splits length-prefixed frames from
a C{bytearray}, answers each agent's registration with a fixed success, and
then, for every request of the load loop: copies the RequestHeaders event
with a new correlation id (C{msgspec.structs.replace}), encodes it with
msgspec, writes header and body with C{writeSequence}, keeps a C{Deferred}
in a dict keyed by correlation id; for every answer: decodes the whole
AgentResponse with msgspec (a typed Struct, as a proxy must to act on it),
pops the Deferred and fires it.  No registration policy, no timeouts, no
flow control, no metrics, no logging: an honest lower bound on the work,
measured by the same closed loop as L{benchmarks.driver} (it reuses
L{benchmarks.driver.ClosedLoop}) and served by the same agents, so that
C{python -m benchmarks.run --sections reference} can say how far above the
floor the library spends.

It writes the same JSON lines as the driver: C{listening}, C{ready}, then
one C{level} per concurrency level.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import struct
import sys
from typing import Any

import msgspec
from twisted.internet.protocol import Protocol

from benchmarks.driver import ClosedLoop, emit, install_reactor

_HEADER = struct.Struct("!IB")
_LENGTH = struct.Struct("!I")
REGISTRATION_REQUEST = 0x01
REGISTRATION_RESPONSE = 0x02
REQUEST_HEADERS = 0x10
AGENT_RESPONSE = 0x20


class Metadata(msgspec.Struct):
    correlation_id: str
    request_id: str
    client_ip: str
    client_port: int
    server_name: str | None
    protocol: str
    tls_version: str | None
    tls_cipher: str | None
    route_id: str | None
    upstream_id: str | None
    timestamp: str
    traceparent: str | None = None


class RequestHeaders(msgspec.Struct):
    correlation_id: str
    metadata: Metadata
    method: str
    uri: str
    headers: dict[str, list[str]]


class Audit(msgspec.Struct):
    tags: list[str] = []
    rule_ids: list[str] = []
    confidence: float | None = None
    reason_codes: list[str] = []
    custom: dict[str, Any] = {}


class Answer(msgspec.Struct):
    version: int
    decision: Any
    request_headers: list[Any] = []
    response_headers: list[Any] = []
    routing_metadata: dict[str, str] = {}
    audit: Audit = msgspec.field(default_factory=Audit)
    needs_more: bool = False
    request_body_mutation: Any = None
    response_body_mutation: Any = None
    websocket_decision: Any = None


class Floor:
    """The connections by agent id, and the correlation id -> Deferred dict."""

    def __init__(self) -> None:
        self.agents: dict[str, list[FloorProtocol]] = {}
        self.turns: dict[str, itertools.cycle[FloorProtocol]] = {}
        self.pending: dict[str, Any] = {}
        self.serial = 0
        self.encode = msgspec.json.Encoder().encode
        self.decode_answer = msgspec.json.Decoder(Answer).decode
        self.on_connection: Any = None

    def __len__(self) -> int:
        return sum(len(c) for c in self.agents.values())

    def add(self, agent_id: str, protocol: FloorProtocol) -> None:
        self.agents.setdefault(agent_id, []).append(protocol)
        self.turns[agent_id] = itertools.cycle(self.agents[agent_id])
        if self.on_connection is not None:
            self.on_connection()

    def send_request_headers(self, agent_id: str, event: RequestHeaders) -> Any:
        from twisted.internet.defer import Deferred

        self.serial += 1
        cid = f"floor-{self.serial}"
        event = msgspec.structs.replace(
            event, correlation_id=cid, metadata=msgspec.structs.replace(event.metadata, correlation_id=cid)
        )
        payload = self.encode(event)
        d: Deferred[Answer] = Deferred()
        self.pending[cid] = d
        next(self.turns[agent_id]).transport.writeSequence(
            (_HEADER.pack(len(payload) + 1, REQUEST_HEADERS), payload)
        )
        return d

    def answered(self, payload: bytes) -> None:
        answer = self.decode_answer(payload)
        d = self.pending.pop(answer.audit.custom["correlation_id"], None)
        if d is not None:
            d.callback(answer)


class FloorProtocol(Protocol):
    """Frames in, registration answered, answers routed: no more."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.buffer = bytearray()
        self.registered = False

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        size = len(buffer)
        while size - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            end = offset + 4 + length
            if end > size:
                break
            kind = buffer[offset + 4]
            payload = bytes(buffer[offset + 5 : end])
            offset = end
            if kind == AGENT_RESPONSE:
                self.floor.answered(payload)
            elif kind == REGISTRATION_REQUEST and not self.registered:
                self.register(payload)
        del buffer[:offset]

    def register(self, payload: bytes) -> None:
        agent_id = json.loads(payload)["agent_id"]
        self.registered = True
        body = json.dumps(
            {
                "success": True,
                "error": None,
                "proxy_id": "floor",
                "proxy_version": "0",
                "connection_id": f"{agent_id}-{len(self.floor) + 1}",
            }
        ).encode()
        self.transport.writeSequence((_HEADER.pack(len(body) + 1, REGISTRATION_RESPONSE), body))
        self.floor.add(agent_id, self)


def load_event(vectors: str) -> RequestHeaders:
    with open(os.path.join(vectors, "evt_request_headers.json")) as f:
        return msgspec.json.decode(json.load(f)["payload"].encode(), type=RequestHeaders)


def main(argv: list[str] | None = None) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="server endpoint, e.g. unix:/tmp/floor.sock")
    parser.add_argument("--expect", type=int, default=8, help="registered connections to wait for")
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument("--reactor", default="epoll")
    parser.add_argument("--vectors", default=os.path.join(root, "tests", "data", "vectors"))
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)

    install_reactor(args.reactor)
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory

    floor = Floor()
    event = load_event(args.vectors)
    levels = [int(x) for x in args.levels.split(",") if x]
    started = {"yes": False}

    class FloorFactory(Factory):
        noisy = False

        def buildProtocol(self, addr: Any) -> Any:
            return FloorProtocol(floor)

    def stop() -> None:
        reactor.callLater(0.2, reactor.stop)  # type: ignore[attr-defined]

    def run() -> None:
        agent_ids = sorted(floor.agents)
        emit(event="ready", connections=len(floor), agents=agent_ids)

        def next_level() -> None:
            if not levels:
                stop()
                return
            level = levels.pop(0)
            gc.collect()

            def done(result: dict[str, Any]) -> None:
                result.update(event="level", variant="floor", reactor=args.reactor)
                emit(**result)
                reactor.callLater(0.05, next_level)  # type: ignore[attr-defined]

            ClosedLoop(floor, agent_ids, event, level, args.requests, args.warmup, [], done).start()

        next_level()

    def on_connection() -> None:
        if len(floor) == args.expect and not started["yes"]:
            started["yes"] = True
            reactor.callLater(0.2, run)  # type: ignore[attr-defined]

    floor.on_connection = on_connection

    def listening(port: Any) -> None:
        address = port.getHost()
        name = getattr(address, "name", None)
        where = name.decode() if isinstance(name, bytes) else (name or f"{address.host}:{address.port}")
        emit(event="listening", address=where, pid=os.getpid())

    def failed(failure: Any) -> None:
        emit(event="error", error=f"cannot listen on {args.listen}: {failure.value}")
        stop()

    def give_up() -> None:
        emit(event="error", error=f"gave up after {args.max_seconds} s with {len(floor)} connections")
        stop()

    reactor.callLater(args.max_seconds, give_up)  # type: ignore[attr-defined]
    serverFromString(reactor, args.listen).listen(FloorFactory()).addCallbacks(listening, failed)
    reactor.run()  # type: ignore[attr-defined]
    sys.stdout.flush()


if __name__ == "__main__":
    main()
