"""Fixtures for the simulator tests: simulators on port 0, always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plugins.simulator import Simulator, SimulatorConfig, run_simulator


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    """A fresh, fast simulator with its folders under tmp_path."""
    async with run_simulator(SimulatorConfig(base_dir=str(tmp_path))) as simulator:
        yield simulator
