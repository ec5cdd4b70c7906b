# -*- test-case-name: tests.gateway.test_known -*-
"""
L{KnownAgents}: the agents a gateway without C{--agent} consults.

Every agent seen since the start (registered here or, in a worker group,
anywhere in the group) is consulted for every request, whether it is
connected or not: an agent that is away (crashed, restarting, its
connection handed to another worker) makes the request C{503}, or pass
without it with C{--fail-open}; it is never left to the agents that happen
to be connected.  An agent retired for good (taken off the allowlist, or
its token off the token file when tokens are required) is forgotten by the
reload (SIGHUP) that retires it, once it is not registered; an agent that
is only restarting is never forgotten, whenever the reload comes.

Agent ids come from peers, so the table is bounded (L{MAX_KNOWN_AGENTS}):
an agent that registers once it is full is consulted while it is
registered, but not remembered when it leaves, and a warning says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.logger import Logger

from .._peertext import peer_text

__all__ = ["MAX_KNOWN_AGENTS", "KnownAgents", "log_forgotten"]

#: The most agent ids a gateway remembers (see L{KnownAgents}).
MAX_KNOWN_AGENTS = 1000


class KnownAgents:
    """
    The agent ids seen, in order of first registration, at most C{limit}.

    @ivar limit: the most ids kept.
    @ivar pinned: ids a reload never forgets (the C{--agent-endpoint}
        agents: the gateway dials them for as long as it runs).
    @ivar ids: the ids to consult, in order (a tuple: read per request):
        those remembered, then those registered now that did not fit.
    """

    def __init__(self, limit: int = MAX_KNOWN_AGENTS, pinned: Iterable[str] = ()) -> None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit!r}")
        self.limit = limit
        self.pinned = frozenset(pinned)
        self._ids: dict[str, None] = {}
        #: Registered agents that did not fit: consulted until they leave.
        self._passing: dict[str, None] = {}
        self.ids: tuple[str, ...] = ()

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def full(self) -> bool:
        """Whether no new id can be kept."""
        return len(self._ids) >= self.limit

    def add(self, agent_id: str) -> bool:
        """
        Remember C{agent_id}; C{False} if it was known already or the table
        is full (L{full} says which).
        """
        ids = self._ids
        if agent_id in ids or len(ids) >= self.limit:
            return False
        ids[agent_id] = None
        self._passing.pop(agent_id, None)
        self._changed()
        return True

    def arrived(self, agent_id: str) -> bool:
        """
        C{agent_id} registered: remember it, or if the table is full consult
        it until it L{left}.  Whether it is remembered.
        """
        if agent_id in self._ids or self.add(agent_id):
            return True
        if agent_id not in self._passing:
            self._passing[agent_id] = None
            self._changed()
        return False

    def left(self, agent_id: str) -> None:
        """C{agent_id}'s last connection left: an agent that did not fit is no longer consulted."""
        if self._passing.pop(agent_id, 0) is None:
            self._changed()

    def _changed(self) -> None:
        self.ids = (*self._ids, *self._passing)

    def forget_absent(self, present: Callable[[str], bool], retired: Callable[[str], bool]) -> list[str]:
        """
        Forget the ids that are not C{present}, C{retired} and not pinned;
        those forgotten.
        """
        gone = [a for a in self._ids if a not in self.pinned and not present(a) and retired(a)]
        if gone:
            for agent_id in gone:
                del self._ids[agent_id]
            self._changed()
        return gone

    def replace(self, ids: Iterable[str], keep: Callable[[str], bool]) -> None:
        """
        Know C{ids} (in their order, up to the limit), and of the ids known
        now those for which C{keep} is true: a worker takes its group's
        table this way, keeping the agents it dials itself.
        """
        kept = [a for a in self._ids if keep(a)]
        self._ids = {}
        for agent_id in (*ids, *kept):
            self.add(agent_id)
        self._changed()


def log_forgotten(logger: Logger, gone: list[str]) -> None:
    """Say which agents a reload retired (L{KnownAgents.forget_absent}); nothing if none."""
    if gone:
        logger.warn(
            "Forgot {count} agent(s) retired by the reload: {agents}; requests no longer wait for them",
            count=len(gone),
            agents=", ".join(peer_text(a, 64) for a in gone[:10]) + (", ..." if len(gone) > 10 else ""),
        )
