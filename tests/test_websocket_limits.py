"""Limits and close codes of SPEC §6, against a real uvicorn with real clients."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from flowtrace.events import StepProgressEvent
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.gateway_proc import GatewayProcess, WsFeed
from tests.support.processes import RedisServer
from tests.support.waiting import async_wait_until
from tests.support.ws_server import (
    LiveServer,
    connect,
    recv_json,
    small_buffer_socket,
    wait_closed,
)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    options: dict[str, Any] = getattr(request, "param", {})
    with LiveServer(**options) as live:
        yield live


def with_options(**options: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("server", [options], indirect=True)


async def subscribed(ws: ClientConnection) -> dict[str, Any]:
    message = await recv_json(ws)
    assert message["type"] == "subscribed", message
    return message  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- connection limit
@with_options(max_connections=5)
async def test_connection_limit_rejects_with_1013_and_frees_slots(server: LiveServer) -> None:
    clients = [await connect(server, f"/ws/run-{i}") for i in range(5)]
    for ws in clients:
        await subscribed(ws)

    sixth = await connect(server, "/ws/run-6")
    assert await wait_closed(sixth) == 1013
    assert sixth.close_reason == "too many connections"

    async with httpx.AsyncClient() as http:
        stats = (await http.get(server.http("/ws/metrics"))).json()
    assert stats["connections"] == 5
    assert stats["max_connections"] == 5
    assert stats["connections_rejected"] == 1
    assert stats["connections_rejected_by_reason"] == {"limit": 1}

    await clients[0].close()
    await async_wait_until(lambda: _connections(server, 4), message="a slot to free up")
    admitted = await connect(server, "/ws/run-7")
    await subscribed(admitted)
    await admitted.send(json.dumps({"type": "ping"}))
    assert (await recv_json(admitted))["type"] == "pong"
    for ws in [*clients[1:], admitted]:
        await ws.close()


async def _connections(server: LiveServer, expected: int) -> bool:
    return (await server.stats())["connections"] == expected


# --------------------------------------------------------------------------- slow consumer
EVENTS = 20_000
HEALTHY = 20


@with_options(transport=False, send_queue_size=200)
async def test_slow_consumer_is_closed_4008_and_nobody_else_waits(server: LiveServer) -> None:
    slow = await connect(server, "/ws/*", sock=small_buffer_socket(server.port), max_queue=1)
    healthy = [await connect(server, "/ws/*") for _ in range(HEALTHY)]
    for ws in healthy:
        await subscribed(ws)
    await async_wait_until(lambda: _connections(server, HEALTHY + 1), message="all connected")

    received = [0] * HEALTHY

    async def read_all(index: int, ws: ClientConnection) -> list[int]:
        seen: list[int] = []
        async with asyncio.timeout(90):  # one deadline: wait_for per message costs a task
            while len(seen) < EVENTS:
                message = json.loads(await ws.recv())
                seen.append(message["done"])
                received[index] = len(seen)
        return seen

    readers = [asyncio.create_task(read_all(i, ws)) for i, ws in enumerate(healthy)]

    async def produce() -> None:
        # As fast as the healthy clients consume, and never waiting for the slow one:
        # at most 150 events in flight per healthy client, under its 200-message outbox.
        manager = server.manager
        assert manager is not None
        for done in range(EVENTS):
            await manager.broadcast(StepProgressEvent(
                pipeline_id=f"run-{done % 7}", step_name="fan-out", done=done, total=EVENTS))
            if done % 50 == 49:
                await async_wait_until(lambda floor=done - 100: min(received) >= floor,
                                       timeout=60,
                                       interval=0.001, message="healthy clients to catch up")

    await server.acall(produce, timeout=120)
    results = await asyncio.gather(*readers)
    for seen in results:
        assert seen == list(range(EVENTS))

    assert await wait_closed(slow, timeout=30) == 4008
    assert slow.close_reason == "slow consumer"
    stats = await server.stats()
    assert stats["slow_consumer_disconnects"] == 1
    assert stats["messages_dropped"] >= 1
    assert stats["messages_dropped_by_reason"].keys() == {"slow_consumer"}
    assert stats["messages_sent"] >= HEALTHY * EVENTS
    for ws in healthy:
        await ws.close()


class Problems(logging.Handler):
    """Warnings and errors of the given loggers (uvicorn's do not reach pytest's caplog)."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.WARNING)
        self.loggers = [logging.getLogger(name) for name in names]
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self) -> Problems:
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger in self.loggers:
            logger.removeHandler(self)


def holds_connection(port: int, peer_port: int) -> bool:
    """Whether this process still has a socket on ``port`` connected to ``peer_port``."""
    return any(conn.laddr and conn.raddr and conn.laddr.port == port
               and conn.raddr.port == peer_port
               for conn in psutil.Process().net_connections(kind="tcp"))


