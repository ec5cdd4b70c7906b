#!/usr/bin/env bash
# Smoke run of the benchmark harness (tiny sizes) so that it cannot rot.
# It fails if the harness breaks; it asserts no performance number.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The gateway section loads the gateway with wrk (Debian package) when it
# can be installed; without it that section reports itself as skipped.
if ! command -v wrk >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q wrk >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1; }) \
        || echo "bench smoke: could not install wrk; the gateway section will be skipped"
fi
timeout 120 python -m benchmarks.run --quick --json "${CI_TMP:-build}/bench-smoke.json" >"${CI_TMP:-build}/bench-smoke.txt"
grep -q '^| target | goal | measured | met |$' "${CI_TMP:-build}/bench-smoke.txt"
# How quiet the host was, checked between measurements (benchmarks/host.py).
grep -q '^host during roundtrip: steal ' "${CI_TMP:-build}/bench-smoke.txt"
# The reference section's options: busy polling as a fourth contender, pinned CPUs.
timeout 60 python -m benchmarks.run --quick --sections reference --levels 1 --busy-poll 50 --placement same \
    --json "${CI_TMP:-build}/bench-smoke-busy.json" >"${CI_TMP:-build}/bench-smoke-busy.txt"
if [ -x ../shared/peers/rust-proxy ] || [ -n "${SENTINEL_PEERS:-}" ]; then
    grep -q '^ours with --busy-poll 50 (same run)$' "${CI_TMP:-build}/bench-smoke-busy.txt"
fi
timeout 60 python -m benchmarks.micro --quick >"${CI_TMP:-build}/bench-micro.txt" 2>&1
echo "bench smoke: ok"
