"""
Property-based tests of how the gateway applies agents' answers, over real
loopback sockets: raw HTTP clients -> C{twistd sentinel-reverse}'s gateway
-> scripted agents (L{ScriptedAgent}) answering with generated
AgentResponses -> a recording upstream that reads what it receives
strictly (L{read_request}).

What the upstream and the client must then receive comes from a small
model written from the documentation (README "How a request is decided",
docs/operators.md "How a request is decided", "What clients see when
something fails", the log lines of header operations), not from the code:

 - header operations apply in agent order, one after the other: C{set}
   replaces every value of its name (in any case), C{add} appends one,
   C{remove} removes them all;
 - an operation on a framing or hop-by-hop header (C{Content-Length},
   C{Transfer-Encoding}, C{Connection}, C{Keep-Alive}, C{TE}, C{Trailer},
   C{Upgrade}, and C{Host} on the request) is ignored; one with a name
   that is no token, or a value with a control character other than a
   tab, CR or LF, is skipped; a CR or LF becomes a space;
 - the forwarding headers are the gateway's, set before the agents are
   asked (a client's are replaced), and the agents may still change them;
 - the first non-allow decision in agent order wins: block answers its
   status (400-599, else C{500}), body and headers (and its answer's
   response header operations), redirect its status (300-399) and
   C{Location} (no control character in the URL, else C{500}), challenge
   C{403} with C{X-Sentinel-Challenge} and a JSON body; a connection whose
   request had come whole stays usable for the request pipelined behind;
 - each agent inspecting the body is shown it in chunks of its size, the
   previous agent's output; a replacement or drop applies to the chunk it
   names if that is the one answered (else the agent has failed), a pass
   changes nothing; C{needs_more: false} ends its inspection;
 - an agent that fails (an unusable answer, its connection closed, no
   answer in time) makes the request C{503} and nothing complete reaches
   the upstream; with C{--fail-open} it is left out from there on.

The wire contract (SPEC.md section 4, the reference's types) has a
decision's status an unsigned 16-bit number and a challenge's C{params}
strings by name: an answer with a status of C{-1} or C{65536}, or a
number among the params, is no AgentResponse, and the agent has failed
(C{503}), not answered an unusable status (C{500}).

The examples that found the gateway's bugs so far are tried first
(test_answer_bounds and test_upstream_hostile have a test of each fix).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from .._proxy_support import captured_log
from .support import (
    AGENT_RESPONSE,
    REQUEST_BODY_CHUNK,
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    Harness,
    ScriptedAgent,
    _OneShot,
    answer,
    b64,
    encode_frame,
    listen_for,
    small_chunks,
    wait_until,
)
from .test_differential import _FIELD_LINE, Malformed, Received, _dechunk, read_request

#: Examples per property (C{SENTINEL_ANSWER_EXAMPLES=1000} for a longer run).
EXAMPLES = int(os.environ.get("SENTINEL_ANSWER_EXAMPLES", "40"))
#: Seconds to wait for an exchange to end.
WAIT = 3.0
#: Seconds a property may take, shrinking included.
BUDGET = 30.0 + EXAMPLES / 5

# -- the model, from the documentation ----------------------------------------------------

#: Never forwarded as the client sent them (RFC 9110 section 7.6.1).
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
}  # fmt: skip
#: Agents' operations on these are ignored (docs/operators.md, the log line).
PROTECTED_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
PROTECTED_REQUEST = PROTECTED_RESPONSE | {"host"}
_TOKEN = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: A control character other than a tab, CR or LF: the operation is skipped.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_URL_CONTROL = re.compile("[\x00-\x1f\x7f]")

Fields = list[tuple[str, bytes]]


def header_value(value: str) -> bytes:
    """The bytes a value goes out as: UTF-8, each CR, LF or CRLF a space, OWS at the ends not read."""
    return b" ".join(value.encode("utf-8").splitlines()).strip(b" \t")


def apply_ops(fields: Fields, ops: list[dict[str, Any]], protected: set[str]) -> Fields:
    """Header operations, one after the other, on C{fields} (lower-case name, value)."""
    fields = list(fields)
    for op in ops:
        ((kind, args),) = op.items()
        name = args["name"]
        lower = name.lower()
        if not _TOKEN.match(name) or lower in protected:
            continue
        if kind == "remove":
            fields = [(n, v) for n, v in fields if n != lower]
            continue
        if _CONTROL.search(args["value"]):
            continue
        if kind == "set":
            fields = [(n, v) for n, v in fields if n != lower]
        fields.append((lower, header_value(args["value"])))
    return fields


def as_map(fields: Fields) -> dict[str, list[bytes]]:
    result: dict[str, list[bytes]] = {}
    for name, value in fields:
        result.setdefault(name, []).append(value)
    return result


def without_hop_by_hop(fields: Fields) -> Fields:
    named = set(HOP_BY_HOP)
    for name, value in fields:
        if name == "connection":
            named |= {token.strip(b" \t").decode().lower() for token in value.split(b",")}
    return [(n, v) for n, v in fields if n not in named]


# -- the generated answers ------------------------------------------------------------------

_NAMES = [
    "X-A", "x-a", "X-a", "X-B", "Cookie", "Accept", "X-Secret",
    "X-Forwarded-For", "x-forwarded-host", "X-Forwarded-Proto", "Forwarded",
    "Host", "content-length", "Transfer-Encoding", "CONNECTION", "Keep-Alive", "TE", "Trailer", "Upgrade",
    "Proxy-Authorization", "Expect", "X_A", "bad name", "X:Y", "", "\u00e9", "Content-Length ",
]  # fmt: skip
_VALUES = [
    "v", "", "  spaced  ", "a\tb", "\t", "\u00e9\u2713", "a\r\nb", "a\nb", "\r", "a\x00b", "\x01",
    "\x7f", "a\x0cb", "a\x85b", "1, 2", "x" * 300, "\u2028",
]  # fmt: skip


@st.composite
def header_ops(draw: st.DrawFn, names: list[str] = _NAMES, max_size: int = 12) -> list[dict[str, Any]]:
    ops = []
    for _ in range(draw(st.integers(0, max_size))):
        kind = draw(st.sampled_from(["set", "add", "remove"]))
        name = draw(st.sampled_from(names))
        if kind == "remove":
            ops.append({"remove": {"name": name}})
        else:
            ops.append({kind: {"name": name, "value": draw(st.sampled_from(_VALUES))}})
    return ops


# -- the upstream ---------------------------------------------------------------------------


@dataclass
class UpstreamLog:
    requests: list[Received] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    connections: list[Upstream] = field(default_factory=list)
    #: Header lines of each response, besides its framing.
    head: list[bytes] = field(default_factory=list)

    def partial(self) -> list[bytes]:
        """Bytes of requests begun and not finished, on connections still open."""
        return [bytes(c.buffer) for c in self.connections if c.buffer and not c.lost]


class Upstream(Protocol):
    """Reads requests strictly; answers each C{200 ok} with the log's head lines."""

    def __init__(self, log: UpstreamLog) -> None:
        self.log = log
        self.buffer = bytearray()
        self.lost = False
        log.connections.append(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
            try:
                read = read_request(bytes(self.buffer))
            except Malformed as e:
                self.log.malformed.append(f"{e}: {bytes(self.buffer)!r}")
                del self.buffer[:]
                self.transport.abortConnection()
                return
            if read is None:
                return
            request, used = read
            del self.buffer[:used]
            self.log.requests.append(request)
            lines = b"".join(line + b"\r\n" for line in self.log.head)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + lines + b"X-Upstream-Seq: %d\r\n\r\n" % (
                len(self.log.requests) - 1
            )
            self.transport.write(head if request.method == b"HEAD" else head + b"ok")


# -- the client -----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    fields: Fields
    body: bytes

    def map(self) -> dict[str, list[bytes]]:
        return as_map(self.fields)


class Client(Protocol):
    """Writes raw bytes; reads the final responses strictly (their framing, their field lines)."""

    def __init__(self, methods: list[bytes]) -> None:
        self.methods = methods
        self.buffer = b""
        self.replies: list[Reply] = []
        self.problems: list[str] = []
        self.is_lost = False
        self.changed: Callable[[], None] = lambda: None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        try:
            self._read()
        except Malformed as e:
            self.problems.append(str(e))
            self.buffer = b""
        self.changed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.is_lost = True
        self.changed()

    def _read(self) -> None:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].split(b"\r\n")
            status_line = re.match(rb"\AHTTP/1\.1 (\d\d\d) [\t \x21-\x7e\x80-\xff]*\Z", lines[0])
            if status_line is None:
                raise Malformed(f"status line {lines[0]!r}")
            status = int(status_line.group(1))
            fields: Fields = []
            for line in lines[1:]:
                parsed = _FIELD_LINE.match(line)
                if parsed is None:
                    raise Malformed(f"field line {line!r}")
                fields.append((parsed.group(1).decode().lower(), parsed.group(2)))
            rest = self.buffer[end + 4 :]
            if 100 <= status < 200:
                self.buffer = rest
                continue
            names = [name for name, _ in fields]
            lengths = [value for name, value in fields if name == "content-length"]
            index = len(self.replies)
            method = self.methods[index] if index < len(self.methods) else b"GET"
            if "transfer-encoding" in names and lengths:
                raise Malformed("both Content-Length and Transfer-Encoding")
            if method == b"HEAD" or status in (204, 304):
                body, used = b"", 0
            elif lengths:
                if len(lengths) != 1 or not lengths[0].isdigit():
                    raise Malformed(f"Content-Length {lengths!r}")
                size = int(lengths[0])
                if len(rest) < size:
                    return
                body, used = rest[:size], size
            elif "transfer-encoding" in names:
                chunked = _dechunk(rest, 0)
                if chunked is None:
                    return
                body, used = chunked
            else:
                raise Malformed("a response without framing")
            self.replies.append(Reply(status, fields, body))
            self.buffer = rest[used:]


