"""The live page in a real browser: headless Chromium (Playwright) against the real demo.

The demo runs as a subprocess (``python -m flowtrace.cli demo``), exporting its traces
to a real OTLP receiver. To make the server drop the page's WebSocket, the test calls
the demo-only ``POST /api/demo/drop-connections?hold=true`` (every client is closed
with 1012 and new handshakes are refused until ``POST /api/demo/accept-connections``),
so the page's fallback to polling can be watched before it goes live again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.support.otlp_receiver import OtlpReceiver
from tests.support.processes import REPO_ROOT, free_port
from tests.support.processes import test_env as process_env
from tests.support.waiting import wait_until

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TRACE_URL = "http://traces.example.test/trace/{trace_id}"
XSS_TEXT = '<img src=x onerror="window.__xss=1">'
TERMINAL = ("COMPLETED", "FAILED", "LOST")
WAIT_MS = 30_000

SNAPSHOT_JS = """row => [row.dataset.status,
    Array.from(row.querySelectorAll('[data-testid=step]')).map(step => step.dataset.status)]"""
ROWS_JS = """() => Array.from(document.querySelectorAll('[data-testid=run]'))
    .map(row => [row.dataset.runId, row.dataset.status])"""


@dataclass
class Demo:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path
    otlp: OtlpReceiver

    def get(self, path: str) -> Any:
        response = httpx.get(self.base + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str) -> Any:
        response = httpx.post(self.base + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    otlp = OtlpReceiver().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(prefix="flowtrace-demo-", suffix=".log",
                                     delete=False) as log:
        env = process_env(**otlp.env(service_name="flowtrace-demo"), FLOWTRACE_TRACE_URL=TRACE_URL)
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowtrace.cli", "demo", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    served = Demo(base, proc, Path(log.name), otlp)
    try:
        wait_until(lambda: proc.poll() is not None or _healthy(base), timeout=60,
                   message="the demo to answer /healthz")
        assert proc.poll() is None, f"the demo exited:\n{served.output()}"
        yield served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        otlp.stop()
        served.log.unlink(missing_ok=True)
    assert proc.returncode == 0, f"the demo did not stop cleanly ({proc.returncode})"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_ARGS)
        expect.set_options(timeout=WAIT_MS)  # a busy CI machine is slower than 5 s at times
        try:
            yield chromium
        finally:
            expect.set_options(timeout=5_000)
            chromium.close()


@dataclass
class LivePage:
    page: Page
    errors: list[str]

    @property
    def connection(self) -> Locator:
        return self.page.get_by_test_id("connection")

    def rows(self) -> list[tuple[str, str]]:
        """(run id, status) of every row, top to bottom."""
        return [(str(r[0]), str(r[1])) for r in self.page.evaluate(ROWS_JS)]

    def statuses(self) -> dict[str, str]:
        return dict(self.rows())

    def run(self, run_id: str) -> Locator:
        return self.page.locator(f'[data-testid=run][data-run-id="{run_id}"]')

    def first_id(self, selector: str) -> str:
        """The id of the first run row matching ``selector``, waiting for one."""
        row = self.page.locator(selector).first
        expect(row).to_be_attached(timeout=WAIT_MS)
        run_id = row.get_attribute("data-run-id")
        assert run_id
        return run_id

    def expand(self, run_id: str) -> Locator:
        row = self.run(run_id)
        # By keyboard: a mouse click lands on coordinates, and rows move down as new runs
        # arrive at the top. (The page keeps the toggle focused across re-renders.)
        row.get_by_test_id("run-toggle").press("Enter")
        expect(row.get_by_test_id("run-details")).to_be_visible()
        return row

    def assert_no_duplicates(self) -> None:
        ids = [run_id for run_id, _ in self.rows()]
        assert len(ids) == len(set(ids)), f"duplicated rows: {ids}"


@pytest.fixture
def live(browser: Browser, demo: Demo) -> Iterator[LivePage]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.goto(demo.base + "/")
    live_page = LivePage(page, errors)
    expect(live_page.connection).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    try:
        yield live_page
    finally:
        context.close()


def test_page_loads_cleanly_and_runs_progress_live(live: LivePage) -> None:
    page = live.page
    expect(page).to_have_title(re.compile("flowtrace"))
    seen: list[tuple[str, ...]] = []

    def snapshot(row: Locator) -> tuple[str, tuple[str, ...]]:
        """The run's status and its steps' statuses, read at one instant."""
        status, steps = row.evaluate(SNAPSHOT_JS)
        return str(status), tuple(steps)

    def caught_running() -> Locator | None:
        """An etl run expanded while it still has a step to go (else try the next one)."""
        row = live.expand(live.first_id(
            '[data-testid=run][data-name=etl][data-status=RUNNING]:not(.open)'))
        status, steps = snapshot(row)
        seen[:] = [steps]
        return row if status == "RUNNING" and ("PENDING" in steps or "RUNNING" in steps) \
            else None

    row = wait_until(caught_running, timeout=30, message="an etl run in progress")
    run_id = row.get_attribute("data-run-id")

    def finished() -> bool:
        status, steps = snapshot(row)
        if seen[-1] != steps:
            seen.append(steps)
        return status in TERMINAL

    wait_until(finished, timeout=30, interval=0.05, message=f"run {run_id} to finish")
    assert len(seen) >= 2, f"the steps never changed on the page: {seen}"
    assert not any(status in ("RUNNING", "RETRYING") for status in seen[-1]), seen
    started = [s for s in seen[-1] if s != "PENDING"]
    expect(row.get_by_test_id("timeline-bar")).to_have_count(len(started))
    # Still live: all of that came over the socket.
    expect(live.connection).to_have_attribute("data-state", "live")
    before = set(live.statuses())
    wait_until(lambda: set(live.statuses()) - before, timeout=30, message="a new run")
    live.assert_no_duplicates()
    assert live.errors == [], live.errors


def test_failed_run_is_marked_failed_with_its_error(live: LivePage) -> None:
    run_id = live.first_id('[data-testid=run][data-name=billing][data-status=FAILED]')
    row = live.run(run_id)
    expect(row.get_by_test_id("run-status")).to_have_text("failed")
    expect(row.get_by_test_id("run-error")).to_contain_text(
        "ValueError: card declined for invoice INV-")
    live.expand(run_id)
    failed_step = row.locator("[data-testid=step][data-status=FAILED]")
    expect(failed_step.get_by_test_id("step-name")).to_contain_text("charge_card")
    expect(row.get_by_test_id("details-error")).to_contain_text("insufficient funds")
    expect(row.locator("[data-testid=step][data-step-index='2']")).to_have_attribute(
        "data-status", "PENDING")


def test_map_step_progress_reaches_its_total(live: LivePage) -> None:
    run_id = live.first_id('[data-testid=run][data-name=thumbnails][data-status=RUNNING]')
    row = live.expand(run_id)
    progress = row.locator("[data-testid=step][data-step-index='1'] [data-testid=step-progress]")
    expect(progress).to_be_visible(timeout=WAIT_MS)
    seen: list[int] = []

    def done() -> bool:
        value, total = progress.get_attribute("data-done"), progress.get_attribute("data-total")
        assert value is not None and total is not None
        if not seen or seen[-1] != int(value):
            seen.append(int(value))
        return int(total) > 0 and int(value) == int(total)

    wait_until(done, timeout=30, interval=0.05, message="the map's progress to reach its total")
    total = int(progress.get_attribute("data-total") or 0)
    assert 40 <= total <= 60
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    expect(progress).to_contain_text(f"{total}/{total}")
    expect(row).to_have_attribute("data-status", "COMPLETED", timeout=WAIT_MS)


def test_a_retried_step_shows_retrying_then_succeeds(live: LivePage) -> None:
    # inventory's push_to_store fails its first attempt; the demo retries it 1.5 s later.
    run_id = live.first_id('[data-testid=run][data-name=inventory]:has(.dot.s-RETRYING)')
    row = live.expand(run_id)
    expect(row).to_have_attribute("data-status", "COMPLETED")
    pushed = row.locator("[data-testid=step][data-step-index='1']")
    expect(pushed).to_have_attribute("data-status", "COMPLETED")
    expect(pushed.get_by_test_id("step-attempt")).to_have_text("2")


def test_markup_in_errors_and_results_is_shown_as_text(live: LivePage) -> None:
    page = live.page
    failed = live.run(live.first_id(
        '[data-testid=run][data-name=signup][data-status=FAILED]'))
    expect(failed.get_by_test_id("run-error")).to_contain_text(XSS_TEXT)
    expect(failed.get_by_test_id("run-error")).to_be_visible()
    live.expand(str(failed.get_attribute("data-run-id")))
    expect(failed.get_by_test_id("details-error")).to_contain_text(XSS_TEXT)
    # Results come with events only (REST run state has none): one finishing live.
    result = page.locator("[data-testid=run][data-name=signup] [data-testid=run-result]")
    expect(result.filter(has_text="welcome").first).to_contain_text(
        "<b>welcome</b>, ", timeout=WAIT_MS)
    # Let the page render a few more live updates before looking for any effect.
    before = set(live.statuses())
    wait_until(lambda: set(live.statuses()) - before, timeout=30, message="a new run")
    assert page.locator("#runs img, #runs script, #runs b").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert live.errors == [], live.errors


def test_each_run_links_to_its_exported_trace(live: LivePage, demo: Demo) -> None:
    run_id = live.first_id('[data-testid=run][data-status=COMPLETED]')
    link = live.run(run_id).get_by_test_id("trace-link")
    expect(link).to_be_visible()
    trace_id = demo.get(f"/api/pipelines/{run_id}")["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert link.get_attribute("href") == TRACE_URL.format(trace_id=trace_id)
    assert link.get_attribute("rel") == "noopener noreferrer"
    demo.otlp.wait_for_spans(lambda spans: any(s.trace_id == trace_id for s in spans),
                             message=f"spans of trace {trace_id}")


def test_dropped_socket_falls_back_to_polling_then_resumes(live: LivePage, demo: Demo) -> None:
    detail = live.page.get_by_test_id("connection-detail")
    wait_until(lambda: len(live.rows()) >= 5, timeout=30, message="a few runs on the page")
    running_before = {i for i, status in live.rows() if status == "RUNNING"}

    dropped = demo.post("/api/demo/drop-connections?hold=true")
    assert dropped["dropped"] >= 1
    try:
        expect(live.connection).to_have_attribute("data-state", "polling", timeout=WAIT_MS)
        expect(detail).to_contain_text("1012")
        # Only polling can bring news now: wait for a run kicked after the drop.
        known = set(live.statuses())
        wait_until(lambda: set(live.statuses()) - known, timeout=30,
                   message="a new run while polling")
        expect(live.connection).to_have_attribute("data-state", "polling")
        live.assert_no_duplicates()
    finally:
        demo.post("/api/demo/accept-connections")

    expect(live.connection).to_have_attribute("data-state", "live", timeout=WAIT_MS)

    def matches_server() -> bool:
        server = {run["pipeline_id"]: run["status"]
                  for run in demo.get("/api/pipelines?limit=50")}
        page = live.statuses()
        return all(page.get(run_id) == status for run_id, status in server.items()
                   if status in TERMINAL) and all(
            page[run_id] in TERMINAL for run_id in running_before if run_id in page)

    wait_until(matches_server, timeout=30, interval=0.2,
               message="every finished run on the server, and every run running at the "
                       "drop, to show on the page with its final status")
    live.assert_no_duplicates()
    # Back on the socket, the page keeps updating live.
    later = set(live.statuses())
    wait_until(lambda: set(live.statuses()) - later, timeout=30, message="a new run, live")
    expect(live.connection).to_have_attribute("data-state", "live")
