# -*- test-case-name: tests.agent.test_tap -*-
"""
C{twistd sentinel-agent}: a rule-based policy agent that dials a proxy::

    twistd -n sentinel-agent --connect unix:sentinel-reverse.sock \\
        --agent-id waf-1 --rules examples/rules.toml

SIGHUP reloads the rules (a bad file keeps the old rules); SIGTERM drains
the connections; a rejection that retrying cannot fix stops the program.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import stat
import sys
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from .. import __version__
from ..endpoints import (
    SocketInUse,
    clear_stale_unix_socket,
    unix_socket_path,
    with_lockfile,
    with_owner_only_mode,
)
from ..errors import AgentProtocolError
from ._interfaces import IAgent
from .connector import AgentConnector
from .forward import AgentListener
from .rules import RulesAgent, RulesError

__all__ = ["AgentService", "Options", "makeService", "read_token_file"]

log = Logger(namespace="sentinel_twisted.agent.tap")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be positive")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


_positive_int.coerceDoc = "A positive integer."  # type: ignore[attr-defined]
_positive_float.coerceDoc = "Seconds, a positive number."  # type: ignore[attr-defined]
_seconds.coerceDoc = "Seconds, zero or more."  # type: ignore[attr-defined]


class TokenFileError(Exception):
    """The agent's token file cannot be read, holds no token, or holds more than one."""


