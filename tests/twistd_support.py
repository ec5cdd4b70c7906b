"""How the tests start C{twistd}: the one of the Python running them."""

from __future__ import annotations

import os
import subprocess
import sys


def twistd_command(*args: str) -> list[str]:
    """The twistd of the Python running the tests (a venv's, in CI)."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script, *args]
    code = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
    return [sys.executable, "-c", code, *args]


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM a child still running, SIGKILL it after C{timeout} seconds; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
