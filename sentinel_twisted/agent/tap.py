# -*- test-case-name: tests.agent.test_tap -*-
"""
C{twistd sentinel-agent}: a rule-based policy agent that dials a proxy::

    twistd -n sentinel-agent --connect unix:sentinel-reverse.sock \\
        --agent-id waf-1 --rules examples/rules.toml

SIGHUP reloads the rules (a bad file keeps the old rules); SIGTERM drains
the connections; a rejection that retrying cannot fix stops the program.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import stat
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from .. import __version__
from .._operator_files import OperatorFileError, operator_lines, read_operator_file
from .._twistd import (
    ProgramOptions,
    StartupError,
    add_busy_poll,
    exit_at_exit,
    exit_zero_after_clean_sigterm,
    positive_int,
    report_startup_errors,
)
from ..endpoints import (
    SocketInUse,
    check_endpoint_arguments,
    clear_stale_unix_socket,
    describe_endpoint_error,
    describe_listen_failure,
    unix_socket_path,
    with_lockfile,
    with_owner_only_mode,
)
from ..errors import AgentProtocolError
from ..wire import MAX_INCOMPLETE_FRAME_BYTES, IncompleteFrameBudget
from ._interfaces import IAgent
from .budget import DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES, HeldEventBudget
from .connector import AgentConnector
from .forward import DEFAULT_EVICTION_IDLE_AGE, DEFAULT_MAX_CONNECTIONS, AgentListener
from .protocol import DEFAULT_MAX_EVENT_VALUES
from .rules import RulesAgent, RulesError

__all__ = ["AgentService", "Options", "exit_at_exit", "makeService", "read_token_file"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.agent.tap")


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = _number(value)
    if not number > 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def _seconds(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"expected a number of seconds (0 or more), got {value!r}")
    return number


def _seconds_or_never(value: str) -> float | None:
    if value.strip().lower() == "never":
        return None
    try:
        return _seconds(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds (0 or more) or never, got {value!r}") from None


# Converted in postOptions rather than by usage's coercers, whose error
# text does not say which option was wrong.
_CONVERSIONS = {
    "connections": positive_int,
    "max-concurrency": positive_int,
    "health-interval": _seconds,
    "registration-timeout": _positive_float,
    "handshake-timeout": _positive_float,
    "drain-grace": _seconds,
    "max-retry-delay": _positive_float,
    "resolve-interval": _seconds,
    "max-connections": positive_int,
    "max-incomplete-frame-bytes": positive_int,
    "max-held-event-bytes": positive_int,
    "max-total-held-event-bytes": positive_int,
    "idle-timeout": _seconds,
    "eviction-idle-age": _seconds_or_never,
    "max-event-values": positive_int,
    "frame-timeout": _positive_float,
    "write-stall-timeout": _positive_float,
}


#: The largest token file read: it holds one token.
MAX_TOKEN_FILE_BYTES = 64 * 1024


class TokenFileError(Exception):
    """The agent's token file cannot be read, holds no token, or holds more than one."""


def read_token_file(path: str) -> tuple[str, str | None]:
    """
    The token in C{path} (its first non-blank, non-comment line) and a
    warning if the file is readable by others.
    """
    try:
        text = read_operator_file(path, MAX_TOKEN_FILE_BYTES, "token file")
        mode = os.stat(path).st_mode
    except OperatorFileError as e:
        raise TokenFileError(str(e)) from None
    except OSError as e:
        raise TokenFileError(f"cannot read token file {path}: {e.strerror or e}") from None
    tokens = [s for _, line in operator_lines(text) if (s := line.strip()) and not s.startswith("#")]
    if not tokens:
        raise TokenFileError(f"the token file {path} holds no token")
    if len(tokens) > 1 or any(c.isspace() for c in tokens[0]):
        raise TokenFileError(f"the token file {path} must hold exactly one token on one line")
    warning = None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warning = f"the token file {path} is accessible by group or others (mode {stat.S_IMODE(mode):o})"
    return tokens[0], warning


