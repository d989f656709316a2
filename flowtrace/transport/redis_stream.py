"""Redis Streams transport: at-least-once, ordered, replayable (``since``) across processes.

Publishing goes through :class:`~flowtrace.transport._sender.BatchSender`: ``publish``
appends to a local buffer and a background task XADDs batches (``MAXLEN ~ maxlen``).
Each subscriber blocks in ``XREAD`` on its own connection and resumes from the
last id it delivered after any Redis outage, so nothing retained is missed or
repeated. Event ids are the stream entry ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from flowtrace.events import Event
from flowtrace.transport import _sender
from flowtrace.transport._sender import (
    Backoff,
    Outage,
    SenderBackedTransport,
    as_text,
    check_cancelled,
    log,
    make_client,
)
from flowtrace.transport.base import FROM_BEGINNING, describe

StreamId = tuple[int, int]

_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:-]+")
_STREAM_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")
_MAX_ID_PART = 2**64 - 1
_FIELD = "e"
_FIELD_BYTES = _FIELD.encode()
_CLOSE_WAIT_S = 2.0


def parse_stream_id(value: str) -> StreamId | None:
    """``(ms, seq)`` of a stream id ``"<ms>-<seq>"`` or ``"<ms>"`` (``<ms>-0``, as Redis
    reads it), None when it is not one."""
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2] or 0)
    return (ms, seq) if ms <= _MAX_ID_PART and seq <= _MAX_ID_PART else None


def canonical_stream_id(value: str) -> str | None:
    """``value`` as ``"<ms>-<seq>"`` (``"5"`` is ``"5-0"``), None when it is no stream id."""
    parsed = parse_stream_id(value)
    return None if parsed is None else f"{parsed[0]}-{parsed[1]}"


class RedisStreamTransport(SenderBackedTransport):
    """Events in one Redis stream, shared by every worker and gateway.

    ``approximate=False`` trims exactly to ``maxlen`` (slower on the server; tests
    use it to make trimming deterministic). ``block_ms`` is how long one XREAD
    waits; subscribers use a socket timeout above it. ``linger_ms`` is how long a batch
    of published events may wait to fill before it is sent (``flush`` never waits for it).
    """

    def __init__(self, url: str, stream: str = "flowtrace:events", maxlen: int = 100_000, *,
                 buffer_size: int = 10_000, batch_size: int = 500, block_ms: int = 1000,
                 socket_timeout: float = 5.0, approximate: bool = True,
                 linger_ms: float = _sender.LINGER_MS) -> None:
        super().__init__()
        if maxlen < 1 or block_ms < 1:
            raise ValueError("maxlen and block_ms must be positive")
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._socket_timeout = socket_timeout
        self._trim: tuple[str | int, ...] = (
            ("MAXLEN", "~", maxlen) if approximate else ("MAXLEN", maxlen))
        self._start_sender(make_client(url, socket_timeout), f"flowtrace publisher ({stream})",
                           buffer_size, batch_size, linger_ms)
        self._closed = False

    # -- publishing -------------------------------------------------------------

    def publish_prefix(self) -> _sender.Command:
        return ("XADD", self.stream, *self._trim, "*", _FIELD)

    async def close(self) -> None:
        """Ship what is buffered (≤ 2 s), stop the sender, release connections.

        Subscribers end within ``block_ms`` (or their current retry delay).
        """
        self._closed = True
        await self._sender.close(_CLOSE_WAIT_S)
        await self._client.aclose()

    # -- subscribing ------------------------------------------------------------

    def subscribe(self, since: str | None = None) -> AsyncIterator[Event]:
        """Events added after this call, or every retained one after ``since`` first.

        The stream's current end is looked up right away (when a loop is running),
        so "new" means new since this call rather than since the first ``anext``.
        A malformed ``since`` is ignored (live events only); one beyond the stream's
        end, e.g. from another Redis, starts at the end.
        """
        start = None
        if since is not None:
            start = canonical_stream_id(since)
            if start is None:
                log.warning("flowtrace: ignoring malformed resume id %r", since)
        early: asyncio.Task[str | None] | None = None
        # Without a running loop the iterator looks the end up when first awaited.
        with contextlib.suppress(RuntimeError):
            early = asyncio.get_running_loop().create_task(self._try_stream_end())
        return self._follow(start, early)

    async def _follow(self, since: str | None,
                      early: asyncio.Task[str | None] | None) -> AsyncIterator[Event]:
        client = make_client(self.url, max(self._socket_timeout, self._block_ms / 1000 + 1.0))
        outage = Outage(f"flowtrace subscriber ({self.stream})")
        backoff = Backoff()
        try:
            last = await self._start_id(client, since, early, outage, backoff)
            while not self._closed:
                try:
                    response = await client.xread({self.stream: last}, count=self._batch_size,
                                                  block=self._block_ms)
                except Exception as exc:  # noqa: BLE001 - outage: back off, resume from `last`
                    check_cancelled()
                    outage.failed(exc)
                    await backoff.sleep()
                    continue
                check_cancelled()
                outage.ok()
                backoff.reset()
                for entry_id, fields in _entries(response):
                    last = entry_id
                    event = self._decode(entry_id, _payload(fields))
                    if event is not None:
                        yield event
        finally:
            if early is not None:
                early.cancel()
            await client.aclose()

    async def _start_id(self, client: Redis, since: str | None,
                        early: asyncio.Task[str | None] | None,
                        outage: Outage, backoff: Backoff) -> str:
        end = await early if early is not None else None
        while end is None:
            try:
                end = await self._stream_end(client)
            except Exception as exc:  # noqa: BLE001 - Redis down at start: wait for it
                check_cancelled()
                outage.failed(exc)
                await backoff.sleep()
        if since is not None and _id(since) <= _id(end):
            return since
        return end

    async def _try_stream_end(self) -> str | None:
        client = make_client(self.url, self._socket_timeout)
        try:
            return await self._stream_end(client)
        except Exception:  # noqa: BLE001 - the iterator retries with backoff
            return None
        finally:
            await client.aclose()

    async def _stream_end(self, client: Redis) -> str:
        """The stream's last generated id (what ``$`` means now); ``0-0`` when it is missing."""
        info = await self._stream_info(client)
        return "0-0" if info is None else as_text(info["last-generated-id"])

    async def _stream_info(self, client: Redis) -> dict[str, Any] | None:
        try:
            info = await client.xinfo_stream(self.stream)
        except ResponseError as exc:
            check_cancelled()
            if "no such key" in str(exc).lower():
                return None
            raise
        check_cancelled()
        return info

    def _decode(self, entry_id: str, raw: object) -> Event | None:
        """The event of one entry's payload (see :func:`_payload`), its ``id`` set."""
        event = _sender.decode_event(raw, self._count_drop, f"{self.stream} {entry_id}")
        if event is None:
            return None
        return event.model_copy(update={"id": entry_id})

    # -- resume -----------------------------------------------------------------

    def replay(self, since: str, pipeline_id: str | None = None) -> AsyncIterator[Event]:
        """Retained events after ``since`` up to the stream's end when first awaited, then stop.

        With ``pipeline_id``, only that run's: an entry whose JSON does not hold the id is
        skipped undecoded (one client resuming one run reads the stream, but decodes only
        its run's events). Raises the Redis error when Redis is unreachable (the caller
        retries); a malformed ``since`` replays nothing.
        """
        return self._replay(since, pipeline_id)

    async def _replay(self, since: str, pipeline_id: str | None) -> AsyncIterator[Event]:
        start = canonical_stream_id(since)
        if start is None:
            log.warning("flowtrace: ignoring malformed resume id %r", since)
            return
        needle = _json_string_bytes(pipeline_id)
        end = await self._stream_end(self._client)
        last = start
        while _id(last) < _id(end):
            entries = await self._client.xrange(self.stream, min=f"({last}", max=end,
                                                count=self._batch_size)
            check_cancelled()
            if not entries:
                return
            for entry_id, fields in entries:
                last, raw = as_text(entry_id), _payload(fields)
                if needle is not None and isinstance(raw, bytes) and needle not in raw:
                    continue  # not this run's: not decoded
                event = self._decode(last, raw)
                if event is not None and pipeline_id in (None, event.pipeline_id):
                    yield event

    def history_is_truncated(self, since: str) -> bool:
        """Conservative, as knowing needs Redis: True unless ``since`` is ``FROM_BEGINNING``.

        Use :meth:`is_history_truncated`.
        """
        return canonical_stream_id(since) != FROM_BEGINNING

    async def is_history_truncated(self, since: str) -> bool:
        """True when some entry after ``since`` was trimmed or deleted, or ``since`` is foreign.

        Malformed ids, ids beyond the stream's end and an unreachable Redis count as
        truncated. On Redis < 7 (no ``entries-added``) an id older than the first
        retained entry counts as truncated once anything was ever trimmed.
        """
        wanted = parse_stream_id(since)
        if wanted is None:
            return True
        if wanted == (0, 0):  # FROM_BEGINNING
            return False
        try:
            info = await self._stream_info(self._client)
        except Exception as exc:  # noqa: BLE001 - cannot check: say "maybe truncated"
            log.debug("flowtrace: cannot check stream history: %s", describe(exc))
            return True
        return info is None or _trimmed_after(wanted, info)  # no stream: all of it is gone


