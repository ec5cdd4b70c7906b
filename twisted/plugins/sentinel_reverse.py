from twisted.application.service import ServiceMaker

sentinel_reverse = ServiceMaker(
    "sentinel-reverse",
    "sentinel_twisted.tap",
    "Accept reverse connections from Sentinel policy agents (Agent Protocol v2)",
    "sentinel-reverse",
)