@dataclass
class Outcome:
    client: Client
    received: list[Received]
    malformed: list[str]
    partial: list[bytes]
    shown: dict[str, list[tuple[int, dict[str, Any]]]]


# -- the harness of the properties ----------------------------------------------------------

Script = Callable[[ScriptedAgent, int, dict[str, Any]], "dict[str, Any] | str | None"]


class AnswerProperties(TestCase):
    timeout = BUDGET + 60

    async def start(self, *argv: str, agents: list[tuple[str, tuple[int, ...], int]]) -> Harness:
        self.log = UpstreamLog()
        port = await listen_for(self, Factory.forProtocol(lambda: Upstream(self.log)))
        self.upstream_host = f"127.0.0.1:{port.getHost().port}"
        small_chunks(self)
        ids = [arg for agent_id, _, _ in agents for arg in ("--agent", agent_id)]
        h = await Harness(self).start("--upstream", f"http://{self.upstream_host}", *ids, *argv)
        self.h = h
        self.agent_specs = agents
        self.scripts: dict[str, Script] = {}
        self.live: dict[str, ScriptedAgent] = {}
        for agent_id, _, _ in agents:
            await self.connect(agent_id)
        return h

    async def connect(self, agent_id: str) -> None:
        ((events, size),) = [(e, s) for i, e, s in self.agent_specs if i == agent_id]
        self.live[agent_id] = await self.h.agent(agent_id, events=events, chunk_size=size, decide=self._decide)

    def _decide(self, agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any] | None:
        script = self.scripts.get(agent.agent_id)
        reply = answer() if script is None else script(agent, message_type, body)
        if reply == "hold":
            return None
        if reply == "close":
            agent.drop()
            return None
        if reply == "garbage":
            agent.transport.write(encode_frame(AGENT_RESPONSE, {"version": 2, "decision": {"explode": {}},
                                                                "audit": {"custom": {"correlation_id": _cid(message_type, body)}}}))
            return None
        if reply == "not json":
            payload = b"{not json"
            agent.transport.write(len(payload + b"x").to_bytes(4, "big") + bytes([AGENT_RESPONSE]) + payload)
            return None
        assert isinstance(reply, dict)
        return reply

    async def exchange(
        self, data: bytes, methods: list[bytes], scripts: dict[str, Script], head: Sequence[bytes] = ()
    ) -> Outcome:
        h, log = self.h, self.log
        log.head = list(head)
        for agent_id, _, _ in self.agent_specs:
            agent = self.live[agent_id]
            if not agent.connected:
                await self.connect(agent_id)
        for connection in log.connections:
            if connection.buffer and connection.transport is not None:
                connection.transport.abortConnection()
            del connection.buffer[:]
        log.malformed.clear()
        self.scripts = scripts
        first = len(log.requests)
        marks = {agent_id: len(agent.events) for agent_id, agent in self.live.items()}
        client = Client(methods)
        done: Deferred[None] = Deferred()

        def changed() -> None:
            if not done.called and (client.is_lost or client.problems or len(client.replies) >= len(methods)):
                done.callback(None)

        client.changed = changed
        await TCP4ClientEndpoint(reactor, "127.0.0.1", h.http_port).connect(_OneShot(client))
        client.transport.write(data)
        try:
            await done.addTimeout(WAIT, reactor)
        except Exception:
            client.problems.append("the gateway neither answered every request nor closed the connection")
        if not client.is_lost:
            client.transport.abortConnection()
        gateway = h.gateway_service.gateway
        await wait_until(lambda: client.is_lost and not gateway.exchanges, WAIT, "the exchange to end")
        # An upstream request the gateway gave up on is aborted: no connection holds part of one.
        await wait_until(lambda: not log.partial(), WAIT, "partial upstream requests to be aborted")
        shown = {agent_id: agent.events[marks[agent_id]:] for agent_id, agent in self.live.items()}
        self.scripts = {}
        return Outcome(client, log.requests[first:], list(log.malformed), log.partial(), shown)

    def run_property(
        self, strategy: st.SearchStrategy[Any], check: Callable[[Any, Outcome], None], examples: Sequence[Any] = ()
    ) -> Any:
        async def go() -> None:
            budget = time.monotonic() + BUDGET

            def prop(case: Any) -> None:
                if time.monotonic() > budget:
                    raise AssertionError(f"out of time ({BUDGET} s)")
                note(repr(case))
                outcome = blockingCallFromThread(reactor, lambda: ensureDeferred(self.exchange(*case.sending())))
                note(f"replies: {outcome.client.replies!r}")
                note(f"upstream received: {[r.raw for r in outcome.received]!r}")
                self.assertEqual(outcome.client.problems, [])
                self.assertEqual(outcome.malformed, [])
                check(case, outcome)

            test = given(strategy)(prop)
            for case in examples:
                test = example(case)(test)
            test = settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            )(test)
            with captured_log() as logged:
                await deferToThread(test)
            problems = [
                formatEvent(e)
                for e in logged
                if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)
            ]
            self.assertEqual(problems, [])

        return ensureDeferred(go())

    def upstream_fields(self, received: Received) -> Fields:
        """What the upstream received, less its Host (checked) and the framing."""
        fields = [(name.decode().lower(), value) for name, value in received.fields]
        self.assertEqual([v for n, v in fields if n == "host"], [self.upstream_host.encode()])
        return [(n, v) for n, v in fields if n not in ("host", "content-length", "transfer-encoding")]


