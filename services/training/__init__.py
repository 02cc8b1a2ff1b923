"""The generic training loop (in-process here; run inside Ray Train by cluster/train)."""

from services.training.loop import TrainConfig, Trainer, TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "Trainer", "fit"]
