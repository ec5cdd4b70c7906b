#!/usr/bin/env bash
# Reliability beyond the test suite, time-bounded (about a minute):
#  - fuzz the frame parser, the codec and both ends of a connection with
#    fresh random inputs for 40 s; a failing input is saved under
#    tests/reliability/fuzz_corpus/ (the suite replays that corpus) and
#    fails the step;
#  - a 15 s soak at half the measured peak with agents churning, which
#    fails if a request goes unaccounted for, descriptors are left open or
#    drift, or RSS keeps growing (python -m benchmarks.soak runs the
#    documented 10-minute version).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${CI_TMP:-build}"
mkdir -p "$OUT"

echo "-- fuzz (40 s)"
timeout 120 python -m tests.reliability.fuzz --seconds 40

echo "-- soak (15 s, with agents churning)"
if ! command -v "${CC:-cc}" >/dev/null 2>&1; then
    echo "soak: no C compiler (cc) to build benchmarks/agent.c" >&2
    exit 1
fi
timeout 120 python -m benchmarks.soak --duration 15 --peak-seconds 4 --warmup 5 \
    --sample-every 1 --churn-every 3 --check --json "$OUT/soak-ci.json" --log "$OUT/soak-ci.log"
echo "reliability: ok"
