"""The live page in headless Chromium against a gateway whose events the test publishes.

``create_app`` runs in a real uvicorn (on a thread); each test publishes the events it
needs into the gateway's in-memory transport, so a run stays running, is declared LOST
or vanishes with a restarted gateway exactly when the test wants. ``page.clock`` moves
the page's clock forward where a test must show that nothing changes with time.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Locator, Page, expect

from flowtrace.app import STATIC_DIR, create_app
from flowtrace.events import (
    BaseEvent,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepErrorEvent,
    StepStartEvent,
)
from flowtrace.transport.memory import InMemoryTransport
from tests.support.app_thread import AppServer
from tests.support.waiting import wait_until
from tests.test_page_browser import WAIT_MS, browser  # noqa: F401  (the fixture)

pytestmark = pytest.mark.browser

TOKEN = "Zm9v/YmFy+cXV4=="  # as `openssl rand -base64` makes them: "/", "+" and "="
COUNT_CALLS_JS = """
window.__calls = 0;
const pageFetch = window.fetch;
window.fetch = (...args) => { window.__calls += 1; return pageFetch(...args); };
window.WebSocket = class extends window.WebSocket {
  constructor(...args) { super(...args); window.__calls += 1; }
};
"""


@dataclass
class Gateway:
    server: AppServer
    transport: InMemoryTransport
    token: str | None

    def page_url(self) -> str:
        """The page, with the gateway's token URL-encoded (as docs/demo.md says)."""
        if self.token is None:
            return f"{self.server.url}/"
        return f"{self.server.url}/?token={quote(self.token, safe='')}"

    def publish(self, *events: BaseEvent) -> None:
        async def publish_all() -> None:
            for event in events:
                await self.transport.publish(event)

        self.server.call(publish_all)


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway() -> Iterator[GatewayFactory]:
    """``gateway(token=..., port=..., **create_app_kwargs)``: a started gateway."""
    started: list[Gateway] = []

    def start(token: str | None = None, port: int | None = None, **kwargs: Any) -> Gateway:
        transport = InMemoryTransport()
        server = AppServer(create_app(transport, token=token, **kwargs))
        if port is not None:  # the same address again: a restart
            server.port = port
            server.server = uvicorn.Server(uvicorn.Config(
                server.app, host=server.host, port=port, log_level="warning", lifespan="on"))
        started.append(Gateway(server.start(), transport, token))
        return started[-1]

    try:
        yield start
    finally:
        for served in started:
            served.server.stop()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:  # noqa: F811
    """``new_page(url, fake_clock=False, init_script=None)``: a page at ``url``.

    The page must raise no uncaught error. (Console errors are expected here: refused
    requests, a gateway that went away.)
    """
    contexts = []
    errors: list[str] = []

    def open_page(url: str, fake_clock: bool = False, init_script: str | None = None) -> Page:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        if fake_clock:
            page.clock.install()  # time flows as usual until the test moves it on
        if init_script:
            page.add_init_script(init_script)
        page.goto(url)
        return page

    try:
        yield open_page
    finally:
        for context in contexts:
            context.close()
    assert errors == []


def running(run_id: str, steps: tuple[str, ...] = ("extract", "load")) -> list[BaseEvent]:
    """A run whose first step has started (and is not heard of again)."""
    ids: dict[str, Any] = {"pipeline_id": run_id, "pipeline_name": "etl"}
    return [PipelineStartEvent(**ids, total_steps=len(steps), steps=list(steps)),
            StepStartEvent(**ids, step_name=steps[0], task_id=f"{run_id}-0")]


def completed(run_id: str) -> list[BaseEvent]:
    ids: dict[str, Any] = {"pipeline_id": run_id, "pipeline_name": "etl"}
    return [*running(run_id, ("extract",)),
            StepCompleteEvent(**ids, step_name="extract", task_id=f"{run_id}-0",
                              duration_ms=5.0),
            PipelineCompleteEvent(**ids, duration_ms=7.0)]


def row(page: Page, run_id: str) -> Locator:
    return page.locator(f'[data-testid=run][data-run-id="{run_id}"]')


def press_on(page: Page, target: Locator) -> None:
    """Press the mouse button on ``target`` (and keep it down)."""
    box = target.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
    page.mouse.down()


