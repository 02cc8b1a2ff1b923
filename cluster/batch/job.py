"""The batch-generation job: plan, validate, generate shards on a Ray Data actor pool (or
in this process), then write the manifest last.

Exactly-once: a shard is complete when its file (``writer.shard_file``) exists, and files
only appear complete (``output.Output``: rename locally, completed uploads on object
stores). A re-run of the same job skips complete shards; a directory that
holds a different job is refused before any work. The manifest (model, version, seed,
options, counts, label histogram, per-shard checksums) is written
last, so its presence means the dataset is complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cluster.batch.output import Output
from cluster.batch.writer import ShardWriter, shard_file
from services.core.batch import BatchRequest, Shard
from services.core.errors import Cancelled, InvalidArgument
from services.core.store import ModelStore, parse_ref
from services.models import load_model

log = logging.getLogger("genfleet.batch")
JOB_FILE = "job.json"
MANIFEST = "manifest.json"
Progress = Callable[[int, int], None]  # (samples written so far, total)


def plan(spec: BatchRequest, store: ModelStore) -> tuple[BatchRequest, list[Shard]]:
    """Validate ``spec`` against the model and the output directory (nothing is written);
    pin the version and resolve the options. Returns the spec and the shards still to do.

    Raises:
        InvalidArgument: a bad field, a format the model cannot produce, an output
            directory that holds something else.
        ModelNotFound: unknown model or version.
    """
    spec.validate()
    Output(spec.out)  # the URI's form (InvalidArgument), before the model is loaded
    name, version = parse_ref(spec.model)
    _, resolved = store.resolve(spec.model)
    model, meta = load_model(store, f"{name}@{version or resolved}")
    spec.model, spec.version = name, meta.version
    text = str(model.data_dtype) == "torch.int64"
    if spec.format == "png" and text:
        raise InvalidArgument("format", f"{name} generates text: use parquet or npz, not png")
    spec.classes = [str(c) for c in meta.data.get("classes", [])]
    cycle = spec.label_list(len(spec.classes) or None)
    if spec.labels.strip() and cycle is None:
        raise InvalidArgument("labels", f"{name} has no classes to balance over")
    import torch

    first = None if cycle is None else torch.tensor(cycle[:1])
    _, spec.options = model.check_sample_request(1, first, spec.options)
    out = Output(spec.out)
    if not _check_directory(out, spec):
        return spec, spec.shards()
    done = out.files("index" if spec.format == "png" else "data")
    return spec, [s for s in spec.shards() if shard_file(spec, s) not in done]


def _check_directory(out: Output, spec: BatchRequest) -> bool:
    """Refuse an output that holds something else; False when it is empty."""
    if not out.check_container():
        return False
    for name in (MANIFEST, JOB_FILE):
        if out.exists(name):
            other = json.loads(out.read(name)).get("key")
            if other != spec.key():
                raise InvalidArgument("out", f"{out} holds a different batch job ({_describe(other)}); "
                                             f"you asked for {_describe(spec.key())}: "
                                             "choose another directory")
            return True
    raise InvalidArgument("out", f"{out} is not empty and holds no genfleet batch job")


def _describe(key: dict[str, Any] | None) -> str:
    if not key:
        return "unreadable job file"
    return (f"{key['model']}@{key['version']}, n={key['num_samples']}, {key['format']}, "
            f"seed {key['seed']}, shards of {key['shard_size']}")


def read_manifest(out: str | Path | Output) -> dict[str, Any] | None:
    out = out if isinstance(out, Output) else Output(str(out))
    return json.loads(out.read(MANIFEST)) if out.exists(MANIFEST) else None


# ---------------------------------------------------------------- execution
class _RayShardWriter:
    """The Ray Data actor: holds the model, writes one shard per row it is given."""

    def __init__(self, store_root: str, spec: dict[str, Any], device: str, threads: int) -> None:
        from services.core import metrics as specs
        from services.serving.metrics import make

        self.writer = ShardWriter(store_root, spec, device=device, threads=threads)
        self.tags = {"model": self.writer.spec.model}
        self.samples = make(specs.BATCH_SAMPLES)
        self.shards = make(specs.BATCH_SHARDS)
        self.errors = make(specs.BATCH_ERRORS)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "count": [], "sha256": []}
        for k, start, count in zip(batch["shard"], batch["start"], batch["count"], strict=True):
            shard = Shard(int(k), int(start), int(count))
            try:
                record = self.writer.write(shard)
            except Exception:
                self.errors.inc(1, tags=self.tags)
                raise
            self.samples.inc(record["count"], tags=self.tags)
            self.shards.inc(1, tags=self.tags)
            for key in out:
                out[key].append(record[key])
        return out


OnShard = Callable[[dict[str, Any]], bool]  # a written shard's record -> go on?


def _run_ray(spec: BatchRequest, store_root: str, todo: list[Shard], on_shard: OnShard,
             device: str) -> bool:
    """Shards on a Ray Data actor pool (on GPUs when the spec asks for them); False when
    ``on_shard`` asked to stop."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours follows the samples
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    cores = os.cpu_count() or 1
    threads = max(1, cores // spec.workers)
    items = ray.data.from_items([{"shard": s.index, "start": s.start, "count": s.count}
                                 for s in todo], override_num_blocks=len(todo))
    ds = items.map_batches(
        _RayShardWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=spec.workers),
        num_cpus=1,
        num_gpus=spec.gpus_per_worker or None,
        fn_constructor_kwargs={"store_root": store_root, "spec": spec.to_dict(),
                               "device": device, "threads": threads})
    iterator = ds.iter_rows()
    try:
        for row in iterator:
            if not on_shard(row):
                return False
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return True


