"""
The HTTP gateway of C{twistd sentinel-reverse}: a reverse proxy on
C{twisted.web} whose every request is decided by the registered agents.
"""

from .config import GatewayConfig
from .exchange import Exchange
from .resource import GatewayRequest, GatewayResource, GatewaySite
from .service import GatewayService
from .shared import Gateway

__all__ = [
    "Exchange",
    "Gateway",
    "GatewayConfig",
    "GatewayRequest",
    "GatewayResource",
    "GatewayService",
    "GatewaySite",
]
