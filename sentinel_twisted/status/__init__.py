"""
Status and metrics of the listener and gateway: C{/agents}, C{/metrics}
(Prometheus, own registry) and a small self-refreshing HTML page.
"""

from .metrics import GatewayMetrics
from .resource import StatusResource, StatusSite, agents_document

__all__ = ["GatewayMetrics", "StatusResource", "StatusSite", "agents_document"]
