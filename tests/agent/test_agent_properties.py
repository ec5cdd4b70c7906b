"""
Property-based attack on the agent side: a proxy the agent does not
control sends whatever it likes, after a valid registration (reverse mode)
or handshake (forward mode), and the agent must stay sound.

Each example is a sequence of proxy actions against one real connection
(L{AgentProtocol} or L{ForwardAgentProtocol} over a L{StringTransport},
time on a L{Clock}): well-formed events of all eight types with fresh,
duplicate (still in flight) or reused (already answered) correlation
ids; Cancels for known and unknown ids; Pings (valid, garbled, over the
control frame limit), Pongs and frames only agents send; invalid events
(malformed JSON, MessagePack bytes, wrong field types, invalid base64,
nesting too deep to decode, more values than C{max_event_values}); header
values from empty to past C{max_held_event_bytes}; frames that break the
framing (zero length, over 16 MiB, unknown type byte).  The bytes go out
split at arbitrary points, never while the agent has stopped reading (the
proxy left its writes unread: the transport paused it, as TCP would
hold them), and time passes.  Handlers answer at once, later (a Deferred
the test fires with an answer, with C{None} or with a failure), never,
raise, or return C{None}.

What must hold, and where it is written:

 - nothing raises out of C{dataReceived}, a timer or a handler's
   callback; nothing is logged as an unexpected failure; every log line
   is one line of bounded length, the proxy's text cut and escaped
   (STYLE.md "never secrets ... bounded", C{_peertext});
 - a frame that breaks the framing ends the connection at once, and the
   reason is logged (SPEC section 1: zero length, over 16 MiB, unknown
   type byte are protocol errors);
 - every frame the agent writes is a frame of SPEC section 1, of a type
   an agent sends (SPEC section 2); every answer is an AgentResponse
   (decoded with L{sentinel_twisted.messages}) with every field of the
   reference's (SPEC section 6, the C{resp_allow} vector) and its id in
   C{audit.custom.correlation_id} (SPEC section 4): the event's
   C{metadata.correlation_id} for RequestHeaders, its top-level id for
   the others (SPEC section 6, C{routing_id});
 - an answer only for an event received, at most one per event received
   (README "Writing an agent": answers leave as they are ready); none for
   an event cancelled before it was answered ("A Cancel from the proxy
   cancels that handler's Deferred ... and nothing is sent for it"); a
   handler's answer as it gave it, a failure or a non-answer as block 500
   ("Failures fail closed"), an event over a limit as 503 ("up to
   C{max_queued}, then 503"); and once every handler is done, an answer
   for every event received and not cancelled (the agent module's
   "Handler failures never leave the proxy waiting");
 - what the connection holds stays within its bounds (AgentSettings):
   at most C{limit} handlers running and C{max_queued} waiting, the
   bytes held within C{max_held_event_bytes} unless one event is all it
   holds, the held account equal to what it holds, FlowControl pause at
   the limit and resume at half (SPEC section 4, README "Concurrency");
 - while the proxy reads nothing (the transport paused the agent), no
   Pong is written, no frame is read, and no more answers are written
   than the events already taken; after C{write_stall_timeout} the
   connection is aborted (AgentProtocol docstring, README);
 - a frame started and not complete within C{frame_timeout} ends the
   connection (AgentSettings.frame_timeout);
 - Pings get a Pong with the same body (SPEC section 4) while the proxy
   reads;
 - when the connection is gone, nothing is held and no timer is left.

Examples are fixed (C{derandomize}): the module takes a few seconds, the
same examples every run.  To hunt with fresh ones:
C{AGENT_PROPERTIES_RANDOM=1 AGENT_PROPERTIES_EXAMPLES=2000 pytest tests/agent/test_agent_properties.py}.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted._peertext import is_clean
from sentinel_twisted.agent import Agent, AgentSettings, allow, block
from sentinel_twisted.agent.budget import HeldEventBudget
from sentinel_twisted.agent.forward import ForwardAgentFactory
from sentinel_twisted.agent.protocol import AgentProtocol
from sentinel_twisted.wire import MAX_CONTROL_FRAME_SIZE, MAX_MESSAGE_SIZE

from ..vectors import by_name, payload_json
from ._support import (
    AGENT_RESPONSE,
    CANCEL,
    CONFIGURE,
    FLOW_CONTROL,
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    HEALTH_STATUS,
    PING,
    PONG,
    REQUEST_BODY_CHUNK,
    REQUEST_COMPLETE,
    REQUEST_HEADERS,
    RESPONSE_BODY_CHUNK,
    RESPONSE_HEADERS,
    WEBSOCKET_FRAME,
    headers_event,
    success_response,
)
from .test_forward import handshake

GUARDRAIL_INSPECT = 0x16
METRICS_REPORT, CONFIG_UPDATE_REQUEST = 0x31, 0x32

PROPERTY = settings(
    max_examples=int(os.environ.get("AGENT_PROPERTIES_EXAMPLES", 120)),
    deadline=None,
    derandomize=not os.environ.get("AGENT_PROPERTIES_RANDOM"),
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LIMIT = 3
MAX_QUEUED = 2
MAX_HELD = 30_000
MAX_VALUES = 300
STALL = 30.0
FRAME_TIMEOUT = 30.0

#: Every field of an AgentResponse the reference writes (SPEC section 6).
RESPONSE_FIELDS = frozenset(json.loads(by_name("resp_allow")["payload"]))
#: What an agent may write after the handshake (SPEC section 2).
AGENT_TYPES = frozenset({AGENT_RESPONSE, HEALTH_STATUS, METRICS_REPORT, CONFIG_UPDATE_REQUEST, FLOW_CONTROL, PONG})

EVENT_TYPES = (
    REQUEST_HEADERS,
    REQUEST_BODY_CHUNK,
    RESPONSE_HEADERS,
    RESPONSE_BODY_CHUNK,
    REQUEST_COMPLETE,
    WEBSOCKET_FRAME,
    GUARDRAIL_INSPECT,
    CONFIGURE,
)
_TEMPLATES = {
    REQUEST_BODY_CHUNK: "evt_request_body_chunk",
    RESPONSE_HEADERS: "evt_response_headers",
    RESPONSE_BODY_CHUNK: "evt_response_body_chunk",
    REQUEST_COMPLETE: "evt_request_complete",
    WEBSOCKET_FRAME: "evt_websocket_frame",
    GUARDRAIL_INSPECT: "evt_guardrail_inspect",
    CONFIGURE: "evt_configure",
}
#: A field of each event given a value of the wrong type.
_WRONG_FIELD = {
    REQUEST_HEADERS: ("method", 5),
    REQUEST_BODY_CHUNK: ("chunk_index", "zero"),
    RESPONSE_HEADERS: ("status", "ok"),
    RESPONSE_BODY_CHUNK: ("is_last", "yes"),
    REQUEST_COMPLETE: ("duration_ms", [1]),
    WEBSOCKET_FRAME: ("fin", {"a": 1}),
    GUARDRAIL_INSPECT: ("content", 7),
    CONFIGURE: ("config_version", 3),
}
_UNKNOWN_TYPES = tuple(t for t in range(256) if t not in {
    0x01, 0x02, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x20, 0x30, 0x31, 0x32, 0x33, 0x40, 0x41, 0x42,
})

#: How a handler treats an event, chosen by the prefix of its id.
KINDS = ("now", "later", "later", "never", "raise", "none", "async")
#: What an id may end with: text a log line must cut or escape.
SUFFIXES = ("", "\n\x1b[31mforged", "\u2028\u202e\u00e9", "x" * 300)


def frame(message_type: int, payload: bytes) -> bytes:
    return struct.pack("!IB", len(payload) + 1, message_type) + payload


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def event_body(message_type: int, cid: str, pad: int, top_level: str | None = None) -> dict[str, Any]:
    """A well-formed event of C{message_type} for C{cid}, with about C{pad} bytes more."""
    if message_type == REQUEST_HEADERS:
        return headers_event(cid, headers={"x-pad": ["p" * pad]}, top_level_cid=top_level)
    body: dict[str, Any] = payload_json(by_name(_TEMPLATES[message_type]))
    body["correlation_id"] = cid
    if pad:
        if message_type in (REQUEST_BODY_CHUNK, RESPONSE_BODY_CHUNK, WEBSOCKET_FRAME):
            body["data"] = base64.b64encode(b"d" * pad).decode()
        elif message_type == RESPONSE_HEADERS:
            body["headers"]["x-pad"] = ["p" * pad]
        elif message_type == GUARDRAIL_INSPECT:
            body["content"] = "c" * pad
        elif message_type == CONFIGURE:
            body["config"] = {"pad": "p" * pad}
        else:
            body["error"] = "e" * pad
    return body


@dataclass
class Sent:
    """A frame the proxy sent, and what the agent should make of it."""

    message_type: int
    data: bytes
    #: "event", "invalid" (may be answered with the error decision),
    #: "cancel", "ping", "other", "fatal" (breaks the framing).
    role: str
    #: The id an answer to it carries (an event, an invalid one), or the
    #: id a Cancel names.
    cid: str | None = None
    #: Bytes of the frame that must arrive for the agent to see the error
    #: ("fatal" frames).
    fatal_after: int = 0
    #: Too long for its kind (a control frame): skipped unread.
    skipped: bool = False
    #: An invalid event whose id the agent can find: answered with the
    #: error decision (the agent module: the proxy is never left waiting).
    answerable: bool = False

    @property
    def payload(self) -> bytes:
        return self.data[5:]


class Scripted(Agent):
    """Handles every event type; how, its id's prefix says (see L{KINDS})."""

    def __init__(self) -> None:
        self.later: list[tuple[str, Deferred[Any]]] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []

    def _handle(self, event: Any) -> Any:
        cid = m.event_correlation_id(event)
        self.started.append(cid)
        if isinstance(event, (m.RequestBodyChunkEvent, m.ResponseBodyChunkEvent, m.WebSocketFrameEvent)):
            # Reading the data: invalid base64 raises here, as the docs say.
            event.body  # noqa: B018
        kind = cid.split("-", 1)[0]
        if kind == "now":
            return allow().custom(handled=cid)
        if kind == "raise":
            raise RuntimeError("boom " + cid)
        if kind == "none":
            return None
        if kind == "async":
            return self._later_coroutine(cid)
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(cid))
        if kind == "later":
            self.later.append((cid, d))
        return d

    async def _later_coroutine(self, cid: str) -> Any:
        return block(403, "async").custom(handled=cid)

    on_request_headers = on_request_body_chunk = on_response_headers = _handle
    on_response_body_chunk = on_request_complete = on_websocket_frame = _handle
    on_guardrail_inspect = on_configure = _handle


