"""``flowtrace serve`` (the gateway for many workers) and ``flowtrace demo``.

Both run uvicorn programmatically through :class:`GracefulServer`: on SIGTERM or
SIGINT it first closes every WebSocket client with 1001 ("going away") and only
then lets uvicorn shut down — uvicorn itself would close them with 1012 before the
app's lifespan shutdown runs. A second signal falls back to uvicorn's behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import math
import os
import re
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import uvicorn

logger = logging.getLogger("flowtrace.cli")
T = TypeVar("T")

CLOSE_TIMEOUT = 10.0
"""Longest wait for WebSocket clients to be closed before the server stops anyway."""
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_STALE_AFTER = 3600.0
MAX_STALE_AFTER = timedelta.max.total_seconds()
"""The LOST sweep measures silence in ``timedelta``s: it cannot represent more."""
REDIS_SCHEMES = ("redis", "rediss", "unix")


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` whose first exit signal runs ``before_exit`` before stopping.

    After a graceful stop the process exits normally (status 0) instead of
    re-raising the signal as plain uvicorn does.
    """

    def __init__(self, config: uvicorn.Config,
                 before_exit: Callable[[], Awaitable[None]] | None = None,
                 on_started: Callable[[int], None] | None = None) -> None:
        super().__init__(config)
        self._before_exit = before_exit
        self._on_started = on_started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Task[None] | None = None
        self._exit_requested = False

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started(self.bound_port)

    @property
    def bound_port(self) -> int:
        """The port actually listened on (useful with ``port=0``)."""
        for server in getattr(self, "servers", []):
            for sock in server.sockets or ():
                return int(sock.getsockname()[1])
        return int(self.config.port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread, between bytecodes): hand over to the loop."""
        loop = self._loop
        if self._exit_requested or loop is None or not self.started or self.should_exit:
            super().handle_exit(sig, frame)  # second signal, or not serving yet
            return
        self._exit_requested = True
        loop.call_soon_threadsafe(self._begin_exit)

    def _begin_exit(self) -> None:
        self._closing = asyncio.get_running_loop().create_task(
            self._close_then_exit(), name="flowtrace-graceful-exit")

    async def _close_then_exit(self) -> None:
        try:
            if self._before_exit is not None:
                await asyncio.wait_for(self._before_exit(), CLOSE_TIMEOUT)
        except Exception:
            logger.exception("flowtrace: closing WebSocket clients failed; stopping anyway")
        finally:
            self.should_exit = True


async def serve_app(app: Any, host: str = "127.0.0.1", port: int = 8000, *,
                    log_level: str = "info", banner: str = "flowtrace gateway",
                    ws_deflate: bool = True) -> None:
    """Serve an app until SIGINT/SIGTERM, closing WebSocket clients with 1001 first.

    A ``create_app`` app, or any FastAPI app that mounts ``flowtrace.websocket.router``
    (plain uvicorn closes their sockets with 1012 before the app's shutdown code runs).

    ``ws_deflate``: negotiate per-message deflate with clients that offer it (browsers
    do). Off, an idle connection costs ~41 KiB instead of ~80 KiB and fan-out capacity
    rises ~1.6x, for 3-5x the bandwidth (docs/benchmarks.md).
    """
    from flowtrace.app import close_clients
    from flowtrace.websocket.manager import get_fastapi_ws_manager

    # create_app's own manager, else the default one that flowtrace's router serves.
    manager = getattr(app.state, "flowtrace_manager", None) or get_fastapi_ws_manager()

    async def before_exit() -> None:
        await close_clients(manager)

    # The app refuses frames above its inbound limit with 1009, but only once uvicorn has
    # buffered the whole message (up to 16 MiB by default): the protocol layer must refuse
    # them first, with the same code, as soon as the frame header announces the size.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(CLOSE_TIMEOUT),
                            ws_per_message_deflate=ws_deflate,
                            ws_max_size=int(manager.max_message_bytes))
    hide_tokens_in_uvicorn_logs()  # after the Config: it (re)configures uvicorn's loggers

    def started(bound: int) -> None:
        print_urls(banner, host, bound)
        # Long-lived objects (imports, the app) out of full collections: with a full run
        # store a full collection paused the loop 45-99 ms, 24 ms after this (benchmarks).
        gc.collect()
        gc.freeze()

    server = GracefulServer(config, before_exit=before_exit, on_started=started)
    await server.serve()


class TokenMasker(logging.Filter):
    """Masks ``token=...`` in the request lines uvicorn logs (the access log, and the
    ``"WebSocket /ws/*?token=..." [accepted]`` lines): ``?token=`` is one way to pass it."""

    _TOKEN = re.compile(r"(?<=[?&])token=[^&\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._TOKEN.sub("token=***", arg) if isinstance(arg, str)
                                else arg for arg in record.args)
        return True


def hide_tokens_in_uvicorn_logs() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        log = logging.getLogger(name)
        if not any(isinstance(f, TokenMasker) for f in log.filters):
            log.addFilter(TokenMasker())


def run_app(app: Any, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Blocking form of :func:`serve_app`."""
    asyncio.run(serve_app(app, host, port, **kwargs))


def print_urls(banner: str, host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    print(f"{banner} running on {base}\n"
          f"  live page   {base}/\n"
          f"  runs        {base}/api/pipelines\n"
          f"  metrics     {base}/metrics\n"
          f"  websocket   ws://{shown}:{port}/ws/*  (or /ws/<pipeline_id>)", flush=True)


def build_parser() -> argparse.ArgumentParser:
    from flowtrace.app import DEFAULT_TRACE_URL

    trace_url = ("FLOWTRACE_TRACE_URL", "the live page's link to a run's trace, {trace_id} "
                 f"replaced (default {DEFAULT_TRACE_URL})")
    otlp = ("OTEL_EXPORTER_OTLP_ENDPOINT", "export the runs' traces there (OTLP)")
    parser = argparse.ArgumentParser(
        prog="flowtrace", description="Observability for taskiq pipelines.",
        epilog=_environment(trace_url), formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway for workers publishing to Redis",
                                epilog=_environment(trace_url),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--redis-url", type=_or_env(redis_url, "FLOWTRACE_REDIS_URL"),
                       default=os.environ.get("FLOWTRACE_REDIS_URL") or None,
                       help="Redis holding the event stream: redis://, rediss:// or unix:// "
                            "(env FLOWTRACE_REDIS_URL)")
    serve.add_argument("--stream", default="flowtrace:events",
                       help="Redis stream name (default %(default)s)")
    _add_bind(serve)
    serve.add_argument("--max-connections", metavar="N",
                       type=_or_env(positive_int, "FLOWTRACE_MAX_CONNECTIONS"),
                       default=os.environ.get("FLOWTRACE_MAX_CONNECTIONS",
                                              str(DEFAULT_MAX_CONNECTIONS)),
                       help=f"WebSocket connection limit (default {DEFAULT_MAX_CONNECTIONS}; "
                            "env FLOWTRACE_MAX_CONNECTIONS)")
    serve.add_argument("--token", default=os.environ.get("FLOWTRACE_TOKEN") or None,
                       help="token required on /ws/* and /api/* (env FLOWTRACE_TOKEN)")
    serve.add_argument("--allowed-origin", dest="allowed_origins", action="extend", nargs="+",
                       metavar="ORIGIN", default=None,
                       help="Origin allowed to open WebSockets (repeatable; default: any); "
                            "list the gateway's own for its live page")
    serve.add_argument("--stale-after", metavar="SECONDS",
                       type=_or_env(stale_seconds, "FLOWTRACE_STALE_AFTER"),
                       default=os.environ.get("FLOWTRACE_STALE_AFTER",
                                              f"{DEFAULT_STALE_AFTER:g}"),
                       help="seconds without events before a run is declared LOST "
                            f"(default {DEFAULT_STALE_AFTER:g}; env FLOWTRACE_STALE_AFTER)")
    serve.add_argument("--ws-deflate", action=argparse.BooleanOptionalAction,
                       default=os.environ.get("FLOWTRACE_WS_DEFLATE", "1").lower()
                       not in ("0", "false", "no", "off"),
                       help="per-message deflate for WebSocket clients that offer it: less "
                            "bandwidth, more memory and CPU per client (default on; env "
                            "FLOWTRACE_WS_DEFLATE=0 turns it off)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(handler=_serve, command_parser=serve)

    demo = commands.add_parser("demo", help="everything in one process, with example pipelines",
                               epilog=_environment(trace_url, otlp),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_bind(demo)
    demo.set_defaults(handler=_demo, command_parser=demo)
    return parser


def _environment(*variables: tuple[str, str]) -> str:
    """An epilog listing environment variables (``--help`` shows it as is)."""
    lines = [f"  {name}\n" + textwrap.fill(text, 78, initial_indent=" " * 6,
                                            subsequent_indent=" " * 6)
             for name, text in variables]
    return "environment:\n" + "\n".join(lines)


def _add_bind(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    parser.add_argument("--port", type=tcp_port, default=8000,
                        help="port, 0 for any free one (default %(default)s)")


# Argument types: a bad value (flag or environment variable) is a usage error (exit 2).

def _or_env(check: Callable[[str], T], variable: str) -> Callable[[str], T]:
    """``check``, whose error also names the environment variable the value may come from."""
    def parse(text: str) -> T:
        try:
            return check(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} (from the flag or {variable})") from None

    return parse


def _number(text: str, convert: Callable[[str], T], fits: Callable[[T], bool],
            expected: str) -> T:
    """``convert(text)`` when it succeeds and ``fits``; else a usage error naming ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        pass
    else:
        if fits(value):
            return value
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def positive_int(text: str) -> int:
    return _number(text, int, lambda value: value >= 1, "a positive integer")


def stale_seconds(text: str) -> float:
    """A positive, finite number of seconds that a ``timedelta`` can hold."""
    return _number(text, float, lambda value: math.isfinite(value) and 0 < value <= MAX_STALE_AFTER,
                   "a positive, finite number of seconds")


def tcp_port(text: str) -> int:
    return _number(text, int, lambda value: 0 <= value <= 65535, "a port from 0 to 65535")


def redis_url(text: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL, checked before anything starts."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid Redis URL {text!r}: {exc}") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"expected a Redis URL (redis://, rediss:// or unix://), got {text!r}")
    if parts.scheme == "unix" and not parts.path:
        raise argparse.ArgumentTypeError(f"a unix:// URL needs a socket path, got {text!r}")
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise argparse.ArgumentTypeError(
            f"invalid Redis URL {text!r}: the database must be a number, got {database!r}")
    try:  # the client's own reading of the options (no connection is opened)
        from redis.asyncio import Redis

        Redis.from_url(text).connection_pool.make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"invalid Redis URL {text!r}: {exc}") from None
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.handler
    return handler(args, args.command_parser)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.redis_url:
        parser.error("serve needs a Redis URL: pass --redis-url URL or set FLOWTRACE_REDIS_URL")
    # flowtrace's own lines (LOST runs, transport outages, the rebuild) at --log-level,
    # with a time and a level (uvicorn formats its own).
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve_redis(args))
    return 0


async def _serve_redis(args: argparse.Namespace) -> None:
    from flowtrace.app import create_app
    from flowtrace.transport.redis_stream import RedisStreamTransport

    transport = RedisStreamTransport(args.redis_url, args.stream)
    try:
        app = create_app(transport, max_connections=args.max_connections, token=args.token,
                         allowed_origins=args.allowed_origins, stale_after=args.stale_after)
        await serve_app(app, args.host, args.port, log_level=args.log_level,
                        ws_deflate=args.ws_deflate)
    finally:
        await transport.close()


def _demo(args: argparse.Namespace, _: argparse.ArgumentParser) -> int:
    demo = importlib.import_module("flowtrace.demo")  # heavy (taskiq, pipelines): only here
    demo.run_demo(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
