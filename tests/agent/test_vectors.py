"""
What our agent writes equals the reference vectors, as parsed JSON: the
RegistrationRequest (C{reg_request_*}), the AgentResponses (C{resp_*},
answering C{evt_request_headers}), FlowControl and HealthStatus in their
integer forms, and the Pong.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent import Agent, ResponseBuilder, allow, block, challenge, redirect

from ..vectors import by_name, frame_bytes, same_json
from ._support import (
    AGENT_RESPONSE,
    FLOW_CONTROL,
    HEALTH_STATUS,
    PONG,
    REQUEST_HEADERS,
    Harness,
    RecordingAgent,
    headers_event,
)


class WafAgent(Agent):
    """The agent the C{reg_request_*} vectors describe."""

    name = "WAF Agent"
    version = "1.2.0"
    max_concurrency = 10
    max_body_size = 1048576
    preferred_chunk_size = 65536
    features = {"health_reporting": False}

    def __init__(self, answer: ResponseBuilder | None = None) -> None:
        self.answer = answer

    def on_request_headers(self, event: Any) -> Any:
        return self.answer if self.answer is not None else allow()

    def on_request_body_chunk(self, event: Any) -> Any:
        return allow()


class RegistrationVectorTests(SynchronousTestCase):
    def check(self, vector_name: str, agent_id: str, **settings: Any) -> None:
        vector = by_name(vector_name)
        h = Harness(WafAgent(), agent_id=agent_id, **settings)
        [(message_type, body)] = h.sent()
        self.assertEqual(message_type, vector["message_type"])
        ours, theirs = same_json(body, vector)
        self.assertEqual(ours, theirs)

    def test_minimal(self) -> None:
        self.check("reg_request_minimal", "waf-1")

    def test_with_auth_token(self) -> None:
        self.check("reg_request_with_auth_token", "waf-1", auth_token="secret-token-123")

    def test_with_metadata(self) -> None:
        self.check(
            "reg_request_with_metadata",
            "waf-2",
            auth_token="bearer-token-abc",
            metadata={"version": "2.1.0", "region": "us-west-2", "tags": ["security", "waf"]},
        )


# What each resp_* vector's agent answered to evt_request_headers.
ANSWERS = {
    "resp_allow": lambda: allow(),
    "resp_block_body_headers": lambda: block(403, "Forbidden by WAF", {"content-type": "text/plain"}),
    "resp_block_minimal": lambda: block(429),
    "resp_redirect": lambda: redirect("https://example.com/login"),
    "resp_challenge": lambda: challenge(
        "captcha", {"site_key": "6LeIxAcTAAAAAJcZVRqyHh71UMIEGNQ_MXjiZKhI"}
    ),
    "resp_header_ops": lambda: allow()
    .set_request_header("x-user-id", "42")
    .add_request_header("x-waf-tag", "checked")
    .remove_request_header("authorization")
    .set_response_header("x-frame-options", "DENY")
    .remove_response_header("server"),
    "resp_needs_more_body_mutations": lambda: allow()
    .needs_more()
    .replace_request_body(0, b'{"name":"REDACTED"}')
    .pass_response_body_chunk(3),
    "resp_body_mutation_drop": lambda: allow().drop_response_body_chunk(1),
    "resp_websocket_allow": lambda: allow().websocket_allow(),
    "resp_websocket_drop": lambda: allow().websocket_drop(),
    "resp_websocket_close": lambda: allow().websocket_close(1008, "policy violation"),
    "resp_audit_metadata": lambda: block(403, "blocked")
    .tag("sqli", "owasp-crs")
    .rule("942100")
    .confidence(0.87)
    .reason("SQL_INJECTION"),
    "resp_routing_and_custom_multi_key": lambda: allow().route("upstream", "canary").custom(score=5),
}


class ResponseVectorTests(SynchronousTestCase):
    def test_every_response_vector_is_covered(self) -> None:
        from ..vectors import load_all

        names = {v["name"] for v in load_all() if v["name"].startswith("resp_")}
        self.assertEqual(names, set(ANSWERS))

    def test_answers_equal_the_vectors(self) -> None:
        event = frame_bytes(by_name("evt_request_headers"))
        for name, make in ANSWERS.items():
            vector = by_name(name)
            h = Harness(WafAgent(make()))
            h.register()
            h.sent()
            h.protocol.dataReceived(event)
            frames = h.sent()
            self.assertEqual([t for t, _ in frames], [AGENT_RESPONSE], name)
            ours, theirs = same_json(frames[0][1], vector)
            self.assertEqual(ours, theirs, name)


class ControlVectorTests(SynchronousTestCase):
    def test_flow_control_uses_the_integer_forms(self) -> None:
        pause = json.loads(by_name("ctl_flow_control_pause")["payload"])
        resume = json.loads(by_name("ctl_flow_control_resume")["payload"])
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=1)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("a"))
        self.assertEqual(h.sent(), [(FLOW_CONTROL, pause)])
        agent.answer("a")
        self.assertEqual([f for f in h.sent() if f[0] == FLOW_CONTROL], [(FLOW_CONTROL, resume)])

    def test_health_uses_the_integer_form(self) -> None:
        h = Harness(Agent())
        h.register()
        self.assertEqual(h.sent(), [(HEALTH_STATUS, json.loads(by_name("ctl_health_status_healthy")["payload"]))])

    def test_pong_echoes_the_ping_vector(self) -> None:
        h = Harness(Agent())
        h.register()
        h.sent()
        ping = by_name("ctl_ping")
        h.protocol.dataReceived(frame_bytes(ping))
        [(message_type, body)] = h.sent()
        self.assertEqual(message_type, PONG)
        ours, theirs = same_json(body, by_name("ctl_pong"))
        self.assertEqual(ours, theirs)
