# -*- test-case-name: tests.test_connection -*-
"""
What an agent sends on a registered connection, read by the proxy: each
AgentResponse goes to the request waiting on its correlation id (a broken
one fails its request at once when the id can still be read), and the
control messages (FlowControl, HealthStatus, Ping and Pong, MetricsReport,
ConfigUpdateRequest) update the connection or reach its listener.  An
invalid frame is logged, rate-limited, and costs the connection nothing.
L{AgentConnection <sentinel_twisted.proxy.connection.AgentConnection>} is
the rest: sending requests and control messages, and the connection's
state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .. import messages as m
from .._peertext import peer_text
from .._ratelimit import LogRateLimiter
from .._values import COUNTED_ABOVE, json_values, msgpack_values
from ..errors import InvalidMessage
from ..forward import codec_for
from ..messages._codec import check_answer_values
from ..wire import MessageType

if TYPE_CHECKING:
    from .connection import FrameSink
    from .pending import PendingTable

#: The connection's logger (this is its receiving half).
log = Logger(namespace="sentinel_twisted.connection")

_ANSWER = MessageType.AGENT_RESPONSE
_HEALTH = MessageType.HEALTH_STATUS
_METRICS = MessageType.METRICS_REPORT
_CONFIG_UPDATE = MessageType.CONFIG_UPDATE_REQUEST
_FLOW = MessageType.FLOW_CONTROL
_PING = MessageType.PING
_PONG = MessageType.PONG
_HANDSHAKE = (MessageType.HANDSHAKE_REQUEST, MessageType.HANDSHAKE_RESPONSE)

#: Characters of an agent id, a connection id, a correlation id and an
#: error text a log line carries (they are the peer's choice).
_ID_IN_LOG = 64
_CONNECTION_ID_IN_LOG = 80
_ERROR_IN_LOG = 160


class AgentFrames:
    """
    The receiving half of L{AgentConnection
    <sentinel_twisted.proxy.connection.AgentConnection>}, which sets every
    attribute below in its constructor.
    """

    connection_id: str
    encoding: str
    # The pool (a _ConnectionListener, as AgentConnection declares it); the
    # listener's methods take the AgentConnection, which this half is part of.
    listener: Any
    health_state: int | None
    last_health: m.HealthStatusMessage | None
    _sink: FrameSink
    _clock: IReactorTime
    _pending: PendingTable
    _paused: bool
    _write_blocked: bool
    _pings: dict[int, tuple[float, Deferred[float], IDelayedCall]] | None
    _decode_answer: Callable[[bytes], m.AgentResponse]
    _decode_control: Callable[..., Any]

    if TYPE_CHECKING:

        @property
        def log_limiter(self) -> LogRateLimiter: ...

        def log_fields(self) -> dict[str, str]: ...

        def _update_availability(self) -> None: ...

    def frame_received(self, message_type: int, payload: bytes) -> None:
        """One frame from the agent, after registration."""
        if message_type == _ANSWER:
            # An answer (nearly every frame), handled here without a call
            # of its own: decoded, matched to its request by correlation id,
            # and handed over.
            try:
                response = self._decode_answer(payload)
            except InvalidMessage as e:
                self._bad_answer(payload, e)
                return
            cid = response.audit.custom.get("correlation_id")
            # One lookup tells whether the id is waiting and since when.
            if cid.__class__ is not str or (entry := self._pending._remove(cid)) is None:
                self._unknown_answer(cid)
                return
            listener = self.listener
            # The time it took is worked out only for observers that want it.
            if listener is not None and (observe := listener._answer_observer) is not None:
                try:
                    observe(self, cid, self._clock.seconds() - entry.sent_at)
                except Exception:
                    listener._answer_observer_failed(observe)
            deferred = entry.deferred
            if deferred is None:
                # The caller's handlers, kept in the entry: called here, as
                # the entry's own callback would.
                try:
                    entry.answered(response, entry.arg)
                except Exception:
                    entry.answer_handler_failed()
            else:
                deferred.callback(response)
        elif message_type == _FLOW:
            self._flow_control_received(payload)
        elif message_type == _PING:
            self._ping_received(payload)
        elif message_type == _HEALTH:
            self._health_received(payload)
        elif message_type == _PONG:
            self._pong_received(payload)
        elif message_type == _METRICS:
            report = self._control(payload, dict, "MetricsReport")
            if report is not None and self.listener is not None:
                self.listener._connection_metrics(self, report)
        elif message_type == _CONFIG_UPDATE:
            request = self._control(payload, dict, "ConfigUpdateRequest")
            if request is not None and self.listener is not None:
                self.listener._connection_config_update(self, request)
        elif message_type in _HANDSHAKE:
            # Either side's, depending on the mode: only its place is wrong.
            self.log_limiter.warn(
                log,
                "handshake-frame-after-handshake",
                "Agent {agent_id} sent a second handshake frame ({kind}) on connection "
                "{connection_id}, after the handshake; ignored",
                kind=MessageType(message_type).wire_name,
                **self.log_fields(),
            )
        else:
            self.log_limiter.warn(
                log,
                "proxy-only-frame",
                "Agent {agent_id} sent a {kind} frame on connection {connection_id}, "
                "which only the proxy sends; ignored",
                kind=MessageType(message_type).wire_name,
                **self.log_fields(),
            )

    def _unknown_answer(self, cid: object) -> None:
        self.log_limiter.debug(
            log,
            "unknown-correlation-id",
            "Dropped an answer for unknown correlation id {cid!r} on connection {connection_id}",
            cid=peer_text(cid, _ID_IN_LOG) if isinstance(cid, str) else None,
            connection_id=peer_text(self.connection_id, _CONNECTION_ID_IN_LOG),
        )

    def _bad_answer(self, payload: bytes, error: InvalidMessage) -> None:
        # Fail the request it was meant for now, rather than let it time out,
        # read in the connection's own encoding.
        cid = codec_for(self.encoding).answer_correlation_id(payload)
        if cid is not None and self._pending.fail(cid, error):
            self.log_limiter.warn(
                log,
                "invalid-answer",
                "Agent {agent_id} answered {cid!r} on connection {connection_id} "
                "with an invalid AgentResponse: {error}",
                cid=peer_text(cid, _ID_IN_LOG),
                error=peer_text(error, _ERROR_IN_LOG),
                **self.log_fields(),
            )
            return
        self.log_limiter.warn(
            log,
            "invalid-answer",
            "Agent {agent_id} sent an invalid AgentResponse on connection {connection_id}: {error}",
            error=peer_text(error, _ERROR_IN_LOG),
            **self.log_fields(),
        )

    def _control(self, payload: bytes, shape: Any, kind: str) -> Any:
        try:
            if len(payload) > COUNTED_ABOVE:
                # A report or request is a map of the agent's choosing:
                # bounded as an answer is, before it is decoded.
                counter = json_values if payload[:1] == b"{" else msgpack_values
                check_answer_values(counter(payload, m.MAX_ANSWER_VALUES), kind)
            return self._decode_control(payload, shape)
        except InvalidMessage as e:
            self.log_limiter.warn(
                log,
                "invalid-control",
                "Agent {agent_id} sent an invalid {kind} on connection {connection_id}: {error}",
                kind=kind,
                error=peer_text(e, _ERROR_IN_LOG),
                **self.log_fields(),
            )
            return None

    def _flow_control_received(self, payload: bytes) -> None:
        message = self._control(payload, m.FlowControlMessage, "FlowControl")
        if message is None:
            return
        paused = message.pause_requested
        if paused is None:
            # Only pause (1) and resume (2) are defined: anything else
            # changes nothing (it used to resume a paused connection).
            self.log_limiter.warn(
                log,
                "invalid-control",
                "Agent {agent_id} sent a FlowControl with an unknown action on connection "
                "{connection_id}; ignored",
                **self.log_fields(),
            )
            return
        if paused != self._paused:
            self._paused = paused
            self._update_availability()
            self.log_limiter.info(
                log,
                "flow-control",
                "Agent {agent_id} {action} connection {connection_id}",
                action="paused" if paused else "resumed",
                **self.log_fields(),
            )
            if self.listener is not None:
                self.listener._connection_flow_changed(self, paused)

    def _health_received(self, payload: bytes) -> None:
        message = self._control(payload, m.HealthStatusMessage, "HealthStatus")
        if message is None:
            return
        state = message.state_code
        if state is None:
            # No state in it (absent, null, or a name not known): the last
            # one stands, as the reference keeps it (if let Some(state)).
            self.log_limiter.warn(
                log,
                "invalid-control",
                "Agent {agent_id} sent a HealthStatus without a state on connection "
                "{connection_id}; ignored",
                **self.log_fields(),
            )
            return
        self.last_health = message
        self.health_state = state
        if self.listener is not None:
            self.listener._connection_health_changed(self, self.health_state)

    def _ping_received(self, payload: bytes) -> None:
        # Any object is answered, as the reference does (a sequence of -1,
        # no timestamp, more fields): the contract is the same body back.
        if self._control(payload, dict, "Ping") is None:
            return
        if self._write_blocked:
            # The agent is not reading what we write: a reply would only
            # grow our buffer (a Ping costs the agent nothing to send).
            self.log_limiter.debug(
                log,
                "ping-not-answered",
                "Agent {agent_id} sent a Ping on connection {connection_id}, which it "
                "does not read; not answered",
                **self.log_fields(),
            )
            return
        # The same body, byte for byte (SPEC section 4): within the control
        # frame limit, and not while the agent leaves our writes unread.
        self._sink.send_frame(MessageType.PONG, payload)

    def _pong_received(self, payload: bytes) -> None:
        message = self._control(payload, m.PingMessage, "Pong")
        if message is None:
            return
        pings = self._pings
        entry = pings.pop(message.sequence, None) if pings else None
        if entry is not None:
            sent, waiter, expiry = entry
            if expiry.active():
                expiry.cancel()
            waiter.callback(self._clock.seconds() - sent)
