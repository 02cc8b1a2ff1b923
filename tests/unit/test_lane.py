"""The replica lane (``services.serving.lane``) and the gateway's single-flight cache
(``services.serving.serve_backend.Cached``), without Ray."""

from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.serving.lane import METHOD, TOKEN_HEADER, LaneAddress, LaneClient, LaneServer
from services.serving.serve_backend import Cached


class Handler:
    """A lane handler that answers ``item * 10`` and records what it saw."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[list[Any], bool]] = []
        self.cancelled = 0
        self.delay = delay

    async def __call__(self, items: list[Any], isolated: bool) -> list[Any]:
        self.calls.append((list(items), isolated))
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [i * 10 for i in items]


def test_a_group_goes_to_the_replica_and_back() -> None:
    async def main() -> None:
        handler = Handler()
        server = LaneServer("r1", handler)
        address = await server.start("127.0.0.1")
        client = LaneClient(address)
        try:
            assert await client.generate_batch([1, 2, 3], False, timeout=10) == [10, 20, 30]
            assert await client.generate_batch([4], True, timeout=10) == [40]
            assert handler.calls == [([1, 2, 3], False), ([4], True)]
            assert client.in_flight == 0
        finally:
            await client.close()
            await server.close(1.0)

    asyncio.run(main())


class Planted:
    """Unpickling this writes a file: proof that a body was deserialized."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("unpickled",))


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_call_without_the_token_is_refused_before_its_body_is_read(
        tmp_path: Path, token: str | None) -> None:
    async def main() -> None:
        handler = Handler()
        server = LaneServer("r1", handler)
        address = await server.start("127.0.0.1")
        planted = tmp_path / "planted"
        try:
            async with grpc.aio.insecure_channel(address.target) as channel:
                call = channel.unary_unary(METHOD)
                metadata = None if token is None else ((TOKEN_HEADER, token),)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(pickle.dumps(([Planted(str(planted))], False)), timeout=10,
                               metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert not planted.exists()
            assert handler.calls == []
        finally:
            await server.close(1.0)

    asyncio.run(main())


def test_a_caller_that_goes_away_cancels_the_replica_side() -> None:
    async def main() -> None:
        handler = Handler(delay=5.0)
        server = LaneServer("r1", handler)
        client = LaneClient(await server.start("127.0.0.1"))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate_batch([1], False, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(50):
                if handler.cancelled:
                    break
                await asyncio.sleep(0.05)
            assert handler.cancelled == 1
        finally:
            await client.close()
            await server.close(1.0)

    asyncio.run(main())


def test_a_call_cut_by_its_channel_closing_fails_unavailable_not_cancelled() -> None:
    """grpc.aio answers a call that its channel's close cut with CancelledError; a lane call
    turns that into UNAVAILABLE (a replica failure the gateway retries), because a
    CancelledError would cancel the gateway call waiting on it, and grpc answers nothing for
    a cancelled handler (the client waited out its 60 s deadline). Its own caller's
    cancellation still cancels it."""
    async def main() -> None:
        handler = Handler(delay=5.0)
        server = LaneServer("r1", handler)
        client = LaneClient(await server.start("127.0.0.1"))
        try:
            running = asyncio.create_task(client.generate_batch([1], False, timeout=10))
            await asyncio.sleep(0.2)
            await client.close()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await running
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "closed during the call" in str(info.value.details())
            assert client.in_flight == 0

            again = LaneClient(client.address)
            leaving = asyncio.create_task(again.generate_batch([2], False, timeout=10))
            await asyncio.sleep(0.2)
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            await again.close()
        finally:
            await server.close(0.1)

    asyncio.run(main())


def test_a_closing_lane_finishes_calls_in_flight_and_refuses_new_ones() -> None:
    async def main() -> None:
        handler = Handler(delay=0.3)
        server = LaneServer("r1", handler)
        address = await server.start("127.0.0.1")
        client = LaneClient(address)
        try:
            running = asyncio.create_task(client.generate_batch([1], False, timeout=10))
            await asyncio.sleep(0.1)
            closing = asyncio.create_task(server.close(5.0))
            await asyncio.sleep(0.05)
            assert await running == [10]  # drained, not dropped
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate_batch([2], False, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await closing
        finally:
            await client.close()

    asyncio.run(main())


def test_lane_addresses_round_trip_and_default_to_the_configured_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    address = LaneAddress("r", "127.0.0.1", 4242, "t")
    assert LaneAddress.from_dict(address.to_dict()) == address
    assert address.target == "127.0.0.1:4242"
    monkeypatch.setenv("GENFLEET_LANE_HOST", "127.0.0.1")

    async def main() -> None:
        server = LaneServer("r1", Handler())
        bound = await server.start()
        assert bound.host == "127.0.0.1" and bound.port > 0
        await server.close(1.0)

    asyncio.run(main())
    assert os.environ["GENFLEET_LANE_HOST"] == "127.0.0.1"


# ------------------------------------------------------------------------- Cached
class Loader:
    def __init__(self, delay: float = 0.05) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = False

    async def __call__(self, key: str) -> str:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("directory restarting")
        return f"{key}-{self.calls}"


def test_a_burst_of_callers_shares_one_load() -> None:
    async def main() -> None:
        load = Loader()
        cache = Cached(load, ttl_s=10)
        values = await asyncio.gather(*(cache.get("gan") for _ in range(50)))
        assert values == ["gan-1"] * 50 and load.calls == 1

    asyncio.run(main())


def test_a_stale_value_is_answered_at_once_and_refreshed_once_in_the_background() -> None:
    async def main() -> None:
        load = Loader(delay=0.2)
        cache = Cached(load, ttl_s=0.05)
        assert await cache.get("gan") == "gan-1"
        await asyncio.sleep(0.1)  # stale now
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        values = await asyncio.gather(*(cache.get("gan") for _ in range(20)))
        assert values == ["gan-1"] * 20 and loop.time() - t0 < 0.1  # nobody waited
        await asyncio.sleep(0.3)
        assert load.calls == 2 and await cache.get("gan") == "gan-2"
        assert await cache.get("gan", fresh=True) == "gan-3"  # a forced read waits

    asyncio.run(main())


def test_a_failed_refresh_keeps_the_old_value_and_a_failed_first_load_raises() -> None:
    async def main() -> None:
        load = Loader(delay=0.01)
        cache = Cached(load, ttl_s=0.02)
        assert await cache.get("gan") == "gan-1"
        load.fail = True
        await asyncio.sleep(0.05)
        assert await cache.get("gan") == "gan-1"
        await asyncio.sleep(0.05)
        assert await cache.get("gan") == "gan-1"
        with pytest.raises(RuntimeError):
            await cache.get("vae")

    asyncio.run(main())


def test_peek_never_waits_and_loads_in_the_background() -> None:
    async def main() -> None:
        load = Loader(delay=0.1)
        cache = Cached(load, ttl_s=10)
        assert cache.peek("gan") is None  # nothing yet: the caller goes another way
        assert cache.peek("gan") is None
        await asyncio.sleep(0.01)
        assert load.calls == 1  # one load, not two
        await asyncio.sleep(0.2)
        assert cache.peek("gan") == "gan-1"
        load.fail = True
        cache.ttl_s = 0.0
        assert cache.peek("gan") == "gan-1"  # a failing refresh keeps the last value
        await asyncio.sleep(0.2)
        assert cache.peek("gan") == "gan-1"

    asyncio.run(main())


def test_a_hung_load_times_out_and_the_next_request_loads_again() -> None:
    async def main() -> None:
        load = Loader(delay=10.0)
        cache = Cached(load, ttl_s=0.0, timeout_s=0.05)
        with pytest.raises(TimeoutError):
            await cache.get("gan")
        load.delay = 0.0
        assert await cache.get("gan") == "gan-2"  # not stuck behind the hung load

    asyncio.run(main())
