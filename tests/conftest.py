"""Shared fixtures: a real simulator on 127.0.0.1 and a client signed in to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from worker.enos.client import EnOSClient
from worker.model import Credentials
from worker.sim.simulator import Simulator, serve
from worker.sim.state import DEFAULT_ORG

APP_KEY = "5acb82e7-a11e-4300-9164-c8b20b638e8b"
APP_SECRET = "test-secret-9f1c2b7e"
ORG = DEFAULT_ORG


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp runs on asyncio only."""
    return "asyncio"


@pytest.fixture
def sim() -> Simulator:
    """A fresh simulator with 200 generated devices, 3 cached commands each, seed 7."""
    return Simulator(apps={APP_KEY: APP_SECRET}, devices=200, commands=3, seed=7)


@pytest.fixture
async def gateway(sim: Simulator) -> AsyncIterator[str]:
    """The simulator served over HTTP on 127.0.0.1; yields its base URL."""
    async with serve(sim) as url:
        yield url


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[EnOSClient]:
    """A client with the simulator's credentials and a short attempt timeout."""
    async with EnOSClient(gateway, Credentials(APP_KEY, APP_SECRET), timeout=2.0) as enos:
        yield enos
