# -*- test-case-name: tests.workers.test_status -*-
"""
The status site of a worker group, served by the parent: C{/agents},
C{/metrics}, C{/healthz} and C{/} for the whole group, gathered from the
workers' snapshots at each request (one scrape: series labelled
C{worker="N"}, the parent's own C{worker="parent"}).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web import pages, server
from twisted.web.resource import Resource

from ..status._families import listener_families

if TYPE_CHECKING:
    from .parent import Worker, WorkerGroup

__all__ = ["GroupStatusResource", "group_document", "merge_metrics"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.workers")

#: What L{WorkerGroup.snapshots <sentinel_twisted.workers.parent.WorkerGroup.snapshots>}
#: gives: each worker and its snapshot (C{None}: it did not answer).
Snapshots = list[tuple["Worker", "dict[str, Any] | None"]]


def group_document(snapshots: Snapshots, gateway: dict[str, Any] | None = None) -> dict[str, Any]:
    """
    C{/agents} for the group: each agent's connections from every worker
    (each marked with its C{worker}), the agent's totals summed, and the
    workers themselves.
    """
    agents: dict[str, dict[str, Any]] = {}
    workers = []
    for worker, snapshot in snapshots:
        workers.append(
            {
                "worker": worker.index,
                "pid": worker.pid,
                "ready": snapshot is not None and bool(snapshot.get("ready")),
                "answering": snapshot is not None,
                "stopping": worker.stopping,
                "restarts": worker.restarts,
                "connections": worker.connections,
            }
        )
        if snapshot is None:
            continue
        document = json.loads(snapshot["agents"])
        if gateway is None:
            gateway = document.get("gateway")
        for agent in document.get("agents", ()):
            entry = agents.setdefault(
                agent["agent_id"],
                {
                    "agent_id": agent["agent_id"],
                    "in_flight": 0,
                    "paused_connections": 0,
                    "write_blocked_connections": 0,
                    "workers": {},
                    "connections": [],
                },
            )
            for key in ("in_flight", "paused_connections", "write_blocked_connections"):
                entry[key] += agent.get(key, 0)
            entry["workers"][str(worker.index)] = len(agent["connections"])
            for connection in agent["connections"]:
                entry["connections"].append({**connection, "worker": worker.index})
    result: dict[str, Any] = {"agents": list(agents.values()), "workers": workers}
    if gateway is not None:
        result["gateway"] = gateway
    return result


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_metrics(parts: Iterable[tuple[str, bytes]]) -> bytes:
    """
    One Prometheus text exposition of several: each part's series with a
    C{worker} label naming the part, families of the same name merged.
    """
    merged: dict[str, Metric] = {}
    for label, text in parts:
        try:
            families = list(text_string_to_metric_families(text.decode("utf-8")))
        except Exception as e:
            log.warn("Metrics of worker {worker} cannot be read: {error}", worker=label, error=str(e)[:200])
            continue
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            if target.type != family.type:
                continue
            for sample in family.samples:
                target.samples.append(sample._replace(labels={**sample.labels, "worker": label}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)


class _ParentCollector(Collector):
    """The parent's own series: registrations, refusals and its workers."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    def collect(self) -> Iterable[Metric]:
        yield from listener_families(self.group.factory)
        yield CounterMetricFamily(
            "sentinel_worker_handovers",
            "Registered agent connections handed to a worker.",
            value=self.group.handed_over,
        )
        up = GaugeMetricFamily("sentinel_worker_up", "1 when the worker is connected to the parent.", labels=["index"])
        restarts = CounterMetricFamily("sentinel_worker_restarts", "Times the worker was restarted.", labels=["index"])
        held = GaugeMetricFamily(
            "sentinel_worker_agent_connections", "Agent connections the worker holds.", labels=["index"]
        )
        for worker in self.group.workers:
            up.add_metric([str(worker.index)], 1 if worker.control is not None else 0)
            restarts.add_metric([str(worker.index)], worker.restarts)
            held.add_metric([str(worker.index)], worker.connections)
        yield up
        yield restarts
        yield held


