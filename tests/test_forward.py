"""
The forward transport's handshake messages and payload codecs, checked
against the C{fwd_*} vectors (frames captured between the reference's own
forward client and server).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import forward as f
from sentinel_twisted import messages as m
from sentinel_twisted.errors import InvalidMessage

from .vectors import EVENT_VECTORS, by_name, frame_bytes, same_json


def vector_payload(name: str) -> bytes:
    """The exact payload bytes of a vector (after the 5-byte frame header)."""
    vector = by_name(name)
    frame = frame_bytes(vector)
    if "payload_base64" in vector:
        payload = base64.b64decode(vector["payload_base64"])
    else:
        payload = vector["payload"].encode("utf-8")
    assert frame[5:] == payload, name
    return payload


#: The capabilities rust-fwd-agent announces in the fwd_handshake_response vectors.
REFERENCE_CAPABILITIES = m.AgentCapabilities(
    agent_id="waf-1",
    name="rust-fwd-agent (zentinel-agent-protocol interop harness)",
    version="0.6.20",
    supported_events=[1, 2, 3, 4, 5, 6, 7],
    features=m.AgentFeatures(
        streaming_body=True,
        websocket=True,
        concurrent_requests=1024,
        cancellation=True,
    ),
    limits=m.AgentLimits(max_body_size=10485760, max_concurrency=1024, preferred_chunk_size=65536),
)


class HandshakeTests(SynchronousTestCase):
    def test_decodes_the_reference_request(self) -> None:
        request = f.decode_handshake_request(vector_payload("fwd_handshake_request"))
        self.assertEqual(request.supported_versions, [2])
        self.assertEqual(request.proxy_id, "zentinel-proxy")
        self.assertEqual(request.proxy_version, "0.6.20")
        self.assertIsNone(request.config)
        self.assertEqual(request.supported_encodings, ["json"])

    def test_decodes_the_messagepack_offer(self) -> None:
        request = f.decode_handshake_request(vector_payload("fwd_handshake_request_msgpack"))
        self.assertEqual(request.supported_encodings, ["msgpack", "json"])

    def test_request_encodes_byte_for_byte(self) -> None:
        for name, offer in (
            ("fwd_handshake_request", ["json"]),
            ("fwd_handshake_request_msgpack", ["msgpack", "json"]),
        ):
            request = f.HandshakeRequest(
                supported_versions=[2],
                proxy_id="zentinel-proxy",
                proxy_version="0.6.20",
                supported_encodings=offer,
            )
            self.assertEqual(m.encode(request), vector_payload(name))

    def test_missing_config_and_encodings_are_fine(self) -> None:
        request = f.decode_handshake_request(
            b'{"supported_versions":[2],"proxy_id":"p","proxy_version":"1"}'
        )
        self.assertIsNone(request.config)
        self.assertEqual(f.negotiate_encoding(request.supported_encodings), f.JSON)
        self.assertNotIn(b"supported_encodings", m.encode(request))

    def test_required_fields(self) -> None:
        for payload in (
            b'{"proxy_id":"p","proxy_version":"1"}',
            b'{"supported_versions":[2],"proxy_version":"1"}',
            b'{"supported_versions":[2],"proxy_id":"p"}',
            b'{"supported_versions":"2","proxy_id":"p","proxy_version":"1"}',
            b'{"supported_versions":[-1],"proxy_id":"p","proxy_version":"1"}',
            b"[]",
            b"",
            b"\xff",
        ):
            with self.assertRaises(InvalidMessage, msg=payload):
                f.decode_handshake_request(payload)

    def test_response_encodes_byte_for_byte(self) -> None:
        for name, encoding in (
            ("fwd_handshake_response", "json"),
            ("fwd_handshake_response_msgpack", "msgpack"),
        ):
            response = f.HandshakeResponse(
                protocol_version=2,
                capabilities=REFERENCE_CAPABILITIES,
                success=True,
                encoding=encoding,
            )
            self.assertEqual(m.encode(response), vector_payload(name))

    def test_response_decodes(self) -> None:
        response = m.decode(vector_payload("fwd_handshake_response_msgpack"), f.HandshakeResponse)
        self.assertEqual(response.capabilities, REFERENCE_CAPABILITIES)
        self.assertEqual(response.encoding, "msgpack")
        self.assertTrue(response.success)


class NegotiationTests(SynchronousTestCase):
    def test_first_known_entry_wins(self) -> None:
        self.assertEqual(f.negotiate_encoding(["msgpack", "json"]), f.MSGPACK)
        self.assertEqual(f.negotiate_encoding(["json", "msgpack"]), f.JSON)
        self.assertEqual(f.negotiate_encoding(["cbor", "msgpack"]), f.MSGPACK)

    def test_nothing_known_means_json(self) -> None:
        self.assertEqual(f.negotiate_encoding([]), f.JSON)
        self.assertEqual(f.negotiate_encoding(msgspec.UNSET), f.JSON)
        self.assertEqual(f.negotiate_encoding(["cbor"]), f.JSON)

    def test_an_agent_may_know_json_only(self) -> None:
        self.assertEqual(f.negotiate_encoding(["msgpack", "json"], known=(f.JSON,)), f.JSON)

    def test_codec_for(self) -> None:
        self.assertIs(f.codec_for("json"), f.JSON_CODEC)
        self.assertIs(f.codec_for("msgpack"), f.MSGPACK_CODEC)
        self.assertRaises(ValueError, f.codec_for, "cbor")


class JsonCodecTests(SynchronousTestCase):
    def test_event_and_answer_are_the_reverse_mode_bytes(self) -> None:
        event = f.JSON_CODEC.decode_event(vector_payload("fwd_evt_request_headers"), m.RequestHeadersEvent)
        self.assertEqual(event.metadata.correlation_id, "req-7f3a")
        response = m.AgentResponse()
        response.audit.custom["correlation_id"] = "req-7f3a"
        self.assertEqual(f.JSON_CODEC.encode_response(response), vector_payload("fwd_resp_allow"))


class MessagePackEventTests(SynchronousTestCase):
    codec = f.MSGPACK_CODEC

    def test_request_headers(self) -> None:
        payload = vector_payload("fwd_evt_request_headers_msgpack")
        event = self.codec.decode_event(payload, m.RequestHeadersEvent)
        expected = m.decode(vector_payload("fwd_evt_request_headers"), m.RequestHeadersEvent)
        self.assertEqual(event, expected)
        # The reference's own layout, written back byte for byte.
        self.assertEqual(self.codec.encode_event(event), payload)

    def test_metadata_without_traceparent_has_eleven_elements(self) -> None:
        """The reference writes 11 metadata elements when traceparent is unset; we read them."""
        payload = vector_payload("fwd_evt_request_headers_minimal_metadata_msgpack")
        event = self.codec.decode_event(payload, m.RequestHeadersEvent)
        self.assertEqual(event.metadata.correlation_id, "req-7f3a")
        self.assertIs(event.metadata.traceparent, msgspec.UNSET)
        self.assertIsNone(event.metadata.server_name)
        self.assertEqual((event.method, event.uri), ("POST", "/login"))
        self.assertEqual(event.headers, {"host": ["localhost"]})

    def test_we_write_all_twelve_metadata_elements(self) -> None:
        event = self.codec.decode_event(
            vector_payload("fwd_evt_request_headers_minimal_metadata_msgpack"), m.RequestHeadersEvent
        )
        written = msgspec.msgpack.decode(self.codec.encode_event(event))
        self.assertEqual(len(written["metadata"]), 12)
        self.assertIsNone(written["metadata"][-1])
        self.assertEqual(self.codec.decode_event(self.codec.encode_event(event), m.RequestHeadersEvent), event)

    def test_duplicated_correlation_id_key(self) -> None:
        """The reference repeats correlation_id in body chunks; we read them as intended."""
        payload = vector_payload("fwd_evt_request_body_chunk_msgpack")
        self.assertEqual(payload.count(b"correlation_id"), 2)
        event = self.codec.decode_event(payload, m.RequestBodyChunkEvent)
        self.assertEqual(
            event,
            m.RequestBodyChunkEvent(
                correlation_id="req-7f3a",
                data="eyJuYW1lIjoid2lkZ2V0In0=",
                is_last=False,
                total_size=34,
                chunk_index=0,
                bytes_received=17,
            ),
        )

    def test_we_write_the_key_once(self) -> None:
        event = self.codec.decode_event(
            vector_payload("fwd_evt_request_body_chunk_msgpack"), m.RequestBodyChunkEvent
        )
        written = self.codec.encode_event(event, "other")
        self.assertEqual(written.count(b"correlation_id"), 1)
        self.assertEqual(self.codec.decode_event(written, m.RequestBodyChunkEvent).correlation_id, "other")

    def test_the_first_of_two_differing_ids_wins(self) -> None:
        """The first key is the id the reference proxy waits on (the one it inserted)."""
        for cid in ("waited-on", "x" * 40):
            payload = (
                b"\x83\xaecorrelation_id"
                + msgspec.msgpack.encode(cid)
                + b"\xaecorrelation_id\xa3own\xa6status\xcc\xc8"
            )
            event = self.codec.decode_event(payload, m.ResponseHeadersEvent)
            self.assertEqual(event.correlation_id, cid)
            self.assertEqual(event.status, 200)

    def test_binary_body_data(self) -> None:
        """The reference's zero-copy body path sends raw bytes; the event still carries base64."""
        payload = msgspec.msgpack.encode(
            {"correlation_id": "c", "data": b"\x00\xffhi", "is_last": True, "chunk_index": 0, "bytes_received": 4}
        )
        event = self.codec.decode_event(payload, m.RequestBodyChunkEvent)
        self.assertEqual(event.body, b"\x00\xffhi")
        self.assertIsNone(event.total_size)

    def test_every_event_type_round_trips(self) -> None:
        for name in EVENT_VECTORS:
            vector = by_name(name)
            cls = m.EVENT_CLASSES[vector["message_type"]]
            event = m.decode(vector["payload"].encode(), cls)
            written = self.codec.encode_event(event)
            self.assertEqual(self.codec.decode_event(written, cls), event, name)
            # Each key once, correlation_id first, as the reference expects.
            self.assertTrue(written[1:16] == b"\xaecorrelation_id", name)
            self.assertEqual(written.count(b"\xaecorrelation_id"), 1, name)

    def test_a_map_for_metadata_is_read_too(self) -> None:
        source = m.decode(by_name("evt_request_headers")["payload"].encode(), m.RequestHeadersEvent)
        payload = msgspec.msgpack.encode(source)
        self.assertEqual(self.codec.decode_event(payload, m.RequestHeadersEvent), source)

    def test_extra_metadata_elements_are_ignored_like_unknown_keys(self) -> None:
        good = vector_payload("fwd_evt_request_headers_msgpack")
        decoded = msgspec.msgpack.decode(good)
        longer = msgspec.msgpack.encode(dict(decoded, metadata=[*decoded["metadata"], "future"]))
        self.assertEqual(
            self.codec.decode_event(longer, m.RequestHeadersEvent),
            self.codec.decode_event(good, m.RequestHeadersEvent),
        )

    def test_malformed_events(self) -> None:
        good = vector_payload("fwd_evt_request_headers_minimal_metadata_msgpack")
        decoded = msgspec.msgpack.decode(good)
        wrong_port = dict(decoded, metadata=[*decoded["metadata"][:3], "x", *decoded["metadata"][4:]])
        cases: list[tuple[bytes, type[Any]]] = [
            (b"", m.RequestHeadersEvent),
            (b"\xc1", m.RequestHeadersEvent),
            (good[:-3], m.RequestHeadersEvent),
            (msgspec.msgpack.encode(wrong_port), m.RequestHeadersEvent),
            (msgspec.msgpack.encode(dict(decoded, metadata={"correlation_id": 1})), m.RequestHeadersEvent),
            (
                msgspec.msgpack.encode(
                    {"correlation_id": "c", "data": 5, "is_last": True, "chunk_index": 0, "bytes_received": 4}
                ),
                m.RequestBodyChunkEvent,
            ),
            (b'{"correlation_id":"c"}', m.ResponseHeadersEvent),
        ]
        for payload, cls in cases:
            with self.assertRaises(InvalidMessage, msg=payload):
                self.codec.decode_event(payload, cls)


