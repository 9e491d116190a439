"""The dashboard and the docs UI in a real browser, as a person uses them.

Jobs are submitted through the REST API, as a script would, and the pages must show them as
they happen, with nothing fetched from beyond this machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, Route, expect

from gateway.bus.contract import Subjects
from tests.browser.conftest import KEYS, Dashboard, screenshot
from tests.native.clients import hold, tiny

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 20_000


async def submit(url: str, workflow: dict[str, Any], key: str | None = None, **extra: Any) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        reply = await client.post("/workflow/submit", json={"workflow": workflow, **extra})
        assert reply.status_code == 202, reply.text
        job_id: str = reply.json()["job_id"]
        return job_id


async def result(url: str, job_id: str, key: str | None = None) -> dict[str, Any]:
    """The job's result once it has ended (the gateway waits for the end)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=40) as client:
        reply = await client.get(f"/workflow/result/{job_id}", params={"wait": 30})
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body


async def test_the_fleet_page_lists_every_server_with_its_health(
    dashboard: Dashboard, page: Page
) -> None:
    await page.goto(f"{dashboard.url}/")
    for server, gpu in (("gpu1", "4090"), ("gpu2", "3090")):
        row = page.locator(f"#servers tr[data-server='{server}']")
        await expect(row).to_have_attribute("data-status", "healthy", timeout=WAIT_MS)
        await expect(row).to_contain_text(f"gpu={gpu}")
        await expect(row).to_contain_text("node types")
    await expect(page.locator("#health")).to_have_text("system ok", timeout=WAIT_MS)
    await screenshot(page, "fleet")
    # Drain takes gpu2 out of service (idle, it is drained at once); Undrain puts it back.
    gpu2 = page.locator("#servers tr[data-server='gpu2']")
    await gpu2.locator("button[data-action='drain']").click()
    await expect(gpu2).to_have_attribute("data-draining", "true", timeout=WAIT_MS)
    await expect(gpu2.locator(".badge.drained")).to_be_visible()
    await expect(gpu2).to_contain_text("safe to stop")
    await gpu2.locator("button[data-action='undrain']").click()
    await expect(gpu2).to_have_attribute("data-draining", "false", timeout=WAIT_MS)


async def test_a_job_shows_live_on_the_queue_then_on_its_page_with_its_image(
    dashboard: Dashboard, page: Page
) -> None:
    await page.goto(f"{dashboard.url}/#/queue")
    await expect(page.locator("h1")).to_have_text("Queue")
    job_id = await submit(dashboard.url, tiny("dash"))
    # Not reloaded: the page learns of the job and of its end by itself.
    row = page.locator(f"tr[data-job='{job_id}']")
    await expect(row).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    await row.get_by_role("link", name=job_id).click()
    await expect(page.locator("#job-id")).to_have_text(job_id)
    image = page.locator("#outputs img")
    await expect(image).to_have_count(1, timeout=WAIT_MS)
    # Rendered: the browser decoded the PNG the job made.
    await page.wait_for_function(
        "() => { const i = document.querySelector('#outputs img');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=WAIT_MS,
    )
    timeline = page.locator("#timeline svg g.span")
    await expect(timeline.first).to_be_visible()
    labels = await timeline.all_text_contents()
    assert any(label.startswith("queued") for label in labels), labels
    assert any("succeeded" in label for label in labels), labels
    await expect(page.locator("#log tbody tr").last).to_contain_text("succeeded")
    await screenshot(page, "job")
    # Retry runs the same request again as a new job, and opens that job's page.
    await page.locator("button[data-action='retry']").click()
    await expect(page.locator("#job-id")).not_to_have_text(job_id, timeout=WAIT_MS)
    again = await page.locator("#job-id").inner_text()
    assert (await result(dashboard.url, again))["status"] == "succeeded"
    await expect(page.locator("#outputs img")).to_have_count(1, timeout=WAIT_MS)


