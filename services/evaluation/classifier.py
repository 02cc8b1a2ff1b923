"""A small CNN trained on the real training split: its penultimate layer is the feature
space for the Fréchet distance, its predictions give class statistics.

Shapes: B batch, C channels, H/W spatial, F feature size, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.core.data import Dataset


@dataclass(frozen=True)
class ClassifierConfig:
    channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    width: int = 32
    features: int = 64  # F: size of the feature space


class FeatureClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        layers: list[nn.Module] = []
        for c_in, c_out, stride in ((config.channels, w, 1), (w, w, 1), (w, 2 * w, 2),
                                    (2 * w, 2 * w, 1)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * w * 16, config.features)]
        self.body = nn.Sequential(*layers)  # (B, features)
        # features are taken before the non-linearity: no dead (constant) dimensions
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(config.features, config.num_classes))

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` in [0, 1] -> ``(B, F)``."""
        return self.body(x * 2 - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shifts of up to one pixel (reflection-free, zero fill)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def train_classifier(train: Dataset, *, epochs: int = 40, seed: int = 0) -> FeatureClassifier:
    """Train on the real training split (labels required)."""
    if train.labels is None or train.kind != "image":
        raise ValueError("the evaluation classifier needs labelled image data")
    c, h, _ = train.shape
    model = FeatureClassifier(ClassifierConfig(c, h, train.num_classes))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(train.as_float())
    y = torch.from_numpy(train.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=epochs * ((len(x) + 63) // 64))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def embed(model: FeatureClassifier, x: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Features ``(B, F)`` and class probabilities ``(B, K)`` of images in [0, 1]."""
    feats, probs = [], []
    for start in range(0, len(x), batch_size):
        f = model.features(x[start:start + batch_size].float())
        feats.append(f)
        probs.append(model.head(f).softmax(-1))
    return torch.cat(feats), torch.cat(probs)
