"""
Fuzz targets for the frame parser and the message codec, driven by
hypothesis, and a time-bounded runner for CI:

    python -m tests.reliability.fuzz --seconds 40

Targets (each takes the input bytes and a list of cut points, where the
byte stream is split into reads):

  - C{frames}: L{FrameReceiver} against a parser written from SPEC section
    1; the frames and the framing error must be the same however the
    stream is cut, and the same as the reference's.
  - C{codec}: every decoder on the payload only ever raises the protocol's
    own errors; whatever decodes re-encodes and decodes to the same value.
  - C{proxy}: a registered proxy-side connection with requests pending is
    fed the bytes; nothing escapes, nothing is logged as a failure, and
    every pending request ends exactly once when the connection goes.
  - C{agent}: a registered agent-side connection (our L{AgentProtocol}) is
    fed the bytes; nothing escapes or is logged as a failure.

A failing input is shrunk by hypothesis and saved in
C{tests/reliability/fuzz_corpus/} (C{TARGET-HASH.bin}); the test suite
replays every file there (C{test_fuzz.py}), so a crash found once stays a
regression test.  Commit the file with the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from sentinel_twisted import messages as m
from sentinel_twisted.errors import AgentProtocolError
from sentinel_twisted.wire import (
    MAX_CONTROL_FRAME_SIZE,
    MAX_MESSAGE_SIZE,
    FrameReceiver,
    MessageType,
    encode_frame,
)

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
KNOWN_TYPES = frozenset(int(t) for t in MessageType)
CONTROL_TYPES = frozenset(
    int(t) for t in (MessageType.PING, MessageType.PONG, MessageType.HEALTH_STATUS, MessageType.FLOW_CONTROL)
)

# -- the targets ---------------------------------------------------------------


def reference_frames(data: bytes) -> tuple[list[tuple[int, bytes]], str | None, int]:
    """
    SPEC section 1, written plainly: the complete frames, the framing error
    (if any), and how many bytes wait for the rest of a frame.  The length
    and the type byte are judged as soon as they have arrived; a small
    control frame (Ping, Pong, HealthStatus, FlowControl) over 64 KiB is
    skipped: not delivered, nothing of it waits, and the frames after it
    are read.
    """
    frames = []
    offset = 0
    while len(data) - offset >= 4:
        (length,) = struct.unpack_from(">I", data, offset)
        if length == 0:
            return frames, "Invalid message format: Zero-length message", 0
        if length > MAX_MESSAGE_SIZE:
            return frames, f"Message too large: {length} bytes (max: {MAX_MESSAGE_SIZE})", 0
        if len(data) - offset == 4:
            break
        kind = data[offset + 4]
        if kind not in KNOWN_TYPES:
            return frames, f"Invalid message format: Unknown message type: 0x{kind:02x}", 0
        if kind in CONTROL_TYPES and length > MAX_CONTROL_FRAME_SIZE:
            if offset + 4 + length > len(data):
                return frames, None, 0
            offset += 4 + length
            continue
        if offset + 4 + length > len(data):
            break
        frames.append((kind, data[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return frames, None, len(data) - offset


class _Collector(FrameReceiver):
    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.errors: list[str] = []

    def frame_received(self, message_type: int, payload: bytes) -> None:
        self.frames.append((message_type, payload))

    def frame_error(self, error: AgentProtocolError) -> None:
        self.errors.append(str(error))


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return [p for p in pieces if p]


def target_frames(data: bytes, cuts: list[int]) -> None:
    expected_frames, expected_error, waiting = reference_frames(data)
    for pieces in (splits(data, cuts), [data], [bytes([b]) for b in data]):
        receiver = _Collector()
        receiver.makeConnection(StringTransport())
        for piece in pieces:
            receiver.dataReceived(piece)
        assert receiver.frames == expected_frames, (receiver.frames, expected_frames)
        assert receiver.errors == ([expected_error] if expected_error else []), receiver.errors
        if expected_error is None:
            assert receiver.buffered_bytes == waiting, (receiver.buffered_bytes, waiting)
        else:
            assert receiver.buffered_bytes == 0


_SHAPES: list[Any] = [
    m.RegistrationResponse,
    m.HealthStatusMessage,
    m.FlowControlMessage,
    m.CancelMessage,
    m.PingMessage,
    *m.EVENT_CLASSES.values(),
]


def target_codec(data: bytes, cuts: list[int]) -> None:
    decoders: list[tuple[str, Callable[[bytes], Any]]] = [
        ("RegistrationRequest", m.decode_registration_request),
        ("AgentResponse", m.decode_agent_response),
        *[(shape.__name__, lambda p, shape=shape: m.decode(p, shape)) for shape in _SHAPES],
        ("dict", lambda p: m.decode(p, dict)),
    ]
    for name, decoder in decoders:
        try:
            value = decoder(data)
        except AgentProtocolError as e:
            assert str(e), name
            continue
        # Whatever we accept, we can write, and read back the same.
        again = decoder(m.encode(value))
        assert again == value, (name, value, again)


def _logged_failures() -> tuple[list[LogEvent], Callable[[], None]]:
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    return failures, lambda: globalLogPublisher.removeObserver(observe)


def target_proxy(data: bytes, cuts: list[int]) -> None:
    from twisted.internet.error import ConnectionDone

    from .._proxy_support import Proxy
    from ..reliability.support import headers

    proxy = Proxy(max_connections_per_agent=1000)
    protocol, transport, connection = proxy.register("fuzz")
    outcomes: list[list[object]] = []
    for i in range(3):
        seen: list[object] = []
        outcomes.append(seen)
        connection.send_request_headers(headers(f"fuzz-{i}"), timeout=5.0).addBoth(seen.append)
    failures, stop = _logged_failures()
    try:
        for piece in splits(data, cuts):
            protocol.dataReceived(piece)
        proxy.clock.advance(6.0)
        protocol.connectionLost(Failure(ConnectionDone()))
        proxy.clock.advance(60.0)
    finally:
        stop()
    assert not failures, [e.get("log_format") for e in failures]
    assert [len(o) for o in outcomes] == [1, 1, 1], outcomes
    assert len(proxy.pool) == 0 and proxy.pool.in_flight == 0
    assert connection.in_flight == 0
    assert proxy.factory.awaiting_registration == 0
    assert not proxy.clock.getDelayedCalls(), proxy.clock.getDelayedCalls()


def target_agent(data: bytes, cuts: list[int]) -> None:
    from twisted.internet.error import ConnectionDone

    from ..agent._support import Harness

    harness = Harness(health_interval=0)
    harness.register()
    failures, stop = _logged_failures()
    try:
        for piece in splits(data, cuts):
            harness.protocol.dataReceived(piece)
        harness.clock.advance(60.0)
        harness.protocol.connectionLost(Failure(ConnectionDone()))
        harness.clock.advance(60.0)
    finally:
        stop()
    # Handlers that fail are the agent's business (logged with their
    # traceback by design); anything else is a bug.
    unexpected = [e for e in failures if "handler" not in (e.get("log_format") or "")]
    assert not unexpected, [e.get("log_format") for e in unexpected]
    assert harness.protocol.in_flight == 0


TARGETS: dict[str, Callable[[bytes, list[int]], None]] = {
    "frames": target_frames,
    "codec": target_codec,
    "proxy": target_proxy,
    "agent": target_agent,
}

# -- inputs ----------------------------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)


def _answer(cid: str, decision: Any) -> bytes:
    return json.dumps({"version": 2, "decision": decision, "audit": {"custom": {"correlation_id": cid}}}).encode()


_VALID = [
    m.encode(m.RegistrationRequest(protocol_version=2, agent_id="a", capabilities=m.AgentCapabilities(agent_id="a", name="n", version="1"))),
    _answer("fuzz-0", "allow"),
    _answer("fuzz-1", {"block": {"status": 403, "body": "no", "headers": None}}),
    _answer("fuzz-2", {"redirect": {"url": "/x", "status": 302}}),
    b'{"action":1}',
    b'{"action":2}',
    b'{"state":1}',
    b'{"sequence":3,"timestamp_ms":4}',
    b'{"correlation_id":"fuzz-0","reason":1,"timestamp_ms":1}',
    m.encode_event(m.RequestHeadersEvent(
        metadata=m.RequestMetadata(correlation_id="e1", request_id="e1", client_ip="1.2.3.4", client_port=1, timestamp="t"),
        method="GET", uri="/", headers={},
    )),
    b"{}",
]


@st.composite
def _mutations(draw: Any) -> bytes:
    """A valid payload with a slice replaced, or arbitrary JSON, or junk."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.sampled_from(_VALID))
    if kind == 1:
        return json.dumps(draw(_json_values)).encode()
    if kind == 2:
        base = draw(st.sampled_from(_VALID))
        start = draw(st.integers(0, len(base)))
        end = draw(st.integers(start, len(base)))
        return base[:start] + draw(st.binary(max_size=8)) + base[end:]
    return draw(st.binary(max_size=48))


