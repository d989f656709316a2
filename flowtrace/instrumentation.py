"""``flowtrace.instrument(broker)``: the one call that attaches flowtrace."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

import flowtrace.transport as transports
from flowtrace import metrics
from flowtrace.hooks import HookManager
from flowtrace.middleware import FlowtraceMiddleware
from flowtrace.transport.base import Transport
from flowtrace.transport.memory import InMemoryTransport

logger = logging.getLogger("flowtrace")


def instrument(
    broker: AsyncBroker,
    redis_url: str | None = None,
    hooks: HookManager | Iterable[Any] | None = None,
    service_name: str | None = None,
    capture_payloads: bool = True,
    max_payload_bytes: int = 1024,
    redact: Callable[[Any], Any] | None = None,
    metrics_port: int | None = None,
    transport: Transport | None = None,
) -> FlowtraceMiddleware:
    """Add :class:`FlowtraceMiddleware` to ``broker`` and return it.

    Events go to Redis when ``redis_url`` (or ``FLOWTRACE_REDIS_URL``) is given,
    else to an in-process transport (``mw.transport``, for ``create_app``). On a broker
    that is already instrumented it returns the middleware already there.
    """
    _check_metrics_port(metrics_port)
    existing = next((m for m in broker.middlewares if isinstance(m, FlowtraceMiddleware)), None)
    if existing is not None:  # a second middleware would report every run twice
        logger.warning("flowtrace: the broker is already instrumented; instrument() returns "
                       "its middleware and ignores this call's options")
        return existing
    url = redis_url or os.environ.get("FLOWTRACE_REDIS_URL")
    if transport is None:
        # The Redis client is loaded only here, when events go to Redis.
        transport = transports.RedisStreamTransport(url) if url else InMemoryTransport()
    middleware = FlowtraceMiddleware(
        hooks=hooks, transport=transport, service_name=service_name,
        capture_payloads=capture_payloads, max_payload_bytes=max_payload_bytes, redact=redact,
    )
    broker.add_middlewares(middleware)
    middleware.ensure_placement()
    if metrics_port is not None:
        _serve_metrics_on_startup(broker, metrics_port)
    return middleware


def _check_metrics_port(port: int | None) -> None:
    """A port from 1 to 65535 (0 would serve on a random port nobody scrapes)."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 1 <= port <= 65535):
        raise ValueError(f"metrics_port must be a port from 1 to 65535, got {port!r}")


#: How many ports above ``metrics_port`` the processes of one host may take.
METRICS_PORT_RANGE = 64


def _serve_metrics_on_startup(broker: AsyncBroker, port: int) -> None:
    """Serve this process's counters when the broker starts (in a worker or a client).

    Not at import: ``taskiq worker --workers N`` imports the module in every process,
    and only the started ones should bind. Those N processes share one ``metrics_port``
    setting: each serves on the first free port from it up, so that all of them are
    scraped (``port`` … ``port + N - 1``).
    """
    started = False

    def start(_: TaskiqState) -> None:
        nonlocal started
        if started:
            return
        started = True
        error: OSError | None = None
        for candidate in range(port, min(port + METRICS_PORT_RANGE, 65536)):
            try:
                metrics.serve_process_metrics(candidate)
            except OSError as exc:
                error = error or exc
                continue
            if candidate != port:
                logger.info("flowtrace: metrics port %s taken, serving on %s", port, candidate)
            return
        logger.warning("flowtrace: no metrics port free from %s to %s (%s)", port,
                       port + METRICS_PORT_RANGE - 1, error)

    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, start)
    broker.add_event_handler(TaskiqEvents.CLIENT_STARTUP, start)
