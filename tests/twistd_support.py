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


#: Flags of a listening socket in /proc/net/unix (the kernel's __SO_ACCEPTCON).
_ACCEPTING = 0x10000


def unix_listening(path: str) -> bool:
    """
    Whether a process listens on the UNIX socket C{path}, without
    connecting to it.  Its file appears at C{bind()}, before Twisted sets
    its mode and calls C{listen()}: a test that waits for the file alone
    may see the umask's mode, or have its connection refused.  Read from
    C{/proc/net/unix} (where there is none: whether the file exists).
    """
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return os.path.exists(path)
    for row in rows:
        fields = row.split(None, 7)
        if len(fields) < 8 or not int(fields[3], 16) & _ACCEPTING:
            continue
        # The path as the program bound it: relative to its directory, maybe.
        bound = fields[7]
        if bound == path or (not bound.startswith("/") and path.endswith("/" + bound)):
            return True
    return False


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM a child still running, SIGKILL it after C{timeout} seconds; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
