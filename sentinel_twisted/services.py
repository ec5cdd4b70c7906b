# -*- test-case-name: tests.test_tap -*-
"""
The services of C{twistd sentinel-reverse}: the agent listener's endpoints,
the listener service (start-up, shutdown drain), the forward agents it
dials, the gateway and status site it adds, and the start-up checks.
L{sentinel_twisted.tap} assembles them from the command line; a worker
group (L{sentinel_twisted.workers}) assembles them its own way.
"""

from __future__ import annotations

import gc
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
from twisted.python.failure import Failure

from . import __version__
from . import messages as m
from ._twistd import StartupError, directory_problem
from .endpoints import (
    SocketInUse,
    clear_stale_lock,
    clear_stale_unix_socket,
    describe_endpoint_error,
    describe_listen_failure,
    parse_description,
    remove_abandoned_unix_socket,
    takes_lock,
    unix_socket_path,
)
from .proxy._identity import load_ca_certificates, verifying_server_endpoint
from .proxy._reload import ConfigurationReloader
from .proxy.auth import TokenFileChecker, TokenFileError
from .proxy.config import AllowFileError, ReverseConnectionConfig, read_allow_file
from .proxy.dialled import DialledAgentService
from .proxy.factory import ReverseConnectionFactory
from .proxy.pool import AgentPool

__all__ = ["CLOSE_TIMEOUT", "DEFAULT_SHUTDOWN_GRACE", "ListenerEndpointService", "ReverseListenerService", "StartupError", "YOUNG_THRESHOLD", "add_forward_agents", "add_gateway", "check_access_log", "check_upstream_ca", "freeze_startup_heap", "load_client_cas", "load_token_checker", "make_listener", "prepare_unix_socket", "raise_file_limit", "raise_young_threshold", "shut_down_agents", "with_allow_file", "written_out"]

#: The module's logger (the program's: its lines keep their namespace).
log = Logger(namespace="sentinel_twisted.tap")


#: Seconds requests in flight get to finish when the listener stops.
DEFAULT_SHUTDOWN_GRACE = 5.0
#: Seconds closing agent connections get to flush what is buffered.
CLOSE_TIMEOUT = 5.0


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


#: The young generation's threshold once the program runs (Python's
#: default: 700 allocations).
YOUNG_THRESHOLD = 10_000


def raise_young_threshold(threshold: int = YOUNG_THRESHOLD) -> tuple[int, int, int] | None:
    """
    Let the cyclic collector's youngest generation grow to C{threshold}
    allocations between collections (never lower than it is); returns the
    thresholds as they were, C{None} if nothing changed (already as high,
    or the collector is off).

    Each young collection walks every container still alive since the last
    one.  Requests that wait on agents across reactor turns keep a steady
    thousand or so of them alive (headers, their value lists, pending
    entries), so at Python's 700 a collection ran every few dozen requests
    and found next to nothing: with four agent events per request it cost
    the gateway about 5% of its requests/s (BENCHMARKS.md).  Requests leave
    no cyclic garbage (C{tests/gateway/test_garbage.py}), so what waits
    longer for the collector is little.
    """
    old = gc.get_threshold()
    if not gc.isenabled() or old[0] >= threshold:
        return None
    gc.set_threshold(threshold, *old[1:])
    return old


def _freeze_when_running() -> None:
    count = freeze_startup_heap()
    log.debug("Start-up heap frozen: {count} objects left out of garbage collection", count=count)
    old = raise_young_threshold()
    if old is not None:
        log.debug(
            "Young collections every {threshold} allocations (was {old})",
            threshold=YOUNG_THRESHOLD,
            old=old[0],
        )


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
    problem = directory_problem(directory)
    if problem is not None:
        raise StartupError(f"cannot listen on {path}: {problem}")
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


def make_listener(
    options: Any, reactor: Any = None, factory_type: type[ReverseConnectionFactory] = ReverseConnectionFactory
) -> ReverseListenerService:
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
    factory = factory_type(config, token_checker=checker, clock=reactor)
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


def add_gateway(
    top: ReverseListenerService, options: Any, reactor: Any = None, http_endpoint: Any = None
) -> Any:
    """
    Add the HTTP gateway and the status site (unless both are C{none}) to
    the listener service; they share its agent pool.

    @param http_endpoint: the gateway's endpoint, instead of one parsed
        from C{--http}.
    @return: the L{GatewayService
        <sentinel_twisted.gateway.service.GatewayService>}, C{None} without
        one.
    """
    if options.get("gateway") is None or (options["http"] is None and options["status"] is None):
        return None
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
    check_upstream_ca(options["gateway"].upstream_ca)
    gateway = GatewayService(
        top.factory,
        options["gateway"],
        http=options["http"],
        status=options["status"],
        reactor=reactor,
        access_log=access_log,
        shutdown_grace=options.get("shutdown-grace", DEFAULT_SHUTDOWN_GRACE),
        readiness=Readiness(lambda: _listener_listens(top), options.get("ready-agents", ())),
        http_endpoint=http_endpoint,
    )
    gateway.setServiceParent(top)  # type: ignore[no-untyped-call]
    # The agents it dials are never forgotten: it redials them as long as it runs.
    gateway.gateway.known.pinned = frozenset(a for a, _ in options.get("agent-endpoints", ()))
    if top.reloader is not None and options.get("worker-control") is None:
        # A worker's agents are its group's: its parent forgets them.
        top.reloader.reloaded.append(gateway.gateway.forget_absent_agents)
    return gateway


def _listener_listens(top: ReverseListenerService) -> bool:
    """Whether an agent listener endpoint of C{top} listens (for C{/healthz})."""
    return any(isinstance(c, ListenerEndpointService) and c.port is not None for c in top)


def check_upstream_ca(path: str | None) -> None:
    """
    Make sure C{--upstream-ca} can be read and holds a certificate, so that
    a bad file stops the start with one line, naming the option, before
    the gateway reads it: in the one process, or in a worker group's
    parent, which builds no gateway (its workers would only exit and be
    restarted, again and again).
    """
    if path is None:
        return
    from .gateway.upstream import upstream_trust_root

    try:
        upstream_trust_root(path)
    except ValueError as e:
        raise StartupError(f"--upstream-ca: {e}") from None


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
