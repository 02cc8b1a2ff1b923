"""Quality report of a trained model: FD against real test data next to the real-data
floor, class statistics, test bits/dim, sampling speed, and a PNG grid.

The feature space is a classifier trained on the real training split; it is cached in
the model store (safetensors) keyed by a fingerprint of that split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from services.core.data import Dataset, Splits, decode_text
from services.core.store import ModelStore
from services.evaluation.classifier import (
    ClassifierConfig,
    FeatureClassifier,
    embed,
    train_classifier,
)
from services.evaluation.features import RandomFeatures
from services.evaluation.fid import frechet_distance
from services.evaluation.grid import save_grid
from services.models import Capability, GenerativeModel, ScoreKind, sample_seeds


@dataclass
class QualityReport:
    family: str
    num_samples: int
    sample_ms: float  # wall time per sample at batch size ``batch_size``
    batch_size: int
    fd: float | None = None
    fd_floor: float | None = None  # FD(real train, real test) in the same feature space
    fd_ratio: float | None = None
    class_share: list[float] = field(default_factory=list)  # predicted class of samples
    min_class_share: float | None = None
    mean_confidence: float | None = None
    label_accuracy: float | None = None  # conditional: predicted class == requested
    # conditional models, called without labels (what a caller who passes none gets)
    unlabelled_fd: float | None = None
    unlabelled_fd_ratio: float | None = None
    unlabelled_min_class_share: float | None = None
    real_class_share: list[float] = field(default_factory=list)  # real test data
    real_mean_confidence: float | None = None
    test_bits_per_dim: float | None = None
    score_kind: str | None = None
    test_energy: float | None = None  # EBM: mean energy of real test data
    init_fd_ratio: float | None = None  # EBM: FD ratio of the chains' starting points
    # the same in a fixed random feature space (services.evaluation.features): needs no
    # labels and is trained on nothing, so it is there for unlabelled image data too
    fixed_fd: float | None = None
    fixed_fd_floor: float | None = None
    fixed_fd_ratio: float | None = None
    text_samples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, [], "")}

    def table(self) -> str:
        """Model samples next to held-out real data, as aligned text."""
        def fmt(v: float | None, spec: str = ".3f") -> str:
            return "-" if v is None else format(v, spec)

        rows = [("metric", "samples", "real test")]
        if self.fd is not None:
            rows += [
                ("FD (vs real test)", fmt(self.fd, ".2f"), f"{fmt(self.fd_floor, '.2f')} (train)"),
                ("FD / floor", fmt(self.fd_ratio, ".2f"), "1.00"),
                ("min class share", fmt(self.min_class_share),
                 fmt(min(self.real_class_share) if self.real_class_share else None)),
                ("mean confidence", fmt(self.mean_confidence), fmt(self.real_mean_confidence)),
            ]
            if self.label_accuracy is not None:
                rows.append(("label accuracy", fmt(self.label_accuracy), "-"))
            if self.unlabelled_fd_ratio is not None:
                rows += [("FD / floor, no labels", fmt(self.unlabelled_fd_ratio, ".2f"), "-"),
                         ("min class share, no labels", fmt(self.unlabelled_min_class_share),
                          "-")]
            if self.init_fd_ratio is not None:
                rows.append(("FD / floor, chain init", fmt(self.init_fd_ratio, ".2f"), "-"))
        if self.fixed_fd is not None:
            rows += [("FD, fixed random features", fmt(self.fixed_fd, ".2f"),
                      f"{fmt(self.fixed_fd_floor, '.2f')} (train)"),
                     ("FD / floor, fixed features", fmt(self.fixed_fd_ratio, ".2f"), "1.00")]
        if self.test_bits_per_dim is not None:
            rows.append((f"test bits/dim ({self.score_kind})", "-", fmt(self.test_bits_per_dim)))
        if self.test_energy is not None:
            rows.append(("mean test energy", "-", fmt(self.test_energy)))
        rows.append(("sampling ms/sample", fmt(self.sample_ms, ".2f"), f"(batch {self.batch_size})"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


# ------------------------------------------------------------------- classifier
def get_classifier(store: ModelStore, train: Dataset) -> FeatureClassifier:
    """The evaluation classifier of this training split, trained once and cached."""
    key = f"classifier-{train.fingerprint()}"
    directory = store.root / "_eval"
    weights, meta = directory / f"{key}.safetensors", directory / f"{key}.json"
    if weights.exists() and meta.exists():
        config = ClassifierConfig(**json.loads(meta.read_text()))
        model = FeatureClassifier(config)
        model.load_state_dict(load_file(weights))
        return model.eval()
    model = train_classifier(train)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{key}.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(weights)
    meta.write_text(json.dumps(dataclasses.asdict(model.config)))
    return model


# ------------------------------------------------------------------- sampling
def draw(model: GenerativeModel, n: int, *, seed: int = 0, batch_size: int = 250,
         balanced_labels: bool = True, progress: bool = False, **options: Any
         ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``n`` samples in batches; conditional models get labels ``i % K``.

    Returns:
        (samples, labels or None, seconds spent sampling).
    """
    conditional = Capability.CONDITIONAL in model.capabilities and model.config.num_classes > 0
    labels = torch.arange(n) % model.config.num_classes if conditional and balanced_labels else None
    seeds = sample_seeds(seed, n)
    chunks = []
    start = time.perf_counter()
    for lo in tqdm(range(0, n, batch_size), desc=f"sample {model.family}", disable=not progress,
                   unit="batch", leave=False):
        hi = min(n, lo + batch_size)
        chunks.append(model.sample(seeds[lo:hi], labels=None if labels is None else labels[lo:hi],
                                   **options).cpu())
    return torch.cat(chunks), labels, time.perf_counter() - start