def _run_local(spec: BatchRequest, store_root: str, todo: list[Shard], on_shard: OnShard,
               device: str) -> bool:
    writer = ShardWriter(store_root, spec.to_dict(), device=device)
    return all(on_shard(writer.write(shard)) for shard in todo)


def run(spec: BatchRequest, store: ModelStore, *, local: bool = False, device: str = "cpu",
        progress: bool = True, on_progress: Progress | None = None,
        cancel: threading.Event | None = None, todo: list[Shard] | None = None
        ) -> dict[str, Any]:
    """Run (or resume, or find complete) the job; returns its manifest. ``device`` is for
    the local runner; Ray workers use CUDA when ``spec.gpus_per_worker`` > 0. ``todo``:
    what ``plan(spec)`` returned, when the caller planned already (nothing is planned twice).

    Raises:
        InvalidArgument, ModelNotFound: from ``plan``, before anything is written.
        Cancelled: ``cancel`` was set; complete shards stay, the manifest is not written.
    """
    if todo is None:
        spec, todo = plan(spec, store)
    out = Output(spec.out)
    done = read_manifest(out)
    if done is not None:
        return done
    out.prepare()
    out.write(JOB_FILE, json.dumps({"key": spec.key(), "spec": spec.to_dict()},
                                   indent=2).encode())
    out.remove_temporaries()
    total = spec.num_samples
    written = total - sum(s.count for s in todo)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=written, unit="sample", desc=f"batch {spec.model}",
                   dynamic_ncols=True)
    started = time.perf_counter()
    new = 0

    digests: dict[int, str] = {}  # shards written now: the writer hashed the bytes it wrote

    def on_shard(record: dict[str, Any]) -> bool:
        nonlocal written, new
        count = int(record["count"])
        digests[int(record["shard"])] = str(record["sha256"])
        written += count
        new += count
        if bar is not None:
            bar.update(count)
        if on_progress is not None:
            on_progress(written, total)
        return not (cancel is not None and cancel.is_set())

    runner = _run_local if local else _run_ray
    if not local:
        device = "cuda" if spec.gpus_per_worker > 0 else "cpu"
    try:
        finished = runner(spec, str(store.root), todo, on_shard, device) if todo else True
    finally:
        if bar is not None:
            bar.close()
    if not finished:
        out.remove_temporaries()
        raise Cancelled(f"batch job {spec.job_id()} cancelled after {written} of {total} samples; "
                        "re-run it to finish")
    seconds = time.perf_counter() - started
    manifest = _manifest(spec, out, new, seconds, digests)
    if progress:
        rate = new / seconds if seconds > 0 else 0.0
        print(f"wrote {new} samples ({total - new} already there) in {seconds:.1f} s: "
              f"{rate:.0f} samples/s, {len(spec.shards())} shards -> {out}", flush=True)
    return manifest


def _shard_digest(out: Output, spec: BatchRequest, shard: Shard) -> str:
    """The checksum of a shard written by an earlier run (what ``ShardWriter.write`` returns)."""
    data = out.read(shard_file(spec, shard))
    if spec.format != "png":
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    for row in csv.DictReader(io.StringIO(data.decode())):
        digest.update(out.read(row["path"]))
    digest.update(data)
    return digest.hexdigest()


def _manifest(spec: BatchRequest, out: Output, new: int, seconds: float,
              digests: dict[int, str]) -> dict[str, Any]:
    shards = spec.shards()
    records = []
    for shard in shards:
        digest = digests.get(shard.index) or _shard_digest(out, spec, shard)
        records.append({"name": shard.name, "file": shard_file(spec, shard),
                        "start": shard.start, "count": shard.count, "sha256": digest})
    if spec.format == "png":
        rows = ["index,seed,label,path\n"]
        for shard in shards:
            rows += out.read(shard_file(spec, shard)).decode().splitlines(keepends=True)[1:]
        out.write("index.csv", "".join(rows).encode())
    manifest = {
        "key": spec.key(), "job_id": spec.job_id(), "model": spec.model,
        "version": spec.version, "seed": spec.seed, "options": spec.options,
        "format": spec.format, "num_samples": spec.num_samples, "shard_size": spec.shard_size,
        "num_shards": len(shards), "labels": spec.labels.strip() or None,
        "classes": spec.classes,
        "label_histogram": {str(k): v for k, v in spec.label_histogram().items()},
        "shards": records, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "last_run": {"samples_written": new, "seconds": round(seconds, 3)},
    }
    out.write(MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest
