# The README's test command (run with the fresh venv first on PATH).
python -m pytest
