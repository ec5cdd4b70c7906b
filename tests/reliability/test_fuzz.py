"""
The fuzz targets of L{tests.reliability.fuzz}: every saved input (crashes
found once, and hand-made edge cases) replayed, and a short random run of
each target.  CI runs the long, time-bounded version in its own step
(C{.ci/steps/60-fuzz.sh}).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from . import fuzz

EXAMPLES = 150


class CorpusTests(SynchronousTestCase):
    def test_the_corpus_covers_every_target(self) -> None:
        self.assertEqual({name for name, _ in fuzz.corpus()}, set(fuzz.TARGETS))

    def replay(self, target: str) -> None:
        inputs = [data for name, data in fuzz.corpus() if name == target]
        self.assertTrue(inputs)
        for data in inputs:
            fuzz.replay(target, data)

    def test_frames(self) -> None:
        self.replay("frames")

    def test_codec(self) -> None:
        self.replay("codec")

    def test_proxy(self) -> None:
        self.replay("proxy")

    def test_agent(self) -> None:
        self.replay("agent")


class ReferenceParserTests(SynchronousTestCase):
    """The fuzzer's reference parser itself, so that it can be trusted."""

    def test_frames_errors_and_leftovers(self) -> None:
        ok = b"\x00\x00\x00\x03\x20{}"
        self.assertEqual(fuzz.reference_frames(ok + ok[:5]), ([(0x20, b"{}")] * 1, None, 5))
        self.assertEqual(fuzz.reference_frames(b"\x00\x00\x00\x00")[1], "Invalid message format: Zero-length message")
        self.assertEqual(fuzz.reference_frames(b"\x00\x00\x00\x02\x99")[1], "Invalid message format: Unknown message type: 0x99")
        self.assertIn("Message too large", fuzz.reference_frames(b"\x01\x00\x00\x01")[1] or "")

    def test_a_broken_parser_is_caught(self) -> None:
        original = fuzz.reference_frames

        def off_by_one(data: bytes) -> tuple[list[tuple[int, bytes]], str | None, int]:
            frames, error, waiting = original(data)
            return [(t, p + b" ") for t, p in frames], error, waiting

        fuzz.reference_frames = off_by_one  # type: ignore[assignment]
        try:
            self.assertRaises(AssertionError, fuzz.target_frames, b"\x00\x00\x00\x03\x20{}", [])
        finally:
            fuzz.reference_frames = original  # type: ignore[assignment]


class RandomInputTests(SynchronousTestCase):
    def test_frames(self) -> None:
        fuzz.property_for("frames", EXAMPLES)()

    def test_codec(self) -> None:
        fuzz.property_for("codec", EXAMPLES)()

    def test_proxy(self) -> None:
        fuzz.property_for("proxy", EXAMPLES)()

    def test_agent(self) -> None:
        fuzz.property_for("agent", EXAMPLES)()
