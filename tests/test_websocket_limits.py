"""Limits and close codes of SPEC §6, against a real uvicorn with real clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from flowtrace.events import StepProgressEvent
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
