"""The genfleet CLI end to end on tiny configs: train --local, models, eval."""

from __future__ import annotations

import json
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
