"""
Without C{--agent} the gateway consults every agent it has seen, connected
or not: an agent that is away makes requests 503 (fail closed), or pass
without it counted (C{--fail-open}); a reload that retires it (allowlist,
token file) forgets it once it is away, any other reload never does; the
table of agents seen is bounded.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.known import MAX_KNOWN_AGENTS, KnownAgents
from sentinel_twisted.gateway.shared import Gateway, NullMetrics
from sentinel_twisted.proxy.pool import AgentPool

from .._proxy_support import captured_log
from .support import REQUEST_HEADERS, Harness, ScriptedAgent, answer, block, wait_until


def blocks(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any]:
    return block(403, "no") if message_type == REQUEST_HEADERS else answer()


async def waf_away(test: TestCase, *argv: str) -> Harness:
    """A gateway that has seen C{waf} (blocks) and C{auth} (allows); C{waf} is gone."""
    h = await Harness(test).start(*argv)
    waf = await h.agent("waf", decide=blocks)
    await h.agent("auth")
    assert (await h.get("/admin")).code == 403
    waf.drop()
    await wait_until(lambda: "waf" not in h.pool, what="waf to leave")
    return h


class AgentAwayTests(TestCase):
    timeout = 20

    def test_a_request_while_an_agent_seen_is_away_is_answered_503(self) -> Any:
        async def go() -> None:
            h = await waf_away(self)
            response = await h.get("/admin")
            self.assertEqual(response.code, 503)
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(h.sample("sentinel_gateway_agent_failures_total", agent="waf", reason="unavailable"), 1)
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="unavailable"), 1)

        return ensureDeferred(go())

    def test_with_fail_open_the_request_passes_without_it_and_is_counted(self) -> Any:
        async def go() -> None:
            h = await waf_away(self, "--fail-open")
            response = await h.get("/admin")
            self.assertEqual(response.code, 200)
            self.assertEqual(
                h.sample("sentinel_gateway_fail_open_passes_total", agent="waf", reason="unavailable"), 1
            )

        return ensureDeferred(go())

    def test_an_agent_back_decides_again(self) -> Any:
        async def go() -> None:
            h = await waf_away(self)
            await h.agent("waf", decide=blocks)
            self.assertEqual((await h.get("/admin")).code, 403)

        return ensureDeferred(go())

    def test_a_reload_that_retires_an_agent_away_forgets_it_and_says_so(self) -> Any:
        async def go() -> None:
            allow_file = os.path.join(self.mktemp())
            with open(allow_file, "w") as f:
                f.write("waf\nauth\n")
            h = await waf_away(self, "--allow-file", allow_file)
            # A reload that changes nothing for waf: requests still wait for it.
            self.assertTrue(h.top.reloader.reload())
            self.assertEqual((await h.get("/admin")).code, 503)
            failures = "sentinel_gateway_agent_failures_total"
            self.assertEqual(h.sample(failures, agent="waf", reason="unavailable"), 1)
            with open(allow_file, "w") as f:
                f.write("auth\n")
            with captured_log() as events:
                self.assertTrue(h.top.reloader.reload())
            self.assertIn(
                "Forgot 1 agent(s) retired by the reload: waf; requests no longer wait for them",
                [formatEvent(e) for e in events],
            )
            self.assertEqual((await h.get("/admin")).code, 200)
            # Its series, counted while it was away, go with it: into the
            # departed totals, as those of an agent that left.
            self.assertEqual(h.sample(failures, agent="waf", reason="unavailable"), 0)
            self.assertNotIn(b'agent="waf"', h.metrics.render())
            self.assertEqual(h.sample("sentinel_gateway_agent_failures_departed_total", reason="unavailable"), 1)

        return ensureDeferred(go())

    def test_a_reload_that_retires_a_busy_agent_forgets_it_once_drained(self) -> Any:
        # The reload drains waf's connection: it is still registered while
        # its request in flight is answered, and away once closed; from then
        # on requests no longer wait for it.
        async def go() -> None:
            allow_file = self.mktemp()
            with open(allow_file, "w") as f:
                f.write("waf\nauth\n")
            h = await Harness(self).start("--allow-file", allow_file)
            waf = await h.agent("waf", decide=lambda agent, message_type, body: None)
            await h.agent("auth")
            in_flight = ensureDeferred(h.get("/admin"))
            await waf.wait(lambda: bool(waf.held))
            with open(allow_file, "w") as f:
                f.write("auth\n")
            self.assertTrue(h.top.reloader.reload())
            with captured_log() as events:
                waf.release(block(403, "no"))
                self.assertEqual((await in_flight).code, 403)
                await h.top.reloader.drained()
            self.assertNotIn("waf", h.pool)
            self.assertIn(
                "Forgot 1 agent(s) retired by the reload: waf; requests no longer wait for them",
                [formatEvent(e) for e in events],
            )
            self.assertEqual((await h.get("/admin")).code, 200)

        return ensureDeferred(go())

    def test_a_reload_never_forgets_an_agent_that_is_only_restarting(self) -> Any:
        # A periodic SIGHUP (a token rotated) while waf restarts must not
        # leave requests to the other agents.
        async def go() -> None:
            h = await waf_away(self)
            self.assertTrue(h.top.reloader.reload())
            self.assertEqual((await h.get("/admin")).code, 503)
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_a_reload_keeps_the_agents_registered(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            waf = await h.agent("waf", decide=blocks)
            await h.agent("auth")
            self.assertTrue(h.top.reloader.reload())
            waf.drop()
            await wait_until(lambda: "waf" not in h.pool, what="waf to leave")
            self.assertEqual((await h.get("/admin")).code, 503)

        return ensureDeferred(go())

    def test_named_agents_are_consulted_and_no_other(self) -> Any:
        # --agent is unchanged: the agents named, whoever else was seen.
        async def go() -> None:
            h = await Harness(self).start("--agent", "auth")
            other = await h.agent("other", decide=blocks)
            await h.agent("auth")
            other.drop()
            await wait_until(lambda: "other" not in h.pool, what="other to leave")
            self.assertEqual((await h.get("/admin")).code, 200)

        return ensureDeferred(go())


class _Connection:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id


class _Pool(AgentPool):
    """A pool whose agents come and go as the test says (no sockets)."""

    def come(self, agent_id: str) -> _Connection:
        connection = _Connection(agent_id)
        self._agents.setdefault(agent_id, []).append(connection)  # type: ignore[arg-type]
        self._notify("agent_registered", connection)
        return connection

    def go(self, connection: _Connection) -> None:
        self._agents[connection.agent_id].remove(connection)  # type: ignore[arg-type]
        if not self._agents[connection.agent_id]:
            del self._agents[connection.agent_id]
        self._notify("agent_disconnected", connection, "closed")


class BoundTests(SynchronousTestCase):
    def gateway(self, limit: int) -> tuple[Gateway, _Pool]:
        pool = _Pool()
        gateway = Gateway(pool, GatewayConfig(max_known_agents=limit), object(), clock=Clock())  # type: ignore[arg-type]
        gateway.watch_agents()
        self.addCleanup(gateway.unwatch_agents)
        return gateway, pool

    def test_agents_past_the_limit_are_consulted_while_registered_and_not_remembered(self) -> None:
        gateway, pool = self.gateway(2)
        with captured_log() as events:
            a, _, c = pool.come("a"), pool.come("b"), pool.come("c")
        self.assertEqual(gateway.agent_ids(), ("a", "b", "c"))
        self.assertIn(
            "Agent c registered, but the gateway already knows 2 agents: "
            "it is consulted while registered, and not when it leaves",
            [formatEvent(e) for e in events],
        )
        for connection in (a, c):
            pool.go(connection)
        self.assertEqual(gateway.agent_ids(), ("a", "b"))
        self.assertEqual(len(gateway.known), 2)

    def test_a_reload_makes_room(self) -> None:
        gateway, pool = self.gateway(1)
        pool.go(pool.come("a"))
        self.assertEqual(gateway.forget_absent_agents(lambda agent_id: False), [])
        self.assertEqual(gateway.forget_absent_agents(lambda agent_id: True), ["a"])
        pool.go(pool.come("b"))
        self.assertEqual(gateway.agent_ids(), ("b",))

    def test_a_worker_that_takes_its_group_table_forgets_the_series_of_agents_dropped(self) -> None:
        forgotten: list[str] = []

        class Metrics(NullMetrics):
            def forget_agent(self, agent_id: str) -> None:
                forgotten.append(agent_id)

        gateway, pool = self.gateway(10)
        gateway.metrics = Metrics()
        here = pool.come("here")
        gateway.take_known_agents(["away", "stays"])
        self.assertEqual(forgotten, [])
        pool.go(here)
        # The group forgot "away"; "here" is kept while registered, then
        # left and is gone from the group's table too.
        gateway.take_known_agents(["stays"])
        self.assertEqual(sorted(forgotten), ["away", "here"])

    def test_the_default_limit(self) -> None:
        self.assertEqual(GatewayConfig().max_known_agents, MAX_KNOWN_AGENTS)
        self.assertRaises(ValueError, GatewayConfig, max_known_agents=0)


class KnownAgentsTests(SynchronousTestCase):
    def test_ids_in_order_of_first_registration_once_each(self) -> None:
        known = KnownAgents()
        for agent_id in ("b", "a", "b"):
            known.arrived(agent_id)
        self.assertEqual(known.ids, ("b", "a"))

    def test_a_full_table_keeps_what_it_has(self) -> None:
        known = KnownAgents(limit=3)
        for i in range(10):
            known.add(f"agent-{i}")
        self.assertEqual(known.ids, ("agent-0", "agent-1", "agent-2"))
        self.assertTrue(known.full)

    def test_pinned_agents_are_never_forgotten(self) -> None:
        known = KnownAgents(pinned=["dialled"])
        known.add("dialled")
        known.add("registered")
        self.assertEqual(known.forget_absent(lambda agent_id: False, lambda agent_id: True), ["registered"])
        self.assertEqual(known.ids, ("dialled",))

    def test_replace_takes_the_groups_list_and_keeps_what_is_asked(self) -> None:
        known = KnownAgents()
        for agent_id in ("local", "gone", "waf"):
            known.add(agent_id)
        known.replace(["waf", "auth"], keep=lambda agent_id: agent_id == "local")
        self.assertEqual(known.ids, ("waf", "auth", "local"))


class OptionsTests(SynchronousTestCase):
    def test_agents_the_gateway_dials_are_never_forgotten(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from sentinel_twisted.tap import Options, add_gateway, make_listener

        listen = f"unix:{self.mktemp()}.sock"
        options = Options()
        options.parseOptions(
            [
                "--listen", listen, "--http", "tcp:0", "--agent-endpoint", "waf=unix:/nonexistent/waf.sock",
                # Neither may register: both are retired, the one dialled is kept.
                "--allow", "other",
            ]
        )  # fmt: skip
        reactor = MemoryReactorClock()
        top = make_listener(options, reactor)
        service = add_gateway(top, options, reactor)
        gateway = service.gateway
        gateway.known.add("waf")
        gateway.known.add("auth")
        top.reloader.reload()
        self.assertEqual(gateway.agent_ids(), ("waf",))
