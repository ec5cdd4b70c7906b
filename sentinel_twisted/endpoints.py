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
from typing import Any

from twisted.internet.protocol import Protocol

__all__ = [
    "FALLBACK_BACKLOG",
    "RefusedConnection",
    "SocketInUse",
    "clear_stale_lock",
    "check_endpoint_arguments",
    "clear_stale_unix_socket",
    "describe_endpoint_error",
    "describe_listen_failure",
    "os_error_text",
    "parse_description",
    "remove_abandoned_unix_socket",
    "system_max_backlog",
    "takes_lock",
    "unix_socket_path",
    "with_backlog",
    "with_lockfile",
    "with_owner_only_mode",
]

#: The listen backlog when the system's maximum cannot be read.
FALLBACK_BACKLOG = 4096

#: Endpoint types whose server parser takes a C{backlog=} argument.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl"})

#: The largest listen backlog: listen() takes a C int (the system cuts a
#: larger value to its own maximum, net.core.somaxconn).
MAX_BACKLOG = 2**31 - 1


class RefusedConnection(Protocol):
    """
    What a factory over its connection cap builds: it drops the connection
    as soon as it is made.  C{None} does that for a plain TCP or UNIX
    listener only: an C{ssl:} listener wraps whatever the factory builds in
    TLS, and a wrapped C{None} completes the TLS handshake, then fails with
    a traceback per connection.
    """

    def connectionMade(self) -> None:
        transport: Any = self.transport
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()


class SocketInUse(Exception):
    """
    A UNIX socket path cannot be taken: a live process serves it, or it is
    not a socket, or it cannot be looked at or removed; the text says which
    path and why.
    """


def system_max_backlog(path: str = "/proc/sys/net/core/somaxconn") -> int:
    """
    The largest listen backlog the system grants (Linux: C{net.core.somaxconn},
    commonly 4096), or L{FALLBACK_BACKLOG} where it cannot be read.

    Agents reconnect in bursts (a restart of the proxy brings all of them
    back at once); a short accept queue turns such a burst into failed
    non-blocking connects.  A larger value than the system's is cut to it.
    """
    try:
        with open(path, encoding="ascii") as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return FALLBACK_BACKLOG
    return value if value > 0 else FALLBACK_BACKLOG


def check_endpoint_arguments(description: str) -> None:
    """
    Check the arguments of a server endpoint string that Twisted's parser
    takes as they come but its C{listen} only fails on, after taking a UNIX
    socket's lock and binding its file: a C{backlog=} out of a C int's range
    raises C{OverflowError} there, a negative one is quietly taken as 0.

    @raise ValueError: with a text that names the argument.
    """
    args, kwargs = parse_description(description)
    if args[0] not in _BACKLOG_TYPES or "backlog" not in kwargs:
        return
    value = kwargs["backlog"]
    try:
        backlog = int(value)
    except ValueError:
        backlog = 0
    if not 0 < backlog <= MAX_BACKLOG:
        raise ValueError(f"backlog= must be a positive integer up to {MAX_BACKLOG}, got {value!r}")


def os_error_text(error: OSError) -> str:
    """The system's words for C{error} (C{"permission denied"}), lower-case, for the end of a one-line error."""
    return (error.strerror or str(error)).lower()


def describe_endpoint_error(error: BaseException) -> str:
    """
    What is wrong with an endpoint string, from the exception Twisted's
    parser raised (whose text can be a bare Python message).
    """
    from twisted.python.filepath import UnlistableError

    text = str(error)
    if isinstance(error, TypeError):
        return "wrong arguments for this endpoint type (a missing port or path?)"
    if isinstance(error, ValueError) and "invalid literal for int() with base 8" in text:
        # Only the UNIX endpoints' mode= is read as octal.
        value = text.partition(": ")[2]
        return f"mode= must be octal digits, such as 600 or 660, got {value}"
    if isinstance(error, ValueError) and "invalid literal for int()" in text:
        return "the port must be a number"
    if isinstance(error, KeyError):
        return f"unknown argument {text}"
    if isinstance(error, UnlistableError):
        # trustRoots= names a directory of CA certificates that cannot be listed.
        original = getattr(error, "originalException", None)
        if isinstance(original, OSError) and original.filename is not None:
            path = os.fsdecode(original.filename)
            if isinstance(original, FileNotFoundError):
                return f"trustRoots: {path} does not exist"
            if isinstance(original, NotADirectoryError):
                return f"trustRoots: {path} is not a directory of CA certificates"
            detail = os_error_text(original)
            return f"trustRoots: cannot read the directory {path}: {detail}"
        return "trustRoots: the directory of CA certificates cannot be read"
    if isinstance(error, OSError) and error.filename is not None:
        path = os.fsdecode(error.filename)
        if isinstance(error, FileNotFoundError):
            return f"{path} does not exist"
        return f"cannot read {path}: {os_error_text(error)}"
    return text or type(error).__name__


