import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.helpers.postgres import postgres_url
from tests.helpers.service import MODELS


@pytest.fixture
def make_client(tmp_path):
    """``make_client(models=..., **settings)``: a TestClient (lifespan running) on a fresh app;
    ``client.manager`` is its job manager."""
    opened = []

    def make(models=MODELS, **kw):
        kw.setdefault("batch_window_ms", 0)
        kw.setdefault("data_dir", tmp_path / f"var{len(opened)}")
        app = create_app(Settings(**kw), models)
        c = TestClient(app, raise_server_exceptions=False)
        c.__enter__()
        opened.append(c)
        c.manager = app.state.reconserve.jobs
        return c

    yield make
    for c in opened:
        c.manager.resume()
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL server's URL (tests/helpers/postgres.py); the test is skipped without one."""
    with postgres_url() as url:
        if url is None:
            pytest.skip("no PostgreSQL server here: install Debian's postgresql or set "
                        "RECONSERVE_TEST_DATABASE_URL")
        yield url
