"""Normalizing flow: coupling layers with rational-quadratic spline transforms
(neural spline flows, Durkan et al. 2019; coupling as in RealNVP, Dinh et al. 2017),
built with zuko, after a logit pre-transform, trained on uniformly dequantised data
(Theis et al. 2016; Ho et al. 2019).

Spaces: x, integer levels k in [0, L); y = (k + u) / L in (0, 1) with u ~ U[0, 1)^D;
s = logit(a + (1 - 2a) y); z = f(s) with f the coupling flow, z ~ N(0, I).
log p_y(y) = log N(f(s)) + log|det df/ds| + log|det ds/dy|  (exact), and
log P(k) >= log mean_j p_y(y_j) - D log L  (the dequantisation bound, S draws u_j).

encode(k) is the exact image z = f(s(y)) of the bin centre y = (k + 1/2) / L;
decode(z) inverts it exactly and reads the bin back, so decode(encode(x)) == x.

With labels, the flow is class-conditional (the one-hot class is the context of every
coupling). Without a label it scores the exact class-marginal
log sum_c pi_c p(x | c) and samples c ~ pi; encode/decode need the class.

Shapes: B batch, D = C*H*W dimensions, S dequantisation samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import zuko
from torch import Tensor

from services.core.errors import InvalidArgument
from services.core.options import OptionSpec
from services.models.base import (
    PRESET_SHAPES,
    Capability,
    GenerativeModel,
    LossOutput,
    ModelConfig,
    Preset,
    ScoreKind,
    StepCallback,
)
from services.models.noise import Noise

_DENSITY_ROWS = 8192  # rows per density evaluation when scoring (bounds memory) ...
_DENSITY_VALUES = 2**20  # ... and values (rows x D) per evaluation

@dataclass(frozen=True)
class FlowConfig(ModelConfig):
    transforms: int = 8  # coupling layers
    hidden: tuple[int, ...] = (256, 256)  # MLP widths of each coupling's conditioner
    bins: int = 8  # spline bins per dimension
    alpha: float = 0.05  # logit squeeze: keeps s finite at y = 0 and 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transforms < 1 or self.bins < 2:
            raise ValueError("transforms must be >= 1 and bins >= 2")
        if not 0 < self.alpha < 0.5:
            raise ValueError("alpha must be in (0, 0.5)")


class FlowModel(GenerativeModel):
    class_prior: Tensor
    family = "flow"
    Config = FlowConfig
    config: FlowConfig  # the family's own config type (set by GenerativeModel.__init__)
    capabilities = frozenset({Capability.SAMPLE, Capability.CONDITIONAL, Capability.LOG_PROB,
                              Capability.ENCODE, Capability.DECODE})
    score_kind = ScoreKind.LOWER_BOUND
    sampler_options = {
        "temperature": OptionSpec("float", 1.0, "scale of the base noise (Glow's T)",
                                  min=0.0, max=2.0),
    }
    score_options = {
        "samples": OptionSpec("int", 8, "dequantisation samples S (tighter bound)", min=1,
                              max=1024, cost=True),
    }
    train_defaults = {"lr": 1e-3, "batch_size": 128, "epochs": 100, "weight_decay": 1e-5,
                      "grad_clip": 5.0, "select_best": True, "val_every": 5,
                      "ema_decay": 0.995, "cosine_decay": True}
    presets = {
        "digits": Preset(PRESET_SHAPES["digits"]),
        # fully connected couplings grow with D^2: fewer, narrower ones at larger sizes
        "mnist": Preset(PRESET_SHAPES["mnist"], {"transforms": 6, "hidden": (256,), "bins": 6,
                                                        "invariant_batch": 8},
                        {"epochs": 20, "val_every": 1}),
        "cifar10": Preset(PRESET_SHAPES["cifar10"],
                          {"transforms": 4, "hidden": (256,), "bins": 4, "invariant_batch": 8},
                          {"epochs": 40, "val_every": 2}),
    }

    def __init__(self, config: FlowConfig) -> None:
        super().__init__(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the random permutations are part of the architecture
            self.flow = zuko.flows.NSF(
                features=self.num_dims, context=config.num_classes, transforms=config.transforms,
                bins=config.bins, passes=2, randperm=True, hidden_features=config.hidden,
            )

        self._init_class_prior()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.data_shape

    def prepare(self, x: Tensor, labels: Tensor | None) -> None:
        self._fit_class_prior(labels)

    def _context(self, labels: Tensor | None) -> Tensor | None:
        if not self.config.num_classes:
            return None
        if labels is None:
            raise InvalidArgument("labels", "this flow is class-conditional: pass labels")
        return F.one_hot(labels, self.config.num_classes).float()

    # --------------------------------------------------------------- transforms
    def _to_logit(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """y in (0, 1)^D -> s and log|det ds/dy| (B,)."""
        a = self.config.alpha
        p = a + (1 - 2 * a) * y
        s = torch.log(p) - torch.log1p(-p)
        ladj = (math.log(1 - 2 * a) - torch.log(p) - torch.log1p(-p)).sum(1)
        return s, ladj

    def _from_logit(self, s: Tensor) -> Tensor:
        a = self.config.alpha
        return ((torch.sigmoid(s) - a) / (1 - 2 * a)).clamp(0.0, 1.0 - 1e-6)

    def log_density(self, y: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact log-density of continuous y in (0, 1)^D given the class, (B, D) -> (B,)."""
        s, ladj_logit = self._to_logit(y)
        z, ladj_flow = self.flow(self._context(labels)).transform.call_and_ladj(s)
        log_base = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
        return log_base + ladj_flow + ladj_logit

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor, *, labels: Tensor | None = None, phase: str = "main") -> LossOutput:
        levels = self.config.levels
        k = self.to_levels(x).flatten(1).float()  # (B, D)
        y = (k + torch.rand_like(k)) / levels
        labels = labels if self.config.num_classes else None
        nll = -(self.log_density(y, labels) - self.num_dims * math.log(levels))  # nats, (B,)
        loss = nll.mean() / self.num_dims
        return LossOutput(loss, {"bits_per_dim": float(loss.detach()) / math.log(2)})

    # ---------------------------------------------------------------- inference
    def _levels_from_y(self, y: Tensor) -> Tensor:
        levels = self.config.levels
        k = (y * levels).floor().clamp(0, levels - 1)
        return (k / (levels - 1)).view(-1, *self.data_shape)

    def _sample(self, noise: Noise, *, labels: Tensor | None, callback: StepCallback | None,
                temperature: float) -> Tensor:
        z = noise.randn(self.num_dims) * temperature  # (B, D)
        if self.config.num_classes and labels is None:
            labels = self._prior_labels(noise)
        out = self._decode(z.view(-1, *self.data_shape), labels=labels, callback=None,
                           temperature=temperature)
        self._step(callback, 1, 1)
        return out

    def _encode(self, x: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                temperature: float) -> Tensor:
        k = self.to_levels(x).flatten(1).float()
        s, _ = self._to_logit((k + 0.5) / self.config.levels)  # bin centres
        return self.flow(self._context(labels)).transform(s).view(-1, *self.data_shape)

    def _decode(self, z: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                temperature: float) -> Tensor:
        s = self.invariant(lambda zs, ls: self.flow(self._context(ls)).transform.inv(zs),
                           z.flatten(1), labels)
        return self._levels_from_y(self._from_logit(s))

    def _log_prob(self, x: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                  samples: int) -> Tensor:
        levels = self.config.levels
        k = self.to_levels(x).flatten(1).float()  # (B, D)
        gen = torch.Generator().manual_seed(0)
        u = torch.rand((samples, *k.shape), generator=gen).to(k.device)  # (S, B, D)
        b = k.shape[0]
        rows = min(_DENSITY_ROWS, _DENSITY_VALUES // k.shape[1])
        per_pass = max(1, rows // b)  # dequantisation samples per pass: bounded memory
        parts = []
        for lo in range(0, samples, per_pass):
            n = min(per_pass, samples - lo)
            y = ((k + u[lo:lo + n]) / levels).flatten(0, 1)  # (S'*B, D)
            if labels is not None or not self.config.num_classes:
                rep = None if labels is None else labels.repeat(n)
                parts.append(self.log_density(y, rep).view(n, b))  # (S', B)
            else:  # exact class marginal of the density: log sum_c pi_c p(y | c)
                cols = []
                for c in range(self.config.num_classes):
                    cols.append(self.log_density(y, torch.full((n * b,), c, device=y.device)))
                    self._step(callback, lo + n, samples)
                per_class = torch.stack(cols, dim=1)  # (S'*B, K)
                parts.append(torch.logsumexp(per_class + self.class_prior.log(), 1).view(n, b))
            self._step(callback, lo + n, samples)
        log_py = torch.cat(parts)  # (S, B)
        bound = torch.logsumexp(log_py, dim=0) - math.log(samples)
        return bound - self.num_dims * math.log(levels)
