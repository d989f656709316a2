"""The pipelines ``flowtrace demo`` runs: a taskiq ``InMemoryBroker`` and a few pipelines.

Plain taskiq and taskiq-pipelines code: nothing here knows about flowtrace except
``flowtrace.Pipeline``, which only gives each pipeline a name. ``flowtrace.demo``
instruments :data:`broker` and calls :func:`next_round` over and over. It ships in the
package (not under ``examples/``) so that an installed ``flowtrace demo`` finds it.

- ``etl``: extract → transform → load, each step sleeping a little.
- ``thumbnails``: lists ~50 images and maps ``make_thumbnail`` over them (a progress bar).
- ``billing``: validate → charge → receipt; a declined card fails the charge step.
- ``inventory``: fetch → push; the push's first attempt fails and taskiq retries it
  :data:`RETRY_DELAY` seconds later (long enough to see the step retrying on the page).
- ``signup``: validate → create account; a username with markup fails validation, and
  the error message repeats what the user typed (``<img src=x onerror=...>``), which
  the live page must show as text.
- ``send_digest``: a plain task, kicked on its own (a one-step run of type ``task``).
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from taskiq import Context, InMemoryBroker, SmartRetryMiddleware, TaskiqDepends, TaskiqMessage
from taskiq.kicker import AsyncKicker
from taskiq_pipelines import PipelineMiddleware

import flowtrace

RETRY_DELAY = 1.5
"""Seconds between a failed attempt and its retry."""


class DelayedRetryMiddleware(SmartRetryMiddleware):
    """taskiq's ``SmartRetryMiddleware``, with a delay that an ``InMemoryBroker`` keeps.

    ``SmartRetryMiddleware`` leaves the delay to the broker (a ``delay`` label), which
    ``InMemoryBroker`` ignores: the retry would start at once. Here it is kicked after
    the delay, from a context of its own (as a scheduler would), not the failed task's.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._waiting: set[asyncio.Task[None]] = set()

    async def on_send(self, kicker: AsyncKicker[Any, Any], message: TaskiqMessage,
                      delay: float) -> None:
        later = self._kick_later(kicker, message, delay)
        task = contextvars.Context().run(asyncio.ensure_future, later)
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    @staticmethod
    async def _kick_later(kicker: AsyncKicker[Any, Any], message: TaskiqMessage,
                          delay: float) -> None:
        await asyncio.sleep(delay)
        await kicker.kiq(*message.args, **message.kwargs)

    async def shutdown(self) -> None:
        for task in self._waiting:
            task.cancel()
        await asyncio.gather(*self._waiting, return_exceptions=True)


# In-memory results are evicted oldest first: keep enough of them for a map's waiter
# to read its ~50 items' results while many runs are in flight. Map items run
# concurrently, so the concurrency limit is well above a few runs' worth of items.
broker = InMemoryBroker(max_stored_results=20_000, max_async_tasks=2_000)
broker.add_middlewares(PipelineMiddleware(),
                       DelayedRetryMiddleware(default_retry_count=3, default_delay=RETRY_DELAY))

XSS_USERNAME = '<img src=x onerror="window.__xss=1">'
"""A hostile username: its validation error carries it verbatim."""

_USERNAME = re.compile(r"^[a-z][a-z0-9_]{2,15}$")
_DECLINED_CARD = "4000-0000-0000-0002"


async def _work(low: float, high: float) -> None:
    """Stand-in for I/O, so that steps are long enough to watch."""
    await asyncio.sleep(random.uniform(low, high))


# etl ------------------------------------------------------------------------

@broker.task(task_name="extract")
async def extract(source: str) -> list[dict[str, Any]]:
    await _work(0.2, 0.8)
    return [{"source": source, "row": n, "value": random.randint(1, 100)} for n in range(8)]


@broker.task(task_name="transform")
async def transform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    await _work(0.3, 1.2)
    return [{**row, "value_x2": row["value"] * 2} for row in rows]


@broker.task(task_name="load")
async def load(rows: list[dict[str, Any]]) -> dict[str, int]:
    await _work(0.2, 0.8)
    return {"loaded": len(rows), "total": sum(row["value_x2"] for row in rows)}


# thumbnails (map) -------------------------------------------------------------

@broker.task(task_name="list_images")
async def list_images(album: str) -> list[str]:
    await _work(0.1, 0.4)
    return [f"{album}/img_{n:03d}.jpg" for n in range(random.randint(40, 60))]


@broker.task(task_name="make_thumbnail")
async def make_thumbnail(path: str) -> str:
    await _work(0.1, 3.0)
    return path.replace(".jpg", "_thumb.jpg")