class _Gathered(Resource):
    """A page made from the workers' snapshots, rendered once they are in."""

    isLeaf = True

    def __init__(self, status: GroupStatusResource, content_type: bytes, make: Callable[[Snapshots], tuple[int, bytes]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.status = status
        self.content_type = content_type
        self.make = make

    def render_GET(self, request: Any) -> Any:
        return self._render(request, head=False)

    def render_HEAD(self, request: Any) -> Any:
        return self._render(request, head=True)

    def _render(self, request: Any, head: bool) -> Any:
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)

        def write(snapshots: Snapshots) -> None:
            if finished:
                return
            code, body = self.make(snapshots)
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", self.content_type)
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if not head:
                request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("The group's status page failed", failure)
            if not finished:
                request.setResponseCode(500)
                request.finish()

        self.status.group.snapshots().addCallback(write).addErrback(failed)
        return server.NOT_DONE_YET


class GroupStatusResource(Resource):
    """
    The parent's status site root.

    @ivar group: the workers.
    @ivar listening: whether the agent listener listens.
    @ivar ready_agents: agents every worker must hold for C{/healthz}.
    @ivar registry: the parent's own metrics.
    """

    def __init__(self, group: WorkerGroup, listening: Callable[[], bool], ready_agents: Iterable[str] = ()) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.group = group
        self.listening = listening
        self.ready_agents = tuple(ready_agents)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ParentCollector(group))
        ProcessCollector(registry=self.registry)
        self.putChild(b"", _Gathered(self, b"text/html; charset=utf-8", self.page))
        self.putChild(b"agents", _Gathered(self, b"application/json", self.agents))
        self.putChild(b"metrics", _Gathered(self, CONTENT_TYPE_LATEST.encode("ascii"), self.metrics))
        self.putChild(b"healthz", _Gathered(self, b"application/json", self.healthz))

    def getChild(self, path: bytes, request: Any) -> Any:
        return pages.notFound()

    def agents(self, snapshots: Snapshots) -> tuple[int, bytes]:
        """C{/agents}: see L{group_document}."""
        return 200, json.dumps(group_document(snapshots)).encode("utf-8") + b"\n"

    def metrics(self, snapshots: Snapshots) -> tuple[int, bytes]:
        """C{/metrics}: the parent's series and every worker's, labelled by worker."""
        parts = [("parent", generate_latest(self.registry))]
        parts += [(str(w.index), s["metrics"]) for w, s in snapshots if s is not None]
        return 200, merge_metrics(parts)

    def healthz(self, snapshots: Snapshots) -> tuple[int, bytes]:
        """
        C{/healthz}: ready when the agent listener listens and every worker
        answers, holds every C{--ready-agent} (a worker without an agent
        would answer its share of the clients with 503) and is not stopping.
        """
        problems = []
        listening = bool(self.listening())
        if not listening:
            problems.append("the agent listener is not listening")
        workers = {}
        for worker, snapshot in snapshots:
            ready = snapshot is not None and bool(snapshot.get("ready"))
            workers[str(worker.index)] = ready
            if worker.stopping:
                # It drains and is handed no connection; restarted once it exits.
                problems.append(f"worker {worker.index} (pid {worker.pid}) is stopping")
            elif snapshot is None and worker.pid is not None:
                # Stopped (SIGSTOP) or hung: the heartbeats restart it in time.
                problems.append(f"worker {worker.index} (pid {worker.pid}) is not answering")
            elif snapshot is None:
                problems.append(f"worker {worker.index} is not running")
            elif not ready:
                problems.append(f"worker {worker.index} does not hold every --ready-agent")
        document = {"ready": not problems, "listening": listening, "workers": workers, "problems": problems}
        return (200 if not problems else 503), json.dumps(document).encode("utf-8") + b"\n"

    def page(self, snapshots: Snapshots) -> tuple[int, bytes]:
        """C{/}: the workers and the agents' connections per worker, for a person."""
        document = group_document(snapshots)
        rows = "".join(
            "<tr><td>{worker}</td><td>{pid}</td><td>{state}</td><td>{connections}</td><td>{restarts}</td></tr>".format(
                worker=w["worker"],
                pid=w["pid"] if w["pid"] is not None else "-",
                state="stopping" if w["stopping"] else "ready" if w["ready"] else (
                    "running" if w["answering"] else "not answering" if w["pid"] is not None else "down"
                ),
                connections=w["connections"],
                restarts=w["restarts"],
            )
            for w in document["workers"]
        )
        indexes = [str(w["worker"]) for w in document["workers"]]
        agent_rows = "".join(
            "<tr><td>{agent}</td>{cells}<td>{in_flight}</td></tr>".format(
                agent=html.escape(a["agent_id"]),
                cells="".join(f"<td>{a['workers'].get(i, 0)}</td>" for i in indexes),
                in_flight=a["in_flight"],
            )
            for a in document["agents"]
        )
        heads = "".join(f"<th>worker {i}</th>" for i in indexes)
        body = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='5'>"
            "<title>sentinel-reverse: worker group</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .8em;text-align:left}</style>"
            "</head><body><h1>sentinel-reverse: worker group</h1>"
            "<h2>Workers</h2><table><tr><th>worker</th><th>pid</th><th>state</th>"
            f"<th>agent connections</th><th>restarts</th></tr>{rows}</table>"
            f"<h2>Agents</h2><table><tr><th>agent</th>{heads}<th>in flight</th></tr>{agent_rows}</table>"
            "<p><a href='agents'>/agents</a> &middot; <a href='metrics'>/metrics</a> &middot; "
            "<a href='healthz'>/healthz</a></p></body></html>"
        )
        return 200, body.encode("utf-8")
