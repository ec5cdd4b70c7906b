"""
The gateway section of the benchmarks: HTTP requests/s through
C{twistd sentinel-reverse --http} with one agent consulted, against the
same gateway with no agent consulted, loaded by C{wrk}.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any


def gateway_available() -> str | None:
    """C{None} if the gateway can be measured, else why not."""
    result = subprocess.run(
        [sys.executable, "-m", "twisted", "sentinel-reverse", "--help"],
        capture_output=True, text=True,
    )
    if "--http" not in result.stdout:
        return "twistd sentinel-reverse has no --http option (no gateway in this checkout)"
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian package wrk)"
    return None


def run(harness: Any) -> dict[str, Any]:
    why = gateway_available()
    if why is not None:
        harness.log(f"gateway: skipped: {why}")
        return {"skipped": why, "ratio": None}
    return {"skipped": "gateway measurement not written yet", "ratio": None}
