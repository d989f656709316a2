"""The WebSocket protocol of SPEC §6: client frames in, server messages out.

Hand-rolled rather than pydantic so that every way a frame can be wrong maps to
exactly one documented error code, and so that parsing a hostile frame costs
no more than ``json.loads``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from flowtrace.events import EVENT_TYPES

ALL = "*"
"""The channel (and event-type) wildcard."""

MAX_PIPELINE_ID_LENGTH: Final = 256

ErrorCode = Literal[
    "invalid_json",
    "invalid_message",
    "unknown_type",
    "too_many_subscriptions",
    "history_truncated",
]

_KNOWN_EVENT_TYPES: Final = frozenset(EVENT_TYPES)
CLIENT_MESSAGE_TYPES: Final = ("subscribe", "unsubscribe", "ping")
_EVENT_ID: Final = re.compile(r"[0-9]{1,20}(?:-[0-9]{1,20})?")


class ProtocolError(Exception):
    """A client frame that cannot be honoured; answered with an ``error`` message."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: ErrorCode = code
        self.detail = detail

    def to_message(self) -> str:
        return error_message(self.code, self.detail)


@dataclass(frozen=True, slots=True)
class Subscribe:
    pipeline_id: str
    event_types: frozenset[str] | None = None
    """None means every type."""
    since: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    pipeline_id: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientMessage = Subscribe | Unsubscribe | Ping


# --------------------------------------------------------------------------- parsing
def parse_client_frame(text: str) -> ClientMessage:
    """Parse one inbound text frame; raises :class:`ProtocolError` when it is bad."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays fit in a few KB and exhaust the C scanner.
        raise ProtocolError("invalid_json", f"frame is not valid JSON: {_short(exc)}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message",
                            f"frame must be a JSON object, got {_json_kind(data)}")
    return parse_client_message(data)


def parse_client_message(data: Mapping[str, Any]) -> ClientMessage:
    """Validate an already decoded client message."""
    if "type" not in data:
        raise ProtocolError("invalid_message", "missing 'type'")
    kind = data["type"]
    if not isinstance(kind, str):
        raise ProtocolError("invalid_message", "'type' must be a string")
    if kind == "ping":
        return Ping()
    if kind == "subscribe":
        return Subscribe(
            pipeline_id=_pipeline_id(data),
            event_types=parse_event_types(data.get("event_types")),
            since=parse_since(data.get("since")),
        )
    if kind == "unsubscribe":
        return Unsubscribe(pipeline_id=_pipeline_id(data))
    raise ProtocolError(
        "unknown_type",
        f"unknown message type {_clip(kind)!r}; expected one of {', '.join(CLIENT_MESSAGE_TYPES)}",
    )


def _pipeline_id(data: Mapping[str, Any]) -> str:
    if "pipeline_id" not in data or data["pipeline_id"] is None:
        raise ProtocolError("invalid_message", "missing 'pipeline_id'")
    return validate_pipeline_id(data["pipeline_id"])


def validate_pipeline_id(value: object) -> str:
    """A pipeline id is a non-empty string of bounded length (``"*"`` = every run)."""
    if not isinstance(value, str):
        raise ProtocolError("invalid_message", "'pipeline_id' must be a string")
    if not value:
        raise ProtocolError("invalid_message", "'pipeline_id' must not be empty")
    if len(value) > MAX_PIPELINE_ID_LENGTH:
        raise ProtocolError(
            "invalid_message", f"'pipeline_id' longer than {MAX_PIPELINE_ID_LENGTH} characters"
        )
    return value


def parse_event_types(value: object) -> frozenset[str] | None:
    """``event_types`` as a list (message) or ``"A,B"`` (query); None/``*`` = all types."""
    if value is None:
        return None
    items: Iterable[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ProtocolError("invalid_message", "'event_types' must be a list of event type names")
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ProtocolError("invalid_message", "'event_types' must contain strings only")
        if item == ALL:
            return None
        if item not in _KNOWN_EVENT_TYPES:
            raise ProtocolError(
                "invalid_message",
                f"unknown event type {_clip(item)!r}; known: {', '.join(EVENT_TYPES)}",
            )
        chosen.add(item)
    if not chosen:
        raise ProtocolError("invalid_message", "'event_types' must not be empty")
    return frozenset(chosen)


def parse_since(value: object) -> str | None:
    """A resume point: an event id ``"<major>-<minor>"`` (both decimal); ``"<major>"`` is
    ``"<major>-0"``, as Redis reads a stream id, so that every transport reads it alike."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("invalid_message", "'since' must be an event id string")
    if _EVENT_ID.fullmatch(value) is None:
        raise ProtocolError("invalid_message", f"'since' is not an event id: {_clip(value)!r}")
    return value if "-" in value else f"{value}-0"


# --------------------------------------------------------------------------- server messages
def _dump(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def error_message(code: ErrorCode, detail: str) -> str:
    return _dump({"type": "error", "code": code, "detail": detail})


def subscribed_message(pipeline_id: str, event_types: frozenset[str] | None,
                       since: str | None) -> str:
    return _dump({
        "type": "subscribed",
        "pipeline_id": pipeline_id,
        "event_types": sorted(event_types) if event_types is not None else None,
        "since": since,
    })


def unsubscribed_message(pipeline_id: str) -> str:
    return _dump({"type": "unsubscribed", "pipeline_id": pipeline_id})


PONG_MESSAGE: Final = _dump({"type": "pong"})


def snapshot_message(run_state: Mapping[str, Any]) -> str:
    """``run_state`` is the run's SPEC §6 state, already in JSON form."""
    return _dump({"type": "snapshot", "pipeline": run_state})


# --------------------------------------------------------------------------- helpers
def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _short(exc: BaseException) -> str:
    return _clip(str(exc) or type(exc).__name__, 120)


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


__all__ = [
    "ALL",
    "CLIENT_MESSAGE_TYPES",
    "MAX_PIPELINE_ID_LENGTH",
    "PONG_MESSAGE",
    "ClientMessage",
    "ErrorCode",
    "Ping",
    "ProtocolError",
    "Subscribe",
    "Unsubscribe",
    "error_message",
    "parse_client_frame",
    "parse_client_message",
    "parse_event_types",
    "parse_since",
    "snapshot_message",
    "subscribed_message",
    "unsubscribed_message",
    "validate_pipeline_id",
]
