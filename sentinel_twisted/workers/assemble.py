# -*- test-case-name: tests.workers.test_group -*-
"""
The services of C{twistd sentinel-reverse --workers N}: L{make_group} for
the parent, L{make_worker} for each worker (started by the parent with
C{--worker-control}).
"""

from __future__ import annotations

import signal
import socket
from typing import Any

import msgspec
from twisted.application import service
from twisted.internet.error import CannotListenError

from ..endpoints import describe_listen_failure, parse_description
from ..proxy._reload import ConfigurationReloader
from ..services import (
    CLOSE_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
    ReverseListenerService,
    StartupError,
    _default_reactor,
    _listener_listens,
    add_forward_agents,
    add_gateway,
    check_access_log,
    check_upstream_ca,
    load_token_checker,
    make_listener,
    raise_file_limit,
    with_allow_file,
)
from ..status.resource import StatusSite, agents_document
from .child import (
    ReusePortEndpoint,
    WorkerConnectionFactory,
    WorkerControlService,
    reuse_port_socket,
)
from .parent import ControlService, HandOverFactory, WorkerGroup, log
from .processes import WorkerProcesses, worker_command
from .status import GroupStatusResource

__all__ = ["ReservedPort", "WorkerService", "exclusive_port_socket", "make_group", "make_worker"]

_encoder = msgspec.json.Encoder()


def _tcp_address(description: str) -> tuple[int, str, str, int]:
    """C{(family, interface, port text, backlog)} of a C{tcp:}/C{tcp6:} endpoint string."""
    args, kwargs = parse_description(description)
    family = socket.AF_INET6 if args[0] == "tcp6" else socket.AF_INET
    interface = kwargs.get("interface", "::" if family == socket.AF_INET6 else "")
    port = args[1] if len(args) > 1 else kwargs.get("port", "0")
    return family, interface, port, int(kwargs.get("backlog", 50))


