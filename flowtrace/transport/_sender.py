"""What both Redis transports share: the buffered background sender and small helpers.

``publish`` must never wait on the network, so it only appends an operation (an
event's JSON, or a tuple of Redis commands) to a bounded local buffer; one background
task ships the buffer in batches, in order, each applied whole or not at all. Before a
batch leaves, the task lets it fill for up to ``linger`` seconds (unless a ``flush``
waits or the batch is full): a worker emitting thousands of events a second then pays
one round trip for dozens of them, not one each. A batch goes to Redis as one Lua script
call (where the server runs scripts): redis-py packs and parses every command in Python,
and one command per event cost the worker six times the CPU. The script applies a batch
once only: a batch sent again after a timeout may still be waiting in a hung server's
socket (SIGSTOP, a partition) and run when it resumes, so the script skips any batch not
newer than the last one applied for this sender (keys ``flowtrace:batches:*``, one per
sender, expiring after a day). Without scripting a batch is one command or a MULTI/EXEC
transaction, and such a resend is applied twice (at-least-once). While Redis is unreachable,
or reachable but unable to take writes (a replica after a failover, a script running too
long, memory full), the task keeps the buffer (dropping the oldest operations beyond
``buffer_size``), retries with exponential backoff and logs once per outage.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from flowtrace.events import BaseEvent, Event, InvalidEvent, parse_event
from flowtrace.metrics import (
    DROP_BUFFER_FULL,
    DROP_CLOSED,
    DROP_INVALID_EVENT,
    DROP_REDIS_ERROR,
    DROP_UNSERIALIZABLE,
)
from flowtrace.transport.base import BACKOFF_MAX_S, BACKOFF_MIN_S, Transport, describe

log = logging.getLogger("flowtrace.transport")

Arg = str | bytes | int | float
Command = tuple[Arg, ...]
Op = tuple[Command, ...] | str
"""Commands that belong together (e.g. HINCRBY + EXPIRE), shipped in the same batch, or
an event's JSON to publish."""

COUNTER_TTL_S = 86_400
BATCHES_TTL_S = 86_400
"""How long Redis remembers a sender's last applied batch: far longer than a copy of a batch
can wait in a hung server's socket."""
LINGER_MS = 5.0
"""How long a batch may wait to fill by default. A busy taskiq worker emits an event every
few hundred µs, faster than one round trip: without it every event went alone, in its
own MULTI/EXEC, and shipping cost the worker more CPU than the rest of flowtrace."""


_CANNOT_WRITE_NOW = (ReadOnlyError, MasterDownError, OutOfMemoryError, TryAgainError,
                     ClusterDownError)
_ANNOTATION = " of pipeline caused error: "


def server_text(exc: BaseException) -> str:
    """An error's text as the server sent it: inside a transaction redis-py rewrites it as
    ``Command # 1 (...) of pipeline caused error: ('<text>',)``."""
    text = str(exc)
    _, annotated, original = text.rpartition(_ANNOTATION)
    return original.lstrip("('\"") if annotated else text


def cannot_write_now(exc: BaseException) -> bool:
    """Whether Redis refused a command for its own state, not the command's: a replica (after
    a failover), a script running past ``busy-reply-threshold``, full memory. Such a
    refusal comes before anything runs, so the batch is kept and sent again."""
    if isinstance(exc, _CANNOT_WRITE_NOW):
        return True
    return isinstance(exc, ResponseError) and server_text(exc).startswith("BUSY ")


def make_client(url: str, socket_timeout: float) -> Redis:
    """A client that fails fast: flowtrace retries by itself, with backoff, in the background.

    One immediate retry on a connection error only: a pooled connection the server
    closed (Redis restarted, idle timeout) is replaced at once instead of failing the
    first command after Redis is back, which made ``flush`` report an outage and broke
    cross-process order. Timeouts are not retried.
    """
    return Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


def counter_key(key: str) -> str:
    return f"flowtrace:items:{key}"


def claim_key(key: str) -> str:
    return f"flowtrace:claims:{key}"


