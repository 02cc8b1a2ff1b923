"""The models ``genfleet up`` serves that have no checkpoint yet, trained in the background
on the same Ray cluster while the gateway and the other models already serve.

One model trains at a time (a Ray task of one CPU, ``threads`` torch threads: the rest of
the machine stays with the replicas and the gateway), in the order the serve config lists
them. Progress goes to the app's ``PendingBoard`` (``services.serving.pending``): gateways
answer a call to a model still training with UNAVAILABLE and an estimate, and ``genfleet
status`` prints it. When a checkpoint is written the model is added to the Serve
application (the others' replicas are untouched: ``services.serving.app.code_version``),
it leaves the board once it is deployed, and ``on_served(name)`` is called; meanwhile the
next task evaluates it (FD, bits/dim into the checkpoint's metrics) before the next model
trains.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from services.core.errors import ModelNotFound
from services.core.store import ModelStore
from services.serving import operations
from services.serving.config import ServeConfig
from services.serving.pending import PendingModel, create_board, find_board

log = logging.getLogger("genfleet.background")
# after a model is deployed it stays on the board this long, so that every gateway's cached
# list of served models (ServeBackend, refreshed every info_ttl_s = 2 s) has it first
HANDOVER_S = 5.0


@ray.remote(num_cpus=1, max_retries=1)  # once more if its worker process dies
def train_one(name: str, store_root: str, minutes: float, threads: int, app_name: str
              ) -> dict[str, Any]:
    """Train family ``name`` (default data and schedule, ``minutes`` cap) into the store,
    reporting every epoch to the board; no evaluation (``evaluate_one`` does it)."""
    import torch

    from services.training.recipes import train_spec_locally
    from services.training.spec import prepare, spec_from_config

    torch.set_num_threads(threads)
    board = find_board(app_name)
    started = time.time()
    if board is not None:
        board.update.remote(name, phase="training", started=started, ahead=[], evaluating="")
    spec = spec_from_config(name, train={"max_minutes": minutes})
    setup = prepare(spec, distributed=False)
    if board is not None:
        board.update.remote(name, epochs=setup.train.epochs)

    def on_epoch(row: dict[str, float]) -> None:
        if board is not None:
            board.update.remote(name, epoch=int(row["epoch"]))

    checkpoint, result = train_spec_locally(spec, store=ModelStore(store_root), evaluate=False,
                                            progress=False, log=on_epoch, setup=setup)
    return {"version": checkpoint.version, "ref": checkpoint.ref, "seconds": result.seconds,
            "epochs": result.epochs}


@ray.remote(num_cpus=1, max_retries=1)  # once more if its worker process dies
def evaluate_one(name: str, ref: str, store_root: str, threads: int,
                 num_samples: int = 1000) -> dict[str, Any]:
    """FD, class coverage and bits/dim of ``ref`` on its training data's test split, merged
    into the checkpoint's metrics (what ``genfleet train`` records)."""
    import torch

    from services.training.recipes import evaluate_stored
    from services.training.spec import spec_from_config

    torch.set_num_threads(threads)
    return evaluate_stored(ModelStore(store_root), ref, spec_from_config(name),
                           eval_samples=num_samples)


