import pytest
from shop.celery import app

# Tests run every task in the calling process, as a direct call would.
app.conf.task_always_eager = True


@pytest.fixture
def locks(configure_lock_backend):
    """The shop's locks in memory://, emptied for each test: the backend the tasks use."""
    return configure_lock_backend(app, "memory://")
