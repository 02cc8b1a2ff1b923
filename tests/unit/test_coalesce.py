"""Request coalescing (gateway side) and batch merging (replica side), without Ray."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from services.serving.coalesce import Coalescer, MergingRunner


class Recorder:
    """A ``send`` that records its groups and answers ``item * 10``."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.groups: list[list[int]] = []
        self.cancelled = 0
        self.delay = delay
        self.fail = fail

    async def __call__(self, group: list[int]) -> list[int]:
        self.groups.append(list(group))
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in group]


def test_calls_that_arrive_together_become_one_group() -> None:
    async def main() -> None:
        send = Recorder()
        c = Coalescer(send)
        results = await asyncio.gather(*(c.submit(i, 32, 2) for i in range(5)))
        assert results == [0, 10, 20, 30, 40]
        assert send.groups == [[0, 1, 2, 3, 4]]
        assert c.group_sizes == Counter({5: 1})

    asyncio.run(main())


def test_a_lone_call_is_sent_at_once() -> None:
    # low load: a free slot means no batching window at all
    async def main() -> None:
        c = Coalescer(Recorder())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(20):
            assert await c.submit(i, 32, 2) == 10 * i
        assert loop.time() - t0 < 0.5
        assert c.group_sizes == Counter({1: 20})

    asyncio.run(main())


def test_while_every_slot_is_taken_calls_gather_into_the_next_group() -> None:
    async def main() -> None:
        send = Recorder(delay=0.1)
        c = Coalescer(send)
        first = [asyncio.create_task(c.submit(i, 32, 1)) for i in range(2)]
        await asyncio.sleep(0.02)  # the first group is in flight and holds the only slot
        later = [asyncio.create_task(c.submit(i, 32, 1)) for i in range(2, 9)]
        await asyncio.sleep(0.02)
        assert c.pending == 7 and c.in_flight == 1
        assert await asyncio.gather(*first, *later) == [i * 10 for i in range(9)]
        assert send.groups == [[0, 1], [2, 3, 4, 5, 6, 7, 8]]  # sent when the slot freed

    asyncio.run(main())


def test_two_slots_let_a_second_group_go_while_the_first_computes() -> None:
    async def main() -> None:
        send = Recorder(delay=0.1)
        c = Coalescer(send)
        a = asyncio.create_task(c.submit(0, 32, 2))
        await asyncio.sleep(0.01)
        b = asyncio.create_task(c.submit(1, 32, 2))
        await asyncio.sleep(0.01)
        assert c.in_flight == 2 and c.pending == 0
        assert await asyncio.gather(a, b) == [0, 10]

    asyncio.run(main())


def test_a_full_group_is_sent_without_waiting_for_a_slot() -> None:
    async def main() -> None:
        send = Recorder(delay=0.05)
        c = Coalescer(send)
        results = await asyncio.gather(*(c.submit(i, 4, 1) for i in range(8)))
        assert results == [i * 10 for i in range(8)]
        assert send.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]

    asyncio.run(main())


def test_batching_off_sends_every_call_alone() -> None:
    async def main() -> None:
        send = Recorder()
        c = Coalescer(send)
        assert await asyncio.gather(*(c.submit(i, 1, 2) for i in range(3))) == [0, 10, 20]
        assert send.groups == [[0], [1], [2]]

    asyncio.run(main())


def test_a_caller_that_leaves_does_not_affect_its_group() -> None:
    async def main() -> None:
        send = Recorder(delay=0.2)
        c = Coalescer(send)
        tasks = [asyncio.create_task(c.submit(i, 32, 1)) for i in range(3)]
        await asyncio.sleep(0.05)  # the group is in flight
        tasks[1].cancel()
        assert await tasks[0] == 0 and await tasks[2] == 20
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert send.cancelled == 0

    asyncio.run(main())


def test_a_group_whose_callers_all_left_is_cancelled() -> None:
    async def main() -> None:
        send = Recorder(delay=5.0)
        c = Coalescer(send)
        tasks = [asyncio.create_task(c.submit(i, 32, 1)) for i in range(2)]
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.sleep(0.05)
        assert send.cancelled == 1
        assert c.in_flight == 0

    asyncio.run(main())


