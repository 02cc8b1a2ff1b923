"""Batch jobs writing to an object store (S3 API, a moto server on 127.0.0.1): the same
bytes as a local job, read back through pyarrow's S3 filesystem; resume after a crash;
errors before any write (missing bucket, unreachable endpoint, another job's prefix)."""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from cluster.batch import job
from cluster.batch.output import Output
from services.core.batch import BatchRequest
from services.core.errors import InvalidArgument
from services.core.store import ModelStore
from tests.helpers import tiny_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return tiny_store(tmp_path_factory.mktemp("s3-store"), ["gan"], steps=2)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    name = f"genfleet-{uuid.uuid4().hex[:12]}"  # a new bucket per test
    s3 = fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                         allow_bucket_creation=True)
    s3.create_dir(name)
    return name


def _uri(endpoint: str, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _spec(out: str, **kw: Any) -> BatchRequest:
    return BatchRequest(**{"model": "gan", "num_samples": 45, "out": out, "shard_size": 20,
                        "seed": 3, "labels": "balanced", **kw})


def _objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")
    out = {}
    for info in s3.get_file_info(fs.FileSelector(f"{bucket}/{prefix}", recursive=True)):
        if info.type == fs.FileType.File:
            with s3.open_input_stream(info.path) as f:
                out[info.path[len(bucket) + len(prefix) + 2:]] = bytes(f.read())
    return out


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fmt", ["parquet", "png"])
def test_an_s3_job_writes_the_same_bytes_as_a_local_job(store: ModelStore, tmp_path: Path,
                                                         endpoint: str, bucket: str,
                                                         fmt: str) -> None:
    uri = _uri(endpoint, bucket, "digits/v1")
    manifest = job.run(_spec(uri, format=fmt), store, local=True, progress=False)
    local = job.run(_spec(str(tmp_path / "local"), format=fmt), store, local=True,
                    progress=False)
    objects = _objects(endpoint, bucket, "digits/v1")
    files = _local_files(tmp_path / "local")
    assert set(objects) == set(files)
    skip = {"manifest.json", "job.json"}
    assert {k: v for k, v in objects.items() if k not in skip} == \
        {k: v for k, v in files.items() if k not in skip}
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in local["shards"]]
    assert json.loads(objects["manifest.json"]) == manifest
    for record in manifest["shards"]:
        if fmt == "parquet":
            assert hashlib.sha256(objects[record["file"]]).hexdigest() == record["sha256"]
    if fmt == "parquet":  # the standard reader, straight from the bucket
        s3, path = fs.FileSystem.from_uri(uri)
        table = pq.read_table(f"{path}/data", filesystem=s3)
        assert sorted(table.column("index").to_pylist()) == list(range(45))
    assert job.read_manifest(uri) == manifest
    assert Output(uri).uri("manifest.json") == f"s3://{bucket}/digits/v1/manifest.json"


def test_a_rerun_after_a_crash_writes_only_the_missing_shard(store: ModelStore, endpoint: str,
                                                              bucket: str) -> None:
    uri = _uri(endpoint, bucket, "resume")
    reference = job.run(_spec(uri), store, local=True, progress=False)
    before = _objects(endpoint, bucket, "resume")
    s3, path = fs.FileSystem.from_uri(uri)
    s3.delete_file(f"{path}/manifest.json")  # the crash: last shard and manifest never landed
    s3.delete_file(f"{path}/data/shard-00002.parquet")
    spec, todo = job.plan(_spec(uri), store)
    assert [s.index for s in todo] == [2]
    manifest = job.run(spec, store, local=True, progress=False, todo=todo)
    assert manifest["last_run"]["samples_written"] == 5
    assert manifest["shards"] == reference["shards"]
    after = _objects(endpoint, bucket, "resume")
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


def test_object_store_errors_come_before_any_write(store: ModelStore, endpoint: str,
                                                    bucket: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="bucket 'no-such-bucket' does not exist"):
        job.plan(_spec(_uri(endpoint, "no-such-bucket", "x")), store)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(InvalidArgument, match="out"):
        job.plan(_spec(_uri(dead, bucket, "x") + "&connect_timeout=1&request_timeout=1"), store)
    with pytest.raises(InvalidArgument, match="BUCKET/PREFIX"):
        job.plan(_spec(f"s3://{bucket}"), store)
    with pytest.raises(InvalidArgument, match="not supported"):
        job.plan(_spec("ftp://host/data"), store)
    # a prefix holding another job's files is refused, and nothing is written
    uri = _uri(endpoint, bucket, "taken")
    job.run(_spec(uri, seed=1), store, local=True, progress=False)
    before = _objects(endpoint, bucket, "taken")
    with pytest.raises(InvalidArgument, match="holds a different batch job"):
        job.run(_spec(uri, seed=2), store, local=True, progress=False)
    assert _objects(endpoint, bucket, "taken") == before