@with_options(transport=False, send_queue_size=200, stalled_client_timeout=0.5)
async def test_an_abandoned_slow_consumer_is_dropped_quietly(server: LiveServer) -> None:
    """A slow consumer that never reads its 4008 is given up on: the server drops the
    connection (rather than wait for the peer to read, forever) and logs no error."""
    with Problems("uvicorn.error", "flowtrace.websocket") as problems:
        sock = small_buffer_socket(server.port)
        stuck = await connect(server, "/ws/*", sock=sock, max_queue=1)
        await async_wait_until(lambda: _connections(server, 1), message="connected")
        manager = server.manager
        assert manager is not None
        [client] = manager.clients

        async def flood() -> None:
            def flagged() -> bool:
                for done in range(100):
                    manager.broadcast_nowait(StepProgressEvent(
                        pipeline_id="run", step_name="fan-out", done=done, total=100))
                return bool(manager.stats()["slow_consumer_disconnects"])
            await async_wait_until(flagged, timeout=60, interval=0.01,
                                   message="the slow consumer to be found")

        await server.acall(flood, timeout=90)
        await async_wait_until(lambda: server.query(client.finished.is_set), timeout=30,
                               message="the stalled client given up on")
        port, peer = server.port, sock.getsockname()[1]
        await async_wait_until(lambda: not holds_connection(port, peer), timeout=10,
                               message="the server to drop the connection")
        assert (await server.stats())["connections"] == 0
        stuck.transport.abort()
    assert problems.lines == []


async def test_sigterm_with_a_stuck_client_closes_the_others_1001_and_exits(
        events_redis: RedisServer) -> None:
    gateway = GatewayProcess(events_redis.url)
    publisher = RedisStreamTransport(events_redis.url)
    try:
        gateway.wait_healthy()
        async with WsFeed.open(gateway.ws_url("/ws/*")) as healthy:
            stuck = await websockets.connect(
                gateway.ws_url("/ws/*"), sock=small_buffer_socket(gateway.port), max_queue=1,
                compression=None, proxy=None, ping_interval=None)

            async def slow_consumer_found() -> bool:
                """One more burst of events, paced by the healthy client."""
                sent = len(healthy.events) + 500
                for done in range(500):
                    await publisher.publish(StepProgressEvent(
                        pipeline_id="run", step_name="fan-out", done=done, total=500))
                assert await publisher.flush(timeout=10)
                await healthy.wait(lambda: len(healthy.events) >= sent, "the burst")
                stats = (await gateway.get("/ws/metrics")).json()
                return bool(stats["slow_consumer_disconnects"])

            await async_wait_until(slow_consumer_found, timeout=120, interval=0,
                                   message="the stuck client to be a slow consumer")
            gateway.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(gateway.proc.wait, 60) == 0
            await async_wait_until(lambda: healthy.ended, message="the healthy client closed")
            assert healthy.ws.close_code == 1001
            stuck.transport.abort()
        output = gateway.output()
        assert "Traceback" not in output, output
        assert "graceful shutdown exceeded" not in output, output
    finally:
        await publisher.close()
        gateway.stop()


# --------------------------------------------------------------------------- bad input
BAD_FRAMES = [
    ("this is not json", "invalid_json"),
    ("[1, 2, 3]", "invalid_message"),
    ("\"just a string\"", "invalid_message"),
    ("{\"pipeline_id\": \"x\"}", "invalid_message"),
    ("{\"type\": \"dance\"}", "unknown_type"),
    ("{\"type\": \"subscribe\"}", "invalid_message"),
    ("{\"type\": \"unsubscribe\", \"pipeline_id\": 5}", "invalid_message"),
    ("{\"type\": \"subscribe\", \"pipeline_id\": \"x\", \"event_types\": [\"Nope\"]}",
     "invalid_message"),
]


async def test_bad_frames_are_answered_with_errors(server: LiveServer) -> None:
    ws = await connect(server, "/ws/run-1")
    await subscribed(ws)
    for frame, code in BAD_FRAMES:
        await ws.send(frame)
        error = await recv_json(ws)
        assert error["type"] == "error", (frame, error)
        assert error["code"] == code, (frame, error)
        assert error["detail"]
    await ws.send(b"\x00\x01binary")
    error = await recv_json(ws)
    assert (error["type"], error["code"]) == ("error", "invalid_message")
    # Ten bad frames close the connection; nine do not.
    await ws.send(json.dumps({"type": "ping"}))
    assert await recv_json(ws) == {"type": "pong"}
    await ws.close()


async def test_repeated_garbage_is_closed_1008(server: LiveServer) -> None:
    ws = await connect(server, "/ws/run-1")
    await subscribed(ws)
    for _ in range(10):
        await ws.send("garbage")
    errors = [await recv_json(ws) for _ in range(10)]
    assert {e["code"] for e in errors} == {"invalid_json"}
    assert await wait_closed(ws) == 1008


