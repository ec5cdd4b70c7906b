# -*- test-case-name: tests.test_lograte -*-
"""
Rate-limiting log lines that a peer or a client can trigger at will.

A log line per refused request would let one busy client fill the disk;
no line at all would leave the operator blind.  L{LogRate} admits the
first line of a kind, then at most one per interval, and tells the next
admitted line how many were held back meanwhile::

    rate = LogRate(reactor, interval=10.0)
    held = rate.admit(("unavailable", agent_id))
    if held is not None:
        log.warn("Agent {agent_id} unavailable; answering 503{held}",
                 agent_id=agent_id, held=held_back(held))

Time comes from the clock (an L{IReactorTime}), so tests use a
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime

__all__ = ["LogRate", "held_back"]


class LogRate:
    """
    At most one admitted line per key per C{interval} seconds.

    @ivar max_keys: the bound on the keys remembered; past it the oldest
        is forgotten (its next line is admitted at once).
    """

    def __init__(self, clock: IReactorTime, interval: float = 10.0, max_keys: int = 1024) -> None:
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        # key -> [time of the last admitted line, lines held back since]
        self._keys: dict[Hashable, list[float]] = {}

    def admit(self, key: Hashable) -> int | None:
        """
        Whether a line of this kind may be logged now.

        @return: C{None} to stay quiet; otherwise how many lines of this
            kind were held back since the last one admitted.
        """
        now = self.clock.seconds()
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        held = 0 if entry is None else int(self._keys.pop(key)[1])
        if len(self._keys) >= self.max_keys:
            del self._keys[next(iter(self._keys))]
        self._keys[key] = [now, 0]
        return held


def held_back(count: int) -> str:
    """A suffix for an admitted line: C{""}, or how many like it were held back."""
    if not count:
        return ""
    return f" ({count} more like this not logged)"
