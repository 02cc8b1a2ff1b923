"""Models that ``genfleet up`` is still training for the Serve application: their progress
on one named actor per application (``PendingBoard``), so that every gateway of the
cluster answers a call to one with UNAVAILABLE, saying so and how long it should take, and
``genfleet status`` shows the progress.

The background trainer (``cluster.train.background``) writes the board; gateways read it
(``ServeBackend``); a model leaves it once its replicas answer.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from services.core.errors import ModelNotFound, ModelNotReady

PHASES = ("queued", "training", "starting", "failed")


@dataclass
class PendingModel:
    """One model without a checkpoint: waiting to train, training, or its checkpoint
    written and its replicas starting (or its training failed)."""

    name: str
    family: str
    phase: str = "queued"
    ahead: list[str] = field(default_factory=list)  # queued: the models that train first
    evaluating: str = ""  # queued: the model evaluated now, before the next training
    cap_s: float = 0.0  # training wall-time cap per model (0: none)
    epoch: int = 0
    epochs: int = 0
    started: float | None = None  # wall time its training started
    updated: float = field(default_factory=time.time)
    version: int | None = None  # the checkpoint written (phase starting)
    error: str = ""  # phase failed

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds until its checkpoint is written, estimated from the epochs done so far
        (bounded by the cap); for a queued model, at most the caps of what trains before
        it and its own; None when nothing bounds it."""
        now = time.time() if now is None else now
        if self.phase == "training" and self.started is not None:
            elapsed = max(0.0, now - self.started)
            left = math.inf
            if self.epoch > 0 and self.epochs > 0:
                left = elapsed / self.epoch * (self.epochs - self.epoch)
            if self.cap_s > 0:
                left = min(left, max(0.0, self.cap_s - elapsed))
            return None if math.isinf(left) else left
        if self.phase == "queued" and self.cap_s > 0:
            return self.cap_s * (len(self.ahead) + 1)
        return None

    def error_for_call(self) -> ModelNotReady | ModelNotFound:
        """What a call to this model gets now: UNAVAILABLE with what is happening and a
        retry delay near the estimate, or NOT_FOUND once its training failed."""
        if self.phase == "failed":
            return ModelNotFound(f"{self.name} is not served: its training failed "
                                 f"({self.error}); train it with genfleet train "
                                 f"{self.family} --local --name {self.name}")
        eta = self.eta_s()
        if self.phase == "starting":
            return ModelNotReady(f"{self.name} has just been trained (version {self.version}); "
                                 f"its replicas are starting, retry in a few seconds", 2.0)
        if self.phase == "training":
            where = f"epoch {self.epoch}/{self.epochs}" if self.epochs else "preparing"
            when = f"; expected to serve in about {_duration(eta)}" if eta is not None else ""
            return ModelNotReady(f"{self.name} has no checkpoint yet and is training "
                                 f"({where}){when}; retry later", _retry_after(eta))
        ahead = f" after {', '.join(self._before())}" if self._before() else " next"
        cap = f" (each model trains for at most {_duration(self.cap_s)})" if self.cap_s else ""
        return ModelNotReady(f"{self.name} has no checkpoint yet: it trains{ahead}{cap}; "
                             f"retry later", _retry_after(eta))

    def line(self) -> str:
        """One line for ``genfleet status``."""
        if self.phase == "failed":
            return f"{self.name:<16}failed: {self.error}"
        if self.phase == "starting":
            return f"{self.name:<16}trained (version {self.version}); replicas starting"
        eta = self.eta_s()
        if self.phase == "training":
            done = f"epoch {self.epoch}/{self.epochs}" if self.epochs else "preparing"
            spent = _duration(time.time() - (self.started or time.time()))
            left = f", about {_duration(eta)} left" if eta is not None else ""
            return f"{self.name:<16}training: {done}, {spent} in{left}"
        ahead = f" after {', '.join(self._before())}" if self._before() else " (next)"
        return f"{self.name:<16}queued{ahead}"

    def _before(self) -> list[str]:
        return ([f"{self.evaluating}'s evaluation"] if self.evaluating else []) + self.ahead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def _retry_after(eta: float | None) -> float:
    """The retry delay: the estimate itself (at least 1 s, at most 10 min; 30 s without
    one), so that a client that honours it (``GenfleetClient``: it gives up at once when
    the delay outlasts its deadline) does not wait on a model that cannot be ready in time."""
    return 30.0 if eta is None else min(600.0, max(1.0, eta))


@ray.remote(num_cpus=0, max_restarts=0)
class PendingBoard:
    """The pending models of one application (named ``board_name(app)``)."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, Any]] = {}

    def put(self, row: dict[str, Any]) -> None:
        self._models[row["name"]] = {**row, "updated": time.time()}

    def update(self, name: str, **fields: Any) -> None:
        if name in self._models:
            self._models[name] = {**self._models[name], **fields, "updated": time.time()}

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def models(self) -> dict[str, dict[str, Any]]:
        return dict(self._models)


NAMESPACE = "genfleet"  # every driver (up, gateways, status) finds the board here


def board_name(app_name: str) -> str:
    return f"pending-{app_name}"


def create_board(app_name: str) -> Any:
    """A new, empty board for ``app_name`` (one left by an earlier run is replaced); it
    lives as long as the driver that created it."""
    name = board_name(app_name)
    with contextlib.suppress(ValueError):  # none yet
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    return PendingBoard.options(name=name, namespace=NAMESPACE).remote()  # type: ignore[attr-defined]


def find_board(app_name: str) -> Any | None:
    """The board of ``app_name``, or None when no ``genfleet up`` is training for it."""
    try:
        return ray.get_actor(board_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None


def parse(rows: dict[str, dict[str, Any]]) -> dict[str, PendingModel]:
    known = set(PendingModel.__dataclass_fields__)
    return {name: PendingModel(**{k: v for k, v in row.items() if k in known})
            for name, row in rows.items()}


def read_board(app_name: str, timeout_s: float = 5.0) -> dict[str, PendingModel]:
    """The pending models of ``app_name`` (empty when none); blocking."""
    board = find_board(app_name)
    if board is None:
        return {}
    return parse(ray.get(board.models.remote(), timeout=timeout_s))
