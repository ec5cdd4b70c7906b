# -*- test-case-name: tests.test_messages -*-
"""
Control messages: Cancel, Ping and Pong, FlowControl and HealthStatus.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from ._types import I64, U64, FlowAction, HealthState, check_u64


class CancelMessage(Struct, kw_only=True):
    """
    The proxy tells an agent it no longer needs the answer for
    C{correlation_id} (C{reason}: a L{CancelReason}).

    @ivar correlation_id: the request whose answer is no longer needed.
    @ivar reason: why, a L{CancelReason} number.
    @ivar timestamp_ms: when it was sent, milliseconds since the Unix epoch.
    """

    correlation_id: str
    reason: int
    timestamp_ms: I64


class PingMessage(Struct, kw_only=True):
    """
    Ping and Pong share this body; Pong echoes the Ping's.

    @ivar sequence: the Ping's number; its Pong echoes it.
    @ivar timestamp_ms: when the Ping was sent, milliseconds since the Unix
        epoch.
    """

    sequence: U64
    timestamp_ms: I64

    def __post_init__(self) -> None:
        check_u64(self, 'sequence')


class FlowControlMessage(Struct, kw_only=True, omit_defaults=True):
    """
    C{{"action": 1}} pauses, C{{"action": 2}} resumes.  The crate's struct
    form C{{"action": {"type": "pause"}}} is accepted too, never sent.

    @ivar action: a L{FlowAction} number, or the crate's C{{"type": ...}}
        form; C{None} if absent.
    @ivar correlation_id: the request it concerns, C{None} for the whole
        connection.
    @ivar timestamp_ms: when it was sent, milliseconds since the Unix epoch,
        C{None} if absent.
    """

    action: int | dict[str, Any] | None = None
    correlation_id: str | None = None
    timestamp_ms: I64 | None = None

    @property
    def paused(self) -> bool:
        """Whether the sender asks for a pause (anything else means normal)."""
        action = self.action
        if isinstance(action, dict):
            return action.get("type") == "pause"
        return action == FlowAction.PAUSE

    @property
    def pause_requested(self) -> bool | None:
        """
        C{True} for a pause, C{False} for a resume, in either form;
        C{None} for any other action (not defined by the protocol).
        """
        action = self.action
        if isinstance(action, dict):
            action = action.get("type")
            return True if action == "pause" else False if action == "resume" else None
        if action.__class__ is not int:
            return None
        return True if action == FlowAction.PAUSE else False if action == FlowAction.RESUME else None


_HEALTH_NAMES = {
    "healthy": HealthState.HEALTHY,
    "degraded": HealthState.DEGRADED,
    "draining": HealthState.DRAINING,
    "unhealthy": HealthState.UNHEALTHY,
}


class HealthStatusMessage(Struct, kw_only=True, omit_defaults=True):
    """
    C{{"state": 1}} (the wire contract) or the crate's C{{"state": {"status": "healthy"}}}.

    @ivar state: a L{HealthState} number, or the crate's C{{"status": name}}
        form; C{None} if absent (see L{state_code}).
    @ivar agent_id: the sending agent's id, C{None} if absent.
    @ivar message: a human-readable detail, C{None} if absent.
    @ivar timestamp_ms: when it was sent, milliseconds since the Unix epoch,
        C{None} if absent.
    """

    state: int | dict[str, Any] | None = None
    agent_id: str | None = None
    message: str | None = None
    timestamp_ms: I64 | None = None

    @property
    def state_code(self) -> int | None:
        """The L{HealthState} number of either form, C{None} if it cannot be read."""
        state = self.state
        if isinstance(state, dict):
            name = state.get("status")
            return _HEALTH_NAMES.get(name) if isinstance(name, str) else None
        return state


