"""
The proxy side of the Sentinel Agent Protocol v2: the listener's policy
and registration for agents that dial in (reverse mode), the connections
the proxy dials to agents that listen (forward mode), and the pool that
holds both kinds and sends them events.
"""