class BackgroundTraining:
    """Train ``missing`` one after another and serve each as soon as its checkpoint is
    written; ``served``: the models of ``config`` deployed already."""

    def __init__(self, store: ModelStore, config: ServeConfig, served: list[str],
                 missing: list[str], *, minutes: float, threads: int,
                 on_served: Callable[[str], Any] | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.store = store
        self.config = config
        self.served = list(served)
        self.missing = list(missing)
        self.minutes = minutes
        self.threads = threads
        self.on_served = on_served
        self.say = say
        self.failed: dict[str, str] = {}
        self._refs: list[Any] = []
        self._board: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start_board(self) -> None:
        """The board with every missing model queued (before the gateway answers, so that
        its first call already gets the right status)."""
        self._board = create_board(self.config.app_name)
        cap = 60 * self.minutes
        ray.get([self._board.put.remote(
            PendingModel(name, family=name, ahead=self.missing[:i], cap_s=cap).to_dict())
            for i, name in enumerate(self.missing)])

    async def run(self) -> None:
        if self._board is None:
            await asyncio.to_thread(self.start_board)
        started = time.perf_counter()
        for i, name in enumerate(self.missing):
            self._queue(i, evaluating=False)
            self.say(f"[{name}] no checkpoint: training in the background "
                     f"(cap {self.minutes:g} min); the others serve meanwhile")
            ref = train_one.remote(name, str(self.store.root), self.minutes, self.threads,
                                   self.config.app_name)
            self._refs = [ref]
            try:
                result = await ref
            except Exception as exc:  # its error is the model's own; the others go on
                reason = _reason(exc)
                self.failed[name] = reason
                self._board.update.remote(name, phase="failed", error=reason)
                self.say(f"[{name}] training failed: {reason}")
                continue
            self._board.update.remote(name, phase="starting", version=result["version"])
            self._queue(i, evaluating=True)
            evaluation = evaluate_one.remote(name, result["ref"], str(self.store.root),
                                             self.threads)
            self._refs = [evaluation]
            self.served.append(name)
            try:
                await asyncio.to_thread(self._deploy, name)
            except Exception as exc:
                reason = _reason(exc)
                self.served.remove(name)
                self.failed[name] = reason
                self._board.update.remote(name, phase="failed", error=f"deploy: {reason}")
                self.say(f"[{name}] trained ({result['ref']}) but not deployed: {reason}")
            else:
                self.say(f"[{name}] trained ({result['ref']}, {result['epochs']} epochs in "
                         f"{result['seconds']:.0f} s) and serving, "
                         f"{time.perf_counter() - started:.0f} s after start-up")
                handover = asyncio.get_running_loop().create_task(self._hand_over(name))
                self._tasks.add(handover)  # kept until done (the loop holds tasks weakly)
                handover.add_done_callback(self._tasks.discard)
            try:
                metrics = await evaluation
                ratio = metrics.get("fd_ratio")
                self.say(f"[{name}] evaluated: FD/floor "
                         f"{ratio:.2f}" if isinstance(ratio, float) else f"[{name}] evaluated")
            except Exception as exc:
                self.say(f"[{name}] evaluation failed (it serves anyway): {_reason(exc)}")
        self._refs = []

    def _queue(self, i: int, evaluating: bool) -> None:
        """What each model after the ``i``-th waits for: the ``i``-th training (or, once
        trained, its evaluation) and the models between."""
        name = self.missing[i]
        for j in range(i + 1, len(self.missing)):
            self._board.update.remote(
                self.missing[j], ahead=self.missing[i + evaluating:j],
                evaluating=name if evaluating else "")

    def _deploy(self, name: str) -> None:
        """Add ``name`` to the application as it is deployed now (so that a ``genfleet
        scale`` or ``deploy`` made meanwhile is kept), its version pinned."""
        try:
            config = operations.load_state(self.store, self.config.app_name)
        except ModelNotFound:  # no state saved: what up deployed
            config = copy.deepcopy(self.config)
            config.models = {n: m for n, m in config.models.items() if n in self.served}
        config.models[name] = copy.deepcopy(self.config.models[name])
        operations.deploy(config, self.store)

    async def _hand_over(self, name: str) -> None:
        await asyncio.sleep(HANDOVER_S)
        self._board.remove.remote(name)
        if self.on_served is not None:
            try:
                await asyncio.to_thread(self.on_served, name)
            except Exception as exc:  # e.g. the demo grid: the model serves regardless
                self.say(f"[{name}] after it came up: {_reason(exc)}")

    def cancel(self) -> None:
        """Stop the task running now (shutdown)."""
        for ref in self._refs:
            try:
                ray.cancel(ref, force=True)
            except Exception as exc:  # finished meanwhile, or the cluster is gone
                log.debug("cancel: %s", exc)


def _reason(exc: BaseException) -> str:
    """The one line of a task's failure (a RayTaskError wraps the real exception)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]