def describe_listen_failure(error: BaseException) -> str:
    """The reason an endpoint could not listen, in one line."""
    from twisted.internet.error import CannotListenError

    if isinstance(error, CannotListenError):
        where = error.port
        if isinstance(where, bytes):
            where = where.decode("utf-8", "replace")
        if error.interface is not None:
            where = f"{error.interface or '*'}:{where}"
        reason = error.socketError
        if isinstance(reason, OSError):
            text = os_error_text(reason)
            return f"cannot listen on {where}: {text}"
        if reason == "Cannot acquire lock":
            return f"cannot listen on {where}: its lock {where}.lock is held by another process"
        return f"cannot listen on {where}: {reason}"
    if isinstance(error, OSError):
        detail = os_error_text(error)
        # For a symlink (a lock), filename is the target, filename2 the path.
        path = error.filename2 or error.filename
        return f"cannot use {os.fsdecode(path)}: {detail}" if path else detail
    return str(error) or type(error).__name__


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


def takes_lock(description: str) -> bool:
    """Whether a C{unix:} server endpoint takes a lockfile (Twisted: unless C{lockfile=0})."""
    _, kwargs = parse_description(description)
    try:
        return bool(int(kwargs.get("lockfile", "1")))
    except ValueError:
        return True


def clear_stale_unix_socket(path: str, timeout: float = 1.0) -> bool:
    """
    Make C{path} free to bind, without ever stealing a live socket.

    @return: C{True} if a stale socket file was removed.
    @raise SocketInUse: if a process accepts connections on it, the path
        is something other than a socket, or it cannot be looked at or a
        stale socket removed (permissions).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise SocketInUse(f"cannot use {path}: {os_error_text(e)}") from None
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
    except OSError as e:
        raise SocketInUse(f"cannot remove the stale socket {path}: {os_error_text(e)}") from None
    return True


def remove_abandoned_unix_socket(description: str, error: BaseException) -> list[str]:
    """
    Remove what a failed C{listen} on a C{unix:} endpoint with a lockfile
    left behind: Twisted takes the lock, binds the file, and only then calls
    C{listen()} and C{chmod()}; when one of those raises, the port is never
    returned to be closed, and the socket file and the lock (naming this
    process) stay.  When the bind itself fails (a C{CannotListenError} for
    an C{OSError}, such as a path too long for a UNIX socket), the lock
    Twisted took stays, and only the lock is removed.

    Nothing is removed when Twisted refused the lock (it is somebody
    else's), or when the lock does not name this process.

    @return: the paths removed.
    """
    from twisted.internet.error import CannotListenError

    path = unix_socket_path(description)
    if path is None or not takes_lock(description):
        return []
    bind_failed = isinstance(error, CannotListenError)
    if bind_failed and not isinstance(error.socketError, OSError):  # type: ignore[attr-defined]
        return []
    lock = f"{path}.lock"
    try:
        if os.readlink(lock) != str(os.getpid()):
            return []
    except OSError:
        return []
    removed = []
    try:
        # After a failed bind the file at the path, if any, is not ours.
        if not bind_failed and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
            removed.append(path)
    except OSError:
        pass
    try:
        os.unlink(lock)
        removed.append(lock)
    except OSError:
        pass
    return removed


def clear_stale_lock(path: str) -> int | None:
    """
    Remove the lock (C{PATH.lock}, as C{lockfile=1} takes it) of a UNIX
    socket that nobody serves; call after L{clear_stale_unix_socket} has
    found C{path} free.

    Twisted's lock is a symlink to the holder's pid, judged stale only when
    that pid is dead; but pids are reused (in a container the listener is
    pid 1 at every start), and a lock that names a live, unrelated process
    would keep every restart from starting.  No process serves the socket,
    so the lock is stale whoever holds that pid now.

    @return: the pid the removed lock named, or C{None} if there was none.
    @raise SocketInUse: if the lock is something other than a lock (a file,
        a directory, a symlink to anything but a pid), or it cannot be
        looked at (a name too long) or removed.
    """
    lock = f"{path}.lock"
    try:
        st = os.lstat(lock)
        if not stat.S_ISLNK(st.st_mode):
            raise SocketInUse(f"{lock} exists and is not a lock (a symlink to a pid); refusing to replace it")
        target = os.readlink(lock)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SocketInUse(f"cannot use {lock}: {os_error_text(e)}") from None
    if not target.isdigit():
        raise SocketInUse(
            f"{lock} is not a lock (it points to {target!r}, not a pid); refusing to replace it"
        )
    try:
        os.unlink(lock)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SocketInUse(f"cannot remove the stale lock {lock}: {os_error_text(e)}") from None
    return int(target)
