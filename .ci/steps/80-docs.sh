#!/usr/bin/env bash
# The API reference builds from the docstrings without a single warning
# (docs/build_apidocs.py runs pydoctor with --warnings-as-errors).
set -euo pipefail
python -m pip install -q 'pydoctor>=25.10'
rm -rf build/apidocs
python docs/build_apidocs.py build/apidocs
test -s build/apidocs/index.html
test -s build/apidocs/sentinel_twisted.proxy.pool.AgentPool.html
