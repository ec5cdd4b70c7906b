from twisted.application.service import ServiceMaker

sentinel_agent = ServiceMaker(
    "sentinel-agent",
    "sentinel_twisted.agent.tap",
    "A rule-based Sentinel policy agent that dials the proxy (Agent Protocol v2)",
    "sentinel-agent",
)
