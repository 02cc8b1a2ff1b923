"""Training: the one loop (``loop``), the one path settings take (``spec``), and the
in-process recipe that trains, evaluates and stores (``recipes``). The Ray Train job in
``cluster/train`` runs the same loop on each worker."""

from services.training.loop import TrainConfig, Trainer, TrainResult, fit, run_epochs
from services.training.spec import TrainSpec, prepare, spec_from_config

__all__ = ["TrainConfig", "TrainResult", "TrainSpec", "Trainer", "fit", "prepare", "run_epochs",
           "spec_from_config"]