def padded_ping(size: int) -> str:
    """A ping frame of exactly ``size`` UTF-8 bytes, mostly two-byte characters."""
    prefix, suffix = '{"type":"ping","pad":"', '"}'
    budget = size - len(prefix) - len(suffix)
    frame = prefix + "é" * (budget // 2) + "a" * (budget % 2) + suffix
    assert len(frame.encode()) == size
    return frame


async def test_frame_limit_is_4096_bytes_then_1009(server: LiveServer) -> None:
    ws = await connect(server, "/ws/run-1")
    await subscribed(ws)
    fits = padded_ping(4096)  # multi-byte characters: the limit counts bytes
    assert len(fits) < 4096
    await ws.send(fits)
    assert await recv_json(ws) == {"type": "pong"}

    await ws.send("x" * 1_000_000)
    assert await wait_closed(ws) == 1009
    assert ws.close_reason == "message too big"

    ws = await connect(server, "/ws/run-1")
    await subscribed(ws)
    await ws.send(padded_ping(4097))
    assert await wait_closed(ws) == 1009


async def test_subscription_limit(server: LiveServer) -> None:
    ws = await connect(server, "/ws/s-0")
    await subscribed(ws)
    for i in range(1, 100):
        await ws.send(json.dumps({"type": "subscribe", "pipeline_id": f"s-{i}"}))
    for i in range(1, 100):
        assert (await subscribed(ws))["pipeline_id"] == f"s-{i}"

    await ws.send(json.dumps({"type": "subscribe", "pipeline_id": "s-100"}))
    error = await recv_json(ws)
    assert (error["type"], error["code"]) == ("error", "too_many_subscriptions")
    # Re-subscribing (new filter) is not a new subscription; unsubscribing frees one.
    await ws.send(json.dumps({"type": "subscribe", "pipeline_id": "s-5",
                              "event_types": ["StepStartEvent"]}))
    assert (await subscribed(ws))["event_types"] == ["StepStartEvent"]
    await ws.send(json.dumps({"type": "unsubscribe", "pipeline_id": "s-1"}))
    assert await recv_json(ws) == {"type": "unsubscribed", "pipeline_id": "s-1"}
    await ws.send(json.dumps({"type": "subscribe", "pipeline_id": "s-100"}))
    assert (await subscribed(ws))["pipeline_id"] == "s-100"

    async with httpx.AsyncClient() as http:
        pipelines = (await http.get(server.http("/api/ws/pipelines"))).json()["pipelines"]
    assert len(pipelines) == 100
    assert "s-1" not in pipelines
    assert "s-100" in pipelines
    await ws.close()


# --------------------------------------------------------------------------- auth and origin
@with_options(token="s3cret")
async def test_token_protects_websocket_and_api(server: LiveServer) -> None:
    for path, protocols in [("/ws/run-1", None), ("/ws/run-1?token=wrong", None),
                            ("/ws/run-1", ["bearer", "wrong"])]:
        ws = await connect(server, path, subprotocols=protocols)
        assert await wait_closed(ws) == 1008, path
        assert ws.close_reason == "unauthorized"
        if protocols:
            assert ws.subprotocol == "bearer"

    ws = await connect(server, "/ws/run-1", subprotocols=["bearer", "s3cret"])
    assert ws.subprotocol == "bearer"
    await subscribed(ws)
    await ws.close()
    ws = await connect(server, "/ws/run-1?token=s3cret")
    assert ws.subprotocol is None
    await subscribed(ws)
    await ws.close()

    async with httpx.AsyncClient() as http:
        for path in ["/api/pipelines", "/api/pipelines/run-1", "/api/ws/pipelines",
                     "/api/ws/clients/run-1", "/ws/metrics"]:
            response = await http.get(server.http(path))
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            wrong = await http.get(server.http(path), headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
        ok = await http.get(server.http("/api/pipelines"),
                            headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        ok = await http.get(server.http("/api/ws/pipelines?token=s3cret"))
        assert ok.status_code == 200
        stats = (await http.get(server.http("/ws/metrics?token=s3cret"))).json()
    assert stats["connections_rejected_by_reason"] == {"auth": 3}


@with_options(allowed_origins=["https://app.example"])
async def test_foreign_origin_is_refused_at_the_handshake(server: LiveServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(server, "/ws/run-1", origin="https://evil.example")
    assert refused.value.response.status_code == 403

    for origin in ["https://app.example", "https://APP.example/", None]:
        ws = await connect(server, "/ws/run-1", origin=origin)
        await subscribed(ws)
        await ws.close()
    stats = await server.stats()
    assert stats["connections_rejected_by_reason"] == {"origin": 1}
    # Not listed, the gateway's own origin is refused like any other (SPEC §6).
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(server, "/ws/run-1", origin=f"http://127.0.0.1:{server.port}")
    assert refused.value.response.status_code == 403
