"""Batch generation without Ray (the local runner): formats read back with their standard
readers, reproducibility, resume, validation. tests/integration/test_batch.py runs the
same jobs on Ray Data (workers, a killed driver, cancel)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster.batch import job
from cluster.batch.manager import BatchManager
from services.core.batch import BatchRequest
from services.core.errors import InvalidArgument, ModelNotFound
from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb
from services.models import load_model, sample_seeds
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread, tiny_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return tiny_store(tmp_path_factory.mktemp("batch-store"), ["gan", "autoregressive"], steps=2)


def _run(store: ModelStore, out: Path, **kw: object) -> dict[str, object]:
    spec = BatchRequest(**{"model": "gan", "num_samples": 45, "out": str(out), "shard_size": 20,
                        "seed": 3, "labels": "balanced", **kw})  # type: ignore[arg-type]
    return job.run(spec, store, local=True, progress=False)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "job.json")}


def _check_manifest(out: Path, manifest: dict[str, object]) -> None:
    shards = manifest["shards"]
    assert isinstance(shards, list)
    assert sum(s["count"] for s in shards) == manifest["num_samples"]
    for s in shards:
        data = (out / s["file"]).read_bytes()
        if manifest["format"] != "png":
            assert hashlib.sha256(data).hexdigest() == s["sha256"]
    assert not list(out.rglob(".*.tmp-*"))


def test_parquet_rows_match_the_manifest_and_the_model(store: ModelStore, tmp_path: Path) -> None:
    manifest = _run(store, tmp_path / "pq", encoding="both")
    _check_manifest(tmp_path / "pq", manifest)
    assert manifest["num_shards"] == 3 and manifest["version"] == 1
    table = pq.read_table(tmp_path / "pq" / "data")
    assert table.num_rows == 45
    rows = table.sort_by("index").to_pydict()
    assert rows["index"] == list(range(45))
    assert rows["seed"] == sample_seeds(3, 45)
    assert rows["label"] == [i % 10 for i in range(45)]  # balanced
    hist = {int(k): v for k, v in manifest["label_histogram"].items()}  # type: ignore[union-attr]
    assert hist == {c: rows["label"].count(c) for c in range(10)}
    assert max(hist.values()) - min(hist.values()) <= 1
    # sample i is what the model gives for (seed, i, label i), whatever shard it is in
    model, _ = load_model(store, "gan@1")
    x = model.sample(sample_seeds(3, 1, 27), labels=torch.tensor([7])).numpy()
    assert np.array_equal(np.asarray(rows["sample"][27], np.float32), x.reshape(-1))
    png = Image.open(io.BytesIO(rows["png"][27]))
    assert png.size == (8, 8)
    meta = json.loads(table.schema.metadata[b"genfleet"])
    assert meta["shape"] == [1, 8, 8]


def test_npz_shards_hold_arrays(store: ModelStore, tmp_path: Path) -> None:
    manifest = _run(store, tmp_path / "npz", format="npz", labels="0,3,7")
    _check_manifest(tmp_path / "npz", manifest)
    parts = [np.load(tmp_path / "npz" / s["file"]) for s in manifest["shards"]]  # type: ignore[union-attr]
    labels = np.concatenate([p["labels"] for p in parts])
    assert np.array_equal(np.concatenate([p["index"] for p in parts]), np.arange(45))
    assert labels.tolist() == [(0, 3, 7)[i % 3] for i in range(45)]
    assert np.concatenate([p["samples"] for p in parts]).shape == (45, 1, 8, 8)
    assert manifest["label_histogram"] == {"0": 15, "3": 15, "7": 15}


def test_png_is_a_folder_per_class_with_an_index(store: ModelStore, tmp_path: Path) -> None:
    out = tmp_path / "png"
    manifest = _run(store, out, format="png")
    _check_manifest(out, manifest)
    with open(out / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(45))
    for r in rows:
        assert r["path"].split("/")[0] == str(int(r["label"]))
        assert Image.open(out / r["path"]).size == (8, 8)
    assert len(list(out.glob("*/*.png"))) == 45


def test_without_labels_rows_carry_none(store: ModelStore, tmp_path: Path) -> None:
    manifest = _run(store, tmp_path / "ar", model="autoregressive", num_samples=6, labels="")
    rows = pq.read_table(tmp_path / "ar" / "data").to_pydict()
    assert rows["label"] == [None] * 6 and manifest["label_histogram"] == {"-1": 6}


def test_same_job_is_byte_identical_and_independent_of_chunking(store: ModelStore,
                                                               tmp_path: Path) -> None:
    _run(store, tmp_path / "a")
    _run(store, tmp_path / "b")
    _run(store, tmp_path / "c", chunk=7)  # other forward-pass sizes, same samples
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    rows_a = pq.read_table(tmp_path / "a" / "data").to_pydict()
    rows_c = pq.read_table(tmp_path / "c" / "data").to_pydict()
    assert rows_a["sample"] == rows_c["sample"]


def test_rerun_skips_complete_shards_and_finishes_the_rest(store: ModelStore,
                                                          tmp_path: Path) -> None:
    reference = _run(store, tmp_path / "ref")
    out = tmp_path / "crashed"
    _run(store, out)
    # a crash: the manifest and the last shard missing, a partial temporary file left
    (out / "manifest.json").unlink()
    last = out / "data" / "shard-00002.parquet"
    last.unlink()
    (out / "data" / ".shard-00002.parquet.tmp-dead").write_bytes(b"partial")
    before = (out / "data" / "shard-00000.parquet").stat().st_mtime_ns
    manifest = _run(store, out)
    assert (out / "data" / "shard-00000.parquet").stat().st_mtime_ns == before  # skipped
    assert manifest["last_run"]["samples_written"] == 5  # type: ignore[index]
    assert _files(out) == _files(tmp_path / "ref")
    assert manifest["shards"] == reference["shards"]
    # a complete job: nothing to do
    assert _run(store, out)["created"] == manifest["created"]


def test_validation_happens_before_any_write(store: ModelStore, tmp_path: Path) -> None:
    out = tmp_path / "never"
    bad = [({"num_samples": 0}, InvalidArgument, "num_samples"),
           ({"format": "jpeg"}, InvalidArgument, "format"),
           ({"model": "nope"}, ModelNotFound, "nope"),
           ({"model": "gan@9"}, ModelNotFound, "gan"),
           ({"labels": "0,12"}, InvalidArgument, "labels"),
           ({"labels": "x"}, InvalidArgument, "labels"),
           ({"options": {"truncation": 99.0}}, InvalidArgument, "truncation"),
           ({"options": {"nope": 1}}, InvalidArgument, "nope")]
    for change, error, words in bad:
        with pytest.raises(error, match=words):
            _run(store, out, **change)
    assert not out.exists()
    with pytest.raises(InvalidArgument, match="ftp:// outputs are not supported"):
        job.plan(BatchRequest("gan", 4, "ftp://host/x"), store)
    ar = BatchRequest("autoregressive", 4, str(out), format="png")
    assert job.plan(ar, store)  # the tiny AR is an image model: png is fine
    assert not out.exists()


def test_a_directory_holding_another_job_is_refused(store: ModelStore, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    _run(store, out)
    before = _files(out)
    for change in ({"seed": 4}, {"num_samples": 46}, {"format": "npz"}):
        with pytest.raises(InvalidArgument, match="different batch job"):
            _run(store, out, **change)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="not empty"):
        _run(store, tmp_path / "other")
    assert _files(out) == before


# ------------------------------------------------------------------ BatchService
@pytest.fixture(scope="module")
def batch_gateway(store: ModelStore, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[GatewayThread, Path]]:
    root = tmp_path_factory.mktemp("batch-root")
    thread = GatewayThread(lambda: InProcessBackend(store.root, ["gan"]),
                           GatewayConfig(host="127.0.0.1", port=0),
                           batches=lambda: BatchManager(store, root, local=True))
    yield thread, root
    thread.stop()


def test_batch_service_runs_jobs_that_outlive_the_client(
        batch_gateway: tuple[GatewayThread, Path]) -> None:
    thread, root = batch_gateway
    with GenfleetClient(thread.target, retries=0) as client:
        submitted = client.submit_batch("gan", 90, "digits", shard_size=30, seed=3,
                                        labels="balanced", format="npz")
    # that client is gone; the job is not
    assert submitted.state == bpb.BATCH_STATE_RUNNING and submitted.version == 1
    with GenfleetClient(thread.target, retries=0) as client:
        done = client.wait_batch(submitted.id, timeout=60)
        assert done.state == bpb.BATCH_STATE_SUCCEEDED, done.error
        assert done.samples_written == 90 and done.finished >= done.created
        assert done.output_uri == (root / "digits").resolve().as_uri()
        manifest = json.loads((root / "digits" / "manifest.json").read_text())
        assert done.manifest_uri.endswith("digits/manifest.json")
        assert manifest["num_samples"] == 90 and manifest["job_id"] == done.id
        assert [j.id for j in client.list_batches()] == [done.id]
        # the same job again: same id, nothing regenerated
        again = client.wait_batch(client.submit_batch(
            "gan", 90, "digits", shard_size=30, seed=3, labels="balanced", format="npz").id)
        assert again.id == done.id and again.state == bpb.BATCH_STATE_SUCCEEDED
    assert json.loads((root / "digits" / "manifest.json").read_text()) == manifest


def test_batch_service_cancel_keeps_complete_shards(
        batch_gateway: tuple[GatewayThread, Path]) -> None:
    thread, root = batch_gateway
    with GenfleetClient(thread.target, retries=0) as client:
        job_ = client.submit_batch("gan", 20000, "big", shard_size=100, seed=1)
        while client.get_batch(job_.id).samples_written < 100:
            time.sleep(0.05)
        cancelled = client.cancel_batch(job_.id)
    assert cancelled.state == bpb.BATCH_STATE_CANCELLED
    shards = list((root / "big" / "data").glob("shard-*.parquet"))
    assert 1 <= len(shards) < 200
    assert not (root / "big" / "manifest.json").exists()
    assert not list((root / "big").rglob(".*.tmp-*"))
    assert pq.read_table(root / "big" / "data").num_rows == 100 * len(shards)


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND),
    ({"n": 0}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"output": "../escape"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"output": "/etc/x"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"labels": "0,99"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"options": {"steps": 3}}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_batch_service_rejects_bad_jobs(batch_gateway: tuple[GatewayThread, Path],
                                        kwargs: dict[str, Any], code: grpc.StatusCode) -> None:
    thread, root = batch_gateway
    args = {"model": "gan", "n": 10, "output": "rejected", **kwargs}
    with GenfleetClient(thread.target, retries=0) as client, \
            pytest.raises(grpc.RpcError) as info:
        client.submit_batch(args.pop("model"), args.pop("n"), args.pop("output"), **args)
    assert info.value.code() == code  # type: ignore[attr-defined]
    assert not (root / "rejected").exists()


def test_batch_service_unknown_job_is_not_found(
        batch_gateway: tuple[GatewayThread, Path]) -> None:
    thread, _ = batch_gateway
    with GenfleetClient(thread.target, retries=0) as client:
        for call in (client.get_batch, client.cancel_batch):
            with pytest.raises(grpc.RpcError) as info:
                call("0123456789abcdef")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_without_a_batch_backend_the_service_is_unimplemented(store: ModelStore) -> None:
    thread = GatewayThread(lambda: InProcessBackend(store.root, ["gan"]),
                           GatewayConfig(host="127.0.0.1", port=0))
    try:
        with GenfleetClient(thread.target, retries=0) as client, \
                pytest.raises(grpc.RpcError) as info:
            client.list_batches()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    finally:
        thread.stop()


@pytest.mark.parametrize(("encoding", "columns"), [
    ("tensor", {"index", "seed", "label", "sample"}),
    ("png", {"index", "seed", "label", "png"}),
    ("both", {"index", "seed", "label", "sample", "png"}),
])
def test_parquet_encoding_picks_the_sample_columns(store: ModelStore, tmp_path: Path,
                                                   encoding: str, columns: set[str]) -> None:
    _run(store, tmp_path / encoding, num_samples=5, encoding=encoding)
    assert set(pq.read_table(tmp_path / encoding / "data").column_names) == columns


# ---------------------------------------------------------------- a text model
@pytest.fixture(scope="module")
def text_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A character-level autoregressive model, trained a few steps on a small text file."""
    from services.core.data import load_text
    from services.models import build
    from services.training.loop import TrainConfig, Trainer
    from tests.conftest import TINY_CONFIGS

    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    data = load_text(corpus, seq_len=16)
    torch.manual_seed(0)
    model = build("autoregressive", {**TINY_CONFIGS["autoregressive"], "data_kind": "text",
                                     "seq_len": 16, "levels": data.levels, "num_classes": 0})
    x = torch.from_numpy(data.values[:32])
    model.prepare(x, None)
    trainer = Trainer(model, TrainConfig(lr=3e-3))
    for _ in range(3):
        trainer.step(x, None)
    store = ModelStore(root / "store")
    store.save("chars", family="autoregressive", config=model.config.to_dict(),
               state=model.state_dict(), data=data.describe(), metrics={})
    return store