def _cid(message_type: int, body: dict[str, Any]) -> str:
    if message_type == REQUEST_HEADERS:
        return str(body["metadata"]["correlation_id"])
    return str(body["correlation_id"])


def on(kind: int, reply: Any, otherwise: Any = None) -> Script:
    """A script answering events of C{kind} with C{reply}, the others allow (or C{otherwise})."""

    def script(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
        if message_type == kind:
            return reply
        return answer() if otherwise is None else otherwise

    return script


# -- 1. request header operations -----------------------------------------------------------

_CLIENT_LINES = [
    (b"X-A", b"client"), (b"x-a", b"two"), (b"Cookie", b"c=1"), (b"X-Secret", b"s3cret"),
    (b"X-Forwarded-Host", b"evil.example"), (b"Forwarded", b"for=192.0.2.1"), (b"X-Forwarded-Proto", b"https"),
    (b"Connection", b"X-B"), (b"X-B", b"hop"), (b"Keep-Alive", b"timeout=5"), (b"Accept", b"*/*"),
]  # fmt: skip


@dataclass
class HeaderCase:
    lines: list[tuple[bytes, bytes]]
    ops: list[list[dict[str, Any]]]

    def sending(self) -> tuple[bytes, list[bytes], dict[str, Script]]:
        head = b"GET /p HTTP/1.1\r\nHost: example.com\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in self.lines)
        scripts = {f"a{i + 1}": on(REQUEST_HEADERS, answer(request_headers=ops)) for i, ops in enumerate(self.ops)}
        return head + b"\r\n", [b"GET"], scripts

    def model(self) -> Fields:
        client = [(n.decode().lower(), v) for n, v in self.lines]
        client = [
            (n, v) for n, v in without_hop_by_hop(client)
            if n not in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded")
        ]  # fmt: skip
        fields = client + [
            ("x-forwarded-for", b"127.0.0.1"), ("x-forwarded-proto", b"http"), ("x-forwarded-host", b"example.com"),
        ]  # fmt: skip
        for ops in self.ops:
            fields = apply_ops(fields, ops, PROTECTED_REQUEST)
        return fields


header_cases = st.builds(
    HeaderCase,
    st.lists(st.sampled_from(_CLIENT_LINES), max_size=6),
    st.lists(header_ops(), min_size=1, max_size=3),
)


class RequestHeaderOperationTests(AnswerProperties):
    def test_the_upstream_gets_the_operations_in_agent_order(self) -> Any:
        async def go() -> None:
            await self.start(agents=[("a1", (1,), 4096), ("a2", (1,), 4096), ("a3", (1,), 4096)])

            def check(case: HeaderCase, outcome: Outcome) -> None:
                (reply,) = outcome.client.replies
                self.assertEqual(reply.status, 200, reply)
                (received,) = outcome.received
                self.assertEqual(as_map(self.upstream_fields(received)), as_map(case.model()))

            await self.run_property(header_cases, check)

        return ensureDeferred(go())


# -- 2. response header operations ----------------------------------------------------------

_UPSTREAM_LINES = [
    b"X-A: upstream", b"x-a: again", b"X-Secret: s3cret", b"Set-Cookie: c=1", b"Set-Cookie: d=2",
    b"Connection: X-B", b"X-B: hop", b"Keep-Alive: timeout=5", b"Cache-Control: no-store",
]  # fmt: skip
_RESPONSE_NAMES = [name for name in _NAMES if name.lower() not in ("host",)] + ["Set-Cookie", "Server"]


@dataclass
class ResponseCase:
    upstream: list[bytes]
    #: Per agent: the response operations of its RequestHeaders answer and (a2, a3) of its ResponseHeaders one.
    ops: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]

    def sending(self) -> tuple[bytes, list[bytes], dict[str, Script], list[bytes]]:
        scripts = {}
        for i, (first, second) in enumerate(self.ops):

            def script(agent: ScriptedAgent, t: int, body: dict[str, Any], first: Any = first, second: Any = second) -> Any:
                if t == REQUEST_HEADERS:
                    return answer(response_headers=first)
                if t == RESPONSE_HEADERS:
                    return answer(response_headers=second)
                return answer()

            scripts[f"a{i + 1}"] = script
        return b"GET /p HTTP/1.1\r\nHost: example.com\r\n\r\n", [b"GET"], scripts, self.upstream

    def model(self) -> Fields:
        fields: Fields = []
        for line in self.upstream:
            name, _, value = line.partition(b":")
            fields.append((name.decode().lower(), value.strip()))
        fields = without_hop_by_hop(fields)
        for i, (first, second) in enumerate(self.ops):
            fields = apply_ops(fields, first + (second if i > 0 else []), PROTECTED_RESPONSE)
        return fields


