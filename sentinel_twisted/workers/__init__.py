"""
C{twistd sentinel-reverse --workers N}: one proxy as N worker processes.

A single Python process is one core.  With C{--workers N} the process that
twistd starts (the parent) keeps the agent listener and the status site,
and runs N workers, each a C{sentinel-reverse} of its own that serves the
HTTP gateway on the shared port (C{SO_REUSEPORT}: the kernel spreads
clients over the workers).

Agents register with the parent, so the allowlist, the tokens and the
per-agent connection cap hold for the whole group.  The parent hands each
registered connection (its socket, passed over a UNIX socket with
C{SCM_RIGHTS}) to the worker holding the fewest connections of that
agent: every worker holds a connection of every agent that has at least N
of them.  Without C{--agent}, the parent tells every worker each agent
the group has seen, and every worker consults all of them: one that holds
no connection of an agent answers C{503} (fail closed), never decides
without it.  Workers tell the parent when a connection ends; a worker that
dies is restarted, and its agents' connections are spread again as they
reconnect.

  - L{sentinel_twisted.workers.commands}: the AMP commands between parent
    and workers.
  - L{sentinel_twisted.workers.parent}: the parent's registrations and
    hand-over, and its control socket.
  - L{sentinel_twisted.workers.processes}: the worker processes (command
    line, restarts, log relay).
  - L{sentinel_twisted.workers.assemble}: the services of the parent and of
    a worker.
  - L{sentinel_twisted.workers.child}: a worker's end.
  - L{sentinel_twisted.workers.status}: the group's status site.
"""
