"""
Framing: C{u32 length | type byte | payload}, parsed without quadratic
re-joining, with the length and type checked before a body is buffered.
"""

from __future__ import annotations

import random
import struct

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from sentinel_twisted.errors import (
    AgentProtocolError,
    ControlFrameTooLarge,
    IncompleteFrame,
    InvalidMessage,
    MessageTooLarge,
)
from sentinel_twisted.wire import (
    MAX_CONTROL_FRAME_SIZE,
    MAX_MESSAGE_SIZE,
    FrameReceiver,
    IncompleteFrameBudget,
    MessageType,
    encode_frame,
    frame_header,
)

from ._proxy_support import parse_frames


class Collector(FrameReceiver):
    """A FrameReceiver that records what it parses."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.errors: list[AgentProtocolError] = []

    def frame_received(self, message_type: int, payload: bytes) -> None:
        self.frames.append((message_type, payload))

    def frame_error(self, error: AgentProtocolError) -> None:
        self.errors.append(error)


def connected() -> tuple[Collector, StringTransport]:
    receiver = Collector()
    transport = StringTransport()
    receiver.makeConnection(transport)
    return receiver, transport


class CountingBuffer(bytearray):
    """
    A bytearray that counts every byte copied into or out of it through
    Python-level operations: appends, slices, concatenation, C{bytes()}.
    A receiver that re-joins its buffer on every read copies the buffered
    prefix again each time, so its count grows with the square of the frame
    size; a linear receiver's count stays a small multiple of it.
    """

    copied = 0
    joins = 0

    def __iadd__(self, other):  # type: ignore[no-untyped-def, override]
        self.copied += len(other)
        return super().__iadd__(other)

    def __add__(self, other):  # type: ignore[no-untyped-def, override]
        self.copied += len(self) + len(other)
        self.joins += 1
        return super().__add__(other)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        result = super().__getitem__(index)
        if isinstance(index, slice):
            self.copied += len(result)
        return result

    def __bytes__(self) -> bytes:
        self.copied += len(self)
        self.joins += 1
        return bytes(memoryview(self))


def pieces(data: bytes, rng: random.Random, smallest: int, largest: int) -> list[bytes]:
    out = []
    offset = 0
    while offset < len(data):
        size = rng.randint(smallest, largest)
        out.append(data[offset : offset + size])
        offset += size
    return out


class FramingTests(TestCase):
    def test_one_frame_is_parsed_into_type_and_payload(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(b"\x00\x00\x00\x03\x41{}")
        self.assertEqual(receiver.frames, [(0x41, b"{}")])

    def test_length_counts_type_byte_and_payload(self) -> None:
        self.assertEqual(encode_frame(0x20, b"abc"), b"\x00\x00\x00\x04\x20abc")

    def test_empty_payload_frame_is_valid(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(b"\x00\x00\x00\x01\x01")
        self.assertEqual(receiver.frames, [(0x01, b"")])
        self.assertEqual(receiver.errors, [])

    def test_every_message_type_is_known(self) -> None:
        receiver, _ = connected()
        data = b"".join(encode_frame(t, b"{}") for t in MessageType)
        receiver.dataReceived(data)
        self.assertEqual([t for t, _ in receiver.frames], [int(t) for t in MessageType])
        self.assertEqual(receiver.errors, [])

    def test_many_frames_in_one_read(self) -> None:
        receiver, _ = connected()
        frames = [(0x20, b'{"n":%d}' % i) for i in range(500)]
        receiver.dataReceived(b"".join(encode_frame(t, p) for t, p in frames))
        self.assertEqual(receiver.frames, frames)
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_frames_and_a_partial_frame_in_one_read(self) -> None:
        receiver, _ = connected()
        whole = encode_frame(0x41, b"first") + encode_frame(0x42, b"second")
        tail = encode_frame(0x30, b"third")
        receiver.dataReceived(whole + tail[:7])
        self.assertEqual(receiver.frames, [(0x41, b"first"), (0x42, b"second")])
        self.assertEqual(receiver.buffered_bytes, 7)
        receiver.dataReceived(tail[7:])
        self.assertEqual(receiver.frames[-1], (0x30, b"third"))
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_frames_split_at_every_byte_boundary(self) -> None:
        frames = [(0x20, b'{"a":1}'), (0x41, b""), (0x33, b'{"action":1}')]
        data = b"".join(encode_frame(t, p) for t, p in frames)
        for cut in range(len(data) + 1):
            receiver, _ = connected()
            receiver.dataReceived(data[:cut])
            receiver.dataReceived(data[cut:])
            self.assertEqual(receiver.frames, frames, f"split at {cut}")
            self.assertEqual(receiver.buffered_bytes, 0)

    def test_frames_split_at_every_pair_of_boundaries(self) -> None:
        frames = [(0x20, b'{"a":1}'), (0x42, b"{}")]
        data = b"".join(encode_frame(t, p) for t, p in frames)
        for i in range(len(data) + 1):
            for j in range(i, len(data) + 1):
                receiver, _ = connected()
                for part in (data[:i], data[i:j], data[j:]):
                    receiver.dataReceived(part)
                self.assertEqual(receiver.frames, frames, f"split at {i}, {j}")

    def test_one_byte_at_a_time(self) -> None:
        frames = [(0x10, b'{"x":"' + b"y" * 300 + b'"}'), (0x40, b"{}")]
        data = b"".join(encode_frame(t, p) for t, p in frames)
        receiver, _ = connected()
        for i in range(len(data)):
            receiver.dataReceived(data[i : i + 1])
        self.assertEqual(receiver.frames, frames)

    def test_mid_frame_from_the_first_byte_of_a_frame_to_its_last(self) -> None:
        receiver, _ = connected()
        self.assertFalse(receiver.mid_frame)
        frame = encode_frame(0x20, b'{"a":1}')
        for cut in range(1, len(frame)):
            receiver.dataReceived(frame[cut - 1 : cut])
            self.assertTrue(receiver.mid_frame, f"after {cut} bytes")
        receiver.dataReceived(frame[-1:])
        self.assertFalse(receiver.mid_frame)

    def test_mid_frame_while_a_skipped_frame_arrives(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(encode_frame(0x41, b"x" * (MAX_CONTROL_FRAME_SIZE + 10))[:100])
        self.assertEqual(receiver.buffered_bytes, 0)
        self.assertTrue(receiver.mid_frame)

    def test_payload_is_immutable_bytes(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(encode_frame(0x20, b"ab")[:5])
        receiver.dataReceived(b"ab")
        [(_, payload)] = receiver.frames
        self.assertIs(type(payload), bytes)


class LimitTests(TestCase):
    def test_zero_length_is_rejected(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(b"\x00\x00\x00\x00")
        [error] = receiver.errors
        self.assertIsInstance(error, InvalidMessage)
        self.assertEqual(str(error), "Invalid message format: Zero-length message")

    def test_oversize_length_is_rejected_from_the_prefix_alone(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(struct.pack(">I", MAX_MESSAGE_SIZE + 1))
        [error] = receiver.errors
        self.assertIsInstance(error, MessageTooLarge)
        self.assertEqual(
            str(error), f"Message too large: {MAX_MESSAGE_SIZE + 1} bytes (max: {MAX_MESSAGE_SIZE})"
        )
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_largest_length_is_accepted_in_the_prefix(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(struct.pack(">I", MAX_MESSAGE_SIZE))
        self.assertEqual(receiver.errors, [])
        self.assertEqual(receiver.buffered_bytes, 4)

    def test_nothing_is_buffered_after_an_oversize_prefix(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(struct.pack(">I", 0xFFFFFFFF) + b"\x20" + b"x" * 10_000)
        receiver.dataReceived(b"y" * 10_000)
        self.assertEqual(len(receiver.errors), 1)
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_unknown_type_byte_is_rejected_before_the_body(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(struct.pack(">IB", 1000, 0xFF))
        [error] = receiver.errors
        self.assertEqual(str(error), "Invalid message format: Unknown message type: 0xff")
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_unknown_type_byte_gives_hex_name(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(struct.pack(">IB", 1, 0x03))
        self.assertEqual(
            [str(e) for e in receiver.errors], ["Invalid message format: Unknown message type: 0x03"]
        )

    def test_no_frames_are_parsed_after_a_framing_error(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(b"\x00\x00\x00\x00" + encode_frame(0x41, b"{}"))
        receiver.dataReceived(encode_frame(0x41, b"{}"))
        self.assertEqual(receiver.frames, [])
        self.assertEqual(len(receiver.errors), 1)

    def test_frames_before_a_bad_one_are_delivered(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(encode_frame(0x41, b"{}") + b"\x00\x00\x00\x02\xee{")
        self.assertEqual(receiver.frames, [(0x41, b"{}")])
        self.assertEqual(len(receiver.errors), 1)

    def test_stop_parsing_ignores_later_bytes(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(encode_frame(0x41, b"{}")[:3])
        receiver.stop_parsing()
        receiver.dataReceived(encode_frame(0x41, b"{}")[3:] + encode_frame(0x41, b"{}"))
        self.assertEqual(receiver.frames, [])
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_frame_header_refuses_what_the_reader_refuses(self) -> None:
        # 16 MiB of payload makes a length of 16 MiB + 1: the reference's
        # writer sends it and its reader refuses it.  We refuse to send it.
        with self.assertRaises(MessageTooLarge) as caught:
            frame_header(0x10, MAX_MESSAGE_SIZE)
        self.assertEqual(caught.exception.size, MAX_MESSAGE_SIZE + 1)

    def test_frame_header_accepts_the_largest_readable_frame(self) -> None:
        header = frame_header(0x10, MAX_MESSAGE_SIZE - 1)
        self.assertEqual(header, struct.pack(">IB", MAX_MESSAGE_SIZE, 0x10))

    def test_send_frame_refuses_an_oversize_payload_and_writes_nothing(self) -> None:
        receiver, transport = connected()
        with self.assertRaises(MessageTooLarge):
            receiver.send_frame(0x10, b"x" * MAX_MESSAGE_SIZE)
        self.assertEqual(transport.value(), b"")

    def test_send_frame_writes_header_and_payload(self) -> None:
        receiver, transport = connected()
        receiver.send_frame(0x41, b'{"sequence":0}')
        self.assertEqual(parse_frames(transport.value()), [(0x41, b'{"sequence":0}')])

    def test_send_frames_writes_several(self) -> None:
        receiver, transport = connected()
        receiver.send_frames([(0x41, b"{}"), (0x42, b"[]")])
        self.assertEqual(parse_frames(transport.value()), [(0x41, b"{}"), (0x42, b"[]")])

    def test_string_received_compatibility_checks_type(self) -> None:
        receiver, _ = connected()
        receiver.stringReceived(b"\x41{}")
        receiver.stringReceived(b"\xff{}")
        self.assertEqual(receiver.frames, [(0x41, b"{}")])
        self.assertEqual(len(receiver.errors), 1)


class LargeFrameTests(TestCase):
    """The largest frame, in pieces of 1 byte to 64 KiB."""

    def largest_frame(self) -> tuple[bytes, bytes]:
        payload = bytes(range(256)) * ((MAX_MESSAGE_SIZE - 1) // 256) + b"z" * (
            (MAX_MESSAGE_SIZE - 1) % 256
        )
        self.assertEqual(len(payload), MAX_MESSAGE_SIZE - 1)
        return payload, encode_frame(0x11, payload)

    def test_largest_frame_in_pieces_parses_and_copies_linearly(self) -> None:
        payload, frame = self.largest_frame()
        rng = random.Random(6358)
        # Start with a trickle of single bytes, then 1 byte .. 64 KiB pieces.
        parts = [frame[i : i + 1] for i in range(300)]
        parts += pieces(frame[300:], rng, 1, 64 * 1024)
        receiver, _ = connected()
        buffer = receiver._buffer = CountingBuffer()
        for part in parts:
            receiver.dataReceived(part)
        self.assertEqual(receiver.errors, [])
        self.assertEqual(len(receiver.frames), 1)
        message_type, received = receiver.frames[0]
        self.assertEqual(message_type, 0x11)
        self.assertEqual(len(received), len(payload))
        self.assertTrue(received == payload)
        self.assertEqual(buffer.joins, 0, "the buffer was re-joined")
        # Appending once and slicing the payload out once is 2x; quadratic
        # re-joining would be hundreds of times the frame size.
        self.assertLessEqual(buffer.copied, 3 * len(frame))

    def test_counting_buffer_detects_rejoining(self) -> None:
        # The check above must be able to fail: a receiver that rebuilds its
        # buffer on every read (as the stock receiver does) is caught.
        class Rejoining(Collector):
            def dataReceived(self, data: bytes) -> None:
                joined = bytes(self._buffer) + data
                self._buffer.clear()
                FrameReceiver.dataReceived(self, joined)

        receiver = Rejoining()
        receiver.makeConnection(StringTransport())
        buffer = receiver._buffer = CountingBuffer()
        frame = encode_frame(0x11, b"x" * 20_000)
        for i in range(0, len(frame), 100):
            receiver.dataReceived(frame[i : i + 100])
        self.assertEqual(len(receiver.frames), 1)
        self.assertGreater(buffer.joins, 0)
        self.assertGreater(buffer.copied, 3 * len(frame))

    def test_payload_larger_than_the_limit_never_buffers(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(struct.pack(">IB", MAX_MESSAGE_SIZE + 1, 0x11))
        receiver.dataReceived(b"x" * 65536)
        self.assertEqual(len(receiver.errors), 1)
        self.assertEqual(receiver.buffered_bytes, 0)


class ControlFrameLimitTests(TestCase):
    """
    Ping, Pong, HealthStatus and FlowControl are small: a longer one is
    skipped, its bytes discarded as they arrive, and the stream goes on.
    MetricsReport and ConfigUpdateRequest are limited like any other frame.
    """

    SMALL = (0x41, 0x42, 0x30, 0x33)
    PING = encode_frame(0x41, b'{"sequence":1,"timestamp_ms":0}')

    def test_every_small_control_frame_over_the_limit_is_skipped_unbuffered(self) -> None:
        for message_type in self.SMALL:
            receiver, _ = connected()
            frame = encode_frame(message_type, b"x" * (MAX_CONTROL_FRAME_SIZE + 1000))
            for i in range(0, len(frame), 1000):
                receiver.dataReceived(frame[i : i + 1000])
                self.assertLessEqual(receiver.buffered_bytes, 5)
            receiver.dataReceived(self.PING)
            self.assertEqual(receiver.errors, [])
            self.assertEqual(receiver.frames, [(0x41, self.PING[5:])])
            self.assertEqual(receiver.buffered_bytes, 0)

    def test_the_skip_is_told_with_the_frame_its_size_and_the_limit(self) -> None:
        class Told(Collector):
            told: ControlFrameTooLarge

            def control_frame_too_large(self, error: ControlFrameTooLarge) -> bool:
                self.told = error
                return True

        receiver = Told()
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(struct.pack(">IB", MAX_CONTROL_FRAME_SIZE + 1, 0x33))
        self.assertEqual(
            (receiver.told.kind, receiver.told.size, receiver.told.limit),
            ("FlowControl", MAX_CONTROL_FRAME_SIZE + 1, MAX_CONTROL_FRAME_SIZE),
        )
        self.assertEqual(receiver.errors, [])

    def test_skipped_frame_whose_header_was_buffered(self) -> None:
        receiver, _ = connected()
        frame = encode_frame(0x30, b"x" * (MAX_CONTROL_FRAME_SIZE + 10))
        receiver.dataReceived(frame[:3])
        self.assertEqual(receiver.buffered_bytes, 3)
        receiver.dataReceived(frame[3:100])
        self.assertEqual(receiver.buffered_bytes, 0)
        receiver.dataReceived(frame[100:] + self.PING + self.PING[:7])
        self.assertEqual(receiver.frames, [(0x41, self.PING[5:])])
        self.assertEqual(receiver.buffered_bytes, 7)

    def test_skipped_frame_within_one_read_among_others(self) -> None:
        receiver, _ = connected()
        big = encode_frame(0x41, b"x" * (MAX_CONTROL_FRAME_SIZE + 1))
        receiver.dataReceived(self.PING + big + self.PING + big[:20])
        receiver.dataReceived(big[20:] + self.PING)
        self.assertEqual(receiver.errors, [])
        self.assertEqual(receiver.frames, [(0x41, self.PING[5:])] * 3)

    def test_the_receiver_may_refuse_instead(self) -> None:
        class Refusing(Collector):
            def control_frame_too_large(self, error: ControlFrameTooLarge) -> bool:
                return False

        receiver = Refusing()
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(struct.pack(">IB", MAX_CONTROL_FRAME_SIZE + 1, 0x41))
        receiver.dataReceived(self.PING)
        [error] = receiver.errors
        self.assertIsInstance(error, ControlFrameTooLarge)
        self.assertIsInstance(error, MessageTooLarge)
        self.assertEqual(
            str(error),
            f"Message too large: {MAX_CONTROL_FRAME_SIZE + 1} bytes "
            f"(max: {MAX_CONTROL_FRAME_SIZE} for a Ping frame)",
        )
        self.assertEqual(receiver.frames, [])
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_metrics_and_config_updates_are_limited_like_answers(self) -> None:
        for message_type in (0x31, 0x32):
            receiver, _ = connected()
            payload = b"x" * (180_000 if message_type == 0x31 else 100_000)
            frame = encode_frame(message_type, payload)
            for i in range(0, len(frame), 4096):
                receiver.dataReceived(frame[i : i + 4096])
            self.assertEqual(receiver.errors, [])
            self.assertEqual(receiver.frames, [(message_type, payload)])
            receiver.dataReceived(struct.pack(">IB", MAX_MESSAGE_SIZE + 1, message_type))
            [error] = receiver.errors
            self.assertEqual(type(error), MessageTooLarge)

    def test_control_frame_at_the_limit_is_accepted(self) -> None:
        receiver, _ = connected()
        frame = encode_frame(0x41, b"x" * (MAX_CONTROL_FRAME_SIZE - 1))
        receiver.dataReceived(frame)
        self.assertEqual(receiver.errors, [])
        self.assertEqual(len(receiver.frames), 1)

    def test_other_frames_may_be_larger(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(encode_frame(0x20, b"x" * MAX_CONTROL_FRAME_SIZE))
        self.assertEqual(receiver.errors, [])
        self.assertEqual(len(receiver.frames), 1)

    def test_the_limit_is_per_receiver(self) -> None:
        receiver, _ = connected()
        receiver.MAX_CONTROL_LENGTH = 10
        receiver.dataReceived(encode_frame(0x30, b'{"state":1}') + encode_frame(0x30, b"{}"))
        self.assertEqual(receiver.errors, [])
        self.assertEqual(receiver.frames, [(0x30, b"{}")])

    def test_connection_lost_mid_skip_says_so(self) -> None:
        receiver, _ = connected()
        receiver.dataReceived(encode_frame(0x41, b"x" * (MAX_CONTROL_FRAME_SIZE + 100))[:1000])
        self.assertEqual(
            receiver.lost_detail(Failure(ConnectionDone())),
            f"connection closed mid-frame ({MAX_CONTROL_FRAME_SIZE + 105 - 1000} bytes "
            "of a skipped Ping frame to come)",
        )
        receiver.stop_parsing()
        self.assertEqual(receiver.lost_detail(Failure(ConnectionDone())), "connection closed by peer")


class Deadline(Collector):
    frame_timeout = 5.0


def with_deadline() -> tuple[Collector, Clock]:
    receiver = Deadline()
    clock = receiver.frame_clock = Clock()
    receiver.makeConnection(StringTransport())
    return receiver, clock


class FrameDeadlineTests(TestCase):
    """A frame, once started, must be complete within C{frame_timeout}."""

    def test_incomplete_frame_is_an_error_after_the_deadline(self) -> None:
        receiver, clock = with_deadline()
        receiver.dataReceived(encode_frame(0x20, b"x" * 100)[:50])
        clock.advance(4.9)
        self.assertEqual(receiver.errors, [])
        clock.advance(0.1)
        [error] = receiver.errors
        self.assertIsInstance(error, IncompleteFrame)
        self.assertEqual(
            str(error),
            "Incomplete frame: 50 bytes of a frame received, and the rest not within 5s",
        )
        self.assertEqual(receiver.buffered_bytes, 0)

    def test_trickling_bytes_does_not_extend_the_deadline(self) -> None:
        receiver, clock = with_deadline()
        frame = encode_frame(0x20, b"x" * 100)
        for i in range(10):
            receiver.dataReceived(frame[i : i + 1])
            clock.advance(0.5)
        self.assertEqual(len(receiver.errors), 1)

    def test_each_frame_gets_its_own_time(self) -> None:
        receiver, clock = with_deadline()
        frame = encode_frame(0x20, b"x" * 100)
        receiver.dataReceived(frame[:50])
        clock.advance(4)
        receiver.dataReceived(frame[50:] + frame[:50])
        clock.advance(4)
        self.assertEqual(receiver.errors, [])
        receiver.dataReceived(frame[50:])
        clock.advance(10)
        self.assertEqual(receiver.errors, [])
        self.assertEqual(len(receiver.frames), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_trickled_skipped_frame_is_an_error_after_the_deadline(self) -> None:
        receiver, clock = with_deadline()
        frame = encode_frame(0x41, b"x" * (MAX_CONTROL_FRAME_SIZE + 1000))
        for i in range(0, 1000, 100):
            self.assertEqual(receiver.errors, [])
            receiver.dataReceived(frame[i : i + 100])
            self.assertEqual(receiver.buffered_bytes, 0)
            clock.advance(0.5)
        [error] = receiver.errors
        self.assertIsInstance(error, IncompleteFrame)
        self.assertEqual(
            str(error),
            "Incomplete frame: 1000 bytes of a skipped Ping frame received, "
            "and the rest not within 5s",
        )
        self.assertEqual(clock.getDelayedCalls(), [])
        receiver.dataReceived(frame[1000:] + encode_frame(0x41, b"{}"))
        self.assertEqual(receiver.frames, [])

    def test_a_skipped_frame_keeps_the_start_of_its_buffered_header(self) -> None:
        receiver, clock = with_deadline()
        frame = encode_frame(0x41, b"x" * (MAX_CONTROL_FRAME_SIZE + 10))
        receiver.dataReceived(frame[:3])
        clock.advance(4)
        receiver.dataReceived(frame[3:50])
        clock.advance(0.9)
        self.assertEqual(receiver.errors, [])
        clock.advance(0.1)
        [error] = receiver.errors
        self.assertIn("50 bytes of a skipped Ping frame received", str(error))

    def test_a_skipped_frame_ended_in_time_is_no_error_and_the_next_has_its_own_time(self) -> None:
        receiver, clock = with_deadline()
        frame = encode_frame(0x30, b"x" * (MAX_CONTROL_FRAME_SIZE + 10))
        after = encode_frame(0x20, b"x" * 100)
        receiver.dataReceived(frame[:100])
        clock.advance(4)
        receiver.dataReceived(frame[100:] + after[:10])
        clock.advance(4.9)
        self.assertEqual(receiver.errors, [])
        receiver.dataReceived(after[10:])
        clock.advance(10)
        self.assertEqual(receiver.errors, [])
        self.assertEqual(receiver.frames, [(0x20, after[5:])])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_complete_frames_start_no_timer(self) -> None:
        receiver, clock = with_deadline()
        receiver.dataReceived(encode_frame(0x20, b"x") * 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_parsing_stops_the_timer(self) -> None:
        receiver, clock = with_deadline()
        receiver.dataReceived(b"\x00\x00")
        receiver.stop_parsing()
        self.assertEqual(clock.getDelayedCalls(), [])


class Evicted(Collector):
    def __init__(self) -> None:
        super().__init__()
        self.evictions: list[tuple[int, int, int]] = []

    def frame_budget_exceeded(self, held: int, total: int, limit: int) -> None:
        self.evictions.append((held, total, limit))
        super().frame_budget_exceeded(held, total, limit)


class IncompleteFrameBudgetTests(TestCase):
    """Bytes held in incomplete frames by all connections, under one limit."""

    def receivers(self, count: int, budget: IncompleteFrameBudget) -> list[Evicted]:
        result = []
        for _ in range(count):
            receiver = Evicted()
            receiver.frame_budget = budget
            receiver.makeConnection(StringTransport())
            result.append(receiver)
        return result

    def test_a_skipped_frame_holds_nothing(self) -> None:
        budget = IncompleteFrameBudget(1000)
        [receiver] = self.receivers(1, budget)
        frame = encode_frame(0x41, b"x" * (MAX_CONTROL_FRAME_SIZE + 1))
        receiver.dataReceived(frame[:3])
        self.assertEqual(budget.total, 3)
        for i in range(3, len(frame), 500):
            receiver.dataReceived(frame[i : i + 500])
            self.assertEqual(budget.total, 0)
        self.assertEqual(receiver.evictions, [])
        self.assertEqual(receiver.errors, [])

    def test_partial_frames_are_counted_and_released(self) -> None:
        budget = IncompleteFrameBudget(1000)
        a, b = self.receivers(2, budget)
        frame = encode_frame(0x20, b"x" * 300)
        a.dataReceived(frame[:100])
        b.dataReceived(frame[:200])
        self.assertEqual(budget.total, 300)
        a.dataReceived(frame[100:])
        self.assertEqual(budget.total, 200)
        self.assertEqual((budget.held_by(a), budget.held_by(b)), (0, 200))
        b.stop_parsing()
        self.assertEqual(budget.total, 0)

    def test_over_the_budget_the_connection_holding_most_is_closed(self) -> None:
        budget = IncompleteFrameBudget(1000)
        a, b, c = self.receivers(3, budget)
        frame = encode_frame(0x20, b"x" * 2000)
        a.dataReceived(frame[:300])
        b.dataReceived(frame[:500])
        self.assertEqual(budget.total, 800)
        c.dataReceived(frame[:201])
        self.assertEqual(b.evictions, [(500, 1001, 1000)])
        [error] = b.errors
        self.assertIsInstance(error, IncompleteFrame)
        self.assertIn("1001 bytes (max: 1000)", str(error))
        self.assertEqual((a.errors, c.errors), ([], []))
        self.assertEqual(budget.total, 501)
        self.assertEqual(b.buffered_bytes, 0)
        self.assertEqual(budget.evictions, 1)

    def test_the_reader_itself_may_be_the_one_closed(self) -> None:
        budget = IncompleteFrameBudget(1000)
        a, b = self.receivers(2, budget)
        frame = encode_frame(0x20, b"x" * 2000)
        a.dataReceived(frame[:100])
        b.dataReceived(frame[:1500])
        self.assertEqual(len(b.errors), 1)
        self.assertEqual(a.errors, [])
        self.assertEqual(budget.total, 100)
        b.dataReceived(frame[1500:])
        self.assertEqual(b.frames, [])

    def test_as_many_are_closed_as_it_takes(self) -> None:
        budget = IncompleteFrameBudget(1000)
        receivers = self.receivers(5, budget)
        frame = encode_frame(0x20, b"x" * 2000)
        for receiver in receivers:
            receiver.dataReceived(frame[:200])
        self.assertEqual(budget.total, 1000)
        budget.limit = 500
        receivers[0].dataReceived(frame[200:201])
        self.assertEqual(budget.total, 400)
        self.assertEqual([len(r.errors) for r in receivers], [1, 1, 1, 0, 0])
