"""A Sentinel agent in a dozen lines: python examples/simple_agent.py [ENDPOINT]"""

import sys

from sentinel_twisted.agent import Agent, allow, block, run_agent


class NoAdmin(Agent):
    name = "no-admin"

    def on_request_headers(self, event):
        if event.uri.startswith("/admin"):
            return block(403, "No admin here").tag("admin")
        return allow().set_response_header("x-checked-by", self.name)


if __name__ == "__main__":
    run_agent(NoAdmin(), sys.argv[1] if len(sys.argv) > 1 else "unix:sentinel-reverse.sock", "no-admin")