_frames = st.one_of(
    st.tuples(st.sampled_from(sorted(KNOWN_TYPES)), _mutations()).map(lambda f: encode_frame(*f)),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=12)).map(
        lambda f: struct.pack(">IB", f[0], f[1]) + f[2]
    ),
    st.binary(max_size=16),
)
streams = st.lists(_frames, max_size=6).map(b"".join)
cut_points = st.lists(st.integers(0, 4096), max_size=10)
payloads = _mutations()

#: What each target is fed.
INPUTS: dict[str, Any] = {
    "frames": streams,
    "codec": payloads,
    "proxy": streams,
    "agent": streams,
}

# -- running ---------------------------------------------------------------------

#: The last input that made a target fail (hypothesis replays the shrunk
#: example last, so after a failure this is the minimal one).
last_failure: dict[str, Any] = {}


def property_for(name: str, max_examples: int) -> Callable[[], None]:
    """A hypothesis test of one target, recording the input of a failure."""
    target = TARGETS[name]

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(INPUTS[name], cut_points)
    def check(data: bytes, cuts: list[int]) -> None:
        try:
            target(data, cuts)
        except BaseException:
            last_failure.update(target=name, data=data, cuts=cuts)
            raise

    return check  # type: ignore[no-any-return]


def corpus() -> list[tuple[str, bytes]]:
    """Every saved input: C{(target, data)}."""
    found = []
    for path in sorted(CORPUS.glob("*.bin")):
        found.append((path.name.partition("-")[0], path.read_bytes()))
    return found