# -- strategies ---------------------------------------------------------------------

_pads = st.sampled_from([0, 0, 100, 5_000, 40_000])
_cid_choice = st.tuples(st.sampled_from(("fresh", "fresh", "fresh", "old", "ghost")), st.integers(0, 50))


@st.composite
def _id(draw: Any) -> tuple[str, int, str, str]:
    """How the id is chosen (fresh, an old one, a ghost), an index, a kind, a suffix."""
    how, index = draw(_cid_choice)
    return how, index, draw(st.sampled_from(KINDS)), draw(st.sampled_from(SUFFIXES))


_event = st.tuples(
    st.just("event"), st.sampled_from(EVENT_TYPES), _id(), _pads, st.booleans()
)
_invalid = st.tuples(
    st.just("invalid"),
    st.sampled_from(EVENT_TYPES),
    _id(),
    st.sampled_from(("wrong-type", "truncated", "garbage", "msgpack", "deep", "base64", "many-values", "not-object")),
    st.integers(0, 10_000),
)
_cancel = st.tuples(st.just("cancel"), _id(), st.booleans())
_ping = st.tuples(st.just("ping"), st.sampled_from(("valid", "valid", "garbled", "array", "oversize")), st.integers(0, 2**31))
_other = st.tuples(
    st.just("other"),
    st.sampled_from((PONG, AGENT_RESPONSE, HEALTH_STATUS, METRICS_REPORT, CONFIG_UPDATE_REQUEST, FLOW_CONTROL,
                     HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE)),
    st.binary(max_size=40),
)
_fatal = st.tuples(st.just("fatal"), st.sampled_from(("zero", "oversize", "unknown")), st.sampled_from(_UNKNOWN_TYPES))
_deliver = st.tuples(st.just("deliver"), st.one_of(st.integers(1, 400), st.just(10**9)))
_fire = st.tuples(st.just("fire"), st.integers(0, 30), st.sampled_from(("allow", "block", "none", "fail")))
_time = st.tuples(st.just("time"), st.sampled_from([0.5, 0.5, 3.0, 8.0, 8.0, 31.0]))
_flow = st.tuples(st.just("stop-reading"), st.booleans())

