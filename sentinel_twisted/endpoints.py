# -*- test-case-name: tests.test_endpoints -*-
"""
Helpers for the listener's endpoint strings: the listen backlog from the
config, and safe handling of UNIX socket files (a socket a live process
serves is never unlinked; a stale one left by a dead process is replaced).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat

__all__ = [
    "SocketInUse",
    "clear_stale_unix_socket",
    "unix_socket_path",
    "with_backlog",
]

_UNESCAPED_COLON = re.compile(r"(?<!\\):")


class SocketInUse(Exception):
    """A live process serves the socket; the text says which path."""


def _split(description: str) -> list[str]:
    return _UNESCAPED_COLON.split(description)


def with_backlog(description: str, backlog: int) -> str:
    """Add C{backlog=N} to a tcp/unix/ssl server endpoint that lacks one."""
    parts = _split(description)
    if parts[0] in ("tcp", "tcp6", "unix", "ssl") and not any(
        p.startswith("backlog=") for p in parts[1:]
    ):
        return f"{description}:backlog={backlog}"
    return description


def unix_socket_path(description: str) -> str | None:
    """The filesystem path of a C{unix:} server endpoint, else C{None}."""
    parts = _split(description)
    if parts[0] != "unix" or len(parts) < 2:
        return None
    for part in parts[1:]:
        if part.startswith("address="):
            return part[len("address=") :].replace("\\:", ":")
    first = parts[1]
    if "=" in first and not first.startswith(("/", ".")):
        return None
    path = first.replace("\\:", ":")
    return None if path.startswith("\0") or path.startswith("@") else path


def clear_stale_unix_socket(path: str, timeout: float = 1.0) -> bool:
    """
    Make C{path} free to bind, without ever stealing a live socket.

    @return: C{True} if a stale socket file was removed.
    @raise SocketInUse: if a process accepts connections on it, or the
        path is something other than a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketInUse(f"cannot tell whether {path} is in use: {e.strerror}") from None
    else:
        raise SocketInUse(f"{path} is served by a live process; refusing to start a second listener")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
