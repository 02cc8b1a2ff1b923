"""The genfleet CLI end to end on tiny configs: train --local, models, eval."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.cli.main import main
from services.core.store import ModelStore


def test_train_models_eval_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    code = main(["--store", str(store), "-q", "train", "gan", "--local", "--epochs", "1",
                 "--set", "width=8", "--set", "latent_dim=4", "--eval-samples", "50",
                 "--name", "tiny-gan"])
    assert code == 0
    out = capsys.readouterr().out
    assert "trained tiny-gan@1 (gan)" in out and "fd_ratio=" in out
    meta = ModelStore(store).meta("tiny-gan")
    assert meta.family == "gan" and meta.data["name"] == "digits"
    assert meta.metrics["num_samples"] == 50 and meta.training["steps"] > 0

    assert main(["--store", str(store), "models"]) == 0
    assert "tiny-gan@1" in capsys.readouterr().out

    grid, report = tmp_path / "g.png", tmp_path / "r.json"
    assert main(["--store", str(store), "-q", "eval", "tiny-gan", "-n", "40", "--out", str(grid),
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "FD / floor" in out and "mean confidence" in out
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(report.read_text())["num_samples"] == 40


def test_text_autoregressive_trains_and_prints_samples(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    store = str(tmp_path / "store")
    assert main(["--store", store, "-q", "train", "autoregressive", "--local", "--data",
                 f"text:{text}?seq_len=16", "--epochs", "2", "--set", "embed=16",
                 "--set", "layers=1", "--eval-samples", "4", "--name", "chars"]) == 0
    meta = ModelStore(store).meta("chars")
    assert meta.config["data_kind"] == "text" and meta.data["vocab"]
    assert 0 < meta.metrics["test_bits_per_dim"] < 8
    assert len(meta.metrics["text_samples"]) == 4
    assert main(["--store", store, "-q", "eval", "chars", "-n", "3"]) == 0
    assert "test bits/dim (exact)" in capsys.readouterr().out


def test_user_errors_exit_2_with_a_clear_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path)
    # a Ray Train job's arguments are checked before any cluster starts
    assert main(["--store", store, "train", "gan", "--minutes", "1"]) == 2
    assert "--minutes" in capsys.readouterr().err
    assert main(["--store", store, "train", "gan", "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
    assert main(["--store", store, "train", "nope"]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
    assert main(["--store", store, "train", "gan", "--job", "a/b"]) == 2
    assert "job" in capsys.readouterr().err
    assert main(["--store", store, "train", "nope", "--local"]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
    assert main(["--store", store, "eval", "missing"]) == 2
    assert "no model named 'missing'" in capsys.readouterr().err
    assert main(["--store", store, "train", "vae", "--local", "--set", "bogus=1"]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


class _FakeGateway:
    """What ``serve_until_signal`` drives, recording what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> int:
        self.calls.append("start")
        return 1234

    async def lose(self, reason: str) -> None:
        self.calls.append(f"lose: {reason}")

    async def stop(self, grace: float) -> None:
        self.calls.append(f"stop {grace}")


def test_serve_until_signal_stops_at_once_when_what_it_serves_from_is_lost() -> None:
    import asyncio
    import threading

    from cluster.cli.common import serve_until_signal

    gateway = _FakeGateway()

    def watch(lost: Callable[[str], None]) -> Callable[[], None]:
        threading.Timer(0.05, lost, args=("the head died",)).start()  # from another thread
        return lambda: None

    async def announce(port: int) -> None:
        assert port == 1234

    reason = asyncio.run(serve_until_signal(gateway, 10.0, announce, watch))
    assert reason == "the head died"
    assert gateway.calls == ["start", "lose: the head died", "stop 1.0"]


def test_an_orderly_shutdown_stops_the_watch_before_the_head_goes() -> None:
    """SIGTERM: the watch is stopped first, so the head stopping afterwards is no 'loss'
    (it used to raise 'Event loop is closed' in the watch thread after ``genfleet down``)."""
    import asyncio
    import os
    import signal

    from cluster.cli.common import serve_until_signal

    gateway = _FakeGateway()
    state: dict[str, object] = {}

    def watch(lost: Callable[[str], None]) -> Callable[[], None]:
        state["lost"] = lost

        def unwatch() -> None:
            state["unwatched"] = True
        return unwatch

    async def announce(port: int) -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    assert asyncio.run(serve_until_signal(gateway, 3.0, announce, watch)) is None
    assert state.get("unwatched") is True
    assert gateway.calls == ["start", "stop 3.0"]
    state["lost"]("the head stopped after the loop closed")  # type: ignore[operator]


def test_a_reader_that_leaves_the_pipe_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    from cluster.cli.main import main as cli_main

    assert cli_main(["models", "--families"]) == 0


def test_a_refused_or_unreachable_gateway_call_is_one_line_not_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli.main import main

    assert main(["generate", "gan", "-n", "1", "--target", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("genfleet: error: UNAVAILABLE: ") and "\n" not in err, err
    assert "Traceback" not in err


def test_commands_join_the_cluster_genfleet_up_recorded_not_any_local_one(
        tmp_path: Path) -> None:
    """`status`, `scale`, `deploy`, `train --deploy` join the Ray cluster `genfleet up` runs
    for the store (its address in the run state); Ray's `auto` picks any local GCS when
    there are two (a test session's cluster beside `up`'s: CI saw `status` print an empty
    table). A state file whose `up` is gone names no cluster."""
    import os
    import subprocess
    import sys

    from cluster.cli.common import run_dir, up_cluster, up_state

    store = ModelStore(tmp_path / "store")
    state = run_dir(store) / "up.json"
    assert up_cluster(store) is None  # no genfleet up
    state.write_text(json.dumps({"pid": os.getpid(), "ray_address": "10.0.0.7:6379"}))
    assert up_cluster(store) == ("10.0.0.7:6379", "")
    # Ray turns its token auth on by itself only for `auto`: the recorded mode goes along
    state.write_text(json.dumps({"pid": os.getpid(), "ray_address": "10.0.0.7:6379",
                                 "ray_auth_mode": "token", "event_loop": "uvloop"}))
    assert up_cluster(store) == ("10.0.0.7:6379", "token")
    assert (up_state(store) or {}).get("event_loop") == "uvloop"  # genfleet bench reports it
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    state.write_text(json.dumps({"pid": int(gone.stdout), "ray_address": "10.0.0.7:6379"}))
    assert up_cluster(store) is None  # its up was killed: not a cluster to join
    assert up_state(store) is None
    for broken in ("{", "[]", json.dumps({"pid": 0, "ray_address": "x:1"}),
                   json.dumps({"pid": os.getpid()}), json.dumps({"pid": "1", "ray_address": 1})):
        state.write_text(broken)
        assert up_cluster(store) is None, broken
