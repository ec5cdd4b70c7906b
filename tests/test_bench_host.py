"""
The benchmark harness's host check (L{benchmarks.host}): a section measured
on a host slower than the machine's fastest is flagged, and the baseline
kept for the machine only ever goes down.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from twisted.trial.unittest import SynchronousTestCase

from benchmarks import host


class BaselineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "baseline.json")
        self.calibrations: Iterator[float] = iter(())
        self.patch(host, "calibrate", lambda: next(self.calibrations))
        self.patch(host, "cpu_times", lambda: None)

    def monitor(self, *calibrations: float) -> dict[str, object]:
        """A section of checkpoints whose calibrations are C{calibrations}."""
        self.calibrations = iter(calibrations)
        monitor = host.HostMonitor(host.Baseline(self.path, "a machine"))
        for n in range(len(calibrations)):
            monitor.checkpoint(f"checkpoint {n}")
        return monitor.section(0)

    def test_a_first_run_sets_the_baseline_and_is_not_flagged_for_it(self) -> None:
        section = self.monitor(20.0, 20.5)
        self.assertFalse(section["contended"])
        self.assertEqual(section["baseline_ms"], 20.0)
        with open(self.path) as f:
            (entry,) = json.load(f).values()
        self.assertEqual((entry["identity"], entry["calibration_ms"]), ("a machine", 20.0))

    def test_a_uniformly_slow_section_is_flagged(self) -> None:
        self.monitor(10.0, 10.2)
        section = self.monitor(17.0, 17.2, 17.1)
        self.assertTrue(section["contended"])
        self.assertIn("calibration 1.71x this machine's fastest, 10.0 ms (limit 1.25x)", section["why"])
        lines = host.report("reference", section)
        self.assertIn("1.71x this machine's fastest (10.0 ms,", lines[0])
        self.assertTrue(lines[1].startswith("WARNING: reference was measured on a contended host"))

    def test_the_baseline_only_goes_down(self) -> None:
        self.monitor(12.0, 12.0)
        self.monitor(30.0, 30.0)
        self.assertEqual(host.Baseline(self.path, "a machine").ms, 12.0)
        self.monitor(11.0, 11.5)
        self.assertEqual(host.Baseline(self.path, "a machine").ms, 11.0)

    def test_each_machine_has_its_own(self) -> None:
        self.monitor(10.0, 10.0)
        self.assertIsNone(host.Baseline(self.path, "another machine").ms)

    def test_within_the_limit_is_not_flagged(self) -> None:
        self.monitor(10.0, 10.0)
        self.assertFalse(self.monitor(12.0, 12.4)["contended"])

    def test_without_a_baseline_file_the_section_says_so(self) -> None:
        self.calibrations = iter((10.0, 10.0))
        monitor = host.HostMonitor(None)
        monitor.checkpoint("a")
        monitor.checkpoint("b")
        section = monitor.section(0)
        self.assertFalse(section["contended"])
        self.assertIn("no baseline for this machine yet", host.report("x", section)[0])

    def test_an_unreadable_file_is_no_baseline(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("not json")
        self.assertIsNone(host.Baseline(self.path, "a machine").ms)
        self.assertFalse(self.monitor(10.0, 10.0)["contended"])
        self.assertEqual(host.Baseline(self.path, "a machine").ms, 10.0)
