"""
The message codec: every field read from the wire is type-checked, and a
wrong type is an C{Invalid message format: ...} error naming where it is.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import msgspec
from twisted.trial.unittest import TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.errors import InvalidMessage, SerializationError, VersionMismatch
from sentinel_twisted.messages import _codec

from ._proxy_support import registration_payload, request_headers, response_headers

SECRET = "s3cr3t-t0ken-value"


def registration(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(registration_payload(token=SECRET, metadata={"zone": "a"}))
    doc.update(changes)
    return doc


def at(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of C{doc} with the dotted C{path} set to C{value} (or removed
    when C{value} is C{REMOVE})."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is REMOVE:
        del node[last]
    else:
        node[last] = value
    return doc


REMOVE = object()


def encoded(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# Every field of a RegistrationRequest, with a value of the wrong type.
WRONG_TYPES: dict[str, Any] = {
    "protocol_version": "2",
    "agent_id": 7,
    "capabilities": [],
    "capabilities.agent_id": None,
    "capabilities.name": 1.5,
    "capabilities.version": True,
    "capabilities.supported_events": {"1": 1},
    "capabilities.features": "all",
    "capabilities.features.streaming_body": "yes",
    "capabilities.features.websocket": 1,
    "capabilities.features.guardrails": None,
    "capabilities.features.config_push": [],
    "capabilities.features.metrics_export": {},
    "capabilities.features.concurrent_requests": "10",
    "capabilities.features.cancellation": 0,
    "capabilities.features.flow_control": "false",
    "capabilities.features.health_reporting": 1.0,
    "capabilities.limits": 5,
    "capabilities.limits.max_body_size": "1M",
    "capabilities.limits.max_concurrency": 1.5,
    "capabilities.limits.preferred_chunk_size": None,
    "auth_token": 12345,
}

REQUIRED = [
    "protocol_version",
    "agent_id",
    "capabilities",
    "capabilities.agent_id",
    "capabilities.name",
    "capabilities.version",
    "capabilities.supported_events",
    "capabilities.features",
    "capabilities.limits",
    *(f"capabilities.features.{f}" for f in m.AgentFeatures.__struct_fields__),
    *(f"capabilities.limits.{f}" for f in m.AgentLimits.__struct_fields__),
]


class RegistrationRequestTests(TestCase):
    def test_valid_request_decodes(self) -> None:
        request = m.decode_registration_request(encoded(registration()))
        self.assertEqual(request.agent_id, "waf-1")
        self.assertEqual(request.auth_token, SECRET)
        self.assertEqual(request.metadata, {"zone": "a"})
        self.assertIsInstance(request, m.RegistrationRequest)

    def test_every_field_of_the_wrong_type_is_named(self) -> None:
        for path, value in WRONG_TYPES.items():
            with self.assertRaises(InvalidMessage, msg=path) as caught:
                m.decode_registration_request(encoded(at(registration(), path, value)))
            text = str(caught.exception)
            self.assertTrue(text.startswith("Invalid message format: Expected `"), text)
            self.assertTrue(text.endswith(f"- at `$.{path}`"), f"{path}: {text}")

    def test_an_element_of_supported_events_of_the_wrong_type_is_named(self) -> None:
        doc = at(registration(), "capabilities.supported_events", [1, "two"])
        with self.assertRaises(InvalidMessage) as caught:
            m.decode_registration_request(encoded(doc))
        self.assertIn("`$.capabilities.supported_events[1]`", str(caught.exception))

    def test_every_required_field_is_required(self) -> None:
        for path in REQUIRED:
            doc = at(registration(), path, REMOVE)
            with self.assertRaises(InvalidMessage, msg=path) as caught:
                m.decode_registration_request(encoded(doc))
            name = path.rsplit(".", 1)[-1]
            self.assertIn(f"missing required field `{name}`", str(caught.exception), path)

    def test_auth_token_and_metadata_may_be_omitted(self) -> None:
        doc = at(at(registration(), "auth_token", REMOVE), "metadata", REMOVE)
        request = m.decode_registration_request(encoded(doc))
        self.assertIsNone(request.auth_token)
        self.assertIsNone(request.metadata)

    def test_u32_fields_accept_their_largest_value(self) -> None:
        doc = at(registration(), "capabilities.features.concurrent_requests", 2**32 - 1)
        doc = at(doc, "capabilities.limits.max_concurrency", 2**32 - 1)
        request = m.decode_registration_request(encoded(doc))
        self.assertEqual(request.capabilities.features.concurrent_requests, 2**32 - 1)

    def test_u32_fields_refuse_values_out_of_range(self) -> None:
        for path in ("capabilities.features.concurrent_requests", "capabilities.limits.max_concurrency"):
            for value in (2**32, -1):
                with self.assertRaises(InvalidMessage) as caught:
                    m.decode_registration_request(encoded(at(registration(), path, value)))
                self.assertIn(f"`$.{path}`", str(caught.exception))

    def test_u64_fields_refuse_negative_values(self) -> None:
        doc = at(registration(), "capabilities.limits.max_body_size", -5)
        with self.assertRaises(InvalidMessage) as caught:
            m.decode_registration_request(encoded(doc))
        self.assertIn(">= 0", str(caught.exception))

    def test_unknown_supported_events_are_ignored(self) -> None:
        doc = at(registration(), "capabilities.supported_events", [1, 7, 99, -3])
        request = m.decode_registration_request(encoded(doc))
        self.assertEqual(
            request.capabilities.events,
            {m.EventType.REQUEST_HEADERS, m.EventType.GUARDRAIL_INSPECT},
        )

    def test_malformed_json_is_invalid_message(self) -> None:
        with self.assertRaises(InvalidMessage) as caught:
            m.decode_registration_request(b"not-json!!")
        self.assertTrue(str(caught.exception).startswith("Invalid message format: "))

    def test_empty_payload_is_eof(self) -> None:
        with self.assertRaises(InvalidMessage) as caught:
            m.decode_registration_request(b"")
        self.assertIn("EOF while parsing a value", str(caught.exception))

    def test_blank_payload_is_eof(self) -> None:
        with self.assertRaises(InvalidMessage) as caught:
            m.decode_registration_request(b" \n ")
        self.assertEqual(
            str(caught.exception), "Invalid message format: EOF while parsing a value (empty or truncated JSON)"
        )

    def test_invalid_utf8_is_named_by_our_own_text_wherever_it_is(self) -> None:
        # In a key, in a string value, and outside any string: msgspec's
        # exception and wording differ between these and between releases.
        for payload in (b'{"\xff": 1}', b'{"agent_id": "a\xc3"}', b"\xfe{}"):
            with self.assertRaises(InvalidMessage, msg=payload) as caught:
                m.decode_registration_request(payload)
            start = payload.index(next(b for b in (b"\xff", b"\xc3", b"\xfe") if b in payload))
            self.assertRegex(str(caught.exception), rf"^Invalid message format: invalid UTF-8 at byte {start} \(")

    def test_non_object_is_invalid_message(self) -> None:
        for payload in (b"[]", b"2", b'"x"', b"null"):
            with self.assertRaises(InvalidMessage):
                m.decode_registration_request(payload)

    def test_other_version_is_a_version_mismatch_even_with_another_shape(self) -> None:
        with self.assertRaises(VersionMismatch) as caught:
            m.decode_registration_request(b'{"protocol_version": 1, "agent": "old"}')
        self.assertEqual(str(caught.exception), "Protocol version mismatch: expected 2, got 1")

    def test_version_of_the_wrong_type_is_not_a_version_mismatch(self) -> None:
        for version in ("1", True, 1.5):
            doc = registration(protocol_version=version)
            with self.assertRaises(InvalidMessage):
                m.decode_registration_request(encoded(doc))

    def test_other_version_with_valid_shape_decodes_for_the_factory_to_refuse(self) -> None:
        request = m.decode_registration_request(encoded(registration(protocol_version=3)))
        self.assertEqual(request.protocol_version, 3)

    def test_token_is_never_in_repr(self) -> None:
        request = m.decode_registration_request(encoded(registration()))
        self.assertNotIn(SECRET, repr(request))
        self.assertNotIn(SECRET, str(request))
        self.assertIn("<redacted>", repr(request))

    def test_token_is_never_in_a_decoding_error(self) -> None:
        for path, value in [("capabilities.limits.max_body_size", "x"), ("agent_id", 3)]:
            doc = at(registration(), path, value)
            with self.assertRaises(InvalidMessage) as caught:
                m.decode_registration_request(encoded(doc))
            self.assertNotIn(SECRET, str(caught.exception))

    def test_absent_token_repr_says_none(self) -> None:
        request = m.decode_registration_request(registration_payload())
        self.assertIn("auth_token=None", repr(request))

    def test_encoding_writes_null_for_unset_token_and_metadata(self) -> None:
        doc = json.loads(registration_payload())
        self.assertIsNone(doc["auth_token"])
        self.assertIsNone(doc["metadata"])
        self.assertIn("auth_token", doc)
        self.assertIn("metadata", doc)


def answer(**changes: Any) -> bytes:
    doc: dict[str, Any] = {"version": 2, "decision": "allow"}
    doc.update(changes)
    return encoded(doc)


class AgentResponseTests(TestCase):
    def assertInvalid(self, payload: bytes, *fragments: str) -> str:
        with self.assertRaises(InvalidMessage) as caught:
            m.decode_agent_response(payload)
        text = str(caught.exception)
        self.assertTrue(text.startswith("Invalid message format: "), text)
        for fragment in fragments:
            self.assertIn(fragment, text)
        return text

    def test_only_version_and_decision_are_required(self) -> None:
        response = m.decode_agent_response(answer())
        self.assertEqual(response, m.AgentResponse())
        self.assertTrue(response.is_allow)
        self.assertIsNone(response.correlation_id)

    def test_version_is_required(self) -> None:
        self.assertInvalid(b'{"decision": "allow"}', "missing required field `version`")

    def test_100_header_operations_are_read(self) -> None:
        ops = [{"add": {"name": f"x-{i}", "value": "v"}} for i in range(100)]
        response = m.decode_agent_response(answer(request_headers=ops[:60], response_headers=ops[60:]))
        self.assertEqual(len(response.request_headers) + len(response.response_headers), 100)
        self.assertEqual(m.MAX_HEADER_OPS, 100)

    def test_more_than_100_header_operations_are_an_invalid_answer(self) -> None:
        ops = [{"set": {"name": f"x-{i}", "value": "v"}} for i in range(101)]
        self.assertInvalid(
            answer(request_headers=ops[:50], response_headers=ops[50:]),
            "more than 100 header operations in one answer",
            "`$.response_headers[50]`",
        )

    def test_the_count_stops_at_the_first_operation_too_many(self) -> None:
        # The rest is never read: an operation of the wrong shape after the
        # 101st is not what is reported.
        ops: list[Any] = [{"remove": {"name": "x"}}] * 101 + ["not an operation"]
        self.assertInvalid(answer(request_headers=ops), "`$.request_headers[100]`")

    def test_the_count_starts_again_with_each_answer(self) -> None:
        ops = [{"remove": {"name": "x"}}] * 100
        for _ in range(3):
            self.assertEqual(len(m.decode_agent_response(answer(request_headers=ops)).request_headers), 100)
        # Also after an answer that failed midway.
        self.assertInvalid(answer(request_headers=[*ops[:10], "bad"]), "`$.request_headers[10]`")
        self.assertEqual(len(m.decode_agent_response(answer(response_headers=ops)).response_headers), 100)

    def test_an_answer_of_too_many_values_is_refused_before_it_is_decoded(self) -> None:
        # 16 MiB of empty lists in audit.custom decoded to some 360 MiB,
        # held as long as its request.  Counted first, it is never decoded.
        import tracemalloc

        count = (16 * 1024 * 1024 - 200) // 3
        junk = b"[" + b"[]," * (count - 1) + b"[]]"
        payload = b'{"version":2,"decision":"allow","audit":{"custom":{"correlation_id":"a","junk":' + junk + b"}}}"
        tracemalloc.start()
        try:
            text = self.assertInvalid(payload, f"AgentResponse holds more than {m.MAX_ANSWER_VALUES:,} values")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(text, "Invalid message format: AgentResponse holds more than 100,000 values")
        self.assertLess(peak, 4 * len(payload), "copies of the payload at most, nothing decoded")

    def test_an_answer_at_the_values_bound_is_read(self) -> None:
        # Keys count: the answer's map, version and 2, decision and "allow",
        # audit and its map, custom and its map, correlation_id and "a",
        # tags and its list are 13 values; each element is one more.
        elements = m.MAX_ANSWER_VALUES - 13
        response = m.decode_agent_response(
            answer(audit={"custom": {"correlation_id": "a", "tags": [0] * elements}})
        )
        self.assertEqual(len(response.audit.custom["tags"]), elements)
        self.assertInvalid(
            answer(audit={"custom": {"correlation_id": "a", "tags": [0] * (elements + 1)}}),
            "holds more than 100,000 values",
        )
        # Commas inside strings are not values: a long text full of them is read.
        text = "," * (2 * m.MAX_ANSWER_VALUES)
        self.assertEqual(m.decode_agent_response(answer(audit={"custom": {"note": text}})).audit.custom["note"], text)

    def test_decision_is_required(self) -> None:
        self.assertInvalid(b'{"version": 2}', "missing required field `decision`")

    def test_version_of_the_wrong_type(self) -> None:
        self.assertInvalid(answer(version="2"), "`$.version`")

    def test_decisions_decode(self) -> None:
        cases = {
            "allow": m.ALLOW,
            json.dumps({"block": {"status": 403, "body": "no", "headers": {"a": "b"}}}): m.Block(
                403, "no", {"a": "b"}
            ),
            json.dumps({"block": {"status": 429}}): m.Block(429),
            json.dumps({"redirect": {"url": "/login", "status": 307}}): m.Redirect("/login", 307),
            json.dumps({"redirect": {"url": "/x"}}): m.Redirect("/x"),
            json.dumps({"challenge": {"challenge_type": "captcha", "params": {"k": "v"}}}): m.Challenge(
                "captcha", {"k": "v"}
            ),
        }
        for wire, decision in cases.items():
            value = "allow" if wire == "allow" else json.loads(wire)
            self.assertEqual(m.decode_agent_response(answer(decision=value)).decision, decision)

    def test_unit_decisions_in_map_form(self) -> None:
        """
        C{{"allow": null}} is allow, as the reference's parser reads a unit
        variant written as a map (any other body is not).
        """
        self.assertIs(m.decode_agent_response(answer(decision={"allow": None})).decision, m.ALLOW)
        for value in ({"allow": {}}, {"allow": 1}, {"allow": None, "block": {"status": 403}}):
            self.assertInvalid(answer(decision=value), "`$.decision`")

    def test_unknown_decision_string(self) -> None:
        self.assertInvalid(answer(decision="deny"), "unknown decision", "`$.decision`")

    def test_decision_of_the_wrong_type(self) -> None:
        for value in (5, None, [], True):
            self.assertInvalid(answer(decision=value), "`$.decision`")

    def test_decision_with_two_tags(self) -> None:
        value = {"block": {"status": 403}, "redirect": {"url": "/"}}
        self.assertInvalid(answer(decision=value), "unknown decision", "`$.decision`")

    def test_decision_body_of_the_wrong_type(self) -> None:
        self.assertInvalid(answer(decision={"block": 5}), "`$.decision.block`")

    def test_decision_field_of_the_wrong_type_names_the_whole_path(self) -> None:
        self.assertInvalid(
            answer(decision={"block": {"status": "403"}}), "`$.decision.block.status`"
        )
        self.assertInvalid(
            answer(decision={"redirect": {"url": 5}}), "`$.decision.redirect.url`"
        )
        self.assertInvalid(
            answer(decision={"challenge": {"challenge_type": "x", "params": {"a": 1}}}),
            "`$.decision.challenge.params",
        )
        self.assertInvalid(
            answer(decision={"block": {"status": 403, "headers": ["x"]}}),
            "`$.decision.block.headers`",
        )

    def test_decision_missing_field(self) -> None:
        self.assertInvalid(
            answer(decision={"redirect": {"status": 302}}),
            "missing required field `url`",
            "`$.decision.redirect`",
        )

    def test_block_status_is_u16(self) -> None:
        self.assertInvalid(answer(decision={"block": {"status": 70000}}), "`$.decision.block.status`")

    def test_header_ops_decode(self) -> None:
        ops = [{"set": {"name": "a", "value": "1"}}, {"add": {"name": "b", "value": "2"}}, {"remove": {"name": "c"}}]
        response = m.decode_agent_response(answer(request_headers=ops, response_headers=ops[:1]))
        self.assertEqual(
            response.request_headers,
            [m.SetHeader("a", "1"), m.AddHeader("b", "2"), m.RemoveHeader("c")],
        )
        self.assertEqual(response.response_headers, [m.SetHeader("a", "1")])

    def test_header_op_wrong_shapes(self) -> None:
        cases = [
            ([{"rename": {"name": "a"}}], "unknown header operation", "`$.request_headers[0]`"),
            (["set"], "unknown header operation", "`$.request_headers[0]`"),
            ([{"set": {"name": "a"}}], "missing required field `value`", "`$.request_headers[0].set`"),
            ([{"add": {"name": "a", "value": 2}}], "`$.request_headers[0].add.value`"),
            ([{"remove": {"name": None}}], "`$.request_headers[0].remove.name`"),
            ([{"remove": []}], "`$.request_headers[0].remove`"),
        ]
        for ops, *fragments in cases:
            self.assertInvalid(answer(request_headers=ops), *fragments)

    def test_header_ops_that_are_not_a_list(self) -> None:
        self.assertInvalid(answer(response_headers={"set": {}}), "`$.response_headers`")

    def test_second_header_op_error_names_its_index(self) -> None:
        ops = [{"remove": {"name": "ok"}}, {"set": {"name": 1, "value": "x"}}]
        self.assertInvalid(answer(response_headers=ops), "`$.response_headers[1].set.name`")

    def test_websocket_decisions_decode(self) -> None:
        for wire, decision in [
            ("allow", m.WebSocketAllow()),
            ("drop", m.WebSocketDrop()),
            ({"close": {"code": 1008, "reason": "policy"}}, m.WebSocketClose(1008, "policy")),
        ]:
            response = m.decode_agent_response(answer(websocket_decision=wire))
            self.assertEqual(response.websocket_decision, decision)

    def test_unit_websocket_decisions_in_map_form(self) -> None:
        """C{{"allow": null}} and C{{"drop": null}} are read as the reference reads them."""
        for wire, decision in [({"allow": None}, m.WebSocketAllow()), ({"drop": None}, m.WebSocketDrop())]:
            response = m.decode_agent_response(answer(websocket_decision=wire))
            self.assertEqual(response.websocket_decision, decision)
        for value in ({"drop": {}}, {"allow": "x"}):
            self.assertInvalid(answer(websocket_decision=value), "`$.websocket_decision`")

    def test_websocket_decision_wrong_shapes(self) -> None:
        cases = [
            ("deny", "unknown websocket decision", "`$.websocket_decision`"),
            ({"close": {"code": "x", "reason": ""}}, "`$.websocket_decision.close.code`"),
            ({"close": {"code": 70000, "reason": ""}}, "`$.websocket_decision.close.code`"),
            ({"close": {"code": 1000}}, "missing required field `reason`"),
            (3, "`$.websocket_decision`"),
        ]
        for value, *fragments in cases:
            self.assertInvalid(answer(websocket_decision=value), *fragments)

    def test_body_mutation_wrong_shapes(self) -> None:
        self.assertInvalid(answer(request_body_mutation={"data": 1}), "`$.request_body_mutation.data`")
        self.assertInvalid(
            answer(response_body_mutation={"chunk_index": -1}), "`$.response_body_mutation.chunk_index`"
        )
        self.assertInvalid(
            answer(request_body_mutation={"chunk_index": 2**32}), "`$.request_body_mutation.chunk_index`"
        )

    def test_body_mutation_forms(self) -> None:
        self.assertTrue(m.BodyMutation.drop(1).is_drop)
        self.assertEqual(m.BodyMutation.drop(1).replacement, b"")
        self.assertTrue(m.BodyMutation.pass_through(1).is_pass_through)
        self.assertIsNone(m.BodyMutation.pass_through(1).replacement)
        self.assertEqual(m.BodyMutation.replace(0, b"\x00hi").replacement, b"\x00hi")

    def test_other_fields_of_the_wrong_type(self) -> None:
        cases = [
            ({"needs_more": "yes"}, "`$.needs_more`"),
            ({"routing_metadata": {"a": 1}}, "`$.routing_metadata[...]`"),
            ({"audit": {"tags": [1]}}, "`$.audit.tags[0]`"),
            ({"audit": {"confidence": "high"}}, "`$.audit.confidence`"),
            ({"audit": {"custom": []}}, "`$.audit.custom`"),
            ({"audit": []}, "`$.audit`"),
        ]
        for changes, fragment in cases:
            self.assertInvalid(answer(**changes), fragment)

    def test_correlation_id_comes_from_audit_custom(self) -> None:
        response = m.decode_agent_response(answer(audit={"custom": {"correlation_id": "c-1", "x": 1}}))
        self.assertEqual(response.correlation_id, "c-1")

    def test_non_string_correlation_id_is_no_correlation_id(self) -> None:
        response = m.decode_agent_response(answer(audit={"custom": {"correlation_id": 5}}))
        self.assertIsNone(response.correlation_id)

    def test_encoding_uses_externally_tagged_forms(self) -> None:
        response = m.AgentResponse(
            decision=m.Block(403, "no"),
            request_headers=[m.SetHeader("a", "1"), m.RemoveHeader("b")],
            websocket_decision=m.WebSocketClose(1000, "bye"),
        )
        doc = json.loads(m.encode(response))
        self.assertEqual(doc["decision"], {"block": {"status": 403, "body": "no", "headers": None}})
        self.assertEqual(doc["request_headers"], [{"set": {"name": "a", "value": "1"}}, {"remove": {"name": "b"}}])
        self.assertEqual(doc["websocket_decision"], {"close": {"code": 1000, "reason": "bye"}})
        self.assertEqual(m.decode_agent_response(m.encode(response)), response)


class ControlMessageTests(TestCase):
    def test_flow_control_integer_forms(self) -> None:
        self.assertTrue(m.decode(b'{"action": 1}', m.FlowControlMessage).paused)
        self.assertFalse(m.decode(b'{"action": 2}', m.FlowControlMessage).paused)

    def test_flow_control_struct_forms(self) -> None:
        pause = b'{"action": {"type": "pause"}, "correlation_id": null, "timestamp_ms": 1}'
        resume = b'{"action": {"type": "resume"}}'
        self.assertTrue(m.decode(pause, m.FlowControlMessage).paused)
        self.assertFalse(m.decode(resume, m.FlowControlMessage).paused)

    def test_flow_control_is_sent_in_integer_form_only(self) -> None:
        message = m.FlowControlMessage(action=m.FlowAction.PAUSE)
        self.assertEqual(json.loads(m.encode(message)), {"action": 1})

    def test_flow_control_wrong_type(self) -> None:
        with self.assertRaises(InvalidMessage) as caught:
            m.decode(b'{"action": "pause"}', m.FlowControlMessage)
        self.assertIn("`$.action`", str(caught.exception))

    def test_health_state_forms(self) -> None:
        self.assertEqual(m.decode(b'{"state": 4}', m.HealthStatusMessage).state_code, 4)
        struct_form = b'{"state": {"status": "healthy"}, "agent_id": "w"}'
        self.assertEqual(m.decode(struct_form, m.HealthStatusMessage).state_code, m.HealthState.HEALTHY)
        self.assertIsNone(m.decode(b'{"state": {"status": 3}}', m.HealthStatusMessage).state_code)

    def test_ping_fields_are_typed(self) -> None:
        with self.assertRaises(InvalidMessage) as caught:
            m.decode(b'{"sequence": "0", "timestamp_ms": 0}', m.PingMessage)
        self.assertIn("`$.sequence`", str(caught.exception))

    def test_cancel_encodes_reason_as_integer(self) -> None:
        body = m.CancelMessage(correlation_id="c", reason=m.CancelReason.TIMEOUT, timestamp_ms=5)
        self.assertEqual(json.loads(m.encode(body)), {"correlation_id": "c", "reason": 1, "timestamp_ms": 5})

    def test_unencodable_value_is_a_serialization_error(self) -> None:
        with self.assertRaises(SerializationError) as caught:
            m.encode(m.ConfigureEvent(config={"x": object()}))
        self.assertTrue(str(caught.exception).startswith("Serialization error: "))


class CorrelationIdTests(TestCase):
    def test_event_correlation_id_of_request_headers_is_the_metadata_one(self) -> None:
        event = request_headers("meta-id")
        self.assertEqual(m.event_correlation_id(event), "meta-id")

    def test_event_correlation_id_of_other_events_is_the_top_level_one(self) -> None:
        self.assertEqual(m.event_correlation_id(response_headers("top")), "top")

    def test_event_correlation_id_falls_back_to_the_top_level_one(self) -> None:
        event = request_headers("")
        event = msgspec.structs.replace(event, correlation_id="top")
        self.assertEqual(m.event_correlation_id(event), "top")

    def test_encode_event_sets_both_ids_for_request_headers(self) -> None:
        doc = json.loads(m.encode_event(request_headers("old"), "new"))
        self.assertEqual(doc["correlation_id"], "new")
        self.assertEqual(doc["metadata"]["correlation_id"], "new")

    def test_encode_event_copies_the_metadata_id_to_the_top_level(self) -> None:
        doc = json.loads(m.encode_event(request_headers("meta")))
        self.assertEqual(doc["correlation_id"], "meta")
        self.assertEqual(doc["metadata"]["correlation_id"], "meta")

    def test_encode_event_argument_wins_for_other_events(self) -> None:
        doc = json.loads(m.encode_event(response_headers("struct-cid"), "arg-cid"))
        self.assertEqual(doc["correlation_id"], "arg-cid")

    def test_encode_event_keeps_the_event_unchanged(self) -> None:
        event = request_headers("old")
        m.encode_event(event, "new")
        self.assertEqual(event.metadata.correlation_id, "old")
        self.assertEqual(event.correlation_id, "")

    def test_encode_event_reuses_its_buffer_without_sharing_its_output(self) -> None:
        first = m.encode_event(request_headers("a"), "first")
        second = m.encode_event(m.ConfigureEvent(config={"mode": "block"}), "second")
        self.assertIs(type(first), bytes)
        self.assertEqual(json.loads(first)["correlation_id"], "first")
        self.assertEqual(json.loads(second)["correlation_id"], "second")
        self.assertEqual(len(_codec._buffers), 1)

    def test_encode_event_after_an_error_and_past_the_kept_size(self) -> None:
        with self.assertRaises(SerializationError):
            m.encode_event(m.ConfigureEvent(config={"x": object()}), "bad")
        self.assertEqual(json.loads(m.encode_event(response_headers("c"), "ok"))["correlation_id"], "ok")
        big = m.encode_event(m.ConfigureEvent(config="x" * _codec._BUFFER_KEPT), "big")
        self.assertEqual(json.loads(big)["config"], "x" * _codec._BUFFER_KEPT)
        # A buffer that large is not kept for the next event.
        self.assertTrue(all(len(b) <= _codec._BUFFER_KEPT for b in _codec._buffers))

    def test_traceparent_is_omitted_when_unset(self) -> None:
        doc = json.loads(m.encode_event(request_headers("c")))
        self.assertNotIn("traceparent", doc["metadata"])
        self.assertIn("tls_version", doc["metadata"])
        self.assertIsNone(doc["metadata"]["tls_version"])

    def test_every_event_class_has_its_type_byte(self) -> None:
        self.assertEqual(
            sorted(m.EVENT_CLASSES), [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]
        )
        for message_type, cls in m.EVENT_CLASSES.items():
            self.assertEqual(cls.message_type, message_type)


class UnsignedSixtyFourBitTests(TestCase):
    """SPEC section 3: the limits are a Rust C{u64}: all of it is read, nothing past it."""

    def registration(self, **limits: int) -> bytes:
        document = json.loads(registration_payload())
        document["capabilities"]["limits"].update(limits)
        return json.dumps(document).encode()

    def test_the_largest_u64_limits_are_read(self) -> None:
        largest = 2**64 - 1
        request = m.decode_registration_request(
            self.registration(max_body_size=largest, preferred_chunk_size=largest)
        )
        self.assertEqual(request.capabilities.limits.max_body_size, largest)
        self.assertEqual(request.capabilities.limits.preferred_chunk_size, largest)
        self.assertIn(b'"max_body_size":18446744073709551615', m.encode(request))
        self.assertEqual(m.decode_registration_request(m.encode(request)), request)

    def test_limits_past_u64_are_invalid(self) -> None:
        for name in ("max_body_size", "preferred_chunk_size"):
            with self.assertRaises(InvalidMessage) as caught:
                m.decode_registration_request(self.registration(**{name: 2**64}))
            self.assertIn(name, str(caught.exception))

    def test_ping_sequence_and_event_sizes_take_u64(self) -> None:
        ping = m.decode(b'{"sequence":18446744073709551615,"timestamp_ms":1}', m.PingMessage)
        self.assertEqual(ping.sequence, 2**64 - 1)
        with self.assertRaises(InvalidMessage):
            m.decode(b'{"sequence":18446744073709551616,"timestamp_ms":1}', m.PingMessage)
        with self.assertRaises(ValueError):
            m.RequestBodyChunkEvent(
                correlation_id="c", data="", is_last=True, chunk_index=0, bytes_received=2**64
            )
