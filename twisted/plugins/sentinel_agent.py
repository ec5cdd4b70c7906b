from twisted.application.service import ServiceMaker

sentinel_agent = ServiceMaker(
    "sentinel-agent",
    "sentinel_twisted.agent.tap",
    "A rule-based Sentinel policy agent that dials the proxy, or listens for it (Agent Protocol v2)",
    "sentinel-agent",
)
