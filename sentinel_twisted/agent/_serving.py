# -*- test-case-name: tests.agent.test_protocol -*-
"""
Serving the proxy's events on an agent connection, once registered: each
event runs its handler at once, up to the concurrency limit (beyond it a
bounded queue, beyond that the error decision), answers go back as soon
as they are ready, Cancel cancels a handler, FlowControl pauses the proxy
at the limit and resumes it at half, Ping gets a Pong, and HealthStatus
reports the agent's state.  L{AgentProtocol
<sentinel_twisted.agent.protocol.AgentProtocol>} is the rest: the
connection's registration and lifecycle.
"""

from __future__ import annotations

import collections
import copy
import inspect
import re
from typing import TYPE_CHECKING, Any

import msgspec
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .. import messages as m
from .._peertext import peer_text
from .._ratelimit import LogRateLimiter
from .._values import COUNTED_ABOVE, VALUE_COST, json_values, msgpack_values
from ..errors import AgentProtocolError, InvalidMessage
from ..forward import _LENIENT_ERRORS, MSGPACK, PayloadCodec, _lenient_field
from ..messages._types import InvalidBase64
from ..wire import MessageType
from ._interfaces import IAgent
from .base import EVENT_HANDLERS
from .budget import HeldEventBudget
from .errors import AgentHandlerError
from .responses import ResponseBuilder

if TYPE_CHECKING:
    from .protocol import AgentSettings

#: The agent protocol's logger (this is its serving half).
log = Logger(namespace="sentinel_twisted.agent.protocol")

#: Characters of the proxy's connection id, and of its id or version, that
#: a log line quotes (the proxy chooses them; the listener's lines cut
#: agent-chosen text the same way).
_CONNECTION_ID_IN_LOG = 80
_PROXY_TEXT_IN_LOG = 64
#: Characters of a decoding error's text a log line quotes: it may quote a
#: value of the proxy's ("Invalid enum value '...'"), of any length.
_ERROR_IN_LOG = 160
#: Characters of a handler's exception text a log line (and its traceback)
#: quotes: it may quote the event ("KeyError: '<a header of 1 MiB>'").
_HANDLER_ERROR_IN_LOG = 500

#: The events whose JSON can hold any number of values (headers,
#: categories, metadata, a configuration).  Every other event's fields are
#: a fixed few, and a field it does not have is skipped, not decoded; in
#: MessagePack every event is counted (its data may be any value).
_MANY_VALUED = frozenset(
    {
        MessageType.REQUEST_HEADERS,
        MessageType.RESPONSE_HEADERS,
        MessageType.GUARDRAIL_INSPECT,
        MessageType.CONFIGURE,
    }
)

_EVENTS: dict[int, tuple[type[Any], str]] = {
    message_type: (cls, EVENT_HANDLERS[cls.event_type])
    for message_type, cls in m.EVENT_CLASSES.items()
}


def routing_id(event: Any) -> str:
    """
    The id the proxy waits on for this event's answer (SPEC sections 4 and
    6): C{metadata.correlation_id} for RequestHeaders (falling back to the
    top-level id), the top-level C{correlation_id} for every other event.
    """
    return m.event_correlation_id(event)


class _Entry:
    """One event being served (or waiting for a free slot)."""

    __slots__ = ("correlation_id", "event", "handler", "deferred", "cancelled", "serial", "size")

    def __init__(self, serial: int, correlation_id: str, event: Any, handler: str, size: int) -> None:
        self.serial = serial
        self.correlation_id = correlation_id
        self.event = event
        self.handler = handler
        #: The bytes its frame's payload and its decoded values are counted
        #: for (see AgentSettings.max_held_event_bytes).
        self.size = size
        self.deferred: Deferred[Any] | None = None
        self.cancelled = False


class _LenientIds(msgspec.Struct):
    """
    Enough of a garbled event to find whom to answer: where its id may be,
    left undecoded (the rest of the event is skipped), so that looking for
    it decodes nothing else, however large the event.
    """

    correlation_id: msgspec.Raw = msgspec.Raw()
    metadata: msgspec.Raw = msgspec.Raw()


class _LenientMetadata(msgspec.Struct):
    """A RequestHeaders event's metadata, as a map: its id, undecoded."""

    correlation_id: msgspec.Raw = msgspec.Raw()