response_cases = st.builds(
    ResponseCase,
    st.lists(st.sampled_from(_UPSTREAM_LINES), max_size=5),
    st.lists(st.tuples(header_ops(_RESPONSE_NAMES, 8), header_ops(_RESPONSE_NAMES, 8)), min_size=3, max_size=3),
)

_FOUND_RESPONSE = [
    # A remove, then an unusable set of the same name in a later answer:
    # the upstream's header went out.
    ResponseCase(
        [b"X-Secret: s3cret"],
        [([], []), ([{"remove": {"name": "X-Secret"}}], [{"set": {"name": "x-secret", "value": "a\x00b"}}]), ([], [])],
    ),
    # A header the upstream's Connection header names went out.
    ResponseCase([b"Connection: X-B", b"X-B: hop"], [([], []), ([], []), ([], [])]),
]


class ResponseHeaderOperationTests(AnswerProperties):
    def test_the_client_gets_the_operations_in_agent_order(self) -> Any:
        async def go() -> None:
            await self.start(agents=[("a1", (1,), 4096), ("a2", (1, 3), 4096), ("a3", (1, 3), 4096)])

            def check(case: ResponseCase, outcome: Outcome) -> None:
                (reply,) = outcome.client.replies
                self.assertEqual((reply.status, reply.body), (200, b"ok"), reply)
                got = [(n, v) for n, v in reply.fields if n not in ("content-length", "date", "x-upstream-seq")]
                self.assertEqual(as_map(got), as_map(case.model()))

            await self.run_property(response_cases, check, _FOUND_RESPONSE)

        return ensureDeferred(go())