def read_token_file(path: str) -> tuple[str, str | None]:
    """
    The token in C{path} (its first non-blank, non-comment line) and a
    warning if the file is readable by others.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"cannot read the token file {path}: {e}") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
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
        raise usage.UsageError(f"--agent {spec}: {e}") from None
    agent = target() if isinstance(target, type) else target
    if not IAgent.providedBy(agent):
        raise usage.UsageError(
            f"--agent {spec}: {type(agent).__name__} does not provide IAgent "
            "(subclass sentinel_twisted.agent.Agent)"
        )
    return agent


class Options(usage.Options):
    """The command line of C{twistd sentinel-agent} (see C{--help})."""

    synopsis = (
        "(--connect ENDPOINT | --listen ENDPOINT | both) --agent-id ID "
        "(--rules FILE | --agent MODULE:NAME) [options]"
    )
    longdesc = (
        "Run a Sentinel policy agent that dials the proxy (Agent Protocol v2 reverse "
        "connection), registers, and answers its events with the rules of a TOML or JSON "
        "file. SIGHUP reloads the rules; a bad file keeps the rules in force. With --listen "
        "it also (or instead) serves proxies that dial it (forward mode, JSON or MessagePack)."
    )

    optFlags = [
        ["fail-open", None, "Answer events the agent fails on with allow (default: block 500)."],
    ]
    optParameters = [
        ["connect", None, None, "Client endpoint of the proxy: unix:PATH, tcp:HOST:PORT, tls:HOST:PORT."],
        ["listen", None, None, "Server endpoint to serve proxies that dial the agent (forward mode): "
         "unix:PATH (owner-only, with a lockfile), tcp:PORT:interface=127.0.0.1."],
        ["handshake-timeout", None, 10.0, "Seconds a dialling proxy has to send its handshake.", _positive_float],
        ["agent-id", None, None, "Agent id to register under."],
        ["auth-token-file", None, None, "File holding the registration token (one line)."],
        ["connections", None, 1, "Connections to keep registered.", _positive_int],
        ["rules", None, None, "Rules file (TOML, or JSON if it ends in .json)."],
        ["agent", None, None, "Run MODULE:NAME (an Agent subclass or instance) instead of rules."],
        ["name", None, None, "Agent name announced to the proxy."],
        ["max-concurrency", None, 100, "Events served at once per connection.", _positive_int],
        ["health-interval", None, 10.0, "Seconds between health reports (0: only on registration).", _seconds],
        ["registration-timeout", None, 10.0, "Seconds to wait for the proxy's registration answer.", _positive_float],
        ["drain-grace", None, 10.0, "Seconds in-flight events get when stopping.", _seconds],
        ["max-retry-delay", None, 60.0, "Longest wait between reconnection attempts.", _positive_float],
    ]

    def opt_version(self) -> None:
        print(f"sentinel_twisted {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["agent-id"]:
            raise usage.UsageError("--agent-id is required")
        if not self["connect"] and not self["listen"]:
            raise usage.UsageError("give --connect ENDPOINT, --listen ENDPOINT, or both")
        if bool(self["rules"]) == bool(self["agent"]):
            raise usage.UsageError("give exactly one of --rules FILE and --agent MODULE:NAME")
        from twisted.internet import reactor

        try:
            self["endpoint"] = clientFromString(reactor, self["connect"]) if self["connect"] else None
        except (ValueError, TypeError, KeyError, ImportError) as e:
            raise usage.UsageError(f"--connect {self['connect']}: {e}") from None
        if self["listen"]:
            self["listen"] = with_owner_only_mode(with_lockfile(self["listen"]))
            try:
                serverFromString(reactor, self["listen"])
            except (ValueError, TypeError, KeyError, ImportError) as e:
                raise usage.UsageError(f"--listen {self['listen']}: {e}") from None
        self["auth-token"] = None
        self["token-warning"] = None
        if self["auth-token-file"]:
            try:
                self["auth-token"], self["token-warning"] = read_token_file(self["auth-token-file"])
            except TokenFileError as e:
                raise usage.UsageError(str(e)) from None
        if self["rules"]:
            try:
                agent: Any = RulesAgent(self["rules"], max_concurrency=self["max-concurrency"])
            except RulesError as e:
                raise usage.UsageError(f"bad rules file:\n{e}") from None
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
                "{count} connection(s), up to {limit} events at once each, {policy} on agent errors",
                version=__version__,
                agent_id=self.connector.settings.agent_id,
                what=what,
                endpoint=self.connector.endpoint_description,
                count=len(self.connector.slots),
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
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Any:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return super().stopService()  # type: ignore[no-untyped-call]

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
    listener = make_agent_listener(options, reactor) if options.get("listen") else None
    if not options.get("connect"):
        return AgentService(None, options, reactor, listener)
    connector = AgentConnector(
        options["agent-object"],
        options["endpoint"],
        options["agent-id"],
        connections=options["connections"],
        reactor=reactor,
        drain_grace=options["drain-grace"],
        max_delay=options["max-retry-delay"],
        auth_token=options["auth-token"],
        registration_timeout=options["registration-timeout"],
        health_interval=options["health-interval"],
        max_concurrency=options["max-concurrency"],
        fail_open=bool(options["fail-open"]),
    )
    connector.endpoint_description = options["connect"]
    return AgentService(connector, options, reactor, listener)


def make_agent_listener(options: Any, reactor: Any) -> AgentListener:
    """
    The forward-mode listener of C{--listen}.  A socket file left by a
    process that is gone is removed; a live one never is.

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
        fail_open=bool(options["fail-open"]),
    )


def exit_at_exit(status: int) -> None:
    """
    End the process with C{status} once the interpreter exits.

    twistd returns normally (status 0) after the reactor stops, whatever
    stopped it, and offers no way to choose the status; a service manager
    must be able to tell "rejected for good, do not restart" (status 1)
    from a requested stop.  This runs after twistd is done (logs written,
    pid file removed): the standard streams are flushed, then
    C{os._exit} sets the status.
    """

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(exit_now)


def makeService(options: Options) -> service.IService:
    """The twistd plugin's service: a fatal rejection by the proxy exits with status 1."""
    try:
        agent_service = make_agent_service(options)
    except SocketInUse as e:
        raise SystemExit(f"twistd sentinel-agent: {e}") from None
    agent_service.exit_status_on_fatal = 1
    return agent_service
