# -*- test-case-name: tests.test_twistd -*-
"""
What the two C{twistd} programs (C{sentinel-reverse}, C{sentinel-agent})
share at the edge of the process: option errors as one line, their own pid
file, C{--log-level}, C{--log-format}, help text that wraps cleanly, and exit status 0 after
a clean C{SIGTERM} stop.

Everything here only acts when the options are parsed by C{twistd} (they
then have a C{parent}, twistd's own options); parsed on their own, in tests
or by an embedding program, they behave like plain L{usage.Options}.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import stat
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from twisted.application.service import MultiService
from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny

from .busypoll import MAX_SPIN, BusyPollService, UnsupportedReactor
from .endpoints import os_error_text

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ProgramOptions",
    "add_busy_poll",
    "StartupError",
    "directory_problem",
    "exit_at_exit",
    "exit_zero_after_clean_sigterm",
    "filtered_log_observer",
    "json_log_line",
    "parse_busy_poll",
    "parse_log_level",
    "positive_int",
    "report_startup_errors",
]

log = Logger(namespace="sentinel_twisted")

#: The names C{--log-level} takes, lowest first.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def parse_log_level(value: str) -> LogLevel:
    name = value.strip().lower()
    if name == "warning":
        name = "warn"
    try:
        return LogLevel.levelWithName(name)  # type: ignore[no-any-return]
    except InvalidLogLevelError:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}") from None


#: The names C{--log-format} takes.
LOG_FORMATS = ("text", "json")


def positive_int(value: str) -> int:
    """An option's value as a positive integer (a conversion of L{ProgramOptions})."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def parse_busy_poll(value: str) -> int:
    """C{--busy-poll}: whole microseconds, from 0 (off) to L{MAX_SPIN}."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    limit = round(MAX_SPIN * 1e6)
    if not 0 <= number <= limit:
        raise ValueError(f"expected microseconds from 0 (off) to {limit}, got {value!r}")
    return number


def add_busy_poll(parent: MultiService, micros: int, program: str, reactor: Any = None) -> None:
    """
    With C{micros} (C{--busy-poll}) more than 0, a L{BusyPollService} of
    that many microseconds under C{parent}; a reactor other than epoll's
    ends the program with one line.
    """
    if not micros:
        return
    try:
        busy = BusyPollService(micros / 1e6, reactor)
    except UnsupportedReactor as e:
        raise SystemExit(f"twistd {program}: --busy-poll {micros}: {e}") from None
    busy.setServiceParent(parent)  # type: ignore[no-untyped-call]


def parse_log_format(value: str) -> str:
    name = value.strip().lower()
    if name not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return name


def _json_value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def json_log_line(event: LogEvent) -> str | None:
    """
    One log event as one line of JSON, for log shippers: C{time} (RFC 3339,
    UTC), C{level}, C{namespace}, C{message} (the text a person reads),
    then every field of the event (C{agent_id}, C{connection_id},
    C{reason}, ...) as a string unless it is a JSON number, boolean or
    null, and C{traceback} for a failure.  Control characters are escaped,
    so a line is always one line.
    """
    fields: dict[str, object] = {}
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS:
            continue
        fields[key] = _json_value(value)
    when = event.get("log_time")
    if when is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        fields["time"] = f"{stamp}.{int(when % 1 * 1000):03d}Z"
    level = event.get("log_level")
    fields["level"] = level.name if level is not None else None
    fields["namespace"] = event.get("log_namespace")
    fields["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        fields["traceback"] = failure.getTraceback()
    return json.dumps(fields, default=str) + "\n"


# Keys of events from twisted.python.log, which the fields above cover.
_LEGACY_KEYS = frozenset(["message", "format", "isError", "time", "system", "why", "failure"])


# What filtered_log_observer builds: set once per process, by the options
# twistd parsed (twistd calls the factory without arguments).
_observer_settings: dict[str, Any] = {}


def filtered_log_observer() -> ILogObserver:
    """
    The log observer twistd would use (its C{--logger}, C{--syslog},
    C{--logfile} or standard output under C{-n}), passing on only events at
    or above the C{--log-level}.  twistd finds it by name through its
    C{--logger} option, set by L{ProgramOptions}.
    """
    settings = _observer_settings
    chosen = settings.get("logger")
    if chosen is not None:
        observer = namedAny(chosen)() if isinstance(chosen, str) else chosen()
    else:
        # twistd's own choice (syslog, a rotated log file with SIGUSR1, or
        # standard output): its logger's private method is the only way to
        # wrap rather than replace it.
        from twisted.scripts import twistd

        runner = twistd._SomeApplicationRunner  # type: ignore[attr-defined]
        app_logger = runner.loggerFactory(settings["options"])
        observer = app_logger._getLogObserver()
    if settings.get("format") == "json":
        out = getattr(observer, "_outFile", None)
        if out is not None:
            observer = FileLogObserver(out, json_log_line)
    predicate = LogLevelFilterPredicate(defaultLogLevel=settings["level"])
    return FilteringLogObserver(observer, [predicate])


class ProgramOptions(usage.Options):
    """
    Options of a twistd program: an option error ends the program with one
    line (C{twistd NAME: problem}) and status 1 rather than twistd's usage
    text; the pid file defaults to C{NAME.pid}; C{--log-level} filters what
    twistd's log observer writes; relative names in L{file_options} are
    made absolute.
    """

    #: The tapname, e.g. C{sentinel-reverse}.
    program: ClassVar[str] = ""

    #: Options that name a file.  A relative name is taken from the
    #: directory the program starts in, as twistd takes C{--pidfile} and
    #: C{--logfile}: twistd moves to its run directory (C{-d}) after the
    #: options are read, and a file read again later (on SIGHUP) or by a
    #: worker process would otherwise be looked for there.
    file_options: ClassVar[tuple[str, ...]] = ()

    optParameters: list[list[Any]] = [
        [
            "log-level",
            None,
            "info",
            "Least severe log events written: " + ", ".join(LOG_LEVELS) + ".",
        ],
        [
            "log-format",
            None,
            "text",
            "text: lines for people; json: one JSON object per line with the event's "
            "fields (agent_id, connection_id, reason, ...), for log shippers.",
        ],
        [
            "busy-poll",
            None,
            0,
            "Microseconds (N, 0: off, at most 10000) the process keeps checking its sockets, "
            "yielding the CPU between checks, before each blocking wait: quicker answers when "
            "requests come one at a time, for a core kept busy (epoll reactor only).",
        ],
    ]

    def parseOptions(self, options: Any = None) -> None:
        parent = getattr(self, "parent", None)
        if parent is None:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
            return
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            raise SystemExit(f"twistd {self.program}: {e}") from None
        self._configure_twistd(parent)

    #: Option name -> the function turning its text into its value (raising
    #: C{ValueError} with the problem); L{convert_options} applies them.
    conversions: ClassVar[Mapping[str, Callable[[str], Any]]] = {}

    def opt_version(self) -> None:
        """Print the version of sentinel_twisted and exit."""
        from . import __version__

        print(f"sentinel_twisted {__version__}")
        raise SystemExit(0)

    def convert_options(self) -> None:
        """
        Turn each option's text into its value (L{conversions}, and
        C{--log-level} into a L{LogLevel}) and each relative file name of
        L{file_options} into an absolute one; call from postOptions.  A bad
        value is a usage error naming the option.
        """
        for name in self.file_options:
            if self[name]:
                self[name] = os.path.abspath(self[name])
        builtin = {
            "log-level": parse_log_level,
            "log-format": parse_log_format,
            "busy-poll": parse_busy_poll,
        }
        for name, convert in {**self.conversions, **builtin}.items():
            value = self[name]
            if isinstance(value, str):
                try:
                    self[name] = convert(value)
                except ValueError as e:
                    raise usage.UsageError(f"--{name}: {e}") from None

    def _configure_twistd(self, parent: Any) -> None:
        # twistd's default pid file, twistd.pid, would keep the two programs
        # from running side by side in one directory (the README's demo).
        # twistd cannot tell us whether --pidfile was given, so its default
        # value stands for "not given".
        if parent.get("pidfile") == parent.defaults.get("pidfile"):
            parent["pidfile"] = f"{self.program}.pid"
        pidfile = parent.get("pidfile")
        if pidfile:
            directory = os.path.dirname(os.path.abspath(pidfile))
            problem = directory_problem(directory)
            if problem is None and not os.access(directory, os.W_OK):
                problem = f"cannot write in directory {directory}"
            if problem:
                # twistd would fail later, with a traceback.
                raise SystemExit(f"twistd {self.program}: --pidfile {pidfile}: {problem}")
        _observer_settings.clear()
        _observer_settings.update(
            level=self["log-level"],
            format=self["log-format"],
            logger=parent.get("logger"),
            options=parent,
        )
        # twistd resolves --logger by name after this, and uses it for the
        # whole process; the factory wraps whatever twistd would have used.
        parent["logger"] = f"{__name__}.filtered_log_observer"

    def getUsage(self, width: int | None = None) -> str:
        """
        Twisted's layout, wrapped only at spaces: option names and endpoint
        strings (C{unix:sentinel-reverse.sock}) are never cut at a hyphen,
        and docstrings' indentation does not show up as runs of spaces.
        """
        if not width:
            width = int(os.environ.get("COLUMNS", "80"))
        rows = []
        for name in sorted(self.longOpt):
            parameter = name.endswith("=")
            name = name.rstrip("=")
            doc = " ".join((self.docs.get(name) or "").split())
            default = self.defaults.get(name)
            if parameter and default is not None:
                doc = f"{doc} [default: {default}]".strip()
            rows.append((f"--{name}{'=' if parameter else ''}", doc))
        first = max(len(label) for label, _ in rows) + 8
        wrapper = textwrap.TextWrapper(
            width=max(width - first, 20), break_on_hyphens=False, break_long_words=False
        )
        lines = ["Options:"]
        for label, doc in rows:
            wrapped = wrapper.wrap(doc) or [""]
            lines.append(f"      {label:<{first - 6}}{wrapped[0]}".rstrip())
            lines.extend(" " * first + line for line in wrapped[1:])
        text = "\n".join(lines) + "\n"
        longdesc = " ".join(str(getattr(self, "longdesc", "") or "").split())
        if longdesc:
            described = textwrap.fill(longdesc, width, break_on_hyphens=False, break_long_words=False)
            text += "\n" + described + "\n"
        return text


def directory_problem(directory: str) -> str | None:
    """
    Why C{directory} cannot hold a file the program makes (it does not
    exist, it is not a directory, it cannot be looked at), as the end of a
    one-line error; C{None} if it is a directory.
    """
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return f"directory {directory} does not exist"
    except OSError as e:
        return f"cannot use directory {directory}: {os_error_text(e)}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    return None


class StartupError(Exception):
    """
    A program cannot start (an endpoint it cannot listen on, a file it
    needs); the text says why, so no traceback or usage text is needed:
    L{report_startup_errors} prints it as one line.
    """


def report_startup_errors(program: str, error_type: type[BaseException]) -> None:
    """
    Print an uncaught C{error_type} as one line, C{twistd PROGRAM: text}, on
    the process's standard error, instead of a traceback.

    A service that cannot start raises from twistd's start-up of the
    application, after twistd has begun logging: twistd then removes its
    pid file (and, daemonized, tells the waiting parent), and the exception
    ends the process with status 1.  Its text already says what went wrong.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, error_type):
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"twistd {program}: {value}\n")
            stream.flush()
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


