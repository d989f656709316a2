"""WebSocket load clients shared by the fan-out, fleet and memory benchmarks.

``run_clients`` is the body of a separate process (the server under test keeps its
own core): it opens ``n`` ``websockets`` clients, optionally a *stalled* client
(a raw socket with a small ``SO_RCVBUF`` that never reads after the handshake),
counts every event each client receives, records publish-to-receive latency from
the ``"t":<monotonic ns>`` embedded in the event, and publishes its running total
of deliveries in a shared counter (for the publisher's flow control).

Commands arrive on a ``multiprocessing`` pipe: ``("reset",)``, ``("report",)``,
``("close",)``; the first reply is ``("ready", n_connected)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

MARK = '"t":'


def stalled_socket(host: str, port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    sock.settimeout(10)
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)  # byte by byte: leave every frame after the handshake unread
        if not chunk:
            raise ConnectionError("stalled client: server closed during the handshake")
        response += chunk
    if b" 101 " not in response.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"stalled client: handshake refused: {response[:80]!r}")
    return sock


class _State:
    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.latencies: list[list[int]] = [[] for _ in range(n)]
        self.total = 0
        self.closed_codes: list[int | None] = []


async def _reader(ws: Any, index: int, state: _State, delivered: Any) -> None:
    counts, latencies = state.counts, state.latencies[index]
    now = time.monotonic_ns
    try:
        async for message in ws:
            received = now()
            if not isinstance(message, str):
                continue
            k = message.find(MARK)
            if k < 0:
                continue
            end = message.find(",", k)
            latencies.append(received - int(message[k + 4:end if end > 0 else None]))
            counts[index] += 1
            state.total += 1
            if delivered is not None:
                delivered.value = state.total
    except Exception:  # a closed connection ends its reader; the count says the rest
        pass
    finally:
        state.closed_codes.append(getattr(ws, "close_code", None))


async def _clients(url: str, n: int, stalled: bool, conn: Any, delivered: Any,
                   compression: str | None, connect_rate: float) -> None:
    from urllib.parse import urlparse

    from websockets.asyncio.client import connect

    state = _State(n)
    sockets: list[Any] = []
    readers: list[asyncio.Task[None]] = []
    stall: socket.socket | None = None
    loop = asyncio.get_running_loop()
    try:
        for index in range(n):
            ws = await connect(url, compression=compression, max_size=None, open_timeout=30,
                               ping_interval=None, max_queue=None)
            sockets.append(ws)
            readers.append(asyncio.create_task(_reader(ws, index, state, delivered)))
            if connect_rate:
                await asyncio.sleep(1 / connect_rate)
        if stalled:
            parsed = urlparse(url)
            stall = await asyncio.to_thread(stalled_socket, parsed.hostname or "127.0.0.1",
                                            parsed.port or 80, parsed.path)
        conn.send(("ready", len(sockets)))
        cpu0, wall0 = time.process_time(), time.monotonic()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "reset":
                for index in range(n):  # in place: the readers hold these lists
                    state.counts[index] = 0
                    state.latencies[index].clear()
                cpu0, wall0 = time.process_time(), time.monotonic()
                conn.send(("ok",))
            elif command[0] == "report":
                latencies = sorted(x for lat in state.latencies for x in lat)
                conn.send(("report", {
                    "counts": list(state.counts),
                    "latency_ns": _summary(latencies),
                    "cpu_util": (time.process_time() - cpu0) / max(1e-9, time.monotonic() - wall0),
                    "open": sum(1 for ws in sockets if ws.close_code is None),
                }))
            elif command[0] == "stall":
                parsed = urlparse(url)
                if stall is None:
                    stall = await asyncio.to_thread(
                        stalled_socket, parsed.hostname or "127.0.0.1", parsed.port or 80,
                        parsed.path)
                conn.send(("ok",))
            elif command[0] == "unstall":
                if stall is not None:
                    stall.close()
                    stall = None
                conn.send(("ok",))
            elif command[0] == "close":
                break
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(_close(ws) for ws in sockets), return_exceptions=True)
        if stall is not None:
            stall.close()
        conn.send(("closed",))


async def _close(ws: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), 5)


def _summary(ordered: list[int]) -> dict[str, float]:
    if not ordered:
        return {"n": 0}

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] / 1e6

    return {"n": len(ordered), "p50_ms": pick(50), "p90_ms": pick(90), "p99_ms": pick(99),
            "max_ms": ordered[-1] / 1e6, "mean_ms": sum(ordered) / len(ordered) / 1e6}


def run_clients(url: str, n: int, stalled: bool, conn: Any, delivered: Any = None,
                compression: str | None = "deflate", connect_rate: float = 0,
                nofile: int = 4096) -> None:
    """Process entry point (``multiprocessing``, spawn)."""
    from benchmarks.common import raise_nofile

    raise_nofile(nofile)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_clients(url, n, stalled, conn, delivered, compression, connect_rate))


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