_BASE_STEPS = st.lists(
    st.one_of(
        _event, _event, _event, _event, _invalid, _cancel, _cancel, _ping, _other, _deliver, _deliver, _deliver,
        _deliver, _fire, _fire, _time, _flow,
    ),
    min_size=20,
    max_size=60,
)


@st.composite
def _steps(draw: Any) -> list[tuple[Any, ...]]:
    """The proxy's actions; one in four examples breaks the framing somewhere (which ends it)."""
    steps: list[tuple[Any, ...]] = draw(_BASE_STEPS)
    if draw(st.integers(0, 3)) == 0:
        steps.insert(draw(st.integers(0, len(steps))), draw(_fatal))
    return steps


STEPS = _steps()


# -- the proxy's side of the connection ------------------------------------------------


class Wire(StringTransport):
    """A StringTransport that puts every write on the run's timeline."""

    def __init__(self, timeline: list[tuple[str, Any]]) -> None:
        super().__init__(peerAddress=UNIXAddress(None))
        self.timeline = timeline

    def write(self, data: bytes) -> None:
        if self.disconnected:
            # Aborted: a socket writes nothing more.
            return
        self.timeline.append(("write", bytes(data)))
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))


@dataclass
class Model:
    """What the proxy saw, replayed from the timeline."""

    received: dict[str, int] = field(default_factory=dict)
    #: Events of each id, by kind (the handler's behaviour) and role.
    roles: dict[str, set[str]] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)
    cancelled_unanswered: set[str] = field(default_factory=set)
    pings: list[bytes] = field(default_factory=list)
    pongs: int = 0
    flow: list[int] = field(default_factory=list)
    written: bytearray = field(default_factory=bytearray)


