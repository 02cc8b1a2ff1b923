"""Numerical checks of each family's likelihood and sampler maths."""

from __future__ import annotations

import math

import pytest
import torch

from services.core.errors import InvalidArgument
from services.models import build, sample_seeds
from services.models.autoregressive import AutoregressiveModel
from services.models.diffusion import DiffusionModel
from services.models.ebm import EnergyModel
from services.models.flow import FlowModel
from services.models.noise import Noise
from services.models.vae import VAEModel
from tests.conftest import TINY_CONFIGS


def _perturbed(model: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_flow_log_density_equals_change_of_variables(digits_batch) -> None:
    model = build("flow", {"transforms": 2, "hidden": [16]})
    assert isinstance(model, FlowModel)
    _perturbed(model, 0.1)
    x, labels = digits_batch
    k = model.to_levels(x[:2]).flatten(1).double()
    y = ((k + 0.37) / 17).float()  # (2, 64) points inside the bins
    a = model.config.alpha
    for row, label in zip(y, labels[:2], strict=True):
        context = torch.nn.functional.one_hot(label[None], 10).float()

        def full_map(v: torch.Tensor, context: torch.Tensor = context) -> torch.Tensor:
            p = a + (1 - 2 * a) * v  # y -> s -> z, composed by hand
            s = torch.log(p) - torch.log1p(-p)
            return model.flow(context).transform(s[None])[0]
        z = full_map(row)
        jac = torch.autograd.functional.jacobian(full_map, row)  # (64, 64)
        _, logdet = torch.linalg.slogdet(jac.double())
        expected = (-0.5 * z.double() ** 2 - 0.5 * math.log(2 * math.pi)).sum() + logdet
        got = model.log_density(row[None], label[None])[0].double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_flow_decode_inverts_encode_exactly(digits_batch) -> None:
    model = build("flow", TINY_CONFIGS["flow"]).eval()
    _perturbed(model, 0.1)
    x, y = digits_batch
    torch.testing.assert_close(model.decode(model.encode(x, labels=y), labels=y), x,
                               rtol=0, atol=0)
    with pytest.raises(InvalidArgument, match="labels"):
        model.encode(x)


def test_flow_score_is_the_dequantisation_bound(digits_batch) -> None:
    model = build("flow", TINY_CONFIGS["flow"]).eval()
    x, _y = digits_batch
    per_class = torch.stack([model.log_prob(x, labels=torch.full((6,), c), samples=1)
                             for c in range(10)], 1)
    marginal = torch.logsumexp(per_class + math.log(0.1), dim=1)
    torch.testing.assert_close(model.log_prob(x, samples=1), marginal, rtol=1e-5, atol=1e-3)
    one = model.log_prob(x, samples=1)
    many = model.log_prob(x, samples=64)
    # more importance samples can only tighten the bound (on average)
    assert float(many.mean()) >= float(one.mean()) - 0.5


def _cached_log_likelihood(model: AutoregressiveModel, tokens: torch.Tensor,
                           start: torch.Tensor) -> torch.Tensor:
    """log p(x) accumulated token by token through the KV-cache path used for sampling."""
    total = torch.zeros(tokens.shape[0])
    h_in = model.start(start)[:, None] + model.positions[:1]
    cache = model.new_cache(tokens.shape[0], model.positions)
    for d in range(tokens.shape[1]):
        h = model.decode_step(h_in, cache, d)
        logp = torch.log_softmax(model.head(model.ln_f(h[:, -1])), -1)
        total += logp.gather(1, tokens[:, d:d + 1]).squeeze(1)
        h_in = model.tokens(tokens[:, d])[:, None] + model.positions[d + 1:d + 2]
    return total


def test_autoregressive_log_prob_equals_summed_cross_entropy(digits_batch) -> None:
    model = build("autoregressive", TINY_CONFIGS["autoregressive"]).eval()
    assert isinstance(model, AutoregressiveModel)
    _perturbed(model, 0.1)
    x, y = digits_batch
    tokens = model.to_levels(x).flatten(1)
    with torch.no_grad():
        logits = model._logits(tokens, y)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        expected = -ce.sum(1)
        cached = _cached_log_likelihood(model, tokens, y)
    torch.testing.assert_close(model.log_prob(x, labels=y), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-3)  # KV cache agrees


def test_autoregressive_marginal_is_logsumexp_over_classes(digits_batch) -> None:
    model = build("autoregressive", TINY_CONFIGS["autoregressive"]).eval()
    x, _ = digits_batch
    per_class = torch.stack([model.log_prob(x, labels=torch.full((6,), c)) for c in range(10)], 1)
    expected = torch.logsumexp(per_class + math.log(0.1), dim=1)
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-5, atol=1e-4)


def test_vae_elbo_is_below_the_importance_weighted_bound(digits_batch) -> None:
    model = build("vae", TINY_CONFIGS["vae"]).eval()
    assert isinstance(model, VAEModel)
    _perturbed(model, 0.2)
    x, y = digits_batch
    elbo = model.log_prob(x, labels=y, bound="elbo")
    iwae = model.log_prob(x, labels=y, bound="iwae", samples=256)
    assert (elbo <= iwae + 1e-3).all(), (elbo, iwae)


def test_diffusion_noising_at_t0_returns_the_data(digits_batch) -> None:
    model = build("diffusion", TINY_CONFIGS["diffusion"] | {"num_train_steps": 1000})
    assert isinstance(model, DiffusionModel)
    x, _ = digits_batch
    x0 = x * 2 - 1
    eps = torch.randn_like(x0)
    noised = model.q_sample(x0, torch.zeros(6, dtype=torch.long), eps)
    assert float((noised - x0).abs().max()) < 0.05
    exact = model.q_sample(x0, torch.zeros(6, dtype=torch.long), torch.zeros_like(x0))
    torch.testing.assert_close(exact, x0, rtol=0, atol=1e-3)
    # and at t = T-1 nothing of the data is left
    late = model.q_sample(x0, torch.full((6,), 999), eps)
    assert float((late - eps).abs().max()) < 0.05
    assert bool((model.alphas_cumprod[1:] < model.alphas_cumprod[:-1]).all())


def test_diffusion_ddim_encode_decode_is_deterministic(digits_batch) -> None:
    model = build("diffusion", TINY_CONFIGS["diffusion"]).eval()
    x, y = digits_batch
    z1, z2 = model.encode(x, labels=y), model.encode(x, labels=y)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    assert model.decode(z1, labels=y).shape == x.shape


def test_langevin_steps_lower_the_energy_on_average(digits_batch) -> None:
    model = build("ebm", TINY_CONFIGS["ebm"]).eval()
    assert isinstance(model, EnergyModel)
    _perturbed(model, 0.3)
    x, y = digits_batch
    model.prepare(x, y)
    noise = Noise(sample_seeds(0, 64))
    start = model._init_draw(noise.randn(64))
    end = model.langevin(start, steps=20, step_size=0.05, noise_scale=0.005, noise=noise)
    with torch.no_grad():
        before, after = model.energy(start).mean(), model.energy(end).mean()
    assert after < before, (before, after)