# -- 3. decisions -----------------------------------------------------------------------------

_STATUSES = [0, -1, 1, 99, 100, 101, 103, 199, 200, 204, 299, 300, 301, 304, 305, 399, 400, 403, 404, 418,
             429, 451, 499, 500, 503, 599, 600, 999, 65536, 2**31 - 1]  # fmt: skip
_BODIES = [None, "", "no", "\u00e9\u2713 non-ASCII", "x" * 200_000, "line\r\nX-Injected: 1\r\n\r\n"]
_BLOCK_HEADER_NAMES = ["X-Reason", "x-reason", "Content-Type", "Content-Length", "Transfer-Encoding", "Connection",
                       "Location", "Set-Cookie", "bad name", "", "Date"]  # fmt: skip
_URLS = ["/b", "", "https://example.com/x?y=1", "/\u00e9", "/a b", " /lead ", "/a\r\nSet-Cookie: x=1", "/\x00",
         "//evil.example", "/x" * 5000, "/\t"]  # fmt: skip
_CHALLENGES = ["captcha", "", "a\r\nX-Injected: 1", "\u00e9", "a\x00b", "a\tb"]


@st.composite
def decisions(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["allow", "allow", "block", "redirect", "challenge"]))
    if kind == "allow":
        return "allow"
    if kind == "block":
        headers = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(_BLOCK_HEADER_NAMES), st.sampled_from(_VALUES), max_size=4)))
        return {"block": {"status": draw(st.sampled_from(_STATUSES)), "body": draw(st.sampled_from(_BODIES)), "headers": headers}}
    if kind == "redirect":
        return {"redirect": {"url": draw(st.sampled_from(_URLS)), "status": draw(st.sampled_from(_STATUSES))}}
    # The wire contract's params are strings by name.
    params = draw(st.sampled_from([{}, {"k": "v", "n": "1"}, {"\u00e9": "\r\n\x00"}]))
    return {"challenge": {"challenge_type": draw(st.sampled_from(_CHALLENGES)), "params": params}}


@dataclass
class DecisionCase:
    method: bytes
    #: Per agent: its RequestHeaders decision and response operations.
    first: list[tuple[Any, list[dict[str, Any]]]]
    #: a2's decision on the response headers.
    on_response: Any

    def sending(self) -> tuple[bytes, list[bytes], dict[str, Script]]:
        one = self.method + b" /first HTTP/1.1\r\nHost: example.com\r\n"
        one += b"Content-Length: 3\r\n\r\nabc" if self.method == b"POST" else b"\r\n"
        two = b"GET /second HTTP/1.1\r\nHost: example.com\r\n\r\n"
        scripts: dict[str, Script] = {}
        first: set[str] = set()
        for i, (decision, ops) in enumerate(self.first):

            def script(agent: ScriptedAgent, t: int, body: dict[str, Any], i: int = i, decision: Any = decision, ops: Any = ops) -> Any:
                if t == REQUEST_HEADERS and body["uri"] == "/first":
                    first.add(_cid(t, body))
                    return answer(decision, response_headers=ops)
                if t == RESPONSE_HEADERS and i == 1 and self.on_response is not None and _cid(t, body) in first:
                    return answer(self.on_response)
                return answer()

            scripts[f"a{i + 1}"] = script
        return one + two, [self.method, b"GET"], scripts

    def deciding(self) -> tuple[Any, list[dict[str, Any]]] | None:
        """The decision the first response stands for (C{None}: the upstream's), and its operations."""
        for decision, ops in self.first:
            if decision != "allow":
                return decision, ops
        if self.on_response not in (None, "allow"):
            # Only the second agent's earlier operations are on the table.
            return self.on_response, []
        return None