class Run:
    """One example: a connection, the proxy's bytes, the checks."""

    def __init__(self, case: SynchronousTestCase, mode: str) -> None:
        self.case = case
        self.mode = mode
        self.clock = Clock()
        self.agent = Scripted()
        self.timeline: list[tuple[str, Any]] = []
        self.budget = HeldEventBudget(10 * MAX_HELD)
        options = dict(
            agent=self.agent,
            agent_id="waf-1",
            health_interval=7,
            max_concurrency=LIMIT,
            max_queued=MAX_QUEUED,
            max_held_event_bytes=MAX_HELD,
            max_event_values=MAX_VALUES,
            write_stall_timeout=STALL,
            frame_timeout=FRAME_TIMEOUT,
        )
        self.transport = Wire(self.timeline)
        settings_ = AgentSettings(**options)  # type: ignore[arg-type]
        if mode == "reverse":
            self.protocol: AgentProtocol = AgentProtocol(settings_, self.clock, held_event_budget=self.budget)
            opening = frame(HANDSHAKE_RESPONSE, dumps(success_response()))
        else:
            self.factory = ForwardAgentFactory(settings_, self.clock, held_event_budget=self.budget)
            self.protocol = self.factory.buildProtocol(UNIXAddress(None))
            opening = frame(HANDSHAKE_REQUEST, dumps(handshake()))
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(opening)
        case.assertTrue(self.protocol.registered)
        # What the agent read, in order: the frames it processed.
        original = self.protocol.frame_received

        def recorded(message_type: int, payload: bytes) -> None:
            self.timeline.append(("frame", (message_type, payload)))
            original(message_type, payload)

        self.protocol.frame_received = recorded  # type: ignore[method-assign]
        self.timeline.clear()
        self.transport.clear()
        self.sent: list[Sent] = []
        self.stream = bytearray()
        self.delivered = 0
        #: Offsets in the stream where each sent frame ends.
        self.ends: list[int] = []
        self.ids: list[str] = []
        self.serial = 0
        self.gone = False
        self.fatal_seen: Sent | None = None
        # When the first byte of the frame being read arrived, None if none.
        self.frame_started: float | None = None
        self.blocked_since: float | None = None
        self.load_when_blocked = 0
        self.answers_while_blocked = 0
        self.model = Model()
        self.replayed = 0
        self.sent_index = 0

    # -- ids ---------------------------------------------------------------------

    def pick_id(self, how: str, index: int, kind: str, suffix: str, for_event: bool = True) -> str:
        if how == "old" and self.ids:
            return self.ids[index % len(self.ids)]
        if for_event:
            # An event's id names how its handler behaves.
            how = "fresh"
        self.serial += 1
        cid = f"{kind}-{self.serial}{suffix}" if how == "fresh" else f"ghost-{self.serial}{suffix}"
        if how == "fresh":
            self.ids.append(cid)
        return cid

    # -- sending -------------------------------------------------------------------

    def send(self, item: Sent) -> None:
        self.sent.append(item)
        self.stream += item.data
        self.ends.append(len(self.stream))

    def event(self, message_type: int, ident: Any, pad: int, mismatched_top_level: bool) -> None:
        cid = self.pick_id(*ident)
        top = "top-" + cid if mismatched_top_level and message_type == REQUEST_HEADERS else None
        payload = dumps(event_body(message_type, cid, pad, top))
        self.send(Sent(message_type, frame(message_type, payload), "event", cid))

    def invalid(self, message_type: int, ident: Any, how: str, n: int) -> None:
        cid = self.pick_id(*ident)
        body = event_body(message_type, cid, 0)
        answerable = True
        if how == "wrong-type":
            name, value = _WRONG_FIELD[message_type]
            body[name] = value
            payload = dumps(body)
        elif how == "truncated":
            whole = dumps(body)
            payload = whole[: n % max(1, len(whole) - 1)]
            answerable = False
        elif how == "garbage":
            payload = bytes((n * 7 + i * 13) % 256 for i in range(n % 64))
            answerable = False
        elif how == "msgpack":
            payload = msgspec.msgpack.encode(body)
            answerable = False
        elif how == "deep":
            depth = 5000 + n % 3000
            nested = "[" * depth + "]" * depth
            whole = dumps(body)
            # The id first, then something too deep to decode.
            payload = whole[:-1] + b', "zz": ' + nested.encode() + b"}"
        elif how == "base64":
            if message_type in (REQUEST_BODY_CHUNK, RESPONSE_BODY_CHUNK, WEBSOCKET_FRAME):
                body["data"] = "not base64!"
            else:
                body["correlation_id"] = 12
                if message_type == REQUEST_HEADERS:
                    body["metadata"]["correlation_id"] = 12
                answerable = False
            payload = dumps(body)
        elif how == "many-values":
            if message_type == REQUEST_HEADERS:
                body["headers"] = {f"h{i}": ["v"] for i in range(MAX_VALUES + 10)}
            elif message_type == RESPONSE_HEADERS:
                body["headers"] = {f"h{i}": ["v"] for i in range(MAX_VALUES + 10)}
            elif message_type == GUARDRAIL_INSPECT:
                body["metadata"] = {f"k{i}": "v" for i in range(MAX_VALUES + 10)}
            elif message_type == CONFIGURE:
                body["config"] = [[] for _ in range(MAX_VALUES + 10)]
            else:
                # Fixed few fields: not counted, and the event is valid.
                self.send(Sent(message_type, frame(message_type, dumps(body)), "event", cid))
                return
            payload = dumps(body)
        else:
            payload = dumps([cid])
            answerable = False
        # Without an id the agent can find, it may only drop it.
        self.send(Sent(message_type, frame(message_type, payload), "invalid", cid, answerable=answerable))

    def cancel(self, ident: Any, valid: bool) -> None:
        how, index, kind, suffix = ident
        if how == "fresh":
            how = "old"
        cid = self.pick_id(how, index, kind, suffix, for_event=False)
        body: dict[str, Any] = {"correlation_id": cid, "reason": index % 6, "timestamp_ms": 1}
        if not valid:
            body["reason"] = "soon"
        self.send(Sent(CANCEL, frame(CANCEL, dumps(body)), "cancel" if valid else "other", cid))

    def ping(self, how: str, sequence: int) -> None:
        body = {"sequence": sequence, "timestamp_ms": 1767225600000}
        if how == "valid":
            self.send(Sent(PING, frame(PING, dumps(body)), "ping"))
        elif how == "garbled":
            self.send(Sent(PING, frame(PING, dumps(body)[:-3]), "other"))
        elif how == "array":
            self.send(Sent(PING, frame(PING, dumps([sequence])), "other"))
        else:
            body["pad"] = "p" * MAX_CONTROL_FRAME_SIZE
            self.send(Sent(PING, frame(PING, dumps(body)), "other", skipped=True))

    def fatal(self, how: str, unknown: int) -> None:
        if how == "zero":
            data, after = b"\x00\x00\x00\x00" + b"\x10{}", 4
        elif how == "oversize":
            data, after = struct.pack("!IB", MAX_MESSAGE_SIZE + 1, REQUEST_HEADERS) + b"{", 4
        else:
            data, after = struct.pack("!IB", 3, unknown) + b"{}", 5
        self.send(Sent(0, data, "fatal", fatal_after=after))

    # -- the network -----------------------------------------------------------------

    @property
    def reading(self) -> bool:
        """Whether the agent reads: TCP holds the proxy's bytes while it does not."""
        return self.transport.producerState == "producing" and not self.closing

    @property
    def closing(self) -> bool:
        return self.gone or self.transport.disconnecting

    def deliver(self, count: int) -> None:
        if not self.reading:
            return
        chunk = bytes(self.stream[self.delivered : self.delivered + count])
        if not chunk:
            return
        start = self.delivered
        self.delivered += len(chunk)
        self.protocol.dataReceived(chunk)
        self._frame_progress(start)
        fatal = self._fatal_delivered()
        if fatal is not None:
            self.case.assertTrue(
                self.transport.disconnecting,
                f"a frame that breaks the framing ({fatal.data[:5]!r}) left the connection open",
            )
            self.fatal_seen = fatal

    def _fatal_delivered(self) -> Sent | None:
        begin = 0
        for item, end in zip(self.sent, self.ends, strict=True):
            if item.role == "fatal" and self.delivered >= begin + item.fatal_after:
                return item
            begin = end
            if begin >= self.delivered:
                break
        return None

    def _frame_progress(self, start: int) -> None:
        """When the frame being read (if one is partly read) started, in time."""
        begin = 0
        for end in self.ends:
            if begin <= self.delivered < end:
                if self.delivered == begin:
                    self.frame_started = None
                elif begin >= start or self.frame_started is None:
                    # Its first byte arrived in this read.
                    self.frame_started = self.clock.seconds()
                return
            begin = end
        self.frame_started = None

    def stop_reading(self, stop: bool) -> None:
        """The proxy stops (or starts again) reading what the agent writes."""
        if self.closing:
            return
        if stop and self.blocked_since is None:
            self.blocked_since = self.clock.seconds()
            self.load_when_blocked = self.protocol.load
            self.answers_while_blocked = 0
            self.protocol.pauseProducing()
            self.case.assertEqual(self.transport.producerState, "paused")
        elif not stop and self.blocked_since is not None:
            self.blocked_since = None
            self.protocol.resumeProducing()
            self.case.assertEqual(self.transport.producerState, "producing")

    def fire(self, index: int, how: str) -> None:
        waiting = [(cid, d) for cid, d in self.agent.later if not d.called]
        if not waiting:
            return
        cid, d = waiting[index % len(waiting)]
        if how == "allow":
            d.callback(allow().custom(handled=cid))
        elif how == "block":
            d.callback(block(451, "later").custom(handled=cid))
        elif how == "none":
            d.callback(None)
        else:
            d.errback(RuntimeError("late failure " + cid))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        now = self.clock.seconds()
        if self.closing:
            return
        if self.blocked_since is not None and now - self.blocked_since >= STALL:
            self.case.fail(f"blocked since {self.blocked_since}, still open at {now}")
        if self.frame_started is not None and now - self.frame_started >= FRAME_TIMEOUT:
            self.case.fail(f"a frame started at {self.frame_started} still incomplete and open at {now}")

    def settle(self) -> None:
        """What the reactor does next: a transport closed is lost."""
        if self.transport.disconnecting and not self.gone:
            self.gone = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    # -- the checks ------------------------------------------------------------------

    def replay(self) -> None:
        """Check what happened since the last check, in order."""
        model = self.model
        for kind, value in self.timeline[self.replayed :]:
            if kind == "frame":
                self._processed(*value)
            elif kind == "write":
                model.written += value
                self._parse_written()
        self.replayed = len(self.timeline)

    def _processed(self, message_type: int, payload: bytes) -> None:
        # The agent processes the frames in the order sent, skipping only
        # control frames too long for their kind.
        while True:
            self.case.assertLess(self.sent_index, len(self.sent), "the agent read a frame never sent")
            item = self.sent[self.sent_index]
            self.sent_index += 1
            if item.skipped:
                continue
            self.case.assertNotEqual(item.role, "fatal", "the agent read a frame past one that broke the framing")
            self.case.assertEqual((message_type, payload), (item.message_type, item.payload))
            break
        self.case.assertIsNone(self.blocked_since, "the agent read a frame while the proxy read nothing")
        model = self.model
        if item.role in ("event", "invalid") and item.cid is not None:
            model.received[item.cid] = model.received.get(item.cid, 0) + 1
            # An id used again after its Cancel names a new event.
            model.cancelled_unanswered.discard(item.cid)
            model.roles.setdefault(item.cid, set()).add(item.role)
            if item.answerable:
                model.roles[item.cid].add("answerable")
        elif item.role == "cancel":
            cid = item.cid
            assert cid is not None
            if model.received.get(cid) == 1 and not model.answered.get(cid):
                model.cancelled_unanswered.add(cid)
        elif item.role == "ping":
            model.pings.append(payload)

    def _parse_written(self) -> None:
        data = self.model.written
        while len(data) >= 4:
            (length,) = struct.unpack_from("!I", data)
            self.case.assertGreater(length, 0)
            self.case.assertLessEqual(length, MAX_MESSAGE_SIZE)
            if len(data) < 4 + length:
                break
            message_type = data[4]
            payload = bytes(data[5 : 4 + length])
            del data[: 4 + length]
            self._written_frame(message_type, payload)

    def _written_frame(self, message_type: int, payload: bytes) -> None:
        model = self.model
        self.case.assertIn(message_type, AGENT_TYPES)
        if message_type == AGENT_RESPONSE:
            response = m.decode(payload, m.AgentResponse)
            self.case.assertEqual(response.version, 2)
            self.case.assertEqual(set(json.loads(payload)), RESPONSE_FIELDS)
            cid = response.audit.custom.get("correlation_id")
            self.case.assertIsInstance(cid, str)
            self.case.assertIn(cid, model.received, f"an answer for {cid!r}, which the agent never received")
            count = model.answered.get(cid, 0) + 1
            model.answered[cid] = count
            self.case.assertLessEqual(
                count, model.received[cid], f"{count} answers for {cid!r}, received {model.received[cid]} time(s)"
            )
            self.case.assertNotIn(cid, model.cancelled_unanswered, f"an answer for {cid!r} after its Cancel")
            self._check_decision(cid, response)
            if self.blocked_since is not None:
                self.answers_while_blocked += 1
                self.case.assertLessEqual(
                    self.answers_while_blocked,
                    self.load_when_blocked,
                    "more answers written while the proxy reads nothing than events taken",
                )
        elif message_type == PONG:
            self.case.assertIsNone(self.blocked_since, "a Pong written while the proxy reads nothing")
            self.case.assertIn(payload, model.pings)
            model.pings.remove(payload)
            model.pongs += 1
        elif message_type == FLOW_CONTROL:
            action = json.loads(payload)["action"]
            expected = 1 if not model.flow or model.flow[-1] == 2 else 2
            self.case.assertEqual(action, expected, f"FlowControl {model.flow + [action]}")
            model.flow.append(action)
        elif message_type == HEALTH_STATUS:
            self.case.assertIn(json.loads(payload)["state"], (1, 2, 3, 4))

    def _check_decision(self, cid: str, response: m.AgentResponse) -> None:
        decision = response.decision
        roles = self.model.roles[cid]
        status = decision.status if isinstance(decision, m.Block) else None
        handled = response.audit.custom.get("handled")
        if status in (500, 503):
            # The error decision: a failure, a non-answer, an invalid event,
            # or one over a limit.
            self.case.assertIn("agent_error", response.audit.tags)
            return
        self.case.assertIn("event", roles, f"{cid!r} answered {decision!r}, yet never valid")
        self.case.assertEqual(handled, cid, "an answer carries the id of another event")
        kind = cid.split("-", 1)[0]
        self.case.assertIn(kind, ("now", "later", "async"))

    def check_bounds(self) -> None:
        p = self.protocol
        if self.gone:
            self.case.assertEqual((p.load, p._held_bytes), (0, 0))
            return
        self.case.assertLessEqual(p.in_flight, p.limit)
        self.case.assertLessEqual(p.queued, p.max_queued)
        held = sum(e.size for e in [*p._active.values(), *p._queue.values()])
        self.case.assertEqual(p._held_bytes, held)
        if p.load >= 2:
            self.case.assertLessEqual(p._held_bytes, MAX_HELD)
        self.case.assertEqual(self.budget.total, p._held_bytes)
        self.case.assertLessEqual(p.buffered_bytes, 4 + MAX_MESSAGE_SIZE)
        if not self.closing:
            if p.load >= p.limit:
                self.case.assertTrue(p.paused, "at the limit and not paused")
            self.case.assertEqual(p.paused, bool(self.model.flow) and self.model.flow[-1] == 1)

    def finish(self) -> None:
        """Every handler done, every byte read: every event received has its answer."""
        if not self.closing:
            self.stop_reading(False)
            self.deliver(10**12)
            self.settle()
            self.replay()
        while not self.closing:
            waiting = [(cid, d) for cid, d in self.agent.later if not d.called]
            if not waiting:
                break
            waiting[0][1].callback(allow().custom(handled=waiting[0][0]))
            self.replay()
        if not self.closing:
            # Whatever can be answered, is: what is left waits on handlers
            # that never answer, running, or queued behind them.
            model = self.model
            running = self.protocol.in_flight_ids()
            queued = [e.correlation_id for e in self.protocol._queue.values()]
            for cid in running:
                self.case.assertEqual(cid.split("-", 1)[0], "never", f"{cid!r} still running")
            if queued:
                self.case.assertEqual(len(running), LIMIT, "events queued with a slot free")
            for cid, count in model.received.items():
                if count != 1 or cid in model.cancelled_unanswered:
                    continue
                answers = model.answered.get(cid, 0)
                if "invalid" not in model.roles[cid] or "answerable" in model.roles[cid]:
                    self.case.assertTrue(
                        answers == 1 or (answers == 0 and cid in running + queued),
                        f"{cid!r} received once, answered {answers} times",
                    )
        self.transport.disconnecting = True
        self.settle()
        self.replay()
        self.check_bounds()
        self.case.assertEqual(self.budget.total, 0)
        # (The log rate limiter's windows are its factory's, not the connection's.)
        left = [c for c in self.clock.getDelayedCalls() if c.active() and "LogRateLimiter" not in repr(c)]
        self.case.assertEqual(left, [])

    def check_fatal_logged(self, events: list[dict[str, Any]]) -> None:
        if self.fatal_seen is None:
            return
        texts = " ".join(formatEvent(e) for e in events)
        self.case.assertRegex(
            texts, r"protocol error from proxy: (Invalid message format: )?(Zero-length message|Message too large|Unknown message type)"
        )