def _load_agent(spec: str) -> IAgent:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise usage.UsageError(f"--agent: expected MODULE:NAME, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
        target = getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise usage.UsageError(f"--agent {spec}: {' '.join(str(e).split())}") from None
    agent = target() if isinstance(target, type) else target
    if not IAgent.providedBy(agent):
        raise usage.UsageError(
            f"--agent {spec}: {type(agent).__name__} does not provide IAgent "
            "(subclass sentinel_twisted.agent.Agent)"
        )
    return agent


class Options(ProgramOptions):
    """
    The command line of C{twistd sentinel-agent} (see C{--help}).

    @cvar synopsis: the usage line's arguments (L{usage.Options
        <twisted.python.usage.Options>}).
    @cvar longdesc: the description C{--help} shows.
    @cvar optFlags: the flags (L{usage.Options
        <twisted.python.usage.Options>}).
    @cvar optParameters: the options that take a value (L{usage.Options
        <twisted.python.usage.Options>}).
    """

    program = "sentinel-agent"
    conversions = _CONVERSIONS
    file_options = ("auth-token-file", "rules")
    synopsis = (
        "(--connect ENDPOINT | --listen ENDPOINT | both) --agent-id ID "
        "(--rules FILE | --agent MODULE:NAME) [options]"
    )
    longdesc = (
        "Run a Sentinel policy agent that dials the proxy (Agent Protocol v2 reverse "
        "connection), registers, and answers its events with the rules of a TOML or JSON "
        "file, or with an Agent class of your own (--agent). With --listen it also (or "
        "instead) serves proxies that dial it (forward mode, JSON or MessagePack). SIGHUP "
        "reloads the rules; a bad file keeps the rules in force. SIGTERM drains the events "
        "in flight (--drain-grace) and exits 0; a rejection that retrying cannot fix exits 1."
    )

    optFlags = [
        ["fail-open", None, "Answer events the agent fails on with allow (default: block 500)."],
    ]
    optParameters = [
        ["listen", None, None, "Server endpoint to serve proxies that dial the agent (forward mode): "
         "unix:PATH (owner-only, with a lockfile), tcp:PORT:interface=127.0.0.1."],
        ["handshake-timeout", None, 10.0, "Seconds a dialling proxy has to send its handshake."],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Proxy connections (N) --listen holds at once; a new one takes the place of one "
            "idle for a second or more (no event in flight), or is closed.",
        ],
        [
            "eviction-idle-age",
            None,
            DEFAULT_EVICTION_IDLE_AGE,
            "Seconds a --listen connection must have been idle (no event in flight) for a new one "
            "to take its place when every place is taken (never: new ones are closed instead).",
        ],
        [
            "idle-timeout",
            None,
            0.0,
            "Seconds a --listen connection may go without an event before it is closed "
            "(0: never; the reference proxy does not redial a closed connection).",
        ],
        ["agent-id", None, None, "Agent id to register under (required)."],
        ["auth-token-file", None, None, "File holding the registration token (one line)."],
        ["connections", None, 1, "Connections (N) to keep registered to each proxy."],
        ["rules", None, None, "Rules file (TOML, or JSON if it ends in .json)."],
        ["agent", None, None, "Run MODULE:NAME (an Agent subclass or instance) instead of rules."],
        ["name", None, None, "Agent name announced to the proxy. [default: the agent's own]"],
        ["max-concurrency", None, 100, "Events (N) served at once per connection."],
        ["health-interval", None, 10.0, "Seconds between health reports (0: only on registration)."],
        ["registration-timeout", None, 10.0, "Seconds to wait for the proxy's registration answer."],
        ["drain-grace", None, 10.0, "Seconds in-flight events get to finish on SIGTERM."],
        ["max-retry-delay", None, 60.0, "Longest wait (seconds) between reconnection attempts."],
        [
            "resolve-interval",
            None,
            30.0,
            "Seconds between resolutions of --connect host names; each address is a proxy "
            "(0: dial each name as one proxy).",
        ],
        [
            "max-incomplete-frame-bytes",
            None,
            MAX_INCOMPLETE_FRAME_BYTES,
            "Bytes (N) all proxy connections may hold in unfinished frames; over it the "
            "connection holding the most is closed.",
        ],
        [
            "max-held-event-bytes",
            None,
            64 * 1024 * 1024,
            "Bytes (N) of events one connection holds running and queued; past it an "
            "event is answered 503 at once.",
        ],
        [
            "max-total-held-event-bytes",
            None,
            DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES,
            "Bytes (N) of events all proxy connections together hold running and queued; "
            "past it an event is answered 503 at once.",
        ],
        [
            "max-event-values",
            None,
            DEFAULT_MAX_EVENT_VALUES,
            "Values (N: strings, numbers, lists, maps, keys) one event may hold; one that "
            "holds more is answered with the error decision without being decoded.",
        ],
        [
            "frame-timeout",
            None,
            30.0,
            "Seconds (a float) a frame the proxy has started has to arrive whole, once "
            "registered; then the connection is closed.",
        ],
        [
            "write-stall-timeout",
            None,
            30.0,
            "Seconds (a float) the proxy may leave the agent's answers unread, its socket "
            "full; then the connection is aborted.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["connect"] = []
        #: What the effective --listen endpoint was given as, for messages.
        self.given: dict[str, str] = {}

    def opt_connect(self, description: str) -> None:
        """
        Client endpoint of a proxy (required without --listen; repeat it for several
        proxies): unix:PATH, tcp:HOST:PORT, tls:HOST:PORT. A host name stands for every
        proxy it resolves to.
        """
        self["connect"].append(description)

    def postOptions(self) -> None:
        self.convert_options()
        if not self["agent-id"]:
            raise usage.UsageError("--agent-id is required")
        if not self["connect"] and not self["listen"]:
            raise usage.UsageError("give --connect ENDPOINT, --listen ENDPOINT, or both")
        if len(set(self["connect"])) != len(self["connect"]):
            raise usage.UsageError("--connect: the same endpoint is given twice")
        if bool(self["rules"]) == bool(self["agent"]):
            raise usage.UsageError("give exactly one of --rules FILE and --agent MODULE:NAME")
        from twisted.internet import reactor

        for description in self["connect"]:
            try:
                clientFromString(reactor, description)
            except Exception as e:
                raise usage.UsageError(f"--connect {description}: {describe_endpoint_error(e)}") from None
        if self["listen"]:
            given = self["listen"]
            self["listen"] = with_owner_only_mode(with_lockfile(given))
            self.given[self["listen"]] = given
            try:
                check_endpoint_arguments(self["listen"])
                serverFromString(reactor, self["listen"])
            except Exception as e:
                raise usage.UsageError(f"--listen {given}: {describe_endpoint_error(e)}") from None
        self["auth-token"] = None
        self["token-warning"] = None
        if self["auth-token-file"]:
            try:
                self["auth-token"], self["token-warning"] = read_token_file(self["auth-token-file"])
            except TokenFileError as e:
                raise usage.UsageError(f"--auth-token-file: {e}") from None
        if self["rules"]:
            try:
                agent: Any = RulesAgent(self["rules"], max_concurrency=self["max-concurrency"])
            except RulesError as e:
                problems = "; ".join(" ".join(p.split()) for p in e.problems)
                raise usage.UsageError(f"--rules {e.source}: {problems}") from None
        else:
            agent = _load_agent(self["agent"])
            agent.max_concurrency = self["max-concurrency"]
        if self["name"]:
            agent.name = self["name"]
        self["agent-object"] = agent


class AgentService(service.MultiService):
    """
    The connector (reverse mode) and/or the listener (forward mode) plus
    the process-level glue: SIGHUP reloads the rules, and a fatal
    rejection stops the program.

    @ivar connector: the connector (reverse mode), C{None} without one.
    @ivar listener: the listener (forward mode), C{None} without one.
    @ivar options: the parsed command line.
    @ivar reactor: the reactor (for signals and stopping).
    @ivar agent: the agent both serve.
    """

    def __init__(
        self,
        connector: AgentConnector | None,
        options: Any,
        reactor: Any,
        listener: AgentListener | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.connector = connector
        self.listener = listener
        self.options = options
        self.reactor = reactor
        self._previous_hup: Any = None
        for child in (connector, listener):
            if child is not None:
                child.setServiceParent(self)  # type: ignore[no-untyped-call]
        either = connector if connector is not None else listener
        if either is None:
            raise ValueError("AgentService needs a connector, a listener, or both")
        self.agent = either.settings.agent

    def startService(self) -> None:
        warning = self.options.get("token-warning")
        if warning:
            log.warn("{warning}; it holds a secret, make it owner-only (chmod 600)", warning=warning)
        agent = self.agent
        rules = getattr(agent, "ruleset", None)
        what = f"{len(rules)} rule(s) from {rules.source}" if rules is not None else type(agent).__name__
        if self.connector is not None:
            log.info(
                "sentinel-agent {version}: agent {agent_id} ({what}) -> {endpoint}, "
                "{count} connection(s) per proxy, up to {limit} events at once each, {policy} on agent errors",
                version=__version__,
                agent_id=self.connector.settings.agent_id,
                what=what,
                endpoint=self.connector.endpoint_description,
                count=self.connector.connection_count,
                limit=self.options["max-concurrency"],
                policy="allow" if self.connector.settings.fail_open else "block 500",
            )
            self.connector.when_failed().addCallback(self._fatal)
        if self.listener is not None:
            log.info(
                "sentinel-agent {version}: agent {agent_id} ({what}) serves proxies that dial "
                "{endpoint}, up to {limit} events at once each, {policy} on agent errors",
                version=__version__,
                agent_id=self.listener.settings.agent_id,
                what=what,
                endpoint=self.listener.endpoint_description,
                limit=self.options["max-concurrency"],
                policy="allow" if self.listener.settings.fail_open else "block 500",
            )
        if hasattr(agent, "reload"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._sighup)
        try:
            super().startService()  # type: ignore[no-untyped-call]
        except (CannotListenError, OSError) as e:
            # Only the listener binds when it starts.
            if self.listener is None:
                raise
            self._abandon_start(e)

    #: Whether L{_abandon_start} logs its message too (set by makeService
    #: when twistd daemonizes; under C{-n} the one line on standard error
    #: is enough).
    log_startup_errors = False

    def _abandon_start(self, error: Exception) -> None:
        """
        The listener could not listen: raise a L{StartupError} that names
        the option and the problem, as C{twistd sentinel-reverse} does.
        (The listener has removed the socket file and the lock it left.)
        """
        assert self.listener is not None
        description = self.listener.endpoint_description
        given = getattr(self.options, "given", {}).get(description, description)
        message = f"--listen {given}: {describe_listen_failure(error)}"
        if self.log_startup_errors:
            # Daemonized: standard error is gone, the log file stays.
            log.critical("twistd sentinel-agent: {message}", message=message)
        raise StartupError(message) from None

    #: Set once the connections have drained and closed.
    stopped_cleanly = False

    def stopService(self) -> Any:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        stopping = super().stopService()  # type: ignore[no-untyped-call]

        def clean(result: object) -> object:
            self.stopped_cleanly = True
            return result

        if stopping is None:
            self.stopped_cleanly = True
            return None
        return stopping.addCallback(clean)

    def health(self) -> dict[str, Any]:
        """
        The dialled connections' state, proxy by proxy (see
        L{AgentConnector.health}); empty when the agent only listens.
        """
        return self.connector.health() if self.connector is not None else {}

    def _sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Reload the agent's rules (SIGHUP); C{False} if the agent has no C{reload} or it failed.
        """
        reload = getattr(self.agent, "reload", None)
        return bool(reload()) if reload is not None else False

    #: Set for the twistd program (L{makeService}): a fatal rejection ends
    #: the process with exit status 1 rather than twistd's 0.
    exit_status_on_fatal: int | None = None

    def _fatal(self, error: AgentProtocolError) -> None:
        log.critical("sentinel-agent stopping: {error}", error=str(error))
        if self.exit_status_on_fatal is not None:
            exit_at_exit(self.exit_status_on_fatal)
        if self.reactor.running:
            self.reactor.stop()


def make_agent_service(options: Any, reactor: Any = None) -> AgentService:
    """The agent service for parsed L{Options}; what L{makeService} runs."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    # One budget for every proxy connection, dialled or dialling.
    budget = IncompleteFrameBudget(options.get("max-incomplete-frame-bytes", MAX_INCOMPLETE_FRAME_BYTES))
    held = HeldEventBudget(options.get("max-total-held-event-bytes", DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES))
    listener = make_agent_listener(options, reactor, budget, held) if options.get("listen") else None
    if not options.get("connect"):
        return AgentService(None, options, reactor, listener)
    connector = AgentConnector(
        options["agent-object"],
        options["connect"],
        options["agent-id"],
        connections=options["connections"],
        reactor=reactor,
        drain_grace=options["drain-grace"],
        max_delay=options["max-retry-delay"],
        resolve_interval=options["resolve-interval"],
        auth_token=options["auth-token"],
        registration_timeout=options["registration-timeout"],
        health_interval=options["health-interval"],
        max_concurrency=options["max-concurrency"],
        max_held_event_bytes=options["max-held-event-bytes"],
        max_event_values=options.get("max-event-values", DEFAULT_MAX_EVENT_VALUES),
        fail_open=bool(options["fail-open"]),
        frame_timeout=options["frame-timeout"],
        write_stall_timeout=options["write-stall-timeout"],
        frame_budget=budget,
        held_event_budget=held,
    )
    return AgentService(connector, options, reactor, listener)


def make_agent_listener(
    options: Any,
    reactor: Any,
    frame_budget: IncompleteFrameBudget | None = None,
    held_event_budget: HeldEventBudget | None = None,
) -> AgentListener:
    """
    The forward-mode listener of C{--listen}.  A socket file left by a
    process that is gone is removed; a live one never is.

    @param frame_budget: the account of incomplete frames to share (with
        the connector); C{None}: one of C{--max-incomplete-frame-bytes}.
    @param held_event_budget: the account of held events to share (with
        the connector); C{None}: one of C{--max-total-held-event-bytes}.
    @raise SocketInUse: if a live process serves the socket.
    """
    description = options["listen"]
    path = unix_socket_path(description)
    if path is not None and clear_stale_unix_socket(path):
        log.info("Removed stale socket {path} left by a process that is gone", path=path)
    return AgentListener(
        options["agent-object"],
        description,
        options["agent-id"],
        reactor=reactor,
        drain_grace=options["drain-grace"],
        handshake_timeout=options["handshake-timeout"],
        health_interval=options["health-interval"],
        max_concurrency=options["max-concurrency"],
        max_held_event_bytes=options["max-held-event-bytes"],
        max_event_values=options.get("max-event-values", DEFAULT_MAX_EVENT_VALUES),
        fail_open=bool(options["fail-open"]),
        frame_timeout=options["frame-timeout"],
        write_stall_timeout=options["write-stall-timeout"],
        max_connections=options.get("max-connections", DEFAULT_MAX_CONNECTIONS),
        max_incomplete_frame_bytes=options.get("max-incomplete-frame-bytes", MAX_INCOMPLETE_FRAME_BYTES),
        frame_budget=frame_budget,
        max_total_held_event_bytes=options.get("max-total-held-event-bytes", DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES),
        held_event_budget=held_event_budget,
        idle_timeout=options.get("idle-timeout", 0.0),
        eviction_idle_age=options.get("eviction-idle-age", DEFAULT_EVICTION_IDLE_AGE),
    )


def makeService(options: Options) -> service.IService:
    """The twistd plugin's service: a fatal rejection by the proxy exits with status 1."""
    try:
        agent_service = make_agent_service(options)
    except SocketInUse as e:
        listen = options["listen"]
        given = getattr(options, "given", {}).get(listen, listen)
        raise SystemExit(f"twistd sentinel-agent: --listen {given}: {e}") from None
    add_busy_poll(agent_service, options["busy-poll"], "sentinel-agent", agent_service.reactor)
    # Failures to listen come later, once twistd starts the service.
    report_startup_errors("sentinel-agent", StartupError)
    twistd_options = getattr(options, "parent", None)
    agent_service.log_startup_errors = twistd_options is not None and not twistd_options.get("nodaemon")
    agent_service.exit_status_on_fatal = 1
    exit_zero_after_clean_sigterm(agent_service.reactor, lambda: agent_service.stopped_cleanly)
    return agent_service
