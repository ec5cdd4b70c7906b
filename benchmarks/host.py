"""
How quiet the host was while a run measured.

A same-run comparison is only as good as the machine under it: on a shared
virtual machine the hypervisor may take CPU time from the guest (steal), or
neighbours may slow every process down without any steal to show for it
(caches, memory bandwidth).  Ratios measured then swing from round to round
(see BENCHMARKS.md, run 22).  So the harness checks the host between
measurements, never during them:

  - I{steal}: the share of CPU time the hypervisor took, from C{/proc/stat},
    between one checkpoint and the next (so over the measurements between
    them);
  - I{calibration}: how long a fixed piece of single-threaded Python takes
    (the median of five), so runs and rounds can be compared: on the same
    machine a quiet host gives the same figure within a few per cent.

A section whose steal or calibration spread passes L{STEAL_LIMIT} or
L{SPREAD_LIMIT} is reported as measured on a contended host.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

#: Past this share of CPU time taken by the hypervisor over any interval,
#: the section's figures are flagged.
STEAL_LIMIT = 0.05
#: Past this ratio of the slowest calibration to the fastest in a section,
#: its figures are flagged.
SPREAD_LIMIT = 1.25

_STAT = "/proc/stat"


def cpu_times() -> tuple[int, int] | None:
    """
    The whole machine's CPU time so far, in clock ticks: C{(total, steal)};
    C{None} where C{/proc/stat} is not there (not Linux).
    """
    try:
        with open(_STAT) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest times are in user).
    ticks = [int(x) for x in fields[1:9]]
    steal = ticks[7] if len(ticks) > 7 else 0
    return sum(ticks), steal


def calibrate(repeat: int = 5) -> float:
    """
    Milliseconds a fixed piece of Python takes on one CPU (the median of
    C{repeat}): dict and string work, as an interpreter's hot path does.
    """
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        table: dict[str, int] = {}
        for i in range(40_000):
            key = f"k{i & 1023}"
            table[key] = table.get(key, 0) + i
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


class HostMonitor:
    """
    Checkpoints between measurements: each one records the steal since the
    last and a calibration; L{section} sums up the checkpoints of a section.
    """

    def __init__(self) -> None:
        self._last = cpu_times()
        self.checkpoints: list[dict[str, Any]] = []

    def checkpoint(self, label: str) -> dict[str, Any]:
        now = cpu_times()
        steal = None
        if now is not None and self._last is not None and now[0] > self._last[0]:
            steal = (now[1] - self._last[1]) / (now[0] - self._last[0])
        calibration = calibrate()
        # The calibration's own time is not part of the next interval.
        self._last = cpu_times()
        point = {"label": label, "steal": steal, "calibration_ms": calibration}
        self.checkpoints.append(point)
        return point

    def section(self, first: int) -> dict[str, Any]:
        """
        The host during the checkpoints from index C{first} on: the steal
        of each interval after the first checkpoint, the calibrations, and
        whether the section counts as measured on a contended host.
        """
        points = self.checkpoints[first:]
        steals = [p["steal"] for p in points[1:] if p["steal"] is not None]
        calibrations = [p["calibration_ms"] for p in points]
        spread = max(calibrations) / min(calibrations) if calibrations else 1.0
        max_steal = max(steals) if steals else None
        reasons = []
        if max_steal is not None and max_steal > STEAL_LIMIT:
            reasons.append(f"steal up to {max_steal:.1%} (limit {STEAL_LIMIT:.0%})")
        if spread > SPREAD_LIMIT:
            reasons.append(f"calibration spread {spread:.2f}x (limit {SPREAD_LIMIT:.2f}x)")
        return {
            "checkpoints": points,
            "max_steal": max_steal,
            "calibration_ms": {
                "min": min(calibrations) if calibrations else None,
                "median": statistics.median(calibrations) if calibrations else None,
                "max": max(calibrations) if calibrations else None,
            },
            "calibration_spread": spread,
            "contended": bool(reasons),
            "why": "; ".join(reasons),
        }


def report(name: str, host: dict[str, Any] | None) -> list[str]:
    """The section's host line, and a warning when it was contended."""
    if not host:
        return []
    cal = host["calibration_ms"]
    steal = "unknown" if host["max_steal"] is None else f"{host['max_steal']:.1%}"
    lines = [
        f"host during {name}: steal at most {steal} per interval; calibration {cal['median']:.1f} ms "
        f"(min {cal['min']:.1f}, max {cal['max']:.1f}, {len(host['checkpoints'])} checkpoints)"
    ]
    if host["contended"]:
        lines.append(
            f"WARNING: {name} was measured on a contended host ({host['why']}): "
            "its figures and ratios are unreliable; measure again on a quiet host"
        )
    return lines
