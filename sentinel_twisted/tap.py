# -*- test-case-name: tests.test_tap -*-
"""
C{twistd sentinel-reverse}: accept reverse connections from policy agents.
"""

from __future__ import annotations

import gc
import math
import os
import resource
from collections.abc import Iterator
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from . import __version__
from . import messages as m
from ._twistd import ProgramOptions, exit_zero_after_clean_sigterm, report_startup_errors
from .endpoints import (
    MAX_BACKLOG,
    SocketInUse,
    check_endpoint_arguments,
    clear_stale_lock,
    clear_stale_unix_socket,
    describe_endpoint_error,
    describe_listen_failure,
    parse_description,
    remove_abandoned_unix_socket,
    system_max_backlog,
    takes_lock,
    unix_socket_path,
    with_backlog,
    with_owner_only_mode,
)
from .proxy._identity import load_ca_certificates, verifying_server_endpoint
from .proxy._reload import ConfigurationReloader, install_sighup
from .proxy.auth import TokenFileChecker, TokenFileError
from .proxy.config import AllowFileError, ReverseConnectionConfig, read_allow_file
from .proxy.dialled import DialledAgentService, encoding_list, parse_agent_endpoint
from .proxy.factory import ReverseConnectionFactory
from .proxy.pool import AgentPool