def check_log(case: SynchronousTestCase, events: list[dict[str, Any]]) -> None:
    """Every line one line, bounded, clean; no failure but a handler's own."""
    for logged in events:
        text = formatEvent(logged)
        case.assertTrue(is_clean(text), f"a log line with hidden characters: {text!r}")
        case.assertLessEqual(len(text), 1200, f"a log line of {len(text)} characters: {text[:300]!r}...")
        failure = logged.get("log_failure")
        if failure is not None:
            case.assertTrue(
                failure.check(RuntimeError) and str(failure.value).startswith(("boom ", "late failure ")),
                f"an unexpected failure logged: {failure.getTraceback()}",
            )
            case.assertTrue(is_clean(failure.getErrorMessage()), failure.getErrorMessage())
            case.assertLessEqual(len(failure.getErrorMessage()), 600)
        if logged.get("log_level") in (LogLevel.critical,):
            case.assertIsNotNone(failure, text)
        case.assertNotIn("Unhandled error in Deferred", text)


def run_steps(case: SynchronousTestCase, mode: str, steps: list[tuple[Any, ...]]) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        run = Run(case, mode)
        for kind, *args in steps:
            if kind == "event":
                run.event(*args)
            elif kind == "invalid":
                run.invalid(*args)
            elif kind == "cancel":
                run.cancel(*args)
            elif kind == "ping":
                run.ping(*args)
            elif kind == "other":
                message_type, payload = args
                run.send(Sent(message_type, frame(message_type, payload), "other"))
            elif kind == "fatal":
                run.fatal(*args)
            elif kind == "deliver":
                run.deliver(args[0])
            elif kind == "fire":
                run.fire(*args)
            elif kind == "time":
                run.advance(args[0])
            elif kind == "stop-reading":
                run.stop_reading(args[0])
            run.settle()
            run.replay()
            run.check_bounds()
        run.finish()
        run.check_fatal_logged(events)
        # What the examples reached (pytest --hypothesis-show-statistics).
        for name in sorted(k for k, v in run.protocol.stats.items() if v):
            event(name)
        if run.fatal_seen is not None:
            event("framing broken")
    finally:
        globalLogPublisher.removeObserver(events.append)
    check_log(case, events)
    case.flushLoggedErrors(RuntimeError, CancelledError)


class HostileProxyPropertyTests(SynchronousTestCase):
    """Whatever the proxy sends, the agent answers what it should, within its bounds."""

    @PROPERTY
    @given(STEPS)
    def test_a_dialling_agent(self, steps: list[tuple[Any, ...]]) -> None:
        run_steps(self, "reverse", steps)

    @PROPERTY
    @given(STEPS)
    def test_a_listening_agent(self, steps: list[tuple[Any, ...]]) -> None:
        run_steps(self, "forward", steps)
