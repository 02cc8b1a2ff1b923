"""Class-conditional GAN: DCGAN-style convolutional generator and discriminator
(Radford et al. 2016), spectral normalisation (Miyato et al. 2018), projection
discriminator (Miyato & Koyama 2018), hinge loss (Lim & Ye 2017) or WGAN-GP
(Gulrajani et al. 2017).

Two training phases: "discriminator" then "generator". Real data is dequantised by one
level of uniform noise so the discriminator cannot tell real from fake by the level grid.

Shapes: B batch, Z latent size, C channels, H/W spatial, W width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from services.core.errors import InvalidArgument
from services.core.options import OptionSpec
from services.models.base import (
    PRESET_SHAPES,
    Capability,
    GenerativeModel,
    LossOutput,
    ModelConfig,
    Preset,
    StepCallback,
)
from services.models.noise import Noise


@dataclass(frozen=True)
class GANConfig(ModelConfig):
    latent_dim: int = 32  # Z
    width: int = 64  # W: generator/discriminator base width
    loss: Literal["hinge", "wgan-gp"] = "hinge"
    gp_weight: float = 10.0  # gradient-penalty weight (wgan-gp only)
    embed_dim: int = 32  # class embedding size in the generator

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 4:
            raise ValueError("image_size must be divisible by 4 (two 2x upsamplings)")
        if self.latent_dim < 1 or self.width < 4:
            raise ValueError("latent_dim must be >= 1 and width >= 4")


class _Generator(nn.Module):
    """(B, Z) [+ class] -> (B, C, H, W) in [0, 1]; two 2x upsamplings from H/4."""

    def __init__(self, c: GANConfig) -> None:
        super().__init__()
        self.start = c.image_size // 4
        w = c.width
        self.embed = nn.Embedding(c.num_classes, c.embed_dim) if c.num_classes else None
        in_dim = c.latent_dim + (c.embed_dim if c.num_classes else 0)
        self.fc = nn.Linear(in_dim, 2 * w * self.start * self.start)
        self.body = nn.Sequential(
            nn.GroupNorm(8, 2 * w), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * w, w, 3, padding=1),
            nn.GroupNorm(8, w), nn.ReLU(),
            nn.Conv2d(w, c.channels, 3, padding=1),
        )

    def forward(self, z: Tensor, labels: Tensor | None) -> Tensor:
        if self.embed is not None:
            assert labels is not None
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = self.fc(z).view(z.shape[0], -1, self.start, self.start)  # (B, 2W, H/4, W/4)
        return torch.sigmoid(self.body(h))


class _Discriminator(nn.Module):
    """(B, C, H, W) [+ class] -> (B,) realness score, projection conditioning."""

    def __init__(self, c: GANConfig) -> None:
        super().__init__()
        w = c.width
        act = nn.LeakyReLU(0.2)
        sn = spectral_norm if c.loss == "hinge" else (lambda m: m)
        self.body = nn.Sequential(
            sn(nn.Conv2d(c.channels, w, 3, padding=1)), act,
            sn(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)), act,
            sn(nn.Conv2d(2 * w, 2 * w, 3, padding=1)), act,
            sn(nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1)), act,
        )
        self.out = sn(nn.Linear(4 * w, 1))
        self.embed = sn(nn.Embedding(c.num_classes, 4 * w)) if c.num_classes else None

    def forward(self, x: Tensor, labels: Tensor | None) -> Tensor:
        h = self.body(x * 2 - 1).sum(dim=(2, 3))  # (B, 4W) global sum pooling
        score = self.out(h).squeeze(1)
        if self.embed is not None and labels is not None:
            score = score + (self.embed(labels) * h).sum(1)  # projection term
        return score


class GANModel(GenerativeModel):
    family = "gan"
    Config = GANConfig
    config: GANConfig  # the family's own config type (set by GenerativeModel.__init__)
    capabilities = frozenset({Capability.SAMPLE, Capability.CONDITIONAL, Capability.DECODE})
    phases = ("discriminator", "generator")
    sampler_options = {
        "truncation": OptionSpec(
            "float", 1.0, "scale of the latent noise (< 1 trades diversity for fidelity)",
            min=0.0, max=2.0,
        ),
    }
    train_defaults = {"lr": 2e-4, "betas": (0.0, 0.9), "batch_size": 64, "epochs": 100,
                      "ema_decay": 0.999, "val_every": 1000}
    presets = {
        "digits": Preset(PRESET_SHAPES["digits"]),
        "mnist": Preset(PRESET_SHAPES["mnist"], {"latent_dim": 64, "width": 64,
                                                        "invariant_batch": 8},
                        {"epochs": 20}),
        "cifar10": Preset(PRESET_SHAPES["cifar10"], {"latent_dim": 128, "width": 64,
                                                            "invariant_batch": 8},
                          {"epochs": 40}),
    }

    def __init__(self, config: GANConfig) -> None:
        super().__init__(config)
        self.generator = _Generator(config)
        self.discriminator = _Discriminator(config)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        assert isinstance(self.config, GANConfig)
        return (self.config.latent_dim,)

    def param_groups(self, phase: str) -> list[nn.Parameter]:
        net = self.discriminator if phase == "discriminator" else self.generator
        return list(net.parameters())

    def _fake_labels(self, labels: Tensor | None, b: int, device: torch.device) -> Tensor | None:
        if not self.config.num_classes:
            return None
        if labels is not None:
            return labels
        return torch.randint(0, self.config.num_classes, (b,), device=device)

    def forward(self, x: Tensor, *, labels: Tensor | None = None, phase: str = "main") -> LossOutput:
        c = self.config
        assert isinstance(c, GANConfig)
        b = x.shape[0]
        labels = self._fake_labels(labels, b, x.device)
        z = torch.randn(b, c.latent_dim, device=x.device)
        if phase == "discriminator":
            real = (x + (torch.rand_like(x) - 0.5) / (c.levels - 1)).clamp(0, 1)
            with torch.no_grad():
                fake = self.generator(z, labels)
            d_real = self.discriminator(real, labels)
            d_fake = self.discriminator(fake, labels)
            if c.loss == "hinge":
                loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            else:
                loss = d_fake.mean() - d_real.mean() + c.gp_weight * self._gradient_penalty(
                    real, fake, labels)
            return LossOutput(loss, {"d_real": float(d_real.mean().detach()),
                                     "d_fake": float(d_fake.mean().detach())})
        if phase == "generator":
            fake = self.generator(z, labels)
            loss = -self.discriminator(fake, labels).mean()
            return LossOutput(loss)
        raise ValueError(f"unknown phase {phase!r}; GAN phases are {self.phases}")

    def _gradient_penalty(self, real: Tensor, fake: Tensor, labels: Tensor | None) -> Tensor:
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        score = self.discriminator(mix, labels)
        (grad,) = torch.autograd.grad(score.sum(), mix, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()

    def _sample(self, noise: Noise, *, labels: Tensor | None, callback: StepCallback | None,
                truncation: float) -> Tensor:
        assert isinstance(self.config, GANConfig)
        z = noise.randn(self.config.latent_dim) * truncation  # (B, Z)
        if self.config.num_classes and labels is None:
            labels = self._random_labels(noise)
        out = self.invariant(self.generator, z, labels)
        self._step(callback, 1, 1)
        return out

    def _decode(self, z: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                truncation: float) -> Tensor:
        if self.config.num_classes and labels is None:
            raise InvalidArgument("labels", "this GAN is class-conditional: decode needs labels")
        return self.invariant(self.generator, z, labels)
