"""
Properties of RequestComplete (event 5), over real loopback sockets: a raw
client sends one or two pipelined requests (GET or POST, bodies of
various sizes, by C{Content-Length} or chunked, some over an agent's
C{max_body_size}) to upstream paths that answer, never answer, break or
answer a large body, and leaves at a random point (never, at once, at the
first response byte, after a moment) or stops reading.  One or two agents,
registered anew for each example with drawn event sets and chunk sizes,
allow, block, hold an event for a moment or for good, see enough of a
body or block its n-th chunk.

However each request ends, docs/operators.md ("How a request is
decided", step 5) promises, for every agent:

 1. an agent that declared RequestComplete gets exactly one for each
    request it was sent the RequestHeaders of, and none for any other
    request; one that did not declare it gets none;
 2. a RequestComplete's C{correlation_id} is its RequestHeaders' (and
    their C{metadata.correlation_id});
 3. every Cancel for a request comes before its RequestComplete, and no
    event of the request comes after it;
 4. its C{error} is C{None} only with a status (the response went out
    whole), and says the client left only when the client did not get the
    whole response.

The runs are derandomized; C{SENTINEL_COMPLETE_PROP_EXAMPLES=500} runs
more examples than the suite's (the same ones first),
C{SENTINEL_COMPLETE_PROP_RANDOM=1} others, C{SENTINEL_COMPLETE_PROP_SHRINK=0}
reports a failing example as found.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import TestCase

from .._proxy_support import captured_log
from .support import (
    CANCEL,
    REQUEST_BODY_CHUNK,
    REQUEST_COMPLETE,
    REQUEST_HEADERS,
    RESPONSE_BODY_CHUNK,
    RESPONSE_HEADERS,
    Harness,
    ScriptedAgent,
    answer,
    block,
    logged_problems,
    property_knobs,
    wait_until,
)

#: Examples per property run (there are three), the phases and whether they are
#: the same on each run (see L{property_knobs}: C{SENTINEL_COMPLETE_PROP_*}).
EXAMPLES, PHASES, DERANDOMIZE = property_knobs("COMPLETE", 8)
#: Seconds a run may take, failing examples and their shrinking included.
BUDGET = 60.0 + EXAMPLES / 2
#: Seconds an example may wait for its requests to end.
WAIT = 10.0
#: What the RequestComplete of a request whose client left says.
CLIENT_GONE = "the client closed its connection before the response was complete"

_ID = re.compile(r"[?&]id=(\d+)")

# -- what the agents do ---------------------------------------------------------------------------

#: What an agent does with a headers event (RequestHeaders, ResponseHeaders).
HEAD_ACTIONS = ["allow", "allow", "allow", "allow", "allow", "block", "hold", "forever"]
#: What an agent does with a body chunk: ask for more, see enough, block
#: chunk 0 or 1, hold each chunk a moment, hold the first for good.
BODY_ACTIONS = ["more", "more", "more", "more", "enough", "block0", "block1", "hold", "forever"]


#: Event type (as an agent declares it) of each event's message type.
EVENT_OF = {REQUEST_HEADERS: 1, REQUEST_BODY_CHUNK: 2, RESPONSE_HEADERS: 3, RESPONSE_BODY_CHUNK: 4, REQUEST_COMPLETE: 5}


@dataclass
class AgentPlan:
    """One agent's event types and, by request number, its actions by message type."""

    events: tuple[int, ...]
    chunk_size: int
    max_body: int
    actions: dict[int, dict[int, str]]
    #: Whether it answers RequestComplete (it changes nothing: an agent may not).
    answers_complete: bool = True


#: An agent's actions that allow everything.
_ALLOWS = {
    REQUEST_HEADERS: "allow",
    REQUEST_BODY_CHUNK: "more",
    RESPONSE_HEADERS: "allow",
    RESPONSE_BODY_CHUNK: "more",
}


@dataclass
class Req:
    method: str
    body: int
    chunked: bool
    path: str
    expect: bool = False

    def data(self, number: int) -> bytes:
        target = f"{self.path}{'&' if '?' in self.path else '?'}id={number}"
        head = f"{self.method} {target} HTTP/1.1\r\nHost: x\r\n"
        if self.expect:
            head += "Expect: 100-continue\r\n"
        payload = b"p" * self.body
        if self.method == "GET" and not self.body:
            return (head + "\r\n").encode()
        if self.chunked:
            body = (b"%x\r\n" % len(payload) + payload + b"\r\n" if payload else b"") + b"0\r\n\r\n"
            return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + body
        return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


@dataclass
class Case:
    agents: dict[str, AgentPlan]
    requests: list[Req]
    leave: str
    delay: float


