"""Model store: versions, atomic writes, references, no unpickling."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from services.core.errors import CheckpointError, InvalidArgument, ModelNotFound
from services.core.store import ModelStore, load_model, parse_ref


def _save(store: ModelStore, name: str = "m"):
    return store.save(name, family="gan", config={"width": 8, "latent_dim": 4},
                      state={"w": torch.ones(2)}, metrics={"fd": 1.0})


def test_versions_increase_and_latest_resolves(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert [_save(store).version for _ in range(3)] == [1, 2, 3]
    assert store.resolve("m") == ("m", 3)
    assert store.resolve("m@2") == ("m", 2)
    assert store.meta("m@1").metrics == {"fd": 1.0}
    assert store.names() == ["m"]
    assert not list((tmp_path / "m").glob(".tmp-*")), "temporary directories left behind"


def test_unknown_models_and_bad_refs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _save(store)
    with pytest.raises(ModelNotFound, match="no model named 'x'"):
        store.resolve("x")
    with pytest.raises(ModelNotFound, match="no version 9"):
        store.resolve("m@9")
    for bad in ("m@0", "m@latest", "../etc", "M"):
        with pytest.raises(InvalidArgument):
            parse_ref(bad)


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - any failure of the writer
        store.save("m", family="gan", config={}, state={"w": "not a tensor"})  # type: ignore[dict-item]
    assert store.versions("m") == []
    assert list((tmp_path / "m").iterdir()) == []


def test_weights_are_never_unpickled(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    meta = _save(store)
    (meta.path / "model.safetensors").write_bytes(pickle.dumps({"w": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unreadable weights"):
        store.load_state("m")


def test_mismatched_weights_are_a_checkpoint_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _save(store)
    with pytest.raises(CheckpointError, match="do not fit gan config"):
        load_model(store, "m")


def test_update_metrics_merges(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _save(store)
    store.update_metrics("m", {"fd_ratio": 2.0})
    assert store.meta("m").metrics == {"fd": 1.0, "fd_ratio": 2.0}