def count_op(key: str, failed: bool) -> Op:
    name = counter_key(key)
    return (("HINCRBY", name, "failed" if failed else "done", 1), ("EXPIRE", name, COUNTER_TTL_S))


def forget_op(key: str) -> Op:
    return (("DEL", counter_key(key)),)


async def read_counts(client: Redis, key: str) -> tuple[int, int]:
    """``(done, failed)`` stored under ``key``; (0, 0) on any error."""
    try:
        done, failed = await client.hmget(counter_key(key), ["done", "failed"])
        check_cancelled()
        return int(done or 0), int(failed or 0)
    except Exception as exc:  # noqa: BLE001 - documented: unreachable reads as nothing counted
        log.debug("flowtrace: reading item counts for %s failed: %s", key, describe(exc))
        return 0, 0


def decode_event(raw: object, count_drop: Callable[[str], None], where: str) -> Event | None:
    """Parse one payload; an invalid one is logged, counted ``invalid_event`` and skipped."""
    try:
        if not isinstance(raw, (str, bytes)):
            raise InvalidEvent(f"payload is {type(raw).__name__}, not JSON text")
        return parse_event(raw)
    except Exception as exc:  # noqa: BLE001 - InvalidEvent, or a surprise: never stop a reader
        log.warning("flowtrace: skipping invalid event at %s: %s", where, exc)
        count_drop(DROP_INVALID_EVENT)
        return None


def as_text(value: object) -> str:
    """A Redis reply's bytes (an entry id, an error) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def check_cancelled() -> None:
    """Re-raise a cancellation that redis-py lost; call after each Redis await in a loop.

    redis-py sends commands through ``asyncio.wait_for``, which on Python 3.11
    swallows a ``cancel()`` arriving as the send completes: the task is then
    "cancelling" but runs on, and a loop around the command would never stop.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    if cancelling is not None and cancelling() > 0:
        raise asyncio.CancelledError


class Backoff:
    """Exponential delays from 0.1 s, doubling up to a 5 s cap."""

    def __init__(self) -> None:
        self.delay = BACKOFF_MIN_S

    def reset(self) -> None:
        self.delay = BACKOFF_MIN_S

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, BACKOFF_MAX_S)


class Outage:
    """Connection state with one log line per outage, not one per failed attempt."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            log.warning("flowtrace: %s lost Redis (%s); retrying in the background",
                        self.what, describe(exc))
        self.down = True

    def ok(self) -> None:
        if self.down:
            log.warning("flowtrace: %s reconnected to Redis", self.what)
        self.down = False


_APPLY_BATCH = """
local batch = ARGV[1]
if tonumber(batch) <= tonumber(redis.call('GET', KEYS[1]) or 0) then
    return {}
