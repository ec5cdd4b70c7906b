# -*- test-case-name: tests.agent.test_held_events -*-
"""
L{HeldEventBudget}: the bytes of events that every proxy connection of an
agent process holds, against one limit.

Each connection already bounds what it holds (L{AgentSettings.max_held_event_bytes
<sentinel_twisted.agent.protocol.AgentSettings.max_held_event_bytes>}), but
many connections, dialled and dialling, could together hold many times
that.  The connections of a connector and a listener share one budget
(C{twistd sentinel-agent} gives them the same), as they share their
L{IncompleteFrameBudget <sentinel_twisted.wire.IncompleteFrameBudget>}.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES", "HeldEventBudget"]

#: The bytes of events all the connections of an agent process may hold
#: by default: four connections at the per-connection default (64 MiB),
#: the usual pool of one proxy.
DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES = 256 * 1024 * 1024


class HeldEventBudget:
    """
    The bytes of events (running and queued) that the connections sharing
    it hold, counted as each connection counts them against its own
    C{max_held_event_bytes}.  An event that would take the total past the
    limit is answered at once with the error decision (status 503), as one
    over the connection's own bound is, unless no connection holds anything
    (a frame is at most 16 MiB): so the whole process holds at most the
    limit, or one event.

    The connections add and take their events' sizes themselves: one
    addition per event, whatever the number of connections.

    @ivar limit: the most bytes of events all connections together hold.
    @ivar total: the bytes they hold now.
    @ivar refused: events answered with the error decision because of it.
    """

    def __init__(self, limit: int = DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES) -> None:
        if not limit > 0:
            raise ValueError(f"the held event budget must be positive, got {limit!r}")
        self.limit = limit
        self.total = 0
        self.refused = 0

    def __repr__(self) -> str:
        return f"<HeldEventBudget {self.total} of {self.limit} bytes>"

    def would_overflow(self, size: int) -> bool:
        """Whether holding C{size} more bytes goes past the limit while something is held."""
        total = self.total
        return total + size > self.limit and total > 0
