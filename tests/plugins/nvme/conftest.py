"""Fixtures of the NVMe plugin tests (helpers live in ``_helpers.py`` and ``fakes.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from _helpers import Env, make_env
from test_migration_nvme import Host


@pytest.fixture
def nvme_env() -> Iterator[Callable[..., Env]]:
    """A factory of NVMe test environments, closed at teardown.

    Use: ``env = nvme_env("ns=mem:size=16M", io_queues=2)``.
    """
    made: list[Env] = []

    def factory(*args, **kwargs) -> Env:
        env = make_env(*args, **kwargs)
        made.append(env)
        return env

    yield factory
    for env in reversed(made):
        env.close()


@pytest.fixture
def hosts() -> Iterator[Callable[..., Host]]:
    """A factory of in-process migration hosts (``test_migration_nvme.Host``), closed at
    teardown, last made first."""
    made: list[Host] = []

    def make(*args, **kwargs) -> Host:
        h = Host(*args, **kwargs)
        made.append(h)
        return h

    yield make
    for h in reversed(made):
        h.close()
