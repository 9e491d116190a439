"""A real headless Chromium, driven by Playwright, against the real gateway and fake ComfyUIs.

The browser is Debian's `chromium` (`.ci/run` installs it); Playwright's own browser builds are
never downloaded. Without it the tests skip, except in CI (`CI=true`), where they fail.
One system and one browser serve the whole module; each test gets a fresh page whose requests
may go to this machine only: any other is refused and recorded, and the test fails on it.
`DASHBOARD_SCREENSHOTS=DIR` saves each page's screenshot into DIR (`docs/screenshots`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Route, async_playwright

from gateway.bus.natsserver import start_nats_server
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig
from tests.conftest import start_gateway
from tests.e2e.conftest import System, running_system
from tests.native.clients import HOLD_CLASS

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# What the machine's notes ask of a headless Chromium here: nothing reaches out by itself.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOLD_NODE_SECONDS = 0.2
KEYS = {"admin": "dash-admin-key", "alice": "dash-alice-key", "bob": "dash-bob-key"}
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


class Dashboard:
    """The running system (no keys, as on one machine) and a second gateway of it with keys."""

    def __init__(self, system: System, keyed_url: str, browser: Browser) -> None:
        self.system = system
        self.url = system.url
        self.keyed_url = keyed_url
        self.browser = browser


def chromium_path() -> str:
    """Debian's chromium, or a skip (a failure in CI) saying how to get it."""
    found = shutil.which(CHROMIUM) or (CHROMIUM if Path(CHROMIUM).is_file() else None)
    if found is None:
        why = f"no Chromium at {CHROMIUM}: `apt-get install chromium` (or set CHROMIUM=path)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dashboard(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Dashboard]:
    executable = chromium_path()
    base = tmp_path_factory.mktemp("dashboard")
    async with AsyncExitStack() as stack:
        nats = await start_nats_server(
            port=0, store_dir=base / "nats", log_file=base / "nats-server.log"
        )
        stack.push_async_callback(nats.stop)
        settings = Settings(nats_url=nats.url, data_dir=str(base / "data"), port=0)
        system = await stack.enter_async_context(running_system(settings))
        playwright = await stack.enter_async_context(async_playwright())
        # The browser starts while the fake servers register: each is slow on its own.
        launch = asyncio.create_task(
            playwright.chromium.launch(executable_path=executable, args=FLAGS)
        )
        async with asyncio.TaskGroup() as group:
            slow = SimulatorConfig(class_seconds={HOLD_CLASS: HOLD_NODE_SECONDS})
            group.create_task(system.add_server("gpu1", slow, labels={"gpu": "4090"}))
            group.create_task(system.add_server("gpu2", labels={"gpu": "3090"}))
        browser = await launch
        stack.push_async_callback(browser.close)
        keyed = msgspec.structs.replace(
            settings,
            api_keys=[
                f"admin/ops@plain:{KEYS['admin']}",
                f"user/alice@plain:{KEYS['alice']}",
                f"user/bob@plain:{KEYS['bob']}",
            ],
        )
        stop = asyncio.Event()
        keyed_url, keyed_task = await start_gateway(keyed, stop)

        async def stop_keyed() -> None:
            stop.set()
            async with asyncio.timeout(20):
                await keyed_task

        stack.push_async_callback(stop_keyed)
        yield Dashboard(system, keyed_url, browser)


@pytest_asyncio.fixture(loop_scope="module")
async def page(dashboard: Dashboard) -> AsyncIterator[Page]:
    """A fresh page (its own session storage) that may reach this machine only."""
    context = await dashboard.browser.new_context(viewport={"width": 1280, "height": 860})
    outside: list[str] = []

    async def only_here(route: Route) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in LOOPBACK:
            await route.continue_()
        else:
            outside.append(route.request.url)
            await route.abort()

    await context.route("**/*", only_here)
    errors: list[str] = []
    page = await context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        await context.close()
    assert not outside, f"the page tried to reach beyond this machine: {outside}"
    assert not errors, f"the page's scripts failed: {errors}"


async def screenshot(page: Page, name: str) -> None:
    """Save the page as docs' screenshot `name` when DASHBOARD_SCREENSHOTS names a folder."""
    folder = os.environ.get("DASHBOARD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
