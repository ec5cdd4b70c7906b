# -*- test-case-name: tests.test_endpoints -*-
"""
Helpers for the listener's endpoint strings: the listen backlog from the
config, and safe handling of UNIX socket files (a socket a live process
serves is never unlinked; a stale one left by a dead process is replaced).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

__all__ = [
    "SocketInUse",
    "clear_stale_unix_socket",
    "parse_description",
    "unix_socket_path",
    "with_backlog",
    "with_lockfile",
    "with_owner_only_mode",
]

#: Endpoint types whose server parser takes a C{backlog=} argument.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl"})


class SocketInUse(Exception):
    """A live process serves the socket; the text says which path."""


def parse_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string into positional and keyword arguments by the
    rules of Twisted's own parser: C{:} separates arguments, the first
    C{=} of an argument makes it C{key=value}, and a backslash takes the
    next character literally (C{unix:/tmp/a\\:b.sock}).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    key: str | None = None
    current: list[str] = []

    def finish() -> None:
        value = "".join(current)
        current.clear()
        if key is None:
            args.append(value)
        else:
            kwargs[key] = value

    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            finish()
            key = None
        elif char == "=" and key is None:
            key = "".join(current)
            current.clear()
        else:
            current.append(char)
    finish()
    return args, kwargs


def with_backlog(description: str, backlog: int) -> str:
    """Add C{backlog=N} to a tcp/unix/ssl server endpoint that lacks one."""
    args, kwargs = parse_description(description)
    if args[0] in _BACKLOG_TYPES and "backlog" not in kwargs:
        return f"{description}:backlog={backlog}"
    return description


def with_owner_only_mode(description: str) -> str:
    """
    Add C{mode=600} to a C{unix:} server endpoint that sets no mode.

    Twisted's own default is 666: any local user could then register as
    an agent and be sent the proxy's traffic.  An explicit C{mode=} wins.
    """
    args, kwargs = parse_description(description)
    if args[0] == "unix" and "mode" not in kwargs:
        return f"{description}:mode=600"
    return description


def with_lockfile(description: str) -> str:
    """
    Add C{lockfile=1} to a C{unix:} server endpoint that does not say:
    Twisted then holds C{PATH.lock} with our pid, so a second process
    refuses to start instead of replacing a live socket.
    """
    args, kwargs = parse_description(description)
    if args[0] == "unix" and "lockfile" not in kwargs:
        return f"{description}:lockfile=1"
    return description


def unix_socket_path(description: str) -> str | None:
    """
    The filesystem path of a C{unix:} server endpoint (positional or
    C{address=}), else C{None} (other endpoint types, abstract sockets).
    """
    args, kwargs = parse_description(description)
    if args[0] != "unix":
        return None
    if "address" in kwargs:
        path = kwargs["address"]
    elif len(args) > 1:
        path = args[1]
    else:
        return None
    if not path or path.startswith("\0"):
        return None
    return path


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
    except TimeoutError:
        raise SocketInUse(
            f"{path} is served by a live process (busy: it did not accept within "
            f"{timeout:g}s); refusing to start a second listener"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketInUse(f"cannot tell whether {path} is in use: {e.strerror or e}") from None
    else:
        raise SocketInUse(
            f"{path} is served by a live process; refusing to start a second listener"
        )
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