end
redis.call('SET', KEYS[1], batch, 'EX', ARGV[2])
local failed, call, i = {}, 0, 3
while i <= #ARGV do
    local shared, command = tonumber(ARGV[i]), {}
    for j = 1, shared do command[j] = ARGV[i + j] end
    local first = i + shared + 2
    i = first + tonumber(ARGV[first - 1])
    for j = first, i - 1 do
        command[shared + 1] = ARGV[j]
        call = call + 1
        local reply = redis.pcall(unpack(command))
        if type(reply) == 'table' and reply.err then
            failed[#failed + 1] = call
            failed[#failed + 1] = reply.err
        end
    end
end
return failed
"""
"""Apply a batch unless it is not newer than the last one applied (``KEYS[1]``): a copy.

``ARGV``: the batch's number, the TTL of ``KEYS[1]``, then runs of commands, each as the
number of arguments its commands share, those, the number of commands, and each one's
last argument. A failed command does not stop the others; the reply lists each failed
one's position (from 1) and error. The first write is the ``SET``: a server refusing
writes (a replica, OOM) refuses the script before it changes anything.
"""

Run = tuple[Command, list[Arg], int]
"""Commands sharing all but their last argument: the shared ones, each command's last one,
and how many operations each command stands for when it fails."""


class Publishing(abc.ABC):
    """How a transport publishes an event's JSON."""

    @abc.abstractmethod
    def publish_prefix(self) -> Command:
        """The Redis command that publishes one event but for its last argument, the JSON."""


class BatchSender:
    """Ships queued operations in order from one background task.

    Each operation gets a sequence number; :meth:`flush` waits until no
    operation numbered at or below the last one submitted before it is still
    pending (sent or dropped). ``linger``: seconds a batch may wait to fill (see the
    module doc). Use from one event loop thread.
    """

    def __init__(self, client: Redis, publishing: Publishing, *, what: str, buffer_size: int,
                 batch_size: int, count_drop: Callable[[str, int], None],
                 linger: float) -> None:
        if buffer_size < 1 or batch_size < 1:
            raise ValueError("buffer_size and batch_size must be positive")
        if linger < 0:
            raise ValueError("linger must not be negative")
        self._client = client
        self._publishing = publishing
        self._batches_key = f"flowtrace:batches:{secrets.token_hex(8)}"
        """Where Redis keeps the number of this sender's last applied batch."""
        self._scripting: bool | None = None
        """Whether the server runs the publish script (None: not asked yet)."""
        self._buffer: deque[tuple[int, Op]] = deque()
        self._in_flight: list[tuple[int, Op]] = []
        self._buffer_size = buffer_size
        self._batch_size = batch_size
        self._count_drop = count_drop
        self._linger = linger
        self._submitted = 0
        self._awaited = 0
        """The newest operation a :meth:`flush` waits for: the batch holding it leaves at once."""
        self._send_now = asyncio.Event()
        self._outage = Outage(what)
        self._stalled = False
        """A flush timed out on the batch in flight: Redis may hang (no reply, no error)
        until the socket timeout, so flushes answer False at once until a batch is sent."""
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        return len(self._in_flight) + len(self._buffer)

    def submit(self, op: Op) -> None:
        """Queue ``op`` (never waits); beyond ``buffer_size`` the oldest queued op is dropped."""
        if self._closed:
            self._count_drop(DROP_CLOSED, 1)
            return
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self._count_drop(DROP_BUFFER_FULL, 1)
        self._submitted += 1
        self._buffer.append((self._submitted, op))
        self._wakeup.set()
        if len(self._buffer) >= self._batch_size:
            self._send_now.set()
        self._ensure_task()

    async def flush(self, timeout: float) -> bool:
        """True once everything submitted so far left; False if Redis is down or on timeout,
        and at once after a timeout until the batch then in flight is sent."""
        target = self._submitted
        self._awaited = max(self._awaited, target)
        self._send_now.set()
        self._ensure_task()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._oldest_pending() <= target:
            remaining = deadline - loop.time()
            if self._outage.down or self._stalled:
                return False
            if remaining <= 0:
                self._stalled = bool(self._in_flight)
                return False
            progress = self._progress
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(progress.wait(), remaining)
        return True

    async def close(self, timeout: float) -> None:
        """Flush (bounded), stop the task; what is still unsent is counted ``closed``."""
        if self._task is not None:
            self._stalled = False  # the last chance to send: wait for it, if bounded
            await self.flush(timeout)
            self._task.cancel()
            await asyncio.wait([self._task])
        self._closed = True
        if self.pending:
            self._count_drop(DROP_CLOSED, self.pending)
        self._buffer.clear()
        self._in_flight = []

    def _ensure_task(self) -> None:
        """Start the sender in the running loop (again, if a loop shutdown cancelled it)."""
        if self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a sync caller of count_item): the next submit or
            return            # flush starts it
        if self._task is not None and self._task.get_loop() is not loop:
            # asyncio's events belong to the loop they were first awaited in.
            self._send_now, self._wakeup, self._progress = (
                asyncio.Event(), asyncio.Event(), asyncio.Event())
        self._task = loop.create_task(self._run(), name=f"{self._outage.what} sender")

    def _oldest_pending(self) -> int:
        if self._in_flight:
            return self._in_flight[0][0]
        return self._buffer[0][0] if self._buffer else self._submitted + 1

    def _pulse(self) -> None:
        """Wake every flush waiter to re-check its condition."""
        self._progress.set()
        self._progress = asyncio.Event()

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            if not self._in_flight:
                if not self._buffer:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._let_fill()
                take = min(self._batch_size, len(self._buffer))
                self._in_flight = [self._buffer.popleft() for _ in range(take)]
            try:
                if self._scripting is None:
                    self._scripting = await self._runs_scripts()
                failures = await self._deliver(self._in_flight)
            except Exception as exc:  # noqa: BLE001 - any failure: keep the batch, back off, retry
                check_cancelled()
                self._outage.failed(exc)
                self._pulse()
                await backoff.sleep()
                continue
            self._outage.ok()
            self._stalled = False
            backoff.reset()
            self._in_flight = []
            self._report_errors(failures)
            self._pulse()
            check_cancelled()

    async def _let_fill(self) -> None:
        """Wait up to ``linger`` for more operations, unless a flush waits for a buffered one
        or a full batch is buffered already."""
        if (self._linger <= 0 or len(self._buffer) >= self._batch_size
                or self._buffer[0][0] <= self._awaited):
            return
        self._send_now.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._send_now.wait(), self._linger)
        check_cancelled()  # wait_for, too, can lose a cancel() on Python < 3.12

    async def _runs_scripts(self) -> bool:
        """Ask the server whether it runs the batch script: scripting may be disabled, or the
        script or its key denied to this user by an ACL. Asked (as batch 0, which applies
        nothing) before the first batch, and again when a script call is refused."""
        try:
            await self._client.execute_command(  # type: ignore[no-untyped-call]
                *self._script_call([], 0))
        except ResponseError as exc:
            if cannot_write_now(exc):  # busy, not refusing: ask again once it answers
                raise
            log.warning("flowtrace: %s: Redis runs no scripts (%s); publishing one command "
                        "per event", self._outage.what, describe(exc))
            return False
        finally:
            check_cancelled()
        return True

    async def _deliver(self, batch: list[tuple[int, Op]]) -> list[tuple[Exception, int]]:
        """Each command Redis rejected, with how many operations it stood for.

        A batch is applied whole or not at all, so resending one that a dropped connection
        cut off does not duplicate its first events (nor count an item twice): one script
        call, which skips a copy of a batch already applied (see ``_APPLY_BATCH``), or,
        without scripting, one command or a MULTI/EXEC transaction, applied again when sent
        again. A refusal of the whole batch (the script call, or the transaction before it
        ran) applied nothing: raised when Redis cannot take writes now (the batch is
        retried); the batch sent again one command each when the server stopped running
        scripts since it was asked (a changed ACL or configuration); else it fails whole.
        """
        runs = self._runs(batch)
        sizes = [size for _, lasts, size in runs for _ in lasts]
        try:
            if self._scripting:
                reply = await self._client.execute_command(  # type: ignore[no-untyped-call]
                    *self._script_call(runs, batch[-1][0]))
                return [(ResponseError(as_text(error)), sizes[int(call) - 1])
                        for call, error in zip(reply[::2], reply[1::2], strict=True)]
            commands = [(*shared, last) for shared, lasts, _ in runs for last in lasts]
            if len(commands) == 1:
                await self._client.execute_command(*commands[0])  # type: ignore[no-untyped-call]
                return []
            async with self._client.pipeline(transaction=True) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)  # errors as replies
            return [(reply, size) for reply, size in zip(replies, sizes, strict=True)
                    if isinstance(reply, Exception)]
        except ResponseError as refusal:
            if cannot_write_now(refusal):
                raise
            if await self._scripting_lost():
                return await self._deliver(batch)  # once: scripting is off now
            return [(refusal, sum(sizes))]

    async def _scripting_lost(self) -> bool:
        """Whether the server refused the publish script itself: asked again (an error inside
        the script, a key of the wrong type say, leaves scripting as it was)."""
        if not self._scripting:
            return False
        self._scripting = await self._runs_scripts()
        return not self._scripting

    def _runs(self, batch: list[tuple[int, Op]]) -> list[Run]:
        """The batch's commands, in order: consecutive events are one run."""
        publish = self._publishing.publish_prefix()
        runs: list[Run] = []
        for _, op in batch:
            if isinstance(op, str):
                if runs and runs[-1][0] is publish:  # after another event
                    runs[-1][1].append(op)
                else:
                    runs.append((publish, [op], 1))
                continue
            # The operation is counted once, on its first command (HINCRBY, not EXPIRE).
            runs += [(command[:-1], [command[-1]], int(i == 0)) for i, command in enumerate(op)]
        return runs

    def _script_call(self, runs: list[Run], number: int) -> Command:
        """The ``EVAL`` of ``_APPLY_BATCH`` that applies ``runs`` as batch ``number``."""
        args: list[Arg] = ["EVAL", _APPLY_BATCH, 1, self._batches_key, number, BATCHES_TTL_S]
        for shared, lasts, _ in runs:
            args += [len(shared), *shared, len(lasts), *lasts]
        return tuple(args)

    def _report_errors(self, failures: list[tuple[Exception, int]]) -> None:
        """Count the operations of what Redis rejected as dropped."""
        if failures:
            log.warning("flowtrace: Redis rejected %d command(s), e.g. %s", len(failures),
                        describe(failures[0][0]))
            self._count_drop(DROP_REDIS_ERROR, sum(size for _, size in failures))