def _test_tensors(test: Dataset, model: GenerativeModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.from_numpy(test.as_float())
    y = None if test.labels is None else torch.from_numpy(test.labels)
    return x.to(model.device), y


@torch.no_grad()
def test_bits_per_dim(model: GenerativeModel, test: Dataset, batch_size: int = 128) -> float | None:
    """Mean test bits/dim (class-marginal for conditional models); None without one."""
    if Capability.LOG_PROB not in model.capabilities:
        return None
    if model.score_kind == ScoreKind.UNNORMALIZED:
        return None
    x, _ = _test_tensors(test, model)
    values = [model.bits_per_dim(model.log_prob(x[i:i + batch_size])) for i in
              range(0, len(x), batch_size)]
    return float(torch.cat(values).mean())


def _class_share(probs: torch.Tensor, k: int) -> np.ndarray:
    """Share of each of ``k`` classes among the classifier's predictions ``(N, K)``."""
    return np.bincount(probs.argmax(1).numpy(), minlength=k) / len(probs)


def evaluate_model(model: GenerativeModel, splits: Splits, *, store: ModelStore,
                   num_samples: int = 1000, seed: int = 0, batch_size: int = 250,
                   progress: bool = False, without_labels: bool = True, score: bool = True,
                   **options: Any) -> QualityReport:
    """Measure ``model`` against the real test split (see the module docstring).

    Conditional models are sampled with balanced labels; with ``without_labels`` also
    without labels (the call a client that passes none makes), reported as ``unlabelled_*``;
    ``score=False`` skips the test split's bits/dim.
    """
    model.eval()
    samples, labels, seconds = draw(model, num_samples, seed=seed, batch_size=batch_size,
                                    progress=progress, **options)
    report = QualityReport(family=model.family, num_samples=num_samples,
                           sample_ms=1000 * seconds / num_samples, batch_size=batch_size,
                           score_kind=model.score_kind.value if model.score_kind else None)
    report.test_bits_per_dim = test_bits_per_dim(model, splits.test) if score else None
    if splits.train.kind == "text":
        report.text_samples = decode_text(samples[:8].numpy(), splits.train.vocab)
        return report
    if model.score_kind == ScoreKind.UNNORMALIZED:
        x, _ = _test_tensors(splits.test, model)
        report.test_energy = float(-model.log_prob(x).mean())
    train_x = torch.from_numpy(splits.train.as_float())
    test_x = torch.from_numpy(splits.test.as_float())
    space = RandomFeatures(train_x.shape[1]).fit(train_x)
    report.fixed_fd, report.fixed_fd_floor = space.fd(samples, test_x), space.fd(train_x, test_x)
    report.fixed_fd_ratio = report.fixed_fd / report.fixed_fd_floor
    if splits.train.labels is None:  # no classifier to train: the fixed features only
        return report
    clf = get_classifier(store, splits.train)
    f_test, p_test = embed(clf, torch.from_numpy(splits.test.as_float()))
    f_train, _ = embed(clf, torch.from_numpy(splits.train.as_float()))
    f_gen, p_gen = embed(clf, samples)
    k = splits.train.num_classes
    report.fd_floor = frechet_distance(f_train.numpy(), f_test.numpy())
    report.fd = frechet_distance(f_gen.numpy(), f_test.numpy())
    report.fd_ratio = report.fd / report.fd_floor
    pred = p_gen.argmax(1)
    share = _class_share(p_gen, k)
    report.class_share = [round(float(s), 4) for s in share]
    report.min_class_share = float(share.min())
    report.mean_confidence = float(p_gen.max(1).values.mean())
    real_share = _class_share(p_test, k)
    report.real_class_share = [round(float(s), 4) for s in real_share]
    report.real_mean_confidence = float(p_test.max(1).values.mean())
    if labels is not None:
        report.label_accuracy = float((pred == labels).float().mean())
        if without_labels:
            free, _, _ = draw(model, num_samples, seed=seed, batch_size=batch_size,
                              balanced_labels=False, progress=progress, **options)
            f_free, p_free = embed(clf, free)
            report.unlabelled_fd = frechet_distance(f_free.numpy(), f_test.numpy())
            report.unlabelled_fd_ratio = report.unlabelled_fd / report.fd_floor
            report.unlabelled_min_class_share = float(_class_share(p_free, k).min())
    if model.family == "ebm":
        init, _, _ = draw(model, num_samples, seed=seed, batch_size=batch_size, init_only=True)
        f_init, _ = embed(clf, init)
        report.init_fd_ratio = frechet_distance(f_init.numpy(), f_test.numpy()) / report.fd_floor
    if not math.isfinite(report.fd):
        raise RuntimeError("Fréchet distance is not finite")
    return report


def write_grid(model: GenerativeModel, path: Path, *, title: str = "", seed: int = 0,
               **options: Any) -> Path:
    """10 x 10 samples: one row per class for conditional models (class in the margin)."""
    k = model.config.num_classes
    conditional = Capability.CONDITIONAL in model.capabilities and k > 0
    rows = min(k, 10) if conditional else 10
    labels = torch.arange(rows).repeat_interleave(10) if conditional else None
    x = model.sample(sample_seeds(seed, rows * 10), labels=labels, **options).cpu().numpy()
    scale = max(2, min(6, 96 // x.shape[-1]))  # 8x8 digits x6, 32x32 photos x3
    return save_grid(x, path, ncols=10, scale=scale, title=title or model.family,
                     row_labels=[str(i) for i in range(rows)] if conditional else None)
