"""In-process transport: a bounded ring of recent events plus per-subscriber queues.

Event ids are ``"<epoch>-<seq>"``: ``epoch`` identifies this incarnation (a
millisecond boot timestamp, unique within the process), ``seq`` counts up from 1.
An id from another incarnation is therefore recognisable, and resume after a
restart reports truncated history instead of silently skipping events.

Everything here runs on the event loop thread: ``publish`` and ``subscribe`` are
not thread-safe and never suspend, which is what makes the replay-then-live
hand-over in :meth:`InMemoryTransport.subscribe` gap- and duplicate-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from flowtrace.events import BaseEvent, Event, EventFields, event_of
from flowtrace.metrics import DROP_SUBSCRIBER_OVERFLOW
from flowtrace.transport.base import FROM_BEGINNING, Transport

_ID = re.compile(r"([0-9]+)(?:-([0-9]{1,18}))?")
_last_epoch = 0
_MAX_COUNTER_KEYS = 10_000


def new_epoch() -> str:
    """A millisecond boot timestamp, strictly increasing within this process."""
    global _last_epoch
    _last_epoch = max(time.time_ns() // 1_000_000, _last_epoch + 1)
    return str(_last_epoch)


def split_id(event_id: str) -> tuple[str, int] | None:
    """``(epoch, seq)`` of an ``"<epoch>-<seq>"`` id, None when malformed; ``"<epoch>"`` is
    ``"<epoch>-0"`` (before this incarnation's first event), as Redis reads a bare stream id."""
    match = _ID.fullmatch(event_id)
    return (match[1], int(match[2] or 0)) if match else None


class _Queue(asyncio.Queue["tuple[int, Event] | None"]):
    """A subscriber's live queue of ``(seq, event)``; ``None`` = transport closed."""


class InMemoryTransport(Transport):
    """Events for one process: publish, subscribe and resume with ``since``.

    Keeps the last ``maxlen`` events for replay. Each subscriber gets a queue of
    ``subscriber_queue_size`` events; a subscriber that falls that far behind
    loses events (counted as ``subscriber_overflow``), the publisher never waits.
    Use from the event loop thread only.
    """

    buffers = False

    def __init__(self, maxlen: int = 10_000, *, subscriber_queue_size: int = 10_000) -> None:
        super().__init__()
        if maxlen < 1 or subscriber_queue_size < 1:
            raise ValueError("maxlen and subscriber_queue_size must be positive")
        self.epoch = new_epoch()
        self._id_prefix = f"{self.epoch}-"
        self._seq = 0
        # Each event's field dict (its ``__dict__``), not the model: a dict of plain values
        # is not tracked by the garbage collector, which would otherwise walk 10 000 models
        # in every full collection. Seqs are contiguous, the newest being ``_seq``.
        self._ring: deque[EventFields] = deque(maxlen=maxlen)
        self._queue_size = subscriber_queue_size
        # Weak: a subscribe() whose iterator is dropped unstarted must not pin a queue.
        self._subscribers: weakref.WeakSet[_Queue] = weakref.WeakSet()
        self._fanout: tuple[_Queue, ...] | None = None  # snapshot of _subscribers, rebuilt lazily
        self._counts: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._closed = False

    def publish_nowait(self, event: BaseEvent) -> None:
        """Give ``event`` a fresh id (in place) and hand it to every subscriber (no suspension).

        The id is set on the object itself, not a copy: the hooks of the emitting process
        hold the same object and see the id too, and no copy is made per event.
        """
        self.publish_fields_nowait(event.__dict__, event)  # type: ignore[arg-type]

    def publish_fields_nowait(self, fields: EventFields, event: Event | None = None) -> None:
        """:meth:`publish_nowait` of an event's fields (``event``: their model, if built).

        A model of them is built only when someone subscribes (one, for every subscriber);
        the ring keeps the dict itself.
        """
        seq = self._seq = self._seq + 1
        fields["id"] = self._id_prefix + str(seq)  # a dict, not pydantic's __setattr__: hot path
        self._ring.append(fields)
        fanout = self._fanout
        if fanout is None:
            fanout = self._fanout = tuple(self._subscribers)
        if not fanout:
            return
        entry = (seq, event if event is not None else event_of(fields))
        for queue in fanout:
            try:
                queue.put_nowait(entry)
            except asyncio.QueueFull:
                self._count_drop(DROP_SUBSCRIBER_OVERFLOW)

    def subscribe(self, since: str | None = None) -> AsyncIterator[Event]:
        """Live events from now on; with ``since``, every retained event after it first.

        The live queue is registered and the ring snapshotted in this synchronous
        call, so no event can fall between replay and live. A ``since`` from
        another incarnation replays everything retained; a malformed one, nothing.
        """
        queue = _Queue(self._queue_size)
        if not self._closed:
            self._subscribers.add(queue)
            self._fanout = None
            weakref.finalize(queue, self._subscribers_changed)
        replay = self._retained_after(since) if since is not None else []
        return self._iterate(queue, replay, self._seq)

    def replay(self, since: str, pipeline_id: str | None = None) -> AsyncIterator[Event]:
        """The retained events after ``since`` (of ``pipeline_id`` only, if given) at the time
        of this call, then stop."""
        return _yield_all(self._retained_after(since, pipeline_id))

    def _retained_after(self, since: str, pipeline_id: str | None = None) -> list[Event]:
        parsed = split_id(since)
        if parsed is None or not self._ring:
            return []
        epoch, seq = parsed
        if since == FROM_BEGINNING or epoch != self.epoch:
            start = 0
        else:  # seqs in the ring are contiguous: the first one after ``seq`` is at an offset
            start = max(0, seq - self._oldest_seq() + 1)
        retained = itertools.islice(self._ring, start, None)
        return [_rebuilt(fields) for fields in retained
                if pipeline_id is None or fields["pipeline_id"] == pipeline_id]

    async def _iterate(
        self, queue: _Queue, replay: list[Event], replayed_upto: int
    ) -> AsyncIterator[Event]:
        try:
            for event in replay:
                yield event
            while not self._closed:
                entry = await queue.get()
                if entry is None or self._closed:
                    return
                if entry[0] > replayed_upto:  # else already replayed (cannot happen: defensive)
                    yield entry[1]
        finally:
            self._subscribers.discard(queue)
            self._fanout = None

    def _subscribers_changed(self) -> None:
        self._fanout = None

    def history_is_truncated(self, since: str) -> bool:
        """True for a malformed or foreign ``since``, or one older than the ring keeps.

        ``FROM_BEGINNING`` asks for whatever is retained, so it is never truncated.
        """
        if since == FROM_BEGINNING:
            return False
        parsed = split_id(since)
        if parsed is None or parsed[0] != self.epoch or parsed[1] > self._seq:
            return True
        oldest = self._oldest_seq()
        return parsed[1] < oldest - 1

    def _oldest_seq(self) -> int:
        """Seq of the oldest retained event (``_seq + 1`` when none is)."""
        return self._seq - len(self._ring) + 1

    def count_item(self, key: str, failed: bool) -> None:
        done, failures = self._counts.pop(key, (0, 0))
        self._counts[key] = (done, failures + 1) if failed else (done + 1, failures)
        while len(self._counts) > _MAX_COUNTER_KEYS:  # bounded: the demo runs for days
            self._counts.popitem(last=False)

    async def read_counts(self, key: str) -> tuple[int, int]:
        return self._counts.get(key, (0, 0))

    def forget_counts(self, key: str) -> None:
        self._counts.pop(key, None)

    def reopen(self) -> None:
        """Take subscribers again after :meth:`close` (the ring and ids carry on)."""
        self._closed = False

    async def close(self) -> None:
        """End every subscriber's iterator."""
        self._closed = True
        for queue in list(self._subscribers):
            # A full queue's iterator sees ``_closed`` after its next get.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()
        self._fanout = None


def _rebuilt(fields: EventFields) -> Event:
    """A retained event, as a model again (its own copy of the fields)."""
    return event_of(dict(fields))


async def _yield_all(events: list[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event
