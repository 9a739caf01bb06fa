"""What several test modules share: test models, requests and waits (``service``), a real
server process (``server``), a throwaway PostgreSQL (``postgres``). Fixtures built on them live
in ``tests/conftest.py`` and ``tests/service/conftest.py``."""
