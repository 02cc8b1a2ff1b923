"""The one interface every generative family implements.

Data convention: an image batch is a float tensor ``(B, C, H, W)`` whose values lie on
the grid ``k / (levels - 1)`` for integer ``k`` in ``[0, levels)``; a text batch is an
int64 tensor ``(B, L)`` of token ids in ``[0, levels)``. Likelihoods are of that discrete
data, in nats per sample; ``bits_per_dim`` converts them.

Reproducibility: every random draw of an inference method goes through ``Noise``, which
keeps one ``torch.Generator`` per sample. Row ``i`` of a batch therefore depends only on
its own seed, never on its batch-mates, and ``sample_seeds(seed, n)`` derives the seed of
sample ``i`` of a request from ``(seed, i)`` alone.

Shapes: B batch, C channels, H/W spatial, D = C*H*W dimensions, Z latent size.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from services.core.errors import InvalidArgument, UnsupportedOperation
from services.core.options import OptionSpec, resolve_options
from services.models.noise import Noise


class Capability(enum.StrEnum):
    """What an inference call a family supports; advertised by ListModels."""

    SAMPLE = "sample"
    CONDITIONAL = "conditional"  # sample/score given a class label
    LOG_PROB = "log_prob"
    ENCODE = "encode"
    DECODE = "decode"


class ScoreKind(enum.StrEnum):
    """How a ``log_prob`` relates to the true log-likelihood of the discrete data."""

    EXACT = "exact"
    LOWER_BOUND = "lower_bound"
    UNNORMALIZED = "unnormalized"  # -energy: comparable within one model only


StepCallback = Callable[[int, int], None]
"""Called after each sampler step as ``callback(step, total)``; raising aborts sampling."""


@dataclass(frozen=True)
class ModelConfig:
    """Fields every family shares: the shape of the data it models."""

    channels: int = 1
    image_size: int = 8
    levels: int = 17  # discrete values per dimension (17 for digits, 256 for 8-bit images)
    num_classes: int = 10  # 0: no labels
    # Batch invariance (``GenerativeModel.invariant``): > 0 runs the sampling network on
    # chunks of exactly this many rows, padded with copies, so that a sample's bits do not
    # depend on how many were batched with it (CPU and CUDA kernels pick their algorithm
    # by batch size). The 17-level digits grid absorbs those last bits (0: the batch as it
    # comes, fastest); the 256-level presets and imports use 8 (README: measured cost).
    invariant_batch: int = 0

    def __post_init__(self) -> None:
        if self.channels < 1 or self.image_size < 1:
            raise ValueError("channels and image_size must be positive")
        if self.invariant_batch < 0:
            raise ValueError("invariant_batch must be >= 0")
        if self.levels < 2:
            raise ValueError("levels must be at least 2")
        if self.num_classes < 0:
            raise ValueError("num_classes must be >= 0")

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build a config from JSON-like values; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidArgument("config", f"unknown keys {unknown} for {cls.__name__}")
        clean: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                 for k, v in values.items()}
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LossOutput:
    """What ``forward`` returns: the loss to back-propagate and numbers to log."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)




def _chunks(n: int, *rows: Any) -> Iterator[tuple[int, list[Any]]]:
    """Chunks of exactly n rows of each of ``rows`` (lists, tensors of the same length, or
    None), the last padded with copies of its own first row: yields (how many rows of the
    chunk are real, the chunk of each). Callers drop the padding rows' results."""
    b = len(next(r for r in rows if r is not None))
    for lo in range(0, b, n):
        k = min(n, b - lo)
        parts = []
        for r in rows:
            part = None if r is None else r[lo:lo + n]
            if part is not None and k < n:
                part = (torch.cat([part, part[:1].expand(n - k, *part.shape[1:])])
                        if isinstance(part, Tensor) else [*part, *[part[0]] * (n - k)])
            parts.append(part)
        yield k, parts


@dataclass(frozen=True)
class Preset:
    """Sizes of a family for one kind of data: config and training overrides, applied
    on top of the family's defaults (and under the user's ``--set``)."""

    shape: tuple[int, int, int]  # (C, H, W) of the data it is sized for
    model: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)