@st.composite
def plans(draw: Any, count: int) -> AgentPlan:
    # Event types (SPEC: 1 RequestHeaders ... 5 RequestComplete), not
    # message types.
    extra = draw(st.sets(st.sampled_from([2, 3, 4, 5])))
    if draw(st.integers(0, 3)):
        extra.add(5)
    events = (1, *sorted(extra))
    actions: dict[int, dict[int, str]] = {}
    for number in range(count):
        actions[number] = {
            REQUEST_HEADERS: draw(st.sampled_from(HEAD_ACTIONS)),
            REQUEST_BODY_CHUNK: draw(st.sampled_from(BODY_ACTIONS)),
            RESPONSE_HEADERS: draw(st.sampled_from(HEAD_ACTIONS)),
            RESPONSE_BODY_CHUNK: draw(st.sampled_from(BODY_ACTIONS)),
        }
    return AgentPlan(
        events,
        draw(st.sampled_from([4096, 16384])),
        draw(st.sampled_from([1 << 20, 1 << 20, 8192])),
        actions,
        draw(st.integers(0, 5)) > 0,
    )


#: Upstream paths (see L{Upstream <tests.gateway.support.Upstream>}; C{/cut}
#: breaks off its body).
PATHS = [
    "/plain",
    "/plain",
    "/echo-body",
    "/slow",
    "/drop",
    "/cut",
    "/bytes?n=100",
    "/bytes?n=20000",
    "/bytes?n=2000000",
]


@st.composite
def requests(draw: Any) -> Req:
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "POST", "POST"]))
    body = draw(st.sampled_from([0, 10, 6000, 20000])) if method == "POST" else 0
    chunked = draw(st.booleans()) if body else False
    expect = draw(st.integers(0, 3)) == 0 if body else False
    return Req(method, body, chunked, draw(st.sampled_from(PATHS)), expect)


@st.composite
def cases(draw: Any, agent_ids: tuple[str, ...]) -> Case:
    reqs = draw(st.lists(requests(), min_size=1, max_size=2))
    agents = {agent_id: draw(plans(len(reqs))) for agent_id in agent_ids}
    leave = draw(st.sampled_from(["end", "end", "sent", "head", "delay", "stall", "trickle"]))
    return Case(agents, reqs, leave, draw(st.sampled_from([0.0, 0.005, 0.02, 0.05])))


class Script:
    """The agents' decisions for the example under way, and their holds."""

    def __init__(self) -> None:
        self.case: Case | None = None
        self.numbers: dict[str, int] = {}
        self.timers: list[Any] = []
        self.log: dict[str, list[tuple[int, dict[str, Any]]]] = {}

    def reset(self, case: Case) -> None:
        self.case = case
        self.numbers = {}
        self.log = {agent_id: [] for agent_id in case.agents}

    def record(self, agent: ScriptedAgent) -> None:
        """Log every event and Cancel the agent gets, in order."""
        received = agent.frame_received

        def frame_received(message_type: int, body: Any) -> None:
            if message_type == CANCEL or message_type in (
                REQUEST_HEADERS, REQUEST_BODY_CHUNK, RESPONSE_HEADERS, RESPONSE_BODY_CHUNK, REQUEST_COMPLETE
            ):
                self.log.setdefault(agent.agent_id, []).append((message_type, body))
            received(message_type, body)

        agent.frame_received = frame_received  # type: ignore[method-assign]

    def decide(self, agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any] | None:
        if message_type == REQUEST_COMPLETE:
            assert self.case is not None
            return answer() if self.case.agents[agent.agent_id].answers_complete else None
        if message_type == REQUEST_HEADERS:
            match = _ID.search(body["uri"])
            assert match is not None
            self.numbers[body["metadata"]["correlation_id"]] = int(match.group(1))
        assert self.case is not None
        number = self.numbers.get(body["correlation_id"])
        if number is None:
            return answer()
        action = self.case.agents[agent.agent_id].actions[number][message_type]
        chunk = body.get("chunk_index", 0)
        if action == "allow":
            return answer()
        if action == "block":
            return block(403, f"blocked by {agent.agent_id}")
        if action == "more":
            return answer(needs_more=True)
        if action == "enough":
            return answer(needs_more=False)
        if action in ("block0", "block1"):
            return block(403) if chunk == int(action[-1]) else answer(needs_more=True)
        if action == "forever" and (message_type in (REQUEST_HEADERS, RESPONSE_HEADERS) or chunk == 0):
            return None
        if action in ("hold", "forever"):
            self.timers.append(reactor.callLater(0.01, self._release, agent, body))
            return None
        return answer(needs_more=True)

    def _release(self, agent: ScriptedAgent, body: dict[str, Any]) -> None:
        for index, (_, held) in enumerate(agent.held):
            if held is body:
                if agent.connected:
                    agent.release(answer(needs_more=True), index)
                else:
                    del agent.held[index]
                return

    def release_all(self, agents: list[ScriptedAgent]) -> None:
        """Late answers to whatever is still held (cancelled long since), but RequestComplete."""
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        self.timers = []
        for agent in agents:
            # A RequestComplete held is never answered: its timeout must go
            # unremarked.
            agent.held[:] = [(t, body) for t, body in agent.held if t != REQUEST_COMPLETE]
            while agent.held:
                if agent.connected:
                    agent.release(answer(needs_more=True))
                else:
                    agent.held.pop()