def test_a_text_model_writes_tokens_and_strings(text_store: ModelStore, tmp_path: Path) -> None:
    from services.core.data import decode_text

    spec = BatchRequest(model="chars", num_samples=30, out=str(tmp_path / "pq"), shard_size=8,
                     seed=5, encoding="both")
    manifest = job.run(spec, text_store, local=True, progress=False)
    _check_manifest(tmp_path / "pq", manifest)
    rows = pq.read_table(tmp_path / "pq" / "data").sort_by("index").to_pydict()
    assert rows["label"] == [None] * 30 and "png" not in rows
    tokens = np.asarray(rows["sample"], np.int64)
    assert tokens.shape == (30, 16)
    vocab = load_model(text_store, "chars")[1].data["vocab"]
    assert rows["text"] == decode_text(tokens, vocab)
    assert all(len(t) == 16 and set(t) <= set(vocab) for t in rows["text"])
    # the same samples as the model gives for those seeds
    model, _ = load_model(text_store, "chars@1")
    assert np.array_equal(tokens[11], model.sample(sample_seeds(5, 1, 11)).numpy()[0])
    npz = job.run(BatchRequest(model="chars", num_samples=30, out=str(tmp_path / "npz"),
                            shard_size=8, seed=5, format="npz"), text_store, local=True,
                  progress=False)
    arrays = [np.load(tmp_path / "npz" / s["file"]) for s in npz["shards"]]
    assert np.array_equal(np.concatenate([a["samples"] for a in arrays]), tokens)
    assert all(a["samples"].dtype == np.int64 for a in arrays)
    with pytest.raises(InvalidArgument, match="generates text"):
        job.plan(BatchRequest(model="chars", num_samples=3, out=str(tmp_path / "png"),
                           format="png"), text_store)
    assert not (tmp_path / "png").exists()