def live(page: Page) -> None:
    expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "live")


def test_a_base64_token_goes_live_encoded_or_pasted_as_is(
        gateway: GatewayFactory, new_page: Callable[..., Page]) -> None:
    served = gateway(token=TOKEN)
    served.publish(*completed("before"))
    for i, url in enumerate((served.page_url(), f"{served.server.url}/?token={TOKEN}")):
        page = new_page(url)
        live(page)  # not polling: the socket took the token
        expect(row(page, "before")).to_have_attribute("data-status", "COMPLETED")
        served.publish(*completed(f"after-{i}"))  # and it comes over the socket
        expect(row(page, f"after-{i}")).to_have_attribute("data-status", "COMPLETED")


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_without_the_right_token_the_page_says_so_and_stops_asking(
        gateway: GatewayFactory, new_page: Callable[..., Page], token: str | None) -> None:
    served = gateway(token=TOKEN)
    url = f"{served.server.url}/" + (f"?token={token}" if token else "")
    page = new_page(url, fake_clock=True, init_script=COUNT_CALLS_JS)
    connection = page.get_by_test_id("connection")
    expect(connection).to_have_attribute("data-state", "unauthorized")
    hint = "refused the token" if token else "needs a token"
    expect(page.get_by_test_id("connection-detail")).to_contain_text(hint)
    expect(page.get_by_test_id("connection-detail")).to_contain_text("/?token=")
    expect(page.get_by_test_id("empty")).to_contain_text(hint)
    asked = page.evaluate("window.__calls")
    page.clock.run_for(60_000)  # a minute of reconnect and poll timers, had any been set
    assert page.evaluate("window.__calls") == asked
    expect(connection).to_have_attribute("data-state", "unauthorized")


def live_row(gateway: GatewayFactory, new_page: Callable[..., Page], events: list[BaseEvent],
             status: str) -> tuple[Gateway, Page, Locator]:
    """A gateway with one run (``events``), and a live page showing it with ``status``."""
    served = gateway()
    served.publish(*events)
    page = new_page(served.page_url())
    live(page)
    shown = row(page, events[0].pipeline_id)
    expect(shown).to_have_attribute("data-status", status)
    return served, page, shown


def test_a_click_on_a_running_run_opens_it_though_it_re_renders(
        gateway: GatewayFactory, new_page: Callable[..., Page]) -> None:
    _, page, busy = live_row(gateway, new_page, running("busy"), "RUNNING")
    duration = busy.get_by_test_id("run-duration")
    press_on(page, busy.get_by_test_id("run-name"))
    pressed = duration.text_content()
    wait_until(lambda: duration.text_content() != pressed, timeout=10,
               message="the running row to re-render while the mouse is down")
    page.mouse.up()
    expect(busy.get_by_test_id("run-details")).to_be_visible()
    expect(busy.get_by_test_id("run-toggle")).to_have_attribute("aria-expanded", "true")


def test_a_click_lands_on_the_pressed_run_while_new_runs_arrive_above_it(
        gateway: GatewayFactory, new_page: Callable[..., Page]) -> None:
    served, page, pressed = live_row(gateway, new_page, completed("pressed"), "COMPLETED")
    press_on(page, pressed.get_by_test_id("run-name"))
    served.publish(*completed("newer"))  # its row goes above: under the mouse, at once
    expect(page.get_by_test_id("summary")).to_contain_text("2 recent runs")
    page.mouse.up()
    expect(pressed.get_by_test_id("run-details")).to_be_visible()
    expect(page.locator("[data-testid=run]").first).to_have_attribute("data-run-id", "newer")


def test_the_step_left_running_in_a_lost_run_stops_its_clock(
        gateway: GatewayFactory, new_page: Callable[..., Page]) -> None:
    served = gateway(stale_after=1.0)
    served.publish(*running("silent"))
    page = new_page(served.page_url(), fake_clock=True)
    silent = row(page, "silent")
    toggle = silent.get_by_test_id("run-toggle")
    toggle.press("Enter")
    expect(silent).to_have_attribute("data-status", "LOST")
    step = silent.locator("[data-testid=step][data-step-index='0']")
    expect(step).to_have_attribute("data-status", "RUNNING")  # as the gateway says
    duration = step.get_by_test_id("step-duration").text_content()
    assert duration
    page.clock.run_for(10_000)
    for expanded in ("false", "true"):  # closing and opening it renders it anew
        toggle.press("Enter")
        expect(toggle).to_have_attribute("aria-expanded", expanded)
    expect(step.get_by_test_id("step-duration")).to_have_text(duration)


