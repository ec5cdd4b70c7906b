"""
The deployments people copy: C{examples/kubernetes/} (the YAML parses, the
programs accept every option it gives them, and the names and ports of the
Deployments, Services, probes and volumes agree) and the systemd template
unit for several proxies on one host.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent.tap import Options as AgentOptions
from sentinel_twisted.endpoints import parse_description
from sentinel_twisted.proxy.config import AgentAllowlist
from sentinel_twisted.tap import Options as ReverseOptions

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "examples" / "kubernetes"
EXAMPLES = ROOT / "examples"


def load() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return documents


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def tcp_port(description: str) -> int:
    args, kwargs = parse_description(description)
    assert args[0] == "tcp", description
    return int(kwargs["port"] if "port" in kwargs else args[1])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Program:
    """One container of a Deployment running one of our twistd programs."""

    def __init__(self, deployment: dict[str, Any]) -> None:
        self.deployment = deployment
        self.pod = deployment["spec"]["template"]
        [self.container] = self.pod["spec"]["containers"]
        args = list(self.container["args"])
        env = {e["name"] for e in self.container.get("env", [])}
        self.undeclared = sorted(
            {v for a in args for v in re.findall(r"\$\((\w+)\)", a) if v not in env}
        )
        args = [re.sub(r"\$\((\w+)\)", r"\1-value", a) for a in args]
        self.name, self.args = args[0], args[1:]
        if self.name == "sentinel-reverse":
            self.options: Any = ReverseOptions()
        else:
            self.options = AgentOptions()
            # Its own checks read the rules and token files, which only the pod has.
            self.options.postOptions = self.options.convert_options
        self.options.parseOptions(self.args)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.pod["metadata"]["labels"])

    def port(self, name_or_number: str | int) -> int | None:
        if isinstance(name_or_number, int):
            return name_or_number
        for port in self.container.get("ports", []):
            if port.get("name") == name_or_number:
                return int(port["containerPort"])
        return None

    def files(self) -> list[str]:
        names = ("token-file", "auth-token-file", "rules")
        return [self.options[n] for n in names if n in self.options and self.options[n]]

    def mounted(self, path: str) -> bool:
        volumes = {v["name"] for v in self.pod["spec"].get("volumes", [])}
        return any(
            path.startswith(m["mountPath"].rstrip("/") + "/") and m["name"] in volumes
            for m in self.container.get("volumeMounts", [])
        )


def problems(documents: list[dict[str, Any]]) -> list[str]:
    """Everything that does not fit together in the manifests."""
    found: list[str] = []
    programs = [Program(d) for d in of_kind(documents, "Deployment")]
    proxies = [p for p in programs if p.name == "sentinel-reverse"]
    agents = [p for p in programs if p.name == "sentinel-agent"]
    if len(proxies) != 1 or not agents:
        return [f"expected one proxy and some agent Deployments, got {[p.name for p in programs]}"]
    [proxy] = proxies
    for program in programs:
        name = program.deployment["metadata"]["name"]
        if program.undeclared:
            found.append(f"{name}: $({', '.join(program.undeclared)}) is not in the container's env")
        if not matches(program.deployment["spec"]["selector"]["matchLabels"], program.labels):
            found.append(f"{name}: the selector does not match the pod's labels")
        for path in program.files():
            if not program.mounted(path):
                found.append(f"{name}: {path} is on no mounted volume")
    images = {p.container["image"] for p in programs}
    built = re.findall(r"docker build .* -t (\S+) ", (KUBERNETES / "Dockerfile").read_text(encoding="utf-8"))
    if len(images) != 1 or set(built) != images:
        found.append(f"images {sorted(images)} are not the one the Dockerfile builds ({built})")

    options = proxy.options
    listen_port = tcp_port(options["listen"][0])
    http_port = tcp_port(options["http"])
    status_port = tcp_port(options["status"])
    for port_name, port in (("agents", listen_port), ("http", http_port), ("status", status_port)):
        if proxy.port(port_name) != port:
            found.append(f"proxy: container port {port_name} is not {port}, where the program listens")
    probe = proxy.container.get("readinessProbe", {}).get("httpGet", {})
    if probe.get("path") != "/healthz" or proxy.port(probe.get("port", "")) != status_port:
        found.append(f"proxy: the readiness probe {probe} is not /healthz on the status port {status_port}")
    live = proxy.container.get("livenessProbe", {})
    live_port = (live.get("tcpSocket") or live.get("httpGet") or {}).get("port", "")
    if proxy.port(live_port) is None:
        found.append(f"proxy: the liveness probe's port {live_port!r} is not a container port")

    services = of_kind(documents, "Service")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    balanced = [s for s in services if s["spec"].get("clusterIP") != "None"]
    if len(headless) != 1 or len(balanced) != 1:
        return [*found, "expected one headless Service for agents and one for HTTP"]
    for service, port, what in ((balanced[0], http_port, "HTTP"), (headless[0], listen_port, "agents")):
        name = service["metadata"]["name"]
        if not matches(service["spec"]["selector"], proxy.labels):
            found.append(f"Service {name}: its selector does not pick the proxy pods")
        [service_port] = service["spec"]["ports"]
        if proxy.port(service_port.get("targetPort", service_port["port"])) != port:
            found.append(f"Service {name}: targetPort is not the {what} port {port}")
    if headless[0]["spec"].get("publishNotReadyAddresses") is not True:
        found.append(
            "Service for agents: publishNotReadyAddresses must be true, or agents never find "
            "a proxy that is ready only once they have registered"
        )

    allow = AgentAllowlist.of(options["allow"])
    cap = options["max-connections-per-agent"]
    agent_ids = set()
    headless_name = headless[0]["metadata"]["name"]
    headless_port = headless[0]["spec"]["ports"][0]["port"]
    for agent in agents:
        name = agent.deployment["metadata"]["name"]
        agent_id = agent.options["agent-id"]
        agent_ids.add(agent_id)
        if not allow.allows(agent_id):
            found.append(f"{name}: --agent-id {agent_id} is not allowed by the proxy's --allow")
        for description in agent.options["connect"]:
            args, kwargs = parse_description(description)
            host = kwargs.get("host") or args[1]
            port = int(kwargs.get("port") or args[2])
            if host.split(".")[0] != headless_name or port != headless_port:
                found.append(f"{name}: --connect {description} is not the headless Service {headless_name}:{headless_port}")
        held = agent.deployment["spec"].get("replicas", 1) * agent.options["connections"]
        if held > cap:
            found.append(f"{name}: {held} connections per proxy, over --max-connections-per-agent {cap}")
    for agent_id in [*options["ready-agents"], *options["agents"]]:
        if agent_id not in agent_ids:
            found.append(f"proxy: agent {agent_id} is waited for or consulted but no Deployment runs it")

    for policy in of_kind(documents, "NetworkPolicy"):
        if not matches(policy["spec"]["podSelector"]["matchLabels"], proxy.labels):
            found.append("NetworkPolicy: it does not select the proxy pods")
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if proxy.port(port["port"]) is None:
                    found.append(f"NetworkPolicy: port {port['port']!r} is not a proxy container port")
            if any(proxy.port(p["port"]) == listen_port for p in rule.get("ports", [])):
                senders = [f["podSelector"]["matchLabels"] for f in rule.get("from", []) if "podSelector" in f]
                if not senders or not all(matches(s, agents[0].labels) for s in senders):
                    found.append("NetworkPolicy: the agent port is not open to the agent pods only")
    return found


class KubernetesExampleTests(SynchronousTestCase):
    def test_the_manifests_parse(self) -> None:
        documents = load()
        kinds = sorted(d["kind"] for d in documents)
        self.assertEqual(kinds, ["Deployment", "Deployment", "NetworkPolicy", "Service", "Service"])
        for document in documents:
            self.assertIn("apiVersion", document)
            self.assertIn("name", document["metadata"])

    def test_the_programs_accept_their_arguments(self) -> None:
        for deployment in of_kind(load(), "Deployment"):
            program = Program(deployment)  # raises on an unknown option or a bad value
            self.assertIn(program.name, ("sentinel-reverse", "sentinel-agent"))
            self.assertTrue(all(a.startswith("--") for a in program.args), program.args)

    def test_names_and_ports_agree(self) -> None:
        self.assertEqual(problems(load()), [])

    def test_the_check_finds_what_does_not_fit(self) -> None:
        documents = load()
        broken = copy.deepcopy(documents)
        [headless] = [d for d in broken if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
        headless["spec"]["ports"][0]["port"] = 7001
        del headless["spec"]["publishNotReadyAddresses"]
        found = "\n".join(problems(broken))
        self.assertIn("is not the headless Service sentinel-proxy-agents:7001", found)
        self.assertIn("publishNotReadyAddresses must be true", found)

        broken = copy.deepcopy(documents)
        [proxy] = [d for d in broken if d["metadata"]["name"] == "sentinel-proxy" and d["kind"] == "Deployment"]
        container = proxy["spec"]["template"]["spec"]["containers"][0]
        container["readinessProbe"]["httpGet"]["port"] = "http"
        container["volumeMounts"] = []
        container["args"] = [a.replace("--max-connections-per-agent=4", "--max-connections-per-agent=2") for a in container["args"]]
        found = "\n".join(problems(broken))
        self.assertIn("the readiness probe", found)
        self.assertIn("/etc/sentinel/tokens/agent-tokens is on no mounted volume", found)
        self.assertIn("4 connections per proxy, over --max-connections-per-agent 2", found)

    def test_an_unknown_option_is_refused(self) -> None:
        [deployment] = [d for d in load() if d["kind"] == "Deployment" and "sentinel-agent" in d["spec"]["template"]["spec"]["containers"][0]["args"]]
        deployment["spec"]["template"]["spec"]["containers"][0]["args"].append("--resolve-every=10")
        self.assertRaises(usage.UsageError, Program, deployment)


class SystemdTemplateTests(SynchronousTestCase):
    def test_the_agent_unit_dials_the_template_instances(self) -> None:
        template = (EXAMPLES / "sentinel-reverse@.service").read_text(encoding="utf-8")
        agent = (EXAMPLES / "sentinel-agent-scaled.service").read_text(encoding="utf-8")
        [listen] = re.findall(r"--listen (unix:\S+)", template)
        path = parse_description(listen)[0][1]
        self.assertIn("%i", path)
        connects = re.findall(r"--connect (unix:\S+)", agent)
        self.assertEqual(connects, [f"unix:{path.replace('%i', str(i))}" for i in (1, 2)])
        for i in (1, 2):
            self.assertIn(f"sentinel-reverse@{i}.service", agent)
        # One directory per instance, so that stopping one leaves the others' sockets.
        self.assertIn("RuntimeDirectory=sentinel-%i\n", template)
        self.assertTrue(path.startswith("/run/sentinel-%i/"))

    def test_every_unit_reloads_with_sighup(self) -> None:
        # Both programs reread their files on SIGHUP; `systemctl reload`
        # needs the unit to say how to send it.
        for unit in sorted(EXAMPLES.glob("*.service")):
            self.assertIn("\nExecReload=/bin/kill -HUP $MAINPID\n", unit.read_text(encoding="utf-8"), unit.name)