__all__ = [
    "DEFAULT_HTTP",
    "DEFAULT_LISTEN",
    "DEFAULT_STATUS",
    "ListenerEndpointService",
    "Options",
    "ReverseListenerService",
    "StartupError",
    "add_forward_agents",
    "add_gateway",
    "makeService",
    "make_listener",
    "shut_down_agents",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.tap")

#: A UNIX socket in the working directory, owner-only, with a lockfile.
DEFAULT_LISTEN = "unix:sentinel-reverse.sock:mode=600:lockfile=1"
#: Where the gateway takes HTTP clients (C{--http}).
DEFAULT_HTTP = "tcp:8080:interface=127.0.0.1"
#: Where the status site is (C{--status}).
DEFAULT_STATUS = "tcp:9901:interface=127.0.0.1"
#: Seconds requests in flight get to finish when the listener stops.
DEFAULT_SHUTDOWN_GRACE = 5.0
#: Seconds closing agent connections get to flush what is buffered.
CLOSE_TIMEOUT = 5.0


class StartupError(Exception):
    """
    The listener cannot start (unreadable token file, socket in use, bad
    endpoint); the text says why, so no traceback or usage text is needed.
    """


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


#: The largest listen backlog: listen() takes a C int (the system caps it
#: at net.core.somaxconn anyway).
_MAX_BACKLOG = MAX_BACKLOG


def _backlog(value: str) -> int:
    number = _positive_int(value)
    if number > _MAX_BACKLOG:
        raise ValueError(f"expected a positive integer up to {_MAX_BACKLOG}, got {value!r}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError(f"expected a number of seconds (0 or more), got {value!r}")
    return number


def _client_error_status(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 400 <= number <= 499:
        raise ValueError(f"expected a 4xx HTTP status code (400-499), got {value!r}")
    return number


# Converted in postOptions rather than by usage's coercers, whose error
# text does not say which option was wrong.
_CONVERSIONS = {
    "max-connections-per-agent": _positive_int,
    "handshake-timeout": _positive_float,
    "request-timeout": _positive_float,
    "backlog": _backlog,
    "max-pending-registrations": _positive_int,
    "max-incomplete-frame-bytes": _positive_int,
    "max-agent-id-length": _positive_int,
    "max-metadata-size": _positive_int,
    "upstream-timeout": _positive_float,
    "challenge-status": _client_error_status,
    "shutdown-grace": _seconds,
    "header-timeout": _positive_float,
    "max-client-connections": _positive_int,
    "agent-connections": _positive_int,
    "agent-encodings": encoding_list,
    "max-replaced-body-size": _positive_int,
}


class Options(ProgramOptions):
    """
    The command line of C{twistd sentinel-reverse} (see C{--help}).

    @cvar synopsis: the usage line's arguments (L{usage.Options
        <twisted.python.usage.Options>}).
    @cvar longdesc: the description C{--help} shows.
    @cvar optFlags: the flags (L{usage.Options
        <twisted.python.usage.Options>}).
    @cvar optParameters: the options that take a value (L{usage.Options
        <twisted.python.usage.Options>}).
    """

    program = "sentinel-reverse"
    conversions = _CONVERSIONS
    synopsis = "[options]"
    longdesc = (
        "Listen for Sentinel policy agents that dial in (Agent Protocol v2 reverse "
        "connections) and keep them in an agent pool; run the HTTP gateway, a reverse "
        "proxy whose every request is decided by those agents (--http, --upstream), "
        "and the status site with /agents and /metrics (--status). SIGTERM lets "
        "requests in flight finish (--shutdown-grace) and exits 0. SIGHUP rereads "
        "--token-file, --allow-file and --client-ca; connections no longer allowed are "
        "drained and closed."
    )

    optFlags = [
        ["require-auth", None, "Refuse agents that register without a token."],
        [
            "require-client-cert",
            None,
            "ssl: listeners demand a client certificate signed by --client-ca, and an "
            "agent's id must be one of its names (subjectAltName DNS/URI or CN).",
        ],
        [
            "fail-open",
            None,
            "Let a request go on as allowed when an agent cannot answer (not connected, "
            "paused, timed out, disconnected) instead of answering 503.",
        ],
    ]
    optParameters = [
        [
            "token-file",
            None,
            None,
            "File of 'AGENT_ID TOKEN' lines ('#' comments) used to verify tokens.",
        ],
        ["max-connections-per-agent", None, 4, "Registered connections one agent may hold (N)."],
        ["handshake-timeout", None, 10.0, "Seconds (a float) a new connection has to register."],
        [
            "request-timeout",
            None,
            30.0,
            "Seconds (a float) a request waits for the agent's answer.",
        ],
        ["proxy-id", None, "sentinel-proxy", "Proxy id sent to agents on registration."],
        [
            "shutdown-grace",
            None,
            DEFAULT_SHUTDOWN_GRACE,
            "Seconds (a float, 0: none) requests in flight get to be answered on SIGTERM; "
            "then they are cancelled (reason: proxy shutdown) and the agents disconnected.",
        ],
        [
            "backlog",
            None,
            None,
            "Listen backlog (N) for endpoints that do not set one. "
            "[default: the system's maximum, net.core.somaxconn]",
        ],
        [
            "max-pending-registrations",
            None,
            1024,
            "Connections (N) that may await registration at once.",
        ],
        [
            "max-incomplete-frame-bytes",
            None,
            64 * 1024 * 1024,
            "Bytes (N) all agent connections may hold in unfinished frames; over it the "
            "connection holding the most is closed.",
        ],
        [
            "max-agent-id-length",
            None,
            256,
            "Longest agent id (N UTF-8 bytes) a registration may carry.",
        ],
        [
            "max-metadata-size",
            None,
            64 * 1024,
            "Largest registration metadata (N bytes of JSON).",
        ],
        [
            "http",
            None,
            DEFAULT_HTTP,
            "Server endpoint the HTTP gateway takes clients on (ssl:... for TLS; 'none': no gateway).",
        ],
        [
            "upstream",
            None,
            None,
            "http(s):// URL allowed requests are forwarded to; default: the built-in echo.",
        ],
        [
            "upstream-timeout",
            None,
            30.0,
            "Seconds (a float) to wait for the upstream's response headers before answering 504.",
        ],
        [
            "status",
            None,
            DEFAULT_STATUS,
            "Server endpoint of the status page, /agents and /metrics ('none': off).",
        ],
        [
            "challenge-status",
            None,
            403,
            "HTTP status (4xx) of the response to a challenge decision.",
        ],
        ["access-log", None, None, "File to append a line per gateway request to (default: none)."],
        [
            "header-timeout",
            None,
            30.0,
            "Seconds (a float) an HTTP client has to send a whole request head; then 408.",
        ],
        [
            "max-client-connections",
            None,
            1024,
            "HTTP client connections (N) the gateway holds at once; more are closed at once.",
        ],
        [
            "agent-connections",
            None,
            4,
            "Connections (N) kept to each --agent-endpoint agent (at most "
            "--max-connections-per-agent).",
        ],
        [
            "agent-encodings",
            None,
            "msgpack,json",
            "Payload encodings offered to --agent-endpoint agents, in order of preference.",
        ],
        [
            "max-replaced-body-size",
            None,
            10 * 1024 * 1024,
            "Largest body (N bytes) agents' body replacements may make of a smaller one; "
            "past it the answer is an agent error (503, or the agent left out with --fail-open).",
        ],
        [
            "client-ca",
            None,
            None,
            "PEM file of the CA certificate(s) that sign agents' client certificates "
            "(with --require-client-cert).",
        ],
        [
            "allow-file",
            None,
            None,
            "File of agent ids or glob patterns allowed to register, one a line ('#' "
            "comments), besides any --allow; SIGHUP rereads it.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["allow"] = []
        self["agents"] = []
        self["status-hosts"] = []
        self["ready-agents"] = []
        self["agent-endpoints"] = []

    def opt_listen(self, description: str) -> None:
        # The help text is the __doc__ assigned below.
        self["listen"].append(description)

    # A plain literal (not an f-string) so that pydoctor can read it too;
    # tests/test_examples.py checks that it names DEFAULT_LISTEN.
    opt_listen.__doc__ = (
        "Server endpoint to listen on, e.g. unix:/run/sentinel.sock:lockfile=1 "
        "or tcp:7000:interface=127.0.0.1 (repeatable); unix sockets are owner-only "
        "(mode=600) unless mode= says otherwise. "
        "[default: unix:sentinel-reverse.sock:mode=600:lockfile=1]"
    )

    def opt_allow(self, pattern: str) -> None:
        """Agent id or glob pattern (waf-*) allowed to register (repeatable). [default: all]"""
        self["allow"].append(pattern)

    def opt_agent(self, agent_id: str) -> None:
        """
        Agent id consulted for each gateway request, in the order given
        (repeatable); registered or --agent-endpoint agents alike.
        [default: every agent in the pool, in order of first connection]
        """
        if not agent_id.strip():
            raise usage.UsageError("--agent: an empty agent id; give the id of an agent to consult")
        self["agents"].append(agent_id)

    def opt_agent_endpoint(self, value: str) -> None:
        """
        ID=ENDPOINT: dial a listening agent (forward mode) at a client endpoint
        (unix:PATH, tcp:HOST:PORT, tls:HOST:PORT) and keep --agent-connections
        connections to it under agent id ID (repeatable).
        """
        try:
            self["agent-endpoints"].append(parse_agent_endpoint(value))
        except ValueError as e:
            raise usage.UsageError(f"--agent-endpoint {value}: {e}") from None

    def opt_status_host(self, name: str) -> None:
        """
        Host name the status site answers to besides its own address
        (repeatable); other Host headers get 421, against DNS rebinding.
        """
        if not name.strip():
            raise usage.UsageError("--status-host: an empty host name; give a name the status site answers to")
        self["status-hosts"].append(name)

    def opt_ready_agent(self, agent_id: str) -> None:
        """
        Agent id that must be registered for the status site's /healthz to
        report ready (repeatable). [default: ready once the listener listens]
        """
        self["ready-agents"].append(agent_id)

    def postOptions(self) -> None:
        self.convert_options()
        if self["backlog"] is None:
            self["backlog"] = system_max_backlog()
        for pattern in self["allow"]:
            if not pattern.strip():
                raise usage.UsageError("--allow: an empty pattern allows no agent id; give an id or a glob")
        if self["require-auth"] and not self["token-file"]:
            raise usage.UsageError(
                "--require-auth needs --token-file FILE: without it any token would be accepted"
            )
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        #: What each effective --listen endpoint was given as, for messages.
        self.given: dict[str, str] = {}
        listen = []
        for given in self["listen"]:
            description = with_backlog(with_owner_only_mode(given), self["backlog"])
            self.given[description] = given
            listen.append(description)
        self["listen"] = listen
        self._client_certificate_options()
        try:
            self["config"] = ReverseConnectionConfig(
                backlog=self["backlog"],
                handshake_timeout=self["handshake-timeout"],
                max_connections_per_agent=self["max-connections-per-agent"],
                allowed_agents=tuple(self["allow"]),
                require_auth=bool(self["require-auth"]),
                request_timeout=self["request-timeout"],
                proxy_id=self["proxy-id"],
                max_pending_registrations=self["max-pending-registrations"],
                max_incomplete_frame_bytes=self["max-incomplete-frame-bytes"],
                max_agent_id_length=self["max-agent-id-length"],
                max_metadata_size=self["max-metadata-size"],
                require_client_cert=bool(self["require-client-cert"]),
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self._forward_options()
        self._gateway_options()
        self._check_endpoint_arguments()
        self._ready_agent_options()

    def _check_endpoint_arguments(self) -> None:
        # A backlog= that Twisted's listen() would only fail on after taking
        # a UNIX socket's lock and binding its file.
        named = [("listen", d) for d in self["listen"]]
        named += [(name, self[name]) for name in ("http", "status") if self[name] is not None]
        for name, description in named:
            try:
                check_endpoint_arguments(description)
            except ValueError as e:
                raise usage.UsageError(f"--{name} {self.given.get(description, description)}: {e}") from None

    def _ready_agent_options(self) -> None:
        for agent_id in self["ready-agents"]:
            if not agent_id.strip():
                raise usage.UsageError("--ready-agent: an empty agent id")
            if not self["config"].allowed_agents.allows(agent_id):
                raise usage.UsageError(
                    f"--ready-agent {agent_id}: --allow does not let this agent register, "
                    "so the proxy would never be ready"
                )
        if self["ready-agents"] and self["status"] is None:
            raise usage.UsageError("--ready-agent needs the status site (--status): /healthz is there")

    def _forward_options(self) -> None:
        cap = self["max-connections-per-agent"]
        per_agent: dict[str, int] = {}
        for agent_id, endpoint in self["agent-endpoints"]:
            per_agent[agent_id] = per_agent.get(agent_id, 0) + self["agent-connections"]
            if per_agent[agent_id] > cap:
                raise usage.UsageError(
                    f"--agent-endpoint {agent_id}={endpoint}: {per_agent[agent_id]} connections "
                    f"(--agent-connections) exceed --max-connections-per-agent {cap}"
                )

    def _client_certificate_options(self) -> None:
        # Checked without reading the CA file (make_listener reads it), so
        # that commands in the docs can be parsed anywhere.
        if bool(self["require-client-cert"]) != bool(self["client-ca"]):
            raise usage.UsageError(
                "--require-client-cert and --client-ca FILE go together: the CA "
                "verifies the certificates, the flag ties them to agent ids"
            )
        if self["require-client-cert"] and not any(
            parse_description(d)[0][0] == "ssl" for d in self["listen"]
        ):
            raise usage.UsageError("--require-client-cert needs an ssl: --listen endpoint")

    def _gateway_options(self) -> None:
        from .gateway.config import GatewayConfig

        for name in ("http", "status"):
            value = self[name]
            if value is None or value.strip().lower() in ("", "none", "off"):
                self[name] = None
            else:
                self[name] = with_backlog(value, self["backlog"])
                self.given[self[name]] = value
        try:
            self["gateway"] = GatewayConfig(
                agents=self["agents"],
                fail_open=bool(self["fail-open"]),
                upstream=self["upstream"] or None,
                upstream_timeout=self["upstream-timeout"],
                challenge_status=self["challenge-status"],
                header_timeout=self["header-timeout"],
                max_client_connections=self["max-client-connections"],
                status_hosts=self["status-hosts"],
                max_replaced_body_size=self["max-replaced-body-size"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def raise_file_limit() -> tuple[int, int] | None:
    """Raise the soft open-file limit to the hard one; returns (old, new)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return None
    return soft, target


def freeze_startup_heap() -> int:
    """
    Move every object alive once start-up is over into the collector's
    permanent generation (L{gc.freeze}); returns how many there are.

    The modules, classes and configuration loaded at start-up live as long
    as the process, yet every full collection would walk them again: under
    load that cost the gateway about 5% of its requests/s (BENCHMARKS.md).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _freeze_when_running() -> None:
    count = freeze_startup_heap()
    log.debug("Start-up heap frozen: {count} objects left out of garbage collection", count=count)


class ListenerEndpointService(service.Service):
    """
    Listens on one C{--listen} endpoint.  It binds in
    C{privilegedStartService}, before twistd gives up root (ports below
    1024); a failure to listen is a L{StartupError} naming the endpoint.

    @ivar endpoint: the server endpoint built from it.
    @ivar description: the endpoint string it listens on (as adjusted:
        backlog, mode).
    @ivar given: the endpoint as the user gave it, for messages.
    @ivar factory: the listener's factory.
    @ivar port: the listening port, C{None} when not listening.
    """

    def __init__(
        self,
        endpoint: Any,
        description: str,
        factory: ReverseConnectionFactory,
        given: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.description = description
        self.given = given or description
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listened = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._listened = True
        outcome: list[Any] = []

        def settle(result: Any) -> None:
            if starting:
                outcome.append(result)
            elif isinstance(result, Failure):
                # Failed later: nobody to raise to, so say it here.
                log.failure("Cannot listen on --listen {listen}", result, listen=self.given)
            else:
                self.port = result

        starting = [True]
        self.endpoint.listen(self.factory).addBoth(settle)
        starting.clear()
        if not outcome:
            return
        if isinstance(outcome[0], Failure):
            error = outcome[0].value
            for path in remove_abandoned_unix_socket(self.description, error):  # type: ignore[arg-type]
                log.debug("Removed {path} after the failure to listen", path=path)
            reason = describe_listen_failure(error)  # type: ignore[arg-type]
            raise StartupError(f"--listen {self.given}: {reason}")
        self.port = outcome[0]

    def startService(self) -> None:
        # Started without twistd's privileged step (an embedding program).
        if not self._listened:
            self.privilegedStartService()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._listened = False
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if stopped is not None else succeed(None)


def _listening_children(top: service.IServiceCollection) -> Iterator[Any]:
    """Every service in the tree under C{top} that holds a listening C{port}."""
    for child in top:
        if IListeningPort.providedBy(getattr(child, "port", None)):
            yield child
        if service.IServiceCollection.providedBy(child):
            yield from _listening_children(child)


def _close_at_once(port: IListeningPort) -> None:
    """
    Stop listening on C{port} now.  At start-up twistd has not run the
    reactor and will not, so C{stopListening} would only schedule the close
    (a UNIX socket's file and its lock would stay behind); the port's
    C{connectionLost} closes it at once, removing those files.
    """
    lose = getattr(port, "connectionLost", None)
    if lose is None:
        port.stopListening()
        return
    lose(Failure(ConnectionDone("start-up failed")))


class ReverseListenerService(service.MultiService):
    """
    The listener's endpoints plus its factory; logs the set-up on start.

    @cvar stopped_cleanly: set once stopping has finished the requests and
        closed the connections; a clean C{SIGTERM} then exits with status 0.
    @ivar factory: the listener's factory (and through it the pool).
    @ivar options: the parsed command line (L{Options}).
    @ivar stale_removed: stale UNIX socket files removed at start, logged when
        it starts.
    """

    def __init__(
        self,
        factory: ReverseConnectionFactory,
        options: Any,
        stale_removed: list[str] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.factory = factory
        self.options = options
        self.stale_removed = stale_removed or []
        #: Rereads the token file, the allowlist and the client CA (SIGHUP).
        self.reloader: ConfigurationReloader | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except Exception as e:
            self._abandon_start(e)

    def _abandon_start(self, error: Exception) -> None:
        """
        A listener could not start: close what already listens (removing
        UNIX socket files and locks), then raise a L{StartupError} that names
        the option and the problem.
        """
        if isinstance(error, StartupError):
            message = str(error)
        else:
            message = self._describe_failure(error)
        for child in list(_listening_children(self)):
            port, child.port = child.port, None
            _close_at_once(port)
        for name in ("http", "status"):
            description = self.options.get(name)
            if description is not None:
                remove_abandoned_unix_socket(description, error)
        if self.log_startup_errors:
            # Daemonized: standard error is gone, the log file stays.
            log.critical("twistd sentinel-reverse: {message}", message=message)
        raise StartupError(message) from None

    #: Whether L{_abandon_start} logs its message too (set by makeService
    #: when twistd daemonizes; under C{-n} the one line on standard error
    #: is enough).
    log_startup_errors = False

    def _describe_failure(self, error: Exception) -> str:
        from .gateway.service import ListeningService

        given = getattr(self.options, "given", {})
        reason = describe_listen_failure(error)
        for child in self:
            if not service.IServiceCollection.providedBy(child):
                continue
            for listening in child:
                if isinstance(listening, ListeningService) and listening.running and listening.port is None:
                    option = "--http" if listening.description == self.options.get("http") else "--status"
                    return f"{option} {given.get(listening.description, listening.description)}: {reason}"
        return reason

    def startService(self) -> None:
        config = self.factory.config
        raised = raise_file_limit()
        if raised is not None:
            log.info("Raised the open-file limit from {old} to {new}", old=raised[0], new=raised[1])
        for path in self.stale_removed:
            if path.endswith(".lock"):
                log.info("Removed stale lock {path}: no process serves its socket", path=path)
            else:
                log.info("Removed stale socket {path} left by a process that is gone", path=path)
        checker = self.factory.token_checker
        warning = getattr(checker, "permission_warning", None)
        if warning:
            log.warn("{warning}; it holds secrets, make it owner-only (chmod 600)", warning=warning)
        if config.require_auth and checker is None:
            log.warn("--require-auth without --token-file: tokens are required but not verified")
        if config.require_client_cert:
            log.info(
                "Client certificates signed by {ca} are required on ssl: endpoints; "
                "an agent's id must be a name in its certificate",
                ca=self.options.get("client-ca"),
            )
            for description in self.options["listen"]:
                if parse_description(description)[0][0] != "ssl":
                    log.warn(
                        "Agents on {listen} present no client certificate and will be "
                        "refused (--require-client-cert)",
                        listen=description,
                    )
        log.info(
            "sentinel-reverse {version} (proxy id {proxy_id}) listening on {listen}; "
            "allowed agents: {allowed}; auth: {auth}; max {cap} connection(s) per agent; "
            "handshake timeout {hs}s, request timeout {rt}s",
            version=__version__,
            proxy_id=config.proxy_id,
            listen=", ".join(self.options["listen"]),
            allowed=", ".join(config.allowed_agents.patterns) or "all",
            auth=("token file" if checker is not None else "token required")
            if config.require_auth
            else ("token file (optional)" if checker is not None else "off"),
            cap=config.max_connections_per_agent,
            hs=config.handshake_timeout,
            rt=config.request_timeout,
        )
        try:
            super().startService()  # type: ignore[no-untyped-call]
        except Exception as e:
            self._abandon_start(e)

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting (every endpoint, the gateway's too), give requests in
        flight the shutdown grace period, cancel the rest, close the agents'
        connections.
        """
        grace = self.options.get("shutdown-grace", DEFAULT_SHUTDOWN_GRACE)
        clock = self.factory.clock
        began = clock.seconds()
        # The gateway's requests get the grace period while its service
        # stops; the agents' requests share the same period.
        stopping: Deferred[Any] = super().stopService()  # type: ignore[no-untyped-call]
        finished: Deferred[None] = stopping.addCallback(
            lambda _: shut_down_agents(self.factory.pool, clock, grace, started=began)
        )
        # Answers written meanwhile (the gateway's 503s for cancelled
        # requests) reach their clients before the reactor drops every
        # connection.
        finished.addCallback(lambda _: written_out(clock, CLOSE_TIMEOUT))

        def clean(_: None) -> None:
            self.stopped_cleanly = True

        finished.addCallback(clean)
        return finished

    stopped_cleanly = False


def shut_down_agents(
    pool: AgentPool,
    clock: IReactorTime,
    grace: float,
    close_timeout: float = CLOSE_TIMEOUT,
    started: float | None = None,
) -> Deferred[None]:
    """
    End every agent connection of C{pool} without leaving a request
    without an outcome or a frame half-written.

      1. Requests in flight get up to C{grace} seconds to be answered.
      2. Those still waiting are cancelled: the agent is sent a Cancel
         (reason 4, proxy shutdown) and the caller gets the cancellation.
      3. Every connection is closed after what is buffered for it has been
         written (an agent that has stopped reading is dropped instead);
         the Deferred fires when all are gone, or after C{close_timeout}
         seconds at the latest, so that a stuck agent cannot hold up the
         shutdown.
    """
    done: Deferred[None] = Deferred()
    if started is None:
        # The grace period counts from now (else from when stopping began).
        started = clock.seconds()
    in_flight = pool.in_flight
    if in_flight and grace > 0:
        log.info(
            "Shutting down: waiting up to {grace}s for {count} request(s) in flight",
            grace=grace,
            count=in_flight,
        )

    def wait() -> None:
        if pool.in_flight and clock.seconds() - started < grace:
            clock.callLater(min(0.05, grace), wait)
            return
        cancelled = pool.cancel_all(m.CancelReason.PROXY_SHUTDOWN)
        if cancelled:
            log.warn(
                "Shutting down: cancelled {count} request(s) still in flight after {grace}s",
                count=cancelled,
                grace=grace,
            )
        close()

    def close() -> None:
        connections = pool.connections()
        if not connections:
            done.callback(None)
            return
        log.info("Shutting down: closing {count} agent connection(s)", count=len(connections))
        closes = [c.close("proxy shutting down", abort=c.is_write_blocked) for c in connections]
        closing = gatherResults(closes, consumeErrors=True)
        timer = clock.callLater(close_timeout, give_up, closes)

        def closed(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        closing.addBoth(closed)

    def give_up(closes: list[Deferred[None]]) -> None:
        log.warn(
            "Shutting down: {count} agent connection(s) still closing after {timeout}s; leaving them",
            count=sum(1 for d in closes if not d.called),
            timeout=close_timeout,
        )
        if not done.called:
            done.callback(None)

    wait()
    return done


def written_out(reactor: Any, timeout: float) -> Deferred[None]:
    """
    Fires once no connection of C{reactor} has data waiting to be written
    (or after C{timeout} seconds): at shutdown the reactor drops connections
    without flushing them.
    """
    done: Deferred[None] = Deferred()
    writers = getattr(reactor, "getWriters", None)
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if writers is None or not writers() or reactor.seconds() >= deadline:
            done.callback(None)
        else:
            reactor.callLater(0.01, check)

    check()
    return done


def load_token_checker(path: str | None) -> TokenFileChecker | None:
    """
    The token checker of C{--token-file}, or C{None} without one.

    @raise StartupError: the file is missing or malformed.
    """
    if not path:
        return None
    try:
        return TokenFileChecker(path)
    except TokenFileError as e:
        raise StartupError(f"--token-file: {e}") from None


def with_allow_file(config: ReverseConnectionConfig, path: str | None) -> ReverseConnectionConfig:
    """C{config} with the patterns of C{--allow-file} added to its allowlist."""
    if not path:
        return config
    try:
        patterns = read_allow_file(path)
    except AllowFileError as e:
        raise StartupError(f"--allow-file: {e}") from None
    return attrs.evolve(config, allowed_agents=(*config.allowed_agents.patterns, *patterns))


def load_client_cas(path: str | None) -> list[Any]:
    """The CA certificates of C{--client-ca} (none without it)."""
    if not path:
        return []
    try:
        return load_ca_certificates(path)
    except ValueError as e:
        raise StartupError(f"--client-ca: {e}") from None


def prepare_unix_socket(path: str, lock: bool = False) -> list[str]:
    """
    Check that C{path} can be bound; remove a stale socket left there by a
    dead process and, if the endpoint takes a lock (C{lock}), a stale lock
    beside it.  Returns what was removed, as log text.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise StartupError(f"cannot listen on {path}: directory {directory} does not exist")
    removed = []
    try:
        if clear_stale_unix_socket(path):
            removed.append(path)
        if lock:
            pid = clear_stale_lock(path)
            if pid is not None:
                removed.append(f"{path}.lock")
    except SocketInUse as e:
        raise StartupError(str(e)) from None
    return removed


def make_listener(options: Any, reactor: Any = None) -> ReverseListenerService:
    """
    The listener service for parsed L{Options}: reads the token file,
    parses the endpoints and clears stale UNIX sockets.

    @raise StartupError: if any of that fails.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    given = getattr(options, "given", {})
    checker = load_token_checker(options["token-file"])
    client_cas = load_client_cas(options.get("client-ca"))
    config = with_allow_file(options["config"], options.get("allow-file"))
    endpoints = []
    trusts = []
    for description in options["listen"]:
        try:
            endpoint = serverFromString(reactor, description)
            if client_cas and parse_description(description)[0][0] == "ssl":
                endpoint = verifying_server_endpoint(reactor, description, client_cas)
                # Its SwappableTrust: SIGHUP gives it the CAs anew.
                trusts.append(endpoint._sslContextFactory)
            endpoints.append((endpoint, description))
        except Exception as e:
            shown = given.get(description, description)
            raise StartupError(f"--listen {shown}: {describe_endpoint_error(e)}") from None
    stale_removed = []
    for description in options["listen"]:
        path = unix_socket_path(description)
        if path is not None:
            try:
                stale_removed.extend(prepare_unix_socket(path, lock=takes_lock(description)))
            except StartupError as e:
                raise StartupError(f"--listen {given.get(description, description)}: {e}") from None
    factory = ReverseConnectionFactory(config, token_checker=checker, clock=reactor)
    top = ReverseListenerService(factory, options, stale_removed)
    top.reloader = ConfigurationReloader(
        factory,
        token_file=options["token-file"],
        allow=options["allow"],
        allow_file=options.get("allow-file"),
        client_ca=options.get("client-ca"),
        trusts=trusts,
    )
    for endpoint, description in endpoints:
        listener = ListenerEndpointService(endpoint, description, factory, given.get(description))
        listener.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top


def add_forward_agents(top: ReverseListenerService, options: Any, reactor: Any = None) -> None:
    """
    Dial each C{--agent-endpoint} agent (forward mode) into the listener's
    pool: a L{DialledAgentService} per endpoint, with the listener's
    timeouts, limits and proxy id; stopping gives its requests the
    shutdown grace period.
    """
    from twisted.internet.endpoints import clientFromString

    if reactor is None:
        reactor = _default_reactor()
    factory = top.factory
    for agent_id, description in options.get("agent-endpoints", ()):
        try:
            endpoint = clientFromString(reactor, description)
        except Exception as e:
            raise StartupError(f"--agent-endpoint {agent_id}={description}: {describe_endpoint_error(e)}") from None
        DialledAgentService(
            endpoint,
            factory.pool,
            description=description,
            agent_id=agent_id,
            connections=options["agent-connections"],
            grace=options.get("shutdown-grace", DEFAULT_SHUTDOWN_GRACE),
            clock=reactor,
            config=factory.config,
            encodings=options["agent-encodings"],
            frame_budget=factory.frame_budget,
            log_limiter=factory.log_limiter,
        ).setServiceParent(top)  # type: ignore[no-untyped-call]


def add_gateway(top: ReverseListenerService, options: Any, reactor: Any = None) -> None:
    """
    Add the HTTP gateway and the status site (unless both are C{none}) to
    the listener service; they share its agent pool.
    """
    if options.get("gateway") is None or (options["http"] is None and options["status"] is None):
        return
    from .gateway.service import GatewayService
    from .status.health import Readiness

    given = getattr(options, "given", {})
    for name in ("http", "status"):
        description = options[name]
        if description is None:
            continue
        try:
            serverFromString(reactor if reactor is not None else _default_reactor(), description)
        except Exception as e:
            shown = given.get(description, description)
            raise StartupError(f"--{name} {shown}: {describe_endpoint_error(e)}") from None
    access_log = options.get("access-log")
    if access_log and options["http"] is not None:
        check_access_log(access_log)
    GatewayService(  # type: ignore[no-untyped-call]
        top.factory,
        options["gateway"],
        http=options["http"],
        status=options["status"],
        reactor=reactor,
        access_log=access_log,
        shutdown_grace=options.get("shutdown-grace", DEFAULT_SHUTDOWN_GRACE),
        readiness=Readiness(lambda: _listener_listens(top), options.get("ready-agents", ())),
    ).setServiceParent(top)


def _listener_listens(top: ReverseListenerService) -> bool:
    """Whether an agent listener endpoint of C{top} listens (for C{/healthz})."""
    return any(isinstance(c, ListenerEndpointService) and c.port is not None for c in top)


def check_access_log(path: str) -> None:
    """
    Make sure the access log can be appended to (creating it owner-only),
    so that a bad path is a start-up error naming the option rather than a
    failure of the HTTP listener.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise StartupError(f"--access-log {path}: {describe_listen_failure(e)}") from None
    os.close(fd)


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def makeService(options: Options) -> service.IService:
    """
    The twistd plugin's service: the agent listener, and the gateway and the
    status site unless switched off.  A start-up error exits with one line
    and status 1.
    """
    try:
        top = make_listener(options)
        add_forward_agents(top, options)
        add_gateway(top, options)
    except StartupError as e:
        # A plain message and exit status 1, not twistd's usage text or a
        # traceback: nothing is wrong with the command line.
        raise SystemExit(f"twistd sentinel-reverse: {e}") from None
    # Failures to listen come later, once twistd starts the service.
    report_startup_errors("sentinel-reverse", StartupError)
    twistd_options = getattr(options, "parent", None)
    top.log_startup_errors = twistd_options is not None and not twistd_options.get("nodaemon")
    reactor = _default_reactor()
    exit_zero_after_clean_sigterm(reactor, lambda: top.stopped_cleanly)
    if top.reloader is not None:
        install_sighup(reactor, top.reloader)
    reactor.callWhenRunning(_freeze_when_running)
    return top
