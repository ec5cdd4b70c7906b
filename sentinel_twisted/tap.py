# -*- test-case-name: tests.test_tap -*-
"""
C{twistd sentinel-reverse}: accept reverse connections from policy agents.
"""

from __future__ import annotations

import math

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from ._twistd import (
    ProgramOptions,
    add_busy_poll,
    exit_zero_after_clean_sigterm,
    positive_int,
    report_startup_errors,
)
from .endpoints import (
    MAX_BACKLOG,
    check_endpoint_arguments,
    parse_description,
    system_max_backlog,
    with_backlog,
    with_owner_only_mode,
)
from .proxy._reload import install_sighup
from .proxy.config import ReverseConnectionConfig
from .proxy.dialled import encoding_list, parse_agent_endpoint
from .services import (
    CLOSE_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
    ListenerEndpointService,
    ReverseListenerService,
    StartupError,
    _default_reactor,
    _freeze_when_running,
    add_forward_agents,
    add_gateway,
    check_access_log,
    freeze_startup_heap,
    load_client_cas,
    load_token_checker,
    make_listener,
    prepare_unix_socket,
    raise_file_limit,
    shut_down_agents,
    with_allow_file,
    written_out,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_HTTP",
    "DEFAULT_LISTEN",
    "DEFAULT_SHUTDOWN_GRACE",
    "DEFAULT_STATUS",
    "ListenerEndpointService",
    "Options",
    "ReverseListenerService",
    "StartupError",
    "add_forward_agents",
    "add_gateway",
    "check_access_log",
    "freeze_startup_heap",
    "load_client_cas",
    "load_token_checker",
    "makeService",
    "make_listener",
    "prepare_unix_socket",
    "raise_file_limit",
    "shut_down_agents",
    "with_allow_file",
    "written_out",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.tap")

#: A UNIX socket in the working directory, owner-only, with a lockfile.
DEFAULT_LISTEN = "unix:sentinel-reverse.sock:mode=600:lockfile=1"
#: Where the gateway takes HTTP clients (C{--http}).
DEFAULT_HTTP = "tcp:8080:interface=127.0.0.1"
#: Where the status site is (C{--status}).
DEFAULT_STATUS = "tcp:9901:interface=127.0.0.1"
#: The longest agent id a worker group takes (C{--max-agent-id-length}):
#: its processes pass ids and connection ids as AMP values, at most 65,535
#: bytes each, and a connection id is its agent's id and about 30 more.
MAX_WORKER_AGENT_ID_LENGTH = 65_000
#: The most worker processes a group runs (C{--workers}): each is a whole
#: Python process, for one core.
MAX_WORKERS = 256
def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


#: The largest listen backlog: listen() takes a C int (the system caps it
#: at net.core.somaxconn anyway).
_MAX_BACKLOG = MAX_BACKLOG


def _backlog(value: str) -> int:
    number = positive_int(value)
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
    "max-connections-per-agent": positive_int,
    "handshake-timeout": _positive_float,
    "request-timeout": _positive_float,
    "backlog": _backlog,
    "max-pending-registrations": positive_int,
    "max-pending-registrations-per-peer": positive_int,
    "max-incomplete-frame-bytes": positive_int,
    "close-grace": _positive_float,
    "max-agent-id-length": positive_int,
    "max-metadata-size": positive_int,
    "upstream-timeout": _positive_float,
    "challenge-status": _client_error_status,
    "shutdown-grace": _seconds,
    "header-timeout": _positive_float,
    "max-client-connections": positive_int,
    "min-body-rate": positive_int,
    "send-timeout": _positive_float,
    "agent-connections": positive_int,
    "agent-encodings": encoding_list,
    "max-replaced-body-size": positive_int,
    "max-known-agents": positive_int,
    "workers": positive_int,
    "worker-index": positive_int,
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
    file_options = ("token-file", "upstream-ca", "access-log", "client-ca", "allow-file")
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
        [
            "allow-underscore-headers",
            None,
            "Keep request headers whose names have an underscore (X_User); by default they are "
            "dropped, since WSGI upstreams read them as X-User, out of the agents' rules' sight.",
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
            "max-pending-registrations-per-peer",
            None,
            64,
            "Connections (N) from one TCP/TLS peer address (IPv6: one /64) that may await "
            "registration at once; a newcomer beyond it closes the address's oldest idle one.",
        ],
        [
            "max-incomplete-frame-bytes",
            None,
            64 * 1024 * 1024,
            "Bytes (N) all agent connections may hold in unfinished frames; over it the "
            "connection holding the most is closed.",
        ],
        [
            "close-grace",
            None,
            5.0,
            "Seconds (a float) an agent connection the proxy closes (refused, drained, broken) "
            "has to be gone, its last frames sent and its TLS session shut down; then it is "
            "aborted.",
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
            "upstream-ca",
            None,
            None,
            "PEM file of the CA certificates an https --upstream's certificate must chain to, "
            "instead of the system's trusted CAs (read at start-up).",
        ],
        [
            "upstream-timeout",
            None,
            30.0,
            "Seconds (a float) to wait for the upstream's response headers before answering 504 "
            "(from the end of the request body: an upload may take longer), "
            "and the longest the upstream may then go quiet while the gateway reads its response "
            "body (the connection is aborted, the body cut short); time the gateway does not read "
            "(a slow client, agents behind) does not count.",
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
            "min-body-rate",
            None,
            1024,
            "Least average rate (N bytes/s) of an HTTP request body, counted from "
            "--header-timeout seconds after its head; a slower client gets 408.",
        ],
        [
            "send-timeout",
            None,
            30.0,
            "Seconds (a float) an HTTP client has to take the response bytes buffered for "
            "it (and a closing connection its last bytes); then the connection is cut.",
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
            "max-known-agents",
            None,
            None,
            "Agent ids (N) the gateway remembers without --agent: it consults each agent seen, "
            "connected or not; one that registers past the limit is consulted only while "
            "registered. [default: 1000]",
        ],
        [
            "client-ca",
            None,
            None,
            "PEM file of the CA certificate(s) that sign agents' client certificates "
            "(with --require-client-cert).",
        ],
        [
            "workers",
            None,
            1,
            "Worker processes (N) serving the gateway on a shared port (SO_REUSEPORT); this "
            "process keeps the agent listener and the status site and hands each registered "
            "agent connection to the worker holding fewest of that agent's (at most 256, and "
            "no more than --max-connections-per-agent).",
        ],
        ["worker-control", None, None, "(Internal: set by the parent for its workers.)"],
        ["worker-index", None, None, "(Internal: set by the parent for its workers.)"],
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
        #: The arguments as given (a worker group's workers get them too).
        self.arguments: list[str] = []
        self["listen"] = []
        self["allow"] = []
        self["agents"] = []
        self["status-hosts"] = []
        self["ready-agents"] = []
        self["agent-endpoints"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        import sys

        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def worker_arguments(self) -> list[str]:
        """
        The arguments for a worker process: those given, then the absolute
        name of each file option given, which the worker's own reading
        takes over the first (a worker starts in twistd's run directory).
        """
        files = [f"--{name}={self[name]}" for name in self.file_options if self[name]]
        return [*self.arguments, *files]

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
        [default: every agent seen, connected or not, in order of first
        registration; a reload (SIGHUP) that retires one (allowlist, token
        file) forgets it once it is away, and no other reload does]
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
                max_pending_registrations_per_peer=self["max-pending-registrations-per-peer"],
                max_incomplete_frame_bytes=self["max-incomplete-frame-bytes"],
                close_grace=self["close-grace"],
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
        self._worker_options()

    def _worker_options(self) -> None:
        if self["worker-control"] is not None or self["workers"] == 1:
            return
        workers, cap = self["workers"], self["max-connections-per-agent"]
        if workers > MAX_WORKERS:
            raise usage.UsageError(
                f"--workers {workers}: at most {MAX_WORKERS} (each worker is a process of its own, for one core)"
            )
        if workers > cap:
            # Each connection is in one worker: with fewer than one per
            # worker, some workers never hold an agent, and answer 503.
            raise usage.UsageError(
                f"--workers {workers}: --max-connections-per-agent {cap} lets an agent hold a connection "
                f"in {cap} worker(s) at most; the other {workers - cap} worker(s) could never consult it and would "
                f"answer their share of the requests 503 (or pass them, --fail-open); give "
                f"--max-connections-per-agent {workers} or more, and run agents with --connections {workers}"
            )
        for description in self["listen"]:
            if parse_description(description)[0][0] == "ssl":
                raise usage.UsageError(
                    f"--workers {self['workers']}: an ssl: --listen endpoint needs --workers 1 "
                    "(a TLS session cannot move to a worker process); use unix: or tcp: "
                    "behind a TLS terminator"
                )
        if self["max-agent-id-length"] > MAX_WORKER_AGENT_ID_LENGTH:
            raise usage.UsageError(
                f"--workers {self['workers']}: --max-agent-id-length {self['max-agent-id-length']} is "
                f"more than a worker group can pass between its processes (at most "
                f"{MAX_WORKER_AGENT_ID_LENGTH})"
            )
        http = self["http"]
        if http is None or parse_description(http)[0][0] not in ("tcp", "tcp6"):
            raise usage.UsageError(
                f"--workers {self['workers']}: the workers share the gateway's port, which "
                "needs a tcp: or tcp6: --http endpoint"
            )

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
        # A worker has no status site: its parent's /healthz asks it.
        if self["ready-agents"] and self["status"] is None and self["worker-control"] is None:
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
        from .gateway.known import MAX_KNOWN_AGENTS

        if self["max-known-agents"] is None:
            self["max-known-agents"] = MAX_KNOWN_AGENTS

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
                upstream_ca=self["upstream-ca"] or None,
                challenge_status=self["challenge-status"],
                header_timeout=self["header-timeout"],
                max_client_connections=self["max-client-connections"],
                min_body_rate=self["min-body-rate"],
                send_timeout=self["send-timeout"],
                status_hosts=self["status-hosts"],
                max_replaced_body_size=self["max-replaced-body-size"],
                allow_underscore_headers=bool(self["allow-underscore-headers"]),
                max_known_agents=self["max-known-agents"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> service.IService:
    """
    The twistd plugin's service: the agent listener, and the gateway and the
    status site unless switched off.  A start-up error exits with one line
    and status 1.
    """
    try:
        if options["worker-control"] is not None:
            from .workers.assemble import make_worker

            top = make_worker(options)
        elif options["workers"] > 1:
            from .workers.assemble import make_group

            top = make_group(options)
        else:
            top = make_listener(options)
            add_forward_agents(top, options)
            add_gateway(top, options)
        if options["workers"] == 1 or options["worker-control"] is not None:
            # A worker group's parent only registers agents: its workers,
            # given the same option, carry the requests.
            add_busy_poll(top, options["busy-poll"], "sentinel-reverse", _default_reactor())
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
