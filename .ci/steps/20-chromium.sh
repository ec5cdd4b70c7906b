#!/usr/bin/env bash
# The gateway's status page is checked in headless Chromium (tests/gateway).
# Install Debian's chromium when it is missing; CI runs this step as root.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium
/usr/bin/chromium --version