async def test_the_queue_says_why_a_job_waits_and_its_cancel_buttons_cancel(
    dashboard: Dashboard, page: Page
) -> None:
    await page.goto(f"{dashboard.url}/#/queue")
    # gpu1 takes two jobs at once (its capacity): the third one pinned to it waits.
    running, bound, waiting = [
        # Each holds its server for over a minute: nothing ends before the test cancels it.
        await submit(dashboard.url, hold(f"dash-cancel-{n}", nodes=400), server="gpu1")
        for n in range(3)
    ]
    row = page.locator(f"tr[data-job='{running}']")
    await expect(row).to_have_attribute("data-status", "running", timeout=WAIT_MS)
    # Node by node: the node running now and how many are done, from the job's own events.
    await expect(row.locator("[data-node]")).to_contain_text("ImageBlur", timeout=WAIT_MS)
    pending = page.locator(f"tr[data-job='{waiting}']")
    await expect(pending).to_have_attribute("data-status", "queued", timeout=WAIT_MS)
    await expect(pending.locator(".reason")).to_contain_text(
        "every healthy server is full (2 of 2 slots busy)", timeout=WAIT_MS
    )
    await screenshot(page, "queue")
    for job_id in (waiting, running):
        job_row = page.locator(f"tr[data-job='{job_id}']")
        await job_row.locator("button[data-action='cancel']").click()
        await expect(job_row).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
        assert (await result(dashboard.url, job_id))["status"] == "cancelled"
    async with httpx.AsyncClient(base_url=dashboard.url) as client:
        assert (await client.post(f"/workflow/cancel/{bound}")).status_code in (200, 409)


async def test_the_sql_box_runs_a_saved_query_and_a_typed_one(
    dashboard: Dashboard, page: Page
) -> None:
    # A newcomer's first job: the sample, submitted from the queue page.
    await page.goto(f"{dashboard.url}/#/queue")
    await page.locator("#load-sample").click()
    await page.locator("#submit-workflow").click()
    job_link = page.locator("form a.mono")
    await expect(job_link).to_have_count(1, timeout=WAIT_MS)
    assert (await result(dashboard.url, await job_link.inner_text()))["status"] == "succeeded"
    await page.goto(f"{dashboard.url}/#/logs")
    await page.get_by_role("button", name="Jobs per hour").click()
    await expect(page.locator("#results th").first).to_have_text("hour", timeout=WAIT_MS)
    await expect(page.locator("#query-result svg.chart rect.bar").first).to_be_visible()
    assert (await page.locator("#csv").get_attribute("href") or "").startswith("blob:")
    await screenshot(page, "logs")
    await page.locator("#sql").fill("SELECT count(*) AS n FROM jobs WHERE status = 'succeeded'")
    await page.locator("#run").click()
    await expect(page.locator("#results th")).to_have_text(["n"], timeout=WAIT_MS)
    count = int(await page.locator("#results td").first.inner_text())
    assert count >= 1


