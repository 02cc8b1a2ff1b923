"""Variational autoencoder (Kingma & Welling 2014), class-conditional (Sohn et al. 2015),
with the importance-weighted bound of Burda et al. (2016) for scoring.

The decoder is a categorical distribution over the data's discrete levels per dimension,
so the ELBO is a bound on the likelihood of the discrete data itself (no dequantisation).
With labels the prior is learned per class, p(z | c) = N(mu_c, diag sigma_c^2) (the prior
network of Sohn et al.), so latents drawn for class c are ones the decoder reads as c.
Without a label, a conditional VAE scores the class-marginal
log sum_c pi_c p(x | c) (a bound of the same kind) and samples c ~ pi.

Shapes: B batch, C channels, H/W spatial, L levels, Z latent size, S importance samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

_DECODE_ROWS = 4096  # latents per decoder pass when scoring (bounds memory) ...
_DECODE_LOGITS = 2**25  # ... and logits per pass (C x levels x H x W each: 786k at 32x32x3)

@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    latent_dim: int = 8  # Z (small: forces the decoder to use the label)
    width: int = 32  # conv width at full resolution
    hidden: int = 256  # fully connected layer between conv features and latent
    kl_warmup_steps: int = 2000  # KL weight ramps 0 -> 1 over these steps (then a true ELBO)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 2:
            raise ValueError("image_size must be even")


class VAEModel(GenerativeModel):
    class_prior: Tensor
    steps_seen: Tensor
    family = "vae"
    Config = VAEConfig
    config: VAEConfig  # the family's own config type (set by GenerativeModel.__init__)
    capabilities = frozenset({Capability.SAMPLE, Capability.CONDITIONAL, Capability.LOG_PROB,
                              Capability.ENCODE, Capability.DECODE})
    score_kind = ScoreKind.LOWER_BOUND
    sampler_options = {
        "temperature": OptionSpec("float", 1.0, "scale of the prior noise", min=0.0, max=2.0),
        "output": OptionSpec("str", "mode", "decoder output: its per-pixel mode, mean or a draw",
                             choices=("mean", "mode", "sample")),
    }
    score_options = {
        "bound": OptionSpec("str", "iwae", "elbo or the importance-weighted bound",
                            choices=("elbo", "iwae")),
        "samples": OptionSpec("int", 64, "importance samples S (iwae)", min=1, max=4096,
                              cost=True),
    }
    train_defaults = {"lr": 1e-3, "batch_size": 64, "epochs": 150, "weight_decay": 1e-4,
                      "val_every": 5, "select_best": True, "ema_decay": 0.995}
    presets = {
        "digits": Preset(PRESET_SHAPES["digits"]),
        "mnist": Preset(PRESET_SHAPES["mnist"], {"latent_dim": 16, "width": 32, "hidden": 256,
                                                        "invariant_batch": 8},
                        {"epochs": 20, "val_every": 1}),
        "cifar10": Preset(PRESET_SHAPES["cifar10"],
                          {"latent_dim": 32, "width": 32, "hidden": 256, "invariant_batch": 8},
                          {"epochs": 40, "val_every": 2}),
    }

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        c = config
        w, half = c.width, c.image_size // 2
        k = c.num_classes
        self.encoder = nn.Sequential(
            nn.Conv2d(c.channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Flatten(),
        )
        self.enc_fc = nn.Sequential(nn.Linear(2 * w * half * half + k, c.hidden), nn.SiLU(),
                                    nn.Linear(c.hidden, 2 * c.latent_dim))
        self.dec_fc = nn.Sequential(nn.Linear(c.latent_dim + k, c.hidden), nn.SiLU(),
                                    nn.Linear(c.hidden, 2 * w * half * half), nn.SiLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, c.channels * c.levels, 1),
        )
        # p(z | c): a learned Gaussian per class (row k: no class, the standard normal)
        self.prior_mu = nn.Embedding(k + 1, c.latent_dim)
        self.prior_logvar = nn.Embedding(k + 1, c.latent_dim)
        nn.init.zeros_(self.prior_mu.weight)
        nn.init.zeros_(self.prior_logvar.weight)
        self._init_class_prior()
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        assert isinstance(self.config, VAEConfig)
        return (self.config.latent_dim,)

    def prepare(self, x: Tensor, labels: Tensor | None) -> None:
        self._fit_class_prior(labels)

    def on_train_step(self, step: int) -> None:
        self.steps_seen += 1

    # ----------------------------------------------------------------- networks
    def _onehot(self, labels: Tensor | None, b: int, device: torch.device) -> Tensor:
        if not self.config.num_classes:
            return torch.zeros(b, 0, device=device)
        assert labels is not None
        return F.one_hot(labels, self.config.num_classes).float()

    def _prior(self, labels: Tensor | None, b: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p(z | c), (B, Z) each."""
        k = self.config.num_classes
        idx = labels if (labels is not None and k) else torch.full((b,), k, device=device)
        if not k:
            idx = torch.zeros(b, dtype=torch.long, device=device)
        return self.prior_mu(idx), self.prior_logvar(idx).clamp(-6, 4)

    @staticmethod
    def _kl(mu: Tensor, logvar: Tensor, p_mu: Tensor, p_logvar: Tensor) -> Tensor:
        """KL(N(mu, e^logvar) || N(p_mu, e^p_logvar)) summed over Z, (B,)."""
        return 0.5 * (p_logvar - logvar + (logvar.exp() + (mu - p_mu) ** 2) / p_logvar.exp()
                      - 1).sum(1)

    def _posterior(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.cat([self.encoder(x * 2 - 1), y], dim=1)
        mu, logvar = self.enc_fc(h).chunk(2, dim=1)  # (B, Z) each
        return mu, logvar.clamp(-10, 10)

    def _logits(self, z: Tensor, y: Tensor) -> Tensor:
        """(B, Z) -> categorical logits (B, C, L, H, W)."""
        c = self.config
        half = c.image_size // 2
        h = self.dec_fc(torch.cat([z, y], dim=1)).view(z.shape[0], -1, half, half)
        out = self.decoder(h)  # (B, C*L, H, W)
        return out.view(z.shape[0], c.channels, c.levels, c.image_size, c.image_size)

    def _log_px_given_z(self, logits: Tensor, levels: Tensor) -> Tensor:
        """Sum over dims of log p(x | z): logits (B, C, L, H, W), levels (B, C, H, W)."""
        logp = F.log_softmax(logits, dim=2).gather(2, levels.unsqueeze(2)).squeeze(2)
        return logp.flatten(1).sum(1)

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor, *, labels: Tensor | None = None, phase: str = "main") -> LossOutput:
        assert isinstance(self.config, VAEConfig)
        labels = labels if self.config.num_classes else None
        y = self._onehot(labels, x.shape[0], x.device)
        mu, logvar = self._posterior(x, y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = self._log_px_given_z(self._logits(z, y), self.to_levels(x))
        kl = self._kl(mu, logvar, *self._prior(labels, x.shape[0], x.device))
        warm = self.config.kl_warmup_steps
        beta = min(1.0, float(self.steps_seen) / warm) if (warm and self.training) else 1.0
        d = self.num_dims
        loss = (-rec + beta * kl).mean() / d  # nats per dim
        return LossOutput(loss, {"rec": float(-rec.mean().detach()) / d,
                                 "kl": float(kl.mean().detach()) / d})

    # ---------------------------------------------------------------- inference
    def _decode_output(self, logits: Tensor, output: str, noise: Noise | None) -> Tensor:
        top = self.config.levels - 1
        probs = logits.softmax(dim=2)  # (B, C, L, H, W)
        if output == "mode":
            return probs.argmax(2).float() / top
        if output == "sample" and noise is not None:
            b, c, lv, h, w = probs.shape
            flat = probs.permute(0, 1, 3, 4, 2).reshape(b, -1, lv)  # (B, D, L)
            u = noise.rand(flat.shape[1], 1)  # (B, D, 1), each sample its own stream
            idx = (flat.cumsum(-1) < u).sum(-1).clamp(max=lv - 1)
            return idx.view(b, c, h, w).float() / top
        grid = torch.arange(self.config.levels, device=logits.device, dtype=probs.dtype)
        return (probs * grid.view(1, 1, -1, 1, 1)).sum(2) / top  # mean

    def _sample(self, noise: Noise, *, labels: Tensor | None, callback: StepCallback | None,
                temperature: float, output: str) -> Tensor:
        assert isinstance(self.config, VAEConfig)
        eps = noise.randn(self.config.latent_dim) * temperature  # (B, Z)
        if self.config.num_classes and labels is None:
            labels = self._prior_labels(noise)
        p_mu, p_logvar = self._prior(labels, len(eps), eps.device)
        z = p_mu + eps * (0.5 * p_logvar).exp()  # z ~ p(z | c)
        logits = self.invariant(self._logits, z, self._onehot(labels, len(z), z.device))
        out = self._decode_output(logits, output, noise)
        self._step(callback, 1, 1)
        return out

    def _labels_or_argmax(self, x: Tensor, labels: Tensor | None) -> Tensor | None:
        """Encode/decode without labels use the class the model finds most likely."""
        if not self.config.num_classes or labels is not None:
            return labels
        per_class = self._per_class_bound(x, "elbo", 1)  # (B, K)
        return per_class.argmax(1)

    def _encode(self, x: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                temperature: float, output: str) -> Tensor:
        labels = self._labels_or_argmax(x, labels)
        mu, _ = self._posterior(x, self._onehot(labels, x.shape[0], x.device))
        return mu

    def _decode(self, z: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                temperature: float, output: str) -> Tensor:
        if self.config.num_classes and labels is None:
            labels = self.class_prior.argmax().expand(z.shape[0])
        logits = self.invariant(self._logits, z, self._onehot(labels, len(z), z.device))
        return self._decode_output(logits, "mode" if output == "sample" else output, None)

    # ------------------------------------------------------------------ scoring
    def _bound(self, x: Tensor, labels: Tensor | None, bound: str, samples: int,
               callback: StepCallback | None = None) -> Tensor:
        """ELBO or IWAE bound on log p(x | labels), nats, (B,).

        The decoder runs on at most ``_DECODE_ROWS`` latents and ``_DECODE_LOGITS`` logits at
        a time, so memory does not grow with S; ``callback`` is called after each pass.
        """
        b = x.shape[0]
        y = self._onehot(labels, b, x.device)
        mu, logvar = self._posterior(x, y)
        levels = self.to_levels(x)
        s = 1 if bound == "elbo" else samples
        gen = torch.Generator().manual_seed(0)
        eps = torch.randn((s, *mu.shape), generator=gen).to(x.device)  # (S, B, Z)
        std = (0.5 * logvar).exp()
        z = mu + eps * std
        c = self.config
        rows = min(_DECODE_ROWS, _DECODE_LOGITS // (c.channels * c.levels * c.image_size ** 2))
        per_pass = max(1, rows // b)  # importance samples per decoder pass
        parts = []
        for lo in range(0, s, per_pass):
            zs = z[lo:lo + per_pass]  # (S', B, Z)
            n = zs.shape[0]
            logits = self._logits(zs.reshape(n * b, -1), y.repeat(n, 1))
            parts.append(self._log_px_given_z(logits, levels.repeat(n, 1, 1, 1)).view(n, b))
            self._step(callback, min(lo + per_pass, s), s)
        log_px = torch.cat(parts)  # (S, B)
        p_mu, p_logvar = self._prior(labels, b, x.device)
        if bound == "elbo":
            return log_px[0] - self._kl(mu, logvar, p_mu, p_logvar)
        log_pz = (-0.5 * (z - p_mu) ** 2 / p_logvar.exp() - 0.5 * p_logvar
                  - 0.5 * math.log(2 * math.pi)).sum(-1)  # (S, B)
        log_qz = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - 0.5 * logvar).sum(-1)
        return torch.logsumexp(log_px + log_pz - log_qz, dim=0) - math.log(s)

    def _per_class_bound(self, x: Tensor, bound: str, samples: int,
                         callback: StepCallback | None = None) -> Tensor:
        k = self.config.num_classes
        cols = [self._bound(x, torch.full((x.shape[0],), c, device=x.device), bound, samples,
                            callback)
                for c in range(k)]
        return torch.stack(cols, dim=1)  # (B, K)

    def _log_prob(self, x: Tensor, *, labels: Tensor | None, callback: StepCallback | None,
                  bound: str, samples: int) -> Tensor:
        if labels is not None or not self.config.num_classes:
            return self._bound(x, labels, bound, samples, callback)
        # log sum_c pi_c p(x|c) >= logsumexp_c (log pi_c + bound_c): still a lower bound
        per_class = self._per_class_bound(x, bound, samples, callback)
        return torch.logsumexp(per_class + self.class_prior.log(), dim=1)