class MessagePackResponseTests(SynchronousTestCase):
    codec = f.MSGPACK_CODEC

    def test_allow_is_the_reference_bytes(self) -> None:
        for name, cid in (("fwd_resp_allow_msgpack", "req-7f3a"), ("fwd_resp_allow_uncorrelated_msgpack", "")):
            response = m.AgentResponse()
            response.audit.custom["correlation_id"] = cid
            self.assertEqual(self.codec.encode_response(response), vector_payload(name))
            self.assertEqual(self.codec.decode_response(vector_payload(name)), response)

    def test_every_answer_vector_round_trips_positionally(self) -> None:
        for name in (
            "resp_allow",
            "resp_audit_metadata",
            "resp_block_body_headers",
            "resp_block_minimal",
            "resp_body_mutation_drop",
            "resp_challenge",
            "resp_header_ops",
            "resp_needs_more_body_mutations",
            "resp_redirect",
            "resp_routing_and_custom_multi_key",
        ):
            response = m.decode_agent_response(by_name(name)["payload"].encode())
            written = self.codec.encode_response(response)
            raw = msgspec.msgpack.decode(written)
            self.assertIsInstance(raw, list, name)
            self.assertEqual(len(raw), 10, name)
            self.assertIsInstance(raw[5], list, name)
            self.assertEqual(self.codec.decode_response(written), response, name)
            # The same answer as JSON, field for field.
            ours, theirs = same_json(m.encode(self.codec.decode_response(written)), by_name(name))
            self.assertEqual(ours, theirs, name)

    def test_variant_bodies_are_positional(self) -> None:
        response = m.AgentResponse(
            decision=m.Block(status=403, body="no"),
            request_headers=[m.SetHeader("a", "b"), m.RemoveHeader("c")],
            websocket_decision=m.WebSocketClose(1000, "bye"),
            request_body_mutation=m.BodyMutation.drop(2),
        )
        raw = msgspec.msgpack.decode(self.codec.encode_response(response))
        self.assertEqual(raw[1], {"block": [403, "no", None]})
        self.assertEqual(raw[2], [{"set": ["a", "b"]}, {"remove": ["c"]}])
        self.assertEqual(raw[7], ["", 2])
        self.assertEqual(raw[9], {"close": [1000, "bye"]})

    def test_a_map_form_is_read_too(self) -> None:
        payload = json.loads(by_name("resp_header_ops")["payload"])
        response = self.codec.decode_response(msgspec.msgpack.encode(payload))
        self.assertEqual(response, m.decode_agent_response(json.dumps(payload).encode()))

    def test_more_than_100_header_operations_are_an_invalid_answer(self) -> None:
        ops = [{"add": {"name": "x", "value": "v"}}] * 60
        payload = msgspec.msgpack.encode({"version": 2, "decision": "allow", "request_headers": ops})
        self.assertEqual(len(self.codec.decode_response(payload).request_headers), 60)
        payload = msgspec.msgpack.encode(
            {"version": 2, "decision": "allow", "request_headers": ops, "response_headers": ops}
        )
        with self.assertRaises(InvalidMessage) as caught:
            self.codec.decode_response(payload)
        self.assertIn("more than 100 header operations", str(caught.exception))

    def test_malformed_answers(self) -> None:
        for payload in (
            b"",
            b"\xc1",
            msgspec.msgpack.encode("allow"),
            msgspec.msgpack.encode([2]),
            msgspec.msgpack.encode([2, "allow", [], [], {}, [], False, None, None, None, "extra"]),
            msgspec.msgpack.encode([2, {"block": [403, None, None, "x"]}]),
            msgspec.msgpack.encode([2, "deny"]),
            msgspec.msgpack.encode({"decision": "allow"}),
        ):
            with self.assertRaises(InvalidMessage, msg=payload):
                self.codec.decode_response(payload)