decision_cases = st.builds(
    DecisionCase,
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
    st.lists(st.tuples(decisions(), header_ops(_RESPONSE_NAMES, 4)), min_size=2, max_size=2),
    st.one_of(st.none(), decisions()),
)


class DecisionTests(AnswerProperties):
    def test_the_client_gets_the_decision_and_its_connection_stays_in_step(self) -> Any:
        async def go() -> None:
            await self.start(agents=[("a1", (1,), 4096), ("a2", (1, 3), 4096)])

            def check(case: DecisionCase, outcome: Outcome) -> None:
                replies = outcome.client.replies
                self.assertEqual(len(replies), 2, replies)
                first, second = replies
                # The request pipelined behind is answered by the upstream, in step.
                self.assertEqual((second.status, second.body), (200, b"ok"), second)
                deciding = case.deciding()
                uris = [r.target for r in outcome.received]
                if deciding is None:
                    self.assertEqual(uris, [b"/first", b"/second"])
                    self.assertEqual(first.status, 200)
                    self.assertEqual(first.body, b"" if case.method == b"HEAD" else b"ok")
                    return
                # The upstream never sees a request decided at its head.
                expected = [b"/second"] if any(d != "allow" for d, _ in case.first) else [b"/first", b"/second"]
                self.assertEqual(uris, expected)
                decision, ops = deciding
                if first.status == 503 and any(not _decodable(d) for d, _ in case.first):
                    # An agent whose answer is no AgentResponse has failed,
                    # whatever an agent before it answered (or will).
                    return
                check_denial(self, case.method, decision, ops, first)

            await self.run_property(decision_cases, check)

        return ensureDeferred(go())


def _decodable(decision: Any) -> bool:
    """Whether C{decision} is one of the wire contract's (a status is an unsigned 16-bit number)."""
    return decision == "allow" or all(0 <= args.get("status", 0) <= 0xFFFF for args in decision.values())


def check_denial(test: TestCase, method: bytes, decision: Any, ops: list[dict[str, Any]], reply: Reply) -> None:
    """What the client must get for a non-allow C{decision} (docs/operators.md)."""
    got = reply.map()
    body = b"" if method == b"HEAD" else None
    ((kind, args),) = decision.items()
    if not 0 <= args.get("status", 0) <= 0xFFFF:
        # The wire contract's status is an unsigned 16-bit number: an answer
        # with another is no AgentResponse, the agent has failed (503).
        test.assertEqual(reply.status, 503, reply)
        return
    if kind == "block":
        if not 400 <= args["status"] <= 599:
            test.assertEqual(reply.status, 500, reply)
            return
        test.assertEqual(reply.status, args["status"])
        fields: Fields = []
        for name, value in (args["headers"] or {}).items():
            fields = apply_ops(fields, [{"set": {"name": name, "value": value}}], PROTECTED_RESPONSE)
        if "content-type" not in {name.lower() for name in (args["headers"] or {})}:
            fields.append(("content-type", b"text/plain; charset=utf-8"))
        fields = apply_ops(fields, ops, PROTECTED_RESPONSE)
        want = as_map([(n, v) for n, v in fields if n != "date"])
        test.assertEqual({n: v for n, v in got.items() if n not in ("content-length", "date")}, want)
        if body is None and args["body"] is None:
            # The gateway's own text.
            test.assertTrue(reply.body)
            body = reply.body
        elif body is None:
            body = args["body"].encode()
        test.assertEqual(reply.body, body)
    elif kind == "redirect":
        if not 300 <= args["status"] <= 399 or _URL_CONTROL.search(args["url"]):
            test.assertEqual(reply.status, 500, reply)
            return
        test.assertEqual(reply.status, args["status"])
        test.assertEqual(got.get("location"), [header_value(args["url"])])
    else:
        test.assertEqual(reply.status, 403)
        challenge = args["challenge_type"]
        test.assertEqual(got.get("x-sentinel-challenge"), None if _CONTROL.search(challenge) else [header_value(challenge)])
        if body is None:
            test.assertEqual(json.loads(reply.body), {"challenge": challenge, "params": args["params"]})
        else:
            test.assertEqual(reply.body, b"")


# -- 4. body mutations across chained agents ---------------------------------------------------