# -- the client's side ------------------------------------------------------------------------------

_HEAD_END = b"\r\n\r\n"


def complete_responses(data: bytes, methods: list[str]) -> list[int]:
    """
    The statuses of the final responses in C{data} that came whole
    (interim ones skipped), to requests of C{methods} in order.
    """
    statuses: list[int] = []
    position = 0
    while True:
        end = data.find(_HEAD_END, position)
        if end < 0:
            return statuses
        lines = data[position:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        position = end + 4
        if 100 <= status < 200:
            continue
        if len(statuses) < len(methods) and methods[len(statuses)] == "HEAD" or status in (204, 304):
            pass
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                line_end = data.find(b"\r\n", position)
                if line_end < 0:
                    return statuses
                size = int(data[position:line_end].split(b";")[0], 16)
                position = line_end + 2 + size + 2
                if position > len(data):
                    return statuses
                if size == 0:
                    break
        else:
            length = int(headers.get(b"content-length", b"0"))
            if position + length > len(data):
                return statuses
            position += length
        statuses.append(status)


class RequestCompleteProperties(TestCase):
    """RequestComplete, once per request an agent was shown, however it ended."""

    async def _register(self, h: Harness, script: Script, case: Case, agents: dict[str, ScriptedAgent]) -> None:
        """The example's agents, registered anew with its event sets."""
        for agent in agents.values():
            if agent.connected:
                agent.transport.abortConnection()
        await wait_until(lambda: len(h.pool) == 0, WAIT, "the agents of the last example to go")
        for agent_id, plan in case.agents.items():
            agent = await h.agent(
                agent_id, events=plan.events, chunk_size=plan.chunk_size, max_body=plan.max_body, decide=script.decide
            )
            script.record(agent)
            agents[agent_id] = agent

    async def _one(self, h: Harness, script: Script, case: Case, agents: dict[str, ScriptedAgent]) -> tuple[bytes, bool]:
        script.reset(case)
        await self._register(h, script, case, agents)
        data = b"".join(req.data(number) for number, req in enumerate(case.requests))
        if case.leave == "trickle" and case.requests[-1].body:
            # The last body falls short: the gateway answers 408 (or cuts
            # the response) past --min-body-rate.
            data = data[:-7]
        client = await h.raw(data)
        if case.leave == "stall":
            # A client that takes nothing: past --send-timeout the gateway
            # cuts it off once its buffers are full.
            client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.transport.pauseProducing()
        wanted = len(case.requests)
        methods = [r.method for r in case.requests]

        def answered() -> bool:
            return client.is_lost or len(complete_responses(client.received, methods)) >= wanted

        left = False
        if case.leave == "sent":
            await deferLater(reactor, case.delay, lambda: None)
            left = True
        elif case.leave == "head":
            await wait_until(lambda: answered() or bool(client.received), WAIT, "a first response byte")
            left = True
        elif case.leave == "delay":
            await deferLater(reactor, case.delay + 0.01, lambda: None)
            left = True
        elif case.leave == "stall":
            # Cut off past --send-timeout if what it does not take fills the
            # buffers, else it leaves.  (It never reads again: Linux keeps
            # the window of a receive buffer once made that small.)
            try:
                await wait_until(lambda: client.is_lost, 1.0, "the client to be cut off")
            except AssertionError:
                pass
            left = True
        elif case.leave == "trickle":
            await wait_until(answered, WAIT, "the gateway to end a body that never comes")
            left = True
        if not left:
            await wait_until(answered, WAIT, "an answer to every request")
            await deferLater(reactor, 0.01, lambda: None)
        received = client.received
        got_all = len(complete_responses(received, [r.method for r in case.requests])) >= wanted
        if not client.is_lost:
            client.transport.loseConnection()
        gateway = h.gateway_service.gateway
        await wait_until(lambda: client.is_lost and not gateway.exchanges, WAIT, "the exchanges to end")
        # Every request an agent was shown ends with a RequestComplete for
        # it: wait (bounded) for them, then let late answers and anything
        # more arrive.
        def told() -> bool:
            for agent_id, agent in agents.items():
                if 5 not in agent.supported_events:
                    continue
                log = script.log[agent_id]
                shown = {b["metadata"]["correlation_id"] for t, b in log if t == REQUEST_HEADERS}
                ended = {b["correlation_id"] for t, b in log if t == REQUEST_COMPLETE}
                if not shown <= ended:
                    return False
            return True

        try:
            await wait_until(told, 2.0, "every RequestComplete")
        except AssertionError:
            pass
        script.release_all(list(agents.values()))
        # An unanswered RequestComplete times out: nothing may follow it.
        silent = any(not plan.answers_complete for plan in case.agents.values())
        await deferLater(reactor, 0.6 if silent else 0.05, lambda: None)
        return client.received, got_all or len(complete_responses(client.received, methods)) >= wanted

    def check(self, case: Case, script: Script, received: bytes, got_all: bool) -> None:
        note(f"case {case}")
        note(f"client got {received[:300]!r}... ({len(received)} bytes)")
        statuses = complete_responses(received, [r.method for r in case.requests])
        for agent_id, plan in case.agents.items():
            log = script.log[agent_id]
            note(f"agent {agent_id} got {[(t, b.get('correlation_id'), b.get('error'), b.get('reason')) for t, b in log]}")
            heads = [b for t, b in log if t == REQUEST_HEADERS]
            shown = [b["metadata"]["correlation_id"] for b in heads]
            for head in heads:
                self.assertEqual(head["correlation_id"], head["metadata"]["correlation_id"])
            completes = [b for t, b in log if t == REQUEST_COMPLETE]
            if 5 not in plan.events:
                self.assertEqual(completes, [], f"agent {agent_id} did not declare RequestComplete")
                continue
            # 1 and 2: one for each request shown, none for any other.
            self.assertEqual(
                sorted(b["correlation_id"] for b in completes),
                sorted(shown),
                f"agent {agent_id}: RequestComplete not once per request shown",
            )
            # 3: Cancels before, nothing after.
            ended: set[str] = set()
            for message_type, body in log:
                cid = body.get("correlation_id")
                if message_type != CANCEL:
                    self.assertIn(EVENT_OF[message_type], plan.events, f"agent {agent_id}: an event it never declared")
                self.assertNotIn(cid, ended, f"agent {agent_id}: {message_type:#x} for {cid} after its RequestComplete")
                if message_type == REQUEST_COMPLETE:
                    ended.add(cid)
            # 4: the error says what became of the response.
            for complete in completes:
                number = script.numbers[complete["correlation_id"]]
                whole = number < len(statuses)
                if complete["error"] is None:
                    self.assertGreaterEqual(complete["status"], 100, f"agent {agent_id}: no error, no status")
                if complete["error"] == CLIENT_GONE:
                    self.assertFalse(whole, f"agent {agent_id}: the client left, yet got its response {number}")

    def run_property(self, agent_ids: tuple[str, ...], *argv: str) -> Any:
        async def go() -> None:
            h = await Harness(self).start(
                "--request-timeout", "0.5", "--upstream-timeout", "0.5", "--send-timeout", "0.2",
                "--header-timeout", "0.3", "--min-body-rate", "100000", *argv,  # fmt: skip
            )
            script = Script()
            agents: dict[str, ScriptedAgent] = {}
            budget = time.monotonic() + BUDGET
            logged: list[Any] = []

            def problems() -> list[str]:
                return logged_problems(logged)

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=DERANDOMIZE,
                phases=PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(cases(agent_ids))
            # An agent that never answers RequestComplete was sent a Cancel
            # for the request after it (its timeout).
            @example(
                Case(
                    {a: AgentPlan((1, 5), 4096, 1 << 20, {0: _ALLOWS}, answers_complete=False) for a in agent_ids},
                    [Req("GET", 0, False, "/plain")],
                    "end",
                    0.0,
                )
            )
            def prop(case: Case) -> None:
                if time.monotonic() > budget:
                    raise AssertionError(f"out of time ({BUDGET} s)")
                del logged[:]
                received, got_all = blockingCallFromThread(
                    reactor, lambda: ensureDeferred(self._one(h, script, case, agents))
                )
                self.check(case, script, received, got_all)
                if os.environ.get("SENTINEL_COMPLETE_PROP_STATS"):
                    print("STAT", case.leave, [r.path for r in case.requests], complete_responses(received, [r.method for r in case.requests]), [
                        (t, b.get("status"), (b.get("error") or "")[:40]) for log in script.log.values() for t, b in log if t in (CANCEL, REQUEST_COMPLETE)
                    ])
                self.assertEqual(problems(), [])

            with captured_log() as captured:
                logged = captured
                await deferToThread(prop)
            self.assertEqual(problems(), [])

        return ensureDeferred(go())

    def test_one_agent(self) -> Any:
        return self.run_property(("a",))

    def test_two_agents(self) -> Any:
        return self.run_property(("a", "b"))

    def test_two_agents_failing_open(self) -> Any:
        return self.run_property(("a", "b"), "--fail-open")

