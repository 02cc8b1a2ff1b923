"""Per-sample randomness: the seed of every sample of a request, and ``Noise``, which
keeps one ``torch.Generator`` per sample so that row ``i`` of any draw depends only on
its own seed, never on its batch-mates or the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from services.core.errors import InvalidArgument

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request with seed ``seed`` (63 bits)."""
    if seed < 0 or index < 0:
        raise InvalidArgument("seed", "seed and index must be >= 0")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ index) >> 1


def sample_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """Per-sample seeds of samples ``start .. start+n-1`` of a request with ``seed``."""
    return [sample_seed(seed, i) for i in range(start, start + n)]


class Noise:
    """Per-sample random streams: row ``i`` of every draw comes from generator ``i`` only.

    Draws happen on the CPU (so results do not depend on the device) and are moved to
    ``device``.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> Tensor:
        """Standard normal draws, ``(B, *shape)``."""
        rows = [torch.randn(shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) draws, ``(B, *shape)``."""
        rows = [torch.rand(shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randint(self, high: int) -> Tensor:
        """One integer in ``[0, high)`` per sample, ``(B,)`` int64."""
        rows = [torch.randint(high, (1,), generator=g) for g in self.generators]
        return torch.cat(rows).to(self.device)

    def categorical(self, probs: Tensor) -> Tensor:
        """One draw per row of ``probs`` ``(B, K)`` by inverting the CDF, ``(B,)`` int64."""
        u = self.rand(1)  # (B, 1)
        cdf = probs.cumsum(-1)
        cdf = cdf / cdf[:, -1:]
        return (cdf < u).sum(-1).clamp_(max=probs.shape[-1] - 1)