#: What an agent does with a body chunk: pass (C{data: null}), no mutation
#: at all, drop, replace, or a pass naming another chunk.
_ACTIONS = st.one_of(
    st.sampled_from([("pass",), ("none",), ("drop",), ("pass_other",)]),
    st.tuples(st.just("replace"), st.binary(max_size=9)),
)


@dataclass
class Behaviour:
    """One agent's answers to the body chunks, by index (past the list: pass, wanting more)."""

    actions: list[tuple[Any, ...]]
    #: The chunk after which it wants no more (C{None}: every chunk).
    enough: int | None

    def reply(self, body: dict[str, Any]) -> dict[str, Any]:
        index = body["chunk_index"]
        action = self.actions[index] if index < len(self.actions) else ("pass",)
        needs_more = self.enough is None or index < self.enough
        if action[0] == "none":
            return answer(needs_more=needs_more)
        data = {"pass": None, "pass_other": None, "drop": "", "replace": b64(action[1]) if len(action) > 1 else None}[action[0]]
        other = index + 1 if action[0] == "pass_other" else index
        return answer(needs_more=needs_more, request_body_mutation={"data": data, "chunk_index": other})

    def output(self, chunks: list[bytes], rest: bytes) -> bytes:
        """What the agent lets through, shown C{chunks} and not shown C{rest}."""
        out = b""
        for index, chunk in enumerate(chunks):
            action = self.actions[index] if index < len(self.actions) else ("pass",)
            if action[0] == "drop":
                continue
            out += action[1] if action[0] == "replace" else chunk
        return out + rest


behaviours = st.builds(Behaviour, st.lists(_ACTIONS, max_size=8), st.one_of(st.none(), st.integers(0, 6)))


@dataclass
class BodyCase:
    body: bytes
    chunked: bool
    agents: list[Behaviour]

    def sending(self) -> tuple[bytes, list[bytes], dict[str, Script]]:
        head = b"POST /upload HTTP/1.1\r\nHost: example.com\r\n"
        if self.chunked:
            encoded = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in _pieces(self.body, 4) if piece)
            data = head + b"Transfer-Encoding: chunked\r\n\r\n" + encoded + b"0\r\n\r\n"
        else:
            data = head + b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body
        scripts = {}
        for i, behaviour in enumerate(self.agents):
            scripts[f"a{i + 1}"] = _body_script(behaviour)
        return data, [b"POST"], scripts


def _body_script(behaviour: Behaviour) -> Script:
    def script(agent: ScriptedAgent, t: int, body: dict[str, Any]) -> Any:
        return behaviour.reply(body) if t == REQUEST_BODY_CHUNK else answer(needs_more=True)

    return script


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


body_cases = st.builds(BodyCase, st.binary(max_size=40), st.booleans(), st.lists(behaviours, min_size=2, max_size=2))

#: The chunk sizes of the agents of the body properties.
_SIZES = {"a1": 3, "a2": 5}


def shown_chunks(test: TestCase, agent_id: str, outcome: Outcome) -> list[bytes]:
    chunks = [b for t, b in outcome.shown[agent_id] if t == REQUEST_BODY_CHUNK]
    test.assertEqual([c["chunk_index"] for c in chunks], list(range(len(chunks))))
    return [base64.b64decode(c["data"]) for c in chunks]


def check_chunking(test: TestCase, agent_id: str, stream: bytes, chunks: list[bytes], enough: int | None) -> bytes:
    """
    C{chunks} are C{stream} in chunks of the agent's size, as far as it
    wanted them; returns the part of C{stream} it was not shown.
    """
    size = _SIZES[agent_id]
    shown = b"".join(chunks)
    test.assertEqual(stream[: len(shown)], shown, f"{agent_id} was shown other bytes")
    for chunk in chunks[:-1]:
        test.assertEqual(len(chunk), size, f"{agent_id}'s chunks {chunks!r}")
    if chunks:
        test.assertLessEqual(len(chunks[-1]), size)
    if enough is None or len(chunks) <= enough:
        # It wanted every chunk: it was shown the whole stream.
        test.assertEqual(shown, stream, f"{agent_id} was not shown all of the body")
    else:
        test.assertEqual(len(chunks), enough + 1, f"{agent_id} was shown chunks after it had enough")
    return stream[len(shown) :]


class BodyMutationTests(AnswerProperties):
    def test_the_upstream_gets_the_chained_agents_output(self) -> Any:
        async def go() -> None:
            await self.start(agents=[("a1", (1, 2), 3), ("a2", (1, 2), 5)])

            def check(case: BodyCase, outcome: Outcome) -> None:
                (reply,) = outcome.client.replies
                stream = case.body
                for i, behaviour in enumerate(case.agents):
                    agent_id = f"a{i + 1}"
                    chunks = shown_chunks(self, agent_id, outcome)
                    rest = check_chunking(self, agent_id, stream, chunks, behaviour.enough)
                    # (A pass changes nothing, whatever chunk it names.)
                    stream = behaviour.output(chunks, rest)
                self.assertEqual(reply.status, 200, reply)
                (received,) = outcome.received
                self.assertEqual(received.body, stream)

            await self.run_property(body_cases, check)

        return ensureDeferred(go())