def test_a_caller_that_leaves_before_the_send_is_not_sent() -> None:
    async def main() -> None:
        send = Recorder(delay=0.05)
        c = Coalescer(send)
        busy = asyncio.create_task(c.submit(0, 32, 1))  # holds the only slot
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(c.submit(1, 32, 1))
        stays = asyncio.create_task(c.submit(2, 32, 1))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await stays == 20 and await busy == 0
        assert send.groups == [[0], [2]]

    asyncio.run(main())


def test_a_group_wide_failure_reaches_every_caller() -> None:
    # the Coalescer is transport: a failure its sender raises reaches every caller. The
    # sender (ServeBackend._send_group) raises only group-wide errors (queue full, deadline);
    # anything else it resends one request at a time (tests/unit/test_isolation.py), so
    # that a request that fails alone fails alone.
    async def main() -> None:
        c = Coalescer(Recorder(fail=ValueError("queue full")))
        results = await asyncio.gather(*(c.submit(i, 32, 1) for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert c.pending == 0 and c.in_flight == 0

    asyncio.run(main())


def test_a_short_answer_is_an_error_not_a_hang() -> None:
    async def short(group: list[int]) -> list[int]:
        return group[:-1]

    async def main() -> None:
        c = Coalescer(short)
        results = await asyncio.gather(*(c.submit(i, 32, 1) for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)

    asyncio.run(main())


# ------------------------------------------------------------------ MergingRunner
class BlockingRun:
    """A ``run`` whose first call blocks until released; records every run's items."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.runs.append(list(items))
        self.started.set()
        self.release.wait(5)
        if -1 in items:
            raise RuntimeError("bug")
        return [i + 100 for i in items]


def test_batches_queued_during_a_run_merge_into_the_next_run() -> None:
    async def main() -> None:
        run = BlockingRun()
        runner = MergingRunner(run, lambda: 5)
        first = asyncio.create_task(runner.submit([0]))
        await asyncio.to_thread(run.started.wait, 5)
        later = [asyncio.create_task(runner.submit(items))
                 for items in ([1, 2], [3], [4, 5], [6])]
        await asyncio.sleep(0.05)
        assert runner.queued == 6
        run.release.set()
        assert await first == [100]
        assert [await t for t in later] == [[101, 102], [103], [104, 105], [106]]
        # [1,2] + [3] + [4,5] = 5 = the limit; [6] runs next
        assert run.runs == [[0], [1, 2, 3, 4, 5], [6]]

    asyncio.run(main())


def test_a_batch_larger_than_the_limit_runs_alone() -> None:
    async def main() -> None:
        run = BlockingRun()
        run.release.set()
        runner = MergingRunner(run, lambda: 2)
        assert await runner.submit([1, 2, 3]) == [101, 102, 103]

    asyncio.run(main())


def test_a_failing_run_fails_its_callers_and_the_runner_goes_on() -> None:
    async def main() -> None:
        run = BlockingRun()
        run.release.set()
        runner = MergingRunner(run, lambda: 1)
        with pytest.raises(RuntimeError, match="bug"):
            await runner.submit([-1])
        assert await runner.submit([1]) == [101]

    asyncio.run(main())



def test_a_stuck_group_holds_the_others_for_three_round_trips_at_most() -> None:
    async def main() -> None:
        delays = iter([0.02, 0.02, 0.02, 30.0])  # a replica that stops answering

        async def send(group: list[int]) -> list[int]:
            await asyncio.sleep(next(delays, 0.02))
            return [i * 10 for i in group]

        c = Coalescer(send)
        for i in range(3):  # learn the round trip (~20 ms)
            assert await c.submit(i, 32, 1) == i * 10
        stuck = asyncio.create_task(c.submit(3, 32, 1))  # holds the only slot
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(c.submit(4, 32, 1), 5) == 40
        assert loop.time() - t0 < 1.0  # ~3 x 20 ms, not 30 s
        stuck.cancel()

    asyncio.run(main())
