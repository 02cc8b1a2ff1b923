"""What one replica does, without Ray: load a checkpoint, validate requests, run batches.

``ReplicaEngine.generate_many`` takes the requests of one dynamic batch, validates each on
its own (``services.core.validation``; a bad request fails alone), groups the rest by
sampler options and runs one ``model.sample`` per group. Each sample's noise comes from
its own (seed, index) stream, so a result does not depend on its batch-mates. A group
stops between sampler steps when every caller in it has cancelled or passed its deadline.
A group that fails for any other reason (an exception in the sampler, out of memory) is
run again one request at a time, so that only the request that fails alone fails, with
INTERNAL and a request id that names the log line holding the traceback.

A new checkpoint version is loaded beside the old one, warmed (``warm``: every default
path run once on a tiny synthetic batch, so that the first real call does not pay for
first-use allocations and lazy initialisation) and swapped in atomically: a batch that
started on the old version finishes on it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from services.core import api, validation
from services.core.data import decode_text, to_pngs
from services.core.errors import (
    Cancelled,
    DeadlineExceeded,
    GenfleetError,
    InvalidArgument,
)
from services.core.options import OptionSpec
from services.core.store import Checkpoint, ModelStore
from services.models import Capability, GenerativeModel, load_model, sample_seeds

log = logging.getLogger("genfleet.serving")


class BatchObserver(Protocol):
    """Told about every computed batch (metrics); called from the batch's thread."""

    def batch(self, *, requests: int, samples: int, queue_s: Sequence[float],
              compute_s: float, steps: int) -> None: ...


class CancelToken:
    """Set when the caller goes away; also reports a passed deadline."""

    def __init__(self, deadline: float | None = None) -> None:
        self._event = threading.Event()
        self.deadline = deadline

    def cancel(self) -> None:
        self._event.set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    @property
    def stopped(self) -> bool:
        return self._event.is_set() or self.expired


def _stopped_error(tokens: Sequence[CancelToken], when: str) -> GenfleetError:
    """DeadlineExceeded when every caller's deadline passed, else Cancelled."""
    if all(t.expired for t in tokens):
        return DeadlineExceeded(f"deadline passed {when}")
    return Cancelled(f"every caller cancelled or passed its deadline {when}")


def stop_callback(tokens: Sequence[CancelToken]) -> Callable[[int, int], None]:
    """A sampler callback that aborts once every token has stopped."""
    def callback(step: int, total: int) -> None:
        if all(t.stopped for t in tokens):
            raise _stopped_error(tokens, f"at step {step} of {total}")
    return callback


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _options(specs: dict[str, OptionSpec]) -> tuple[api.OptionInfo, ...]:
    return tuple(api.OptionInfo(name, spec) for name, spec in specs.items())


def model_info(model: GenerativeModel, meta: Checkpoint, limits: api.Limits) -> api.ModelInfo:
    """The ListModels view of a loaded model."""
    latent = model.latent_shape
    return api.ModelInfo(
        name=meta.name, family=meta.family, version=meta.version,
        capabilities=tuple(sorted(c.value for c in model.capabilities)),
        sample_shape=tuple(model.data_shape),
        sample_dtype="int64" if model.data_dtype == torch.int64 else "float32",
        levels=model.config.levels, classes=tuple(meta.data.get("classes", [])),
        data_kind=meta.data.get("kind", "image"),
        sampler_options=_options(model.option_specs()),
        score_options=_options(model.score_options),
        score_kind=model.score_kind.value if model.score_kind else None,
        latent_shape=tuple(latent) if latent is not None else None,
        limits=limits,
        metrics={k: float(v) for k, v in meta.metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)},
    )


@dataclass
class _Prepared:
    index: int
    request: api.GenerateRequest
    labels: torch.Tensor | None
    options: dict[str, Any]
    seeds: list[int]
    token: CancelToken
    arrived: float


