"""``factorized``: every pixel an independent categorical over the data's levels, one
table per class (and one for "no label"). A small, exact model — the smallest thing that
is a real ``GenerativeModel``: a training loss, seeded sampling, an exact log-likelihood,
class conditioning, a sampler option.

Written only against genfleet's model contract (``services.models``), as any plugin is:
imports torch and that, nothing of Ray or gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.models import (
    Capability,
    GenerativeModel,
    LossOutput,
    ModelConfig,
    Noise,
    OptionSpec,
    ScoreKind,
)


@dataclass(frozen=True)
class FactorizedConfig(ModelConfig):
    label_drop: float = 0.1  # share of training examples that train the "no label" table


class FactorizedModel(GenerativeModel):
    family = "factorized"
    Config = FactorizedConfig
    capabilities = frozenset({Capability.SAMPLE, Capability.LOG_PROB, Capability.CONDITIONAL})
    score_kind = ScoreKind.EXACT
    sampler_options: ClassVar[dict[str, OptionSpec]] = {
        "temperature": OptionSpec("float", 1.0, "divides the logits: < 1 sharper, > 1 flatter",
                                  min=0.05, max=10.0),
    }
    train_defaults: ClassVar[dict[str, Any]] = {"epochs": 20, "batch_size": 128, "lr": 0.05}

    def __init__(self, config: FactorizedConfig) -> None:
        super().__init__(config)
        rows = max(config.num_classes, 0) + 1  # the last row: no label
        self.logits = nn.Parameter(torch.zeros(rows, self.num_dims, config.levels))
        self.register_buffer("class_prior", torch.full((max(config.num_classes, 1),),
                                                       1.0 / max(config.num_classes, 1)))

    def _rows(self, labels: Tensor | None, n: int) -> Tensor:
        if labels is None or not self.config.num_classes:
            return torch.full((n,), self.logits.shape[0] - 1, dtype=torch.long,
                              device=self.logits.device)
        return labels.to(self.logits.device).long()

    def prepare(self, x: Tensor, labels: Tensor | None) -> None:
        self._fit_class_prior(labels)

    def forward(self, x: Tensor, *, labels: Tensor | None = None,
                phase: str = "main") -> LossOutput:
        rows = self._rows(labels, x.shape[0])
        if labels is not None and self.training and self.config.label_drop > 0:
            drop = torch.rand(rows.shape, device=rows.device) < self.config.label_drop
            rows = torch.where(drop, torch.full_like(rows, self.logits.shape[0] - 1), rows)
        nll = -self._log_prob_rows(x, rows) / self.num_dims
        return LossOutput(nll.mean(), {"nll_per_dim": float(nll.mean().detach())})

    def _log_prob_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        levels = self.to_levels(x).flatten(1)  # (B, D)
        logp = F.log_softmax(self.logits[rows], dim=-1)  # (B, D, L)
        return logp.gather(-1, levels.unsqueeze(-1)).squeeze(-1).sum(-1)

    def _log_prob(self, x: Tensor, *, labels: Tensor | None, callback: Any,
                  **opts: Any) -> Tensor:
        return self._log_prob_rows(x.to(self.logits.device), self._rows(labels, x.shape[0]))

    def _sample(self, noise: Noise, *, labels: Tensor | None, callback: Any,
                temperature: float = 1.0) -> Tensor:
        if labels is None and self.config.num_classes:
            labels = noise.categorical(self.class_prior.expand(len(noise), -1).cpu())
        rows = self._rows(labels, len(noise))
        probs = F.softmax(self.logits[rows] / temperature, dim=-1)  # (B, D, L)
        u = noise.rand(self.num_dims).to(probs.device)  # one uniform per pixel, per sample
        cdf = probs.cumsum(-1)
        levels = (cdf < u.unsqueeze(-1)).sum(-1).clamp_(max=self.config.levels - 1)
        self._step(callback, 1, 1)
        x = levels.float() / (self.config.levels - 1)
        return x.view(len(noise), *self.data_shape)
