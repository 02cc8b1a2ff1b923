"""Request coalescing in front of a deployment (``Coalescer``) and batch merging inside a
replica (``MergingRunner``).

Ray Serve pays a fixed cost per call in the caller's router thread and in the replica
(an actor call, pickling, Serve's request wrapper and metrics): a few ms of CPU on this
2-core machine against ~1.3 ms for a 1-sample GAN forward pass. So the gateway groups
concurrent requests for the same model and sends each group as one call, and the replica
runs the requests of every group it holds in one forward pass.

How a group forms ("send when the pipe is free"): a model has ``slots`` groups in flight
at most (two per replica: one computing, one waiting beside it so the replica never idles
between batches). A request that finds a free slot is sent at the end of the event loop's
current iteration, with every request that arrived in that iteration: at low load nothing
waits for a window. While every slot is taken, requests gather into the next group, which
is sent the moment a group in flight is answered, or at once when it holds ``max_size``
requests, or when it has waited three recent group round trips (a replica that stopped
answering must not hold every caller of the model behind it). Under load the groups grow
by themselves to what arrives during one batch's compute, and the number of Ray calls per
second falls as the load rises. ``max_size <= 1``
sends every request alone.

A caller that goes away (deadline, cancelled RPC) leaves its group; a group whose callers
have all gone is cancelled, so the replica stops its sampler.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Groups items submitted while the groups in flight fill every slot; ``send`` maps a
    group to its results (same order, same length). An exception from ``send`` fails every
    item of the group."""

    def __init__(self, send: Callable[[list[T]], Coroutine[Any, Any, list[R]]]) -> None:
        self._send = send
        self._items: list[T] = []
        self._futures: list[asyncio.Future[R]] = []
        self._slots = 1
        self._scheduled: asyncio.Handle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._tasks: dict[asyncio.Task[None], float] = {}  # -> when it was sent
        self.round_trip_s: float | None = None  # moving average of a group's round trip
        self.group_sizes: Counter[int] = Counter()  # items per sent group -> count

    @property
    def pending(self) -> int:
        """Items waiting for their group to be sent."""
        return len(self._items)

    @property
    def in_flight(self) -> int:
        """Groups sent and not answered yet."""
        return len(self._tasks)

    async def submit(self, item: T, max_size: int, slots: int = 2) -> R:
        """Add ``item`` to the open group and wait for its own result; ``slots``: groups
        this model may have in flight before new items wait for one to be answered."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        self._slots = max(1, slots)
        if max_size <= 1 or len(self._items) >= max_size:
            self._flush()
        elif self._scheduled is None and len(self._tasks) < self._slots:
            # sent after this loop iteration, with whatever else arrives in it
            self._scheduled = loop.call_soon(self._flush)
        elif self._stall is None and self._scheduled is None:
            self._stall = loop.call_later(self.stall_s, self._flush)
        return await future  # cancelling the caller cancels ``future``

    @property
    def stall_s(self) -> float:
        """How long a group waits for a free slot at most: three recent round trips."""
        return 1.0 if self.round_trip_s is None else max(0.05, 3 * self.round_trip_s)

    def _flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        live = [(i, f) for i, f in zip(items, futures, strict=True) if not f.done()]
        if not live:
            return
        self.group_sizes[len(live)] += 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(live))
        self._tasks[task] = loop.time()
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        """A slot is free: the group that gathered meanwhile goes now."""
        took = asyncio.get_running_loop().time() - self._tasks.pop(task)
        if not task.cancelled():
            self.round_trip_s = took if self.round_trip_s is None else \
                0.8 * self.round_trip_s + 0.2 * took
        if self._items and self._scheduled is None and len(self._tasks) < self._slots:
            self._flush()

    async def _run(self, live: list[tuple[T, asyncio.Future[R]]]) -> None:
        futures = [f for _, f in live]
        sending = asyncio.get_running_loop().create_task(self._send([i for i, _ in live]))

        def left(_: asyncio.Future[R]) -> None:
            if all(f.done() for f in futures) and not sending.done():
                sending.cancel()  # nobody waits for this group any more

        for f in futures:
            f.add_done_callback(left)
        try:
            results = await sending
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            return
        except Exception as exc:  # a failure of the whole group reaches each caller
            for f in futures:
                if not f.done():
                    f.set_exception(exc)
            return
        if len(results) != len(futures):
            error = RuntimeError(f"a group of {len(futures)} got {len(results)} results")
            for f in futures:
                if not f.done():
                    f.set_exception(error)
            return
        for f, result in zip(futures, results, strict=True):
            if not f.done():
                f.set_result(result)


class MergingRunner(Generic[T, R]):
    """Runs batches one at a time in a worker thread; every batch that queued while one ran
    is merged into the next run, up to ``max_size()`` items (a first batch bigger than that
    runs alone). ``@serve.batch`` forms its batches eagerly, while the previous batch still
    computes, so without this merge a busy replica runs many small batches in a row.

    ``run`` maps items to results (same order, same length) and must not raise.
    """

    def __init__(self, run: Callable[[list[T]], list[R]], max_size: Callable[[], int]) -> None:
        self._run = run
        self._max_size = max_size
        self._queue: list[tuple[list[T], asyncio.Future[list[R]], bool]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.running = 0  # items in the run now computing

    @property
    def queued(self) -> int:
        """Items waiting for the next run."""
        return sum(len(items) for items, _, _ in self._queue)

    async def submit(self, items: list[T], *, alone: bool = False) -> list[R]:
        """Run ``items`` in the next run (``alone``: in a run of their own)."""
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work())
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, future, alone))
        assert self._wake is not None
        self._wake.set()
        return await future

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                first, first_future, alone = self._queue.pop(0)
                taken = [(first, first_future)]
                total, limit = len(first), max(1, self._max_size())
                while (not alone and self._queue and not self._queue[0][2]
                       and total + len(self._queue[0][0]) <= limit):
                    items, future, _ = self._queue.pop(0)
                    total += len(items)
                    taken.append((items, future))
                taken = [(items, f) for items, f in taken if not f.done()]
                if not taken:
                    continue
                flat = [item for items, _ in taken for item in items]
                self.running = len(flat)
                try:
                    results = await asyncio.to_thread(self._run, flat)
                except Exception as exc:  # a bug, not a user error: fail this run only
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self.running = 0
                offset = 0
                for items, future in taken:
                    if not future.done():
                        future.set_result(results[offset:offset + len(items)])
                    offset += len(items)