@broker.task(task_name="publish_gallery")
async def publish_gallery(thumbnails: list[str]) -> dict[str, int]:
    await _work(0.1, 0.4)
    return {"thumbnails": len(thumbnails)}


# billing (fails sometimes) ------------------------------------------------------

@broker.task(task_name="validate_invoice")
async def validate_invoice(invoice: dict[str, Any]) -> dict[str, Any]:
    await _work(0.1, 0.4)
    if invoice["amount"] <= 0:
        raise ValueError(f"invoice {invoice['id']}: amount must be positive")
    return invoice


@broker.task(task_name="charge_card")
async def charge_card(invoice: dict[str, Any]) -> dict[str, Any]:
    await _work(0.3, 1.0)
    if invoice["card"] == _DECLINED_CARD:
        raise ValueError(f"card declined for invoice {invoice['id']}: insufficient funds")
    return {"invoice": invoice["id"], "charged": invoice["amount"]}


@broker.task(task_name="send_receipt")
async def send_receipt(charge: dict[str, Any]) -> str:
    await _work(0.1, 0.3)
    return f"receipt sent for {charge['invoice']}"


# inventory (a retried step) ----------------------------------------------------

@broker.task(task_name="fetch_stock")
async def fetch_stock(store: str) -> dict[str, Any]:
    await _work(0.1, 0.5)
    return {"store": store, "skus": random.randint(100, 999)}


@broker.task(task_name="push_to_store", retry_on_error=True, max_retries=3)
async def push_to_store(stock: dict[str, Any],
                        context: Annotated[Context, TaskiqDepends()]) -> str:
    await _work(0.2, 0.6)
    if int(context.message.labels.get("_retries", 0)) == 0:
        raise ConnectionError(f"store {stock['store']} did not answer; retrying")
    return f"{stock['skus']} SKUs pushed to {stock['store']}"


# signup (user input in results and errors) -------------------------------------

@broker.task(task_name="validate_signup")
async def validate_signup(username: str) -> str:
    await _work(0.1, 0.4)
    if not _USERNAME.match(username):
        raise ValueError(f"invalid username {username!r}: use 3-16 letters, digits or _")
    return username


@broker.task(task_name="create_account")
async def create_account(username: str) -> str:
    await _work(0.2, 0.6)
    return f"<b>welcome</b>, {username}"  # markup in a result: shown as text too


# a plain task -------------------------------------------------------------------

@broker.task(task_name="send_digest")
async def send_digest(team: str) -> str:
    await _work(0.2, 0.8)
    return f"digest sent to {team}"


etl = flowtrace.Pipeline(broker, extract, name="etl").call_next(transform).call_next(load)
thumbnails = flowtrace.Pipeline(broker, list_images, name="thumbnails").map(
    make_thumbnail, check_interval=0.2).call_next(publish_gallery)
billing = flowtrace.Pipeline(broker, validate_invoice, name="billing").call_next(
    charge_card).call_next(send_receipt)
inventory = flowtrace.Pipeline(broker, fetch_stock, name="inventory").call_next(push_to_store)
signup = flowtrace.Pipeline(broker, validate_signup, name="signup").call_next(create_account)

Kick = Callable[[], Awaitable[Any]]


def next_round(rng: random.Random) -> list[Kick]:
    """One shuffled round of kicks: every pipeline at least once, one of each failure.

    Each kick returns what ``kiq`` returns (its ``task_id`` is the run's id). A round is
    about ten runs; the demo plays rounds back to back.
    """
    def invoice(card: str) -> dict[str, Any]:
        return {"id": f"INV-{rng.randint(1000, 9999)}", "amount": rng.randint(5, 500),
                "card": card}

    names = ["ada", "grace_h", "linus", "margaret"]
    kicks: list[Kick] = [
        lambda: etl.kiq(rng.choice(["orders.csv", "users.csv", "events.parquet"])),
        lambda: etl.kiq(rng.choice(["s3://lake/day", "s3://lake/hour"])),
        lambda: thumbnails.kiq(rng.choice(["holidays", "wedding", "team-offsite"])),
        lambda: billing.kiq(invoice("4242-4242-4242-4242")),
        lambda: billing.kiq(invoice(_DECLINED_CARD)),  # fails: card declined
        lambda: inventory.kiq(rng.choice(["berlin", "lisbon", "oslo"])),
        lambda: signup.kiq(rng.choice(names)),
        lambda: signup.kiq(XSS_USERNAME),  # fails, with markup in its error
        lambda: send_digest.kiq(rng.choice(["platform", "data", "billing"])),
    ]
    rng.shuffle(kicks)
    return kicks


__all__ = ["RETRY_DELAY", "XSS_USERNAME", "DelayedRetryMiddleware", "broker", "next_round"]
