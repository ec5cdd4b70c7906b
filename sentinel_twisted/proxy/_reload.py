# -*- test-case-name: tests.test_reload -*-
"""
SIGHUP on C{twistd sentinel-reverse}: read the token file, the allowlist
file and the client CA again, without a restart.

Everything is read first; a file with an error leaves the whole
configuration in force and says so in one line.  Then the new settings
apply to new registrations, and the connections whose agent is no longer
allowed (or whose token is gone from the token file, or was changed in it)
are drained: no new request goes to them, those in flight get up to the
request timeout to be answered, then the connection is closed, with a log
line naming it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from .._peertext import peer_text
from ._identity import SwappableTrust, load_ca_certificates
from .auth import TokenFileChecker, TokenFileError
from .config import AgentAllowlist, AllowFileError, read_allow_file

if TYPE_CHECKING:
    from .connection import AgentConnection
    from .factory import ReverseConnectionFactory

__all__ = ["ConfigurationReloader", "install_sighup"]

log = Logger(namespace="sentinel_twisted.reload")

#: How often a draining connection is looked at, in seconds.
_DRAIN_POLL = 0.05


class ConfigurationReloader:
    """
    Reloads the files of a listener's configuration (L{reload}).

    @param allow: the C{--allow} patterns of the command line; the
        allowlist is those plus the C{allow_file}'s.
    @param trusts: the TLS options of the listeners that verify client
        certificates against C{client_ca}.
    """

    def __init__(
        self,
        factory: ReverseConnectionFactory,
        *,
        token_file: str | None = None,
        allow: Sequence[str] = (),
        allow_file: str | None = None,
        client_ca: str | None = None,
        trusts: Sequence[SwappableTrust] = (),
    ) -> None:
        self.factory = factory
        self.token_file = token_file
        self.allow = tuple(allow)
        self.allow_file = allow_file
        self.client_ca = client_ca
        self.trusts = list(trusts)
        #: Connections being drained, by connection id.
        self.draining: dict[str, Deferred[None]] = {}
        #: Called after each reload that succeeded with L{retired} (the
        #: gateway forgets the agents that are away and retired then), and
        #: again when a connection it drained of a retired agent is closed.
        self.reloaded: list[Callable[[Callable[[str], bool]], object]] = []

    def reload(self) -> bool:
        """
        Read the files again and apply them; C{False} (with one error line)
        if one of them has an error, leaving everything as it was.
        """
        try:
            checker = TokenFileChecker(self.token_file) if self.token_file else None
            patterns = self.allow + (read_allow_file(self.allow_file) if self.allow_file else ())
            cas = load_ca_certificates(self.client_ca) if self.client_ca else None
        except TokenFileError as e:
            return self._failed(f"--token-file: {e}")
        except AllowFileError as e:
            return self._failed(f"--allow-file: {e}")
        except ValueError as e:
            return self._failed(f"--client-ca: {e}")
        factory = self.factory
        if checker is not None:
            factory.token_checker = checker
            if checker.permission_warning:
                log.warn(
                    "{warning}; it holds secrets, make it owner-only (chmod 600)",
                    warning=checker.permission_warning,
                )
        allowlist = AgentAllowlist(patterns)
        factory.config = attrs.evolve(factory.config, allowed_agents=allowlist)
        if cas is not None:
            for trust in self.trusts:
                trust.set_ca_certificates(cas)
        leaving = []
        for connection in factory.pool.connections():
            why = self.refusal(connection)
            if why is not None and connection.connection_id not in self.draining:
                leaving.append((connection, why))
        log.info(
            "Reloaded the configuration: allowed agents: {allowed}; {tokens}{cas}; "
            "{count} connection(s) no longer allowed",
            allowed=", ".join(peer_text(p, 64) for p in allowlist.patterns) or "all",
            tokens=f"tokens from {self.token_file}" if checker is not None else "no token file",
            cas=f"; {len(cas)} client CA certificate(s)" if cas is not None else "",
            count=len(leaving),
        )
        for connection, why in leaving:
            self.drain(connection, why)
        for then in self.reloaded:
            then(self.retired)
        return True

    def _failed(self, problem: str) -> bool:
        log.error(
            "Reload failed, the configuration in force is unchanged: {problem}",
            problem=problem,
        )
        return False

    def retired(self, agent_id: str) -> bool:
        """
        Whether C{agent_id} can no longer register with the files in force:
        the allowlist no longer admits it, or tokens are required and the
        token file holds none for it.  An agent that merely restarts is
        not retired: a reload never makes the gateway stop waiting for it.
        """
        factory = self.factory
        if not factory.config.allowed_agents.allows(agent_id):
            return True
        checker = factory.token_checker
        return (
            factory.config.require_auth
            and isinstance(checker, TokenFileChecker)
            and not checker.has_agent(agent_id)
        )

    def refusal(self, connection: AgentConnection) -> str | None:
        """Why C{connection} may no longer stay, or C{None} if it may."""
        factory = self.factory
        agent_id = connection.agent_id
        if not factory.config.allowed_agents.allows(agent_id):
            return "the agent is no longer allowed (allowlist)"
        checker = factory.token_checker
        if connection.token_verified and isinstance(checker, TokenFileChecker):
            if not checker.has_agent(agent_id):
                return "the agent's token is gone from the token file"
            digest = connection.token_digest
            if digest is not None and not checker.holds_token(agent_id, digest):
                return "the token it registered with is no longer in the token file"
        return None

    def drain(self, connection: AgentConnection, why: str) -> Deferred[None]:
        """
        Send C{connection} nothing new; close it once its requests in flight
        are answered, or after the request timeout.  Fires when closed.
        """
        clock = self.factory.clock
        log.warn(
            "Closing connection {connection_id} of agent {agent_id} after its "
            "{in_flight} request(s) in flight: {why}",
            in_flight=connection.in_flight,
            why=why,
            **connection.log_fields(),
        )
        connection.mark_closing(why)
        done: Deferred[None] = Deferred()
        connection_id = connection.connection_id
        self.draining[connection_id] = done
        deadline = clock.seconds() + connection.request_timeout

        def check() -> None:
            if connection.in_flight and clock.seconds() < deadline:
                clock.callLater(_DRAIN_POLL, check)
                return
            closing = connection.close(why)

            def closed(_: object) -> None:
                self.draining.pop(connection_id, None)
                if self.retired(connection.agent_id):
                    # Its agent is away only now: the gateway forgets it
                    # now, as it does an agent the reload found away.
                    for then in self.reloaded:
                        then(self.retired)
                done.callback(None)

            closing.addBoth(closed)

        check()
        return done

    def drained(self) -> Deferred[Any]:
        """Fires once every connection being drained is closed."""
        if not self.draining:
            return succeed(None)
        return gatherResults(list(self.draining.values()))


def install_sighup(reactor: Any, reloader: ConfigurationReloader) -> None:
    """Once the reactor runs, SIGHUP calls C{reloader.reload} in the reactor thread."""

    def reload() -> None:
        log.info("Received SIGHUP, reloading the configuration files")
        reloader.reload()

    def on_sighup(signum: int, frame: object) -> None:
        # Nothing but a hand-over in a signal handler.
        reactor.callFromThread(reload)

    def install() -> None:
        signal.signal(signal.SIGHUP, on_sighup)

    reactor.callWhenRunning(install)
