"""What a batch-generation job is, and how it splits into shards (no Ray, no torch).

``BatchRequest`` is the one type of a job: the CLI builds it from flags, BatchService's
codec from protobuf (``out`` then names a directory below the server's batch root), and
the Ray Data job (``cluster.batch``) plans and runs it.

Sample ``i`` of a job is ``model.sample([sample_seed(seed, i)], labels=[label(i)],
**options)``: the same sample ``Generate(model, seed=seed, start_index=i)`` returns. It
depends only on (model version, seed, i, options), never on shards or workers, so a
dataset is byte-identical across runs and worker counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from services.core.errors import InvalidArgument

FORMATS = ("parquet", "png", "npz")
ENCODINGS = ("tensor", "png", "both")  # what a Parquet row's sample is
MAX_SAMPLES = 10**9
DEFAULT_SHARD_SIZE = 1000  # samples per shard


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first sample index
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass
class BatchRequest:
    """A job as the user asked for it; ``version`` is pinned when the job is planned."""

    model: str  # store name (a "name@version" ref is split by ``from_ref``)
    num_samples: int
    out: str  # a directory, file:// URI, or object-store URI (cluster.batch.output)
    format: str = "parquet"
    encoding: str = "tensor"  # parquet rows: the tensor, PNG bytes (text: the string), or both
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    labels: str = ""  # "": the model's choice (unconditional); "balanced"; "0,3,7"
    options: dict[str, Any] = field(default_factory=dict)
    version: int | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    chunk: int = 256  # samples per forward pass inside a shard
    classes: list[str] = field(default_factory=list)  # the model's, filled in by the planner

    def validate(self) -> None:
        """Errors a user can cause, before any work (the model is checked by the planner)."""
        if self.format not in FORMATS:
            raise InvalidArgument("format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.encoding not in ENCODINGS:
            raise InvalidArgument("encoding", f"must be one of {', '.join(ENCODINGS)}, "
                                              f"got {self.encoding!r}")
        if not 1 <= self.num_samples <= MAX_SAMPLES:
            raise InvalidArgument("num_samples", f"must be in [1, {MAX_SAMPLES}], got {self.num_samples}")
        if not 1 <= self.shard_size <= 1_000_000:
            raise InvalidArgument("shard_size", f"must be in [1, 1000000], got {self.shard_size}")
        if not 0 <= self.seed <= 2**64 - 1:
            raise InvalidArgument("seed", "must be in [0, 2^64 - 1]")
        if self.workers < 1:
            raise InvalidArgument("workers", "must be >= 1")
        if self.gpus_per_worker < 0:
            raise InvalidArgument("gpus_per_worker", "must be >= 0")
        if not 1 <= self.chunk <= 65536:
            raise InvalidArgument("chunk", "must be in [1, 65536]")
        self.label_list(num_classes=None)  # the URI's form is checked by the planner

    def label_list(self, num_classes: int | None) -> list[int] | None:
        """The label cycle: sample ``i`` gets ``cycle[i % len(cycle)]``; None: no labels."""
        text = self.labels.strip()
        if not text:
            return None
        if text == "balanced":
            return list(range(num_classes)) if num_classes else None
        try:
            cycle = [int(part) for part in text.split(",")]
        except ValueError:
            raise InvalidArgument("labels", f"give 'balanced' or class ids like 0,3,7; got {text!r}"
                                  ) from None
        if num_classes is not None and any(not 0 <= c < num_classes for c in cycle):
            raise InvalidArgument("labels", f"class ids must be in [0, {num_classes - 1}]")
        return cycle

    def label_histogram(self) -> dict[int, int]:
        """Samples per label over the whole job (-1: no label)."""
        cycle = self.label_list(len(self.classes) or None)
        if cycle is None:
            return {-1: self.num_samples}
        whole, rest = divmod(self.num_samples, len(cycle))
        hist: dict[int, int] = {}
        for j, label in enumerate(cycle):
            hist[label] = hist.get(label, 0) + whole + (1 if j < rest else 0)
        return dict(sorted(hist.items()))

    def shards(self) -> list[Shard]:
        return [Shard(k, start, min(self.shard_size, self.num_samples - start))
                for k, start in enumerate(range(0, self.num_samples, self.shard_size))]

    def key(self) -> dict[str, Any]:
        """What makes two runs the same job (and so the same bytes): not workers or GPUs."""
        return {"model": self.model, "version": self.version, "num_samples": self.num_samples,
                "format": self.format, "shard_size": self.shard_size, "seed": self.seed,
                "encoding": self.encoding if self.format == "parquet" else None,
                "labels": self.labels.strip(), "options": dict(sorted(self.options.items())),
                "chunk": self.chunk}

    def job_id(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