class SenderBackedTransport(Transport, Publishing):
    """What both Redis transports share: one :class:`BatchSender` ships publishes and counts."""

    _sender: BatchSender
    _client: Redis
    _closed: bool
    _sender_settings: tuple[str, int, int, float]

    def _start_sender(self, client: Redis, what: str, buffer_size: int,
                      batch_size: int, linger_ms: float) -> None:
        self._client = client
        self._sender_settings = (what, buffer_size, batch_size, linger_ms)
        self._sender = BatchSender(client, self, what=what, buffer_size=buffer_size,
                                   batch_size=batch_size, count_drop=self._count_drop,
                                   linger=linger_ms / 1000)

    def reopen(self) -> None:
        """A new sender after :meth:`close` (the client makes new connections on demand)."""
        if self._sender.closed:
            self._start_sender(self._client, *self._sender_settings)
        self._closed = False

    def publish_nowait(self, event: BaseEvent) -> None:
        """Buffer ``event`` for the background sender; never waits on Redis."""
        try:
            payload = event.model_dump_json()
        except Exception as exc:  # noqa: BLE001 - publish never raises into the caller
            log.warning("flowtrace: dropping unserializable %s: %r", type(event).__name__, exc)
            self._count_drop(DROP_UNSERIALIZABLE)
            return
        self._sender.submit(payload)

    async def flush(self, timeout: float = 2.0) -> bool:
        """Wait until everything published so far is in Redis.

        False at once while Redis is known to be unreachable, else False on timeout.
        """
        return await self._sender.flush(timeout)

    def count_item(self, key: str, failed: bool) -> None:
        self._sender.submit(count_op(key, failed))

    def forget_counts(self, key: str) -> None:
        """DEL the hash (else kept for ``COUNTER_TTL_S``: a day of keys on a busy fleet)."""
        self._sender.submit(forget_op(key))

    async def claim(self, key: str, ttl_s: float) -> bool:
        """First to ``SET NX`` the claim's key in Redis (every gateway on it sees one winner)."""
        claimant = f"{socket.gethostname()}:{os.getpid()}"  # who declared it, for whoever looks
        claimed = await self._client.set(claim_key(key), claimant, nx=True,
                                         ex=max(1, round(ttl_s)))
        return bool(claimed)

    async def read_counts(self, key: str) -> tuple[int, int]:
        """Counts in Redis, after shipping this process's own pending increments (≤ 1 s)."""
        await self._sender.flush(timeout=1.0)
        return await read_counts(self._client, key)