class ReplicaEngine:
    """One model on one device; thread-safe for concurrent batches."""

    def __init__(self, store_root: str | Path, name: str, version: int | None = None, *,
                 device: str = "auto", autocast: str | None = None,
                 limits: api.Limits | None = None, max_batch_samples: int = 1024,
                 observer: BatchObserver | None = None, warmup: bool = True) -> None:
        self.store = ModelStore(store_root)
        self.name = name
        self.device = pick_device(device)
        if autocast not in (None, "bf16", "fp16"):
            raise InvalidArgument("autocast", "must be bf16, fp16 or empty")
        self.autocast = autocast
        self.limits = limits or api.Limits()
        self.max_batch_samples = max_batch_samples
        self._state: tuple[GenerativeModel, Checkpoint, api.ModelInfo] | None = None
        self.batch_sizes: Counter[int] = Counter()  # requests per dynamic batch -> count
        self.observer = observer
        self.warmup = warmup
        self.warm_s = 0.0  # how long the last warm-up took
        self.load(version)

    # ---------------------------------------------------------------- versions
    def load(self, version: int | None = None) -> api.ModelInfo:
        """Load ``version`` (latest when None) and swap it in atomically."""
        ref = self.name if version is None else f"{self.name}@{version}"
        model, meta = load_model(self.store, ref, self.device)
        info = model_info(model, meta, self.limits)
        if self.warmup:
            self.warm_s = self.warm(model, meta, info)
            log.info("%s@%d warmed in %.0f ms", meta.name, meta.version, 1000 * self.warm_s)
        self._state = (model, meta, info)  # one reference assignment: atomic
        return info

    def warm(self, model: GenerativeModel, meta: Checkpoint, info: api.ModelInfo) -> float:
        """Run every path served by default once on two synthetic samples: generate with
        the default options (unlabelled, and labelled where the model is conditional),
        score, encode and decode where the model can. Nothing is recorded in metrics or
        batch counts. Returns the seconds it took."""
        started = time.perf_counter()
        request = validation.check_generate(api.GenerateRequest(model=info.name, num_samples=2),
                                            info)
        labels = None
        if Capability.CONDITIONAL in model.capabilities and info.classes:
            labels = torch.tensor([0, 1 % len(info.classes)], device=self.device)
        with self._precision():
            x = model.sample_checked([0, 1], labels=None, callback=None,
                                     options=request.options)
            if labels is not None:
                x = model.sample_checked([0, 1], labels=labels, callback=None,
                                         options=request.options)
            if Capability.LOG_PROB in model.capabilities:
                model.log_prob(x, labels=labels)
            if Capability.ENCODE in model.capabilities:
                z = model.encode(x, labels=labels)
                if Capability.DECODE in model.capabilities:
                    model.decode(z, labels=labels)
        return time.perf_counter() - started

    @property
    def info(self) -> api.ModelInfo:
        assert self._state is not None
        return self._state[2]

    @property
    def version(self) -> int:
        return self.info.version

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.autocast and self.device.type == "cuda":
            dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield

    # ---------------------------------------------------------------- generate
    def _prepare(self, info: api.ModelInfo, index: int, req: api.GenerateRequest,
                 token: CancelToken, arrived: float) -> _Prepared:
        req = validation.check_generate(req, info)
        labels = torch.tensor(req.labels, dtype=torch.long, device=self.device) \
            if req.labels else None
        seeds = sample_seeds(req.seed, req.num_samples, req.start_index)
        return _Prepared(index, req, labels, req.options, seeds, token, arrived)

    def generate_many(self, items: Sequence[tuple[api.GenerateRequest, CancelToken, float]]
                      ) -> list[api.GenerateResult | api.ErrorResult]:
        """Run one dynamic batch; item ``i`` is (request, its cancel token, arrival time)."""
        assert self._state is not None
        model, meta, info = self._state  # the whole batch runs on one version
        self.batch_sizes[len(items)] += 1
        results: list[api.GenerateResult | api.ErrorResult | None] = [None] * len(items)
        groups: dict[tuple[Any, ...], list[_Prepared]] = {}
        for i, (req, token, arrived) in enumerate(items):
            try:
                p = self._prepare(info, i, req, token, arrived)
            except Exception as exc:  # a bad request fails alone
                results[i] = api.ErrorResult.failure(exc, f"{self.name}.generate")
                continue
            key = (tuple(sorted(p.options.items())), p.labels is None)
            groups.setdefault(key, []).append(p)
        for group in groups.values():
            for p, result in zip(group, self._run_isolated(model, meta, group), strict=True):
                results[p.index] = result
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _run_isolated(self, model: GenerativeModel, meta: Checkpoint, group: list[_Prepared]
                      ) -> list[api.GenerateResult | api.ErrorResult]:
        """``_run_group``; when it fails, each request again on its own, so that a failure
        (an exception in the sampler, running out of memory) is only its own request's."""
        try:
            return self._run_group(model, meta, group)
        except Exception as exc:
            if len(group) == 1:
                return [api.ErrorResult.failure(exc, f"{self.name}.generate")]
            log.warning("%s: a group of %d requests failed (%s: %s); running them one by one",
                        self.name, len(group), type(exc).__name__, str(exc)[:200])
        out: list[api.GenerateResult | api.ErrorResult] = []
        for p in group:
            try:
                out.extend(self._run_group(model, meta, [p]))
            except Exception as exc:
                out.append(api.ErrorResult.failure(exc, f"{self.name}.generate"))
        return out

    def _run_group(self, model: GenerativeModel, meta: Checkpoint, group: list[_Prepared]
                   ) -> list[api.GenerateResult | api.ErrorResult]:
        live = [p for p in group if not p.token.stopped]
        if not live:
            error = _stopped_error([p.token for p in group], "before the work started")
            return [api.ErrorResult.of(error) for _ in group]

        steps = 0
        stop = stop_callback([p.token for p in live])

        def callback(step: int, total: int) -> None:
            nonlocal steps
            steps += 1
            stop(step, total)

        seeds = [s for p in live for s in p.seeds]
        labels = None if live[0].labels is None else torch.cat([p.labels for p in live])  # type: ignore[misc]
        started = time.perf_counter()
        chunks = []
        try:
            with self._precision():
                for lo in range(0, len(seeds), self.max_batch_samples):
                    hi = lo + self.max_batch_samples
                    # validated once (_prepare): the sampler trusts it
                    chunks.append(model.sample_checked(
                        seeds[lo:hi], callback=callback, options=live[0].options,
                        labels=None if labels is None else labels[lo:hi]).float().cpu())
        except (Cancelled, DeadlineExceeded) as exc:  # every caller of the group has gone
            return [api.ErrorResult.of(exc) for _ in group]
        samples = torch.cat(chunks)
        finished = time.perf_counter()
        compute_ms = 1000 * (finished - started)
        if self.observer is not None:
            self.observer.batch(requests=len(live), samples=len(seeds), steps=steps,
                                queue_s=[started - p.arrived for p in live],
                                compute_s=finished - started)
        out: dict[int, api.GenerateResult | api.ErrorResult] = {
            p.index: api.ErrorResult.of(_stopped_error([p.token], "before the work started"))
            for p in group if p not in live}
        offset = 0
        for p in live:
            x = samples[offset:offset + len(p.seeds)]
            offset += len(p.seeds)
            tensor, png, text = self._outputs(model, meta, x, p.request.output)
            out[p.index] = api.GenerateResult(
                model=meta.name, version=meta.version, samples=tensor, png=png, text=text,
                seeds=p.seeds, labels=list(p.request.labels), start_index=p.request.start_index,
                timings=api.Timings(queue_ms=1000 * (started - p.arrived), compute_ms=compute_ms,
                                    total_ms=1000 * (time.perf_counter() - p.arrived)),
            )
        return [out[p.index] for p in group]

    def _outputs(self, model: GenerativeModel, meta: Checkpoint, x: torch.Tensor, output: str
                 ) -> tuple[np.ndarray | None, list[bytes], list[str]]:
        text_model = model.data_dtype == torch.int64
        arr = x.long().numpy() if text_model else x.numpy().astype(np.float32)
        tensor = arr if output in ("tensor", "both") else None
        png: list[bytes] = []
        text: list[str] = []
        if output in ("png", "both"):
            if text_model:
                text = decode_text(arr, meta.data.get("vocab", ""))
            else:
                png = to_pngs(arr, model.config.levels)
        return tensor, png, text

    # ------------------------------------------------------------ other calls
    # Each takes the caller's CancelToken: iterative work (DDIM, bounds over timesteps or
    # importance samples) stops between iterations once the caller has gone.
    @staticmethod
    def _data(model: GenerativeModel, data: np.ndarray) -> torch.Tensor:
        """Checked request data -> the model's data convention (levels accepted for images)."""
        if data.dtype.kind == "f":
            return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        ints = torch.from_numpy(data.astype(np.int64))
        if model.data_dtype == torch.int64:
            return ints
        return ints.float() / (model.config.levels - 1)

    @staticmethod
    def _labels(labels: Sequence[int]) -> torch.Tensor | None:
        return torch.tensor(list(labels), dtype=torch.long) if labels else None

    def score(self, req: api.ScoreRequest, token: CancelToken | None = None) -> api.ScoreResult:
        assert self._state is not None
        model, meta, info = self._state
        req = validation.check_score(req, info)
        started = time.perf_counter()
        x = self._data(model, req.data)
        with self._precision():
            lp = model.log_prob(x, labels=self._labels(req.labels),
                                callback=stop_callback([token or CancelToken()]),
                                **req.options).cpu()
        kind = model.score_kind.value if model.score_kind else ""
        bpd = [] if kind == "unnormalized" else model.bits_per_dim(lp).tolist()
        ms = 1000 * (time.perf_counter() - started)
        return api.ScoreResult(meta.name, meta.version, lp.tolist(), bpd, kind,
                               api.Timings(compute_ms=ms, total_ms=ms))

    def encode(self, req: api.EncodeRequest, token: CancelToken | None = None
               ) -> api.EncodeResult:
        assert self._state is not None
        model, meta, info = self._state
        req = validation.check_encode(req, info)
        started = time.perf_counter()
        x = self._data(model, req.data)
        with self._precision():
            z = model.encode(x, labels=self._labels(req.labels),
                             callback=stop_callback([token or CancelToken()]), **req.options)
        ms = 1000 * (time.perf_counter() - started)
        return api.EncodeResult(meta.name, meta.version, z.float().cpu().numpy(),
                                api.Timings(compute_ms=ms, total_ms=ms))

    def decode(self, req: api.DecodeRequest, token: CancelToken | None = None
               ) -> api.DecodeResult:
        assert self._state is not None
        model, meta, info = self._state
        req = validation.check_decode(req, info)
        started = time.perf_counter()
        z = torch.from_numpy(np.ascontiguousarray(req.latents, dtype=np.float32))
        with self._precision():
            x = model.decode(z, labels=self._labels(req.labels),
                             callback=stop_callback([token or CancelToken()]),
                             **req.options).cpu()
        tensor, png, text = self._outputs(model, meta, x, req.output)
        ms = 1000 * (time.perf_counter() - started)
        return api.DecodeResult(meta.name, meta.version, tensor, png, text,
                                api.Timings(compute_ms=ms, total_ms=ms))