async def test_with_keys_the_page_asks_for_one_and_a_user_sees_only_its_jobs(
    dashboard: Dashboard, page: Page
) -> None:
    url = dashboard.keyed_url
    mine = await submit(url, tiny("dash-alice"), KEYS["alice"])
    theirs = await submit(url, tiny("dash-bob"), KEYS["bob"])
    for job_id, key in ((mine, KEYS["alice"]), (theirs, KEYS["bob"])):
        await result(url, job_id, key)
    await page.goto(f"{url}/#/queue")
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible(timeout=WAIT_MS)
    await page.locator("#key-input").fill("not-a-key")
    await page.get_by_role("button", name="Use this key").click()
    await expect(page.locator("#key-error")).to_contain_text("refused", timeout=WAIT_MS)
    await page.locator("#key-input").fill(KEYS["alice"])
    await page.get_by_role("button", name="Use this key").click()
    await expect(dialog).to_be_hidden()
    await expect(page.locator(f"tr[data-job='{mine}']")).to_have_count(1, timeout=WAIT_MS)
    # One list answered both: Bob's job would be in it.
    await expect(page.locator(f"tr[data-job='{theirs}']")).to_have_count(0)
    await page.goto(f"{url}/#/job/{theirs}")
    await expect(page.locator("#page")).to_contain_text(f"No job {theirs}", timeout=WAIT_MS)
    # The fleet as a user key sees it: the servers, and nothing to change them with (the
    # gateway would refuse it: 403 admin_only).
    await page.goto(f"{url}/#/fleet")
    rows = page.locator("#servers tr[data-server]")
    await expect(rows.first).to_be_visible(timeout=WAIT_MS)
    servers = await rows.count()
    await expect(page.locator("#servers button")).to_have_count(0)
    await expect(page.get_by_role("button", name="Add server")).to_have_count(0)
    # An admin key is offered them.
    await page.locator("#key-button").click()
    await page.locator("#key-input").fill(KEYS["admin"])
    await page.get_by_role("button", name="Use this key").click()
    drain = page.locator("#servers button[data-action='drain']")
    await expect(drain).to_have_count(servers, timeout=WAIT_MS)
    await expect(page.locator("#servers button[data-action='remove']")).to_have_count(servers)
    await expect(page.get_by_role("button", name="Add server")).to_be_visible()


async def test_the_docs_page_renders_with_no_network(dashboard: Dashboard, page: Page) -> None:
    # The page fixture refuses (and fails the test on) any request beyond this machine.
    await page.goto(f"{dashboard.url}/schema/swagger")
    await expect(page.locator(".swagger-ui .opblock").first).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator(".swagger-ui #operations-tag-comfyui")).to_be_visible()
    await expect(page.locator(".swagger-ui .btn.authorize")).to_be_visible()
    await screenshot(page, "swagger")


async def test_events_no_longer_kept_the_job_page_tells_the_end_and_the_queue_reads_again(
    dashboard: Dashboard, page: Page
) -> None:
    """Last of the module: it drops every event the system has stored (as the EVENTS stream's
    retention would) and stops the log sink for a moment."""
    system = dashboard.system
    assert system.nc is not None
    client = httpx.AsyncClient(base_url=dashboard.url)
    # A job that waits for its drained server until it is cancelled: it ends at once.
    assert (await client.post("/servers/gpu2/drain")).status_code == 200
    asked, release = asyncio.Event(), asyncio.Event()

    async def held(route: Route) -> None:
        asked.set()
        await release.wait()
        await route.continue_()

    sink_stopped = False
    try:
        job_id = await submit(dashboard.url, tiny("dash-gone"), server="gpu2")
        # The page's stream of the job is let through only once the job's events are gone.
        await page.route(f"**/workflow/events/{job_id}", held)
        await page.goto(f"{dashboard.url}/#/job/{job_id}")
        async with asyncio.timeout(WAIT_MS / 1000):
            await asked.wait()
        assert (await client.post(f"/workflow/cancel/{job_id}")).status_code == 200
        assert (await result(dashboard.url, job_id))["status"] == "cancelled"
        # Its events gone and its log unreadable: its stream tells the end as `expired`.
        await system.stop_log_sink()
        sink_stopped = True
        await system.nc.jetstream().purge_stream(Subjects().events_stream)
        release.set()
        await expect(page.locator("h1 .badge")).to_have_text("cancelled", timeout=WAIT_MS)
        await expect(page.locator("#page")).to_contain_text("no longer keeps the events")
    finally:
        release.set()
        if sink_stopped:
            system.start_log_sink()
        await client.post("/servers/gpu2/undrain")
        await client.aclose()
    # The queue's fleet stream starts 30 s back: those events are gone, and it says `missed`.
    lists: list[str] = []
    page.on("request", lambda r: lists.append(r.url) if "/workflow/jobs" in r.url else None)
    await page.goto(f"{dashboard.url}/#/queue")
    await expect(page.locator("#page")).to_contain_text(
        "no longer kept: the job list was read again", timeout=WAIT_MS
    )
    assert len(lists) >= 2, lists  # the first reading, and the one after `missed`