class _LenientMetadataArray(msgspec.Struct, array_like=True):
    """MessagePack's positional metadata: it starts with the id (the rest is skipped)."""

    correlation_id: msgspec.Raw


class _AnObject(msgspec.Struct):
    """
    What a Ping must be to get its Pong: an object (a map), read without
    decoding what it holds (a Ping may be 64 KiB of nested lists).
    """


# How a RequestHeaders event's metadata is read for its id: as a map, or
# in MessagePack's positional layout (see forward._lenient_field).
_METADATA_SHAPES = (_LenientMetadata, _LenientMetadataArray)


def _lenient_id(message_type: int, payload: bytes, msgpack: bool) -> str | None:
    """
    The correlation id a garbled event (or one too large to decode) names,
    where the proxy waits for its answer; C{None} if it names none that is
    a non-empty string.
    """
    module: Any = msgspec.msgpack if msgpack else msgspec.json
    try:
        ids = module.decode(payload, type=_LenientIds)
    except RecursionError:
        # Nested too deeply to be read, even skipped; its id may be
        # readable all the same.
        return None if msgpack else _shallow_json_id(message_type, payload)
    except _LENIENT_ERRORS:
        return None
    if message_type == MessageType.REQUEST_HEADERS and ids.metadata:
        # Reference agents answer a RequestHeaders by its metadata's id.
        try:
            raw = _lenient_field(module, ids.metadata, _METADATA_SHAPES, "correlation_id")
            cid = module.decode(raw, type=str) if raw else None
        except _LENIENT_ERRORS:
            cid = None
        if cid:
            return str(cid)
    if not ids.correlation_id:
        return None
    try:
        cid = module.decode(ids.correlation_id, type=str)
    except _LENIENT_ERRORS:
        return None
    return str(cid) or None


# A string of JSON once its escapes are masked (see _shallow_json_id).
_MASKED_STRING = re.compile(rb'"[^"]*"')
_WHITESPACE = b" \t\r\n"
_SKIP_WHITESPACE = re.compile(rb"[ \t\r\n]*")
# How many places that look like the key are looked at, each costing a
# pass over what comes before it.
_KEY_CANDIDATES = 4


def _shallow_json_id(message_type: int, payload: bytes) -> str | None:
    """
    The correlation id of a JSON event nested too deeply to be decoded (the
    decoder refuses to go deeper even to skip a value), read where the
    proxy writes it, without decoding the rest: C{metadata.correlation_id}
    (its first key) for RequestHeaders, else the top-level
    C{correlation_id}.  A few passes over the payload, in C.
    """
    # Escapes masked (the same length): each remaining quote begins or
    # ends a string, and every offset is the payload's.
    masked = payload.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    if message_type == MessageType.REQUEST_HEADERS:
        start = _value_after_key(masked, b"metadata")
        if start is not None and masked[start : start + 1] == b"{":
            inner = _SKIP_WHITESPACE.match(masked, start + 1).end()  # type: ignore[union-attr]
            if masked.startswith(b'"correlation_id"', inner):
                cid = _string_at(payload, masked, _after_colon(masked, inner + 16))
                if cid:
                    return cid
    start = _value_after_key(masked, b"correlation_id")
    return _string_at(payload, masked, start) if start is not None else None


def _value_after_key(masked: bytes, key: bytes) -> int | None:
    """Where the value of C{key}, a key of the top-level object, starts in C{masked}."""
    quoted = b'"' + key + b'"'
    found = 0
    for _ in range(_KEY_CANDIDATES):
        at = masked.find(quoted, found)
        if at < 0:
            return None
        found = at + 1
        before = masked[:at]
        if before.count(b'"') % 2:
            continue  # inside a string
        outside = _MASKED_STRING.sub(b"", before)
        depth = outside.count(b"{") + outside.count(b"[") - outside.count(b"}") - outside.count(b"]")
        if depth != 1 or not outside.lstrip(_WHITESPACE).startswith(b"{"):
            continue
        value = _after_colon(masked, at + len(quoted))
        if value is not None:
            return value
    return None


def _after_colon(masked: bytes, at: int) -> int | None:
    """Where the value starts after the key ending at C{at}, C{None} if no colon follows."""
    skip = _SKIP_WHITESPACE.match
    at = skip(masked, at).end()  # type: ignore[union-attr]
    if masked[at : at + 1] != b":":
        return None
    return skip(masked, at + 1).end()  # type: ignore[union-attr]