def replay(name: str, data: bytes) -> None:
    """Run one saved input through its target, read at once and byte by byte."""
    target = TARGETS[name]
    target(data, [])
    target(data, list(range(min(len(data), 4096))))


def save(name: str, data: bytes) -> Path:
    CORPUS.mkdir(exist_ok=True)
    path = CORPUS / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def run(seconds: float, batch: int = 200, names: list[str] | None = None) -> int:
    """Run every target in turn, with fresh random inputs, for C{seconds}."""
    names = names or list(TARGETS)
    for name, data in corpus():
        replay(name, data)
    deadline = time.monotonic() + seconds
    rounds = 0
    examples = 0
    while time.monotonic() < deadline:
        for name in names:
            last_failure.clear()
            try:
                property_for(name, batch)()
            except BaseException as e:
                if not last_failure:
                    raise
                path = save(last_failure["target"], last_failure["data"])
                print(f"fuzz: target {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                print(f"fuzz: input saved as {path}; commit it with the fix", file=sys.stderr)
                return 1
            examples += batch
            if time.monotonic() >= deadline:
                break
        rounds += 1
    print(f"fuzz: {examples} inputs over {len(names)} target(s) in {seconds:g} s, no failure")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz the frame parser and the message codec.")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=200, help="inputs per target per round")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return run(args.seconds, args.batch, args.target)


if __name__ == "__main__":
    raise SystemExit(main())