def _json_string_bytes(text: str | None) -> bytes | None:
    """``text`` as any JSON encoder writes it, quotes included, when that is certain (letters,
    digits and ``_.:-``, which none escapes: task ids are); else None."""
    if text is None or _PLAIN_ID.fullmatch(text) is None:
        return None
    return b'"' + text.encode() + b'"'


def _payload(fields: object) -> object:
    """An entry's event JSON (bytes, as the client returns it), None when it has none."""
    return fields.get(_FIELD_BYTES) if isinstance(fields, Mapping) else None


def _trimmed_after(wanted: StreamId, info: Mapping[str, Any]) -> bool:
    last = _id(as_text(info["last-generated-id"]))
    if wanted > last:
        return True
    if _id(as_text(info.get("max-deleted-entry-id") or "0-0")) > wanted:
        return True  # XDEL'd after `wanted` (Redis >= 7 tracks this)
    first = info.get("first-entry")
    if first and wanted >= _id(as_text(first[0])):
        return False  # trimming only removes entries older than the first retained one
    added = info.get("entries-added")
    if added is None:
        return True
    if int(added) == int(info["length"]):
        # Every entry this stream ever held is retained, and all are newer: `wanted` was
        # never one of them. It comes from an earlier incarnation of the stream (a Redis
        # restarted without persistence, a deleted stream) whose later events are gone.
        return True
    # Something was trimmed before the first retained entry; we cannot tell whether it
    # was only `wanted` itself, so any removal counts (an empty stream: only if newer).
    return wanted < last


def _id(value: str) -> StreamId:
    parsed = parse_stream_id(value)
    return parsed if parsed is not None else (0, 0)


def _entries(response: object) -> Iterator[tuple[str, object]]:
    """``(entry id, fields)`` from an XREAD reply, RESP2 (list) or RESP3 (dict) shaped."""
    if not response:
        return
    if isinstance(response, Mapping):
        per_stream: Any = response.values()
    else:
        per_stream = (item[1] for item in cast("list[Any]", response))
    for entries in per_stream:
        for entry_id, fields in entries:
            yield as_text(entry_id), fields
