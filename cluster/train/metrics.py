"""Training metrics exported through Ray's metrics port (``ray_`` prefix), built from the
specs in ``services.core.metrics``."""

from __future__ import annotations

from services.core import metrics as specs
from services.serving.metrics import make as _make


class TrainMetrics:
    """Per-epoch training metrics of one job (one instance per worker)."""

    def __init__(self, model: str, family: str) -> None:
        self._tags = {"model": model, "family": family}
        self._loss = _make(specs.TRAIN_LOSS)
        self._epoch = _make(specs.TRAIN_EPOCH)
        self._throughput = _make(specs.TRAIN_THROUGHPUT)
        self._samples = _make(specs.TRAIN_SAMPLES)

    def worker_epoch(self, samples: int) -> None:
        """Every worker: the samples it processed this epoch."""
        self._samples.inc(samples, tags=self._tags)

    def epoch(self, epoch: int, row: dict[str, float]) -> None:
        """Rank 0: the epoch's averaged losses (``loss`` or ``<phase>/loss``) and speed."""
        self._epoch.set(epoch, tags=self._tags)
        self._throughput.set(row["samples_per_s"], tags=self._tags)
        for key, value in row.items():
            if key == "loss" or key.endswith("/loss"):
                phase = key.split("/")[0] if "/" in key else "main"
                self._loss.set(value, tags={**self._tags, "phase": phase})