def exit_at_exit(status: int) -> None:
    """
    End the process with C{status} once the interpreter exits.

    twistd returns normally (status 0) after the reactor stops, whatever
    stopped it, and offers no way to choose the status.  This runs after
    twistd is done (logs written, pid file removed): the standard streams
    are flushed, then C{os._exit} sets the status.
    """

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(exit_now)


def exit_zero_after_clean_sigterm(reactor: Any, stopped_cleanly: Callable[[], bool]) -> None:
    """
    Make a twistd program exit with status 0 after a clean C{SIGTERM} stop.

    The reactor's own handler records the signal, and twistd re-raises it
    once the reactor is done, so the process would die of C{SIGTERM} (status
    143) however well it stopped.  But C{SIGTERM} is how service managers and
    operators ask a service to stop.  Once the reactor runs, this replaces
    the handler with one that stops the reactor the same way (with the same
    log line) without recording the signal; if the stop was not clean
    (C{stopped_cleanly()} is false afterwards) the status is 143 as before.
    C{SIGINT} keeps Twisted's handling.
    """
    received: list[int] = []

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def on_sigterm(signum: int, frame: object) -> None:
        if not received:
            log.info("Received SIGTERM, shutting down.")
        received.append(signum)
        reactor.callFromThread(stop)

    def install() -> None:
        signal.signal(signal.SIGTERM, on_sigterm)

    def after_shutdown() -> None:
        if received and not stopped_cleanly():
            exit_at_exit(128 + signal.SIGTERM)

    reactor.callWhenRunning(install)
    reactor.addSystemEventTrigger("after", "shutdown", after_shutdown)