# -- 5. an agent failing mid-request ------------------------------------------------------------

#: How an agent fails: an answer that is no AgentResponse, a frame that is
#: no JSON, its connection closed, no answer (past --request-timeout), a
#: replacement naming another chunk than the one answered; or, no failure,
#: a block (C{451}) there.
_FAILURES = ["garbage", "not json", "close", "replace_other", "garbage", "close", "not json", "hold", "block", "block"]


@dataclass
class FailureCase:
    body: bytes
    #: The failing agent's index, the event it fails on (0: RequestHeaders,
    #: k: body chunk k - 1), and how.
    failing: int
    event: int
    how: str

    def sending(self) -> tuple[bytes, list[bytes], dict[str, Script]]:
        data = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n\r\n" % len(self.body) + self.body
        scripts = {f"a{i + 1}": self._script(i) for i in range(2)}
        return data, [b"POST"], scripts

    def _script(self, i: int) -> Script:
        def script(agent: ScriptedAgent, t: int, body: dict[str, Any]) -> Any:
            event = 0 if t == REQUEST_HEADERS else body["chunk_index"] + 1
            if i == self.failing and event == self.event:
                if self.how == "block":
                    return answer({"block": {"status": 451, "body": "no", "headers": None}})
                if self.how == "replace_other" and t == REQUEST_BODY_CHUNK:
                    return answer(needs_more=True, request_body_mutation={"data": b64(b"??"), "chunk_index": event})
                return "garbage" if self.how == "replace_other" else self.how
            if t == REQUEST_HEADERS:
                return answer(needs_more=True, request_headers=[{"set": {"name": f"X-From-A{i + 1}", "value": "yes"}}])
            if i == 0:
                # The first agent marks each chunk it lets through.
                data = base64.b64decode(body["data"]) + b"!"
                return answer(needs_more=True, request_body_mutation={"data": b64(data), "chunk_index": body["chunk_index"]})
            return answer(needs_more=True)

        return script

    def model(self) -> tuple[bool, bytes, set[str]]:
        """Whether an agent fails; what the upstream gets failing open (body, agents' headers)."""
        first = _pieces(self.body, _SIZES["a1"])
        fails = False
        out = b""
        headers = {"x-from-a1", "x-from-a2"}
        if self.failing == 0:
            fails = self.event <= len(first)
            if self.event == 0:
                headers.discard("x-from-a1")
                return True, self.body, headers
            for index, chunk in enumerate(first):
                out += chunk if fails and index >= self.event - 1 else chunk + b"!"
            return fails, out, headers
        out = b"".join(chunk + b"!" for chunk in first)
        second = _pieces(out, _SIZES["a2"])
        fails = self.event <= len(second)
        if self.event == 0:
            headers.discard("x-from-a2")
        return fails, out, headers


failure_cases = st.builds(
    FailureCase, st.binary(min_size=1, max_size=20), st.integers(0, 1), st.integers(0, 4), st.sampled_from(_FAILURES)
)


class AgentFailureTests(AnswerProperties):
    def start_failing(self, *argv: str) -> Any:
        return self.start("--request-timeout", "1", *argv, agents=[("a1", (1, 2), 3), ("a2", (1, 2), 5)])

    def test_failing_closed_nothing_reaches_the_upstream(self) -> Any:
        async def go() -> None:
            await self.start_failing()

            def check(case: FailureCase, outcome: Outcome) -> None:
                (reply,) = outcome.client.replies
                fails, body, headers = case.model()
                if fails and case.how == "block":
                    self.assertEqual((reply.status, reply.body, outcome.received), (451, b"no", []))
                    return
                if fails:
                    self.assertEqual(reply.status, 503, reply)
                    self.assertEqual(outcome.received, [])
                    return
                self.assertEqual(reply.status, 200, reply)
                (received,) = outcome.received
                self.assertEqual(received.body, body)

            await self.run_property(failure_cases, check)

        return ensureDeferred(go())

    def test_failing_open_the_agent_is_left_out_from_there(self) -> Any:
        async def go() -> None:
            await self.start_failing("--fail-open")

            def check(case: FailureCase, outcome: Outcome) -> None:
                (reply,) = outcome.client.replies
                fails, body, headers = case.model()
                if fails and case.how == "block":
                    self.assertEqual((reply.status, reply.body, outcome.received), (451, b"no", []))
                    return
                self.assertEqual(reply.status, 200, reply)
                (received,) = outcome.received
                self.assertEqual(received.body, body)
                got = {name for name, _ in self.upstream_fields(received) if name.startswith("x-from-")}
                self.assertEqual(got, headers)

            await self.run_property(failure_cases, check)

        return ensureDeferred(go())
