"""Session fixtures: the private system bus, real polkitd, real users.

Root-only fixtures skip without root; nothing here touches the machine's
real system bus (every client gets the private address).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import busenv


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture(scope="session")
def system_bus() -> Iterator[str]:
    _need_root()
    with busenv.private_system_bus() as address:
        yield address


@pytest.fixture(scope="session")
def polkitd_running(system_bus: str) -> Iterator[busenv.Polkitd]:
    with busenv.polkitd_on(system_bus) as pk:
        yield pk


@pytest.fixture(scope="session")
def bus_users() -> Iterator[busenv.TestUsers]:
    _need_root()
    with busenv.test_users() as users:
        yield users