def _string_at(payload: bytes, masked: bytes, start: int | None) -> str | None:
    """The non-empty JSON string starting at C{start}, C{None} if there is none."""
    if start is None or masked[start : start + 1] != b'"':
        return None
    end = masked.find(b'"', start + 1)
    if end < 0:
        return None
    try:
        text = msgspec.json.decode(payload[start : end + 1], type=str)
    except _LENIENT_ERRORS:
        return None
    return text or None


class _ShownError(Exception):
    """An exception's text as a log line shows it (see L{_shown})."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _shown(failure: Failure) -> Failure:
    """
    C{failure} for a log line: its exception's text cut short and escaped,
    in the traceback too (a copy, if it needs it: the handler's own is left
    alone).
    """
    text = failure.getErrorMessage()
    shown = peer_text(text, _HANDLER_ERROR_IN_LOG)
    if shown == text:
        return failure
    quoted = copy.copy(failure)
    quoted.value = _ShownError(shown)
    return quoted


class EventServing:
    """
    The serving half of L{AgentProtocol
    <sentinel_twisted.agent.protocol.AgentProtocol>}, which sets every
    attribute below in its constructor.
    """

    settings: AgentSettings
    agent: IAgent
    clock: IReactorTime
    log_limiter: LogRateLimiter
    codec: PayloadCodec
    capabilities: m.AgentCapabilities | None
    connection_id: str
    proxy_id: str
    registered: bool
    draining: bool
    paused: bool
    write_blocked: bool
    limit: int
    resume_at: int
    max_queued: int
    stats: collections.Counter[str]
    transport: ITransport | None
    _lifecycle: Any
    _serial: int
    _active: dict[int, _Entry]
    #: Events waiting for a free slot, by serial, oldest first (a cancelled
    #: one leaves at once, without a search through the others).
    _queue: collections.OrderedDict[int, _Entry]
    #: The bytes the events running and queued are counted for.
    _held_bytes: int
    #: The account of held events this connection shares with the others
    #: of its process, C{None}: only its own bound applies.
    held_event_budget: HeldEventBudget | None
    #: When it last had no event in flight (its handshake, registration,
    #: or the end of its last event), on its clock.
    idle_since: float
    _by_id: dict[str, _Entry]
    _releasing: bool

    if TYPE_CHECKING:

        def send_frame(self, message_type: int, payload: bytes) -> None: ...

    @property
    def in_flight(self) -> int:
        """Handlers running now."""
        return len(self._active)

    @property
    def queued(self) -> int:
        """Events waiting for a free slot."""
        return len(self._queue)

    @property
    def load(self) -> int:
        """Events being served or waiting for a free slot."""
        return len(self._active) + len(self._queue)

    def in_flight_ids(self) -> list[str]:
        """The correlation ids of the events being served."""
        return [e.correlation_id for e in self._active.values()]

    def _cancel_everything(self) -> int:
        entries = list(self._active.values())
        self._active.clear()
        self._queue.clear()
        self._account_held(-self._held_bytes)
        self._by_id.clear()
        for entry in entries:
            entry.cancelled = True
            if entry.deferred is not None:
                entry.deferred.cancel()
        return len(entries)

    def _serving_frame(self, message_type: int, payload: bytes) -> None:
        spec = _EVENTS.get(message_type)
        if spec is not None:
            self._event_received(message_type, payload, spec[0], spec[1])
        elif message_type == MessageType.CANCEL:
            self._cancel_received(payload)
        elif message_type == MessageType.PING:
            self._ping_received(payload)
        elif message_type == MessageType.PONG:
            pass
        else:
            kind = MessageType(message_type).wire_name
            if message_type in (MessageType.HANDSHAKE_REQUEST, MessageType.HANDSHAKE_RESPONSE):
                # Either side's, depending on the mode: only its place is wrong.
                key = "handshake-frame-after-handshake"
                text = (
                    "Proxy {proxy_id} sent a second handshake frame ({kind}) on connection "
                    "{connection_id}, after the handshake; ignored"
                )
            else:
                key = "agent-frame-from-proxy"
                text = (
                    "Proxy {proxy_id} sent {a_kind} frame on connection {connection_id}, "
                    "which only agents send; ignored"
                )
            self.log_limiter.warn(
                log,
                key,
                text,
                proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
                kind=kind,
                a_kind=f"an {kind}" if kind[0] in "AEIOU" else f"a {kind}",
                connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            )

    def _event_received(self, message_type: int, payload: bytes, cls: type[Any], handler: str) -> None:
        self.stats["events"] += 1
        # What holding the event costs: its payload, and what decoding makes
        # of its values when there can be many (see AgentSettings).
        size = len(payload)
        max_values = self.settings.max_event_values
        if (size > COUNTED_ABOVE or size > max_values) and (
            message_type in _MANY_VALUED or self.codec.name == MSGPACK
        ):
            counter = msgpack_values if self.codec.name == MSGPACK else json_values
            values = counter(payload, max_values)
            if values > max_values:
                self._too_many_values(message_type, payload)
                return
            size += VALUE_COST * values
        try:
            event = self.codec.decode_event(payload, cls)
        except InvalidMessage as e:
            self._bad_event(message_type, payload, e)
            return
        cid = routing_id(event)
        if self._held_bytes + size > self.settings.max_held_event_bytes and self.load:
            self._overloaded(
                cid,
                "Agent {agent_id} holds {held} bytes of events on connection {connection_id} "
                "(limit {max_held}) and the proxy keeps sending; answering {cid!r} with the "
                "error decision",
                held=self._held_bytes,
                max_held=self.settings.max_held_event_bytes,
            )
            return
        budget = self.held_event_budget
        if budget is not None and budget.would_overflow(size):
            # The same answer for the process's bound as for the
            # connection's: no room for it.
            budget.refused += 1
            self._overloaded(
                cid,
                "Agent {agent_id}'s proxy connections hold {total} bytes of events "
                "(limit {limit} for all of them) and the proxy keeps sending on connection "
                "{connection_id}; answering {cid!r} with the error decision",
                total=budget.total,
                limit=budget.limit,
            )
            return
        self._serial += 1
        entry = _Entry(self._serial, cid, event, handler, size)
        if cid in self._by_id:
            self.log_limiter.warn(
                log,
                "duplicate-correlation-id",
                "Proxy sent a second event for correlation id {cid!r} while the first is in "
                "flight on connection {connection_id}; serving both",
                cid=peer_text(cid, _PROXY_TEXT_IN_LOG),
                connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            )
        slot_free = len(self._active) < self.limit
        if not slot_free and len(self._queue) >= self.max_queued:
            self._overloaded(
                cid,
                "Agent {agent_id} is over its limit on connection {connection_id} "
                "({limit} running, {queued} queued) and the proxy keeps sending; "
                "answering {cid!r} with the error decision",
                limit=self.limit,
                queued=len(self._queue),
            )
            return
        went_busy = not self._active and not self._queue
        self._by_id[cid] = entry
        self._account_held(size)
        if went_busy:
            self._went_busy()
        if slot_free:
            self._start(entry)
        else:
            self._queue[entry.serial] = entry
        self._update_flow()

    def _account_held(self, change: int) -> None:
        """Count C{change} more bytes of events held, here and in the process's budget."""
        self._held_bytes += change
        budget = self.held_event_budget
        if budget is not None:
            budget.total += change

    def _went_busy(self) -> None:
        """An event is in flight now, and none was: for a listener's idle policy."""

    def _went_idle(self) -> None:
        """The last event in flight ended (C{idle_since} is now): for a listener's idle policy."""

    def _overloaded(self, cid: str, text: str, **fields: object) -> None:
        """Answer C{cid} at once with the error decision, status 503: no room to serve it."""
        self.stats["overloaded"] += 1
        self.log_limiter.warn(
            log,
            "overloaded",
            text,
            agent_id=self.settings.agent_id,
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            cid=peer_text(cid, _PROXY_TEXT_IN_LOG),
            **fields,
        )
        self._send_answer(cid, self.settings.error_answer(503, "agent overloaded"))

    def _answer_id(self, message_type: int, payload: bytes) -> str | None:
        """The correlation id an event that cannot be decoded names, if any."""
        # Cancel and Ping are JSON on a MessagePack connection too; a JSON
        # event there is read the same way.
        msgpack = self.codec.name == MSGPACK and payload[:1] != b"{"
        return _lenient_id(message_type, payload, msgpack)

    def _too_many_values(self, message_type: int, payload: bytes) -> None:
        """
        An event that would decode to more than C{max_event_values} values:
        answered with the error decision, without being decoded.
        """
        self.stats["oversized_events"] += 1
        cid = self._answer_id(message_type, payload)
        self.log_limiter.warn(
            log,
            "event-too-many-values",
            "Proxy sent a {kind} event {cid} of {size:,} bytes on connection {connection_id} "
            "that holds more than {limit:,} values (the agent's max_event_values); {action}",
            kind=MessageType(message_type).wire_name,
            cid="without a usable correlation id" if cid is None else repr(peer_text(cid, _PROXY_TEXT_IN_LOG)),
            size=len(payload),
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            limit=self.settings.max_event_values,
            action="dropped" if cid is None else "answering with the error decision without decoding it",
        )
        if cid is not None:
            self._send_answer(cid, self.settings.error_answer())

    def _bad_event(self, message_type: int, payload: bytes, error: InvalidMessage) -> None:
        self.stats["invalid_events"] += 1
        cid = self._answer_id(message_type, payload)
        if cid is not None:
            self._invalid_event_answered(message_type, cid, error)
        else:
            self.log_limiter.warn(
                log,
                "invalid-event-without-id",
                "Proxy sent an invalid {kind} event without a usable correlation id: {error}; dropped",
                kind=MessageType(message_type).wire_name,
                error=peer_text(error, _ERROR_IN_LOG),
            )

    def _invalid_event_answered(self, message_type: int, cid: str, error: object) -> None:
        """Log (rate-limited) an invalid event of the proxy's, and answer C{cid} with the error decision."""
        self.log_limiter.warn(
            log,
            "invalid-event",
            "Proxy sent an invalid {kind} event {cid!r}: {error}; answering with the error decision",
            kind=MessageType(message_type).wire_name,
            cid=peer_text(cid, _PROXY_TEXT_IN_LOG),
            error=peer_text(error, _ERROR_IN_LOG),
        )
        self._send_answer(cid, self.settings.error_answer())

    def _start(self, entry: _Entry) -> None:
        self._active[entry.serial] = entry
        try:
            result = getattr(self.agent, entry.handler)(entry.event)
        except Exception:
            self._handler_failed(Failure(), entry)
            return
        if isinstance(result, Deferred):
            deferred: Deferred[Any] = result
        elif inspect.iscoroutine(result):
            deferred = Deferred.fromCoroutine(result)
        else:
            deferred = succeed(result)
        entry.deferred = deferred
        deferred.addCallbacks(
            self._handler_done, self._handler_failed, callbackArgs=(entry,), errbackArgs=(entry,)
        )

    def _finish(self, entry: _Entry) -> bool:
        """Take C{entry} out of the running set; C{False} if it was cancelled."""
        if entry.cancelled or self._active.pop(entry.serial, None) is None:
            return False
        self._account_held(-entry.size)
        if self._by_id.get(entry.correlation_id) is entry:
            del self._by_id[entry.correlation_id]
        return True

    def _handler_done(self, result: object, entry: _Entry) -> None:
        if not self._finish(entry):
            return
        try:
            self._answer_with(result, entry)
        except Exception:
            # An answer that is not one inside (an AgentResponse built with
            # audit=None, a builder that raises): the handler's error, not
            # the reactor's, and the slot and the proxy are not left waiting.
            failure = Failure()
            kind = failure.type.__name__ if failure.type is not None else "error"
            detail = f"its answer cannot be sent: {kind}: {peer_text(failure.getErrorMessage(), _HANDLER_ERROR_IN_LOG)}"
            self._report_error(entry, AgentHandlerError(entry.handler, entry.correlation_id, detail), failure)
            self._send_answer(entry.correlation_id, self.settings.error_answer())
        self._slot_freed()

    def _answer_with(self, result: object, entry: _Entry) -> None:
        """Send what a handler returned as the answer to C{entry}, the error decision if it is none."""
        if isinstance(result, ResponseBuilder):
            response = result.build()
        elif isinstance(result, m.AgentResponse):
            response = result
        else:
            hint = " (forgot to return allow()?)" if result is None else ""
            self._report_error(
                entry,
                AgentHandlerError(
                    entry.handler,
                    entry.correlation_id,
                    f"returned {type(result).__name__}, not an AgentResponse or "
                    f"ResponseBuilder{hint}",
                ),
                None,
            )
            response = self.settings.error_answer()
        self._send_answer(entry.correlation_id, response)

    def _handler_failed(self, failure: Failure, entry: _Entry) -> None:
        if not self._finish(entry):
            return None
        if failure.check(InvalidBase64):
            # The handler read the event's base64 data, which the proxy sent
            # garbled: the proxy's invalid event, as one msgspec refuses.
            self.stats["invalid_events"] += 1
            self._invalid_event_answered(entry.event.message_type, entry.correlation_id, failure.value)
            self._slot_freed()
            return None
        if failure.check(CancelledError):
            detail = "cancelled by the handler itself"
        else:
            kind = failure.type.__name__ if failure.type is not None else "error"
            # The exception's text may quote the event, of any length.
            detail = f"{kind}: {peer_text(failure.getErrorMessage(), _HANDLER_ERROR_IN_LOG)}"
        self._report_error(entry, AgentHandlerError(entry.handler, entry.correlation_id, detail), failure)
        self._send_answer(entry.correlation_id, self.settings.error_answer())
        self._slot_freed()
        return None

    def _report_error(self, entry: _Entry, error: AgentHandlerError, failure: Failure | None) -> None:
        # The proxy chooses the events a handler fails on, as often as it
        # likes: a few lines (with their tracebacks) per handler per period.
        self.stats["handler_errors"] += 1
        decision = "allow (fail-open)" if self.settings.fail_open else "block 500 (fail-closed)"
        kind = f"handler-failed:{entry.handler}"
        if failure is not None and not failure.check(CancelledError):
            self.log_limiter.emit(
                log,
                LogLevel.critical,
                kind,
                "{error}; answered with {decision}",
                log_failure=_shown(failure),
                error=str(error),
                decision=decision,
            )
        else:
            self.log_limiter.emit(
                log, LogLevel.error, kind, "{error}; answered with {decision}", error=str(error), decision=decision
            )

    def _slot_freed(self) -> None:
        # Handlers that answer synchronously re-enter here from _start; the
        # outermost call does the loop, so the stack stays flat.
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._queue and len(self._active) < self.limit:
                self._start(self._queue.popitem(last=False)[1])
        finally:
            self._releasing = False
        self._update_flow()
        if not self._active and not self._queue:
            # Nothing in flight: idle from now (a listener may close or
            # evict a connection idle too long).
            self.idle_since = self.clock.seconds()
            self._went_idle()
            if self.draining:
                self._lifecycle.drained()

    def _update_flow(self) -> None:
        if self.draining:
            return
        load = self.load
        if not self.paused and load >= self.limit:
            self.paused = True
            self.stats["pauses"] += 1
            # As often as the proxy fills the limit: a few lines per period.
            self.log_limiter.info(
                log,
                "flow-paused",
                "Agent {agent_id} at its limit ({limit}) on connection {connection_id}: pausing",
                agent_id=self.settings.agent_id,
                limit=self.limit,
                connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            )
            self._send(MessageType.FLOW_CONTROL, self.codec.pause)
        elif self.paused and load <= self.resume_at:
            self.paused = False
            self.stats["resumes"] += 1
            self.log_limiter.info(
                log,
                "flow-resumed",
                "Agent {agent_id} drained to {load} on connection {connection_id}: resuming",
                agent_id=self.settings.agent_id,
                load=load,
                connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            )
            self._send(MessageType.FLOW_CONTROL, self.codec.resume)

    def _send_answer(self, cid: str, response: m.AgentResponse) -> None:
        audit = response.audit
        custom = dict(audit.custom)
        custom["correlation_id"] = cid
        response = msgspec.structs.replace(response, audit=msgspec.structs.replace(audit, custom=custom))
        try:
            payload = self.codec.encode_response(response)
            if self.transport is not None:
                self.send_frame(MessageType.AGENT_RESPONSE, payload)
        except AgentProtocolError as e:
            fallback = self.settings.error_answer()
            fallback.audit.custom["correlation_id"] = cid
            try:
                payload = self.codec.encode_response(fallback)
                if self.transport is not None and self.registered:
                    self.send_frame(MessageType.AGENT_RESPONSE, payload)
            except AgentProtocolError as again:
                # The id alone makes every answer too large (the proxy chose
                # it, up to a frame's 16 MiB): nothing can reach the proxy.
                self.stats["unanswerable"] += 1
                self.log_limiter.emit(
                    log,
                    LogLevel.error,
                    "unanswerable",
                    "Agent {agent_id} cannot answer {cid!r} on connection {connection_id} at all: "
                    "{error}, even as the error decision (its correlation id is {length:,} "
                    "characters long); the proxy is left to time it out",
                    agent_id=self.settings.agent_id,
                    cid=peer_text(cid, _PROXY_TEXT_IN_LOG),
                    connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
                    error=str(again),
                    length=len(cid),
                )
                return
            self.stats["handler_errors"] += 1
            self.log_limiter.emit(
                log,
                LogLevel.error,
                "answer-unsendable",
                "Agent {agent_id} cannot send its answer for {cid!r}: {error}; "
                "sent the error decision instead",
                agent_id=self.settings.agent_id,
                cid=peer_text(cid, _PROXY_TEXT_IN_LOG),
                error=str(e),
            )
            return
        self.stats["answers"] += 1

    def _send(self, message_type: int, payload: bytes) -> None:
        if self.transport is not None and self.registered:
            self.send_frame(message_type, payload)

    def _cancel_received(self, payload: bytes) -> None:
        try:
            message = self.codec.decode_control(payload, m.CancelMessage)
        except InvalidMessage as e:
            self.log_limiter.warn(
                log,
                "invalid-cancel",
                "Proxy sent an invalid Cancel: {error}",
                error=peer_text(e, _ERROR_IN_LOG),
            )
            return
        entry = self._by_id.pop(message.correlation_id, None)
        if entry is None:
            self.log_limiter.debug(
                log,
                "cancel-not-in-flight",
                "Cancel for {cid!r}, which is not in flight (already answered?)",
                cid=peer_text(message.correlation_id, _PROXY_TEXT_IN_LOG),
            )
            return
        self.stats["cancelled"] += 1
        entry.cancelled = True
        self._account_held(-entry.size)
        if self._active.pop(entry.serial, None) is not None:
            if entry.deferred is not None:
                entry.deferred.cancel()
        else:
            # Out of the queue now, not when a slot frees: else events sent
            # and cancelled while every slot is busy would pile up in it.
            del self._queue[entry.serial]
        self.log_limiter.debug(
            log,
            "cancelled",
            "Cancelled {cid!r} on connection {connection_id} (reason {reason})",
            cid=peer_text(message.correlation_id, _PROXY_TEXT_IN_LOG),
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            reason=message.reason,
        )
        self._slot_freed()

    def _ping_received(self, payload: bytes) -> None:
        try:
            self.codec.decode_control(payload, _AnObject)
        except InvalidMessage as e:
            self.log_limiter.warn(
                log,
                "invalid-ping",
                "Proxy sent an invalid Ping: {error}",
                error=peer_text(e, _ERROR_IN_LOG),
            )
            return
        if self.write_blocked:
            # The proxy is not reading what we write: a Pong would only
            # grow our buffer (a Ping costs the proxy nothing to send).
            self.stats["pings_not_answered"] += 1
            self.log_limiter.debug(
                log,
                "ping-not-answered",
                "Proxy {proxy_id} sent a Ping on connection {connection_id}, which it does not "
                "read; not answered",
                proxy_id=peer_text(self.proxy_id, _PROXY_TEXT_IN_LOG),
                connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
            )
            return
        # The same body back, byte for byte, as the reference does (SPEC
        # section 4), within the control frame limit, and not while the
        # proxy leaves our writes unread.
        self._send(MessageType.PONG, payload)

    def health_state(self) -> int:
        """
        What the next HealthStatus reports: C{draining}, else the agent's L{health <sentinel_twisted.agent.base.Agent.health>}.
        """
        if self.draining:
            return int(m.HealthState.DRAINING)
        try:
            return int(self.agent.health())
        except Exception:
            log.failure("Agent {agent_id}: health() failed; reporting unhealthy", agent_id=self.settings.agent_id)
            return int(m.HealthState.UNHEALTHY)

    def send_health(self) -> None:
        """Send a HealthStatus with the current state (the integer form)."""
        if self.capabilities is None or not self.capabilities.features.health_reporting:
            return
        message = m.HealthStatusMessage(state=self.health_state())
        self._send(MessageType.HEALTH_STATUS, self.codec.encode_control(message))
