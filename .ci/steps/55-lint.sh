# The tox lint and mypy environments' checks: ruff, then mypy --strict on
# the package (the tools in the CI venv, beside the test dependencies).
pip install -q 'ruff>=0.5' 'mypy>=1.10' 'mypy-zope>=1.0'
ruff check sentinel_twisted tests twisted benchmarks
mypy --strict sentinel_twisted
