"""genfleet: a distributed generation service for deep generative models."""

__version__ = "0.1.0"
