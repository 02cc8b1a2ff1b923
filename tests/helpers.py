"""Test helpers: a store of tiny trained models, and a gateway on a background loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from services.core.data import load_digits
from services.core.store import ModelStore
from services.gateway.grpc_server import Backend, BatchBackend, Gateway, GatewayConfig
from services.models import BUILTIN, build
from services.training.loop import TrainConfig, Trainer
from tests.conftest import TINY_CONFIGS


def tiny_store(root: Path, families: list[str] | None = None, steps: int = 15) -> ModelStore:
    """Every family (named after itself) trained for a few steps on 64 real digits."""
    store = ModelStore(root)
    data = load_digits()
    x = torch.from_numpy(data.as_float()[:64])
    y = torch.from_numpy(data.labels[:64])  # type: ignore[index]
    for family in families or sorted(BUILTIN):
        torch.manual_seed(0)
        model = build(family, TINY_CONFIGS.get(family))  # a plugin: its own defaults
        model.prepare(x, y)
        trainer = Trainer(model, TrainConfig(lr=3e-3))
        for _ in range(steps):
            trainer.step(x, y)
        store.save(family, family=family, config=model.config.to_dict(),
                   state=model.state_dict(), data=data.describe() | {"name": "digits"},
                   metrics={"fd_ratio": 1.5})
    return store


class GatewayThread:
    """Runs a Gateway on its own event loop in a daemon thread (for blocking tests); the
    loop is ``genfleet up``'s default unless ``loop`` says otherwise."""

    def __init__(self, make_backend: Callable[[], Backend], config: GatewayConfig,
                 batches: Callable[[], BatchBackend] | None = None, loop: str = "auto") -> None:
        from services.gateway import event_loop

        # the shipped default: uvloop where installed, as `genfleet up` runs the gateway
        self.loop_kind = event_loop.resolve(loop)
        self.loop = event_loop.new(self.loop_kind)
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


class RayMetricsWatcher:
    """Polls this node's Ray metrics endpoint in a thread and keeps every exposition it saw.

    Ray evicts a gauge about two export intervals (~20 s) after its emitter stops
    reporting, so the gauges of a finished job's workers are checked while it runs."""

    def __init__(self, period_s: float = 1.0) -> None:
        from ray._private.worker import global_worker

        self._url = f"http://127.0.0.1:{global_worker.node.metrics_export_port}/metrics"
        self._period_s = period_s
        self._stop = threading.Event()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(self._url, timeout=5) as response:
                self.seen.append(response.read().decode())
            self._stop.wait(self._period_s)

    def __enter__(self) -> RayMetricsWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def saw(self, *needles: str) -> bool:
        """Some exposition held a line with every needle."""
        return any(all(n in line for n in needles)
                   for text in self.seen for line in text.splitlines())


def require_tool(name: str, install: str) -> str:
    """The path of command ``name``; without it the test skips, or fails where CI said the
    tools must be there (``GENFLEET_REQUIRE_TOOLS``)."""
    beside = Path(sys.executable).with_name(name)  # installed into this virtual environment
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("GENFLEET_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is not installed (.ci/run installs it: {install})")
        pytest.skip(f"{name} is not installed ({install})")
    return found


def wait_serving(state: dict[str, Any], proc: subprocess.Popen[bytes], log_path: Path,
                 deadline: float) -> None:
    """Until the gateway of ``state`` (up.json) reports every model SERVING."""
    from services.gateway.client import GenfleetClient

    with GenfleetClient(state["target"], timeout=10) as client:
        for name in state["models"]:
            while not _serves(client, name):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"{name} not serving in time:\n" \
                    f"{log_path.read_text()[-3000:]}"
                time.sleep(0.5)


def _serves(client: Any, name: str) -> bool:
    try:
        return bool(client.health(name) == "SERVING")
    except grpc.RpcError:  # not known to the health service yet
        return False


@contextlib.contextmanager
def genfleet_up(base: Path, *flags: str, timeout_s: float = 300.0, serving: bool = True
                ) -> Iterator[dict[str, Any]]:
    """`genfleet up` on the store ``base/store`` in its own process group, with ``flags``;
    yields its up.json (plus "log": its output file) once the gateway answers and, with
    ``serving``, once every model it serves is SERVING (a model without a checkpoint is
    trained in the background first); SIGTERM at the end (SIGKILL to its group if it does
    not stop within a minute), after which it must have exited 0 without a traceback."""
    exe = Path(sys.executable).parent / "genfleet"
    log_path = base / "up.log"
    with log_path.open("w") as log:
        # port 0 for the v2 REST endpoint unless the caller says otherwise (flags come last)
        proc = subprocess.Popen([str(exe), "--store", str(base / "store"), "up",
                                 "--http-port", "0", *flags],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        state_file = base / "run" / "up.json"
        try:
            deadline = time.monotonic() + timeout_s
            while not state_file.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"genfleet up: not within {timeout_s} s"
                time.sleep(0.5)
            state: dict[str, Any] = json.loads(state_file.read_text())
            if serving:
                wait_serving(state, proc, log_path, deadline)
            yield {**state, "log": log_path}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = None
    # reached only when the caller's block succeeded: an orderly stop is clean too
    text = log_path.read_text()
    assert code == 0 and "Traceback" not in text, f"genfleet up did not stop cleanly " \
        f"(exit {code}):\n{text[-3000:]}"
