"""Fixtures of the NVMe plugin tests (helpers live in ``_helpers.py``, ``_process_host.py``
and ``fakes.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from _helpers import Env, closed_at_teardown, make_env
from _process_host import ProcessHost
from test_migration_nvme import Host


@pytest.fixture
def nvme_env() -> Iterator[Callable[..., Env]]:
    """A factory of NVMe test environments, closed at teardown.

    Use: ``env = nvme_env("ns=mem:size=16M", io_queues=2)``.
    """
    yield from closed_at_teardown(make_env)


@pytest.fixture
def hosts() -> Iterator[Callable[..., Host]]:
    """A factory of in-process migration hosts (``test_migration_nvme.Host``), closed at
    teardown, last made first."""
    yield from closed_at_teardown(Host)


@pytest.fixture
def process_host() -> Iterator[Callable[..., ProcessHost]]:
    """A factory of hosts driving an NVMe controller in a device process
    (``_process_host.ProcessHost``: ``process_host(tmp_path, options, io_queues=2)``), closed
    and their processes stopped at teardown, last made first."""
    yield from closed_at_teardown(ProcessHost)
