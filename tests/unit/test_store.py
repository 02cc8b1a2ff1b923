"""Model store: versions, atomic writes, references, no unpickling."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from services.core.errors import CheckpointError, InvalidArgument, ModelNotFound
from services.core.store import ModelStore, file_digest, parse_ref
from services.models import load_model


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


def _rewrite_meta(meta_path: Path, **changes: object) -> None:
    raw = json.loads(meta_path.read_text())
    raw.update(changes)
    meta_path.write_text(json.dumps(raw))


def test_weights_are_never_unpickled(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    meta = _save(store)
    weights = meta.path / "model.safetensors"
    weights.write_bytes(pickle.dumps({"w": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="m@1 is broken"):  # the checksum catches it
        store.load_state("m@1")
    size, digest = file_digest(weights)  # even with metadata that matches the pickle
    _rewrite_meta(meta.path / "meta.json", weights={"file": weights.name, "bytes": size,
                                                     "sha256": digest})
    with pytest.raises(CheckpointError, match="unreadable weights"):
        store.load_state("m")


def test_versions_record_the_size_and_sha256_of_their_weights(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    meta = _save(store)
    raw = json.loads((meta.path / "meta.json").read_text())
    size, digest = file_digest(meta.path / "model.safetensors")
    assert raw["weights"] == {"file": "model.safetensors", "bytes": size, "sha256": digest}
    assert store.problems("m", 1, checksum=True) == []
    assert store.verify("m").version == 1


@pytest.mark.parametrize("damage", ["missing", "partial", "flipped", "no-family", "not-json",
                                    "config-list"])
def test_a_broken_version_is_never_loaded_and_latest_skips_it(tmp_path: Path, damage: str
                                                              ) -> None:
    store = ModelStore(tmp_path)
    _save(store)
    meta = _save(store)
    weights, meta_json = meta.path / "model.safetensors", meta.path / "meta.json"
    if damage == "missing":
        weights.unlink()
    elif damage == "partial":
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "flipped":  # same size, other bytes: only the checksum sees it
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-family":
        raw = json.loads(meta_json.read_text())
        del raw["family"]
        meta_json.write_text(json.dumps(raw))
    elif damage == "not-json":
        meta_json.write_text("{ half")
    else:
        _rewrite_meta(meta_json, config=[1, 2])
    assert store.problems("m", 2, checksum=True), damage
    with pytest.raises(CheckpointError, match="m@2"):
        store.load_state("m@2")
    with pytest.raises(CheckpointError, match="m@2"):
        store.verify("m@2")
    if damage != "flipped":  # cheap checks see the rest: "m" is the latest intact version
        assert store.resolve("m") == ("m", 1)
        assert store.list()[0].version == 1


def test_versions_written_before_checksums_stay_loadable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    meta = _save(store)
    raw = json.loads((meta.path / "meta.json").read_text())
    del raw["weights"]
    (meta.path / "meta.json").write_text(json.dumps(raw))
    assert store.problems("m", 1, checksum=True) == []
    loaded, state = store.load_state("m")
    assert loaded.version == 1 and torch.equal(state["w"], torch.ones(2))


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
