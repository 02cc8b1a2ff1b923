"""CUDA path of every family: a training step under bf16 autocast and seeded sampling.

Skipped without CUDA (CI and the development machines have none)."""

from __future__ import annotations

import pytest
import torch

from services.models import BUILTIN as FAMILIES
from services.models import Capability, build, sample_seeds
from services.training.loop import TrainConfig, Trainer
from tests.conftest import TINY_CONFIGS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_step_and_sampling_on_cuda(family: str, digits_batch) -> None:
    x, y = (t.cuda() for t in digits_batch)
    model = build(family, TINY_CONFIGS[family]).cuda()
    model.prepare(x, y)
    trainer = Trainer(model, TrainConfig(amp=True))
    metrics = trainer.step(x, y)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    model.eval()
    labels = torch.arange(4, device="cuda") if Capability.CONDITIONAL in model.capabilities else None
    a = model.sample(sample_seeds(0, 4), labels=labels)
    assert a.is_cuda and a.shape == (4, 1, 8, 8)
    # noise is drawn on the CPU, so the same seeds give (nearly) the CPU result
    cpu = model.cpu().sample(sample_seeds(0, 4), labels=None if labels is None else labels.cpu())
    assert (a.cpu() - cpu).abs().mean() < 0.05
