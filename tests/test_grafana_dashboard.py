"""
C{examples/grafana-dashboard.json}: every query names metrics that
C{twistd sentinel-reverse} exports, so that no panel stays empty after a
metric is renamed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana-dashboard.json"

#: PromQL words that are not metric names.
_PROMQL = frozenset(
    """
    sum min max avg count stddev stdvar topk bottomk quantile count_values group
    by without on ignoring group_left group_right and or unless bool offset
    rate irate increase delta idelta deriv histogram_quantile vector scalar abs
    clamp_min clamp_max label_replace absent time
    """.split()
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w.])\s*(\()?", text):
        word, call = match.groups()
        if call or word in _PROMQL or re.fullmatch(r"\d+e\d+", word):
            continue
        names.add(word)
    return names


def exported_names() -> set[str]:
    """Every sample name the program's /metrics has, each histogram observed once."""
    from sentinel_twisted.status.metrics import GatewayMetrics

    from ._proxy_support import Proxy

    proxy = Proxy()
    metrics = GatewayMetrics(proxy.pool, proxy.factory).attach()
    _, _, connection = proxy.register("waf")
    metrics.request_answered(connection, "c1", 0.01)
    metrics.request_decided("allow", 200, 0.02)
    metrics.upstream_responded("response", 0.01)
    metrics.agent_decided("waf", "allow")
    metrics.agent_failed("waf", "timeout")
    metrics.cancel_sent("waf", 1)
    metrics.fail_open_pass("waf", "timeout")
    metrics.upstream_failed("error")
    names = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        # Series that have no sample yet (no rejection so far) count too.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


class GrafanaDashboardTests(TestCase):
    def queries(self) -> list[tuple[str, str]]:
        dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        found = []
        for panel in dashboard["panels"]:
            for target in panel.get("targets", ()):
                found.append((panel["title"], target["expr"]))
        return found

    def test_every_query_names_an_exported_metric(self) -> None:
        exported = exported_names()
        queries = self.queries()
        self.assertGreater(len(queries), 10)
        for title, expr in queries:
            names = metric_names(expr)
            self.assertTrue(names, f"{title}: no metric in {expr!r}")
            for name in names:
                self.assertIn(name, exported, f"{title}: {name} is not exported ({expr})")

    def test_the_check_sees_a_misspelt_metric(self) -> None:
        names = metric_names(
            'histogram_quantile(0.99, sum by (le, agent) (rate(sentinel_agent_round_trip_second_bucket{agent="x"}[5m])))'
        )
        self.assertEqual(names, {"sentinel_agent_round_trip_second_bucket"})
        self.assertNotIn("sentinel_agent_round_trip_second_bucket", exported_names())

    def test_the_dashboard_covers_the_slo_metrics(self) -> None:
        used = set().union(*(metric_names(expr) for _, expr in self.queries()))
        for name in (
            "sentinel_gateway_request_duration_seconds_bucket",
            "sentinel_gateway_upstream_duration_seconds_bucket",
            "sentinel_agent_round_trip_seconds_bucket",
            "sentinel_gateway_requests_total",
            "process_cpu_seconds_total",
        ):
            self.assertIn(name, used)
