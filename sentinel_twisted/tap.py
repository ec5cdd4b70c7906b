# -*- test-case-name: tests.test_tap -*-
"""
C{twistd sentinel-reverse}: accept reverse connections from policy agents.
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from . import __version__
from .auth import TokenFileChecker, TokenFileError
from .config import ReverseConnectionConfig
from .endpoints import SocketInUse, clear_stale_unix_socket, unix_socket_path, with_backlog
from .factory import ReverseConnectionFactory

__all__ = ["DEFAULT_LISTEN", "Options", "ReverseListenerService", "makeService"]

log = Logger(namespace="sentinel_twisted.tap")

#: A UNIX socket in the working directory, owner-only, with a lockfile.
DEFAULT_LISTEN = "unix:sentinel-reverse.sock:mode=600:lockfile=1"


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be positive")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


_positive_float.coerceDoc = "Seconds, a positive number."  # type: ignore[attr-defined]
_positive_int.coerceDoc = "A positive integer."  # type: ignore[attr-defined]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Listen for Sentinel policy agents that dial in (Agent Protocol v2 reverse "
        "connections), register them, and keep them in an agent pool."
    )

    optFlags = [
        ["require-auth", None, "Refuse agents that register without a token."],
    ]
    optParameters = [
        ["token-file", None, None, "File of 'AGENT_ID TOKEN' lines ('#' comments) used to verify tokens."],
        ["max-connections-per-agent", None, 4, "Registered connections one agent may hold.", _positive_int],
        ["handshake-timeout", None, 10.0, "Seconds a new connection has to register.", _positive_float],
        ["request-timeout", None, 30.0, "Seconds a request waits for the agent's answer.", _positive_float],
        ["proxy-id", None, "sentinel-proxy", "Proxy id sent to agents on registration."],
        ["backlog", None, 128, "Listen backlog for endpoints that do not set one.", _positive_int],
        ["max-pending-registrations", None, 1024, "Connections that may await registration at once.", _positive_int],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["allow"] = []

    def opt_listen(self, description: str) -> None:
        """Server endpoint string to listen on (repeatable). Default: """
        self["listen"].append(description)

    opt_listen.__doc__ = (
        "Server endpoint to listen on, e.g. unix:/run/sentinel.sock:mode=600:lockfile=1 "
        f"or tcp:7000:interface=127.0.0.1 (repeatable). [default: {DEFAULT_LISTEN}]"
    )

    def opt_allow(self, pattern: str) -> None:
        """Agent id or glob pattern (waf-*) allowed to register (repeatable). Default: all."""
        self["allow"].append(pattern)

    def opt_version(self) -> None:
        print(f"sentinel_twisted {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self["listen"] = [with_backlog(d, self["backlog"]) for d in self["listen"]]
        self["token-checker"] = None
        if self["token-file"]:
            try:
                self["token-checker"] = TokenFileChecker(self["token-file"])
            except TokenFileError as e:
                raise usage.UsageError(str(e)) from None
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
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        for description in self["listen"]:
            path = unix_socket_path(description)
            if path is None:
                continue
            try:
                if clear_stale_unix_socket(path):
                    self.setdefault("stale-removed", []).append(path)
            except SocketInUse as e:
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


class ReverseListenerService(service.MultiService):
    """The listener's endpoints plus its factory; logs the set-up on start."""

    def __init__(self, factory: ReverseConnectionFactory, options: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.factory = factory
        self.options = options

    def startService(self) -> None:
        config = self.factory.config
        raised = raise_file_limit()
        if raised is not None:
            log.info("Raised the open-file limit from {old} to {new}", old=raised[0], new=raised[1])
        for path in self.options.get("stale-removed", []):
            log.info("Removed stale socket {path} left by a process that is gone", path=path)
        checker = self.factory.token_checker
        warning = getattr(checker, "permission_warning", None)
        if warning:
            log.warn("{warning}; it holds secrets, make it owner-only (chmod 600)", warning=warning)
        if config.require_auth and checker is None:
            log.warn("--require-auth without --token-file: tokens are required but not verified")
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
        super().startService()  # type: ignore[no-untyped-call]


def make_listener(options: Any, reactor: Any = None) -> ReverseListenerService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    factory = ReverseConnectionFactory(
        options["config"], token_checker=options["token-checker"], clock=reactor
    )
    top = ReverseListenerService(factory, options)
    for description in options["listen"]:
        endpoint = serverFromString(reactor, description)
        svc = StreamServerEndpointService(endpoint, factory)
        # Fail the start-up (and twistd) when an endpoint cannot listen.
        svc._raiseSynchronously = True
        svc.setServiceParent(top)
    return top


def makeService(options: Options) -> service.IService:
    return make_listener(options)