@pytest.mark.parametrize("resumed", [True, False], ids=["since-last-event", "no-event-seen"])
def test_after_a_gateway_restart_the_list_is_the_new_gateways(
        gateway: GatewayFactory, new_page: Callable[..., Page], resumed: bool) -> None:
    first = gateway()
    first.publish(*running("was-running"))
    page = new_page(first.page_url())
    live(page)
    expect(row(page, "was-running")).to_have_attribute("data-status", "RUNNING")
    if resumed:  # the page then reconnects with since=<this event's id>
        first.publish(*completed("was-done"))
        expect(row(page, "was-done")).to_have_attribute("data-status", "COMPLETED")

    first.server.stop()
    expect(page.get_by_test_id("connection")).not_to_have_attribute("data-state", "live")
    second = gateway(port=first.server.port)
    second.publish(*completed("new"))
    live(page)
    expect(row(page, "new")).to_have_attribute("data-status", "COMPLETED")
    expect(page.locator("[data-testid=run]")).to_have_count(1)  # the others are gone
    expect(page.get_by_test_id("summary")).to_contain_text("1 recent runs")


def test_page_and_static_files_are_revalidated_after_an_upgrade(
        gateway: GatewayFactory, new_page: Callable[..., Page], tmp_path: Path) -> None:
    static = tmp_path / "static"
    shutil.copytree(STATIC_DIR, static)
    month_ago = time.time() - 30 * 86_400  # without Cache-Control: heuristically fresh for days
    for file in static.iterdir():
        os.utime(file, (month_ago, month_ago))
    served = gateway(static_dir=static)
    page = new_page(served.page_url())
    live(page)
    with (static / "app.js").open("a") as script:
        script.write("\nwindow.__upgraded = true;\n")
    page.goto(served.page_url())  # the same browser, its cache warm
    live(page)
    assert page.evaluate("window.__upgraded") is True

    for path in ("/", "/static/app.js", "/static/style.css"):
        response = httpx.get(served.server.url + path, timeout=10)
        assert response.headers["cache-control"] == "no-cache", path
    etag = httpx.get(served.server.url + "/static/app.js", timeout=10).headers["etag"]
    again = httpx.get(served.server.url + "/static/app.js", headers={"If-None-Match": etag},
                      timeout=10)
    assert (again.status_code, again.headers["cache-control"]) == (304, "no-cache")


def test_results_and_step_errors_show_on_a_fresh_load(
        gateway: GatewayFactory, new_page: Callable[..., Page]) -> None:
    """What only events used to carry (the run's result, a failed step's error) is in the
    run state too, so a page opened after the runs ended shows them."""
    served = gateway()
    ids: dict[str, Any] = {"pipeline_id": "done", "pipeline_name": "etl"}
    served.publish(*completed("done")[:-1],
                   PipelineCompleteEvent(**ids, duration_ms=7.0, result={"rows": 42}))
    ids = {"pipeline_id": "broken", "pipeline_name": "etl"}
    served.publish(*running("broken", ("extract",)),
                   StepErrorEvent(**ids, step_name="extract", task_id="broken-0",
                                  error="ValueError: bad row", error_type="ValueError",
                                  duration_ms=3.0),
                   PipelineErrorEvent(**ids, error="ValueError: bad row",
                                      error_type="ValueError", failed_step="extract",
                                      failed_step_index=0, duration_ms=4.0))
    page = new_page(served.page_url())
    expect(row(page, "done").get_by_test_id("run-result")).to_have_text('{"rows":42}')
    broken = row(page, "broken")
    broken.get_by_test_id("run-toggle").press("Enter")
    expect(broken.locator("[data-testid=step] .step-error")).to_have_text("ValueError: bad row")
