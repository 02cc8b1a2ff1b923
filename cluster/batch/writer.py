"""Generate one shard and write it atomically (no Ray: the Ray Data actors and the local
runner both use this).

Formats (``out`` is the job's directory):
- parquet: ``data/shard-NNNNN.parquet``, one row per sample: ``index``, ``seed``,
  ``label`` (null without labels), and by ``encoding``: ``sample`` (the tensor flattened:
  float32 in [0, 1] for images, int64 token ids for text; "tensor", the default) and/or
  ``png`` bytes (images) or ``text`` (text models) ("png"; "both" has both).
- npz: ``data/shard-NNNNN.npz`` with ``samples`` (n, *shape), ``labels`` (-1: none),
  ``seeds``, ``index``.
- png: ``<class>/<index>.png`` (``unlabelled/`` without labels) and the shard's index file
  ``index/shard-NNNNN.csv``, written last: it is the shard's commit marker.

Every file becomes visible under its name only when complete (``cluster.batch.output``:
temporary name + rename locally, a completed upload on an object store), so a reader (or a
re-run) never sees a partial file.
"""

from __future__ import annotations

import csv
import hashlib
import io
from typing import Any

import numpy as np
import torch

from cluster.batch.output import Output
from services.core.batch import BatchRequest, Shard
from services.core.data import decode_text, to_pngs
from services.core.store import ModelStore
from services.models import load_model, sample_seeds

UNLABELLED = "unlabelled"


def shard_file(spec: BatchRequest, shard: Shard) -> str:
    """The file whose presence means ``shard`` is complete (relative to the output)."""
    if spec.format == "png":
        return f"index/{shard.name}.csv"
    return f"data/{shard.name}.{spec.format}"


class ShardWriter:
    """Holds one model; ``write(shard)`` generates the shard's samples and writes them."""

    def __init__(self, store_root: str, spec: dict[str, Any], device: str = "cpu",
                 threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.spec = BatchRequest(**spec)
        self.out = Output(self.spec.out)
        self.model, self.meta = load_model(ModelStore(store_root),
                                           f"{self.spec.model}@{self.spec.version}", device)
        self.classes: list[str] = [str(c) for c in self.meta.data.get("classes", [])]
        self.text = self.model.data_dtype == torch.int64
        self.cycle = self.spec.label_list(len(self.classes) or None)

    def labels(self, shard: Shard) -> list[int] | None:
        if self.cycle is None:
            return None
        return [self.cycle[i % len(self.cycle)] for i in range(shard.start, shard.start + shard.count)]

    @torch.no_grad()
    def generate(self, shard: Shard) -> tuple[np.ndarray, list[int], list[int] | None]:
        """(samples (n, *shape), per-sample seeds, labels) of ``shard``."""
        seeds = sample_seeds(self.spec.seed, shard.count, shard.start)
        labels = self.labels(shard)
        parts = []
        for lo in range(0, shard.count, self.spec.chunk):
            hi = min(lo + self.spec.chunk, shard.count)
            y = None if labels is None else torch.tensor(labels[lo:hi], dtype=torch.long,
                                                          device=self.model_device)
            parts.append(self.model.sample(seeds[lo:hi], labels=y, **self.spec.options).cpu())
        x = torch.cat(parts)
        arr = x.long().numpy() if self.text else x.float().numpy()
        return arr, seeds, labels

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def write(self, shard: Shard) -> dict[str, Any]:
        """Generate ``shard`` and write it (replacing any earlier copy, byte for byte the
        same); returns its index, sample count and checksum."""
        arr, seeds, labels = self.generate(shard)
        index = list(range(shard.start, shard.start + shard.count))
        writer = {"parquet": self._parquet, "npz": self._npz, "png": self._png}[self.spec.format]
        digest = writer(shard, arr, seeds, labels, index)
        return {"shard": shard.index, "count": shard.count, "sha256": digest}

    # ------------------------------------------------------------------ formats
    def _pngs(self, arr: np.ndarray) -> list[bytes]:
        return to_pngs(arr, self.model.config.levels)

    def _parquet(self, shard: Shard, arr: np.ndarray, seeds: list[int],
                 labels: list[int] | None, index: list[int]) -> str:
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = arr.reshape(len(arr), -1)
        columns: dict[str, Any] = {
            "index": pa.array(index, pa.int64()),
            "seed": pa.array(seeds, pa.uint64()),
            "label": pa.array(labels if labels is not None else [None] * len(arr), pa.int32()),
        }
        if self.spec.encoding in ("tensor", "both"):
            columns["sample"] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.ravel(), pa.int64() if self.text else pa.float32()), flat.shape[1])
        if self.spec.encoding in ("png", "both"):
            if self.text:
                columns["text"] = pa.array(decode_text(arr, self.meta.data.get("vocab", "")))
            else:
                columns["png"] = pa.array(self._pngs(arr), pa.binary())
        meta = {"model": self.spec.model, "version": self.spec.version,
                "shape": list(arr.shape[1:]), "classes": self.classes}
        table = pa.table(columns).replace_schema_metadata({"genfleet": json.dumps(meta)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self._commit(shard, buf.getvalue())

    def _npz(self, shard: Shard, arr: np.ndarray, seeds: list[int],
             labels: list[int] | None, index: list[int]) -> str:
        buf = io.BytesIO()
        np.savez(buf, samples=arr, seeds=np.asarray(seeds, np.uint64),
                 labels=np.asarray(labels if labels is not None else [-1] * len(arr), np.int32),
                 index=np.asarray(index, np.int64))
        return self._commit(shard, buf.getvalue())

    def _commit(self, shard: Shard, data: bytes) -> str:
        """Write a one-file shard; its checksum."""
        self.out.write(shard_file(self.spec, shard), data)
        return hashlib.sha256(data).hexdigest()

    def _png(self, shard: Shard, arr: np.ndarray, seeds: list[int],
             labels: list[int] | None, index: list[int]) -> str:
        digest = hashlib.sha256()
        rows = io.StringIO()
        table = csv.writer(rows, lineterminator="\n")
        table.writerow(["index", "seed", "label", "path"])
        for i, png, seed, label in zip(index, self._pngs(arr), seeds,
                                       labels or [-1] * len(arr), strict=True):
            folder = self.classes[label] if label >= 0 and self.classes else UNLABELLED
            rel = f"{folder}/{i:09d}.png"
            self.out.write(rel, png)
            digest.update(png)
            table.writerow([i, seed, label, rel])
        data = rows.getvalue().encode()
        digest.update(data)
        self.out.write(shard_file(self.spec, shard), data)  # the commit marker
        return digest.hexdigest()
