from twisted.application.service import ServiceMaker

sentinel_reverse = ServiceMaker(
    "sentinel-reverse",
    "sentinel_twisted.tap",
    "Sentinel HTTP gateway whose requests are decided by policy agents that dial in "
    "(Agent Protocol v2), with a status site",
    "sentinel-reverse",
)
