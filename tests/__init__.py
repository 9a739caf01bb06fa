"""The test suite. A package so that ``tests.helpers`` is imported by its name (pytest puts the
repo root on ``sys.path``: ``pythonpath`` in pyproject.toml)."""
