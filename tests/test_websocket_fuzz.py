"""Property test: random frames thrown at a live server never hurt it or its other clients.

Each example opens a connection, sends a random mix of text, JSON, message-shaped,
binary and oversized frames, and checks the outcome against an independent model of
SPEC §6 (close 1009 on the first frame over 4096 bytes, close 1008 after ten bad
frames, otherwise still open and answering). Meanwhile an observer connection keeps
receiving every event published between examples, in order.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from flowtrace.events import EVENT_TYPES, StepProgressEvent
from tests.support.waiting import async_wait_until
from tests.support.ws_server import LiveServer, connect

MAX_BYTES = 4096
MAX_BAD = 10
SERVER_TYPES = {"subscribed", "unsubscribed", "pong", "snapshot", "error", *EVENT_TYPES}
ERROR_CODES = {"invalid_json", "invalid_message", "unknown_type", "too_many_subscriptions",
               "history_truncated"}
_EVENT_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")

Frame = str | bytes


# --------------------------------------------------------------------------- the model
def _valid_pipeline_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 256


def _valid_event_types(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(v, str) and (v == "*" or v in EVENT_TYPES) for v in value)


def _valid_since(value: Any) -> bool:
    return value is None or (isinstance(value, str) and _EVENT_ID.fullmatch(value) is not None)


def is_good_frame(frame: Frame) -> bool:
    """SPEC §6's client messages, written independently of flowtrace.websocket.protocol."""
    if isinstance(frame, bytes):
        return False
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    kind = data.get("type")
    if kind == "ping":
        return True
    if kind == "unsubscribe":
        return _valid_pipeline_id(data.get("pipeline_id"))
    if kind == "subscribe":
        return (_valid_pipeline_id(data.get("pipeline_id"))
                and _valid_event_types(data.get("event_types"))
                and _valid_since(data.get("since")))
    return False


def expected_close(frames: list[Frame]) -> int | None:
    bad = 0
    for frame in frames:
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
        if size > MAX_BYTES:
            return 1009
        if not is_good_frame(frame):
            bad += 1
            if bad >= MAX_BAD:
                return 1008
    return None


# --------------------------------------------------------------------------- strategies
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
message_shaped = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["subscribe", "unsubscribe", "ping", "pong", "", "SUBSCRIBE"])
        | json_values,
        "pipeline_id": st.sampled_from(["*", "fuzz", "observed", "", "x" * 300]) | json_values,
        "event_types": st.lists(st.sampled_from([*EVENT_TYPES, "*", "Nope"]), max_size=3)
        | json_values,
        "since": st.sampled_from(["0-0", "1-1", "12", "-1", "abc", "9" * 30]) | json_values,
    },
).map(json.dumps)
nested = st.integers(1, MAX_BYTES // 2).map(lambda depth: "[" * depth + "]" * depth)


def padded_ping(size: int) -> str:
    return '{"type":"ping","pad":"' + "x" * (size - 24) + '"}'


garbage = st.sampled_from(["garbage", "[]", "null", '{"type":"x"}', '{"type":"subscribe"}',
                           b"\x00"])
small_frames = st.one_of(texts, json_values.map(json.dumps), message_shaped, nested,
                         st.integers(MAX_BYTES - 40, MAX_BYTES).map(padded_ping),
                         st.binary(max_size=200))
big_frames = st.one_of(st.integers(MAX_BYTES + 1, MAX_BYTES + 40).map(padded_ping),
                       st.integers(MAX_BYTES + 1, 300_000).map(lambda size: "y" * size),
                       st.integers(MAX_BYTES + 1, 100_000).map(bytes),
                       st.integers(MAX_BYTES // 2 + 1, 20_000).map(lambda d: "[" * d + "]" * d))


@st.composite
def frame_lists(draw: st.DrawFn) -> list[Frame]:
    """Random small frames with garbage mixed in (often ten bad frames or more), and
    sometimes one oversized frame among them."""
    frames: list[Frame] = draw(st.lists(small_frames, min_size=1, max_size=12))
    for frame in draw(st.lists(garbage, max_size=12)):
        frames.insert(draw(st.integers(0, len(frames))), frame)
    if draw(st.integers(0, 2)) == 0:
        frames.insert(draw(st.integers(0, len(frames))), draw(big_frames))
    return frames


# --------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    with LiveServer(maxlen=500) as live:
        yield live


def check_message(raw: str | bytes) -> dict[str, Any]:
    assert isinstance(raw, str), "the server only sends text frames"
    message = json.loads(raw)
    assert isinstance(message, dict)
    assert message["type"] in SERVER_TYPES, message
    if message["type"] == "error":
        assert message["code"] in ERROR_CODES, message
        assert isinstance(message["detail"], str)
    return message  # type: ignore[no-any-return]


async def attack(server: LiveServer, frames: list[Frame], round_no: int) -> None:
    ws = await connect(server, "/ws/fuzz")
    assert check_message(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
    for frame in frames:
        try:
            await ws.send(frame)
        except websockets.ConnectionClosed:
            break
    expected = expected_close(frames)
    if expected is None:
        marker = f"marker-{round_no}"
        await ws.send(json.dumps({"type": "subscribe", "pipeline_id": marker}))
        while True:
            message = check_message(await asyncio.wait_for(ws.recv(), 10))
            if message["type"] == "subscribed" and message["pipeline_id"] == marker:
                break
        await ws.close()
        return
    try:
        while True:
            check_message(await asyncio.wait_for(ws.recv(), 10))
    except websockets.ConnectionClosed:
        pass
    assert ws.close_code == expected, (ws.close_code, ws.close_reason)


def test_random_frames_never_hurt_the_server(fuzz_server: LiveServer) -> None:
    with asyncio.Runner() as runner:
        seen: list[int] = []

        async def observe(ws: ClientConnection) -> None:
            async for raw in ws:
                message = check_message(raw)
                if message["type"] == "StepProgressEvent":
                    seen.append(message["done"])

        observer = runner.run(connect(fuzz_server, "/ws/observed"))
        observing = runner.get_loop().create_task(observe(observer))
        rounds = [0]
        outcomes: dict[int | None, int] = {}

        @settings(max_examples=80, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(frames=frame_lists())
        def one_round(frames: list[Frame]) -> None:
            rounds[0] += 1
            number = rounds[0]
            expected = expected_close(frames)
            outcomes[expected] = outcomes.get(expected, 0) + 1

            async def go() -> None:
                await attack(fuzz_server, frames, number)
                await fuzz_server.publish(StepProgressEvent(pipeline_id="observed",
                                                            step_name="s", done=number))
                await async_wait_until(lambda: seen and seen[-1] == number, timeout=10,
                                       message=f"the observer to get event {number}")

            runner.run(go())

        one_round()
        # The examples covered every outcome of the model.
        assert outcomes.keys() == {None, 1008, 1009}, outcomes
        assert seen == list(range(1, rounds[0] + 1)), "the observer lost or reordered events"

        async def only_the_observer_left() -> bool:
            return (await fuzz_server.stats())["connections"] == 1

        runner.run(async_wait_until(only_the_observer_left, message="attackers to be gone"))
        runner.run(observer.close())
        runner.run(asyncio.wait_for(observing, 10))
