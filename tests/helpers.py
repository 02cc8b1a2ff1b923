"""Test helpers: a store of tiny trained models, and a gateway on a background loop."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from services.core.data import load_digits
from services.core.store import ModelStore
from services.gateway.server import Backend, BatchBackend, Gateway, GatewayConfig
from services.models import FAMILIES, build
from services.training.loop import TrainConfig, Trainer
from tests.conftest import TINY_CONFIGS


def tiny_store(root: Path, families: list[str] | None = None, steps: int = 15) -> ModelStore:
    """Every family (named after itself) trained for a few steps on 64 real digits."""
    store = ModelStore(root)
    data = load_digits()
    x = torch.from_numpy(data.as_float()[:64])
    y = torch.from_numpy(data.labels[:64])  # type: ignore[index]
    for family in families or sorted(FAMILIES):
        torch.manual_seed(0)
        model = build(family, TINY_CONFIGS[family])
        model.prepare(x, y)
        trainer = Trainer(model, TrainConfig(lr=3e-3))
        for _ in range(steps):
            trainer.step(x, y)
        store.save(family, family=family, config=model.config.to_dict(),
                   state=model.state_dict(), data=data.describe() | {"name": "digits"},
                   metrics={"fd_ratio": 1.5})
    return store


class GatewayThread:
    """Runs a Gateway on its own event loop in a daemon thread (for blocking tests)."""

    def __init__(self, make_backend: Callable[[], Backend], config: GatewayConfig,
                 batches: Callable[[], BatchBackend] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway: Gateway = self.run(self._start(make_backend, config, batches))
        assert self.gateway.port is not None
        self.port: int = self.gateway.port
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self, make_backend: Callable[[], Backend], config: GatewayConfig,
                     batches: Callable[[], BatchBackend] | None) -> Gateway:
        gateway = Gateway(make_backend(), config, batches() if batches else None)
        await gateway.start()
        return gateway

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, grace: float = 5.0) -> None:
        self.run(self.gateway.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def scrape_ray_metrics(*needles: str, timeout_s: float = 30.0) -> str:
    """This node's Ray metrics export endpoint, polled until every needle appears."""
    from ray._private.worker import global_worker

    port = global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        if all(n in text for n in needles):
            return text
        time.sleep(1.0)
    raise AssertionError(f"{needles} not exported within {timeout_s} s")
