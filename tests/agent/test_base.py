"""
The L{Agent} base class (capabilities follow from what a subclass
implements and declares) and the response builders.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sentinel_twisted.agent import (
    Agent,
    EventType,
    IAgent,
    allow,
    block,
    challenge,
    redirect,
)
from sentinel_twisted.messages import Block, RemoveHeader, SetHeader


class CapabilityTests(SynchronousTestCase):
    def test_base_agent_provides_iagent(self) -> None:
        self.assertTrue(verifyObject(IAgent, Agent()))

    def test_plain_agent_subscribes_to_request_headers(self) -> None:
        caps = Agent().capabilities("a-1")
        self.assertEqual(caps.agent_id, "a-1")
        self.assertEqual(caps.name, "Agent")
        self.assertEqual(caps.supported_events, [EventType.REQUEST_HEADERS])
        self.assertFalse(caps.features.streaming_body)
        self.assertTrue(caps.features.cancellation)
        self.assertTrue(caps.features.flow_control)
        self.assertTrue(caps.features.health_reporting)
        self.assertEqual(caps.features.concurrent_requests, 100)
        self.assertEqual(caps.limits.max_concurrency, 100)

    def test_events_follow_overridden_handlers(self) -> None:
        class Bodies(Agent):
            name = "bodies"

            def on_request_body_chunk(self, event: Any) -> Any:
                return allow()

            def on_websocket_frame(self, event: Any) -> Any:
                return allow()

            def on_configure(self, event: Any) -> Any:
                return allow()

        caps = Bodies().capabilities("b")
        self.assertEqual(caps.name, "bodies")
        self.assertEqual(caps.supported_events, [0, 2, 6])
        self.assertTrue(caps.features.streaming_body)
        self.assertTrue(caps.features.websocket)
        self.assertTrue(caps.features.config_push)
        self.assertFalse(caps.features.guardrails)

    def test_inherited_overrides_count(self) -> None:
        class Guard(Agent):
            def on_guardrail_inspect(self, event: Any) -> Any:
                return allow()

        class Child(Guard):
            pass

        caps = Child().capabilities("c")
        self.assertEqual(caps.supported_events, [7])
        self.assertTrue(caps.features.guardrails)

    def test_declared_events_and_features_win(self) -> None:
        class Declared(Agent):
            events = [EventType.RESPONSE_HEADERS, EventType.REQUEST_HEADERS]
            features = {"health_reporting": False, "metrics_export": True}
            max_concurrency = 8
            max_body_size = 1024

        caps = Declared().capabilities("d")
        self.assertEqual(caps.supported_events, [1, 3])
        self.assertFalse(caps.features.health_reporting)
        self.assertTrue(caps.features.metrics_export)
        self.assertEqual(caps.features.concurrent_requests, 8)
        self.assertEqual(caps.limits.max_body_size, 1024)

    def test_unknown_feature_is_a_clear_error(self) -> None:
        class Typo(Agent):
            features = {"streming_body": True}

        error = self.assertRaises(ValueError, Typo().capabilities, "t")
        self.assertIn("streming_body", str(error))

    def test_base_handlers_allow(self) -> None:
        agent = Agent()
        self.assertEqual(agent.on_request_headers(None).build().decision, allow().build().decision)  # type: ignore[arg-type, union-attr]
        self.assertEqual(agent.health(), 1)


class BuilderTests(SynchronousTestCase):
    def test_chaining_builds_one_response(self) -> None:
        response = (
            block(403, "no")
            .set_request_header("a", "1")
            .remove_response_header("server")
            .tag("t1", "t2")
            .rule("r1")
            .custom(k="v")
            .build()
        )
        self.assertEqual(response.decision, Block(403, "no", None))
        self.assertEqual(response.request_headers, [SetHeader("a", "1")])
        self.assertEqual(response.response_headers, [RemoveHeader("server")])
        self.assertEqual(response.audit.tags, ["t1", "t2"])
        self.assertEqual(response.audit.rule_ids, ["r1"])
        self.assertEqual(response.audit.custom, {"k": "v"})

    def test_build_twice_gives_independent_responses(self) -> None:
        builder = allow().tag("x")
        first = builder.build()
        first.audit.tags.append("mutated")
        self.assertEqual(builder.build().audit.tags, ["x"])

    def test_invalid_values_are_refused(self) -> None:
        self.assertRaises(ValueError, block, 99)
        self.assertRaises(ValueError, block, 600)
        self.assertRaises(ValueError, redirect, "/x", 200)
        self.assertRaises(ValueError, redirect, "/x\r\nSet-Cookie: a=b")
        self.assertRaises(ValueError, redirect, "")
        self.assertRaises(ValueError, challenge, "")
        self.assertRaises(ValueError, allow().set_request_header, "x", "a\r\nb")
        self.assertRaises(ValueError, allow().set_response_header, "bad name", "v")
        self.assertRaises(ValueError, allow().add_request_header, "", "v")
        self.assertRaises(ValueError, allow().confidence, 1.5)
        self.assertRaises(ValueError, allow().websocket_close, 99, "x")
        self.assertRaises(ValueError, block, 403, None, {"x": "a\nb"})