class MessagePackControlTests(SynchronousTestCase):
    codec = f.MSGPACK_CODEC

    def test_cancel_stays_json(self) -> None:
        cancel = self.codec.decode_control(vector_payload("fwd_ctl_cancel_msgpack"), m.CancelMessage)
        self.assertEqual((cancel.correlation_id, cancel.reason), ("req-7f3a", 0))

    def test_a_messagepack_cancel_is_read_too(self) -> None:
        payload = msgspec.msgpack.encode({"correlation_id": "c", "reason": 4, "timestamp_ms": 1})
        self.assertEqual(self.codec.decode_control(payload, m.CancelMessage).reason, 4)

    def test_flow_control_and_health_are_maps(self) -> None:
        self.assertEqual(msgspec.msgpack.decode(self.codec.pause), {"action": 1})
        self.assertEqual(msgspec.msgpack.decode(self.codec.resume), {"action": 2})
        health = self.codec.encode_control(m.HealthStatusMessage(state=1))
        self.assertEqual(msgspec.msgpack.decode(health), {"state": 1})

    def test_malformed_control(self) -> None:
        for payload in (b"", b"{", b"\x81\xa1a"):
            with self.assertRaises(InvalidMessage, msg=payload):
                self.codec.decode_control(payload, m.PingMessage)
