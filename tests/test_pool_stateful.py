"""
The pool and its connections under any sequence of what can happen to them.

A hypothesis state machine registers agents' connections with a real
L{ReverseConnectionFactory} (over L{StringTransport}s, time on a
L{MemoryReactorClock}), sends every event type through the pool and on
connections directly, and lets the agents answer in any order (twice, for
ids they never got, unreadably, in pieces), pause and resume, report
health and metrics, ping, stop reading, and go away, cleanly or not,
while the proxy times requests out, cancels them, closes connections and
shuts the pool down.  After every step:

  - every call has at most one outcome, and the ones that have none are
    exactly the requests each connection's pending table holds (the
    in-flight counts, the pool's shared counts and its statistics agree);
  - no request outlives its timeout;
  - the pool picks a connection that takes requests, the least loaded,
    and refuses with the error the docs name when none does;
  - the agent is sent a Cancel exactly for a timeout (a RequestComplete's aside) or a cancellation on
    an open connection, with that reason, and each event exactly once;
  - the observers hear of each registration, departure, flow change,
    health change, metrics report and answer once, and the gateway's
    round-trip metrics count every answer; each connection's counters
    (events sent, timeouts, Cancels sent) agree with what was written;
  - the tables the pool, the listener and the metrics keep hold only live
    agents and connections, and the incomplete-frame budget only the
    partial frames of open connections;
  - nothing is logged as a failure.

Callers and observers act from their callbacks too: the next event of an
exchange sent from an answer, a connection closed or everything cancelled
from one, a request retried through the pool when its connection goes.
By the end every call has exactly one outcome and no timer is left.

The run is deterministic (C{derandomize}).  To hunt with fresh examples:
C{POOL_RANDOM=1 POOL_EXAMPLES=500 POOL_NO_SHRINK=1 pytest tests/test_pool_stateful.py}.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from sentinel_twisted import messages as m
from sentinel_twisted.errors import ConnectionClosed
from sentinel_twisted.proxy.connection import AgentConnection
from sentinel_twisted.proxy.pool import PoolObserver
from sentinel_twisted.services import shut_down_agents
from sentinel_twisted.status.metrics import GatewayMetrics
from sentinel_twisted.wire import MessageType, encode_frame

from ._proxy_support import (
    Proxy,
    answer_frame,
    lose,
    parse_frames,
    registration_frame,
    take_frames,
)
from .test_connection import SENDERS, all_events

AGENTS = ["waf", "auth"]
#: Connections one agent may hold (a registration beyond is refused).
CAP = 3
REQUEST_TIMEOUT = 10.0
TIMEOUTS = [None, 1.0, 2.5, 10.0, 30.0]
EVENT_TYPES = {int(e.message_type) for e in all_events()}
CANCEL_REASONS = list(m.CancelReason)


class Call:
    """One Deferred (or pair of handlers) handed out, and what it got."""

    def __init__(self, name: str, cid: str | None, resend: bool = False, follow: str | None = None) -> None:
        self.name = name
        #: What its caller does when it is answered (see PoolMachine.follow_up).
        self.follow = follow
        self.cid = cid
        self.outcomes: list[tuple[str, Any]] = []
        #: The connection that accepted it (None: refused at once).
        self.conn: ConnModel | None = None
        self.deadline = 0.0
        self.deferred: Deferred[Any] | None = None
        #: Resend through the pool once when its connection goes.
        self.resend = resend
        #: A RequestComplete: its timeout sends no Cancel and is not counted.
        self.notice = name.endswith(".send_request_complete")

    def __repr__(self) -> str:
        return f"<Call {self.name} {self.cid} {self.outcomes}>"


class ConnModel:
    """What the test knows of one registered connection."""

    def __init__(self, agent_id: str, protocol: Any, transport: Any, conn: AgentConnection) -> None:
        self.agent_id = agent_id
        self.protocol = protocol
        self.transport = transport
        self.conn = conn
        #: open: registered; closing: the proxy closed it (its transport
        #: is not gone yet); gone: connectionLost was delivered.
        self.state = "open"
        self.paused = False
        self.blocked = False
        self.left_pool = False
        #: The rest of a frame the agent has begun to send.
        self.rest = b""
        self.rest_call: Call | None = None
        #: Events accepted and Cancel frames written, all told.
        self.events = 0
        self.cancels = 0

    def __repr__(self) -> str:
        return f"<ConnModel {self.conn.connection_id} {self.state}>"


class Recorder(PoolObserver):
    def __init__(self, machine: PoolMachine) -> None:
        self.machine = machine
        self.calls: list[tuple[Any, ...]] = []

    def agent_registered(self, connection: AgentConnection) -> None:
        self.calls.append(("registered", connection))

    def agent_disconnected(self, connection: AgentConnection, reason: str) -> None:
        self.calls.append(("disconnected", connection))
        if self.machine.retry_on_departure:
            # An embedder that tries the agent's other connections at once.
            self.machine.pool_send(connection.agent_id, 2, None, explicit=True, resend=False)

    def health_changed(self, connection: AgentConnection, state: int | None) -> None:
        self.calls.append(("health", connection, state))

    def flow_control_changed(self, connection: AgentConnection, paused: bool) -> None:
        self.calls.append(("flow", connection, paused))

    def metrics_reported(self, connection: AgentConnection, report: dict[str, Any]) -> None:
        self.calls.append(("metrics", connection, report))

    def request_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
        entry = connection._pending._entries.get(correlation_id)
        self.calls.append(("answered", connection, correlation_id, seconds, entry))


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _outcome_of(failure: Failure) -> tuple[str, Any]:
    return (type(failure.value).__name__, failure.value)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.proxy = Proxy(max_connections_per_agent=CAP, request_timeout=REQUEST_TIMEOUT)
        self.clock = self.proxy.clock
        self.clock.advance(1000)
        self.pool = self.proxy.pool
        self.factory = self.proxy.factory
        self.recorder = Recorder(self)
        self.pool.add_observer(self.recorder)
        self.metrics = GatewayMetrics(self.pool, self.factory, departed_grace=4.0, process=False).attach()
        self.answers = 0
        self.retry_on_departure = False
        self.conns: list[ConnModel] = []
        self.by_conn: dict[int, ConnModel] = {}
        self.all_calls: list[Call] = []
        self.pings: list[Call] = []
        self.shutdowns: list[Call] = []
        self.closes: list[Call] = []
        self.serial = 0
        self.log_events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log_events.append)
        # What this step should have written, per connection: events by
        # correlation id and Pongs.
        self.expected_events: dict[int, list[str]] = {}
        self.expected_pongs: dict[int, list[bytes]] = {}
        # The observer calls this step should have made.
        self.expected_notes: list[tuple[Any, ...]] = []
        self.step_start = self.clock.seconds()

    # -- helpers ---------------------------------------------------------------

    def new_cid(self) -> str:
        self.serial += 1
        return f"c{self.serial}"

    def model_of(self, conn: AgentConnection) -> ConnModel:
        return self.by_conn[id(conn)]

    def live(self) -> list[ConnModel]:
        return [c for c in self.conns if c.state == "open"]

    def outstanding(self, cm: ConnModel) -> list[Call]:
        return [c for c in self.all_calls if c.conn is cm and not c.outcomes]

    def track(self, call: Call, d: Deferred[Any]) -> None:
        call.deferred = d
        self.all_calls.append(call)

        def ok(result: Any) -> None:
            call.outcomes.append(("answer", result, False))
            self.follow_up(call)

        def err(failure: Failure) -> None:
            cm = call.conn
            closed = cm is not None and cm.conn.is_closed
            call.outcomes.append(_outcome_of(failure) + (closed,))
            if call.resend and isinstance(failure.value, ConnectionClosed) and cm is not None:
                # A caller that tries the agent again, from its errback.
                self.pool_send(cm.agent_id, 0, None, explicit=True, resend=False)

        d.addCallbacks(ok, err)

    def follow_up(self, call: Call) -> None:
        """
        What a caller may do from its answer's callback, while the agent's
        read is under way: send the exchange's next event (same id, same
        connection), close the connection, or cancel everything.
        """
        cm = call.conn
        if call.follow is None or cm is None:
            return
        if call.follow == "again":
            again = Call("conn.send_request_complete", call.cid)
            closed = cm.conn.is_closed
            self.track(again, cm.conn.send_request_complete(all_events()[4], correlation_id=call.cid))
            if not closed:
                assert not again.outcomes, again
                self.accepted(again, cm, None)
        elif call.follow == "close":
            cm.conn.close("closed by a caller")
        elif call.follow == "cancel_all":
            self.pool.cancel_all(m.CancelReason.BLOCKED_BY_AGENT, cm.agent_id)

    def waiter_call(self, call: Call) -> tuple[Any, Any]:
        self.all_calls.append(call)

        def answered(result: Any, arg: Any) -> None:
            assert arg is call
            call.outcomes.append(("answer", result, False))

        def failed(failure: Failure, arg: Any) -> None:
            assert arg is call
            cm = call.conn
            closed = cm is not None and cm.conn.is_closed
            call.outcomes.append(_outcome_of(failure) + (closed,))

        return answered, failed

    def accepted(self, call: Call, cm: ConnModel, timeout: float | None) -> None:
        call.conn = cm
        cm.events += 1
        call.deadline = self.clock.seconds() + (REQUEST_TIMEOUT if timeout is None else timeout)
        self.expected_events.setdefault(id(cm), []).append(call.cid or "")

    def pool_send(
        self, agent_id: str, kind: int, timeout: float | None, explicit: bool, resend: bool,
        follow: str | None = None,
    ) -> Call:
        """Send through the pool, checking the choice it makes."""
        cid = self.new_cid()
        event = all_events(cid if not explicit else "")[kind]
        before = {
            id(c): (c.can_accept_requests, c.in_flight, c.is_closed, c.is_paused)
            for c in self.pool.connections(agent_id)
        }
        call = Call(f"pool.{SENDERS[kind]}", cid, resend, follow)
        d = getattr(self.pool, SENDERS[kind])(
            agent_id, event, correlation_id=cid if explicit else None, timeout=timeout
        )
        chosen = [self.model_of(c) for c in self.pool.connections(agent_id) if cid in c.pending_ids()]
        # The pool's choice is known from the table before any outcome.
        if chosen:
            [cm] = chosen
            assert id(cm.conn) in before, "sent to a connection that was not the agent's"
            available, load, _, _ = before[id(cm.conn)]
            assert available, f"the pool picked {cm} which takes no requests"
            least = min(v[1] for v in before.values() if v[0])
            assert load == least, f"picked load {load}, least was {least}"
            self.accepted(call, cm, timeout)
        self.track(call, d)
        if not chosen:
            assert call.outcomes, "a send neither waits nor failed"
            name, error = call.outcomes[0][:2]
            assert not any(v[0] for v in before.values()), f"refused ({name}) with a connection free"
            open_ = [v for v in before.values() if not v[2]]
            if not before or not open_:
                assert name == "AgentUnavailable", (name, before)
            else:
                assert name == "FlowControlPaused", (name, before)
                assert error.not_reading == (not any(v[3] for v in open_)), (error, before)
        return call

    # -- registration ------------------------------------------------------------

    @initialize(first=st.integers(1, CAP), second=st.integers(0, CAP), retry=st.booleans())
    def first_agents(self, first: int, second: int, retry: bool) -> None:
        self.retry_on_departure = retry
        for _ in range(first):
            self.register(AGENTS[0])
        for _ in range(second):
            self.register(AGENTS[1])

    @rule(agent=st.sampled_from(AGENTS))
    def register(self, agent: str) -> None:
        held = len(self.pool.connections(agent))
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(registration_frame(agent))
        [(kind, payload)] = take_frames(transport)
        assert kind == MessageType.HANDSHAKE_RESPONSE
        response = m.decode(payload, m.RegistrationResponse)
        if held >= CAP:
            assert not response.success
            assert transport.disconnecting
            lose(protocol)
            return
        assert response.success, response.error
        conn = protocol.connection
        assert conn is not None
        cm = ConnModel(agent, protocol, transport, conn)
        self.conns.append(cm)
        self.by_conn[id(conn)] = cm
        self.expected_notes.append(("registered", conn))

    # -- sending ----------------------------------------------------------------

    @precondition(lambda self: self.conns)
    @rule(
        agent=st.sampled_from(AGENTS),
        kind=st.integers(0, 7),
        timeout=st.sampled_from(TIMEOUTS),
        explicit=st.booleans(),
        resend=st.booleans(),
        follow=st.sampled_from([None, None, "again", "close", "cancel_all"]),
    )
    def send_through_pool(
        self, agent: str, kind: int, timeout: float | None, explicit: bool, resend: bool, follow: str | None
    ) -> None:
        self.pool_send(agent, kind, timeout, explicit, resend, follow)

    @precondition(lambda self: self.conns)
    @rule(
        index=st.integers(0, 20),
        kind=st.integers(0, 7),
        timeout=st.sampled_from(TIMEOUTS + [0.0, -1.0]),
        reuse=st.booleans(),
        handlers=st.booleans(),
    )
    def send_on_connection(self, index: int, kind: int, timeout: float | None, reuse: bool, handlers: bool) -> None:
        cm = self.conns[index % len(self.conns)]
        waiting = cm.conn.pending_ids()
        duplicate = reuse and bool(waiting)
        cid = waiting[0] if duplicate else self.new_cid()
        call = Call(f"conn.{SENDERS[kind]}", cid)
        closed = cm.conn.is_closed
        if handlers:
            answered, failed = self.waiter_call(call)
            cm.conn.send_event_with(all_events()[kind], answered, failed, call, correlation_id=cid, timeout=timeout)
        else:
            self.track(call, getattr(cm.conn, SENDERS[kind])(all_events()[kind], correlation_id=cid, timeout=timeout))
        if closed:
            assert [o[0] for o in call.outcomes] == ["ConnectionClosed"], call
        elif timeout is not None and timeout <= 0:
            assert [o[0] for o in call.outcomes] == ["ValueError"], call
        elif duplicate:
            assert [o[0] for o in call.outcomes] == ["DuplicateCorrelationId"], call
        else:
            assert not call.outcomes, call
            self.accepted(call, cm, timeout)

    # -- the agents -------------------------------------------------------------

    def agent_sends(self, cm: ConnModel, data: bytes, pieces: int = 1) -> None:
        if cm.state == "gone":
            return
        if cm.rest:
            # A frame the agent has begun goes first.
            self.finish_answer(cm)
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            cm.protocol.dataReceived(data[start : start + step])

    def pick(self, index: int, waiting: bool) -> Call | None:
        """A call, by index: one still waiting, or any that was accepted."""
        calls = [c for c in self.all_calls if c.conn is not None and (not waiting or not c.outcomes)]
        return calls[index % len(calls)] if calls else None

    @rule(index=st.integers(0, 50), waiting=st.booleans(), pieces=st.integers(1, 5),
          decision=st.sampled_from(["allow", "block"]))
    def agent_answers(self, index: int, waiting: bool, pieces: int, decision: str) -> None:
        call = self.pick(index, not waiting)
        if call is None or call.conn is None or call.cid is None:
            return
        cm = call.conn
        if not self.flush(cm):
            return
        # The call itself, or another sent under the same id on this
        # connection after it ended: whichever waits is answered.
        [waiting] = [c for c in self.outstanding(cm) if c.cid == call.cid] or [None]
        answer = m.ALLOW if decision == "allow" else m.Block(403, "no", None)
        self.agent_sends(cm, answer_frame(call.cid, answer), pieces)
        if waiting is not None:
            assert waiting.outcomes and waiting.outcomes[0][0] == "answer", waiting
            self.expected_notes.append(("answered", cm.conn, call.cid))

    @rule(index=st.integers(0, 20), cid=st.sampled_from(["nobody", "", "c1"]), pieces=st.integers(1, 3))
    def agent_answers_unknown_id(self, index: int, cid: str, pieces: int) -> None:
        cm = self.open_one(index)
        if cm is None:
            return
        waiting = [c for c in self.outstanding(cm) if c.cid == cid]
        self.agent_sends(cm, answer_frame(cid), pieces)
        if waiting:
            assert waiting[0].outcomes
            self.expected_notes.append(("answered", cm.conn, cid))

    @rule(index=st.integers(0, 50), cut=st.integers(1, 30))
    def agent_starts_an_answer(self, index: int, cut: int) -> None:
        """The agent sends part of an answer now, the rest in a later step."""
        call = self.pick(index, True)
        if call is None or call.conn is None or call.cid is None or call.conn.state != "open":
            return
        cm = call.conn
        if cm.rest:
            return
        data = answer_frame(call.cid)
        cut = min(cut, len(data) - 1)
        self.agent_sends(cm, data[:cut])
        cm.rest = data[cut:]
        cm.rest_call = call

    @rule(index=st.integers(0, 20))
    def agent_finishes_an_answer(self, index: int) -> None:
        started = [cm for cm in self.live() if cm.rest]
        if not started:
            return
        self.finish_answer(started[index % len(started)])

    def flush(self, cm: ConnModel) -> bool:
        """Finish the frame the agent has begun; whether its connection is still open."""
        if cm.rest and cm.state != "gone":
            self.finish_answer(cm)
            self.sync_closing()
        return cm.state == "open"

    def open_one(self, index: int) -> ConnModel | None:
        """An open connection picked by C{index}, its begun frame finished; C{None} if none is open."""
        live = self.live()
        if not live:
            return None
        cm = live[index % len(live)]
        return cm if self.flush(cm) else None

    def finish_answer(self, cm: ConnModel) -> None:
        call = cm.rest_call
        assert call is not None
        waiting = [c for c in self.outstanding(cm) if c.cid == call.cid]
        data, cm.rest = cm.rest, b""
        was_open = cm.state == "open" and not cm.conn.is_closed
        cm.protocol.dataReceived(data)
        if waiting and was_open:
            assert waiting[0].outcomes, waiting[0]
            self.expected_notes.append(("answered", cm.conn, call.cid))

    @rule(index=st.integers(0, 50), readable=st.booleans())
    def agent_answers_garbage(self, index: int, readable: bool) -> None:
        call = self.pick(index, True)
        if call is None or call.conn is None or call.conn.state != "open":
            return
        cm = call.conn
        if not self.flush(cm):
            return
        waiting = [c for c in self.outstanding(cm) if c.cid == call.cid]
        if readable:
            payload = _json({"version": 2, "decision": "maybe", "audit": {"custom": {"correlation_id": call.cid}}})
        else:
            payload = b'{"version": 2, "decision": '
        self.agent_sends(cm, encode_frame(MessageType.AGENT_RESPONSE, payload))
        if waiting and readable:
            assert waiting[0].outcomes and waiting[0].outcomes[0][0] == "InvalidMessage", waiting[0]
        elif waiting:
            assert not waiting[0].outcomes

    @rule(index=st.integers(0, 20), action=st.sampled_from([1, 2, 1, 2, 3, "pause"]))
    def flow_control(self, index: int, action: Any) -> None:
        cm = self.open_one(index)
        if cm is None:
            return
        self.agent_sends(cm, encode_frame(MessageType.FLOW_CONTROL, _json({"action": action})))
        wanted = {1: True, 2: False}.get(action, cm.paused)
        if wanted != cm.paused:
            cm.paused = wanted
            self.expected_notes.append(("flow", cm.conn, wanted))

    @rule(index=st.integers(0, 20), state=st.sampled_from([1, 2, 3, 4, None]))
    def health(self, index: int, state: int | None) -> None:
        cm = self.open_one(index)
        if cm is None:
            return
        self.agent_sends(cm, encode_frame(MessageType.HEALTH_STATUS, _json({"state": state})))
        if state is not None:
            self.expected_notes.append(("health", cm.conn, state))

    @rule(index=st.integers(0, 20), valid=st.booleans())
    def metrics(self, index: int, valid: bool) -> None:
        cm = self.open_one(index)
        if cm is None:
            return
        payload = _json({"counters": [1]}) if valid else b"[1, 2"
        self.agent_sends(cm, encode_frame(MessageType.METRICS_REPORT, payload))
        if valid:
            self.expected_notes.append(("metrics", cm.conn, {"counters": [1]}))

    @rule(index=st.integers(0, 20), sequence=st.integers(-1, 5))
    def agent_pings(self, index: int, sequence: int) -> None:
        cm = self.open_one(index)
        if cm is None:
            return
        payload = _json({"sequence": sequence, "timestamp_ms": 5})
        self.agent_sends(cm, encode_frame(MessageType.PING, payload))
        if not cm.blocked:
            self.expected_pongs.setdefault(id(cm), []).append(payload)

    @precondition(lambda self: self.conns)
    @rule(index=st.integers(0, 20), timeout=st.sampled_from([None, 1.0, 3.0]))
    def proxy_pings(self, index: int, timeout: float | None) -> None:
        cm = self.conns[index % len(self.conns)]
        call = Call("ping", None)
        call.conn = cm
        self.pings.append(call)
        closed = cm.conn.is_closed
        d = cm.conn.ping(timeout)
        d.addCallbacks(lambda r: call.outcomes.append(("pong", r)), lambda f: call.outcomes.append(_outcome_of(f)))
        if closed:
            assert call.outcomes and call.outcomes[0][0] == "ConnectionClosed"
        call.deadline = self.clock.seconds() + (REQUEST_TIMEOUT if timeout is None else timeout)
        call.deferred = d

    @rule(index=st.integers(0, 20))
    def cancel_a_ping(self, index: int) -> None:
        waiting = [c for c in self.pings if not c.outcomes]
        if waiting:
            call = waiting[index % len(waiting)]
            assert call.deferred is not None
            call.deferred.cancel()
            assert [o[0] for o in call.outcomes] == ["CancelledError"], call

    @rule(index=st.integers(0, 20))
    def agent_pongs(self, index: int) -> None:
        cm = self.open_one(index)
        if cm is None:
            return
        frames = parse_frames(cm.transport.value())
        pings = [p for t, p in frames if t == MessageType.PING]
        sequence = json.loads(pings[-1])["sequence"] if pings else 99
        self.agent_sends(cm, encode_frame(MessageType.PONG, _json({"sequence": sequence, "timestamp_ms": 1})))

    @rule(index=st.integers(0, 20), blocked=st.booleans())
    def agent_stops_or_resumes_reading(self, index: int, blocked: bool) -> None:
        cm = self.open_one(index)
        if cm is None:
            return
        if blocked:
            cm.protocol.pauseProducing()
        else:
            cm.protocol.resumeProducing()
        cm.blocked = blocked
        assert cm.conn.is_write_blocked == blocked

    @rule(index=st.integers(0, 20), error=st.sampled_from([ConnectionDone, ConnectionLost, ConnectionAborted]))
    def transport_goes(self, index: int, error: type[Exception]) -> None:
        if index % 3:
            return
        gone = [c for c in self.conns if c.state != "gone"]
        if not gone:
            return
        cm = gone[index % len(gone)]
        waiting = self.outstanding(cm)
        was_open = cm.state == "open"
        lose(cm.protocol, error())
        cm.state = "gone"
        self.left(cm)
        if was_open:
            for call in waiting:
                assert call.outcomes and call.outcomes[0][0] == "ConnectionClosed", call

    # -- the proxy --------------------------------------------------------------

    @rule(index=st.integers(0, 50), waiting=st.booleans(),
          how=st.sampled_from(["deferred", "pool", "connection", "pool_agent"]),
          reason=st.sampled_from(CANCEL_REASONS))
    def cancel_one(self, index: int, waiting: bool, how: str, reason: int) -> None:
        call = self.pick(index, not waiting)
        if call is None:
            return
        was_waiting = not call.outcomes and call.conn is not None
        if how == "deferred":
            if call.deferred is None:
                return
            call.deferred.cancel()
        elif how == "pool":
            if call.cid is None:
                return
            self.pool.cancel_request(call.cid, reason)
        elif how == "pool_agent":
            if call.cid is None or call.conn is None:
                return
            self.pool.cancel_request(call.cid, reason, agent_id=call.conn.agent_id)
        else:
            if call.conn is None or call.cid is None:
                return
            call.conn.conn.cancel_request(call.cid, reason)
        if was_waiting:
            assert len(call.outcomes) == 1 and call.outcomes[0][0] in ("RequestCancelled", "CancelledError"), call

    @rule(reason=st.sampled_from(CANCEL_REASONS), agent=st.sampled_from(AGENTS + [None]))
    def cancel_all(self, reason: int, agent: str | None) -> None:
        targets = [c for c in self.conns if c.conn in self.pool.connections(agent)]
        waiting = [call for cm in targets for call in self.outstanding(cm)]
        count = self.pool.cancel_all(reason, agent)
        assert count >= len(waiting)
        for call in waiting:
            assert call.outcomes[0][0] == "RequestCancelled", call

    @rule(index=st.integers(0, 20), abort=st.booleans())
    def proxy_closes(self, index: int, abort: bool) -> None:
        if index % 3:
            return
        cm = self.open_one(index)
        if cm is None:
            return
        waiting = self.outstanding(cm)
        call = Call("close", None)
        self.closes.append(call)
        d = cm.conn.close("closed by test", abort=abort)
        d.addCallbacks(lambda r: call.outcomes.append(("closed", r)), lambda f: call.outcomes.append(_outcome_of(f)))
        call.conn = cm
        self.left(cm)
        cm.state = "closing"
        assert cm.transport.disconnecting
        for w in waiting:
            assert w.outcomes and w.outcomes[0][0] == "ConnectionClosed", w

    @rule(index=st.integers(0, 20), abort=st.booleans())
    def proxy_closes_again(self, index: int, abort: bool) -> None:
        closing = [c for c in self.conns if c.state == "closing"]
        if not closing:
            return
        cm = closing[index % len(closing)]
        call = Call("close", None)
        call.conn = cm
        self.closes.append(call)
        d = cm.conn.close("closed again", abort=abort)
        d.addCallbacks(lambda r: call.outcomes.append(("closed", r)), lambda f: call.outcomes.append(_outcome_of(f)))
        if abort:
            # Dropped now, not at the close grace.
            assert cm.transport.disconnected, cm

    @rule(grace=st.sampled_from([0.0, 2.0]), now=st.integers(0, 9))
    def shut_down(self, grace: float, now: int) -> None:
        if now != 7:
            # Rarely: nothing is left to happen after it.
            return
        call = Call("shutdown", None)
        self.shutdowns.append(call)
        d = shut_down_agents(self.pool, self.clock, grace, close_timeout=7.0)
        d.addCallbacks(lambda r: call.outcomes.append(("done", r)), lambda f: call.outcomes.append(_outcome_of(f)))
        self.sync_closing()

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 5.0, 10.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sync_closing()

    def sync_closing(self) -> None:
        """Connections the proxy closed on its own (a stall, a shutdown): now closing."""
        for cm in self.conns:
            if cm.state == "open" and cm.conn.is_closed:
                cm.state = "closing"
                self.left(cm)

    def left(self, cm: ConnModel) -> None:
        if not cm.left_pool:
            cm.left_pool = True
            self.expected_notes.append(("disconnected", cm.conn))

    # -- invariants -----------------------------------------------------------

    @invariant()
    def step_checks(self) -> None:
        self.sync_closing()
        now = self.clock.seconds()
        total = 0
        for cm in self.conns:
            conn = cm.conn
            waiting = self.outstanding(cm)
            ids = conn.pending_ids()
            assert sorted(ids) == sorted(c.cid for c in waiting), (cm, ids, waiting)
            assert conn.in_flight == len(waiting) >= 0
            total += len(waiting)
            for call in waiting:
                assert call.deadline > now, f"{call} outlived its timeout ({call.deadline} <= {now})"
            if cm.state != "open":
                assert not waiting, cm
                assert conn not in self.pool.connections(), cm
            else:
                assert conn in self.pool.connections(cm.agent_id)
                assert conn.is_paused == cm.paused
                assert conn.is_write_blocked == cm.blocked
                assert conn.can_accept_requests == (not cm.paused and not cm.blocked)
            if not waiting:
                assert not conn._pending._entries
                # Empty lanes go when the table's timer next fires.
                assert len(conn._pending._lanes) <= len(TIMEOUTS)
            if conn._pings:
                for call in self.pings:
                    if call.conn is cm and not call.outcomes:
                        assert call.deadline > now
            self.check_frames(cm)
        assert self.pool.pending_counts[0] == total, (self.pool.pending_counts, total)
        assert self.pool.in_flight == total
        for call in self.all_calls + self.pings + self.closes + self.shutdowns:
            assert len(call.outcomes) <= 1, call
        self.check_notes()
        self.check_tables()
        self.check_log()
        self.expected_events.clear()
        self.expected_pongs.clear()
        self.step_start = now

    def check_frames(self, cm: ConnModel) -> None:
        frames = take_frames(cm.transport)
        events = [(t, json.loads(p)) for t, p in frames if t in EVENT_TYPES]
        sent = [body["correlation_id"] for _, body in events]
        for t, body in events:
            if t == MessageType.REQUEST_HEADERS:
                assert body["metadata"]["correlation_id"] == body["correlation_id"], body
        expected = self.expected_events.pop(id(cm), [])
        assert sorted(sent) == sorted(expected), (cm, sent, expected)
        pongs = [p for t, p in frames if t == MessageType.PONG]
        assert pongs == self.expected_pongs.pop(id(cm), []), cm
        cancels = sorted(
            (body["correlation_id"], body["reason"])
            for body in (json.loads(p) for t, p in frames if t == MessageType.CANCEL)
        )
        wanted = []
        for call in self.all_calls:
            if call.conn is not cm or not call.outcomes or getattr(call, "cancel_checked", False):
                continue
            call.cancel_checked = True  # type: ignore[attr-defined]
            name, error, closed = call.outcomes[0]
            if closed:
                continue
            if name == "RequestTimeout":
                if not call.notice:
                    wanted.append((call.cid, int(m.CancelReason.TIMEOUT)))
            elif name == "RequestCancelled":
                wanted.append((call.cid, int(error.reason)))
            elif name == "CancelledError":
                wanted.append((call.cid, int(m.CancelReason.MANUAL)))
        assert cancels == sorted(wanted), (cm, cancels, wanted)
        cm.cancels += len(cancels)
        info = cm.conn.info()
        assert info.cancels_sent == cm.cancels, (info, cm.cancels)
        assert info.events_sent == cm.events, (info, cm.events)
        timeouts = sum(
            1
            for c in self.all_calls
            if c.conn is cm and c.outcomes and c.outcomes[0][0] == "RequestTimeout" and not c.notice
        )
        assert info.timeouts == timeouts, (info, timeouts)
        assert info.in_flight == len(self.outstanding(cm))

    def check_notes(self) -> None:
        got = []
        for note in self.recorder.calls:
            if note[0] == "answered":
                self.answers += 1
                _, conn, cid, seconds, entry = note
                assert entry is None, "the answered request still waited when observers heard of it"
                assert seconds >= 0
                got.append(("answered", conn, cid))
            else:
                got.append(note)
        self.recorder.calls.clear()
        expected, self.expected_notes = self.expected_notes, []

        def key(note: tuple[Any, ...]) -> str:
            return repr((note[0], id(note[1]), note[2:]))

        assert sorted(map(key, got)) == sorted(map(key, expected)), (got, expected)

    def check_metrics(self) -> None:
        metrics = self.metrics
        live_ids = {cm.conn.connection_id for cm in self.conns if cm.state == "open"}
        assert set(metrics._by_connection) <= live_ids
        assert set(metrics._closed_latency) <= set(self.pool._agents) | set(metrics._leaving)
        assert set(metrics._leaving) <= set(AGENTS)
        counted = sum(h.count for h in metrics.agent_round_trips().values()) + metrics._departed_latency.count
        assert counted == self.answers, (counted, self.answers)

    def check_tables(self) -> None:
        self.check_metrics()
        held = sum(len(cm.protocol._buffer) for cm in self.conns if cm.state == "open")
        assert self.factory.frame_budget.total == held, (self.factory.frame_budget.total, held)
        pool = self.pool
        live = [cm for cm in self.conns if cm.state == "open"]
        assert len(pool) == len(live)
        assert set(pool._agents) == {cm.agent_id for cm in live}
        assert set(pool._turn) <= set(pool._agents)
        for agent_id, (conn, _, _) in pool._last.items():
            assert conn in pool._agents.get(agent_id, ()), agent_id
        for agent_id in AGENTS:
            count = sum(1 for cm in live if cm.agent_id == agent_id)
            assert self.factory.registered_connections(agent_id) == count
        assert set(self.factory._registered_per_agent) <= set(pool._agents)
        assert self.factory.awaiting_registration == 0
        for info in pool.stats():
            mine = [cm for cm in live if cm.agent_id == info.agent_id]
            assert info.in_flight == sum(len(self.outstanding(cm)) for cm in mine)
            assert info.paused_connections == sum(cm.paused for cm in mine)

    def check_log(self) -> None:
        bad = [e for e in self.log_events if "log_failure" in e or e.get("isError")]
        assert not bad, [e.get("log_format") for e in bad] + [str(e.get("log_failure")) for e in bad]
        self.log_events.clear()

    def teardown(self) -> None:
        try:
            # Everything ends: the proxy closes what is left and the
            # transports go; no call may then be left without its outcome.
            for cm in self.conns:
                if cm.state == "open":
                    cm.conn.close("teardown")
                    self.left(cm)
                    cm.state = "closing"
            for cm in self.conns:
                if cm.state != "gone":
                    lose(cm.protocol)
                    cm.state = "gone"
            self.clock.advance(100)
            self.clock.advance(100)
            for call in self.all_calls + self.pings + self.closes + self.shutdowns:
                assert len(call.outcomes) == 1, call
                event(f"{call.name.split('.')[0]}: {call.outcomes[0][0]}")
            assert self.pool.pending_counts[0] == 0
            assert len(self.pool) == 0 and not self.pool._turn and not self.pool._last
            self.check_metrics()
            assert not self.metrics._leaving and not self.metrics._closed_latency
            assert self.factory.frame_budget.total == 0
            # Only the log limiter's timer may be left.
            for delayed in self.clock.getDelayedCalls():
                owner = getattr(delayed.func, "__self__", None)
                assert owner is self.factory.log_limiter, delayed
            self.recorder.calls.clear()
            self.expected_notes.clear()
            gc.collect()
            self.check_log()
        finally:
            globalLogPublisher.removeObserver(self.log_events.append)


PoolMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("POOL_EXAMPLES", 60)),
    stateful_step_count=50,
    deadline=None,
    derandomize=not os.environ.get("POOL_RANDOM"),
    database=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.generate] + ([] if os.environ.get("POOL_NO_SHRINK") else [Phase.shrink]),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPoolStateMachine = PoolMachine.TestCase

