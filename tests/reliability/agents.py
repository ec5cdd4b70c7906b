"""
Agents the reliability tests run in real subprocesses
(C{twistd sentinel-agent --agent tests.reliability.agents:NAME}).

Each logs what it receives, so a test reading the subprocess's output knows
the agent really holds a request before it kills or stops something.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from sentinel_twisted.agent import Agent, allow

log = Logger(namespace="tests.reliability.agents")


class Holding(Agent):
    """
    Holds every request whose path starts with C{/hold} forever (until the
    proxy cancels it or the connection goes); allows everything else.
    """

    name = "holding"

    def on_request_headers(self, event: Any) -> Any:
        cid = event.metadata.correlation_id
        if not event.uri.startswith("/hold"):
            return allow()
        log.info("holding {cid}", cid=cid)

        def cancelled(_: Deferred[Any]) -> None:
            log.info("cancelled {cid}", cid=cid)

        return Deferred(cancelled)


class Slow(Agent):
    """
    Answers C{/slow/MS} after MS milliseconds and everything else at once;
    logs each answer and each cancellation.
    """

    name = "slow"

    def on_request_headers(self, event: Any) -> Any:
        from twisted.internet import reactor

        cid = event.metadata.correlation_id
        parts = event.uri.strip("/").split("/")
        if parts[0] != "slow":
            return allow()
        delay = int(parts[1]) / 1000.0
        log.info("holding {cid} for {delay}s", cid=cid, delay=delay)
        result: Deferred[Any] = Deferred(lambda _: log.info("cancelled {cid}", cid=cid))

        def answer() -> None:
            if not result.called:
                log.info("answering {cid}", cid=cid)
                result.callback(allow().tag("slow"))

        call = reactor.callLater(delay, answer)  # type: ignore[attr-defined]
        result.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return result