def exclusive_port_socket(family: int, interface: str, port: int) -> socket.socket:
    """
    A TCP socket bound to C{port} for one group alone (not listening yet).

    It is bound without C{SO_REUSEPORT} first, so the bind fails while any
    socket holds the port, one bound with C{SO_REUSEPORT} too (another
    group's workers, of the same user): sharing it, the kernel would
    spread this group's clients over both proxies.  Then C{SO_REUSEPORT}
    is set, so that the group's own workers can bind it (Linux reads the
    flag of a bound socket when another binds).  On a kernel that reads
    it at bind time only, the socket is bound again with the flag (a
    moment in which another program could take the port).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bound = sock.getsockname()[1]
        try:
            reuse_port_socket(family, interface, bound).close()
        except OSError:
            sock.close()
            sock = reuse_port_socket(family, interface, bound)
    except BaseException:
        sock.close()
        raise
    return sock


class ReservedPort(service.Service):
    """
    Holds the gateway's port for the group: bound with C{SO_REUSEPORT} but
    not listening (so it takes no clients), it fixes the port number
    (C{tcp:0} included) and keeps other programs off it while workers
    restart.  A port that another program holds is refused (see
    L{exclusive_port_socket}), even one it shares with C{SO_REUSEPORT}.

    @ivar socket: the bound socket.
    @ivar port: the port number.
    @ivar description: the endpoint string the workers listen on.
    """

    def __init__(self, description: str) -> None:
        family, interface, port, backlog = _tcp_address(description)
        try:
            self.socket = exclusive_port_socket(family, interface, int(port))
        except OSError as e:
            failure = CannotListenError(interface, port, e)
            raise StartupError(f"--http {description}: {describe_listen_failure(failure)}") from None
        self.port = self.socket.getsockname()[1]
        address = f"interface={interface.replace(':', chr(92) + ':')}:" if interface else ""
        self.description = f"tcp{'6' if family == socket.AF_INET6 else ''}:{self.port}:{address}backlog={backlog}"

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.socket.close()


def make_group(options: Any, reactor: Any = None) -> ReverseListenerService:
    """
    The parent's services: the agent listener (registering in the group's
    name and handing connections over), the control socket, the worker
    processes, and the group's status site.
    """
    if reactor is None:
        reactor = _default_reactor()
    # Its workers read them: a file they cannot use stops the start here.
    check_upstream_ca(options["gateway"].upstream_ca)
    if options.get("access-log"):
        check_access_log(options["access-log"])
    top = make_listener(options, reactor, factory_type=HandOverFactory)
    factory = top.factory
    assert isinstance(factory, HandOverFactory)
    group = WorkerGroup(options["workers"], factory, reactor, options["gateway"].max_known_agents)
    if top.reloader is not None:
        top.reloader.reloaded.append(group.forget_absent)
        group.retired = top.reloader.retired
    top.group = group  # type: ignore[attr-defined]
    reserved = ReservedPort(options["http"])
    reserved.setServiceParent(top)  # type: ignore[no-untyped-call]
    # Started in this order: what can fail to listen comes before the
    # control socket's directory is made and the workers are started.
    if options["status"] is not None:
        from ..gateway.service import ListeningService

        resource = GroupStatusResource(group, lambda: _listener_listens(top), options.get("ready-agents", ()))
        site = StatusSite(resource, options["gateway"].status_hosts, reactor=reactor)  # type: ignore[arg-type]
        # In a collection of its own, as the gateway's is: a failure to listen names --status.
        status = service.MultiService()
        ListeningService(reactor, options["status"], site, "the status page").setServiceParent(status)  # type: ignore[no-untyped-call]
        status.setServiceParent(top)
    control = ControlService(group, reactor)
    control.setServiceParent(top)  # type: ignore[no-untyped-call]
    grace = options.get("shutdown-grace", DEFAULT_SHUTDOWN_GRACE)
    worker_arguments = getattr(options, "worker_arguments", None)
    arguments = worker_arguments() if worker_arguments is not None else []
    processes = WorkerProcesses(
        group,
        lambda index: worker_command(arguments, index, control.path, reserved.description),
        reactor,
        stop_timeout=grace + CLOSE_TIMEOUT + 5.0,
    )
    processes.setServiceParent(top)  # type: ignore[no-untyped-call]
    top.processes = processes  # type: ignore[attr-defined]
    top.log_group = True  # type: ignore[attr-defined]
    reactor.callWhenRunning(
        log.info,
        "{count} workers serve the gateway on {http}; agent connections are spread over them",
        count=options["workers"],
        http=reserved.description,
    )
    _forward_sighup(reactor, processes)
    return top


def _forward_sighup(reactor: Any, processes: WorkerProcesses) -> None:
    """SIGHUP rereads the parent's files (see C{makeService}) and the workers'."""

    def install() -> None:
        previous = signal.getsignal(signal.SIGHUP)

        def on_sighup(signum: int, frame: Any) -> None:
            if callable(previous):
                previous(signum, frame)
            reactor.callFromThread(processes.reload)

        signal.signal(signal.SIGHUP, on_sighup)

    # After makeService's own handler is installed (callWhenRunning is in order).
    reactor.callWhenRunning(lambda: reactor.callLater(0, install))


class WorkerService(ReverseListenerService):
    """
    A worker's services: no listening endpoint (its agent connections come
    from the parent), the gateway on the shared port, the forward agents it
    dials itself and the control connection.
    """

    def startService(self) -> None:
        raise_file_limit()
        service.MultiService.startService(self)


def make_worker(options: Any, reactor: Any = None) -> ReverseListenerService:
    """The services of worker C{--worker-index} of the parent at C{--worker-control}."""
    if reactor is None:
        reactor = _default_reactor()
    config = with_allow_file(options["config"], options.get("allow-file"))
    factory = WorkerConnectionFactory(config, token_checker=load_token_checker(options["token-file"]), clock=reactor)
    top = WorkerService(factory, options)
    top.reloader = ConfigurationReloader(
        factory,
        token_file=options["token-file"],
        allow=options["allow"],
        allow_file=options.get("allow-file"),
        client_ca=None,
        trusts=[],
    )
    add_forward_agents(top, options, reactor)
    family, interface, port, backlog = _tcp_address(options["http"])
    endpoint = ReusePortEndpoint(reactor, int(port), interface, backlog)
    gateway = add_gateway(top, options, reactor, http_endpoint=endpoint)
    ready_agents = tuple(options.get("ready-agents", ()))
    # The HTTP listener starts when the control service says (see
    # WorkerControlService.serve_http), not with the gateway.
    http = gateway.http if gateway is not None else None
    serve_http = None
    consult = gateway.gateway.take_known_agents if gateway is not None else None
    if http is not None:
        http.disownServiceParent()

        def serve_http() -> None:
            http.setServiceParent(gateway)

    def snapshot() -> tuple[bytes, bytes, bool]:
        pool = factory.pool
        if gateway is None:
            return _encoder.encode(agents_document(pool)), b"", True
        document = agents_document(pool, gateway.describe(), gateway.metrics)
        ready = all(agent_id in pool and pool.connections(agent_id) for agent_id in ready_agents)
        return _encoder.encode(document), gateway.metrics.render(), ready

    WorkerControlService(
        options["worker-control"],
        options["worker-index"],
        factory,
        reactor,
        snapshot,
        top.reloader.drain,
        top.reloader.refusal,
        serve_http,
        consult,
    ).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top

