"""`genfleet up` on an empty store serves at once: the gateway answers while the families
train in the background one at a time; a call to one still training is UNAVAILABLE saying
so (with a retry delay); `genfleet status` shows the progress; each family serves, and
gets its --demo grid, as soon as its checkpoint is written. Stopping it mid-training is an
orderly shutdown that leaves no half-written version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from tests.helpers import genfleet_up

pytestmark = pytest.mark.integration
FLAGS = ("--num-cpus", "4", "--port", "0", "--metrics-port", "-1", "--ray-metrics-port", "-1",
         "--train-threads", "1")


def _status(base: Path) -> str:
    exe = Path(sys.executable).parent / "genfleet"
    # as from a user's shell: no Ray settings inherited from this test session's cluster
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    done = subprocess.run([str(exe), "--store", str(base / "store"), "status"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _wait_training(base: Path, up: dict[str, Any], timeout_s: float) -> float:
    """Until `genfleet status` shows a model training an epoch; returns the deadline."""
    deadline = time.monotonic() + timeout_s
    while "training: epoch" not in (status := _status(base)):
        assert time.monotonic() < deadline, status + up["log"].read_text()[-2000:]
        time.sleep(1)
    return deadline


def _training_workers(pid: int) -> list[Any]:
    """The Ray workers under ``genfleet up`` (``pid``) running a background training."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "train_one" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def _v2_ready(port: int, model: str) -> tuple[int, bool]:
    url = f"http://127.0.0.1:{port}/v2/models/{model}/ready"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, bool(json.loads(response.read())["ready"])
    except urllib.error.HTTPError as exc:
        return exc.code, bool(json.loads(exc.read())["ready"])


def _unavailable(client: GenfleetClient, name: str) -> grpc.RpcError | None:
    """The error of a Generate to ``name``, or None once it answers."""
    try:
        client.generate(name, 2, seed=1)
        return None
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return exc


def test_an_empty_store_serves_at_once_and_each_family_when_trained(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("first-run")
    demo = base / "grids"
    with genfleet_up(base, "--models", "vae", "gan", "--train-minutes", "0.15",
                     "--demo", str(demo), *FLAGS, timeout_s=300, serving=False) as up:
        first = time.monotonic()
        with GenfleetClient(up["target"], timeout=30, retries=0) as client:
            assert client.list_models() == []  # nothing trained yet, and the gateway answers
            assert client.health() == "NOT_SERVING"
            assert client.health("vae") == "NOT_SERVING"
            error = _unavailable(client, "gan")
            assert error is not None and "gan has no checkpoint yet" in str(error.details())
            assert "retry later" in str(error.details())
            pushback = dict(error.trailing_metadata() or ())
            assert int(pushback["grpc-retry-pushback-ms"]) >= 1000
            with GenfleetClient(up["target"], timeout=3) as patient:  # retries what it may
                asked = time.monotonic()
                assert _unavailable(patient, "gan") is not None
                assert time.monotonic() - asked < 2.5  # the delay outlasts its deadline
            status = _status(base)
            assert "not served yet" in status and "gan" in status, status
            with pytest.raises(grpc.RpcError) as unknown:
                client.generate("nope", 1)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert "gan" not in str(unknown.value.details())  # lists what serves, not plans

            while _unavailable(client, "vae") is not None:  # vae trains first (config order)
                assert time.monotonic() - first < 240, up["log"].read_text()[-3000:]
                time.sleep(0.5)
            out = client.generate("vae", 4, seed=3)
            assert out.samples is not None and out.samples.shape == (4, 1, 8, 8)
            assert [m.name for m in client.list_models()] == ["vae"]
            # OIP v2 (KServe, Triton clients): the one training is known but not ready
            deadline = time.monotonic() + 10  # readiness follows the gateway's 2 s health loop
            while _v2_ready(up["http_port"], "vae") != (200, True):
                assert time.monotonic() < deadline, _v2_ready(up["http_port"], "vae")
                time.sleep(0.5)
            assert _v2_ready(up["http_port"], "gan") == (503, False)
            while _unavailable(client, "gan") is not None:
                assert time.monotonic() - first < 240, up["log"].read_text()[-3000:]
                time.sleep(0.5)
            deadline = time.monotonic() + 10  # the gateway's health loop: every 2 s
            while client.health("gan") != "SERVING":
                assert time.monotonic() < deadline, "gan serves but its health does not say so"
                time.sleep(0.5)
            assert client.health() == "SERVING"
            assert sorted(m.name for m in client.list_models()) == ["gan", "vae"]
            again = client.generate("vae", 4, seed=3)  # redeploying for gan kept vae's replica
            assert again.samples is not None and out.samples is not None
            assert again.samples.tobytes() == out.samples.tobytes()
        deadline = time.monotonic() + 60
        while not ((demo / "gan.png").exists() and (demo / "vae.png").exists()):
            assert time.monotonic() < deadline, up["log"].read_text()[-3000:]
            time.sleep(0.5)
        store = ModelStore(base / "store")
        for name in ("vae", "gan"):
            meta = store.meta(name)
            assert meta.training["steps"] > 0
            deadline = time.monotonic() + 120  # evaluated after it serves
            while "fd_ratio" not in store.meta(name).metrics:
                assert time.monotonic() < deadline, up["log"].read_text()[-3000:]
                time.sleep(1)
        log = up["log"].read_text()
        assert "[vae] trained (vae@1" in log and "[gan] trained (gan@1" in log
        assert "models           none yet" in log


def test_stopping_while_a_family_trains_is_orderly(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("first-run-stop")
    with genfleet_up(base, "--models", "ebm", "--train-minutes", "5", *FLAGS, timeout_s=120,
                     serving=False) as up:
        _wait_training(base, up, 60)
    # genfleet_up sent SIGTERM mid-training and checked exit 0 without a traceback
    assert ModelStore(base / "store").versions("ebm") == []


def test_a_training_worker_killed_midway_is_retried_and_the_model_serves(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("first-run-kill")
    with genfleet_up(base, "--models", "vae", "--train-minutes", "0.3", *FLAGS, timeout_s=300,
                     serving=False) as up:
        deadline = time.monotonic() + 120
        while not (workers := _training_workers(up["pid"])):  # kill it as soon as it runs
            assert time.monotonic() < deadline, _status(base) + up["log"].read_text()[-2000:]
            time.sleep(0.2)
        assert len(workers) == 1, [p.cmdline() for p in workers]
        workers[0].kill()  # a process this test's genfleet up started
        with GenfleetClient(up["target"], timeout=30, retries=0) as client:
            while _unavailable(client, "vae") is not None:
                assert time.monotonic() < deadline + 180, up["log"].read_text()[-3000:]
                time.sleep(1)
    assert ModelStore(base / "store").versions("vae") == [1]
