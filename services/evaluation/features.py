"""A fixed feature space for the Fréchet distance that nothing is trained in: a small
convolutional net with seeded random weights (the same for every run, model and dataset),
its channels' means and standard deviations at three scales, standardised by the real
data's statistics.

Why beside the evaluation classifier (``services.evaluation.classifier``): the classifier's
features are learnt from the data's labels, so on data whose labels say little (crops of
two photographs) they are unstable from one training to the next, and inputs unlike the
training data (noise) land anywhere. Random convolutional features are a known, stable
stand-in for a learnt feature space (they respond to colour, edges and texture at each
scale) and depend on no training at all, so they are neither the model's own nor the
classifier's.

Shapes: B batch, C channels, H/W spatial, F <= 2 x (32 + 64 + 128) features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from services.evaluation.fid import frechet_distance

WIDTHS = (32, 64, 128)


class RandomFeatures:
    """``RandomFeatures(channels).fit(real)``, then ``fd(samples, real_test)``."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weights: list[Tensor] = []
        c_in = channels
        for c_out in WIDTHS:  # He-initialised: activations keep their scale through ReLU
            self.weights.append(torch.randn(c_out, c_in, 3, 3, generator=gen)
                                * (2.0 / (c_in * 9)) ** 0.5)
            c_in = c_out
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.keep: Tensor | None = None

    @torch.no_grad()
    def raw(self, x: Tensor, batch: int = 512) -> Tensor:
        """``(B, C, H, W)`` in [0, 1] -> ``(B, F)``, unstandardised."""
        out = []
        for chunk in x.split(batch):
            h = chunk.float() * 2 - 1
            parts = []
            for i, w in enumerate(self.weights):
                h = F.relu(F.conv2d(h, w, padding=1))
                parts += [h.mean((2, 3)), h.std((2, 3))]
                if i < len(self.weights) - 1 and min(h.shape[-2:]) >= 2:
                    h = F.avg_pool2d(h, 2)
            out.append(torch.cat(parts, 1))
        return torch.cat(out)

    def fit(self, real: Tensor) -> RandomFeatures:
        """Standardise every feature by its mean and std over ``real``; features that
        barely vary on ``real`` (std under 1 % of the median feature's: channels that
        ReLU leaves near zero on these data) are dropped, since dividing by their std
        would let one of them outweigh all the others."""
        f = self.raw(real)
        std = f.std(0)
        self.keep = std >= 0.01 * std.median()
        self.mean, self.std = f.mean(0)[self.keep], std[self.keep]
        return self

    def __call__(self, x: Tensor) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError("RandomFeatures.fit(real) first")
        standardised: np.ndarray = ((self.raw(x)[:, self.keep] - self.mean) / self.std).numpy()
        return standardised

    def fd(self, a: Tensor, b: Tensor) -> float:
        """The Fréchet distance between image sets ``a`` and ``b`` in this space."""
        return frechet_distance(self(a), self(b))
