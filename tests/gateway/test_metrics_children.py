"""
The gateway's per-request metrics keep their labelled series at hand (one
lookup per request), and that table is bounded whatever statuses come.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from sentinel_twisted.gateway.decisions import drop_hop_by_hop
from sentinel_twisted.status import metrics as metrics_module
from sentinel_twisted.status.metrics import GatewayMetrics

from .._proxy_support import Proxy


class RequestDecidedTests(SynchronousTestCase):
    def metrics(self) -> GatewayMetrics:
        proxy = Proxy()
        return GatewayMetrics(proxy.pool, proxy.factory, process=False)

    def test_counts_are_the_same_through_the_kept_series(self) -> None:
        metrics = self.metrics()
        for _ in range(3):
            metrics.request_decided("allow", 200, 0.0002)
        metrics.request_decided("block", 403, 0.002)
        metrics.request_decided("client_closed", 0, 1.0)
        snap = metrics.snapshot()
        self.assertEqual((snap.requests["allow"], snap.requests["block"], snap.requests["client_closed"]), (3, 1, 1))
        self.assertEqual(snap.code_classes, {"2xx": 3, "4xx": 1, "none": 1})
        self.assertEqual(snap.duration.count, 5)
        text = metrics.render().decode()
        self.assertIn('sentinel_gateway_request_duration_seconds_count{code_class="2xx",decision="allow"} 3.0', text)
        self.assertIn('sentinel_gateway_request_duration_seconds_bucket{code_class="2xx",decision="allow",le="0.00025"} 3.0', text)

    def test_the_kept_series_are_bounded(self) -> None:
        metrics = self.metrics()
        statuses = range(100, 100 + 2 * metrics_module._MAX_DECIDED)
        for status in statuses:
            metrics.request_decided("allow", status, 0.001)
        for status in statuses:
            metrics.request_decided("allow", status, 0.001)
        self.assertEqual(len(metrics._decided), metrics_module._MAX_DECIDED)
        self.assertEqual(metrics.snapshot().requests["allow"], 2 * len(statuses))
        self.assertEqual(metrics.snapshot().duration.count, 2 * len(statuses))

    def test_upstream_durations_by_outcome(self) -> None:
        metrics = self.metrics()
        metrics.upstream_responded("response", 0.001)
        metrics.upstream_responded("response", 0.001)
        metrics.upstream_responded("timeout", 30.0)
        self.assertEqual(metrics.snapshot().upstream.count, 3)
        text = metrics.render().decode()
        self.assertIn('sentinel_gateway_upstream_duration_seconds_count{outcome="response"} 2.0', text)
        self.assertIn('sentinel_gateway_upstream_duration_seconds_count{outcome="timeout"} 1.0', text)


class DropHopByHopTests(SynchronousTestCase):
    def test_names_to_leave_out_in_any_iterable(self) -> None:
        source = Headers({b"Host": [b"a"], b"Expect": [b"100-continue"], b"X-Kept": [b"1"]})
        for also in ((b"host", b"expect"), [b"host", b"expect"], iter([b"host", b"expect"]), frozenset([b"host", b"expect"])):
            self.assertEqual(dict(drop_hop_by_hop(source, also).getAllRawHeaders()), {b"X-Kept": [b"1"]})
        self.assertEqual(
            dict(drop_hop_by_hop(source).getAllRawHeaders()),
            {b"Host": [b"a"], b"Expect": [b"100-continue"], b"X-Kept": [b"1"]},
        )
