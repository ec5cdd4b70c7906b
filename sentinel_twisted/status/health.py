# -*- test-case-name: tests.gateway.test_healthz -*-
"""
C{GET /healthz} on the status site: whether this proxy is ready for
traffic, for a load balancer or a Kubernetes readiness probe.

Ready once the agent listener listens and, if the operator named agents
(C{--ready-agent}), once each of them has a registered connection: a proxy
that would answer every request with C{503} (no agent) is kept out of
rotation until its agents have dialled in.  C{200} when ready, C{503} when
not, with a small JSON body saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import msgspec
from twisted.web.resource import Resource

if TYPE_CHECKING:
    from ..proxy.pool import AgentPool

__all__ = ["HealthzResource", "Readiness"]

_encoder = msgspec.json.Encoder()


def _always() -> bool:
    return True


def _distinct(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ids))


@attrs.frozen
class Readiness:
    """
    @ivar listening: whether the agent listener listens now.
    @ivar agents: agent ids that must be registered for the proxy to be ready.
    """

    listening: Callable[[], bool] = _always
    agents: tuple[str, ...] = attrs.field(default=(), converter=_distinct)

    def check(self, pool: AgentPool) -> dict[str, Any]:
        """The C{/healthz} document: C{ready}, and C{problems} saying why not."""
        problems = []
        listening = bool(self.listening())
        if not listening:
            problems.append("the agent listener is not listening")
        registered = {agent_id: _connections(pool, agent_id) for agent_id in self.agents}
        problems += [f"agent {a} is not registered" for a, n in registered.items() if n == 0]
        return {
            "ready": not problems,
            "listening": listening,
            "agents": registered,
            "problems": problems,
        }


def _connections(pool: AgentPool, agent_id: str) -> int:
    return len(pool.connections(agent_id)) if agent_id in pool else 0


class HealthzResource(Resource):
    """
    C{/healthz}: C{200} when ready, C{503} when not; never cached.

    @cvar isLeaf: C{True}: no children.
    @ivar pool: the agents whose presence readiness checks.
    @ivar readiness: what ready means.
    """

    isLeaf = True

    def __init__(self, pool: AgentPool, readiness: Readiness | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.pool = pool
        self.readiness = readiness if readiness is not None else Readiness()

    def render_GET(self, request: Any) -> bytes:
        """The L{Readiness.check} document, with C{200} or C{503}."""
        document = self.readiness.check(self.pool)
        request.setResponseCode(200 if document["ready"] else 503)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return _encoder.encode(document) + b"\n"

    def render_HEAD(self, request: Any) -> bytes:
        """C{GET}'s status and headers, without the body."""
        body = self.render_GET(request)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b""