# the data each built-in preset is named after
PRESET_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class GenerativeModel(nn.Module, abc.ABC):
    """Base class of the six families.

    Training goes through ``forward`` (so DDP's gradient sync works); a family with two
    optimisers declares ``phases``. Inference methods validate their input, then call a
    private hook that the family overrides.
    """

    family: ClassVar[str]
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.SAMPLE})
    phases: ClassVar[tuple[str, ...]] = ("main",)
    score_kind: ClassVar[ScoreKind | None] = None
    sampler_options: ClassVar[dict[str, OptionSpec]] = {}
    score_options: ClassVar[dict[str, OptionSpec]] = {}
    # Training defaults the generic loop starts from (keys of services.training.TrainConfig).
    train_defaults: ClassVar[dict[str, Any]] = {}
    # Named sizes (``genfleet train --preset``); "digits" is the defaults themselves.
    presets: ClassVar[dict[str, Preset]] = {"digits": Preset(PRESET_SHAPES["digits"])}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}")
        self.config = config

    def option_specs(self) -> dict[str, OptionSpec]:
        """Sampler options of this model (defaults may depend on its config)."""
        return dict(self.sampler_options)

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.config.data_shape

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def latent_shape(self) -> tuple[int, ...] | None:
        """Shape of one latent for encode/decode, or None without latents."""
        return None

    @property
    def num_dims(self) -> int:
        return math.prod(self.data_shape)

    # ------------------------------------------------------------------- training
    @abc.abstractmethod
    def forward(
        self, x: Tensor, *, labels: Tensor | None = None, phase: str = "main"
    ) -> LossOutput:
        """Training loss for a batch of data ``x`` in ``phase``."""

    def param_groups(self, phase: str) -> list[nn.Parameter]:
        """Parameters the optimiser of ``phase`` updates."""
        return list(self.parameters())

    def prepare(self, x: Tensor, labels: Tensor | None) -> None:
        """Called once with the whole training split before training (data statistics)."""

    def on_train_step(self, step: int) -> None:
        """Called after every optimiser step of the last phase."""

    # ------------------------------------------------------------------ inference
    @torch.no_grad()  # not inference_mode: the EBM needs gradients in x while sampling
    def sample(
        self,
        seeds: Sequence[int],
        *,
        labels: Tensor | None = None,
        callback: StepCallback | None = None,
        **options: Any,
    ) -> Tensor:
        """Draw ``len(seeds)`` samples; sample ``i`` depends only on ``seeds[i]``.

        Args:
            seeds: one seed per sample (see ``sample_seeds``).
            labels: ``(B,)`` class ids for conditional families; None lets the model pick
                (each sample draws its class from its own stream, or samples
                unconditionally where the family supports it).
            callback: called after each sampler step; raising aborts the call.
            **options: sampler options, see ``sampler_options``.

        Returns:
            ``(B, *data_shape)`` in the data convention of this module.
        """
        labels, opts = self.check_sample_request(len(seeds), labels, options)
        return self.sample_checked(seeds, labels=labels, callback=callback, options=opts)

    @torch.no_grad()
    def sample_checked(self, seeds: Sequence[int], *, labels: Tensor | None,
                       callback: StepCallback | None, options: Mapping[str, Any]) -> Tensor:
        """``sample`` for a request already validated and resolved (the serving path checks
        requests once, in ``services.core.validation``): labels on this model's device,
        every option present. Nothing is checked again here."""
        n = self.config.invariant_batch
        if not n or len(seeds) == n:
            noise = Noise(seeds, self.device)
            return self.postprocess(self._sample(noise, labels=labels, callback=callback,
                                                 **options))
        # batch invariance (config.invariant_batch): the whole sampler on chunks of n rows
        # (padding rows are copies of a real row's seed: valid inputs, streams of their own)
        outs = [self._sample(Noise(chunk, self.device), labels=part, callback=callback,
                             **options)[:k]
                for k, (chunk, part) in _chunks(n, list(seeds), labels)]
        return self.postprocess(torch.cat(outs))

    def check_sample_request(self, n: int, labels: Tensor | None, options: Mapping[str, Any]
                             ) -> tuple[Tensor | None, dict[str, Any]]:
        """Validate a sampling request; returns (labels on the device, resolved options).

        Raises:
            UnsupportedOperation: the family cannot sample.
            InvalidArgument: no samples, bad labels, unknown or out-of-range options.
        """
        self._require(Capability.SAMPLE)
        if n < 1:
            raise InvalidArgument("num_samples", "must be at least 1")
        return self._check_labels(labels, n), resolve_options(self.option_specs(), options)

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None,
                 callback: StepCallback | None = None, **options: Any) -> Tensor:
        """Log-likelihood (or bound, or -energy; see ``score_kind``) per sample, nats, ``(B,)``.

        ``callback`` is called between the iterations of iterative bounds (raising aborts).
        """
        self._require(Capability.LOG_PROB)
        x = self._check_data(x)
        labels = self._check_labels(labels, x.shape[0])
        opts = resolve_options(self.score_options, options)
        self._step(callback, 0, 1)
        with torch.no_grad():
            return self._log_prob(x, labels=labels, callback=callback, **opts)

    def bits_per_dim(self, log_prob: Tensor) -> Tensor:
        """Convert per-sample log-likelihoods in nats to bits per dimension."""
        return -log_prob / (self.num_dims * math.log(2.0))

    @torch.no_grad()
    def encode(self, x: Tensor, *, labels: Tensor | None = None,
               callback: StepCallback | None = None, **options: Any) -> Tensor:
        """Latents ``(B, *latent_shape)`` of data ``x``; ``callback`` as in ``log_prob``."""
        self._require(Capability.ENCODE)
        x = self._check_data(x)
        labels = self._check_labels(labels, x.shape[0])
        opts = resolve_options(self.option_specs(), options)
        self._step(callback, 0, 1)
        return self._encode(x, labels=labels, callback=callback, **opts)

    @torch.no_grad()
    def decode(self, z: Tensor, *, labels: Tensor | None = None,
               callback: StepCallback | None = None, **options: Any) -> Tensor:
        """Data ``(B, *data_shape)`` from latents ``z``; ``callback`` as in ``log_prob``."""
        self._require(Capability.DECODE)
        shape = self.latent_shape
        if shape is None or z.dim() != len(shape) + 1 or tuple(z.shape[1:]) != shape:
            raise InvalidArgument("latents", f"expected shape (B, {shape}), got {tuple(z.shape)}")
        if not torch.is_floating_point(z) or not torch.isfinite(z).all():
            raise InvalidArgument("latents", "must be finite floating-point values")
        labels = self._check_labels(labels, z.shape[0])
        opts = resolve_options(self.option_specs(), options)
        self._step(callback, 0, 1)
        return self.postprocess(self._decode(z.to(self.device), labels=labels, callback=callback,
                                             **opts))

    # ----------------------------------------------------------- family hooks
    def _sample(
        self, noise: Noise, *, labels: Tensor | None, callback: StepCallback | None, **opts: Any
    ) -> Tensor:
        raise UnsupportedOperation(f"{self.family} cannot sample")

    def _log_prob(self, x: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                  **opts: Any) -> Tensor:
        raise UnsupportedOperation(f"{self.family} has no log_prob")

    def _encode(self, x: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                **opts: Any) -> Tensor:
        raise UnsupportedOperation(f"{self.family} cannot encode")

    def _decode(self, z: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                **opts: Any) -> Tensor:
        raise UnsupportedOperation(f"{self.family} cannot decode")

    # ------------------------------------------------------------------ helpers
    def postprocess(self, x: Tensor) -> Tensor:
        """Clamp to [0, 1] and snap to the data's level grid (NaN -> 0: a diverging sampler
        never yields values off the grid)."""
        top = self.config.levels - 1
        return (x.float().nan_to_num(0.0).clamp(0.0, 1.0) * top).round() / top

    def to_levels(self, x: Tensor) -> Tensor:
        """Data in [0, 1] -> integer levels ``[0, levels)`` int64."""
        return (x * (self.config.levels - 1)).round().long()

    def _require(self, capability: Capability) -> None:
        if capability not in self.capabilities:
            supported = sorted(c.value for c in self.capabilities)
            raise UnsupportedOperation(
                f"{self.family} models do not support {capability.value}; they support {supported}"
            )

    def _check_labels(self, labels: Tensor | None, n: int) -> Tensor | None:
        if labels is None:
            return None
        if Capability.CONDITIONAL not in self.capabilities or self.config.num_classes == 0:
            raise InvalidArgument("labels", f"this {self.family} model is not class-conditional")
        if labels.shape != (n,) or labels.dtype not in (torch.int32, torch.int64):
            raise InvalidArgument("labels", f"expected {n} integer labels, got {tuple(labels.shape)}")
        k = self.config.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise InvalidArgument("labels", f"must be in [0, {k - 1}]")
        return labels.long().to(self.device)

    def _check_data(self, x: Tensor) -> Tensor:
        shape = self.data_shape
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.shape[0] == 0:
            raise InvalidArgument("data", f"expected shape (B>=1, {shape}), got {tuple(x.shape)}")
        if self.data_dtype == torch.int64:
            if x.dtype not in (torch.int32, torch.int64):
                raise InvalidArgument("data", f"expected integer tokens, got {x.dtype}")
            if int(x.min()) < 0 or int(x.max()) >= self.config.levels:
                raise InvalidArgument("data", f"tokens must be in [0, {self.config.levels - 1}]")
            return x.long().to(self.device)
        if not torch.is_floating_point(x):
            raise InvalidArgument("data", f"expected floating-point values, got {x.dtype}")
        if not torch.isfinite(x).all() or float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise InvalidArgument("data", "values must be finite and in [0, 1]")
        return self.postprocess(x.to(self.device))

    def _init_class_prior(self) -> None:
        """A ``class_prior`` buffer (uniform until ``prepare`` fits it to the training
        labels): unlabelled calls to a conditional model draw each sample's class from it
        (``_prior_labels``), and class-marginal scores weigh classes by it."""
        k = max(self.config.num_classes, 1)
        self.register_buffer("class_prior", torch.full((k,), 1.0 / k))

    def _prior_labels(self, noise: Noise) -> Tensor:
        """A class per sample drawn from ``class_prior`` with that sample's own stream."""
        prior = self.get_buffer("class_prior")
        return noise.categorical(prior.expand(len(noise), -1))

    def _fit_class_prior(self, labels: Tensor | None) -> None:
        """Set the ``class_prior`` buffer to the add-one-smoothed label frequencies."""
        prior = getattr(self, "class_prior", None)
        if labels is None or not self.config.num_classes or not isinstance(prior, Tensor):
            return
        counts = torch.bincount(labels.cpu(), minlength=self.config.num_classes).float()
        prior.copy_((counts + 1) / (counts.sum() + len(counts)))

    def _random_labels(self, noise: Noise) -> Tensor:
        """A class per sample drawn from that sample's own stream."""
        return noise.randint(self.config.num_classes)

    def invariant(self, fn: Callable[..., Tensor], *rows: Tensor | None) -> Tensor:
        """``fn(*rows)`` (each a batch of the same B rows, or None), computed on chunks of
        exactly ``config.invariant_batch`` rows (the last padded with copies of its first
        row, whose results are dropped), so that row i of the result has the same bits
        whatever B is; as one call when the setting is 0. ``sample`` chunks the whole
        sampler this way already; families call this where a network maps rows that did
        not come through it (decode, or a sampler that doubles its rows for guidance)."""
        n = self.config.invariant_batch
        b = next(r for r in rows if r is not None).shape[0]
        if not n or b == n:
            return fn(*rows)
        return torch.cat([fn(*parts)[:k] for k, parts in _chunks(n, *rows)])

    @staticmethod
    def _step(callback: StepCallback | None, step: int, total: int) -> None:
        if callback is not None:
            callback(step, total)
