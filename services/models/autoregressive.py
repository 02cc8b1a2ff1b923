"""Autoregressive model: a small causal transformer over discrete values (pixel levels in
raster order, or characters), in the style of nanoGPT / Image GPT (Chen et al. 2020).

p(x) = prod_d p(x_d | x_<d, c). The first input token is the class c (or a "no class"
token for unlabelled data), so the likelihood is exact and conditional on c. Without a
label, a conditional model scores the exact class-marginal log sum_c pi_c p(x | c) and
samples c ~ pi. Sampling is incremental with a key/value cache: one token per step.

Shapes: B batch, D sequence length (C*H*W pixels or text length), V vocabulary (levels),
E embedding size, N heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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


class KVCache:
    """Every block's keys and values, allocated once for all D positions: step d writes
    position d in place and attends over positions [0, d] (a torch.cat per step copied
    the whole cache every token: ~1.3x slower sampling at 28x28 and 32x32x3).

    k, v: (layers, B, N, D, E/N); positions beyond the current step are unwritten.
    """

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int,
                 like: Tensor) -> None:
        shape = (layers, batch, heads, length, head_dim)
        self.k = like.new_empty(shape)
        self.v = like.new_empty(shape)


@dataclass(frozen=True)
class AutoregressiveConfig(ModelConfig):
    data_kind: Literal["image", "text"] = "image"
    seq_len: int = 64  # text only: characters per example (images use C*H*W)
    embed: int = 128  # E
    layers: int = 4
    heads: int = 4  # N
    dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embed % self.heads:
            raise ValueError("embed must be divisible by heads")
        if self.data_kind == "text" and self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")

    @property
    def data_shape(self) -> tuple[int, ...]:
        if self.data_kind == "text":
            return (self.seq_len,)
        return super().data_shape


class _Block(nn.Module):
    """Pre-norm transformer block with causal self-attention and an optional KV cache."""

    def __init__(self, embed: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(embed)
        self.qkv = nn.Linear(embed, 3 * embed)
        self.proj = nn.Linear(embed, embed)
        self.ln2 = nn.LayerNorm(embed)
        self.mlp = nn.Sequential(nn.Linear(embed, 4 * embed), nn.GELU(), nn.Linear(4 * embed, embed),
                                 nn.Dropout(dropout))
        self.dropout = dropout

    def forward(self, h: Tensor, cache: tuple[Tensor, Tensor] | None = None, pos: int = 0
                ) -> Tensor:
        """Without a cache: causal attention over h's own T positions (training, scoring).
        With one ((B, N, D, E/N) keys and values of this block): h is position pos alone
        (T = 1), written into the cache, attending to itself and every position before."""
        b, t, e = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(e, dim=2)
        q, k, v = (a.view(b, t, self.heads, e // self.heads).transpose(1, 2) for a in (q, k, v))
        if cache is not None:
            cache[0][:, :, pos:pos + 1] = k
            cache[1][:, :, pos:pos + 1] = v
            k, v = cache[0][:, :, :pos + 1], cache[1][:, :, :pos + 1]
        att = F.scaled_dot_product_attention(
            q, k, v, is_causal=cache is None, dropout_p=self.dropout if self.training else 0.0
        )
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, e))
        return h + self.mlp(self.ln2(h))


class AutoregressiveModel(GenerativeModel):
    class_prior: Tensor
    family = "autoregressive"
    Config = AutoregressiveConfig
    config: AutoregressiveConfig  # the family's own config type (set by GenerativeModel.__init__)
    capabilities = frozenset({Capability.SAMPLE, Capability.CONDITIONAL, Capability.LOG_PROB})
    score_kind = ScoreKind.EXACT
    sampler_options = {
        "temperature": OptionSpec("float", 1.0, "softmax temperature (1 = the model)",
                                  min=0.05, max=2.0),
        "top_k": OptionSpec("int", 0, "sample among the k most likely values (0 = all)",
                            min=0, max=65536),
    }
    train_defaults = {"lr": 1e-3, "batch_size": 64, "epochs": 52, "weight_decay": 0.05,
                      "betas": (0.9, 0.95), "grad_clip": 1.0, "lr_warmup_steps": 200,
                      "cosine_decay": True, "val_every": 5, "select_best": True}
    presets = {
        "digits": Preset(PRESET_SHAPES["digits"]),
        # no dropout at long sequences: attention dropout leaves PyTorch's fused
        # (flash) attention for the math path, whose B x heads x T^2 scores took 9.4 GB
        # at batch 2 for 32x32x3 (2.5 GB at batch 8 without)
        "mnist": Preset(PRESET_SHAPES["mnist"],
                        {"embed": 128, "layers": 4, "heads": 4, "dropout": 0.0,
                         "invariant_batch": 8},
                        {"epochs": 10, "batch_size": 32, "val_every": 1}),
        "cifar10": Preset(PRESET_SHAPES["cifar10"],
                          {"embed": 192, "layers": 6, "heads": 6, "dropout": 0.0,
                           "invariant_batch": 8},
                          {"epochs": 20, "batch_size": 8, "val_every": 2}),
    }

    def __init__(self, config: AutoregressiveConfig) -> None:
        super().__init__(config)
        c = config
        self.length = math.prod(c.data_shape)  # D
        self.start = nn.Embedding(c.num_classes + 1, c.embed)  # row K: "no class"
        self.tokens = nn.Embedding(c.levels, c.embed)
        self.positions = nn.Parameter(torch.zeros(self.length, c.embed))
        nn.init.normal_(self.positions, std=0.02)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(_Block(c.embed, c.heads, c.dropout) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.embed)
        self.head = nn.Linear(c.embed, c.levels)
        self._init_class_prior()

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.int64 if self.config.data_kind == "text" else torch.float32

    def prepare(self, x: Tensor, labels: Tensor | None) -> None:
        self._fit_class_prior(labels)

    def postprocess(self, x: Tensor) -> Tensor:
        return x.long() if self.config.data_kind == "text" else super().postprocess(x)

    def _tokens(self, x: Tensor) -> Tensor:
        """Data -> (B, D) token ids in [0, V)."""
        return x.long() if self.config.data_kind == "text" else self.to_levels(x).flatten(1)

    def _start_ids(self, labels: Tensor | None, b: int, device: torch.device) -> Tensor:
        if labels is None:
            return torch.full((b,), self.config.num_classes, device=device, dtype=torch.long)
        return labels

    def _logits(self, tokens: Tensor, start: Tensor) -> Tensor:
        """Teacher-forced logits (B, D, V): position d sees the class and x_<d."""
        inp = torch.cat([self.start(start)[:, None], self.tokens(tokens[:, :-1])], dim=1)
        h = self.drop(inp + self.positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def _log_likelihood(self, tokens: Tensor, start: Tensor) -> Tensor:
        logits = self._logits(tokens, start)
        return -F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").sum(1)

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor, *, labels: Tensor | None = None, phase: str = "main") -> LossOutput:
        tokens = self._tokens(x)
        start = self._start_ids(labels if self.config.num_classes else None, x.shape[0], x.device)
        logits = self._logits(tokens, start)
        loss = F.cross_entropy(logits.transpose(1, 2), tokens)  # nats per dim
        return LossOutput(loss, {"bits_per_dim": float(loss.detach()) / math.log(2)})

    # ---------------------------------------------------------------- inference
    def _log_prob(self, x: Tensor, *, labels: Tensor | None, callback: StepCallback | None
                  ) -> Tensor:
        tokens = self._tokens(x)
        b = tokens.shape[0]
        if labels is not None or not self.config.num_classes:
            return self._log_likelihood(tokens, self._start_ids(labels, b, tokens.device))
        # exact marginal: log sum_c pi_c p(x | c)
        k = self.config.num_classes
        cols = []
        for c in range(k):
            cols.append(self._log_likelihood(tokens, torch.full((b,), c, device=tokens.device)))
            self._step(callback, c + 1, k)
        per_class = torch.stack(cols, dim=1)  # (B, K)
        return torch.logsumexp(per_class + self.class_prior.log(), dim=1)

    def new_cache(self, batch: int, like: Tensor) -> KVCache:
        c = self.config
        return KVCache(c.layers, batch, c.heads, self.length, c.embed // c.heads, like)

    def decode_step(self, h_in: Tensor, cache: KVCache, pos: int) -> Tensor:
        """The last block's output (B, 1, E) for the input h_in (B, 1, E) at position pos,
        attending to the cached positions before it (and caching its own)."""
        h = h_in
        for i, block in enumerate(self.blocks):
            h = block(h, (cache.k[i], cache.v[i]), pos)
        return h

    def _sample(self, noise: Noise, *, labels: Tensor | None, callback: StepCallback | None,
                temperature: float, top_k: int) -> Tensor:
        b = len(noise)
        if self.config.num_classes and labels is None:
            labels = self._prior_labels(noise)
        start = self._start_ids(labels, b, noise.device)
        cache = self.new_cache(b, self.positions)
        h_in = self.start(start)[:, None] + self.positions[:1]  # (B, 1, E)
        out = torch.empty(b, self.length, dtype=torch.long, device=noise.device)
        for d in range(self.length):  # D steps, one token each, reusing the cache
            # 1. attend from position d to the cached keys/values of positions <= d
            h = self.decode_step(h_in, cache, d)
            # 2. draw x_d from the softmax (each sample from its own stream)
            logits = self.head(self.ln_f(h[:, -1])) / temperature  # (B, V)
            if top_k and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            out[:, d] = noise.categorical(logits.softmax(-1))
            if d + 1 < self.length:
                h_in = self.tokens(out[:, d])[:, None] + self.positions[d + 1:d + 2]
            self._step(callback, d + 1, self.length)
        if self.config.data_kind == "text":
            return out
        return (out.float() / (self.config.levels - 1)).view(b, *self.data_shape)
