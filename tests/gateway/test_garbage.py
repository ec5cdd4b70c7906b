"""
A finished request leaves no cyclic garbage: reference counting frees the
request, its exchange and its body stages at once.  Cycles left behind
cost the gateway the cyclic collector's time on every request under load.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from sentinel_twisted.gateway.body import InspectionStage
from sentinel_twisted.gateway.exchange import Exchange
from sentinel_twisted.gateway.resource import GatewayRequest

from .support import Harness, block

NONE_ALIVE = {"GatewayRequest": 0, "Exchange": 0, "InspectionStage": 0}


#: The gateway objects alive before a test, by id (see
#: L{NoCyclicGarbageTests.setUp}); held, so that no new object takes an id.
_before: dict[int, object] = {}


def alive() -> dict[str, int]:
    """
    Gateway objects the collector still tracks (alive or cyclic garbage),
    but those another test module left alive before this test began (a
    channel of theirs whose timer has not fired yet).
    """
    counts = dict(NONE_ALIVE)
    for o in gc.get_objects():
        if id(o) in _before:
            continue
        if isinstance(o, GatewayRequest):
            counts["GatewayRequest"] += 1
        elif isinstance(o, Exchange):
            counts["Exchange"] += 1
        elif isinstance(o, InspectionStage):
            counts["InspectionStage"] += 1
    return counts


class NoCyclicGarbageTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        gc.collect()
        kinds = (GatewayRequest, Exchange, InspectionStage)
        _before.clear()
        _before.update((id(o), o) for o in gc.get_objects() if isinstance(o, kinds))
        self.addCleanup(_before.clear)

    def test_finished_requests_are_freed_without_the_collector(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", events=(1, 2, 3, 4, 5), chunk_size=4)
            gc.collect()
            gc.disable()
            self.addCleanup(gc.enable)
            self.assertEqual(alive(), NONE_ALIVE)
            for _ in range(3):
                self.assertEqual((await h.get("/items")).code, 200)
                self.assertEqual((await h.post("/upload", b"0123456789")).code, 200)
            self.assertEqual(alive(), NONE_ALIVE)

        return ensureDeferred(go())

    def test_denied_requests_are_freed_too(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", decide=lambda agent, message_type, body: block(403, "no"))
            gc.collect()
            gc.disable()
            self.addCleanup(gc.enable)
            for _ in range(3):
                self.assertEqual((await h.get("/admin")).code, 403)
            self.assertEqual(alive(), NONE_ALIVE)

        return ensureDeferred(go())

    def test_requests_whose_agent_left_are_freed_too(self) -> Any:
        # The agent's connection closes with the request's event waiting:
        # the request fails (503) and leaves nothing behind either.
        async def go() -> None:
            h = await Harness(self).start()

            def drop(agent: Any, message_type: int, body: dict[str, Any]) -> None:
                agent.drop()

            await h.agent("waf", decide=drop)
            gc.collect()
            gc.disable()
            self.addCleanup(gc.enable)
            self.assertEqual((await h.get("/items")).code, 503)
            self.assertEqual(alive(), NONE_ALIVE)

        return ensureDeferred(go())
