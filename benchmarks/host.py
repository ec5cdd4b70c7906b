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
L{SPREAD_LIMIT} is reported as measured on a contended host.  So is one
whose calibrations are all slow: a host can be uniformly slower for a
whole run, with little steal and no spread to show for it.  The fastest
calibration this machine has ever given (its I{baseline}, kept in a small
file per machine and Python, L{Baseline}) tells: a section whose median
calibration is past L{SLOW_LIMIT} times the baseline is flagged too.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

#: Past this share of CPU time taken by the hypervisor over any interval,
#: the section's figures are flagged.
STEAL_LIMIT = 0.05
#: Past this ratio of the slowest calibration to the fastest in a section,
#: its figures are flagged.
SPREAD_LIMIT = 1.25
#: Past this ratio of a section's median calibration to the machine's
#: baseline (the fastest calibration it has given), its figures are flagged.
SLOW_LIMIT = 1.25

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


def cpu_model() -> str | None:
    """The CPU's model name from C{/proc/cpuinfo}; C{None} where it does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_identity() -> str:
    """What a calibration depends on: the CPU model, the CPUs, the Python."""
    return " | ".join(
        [
            cpu_model() or platform.processor() or platform.machine(),
            f"{os.cpu_count()} CPUs",
            sys.implementation.name,
            platform.python_version(),
        ]
    )


def baseline_path() -> str:
    """
    Where the machine's baseline is kept: C{$SENTINEL_BENCH_BASELINE}, else
    C{sentinel_twisted/host-baseline.json} in the user's cache directory.
    """
    explicit = os.environ.get("SENTINEL_BENCH_BASELINE")
    if explicit:
        return explicit
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "sentinel_twisted", "host-baseline.json")


class Baseline:
    """
    The fastest calibration seen on this machine (L{machine_identity}),
    read from and written back to C{path}, one entry per machine identity.
    It only ever goes down: a run on a quiet host sets it, and later runs
    on a slower host are measured against it.  A machine without one yet
    (a fresh clone in CI) is judged by steal and spread alone.
    """

    def __init__(self, path: str | None = None, identity: str | None = None) -> None:
        self.path = path if path is not None else baseline_path()
        self.identity = identity if identity is not None else machine_identity()
        self._key = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
        entry = self._load().get(self._key)
        self.ms: float | None = entry["calibration_ms"] if isinstance(entry, dict) else None
        self.since: str | None = entry.get("at") if isinstance(entry, dict) else None

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def seen(self, calibration_ms: float) -> None:
        """A calibration was made: the baseline is lowered (and saved) if it is faster."""
        if self.ms is not None and calibration_ms >= self.ms:
            return
        self.ms = calibration_ms
        self.since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        data = self._load()
        data[self._key] = {"identity": self.identity, "calibration_ms": calibration_ms, "at": self.since}
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            temporary = f"{self.path}.{os.getpid()}"
            with open(temporary, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(temporary, self.path)
        except OSError:
            # An unwritable cache costs the next run its baseline, nothing more.
            pass


class HostMonitor:
    """
    Checkpoints between measurements: each one records the steal since the
    last and a calibration; L{section} sums up the checkpoints of a section.

    @param baseline: the machine's fastest calibration (a fresh L{Baseline}
        by default); C{None}: judge by steal and spread alone.
    """

    _default = object()

    def __init__(self, baseline: Any = _default) -> None:
        self._last = cpu_times()
        self.checkpoints: list[dict[str, Any]] = []
        self.baseline: Baseline | None = Baseline() if baseline is HostMonitor._default else baseline

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
        if self.baseline is not None:
            self.baseline.seen(calibration)
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
        median = statistics.median(calibrations) if calibrations else None
        baseline = self.baseline.ms if self.baseline is not None else None
        slowdown = median / baseline if median is not None and baseline else None
        if slowdown is not None and slowdown > SLOW_LIMIT:
            reasons.append(
                f"calibration {slowdown:.2f}x this machine's fastest, {baseline:.1f} ms (limit {SLOW_LIMIT:.2f}x)"
            )
        return {
            "checkpoints": points,
            "max_steal": max_steal,
            "calibration_ms": {
                "min": min(calibrations) if calibrations else None,
                "median": median,
                "max": max(calibrations) if calibrations else None,
            },
            "calibration_spread": spread,
            "baseline_ms": baseline,
            "baseline_since": self.baseline.since if self.baseline is not None else None,
            "slowdown": slowdown,
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
        f"(min {cal['min']:.1f}, max {cal['max']:.1f}, {len(host['checkpoints'])} checkpoints); "
        + (
            f"{host['slowdown']:.2f}x this machine's fastest ({host['baseline_ms']:.1f} ms, {host['baseline_since']})"
            if host.get("slowdown") is not None
            else "no baseline for this machine yet"
        )
    ]
    if host["contended"]:
        lines.append(
            f"WARNING: {name} was measured on a contended host ({host['why']}): "
            "its figures and ratios are unreliable; measure again on a quiet host"
        )
    return lines
