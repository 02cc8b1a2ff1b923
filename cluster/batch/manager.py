"""Batch jobs submitted over gRPC (``BatchService``): each runs in a thread of the server
process (the Ray driver), independent of the call that submitted it, so it keeps running
when the client disconnects.

Outputs live under one batch root on the server: a client names a directory below it,
never an arbitrary server path.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster.batch import job
from cluster.batch.output import Output
from services.core import api
from services.core.batch import BatchRequest, Shard
from services.core.errors import Cancelled, GenfleetError, InvalidArgument, ModelNotFound
from services.core.store import ModelStore, check_name


@dataclass
class _Job:
    spec: BatchRequest
    todo: list[Shard]
    status: api.BatchStatus
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class BatchManager:
    """Runs batch jobs on the cluster this process is connected to (``local``: in-process)."""

    def __init__(self, store: ModelStore, root: Path, *, local: bool = False,
                 device: str = "cpu") -> None:
        self.store = store
        self.root = root
        self.local = local
        self.device = device
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def _output(self, name: str) -> Path:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(p in ("..", ".") for p in parts):
            raise InvalidArgument("output", f"name a directory under the batch root, got {name!r}")
        for part in parts:
            check_name(part, "output")
        return self.root.joinpath(*parts)

    async def submit(self, request: BatchRequest) -> api.BatchStatus:
        """Validate and start (or find) the job.

        Raises:
            InvalidArgument, ModelNotFound: before anything is written.
        """
        spec = replace(request, out=str(self._output(request.out)),
                       options=dict(request.options))
        spec, todo = await asyncio.to_thread(job.plan, spec, self.store)
        with self._lock:
            current = self._jobs.get(spec.job_id())
            if current is not None and current.status.state == "running":
                return replace(current.status)
            busy = [e for e in self._jobs.values()
                    if e.status.state == "running" and e.spec.out == spec.out]
            if busy:
                raise InvalidArgument("output", f"{request.out!r} is being written by batch "
                                                f"job {busy[0].status.id}")
            written = spec.num_samples - sum(s.count for s in todo)
            status = api.BatchStatus(
                id=spec.job_id(), state="running", model=spec.model, version=spec.version or 0,
                num_samples=spec.num_samples, samples_written=written,
                output_uri=Output(spec.out).uri(), created=time.time())
            entry = _Job(spec, todo, status)
            self._jobs[status.id] = entry
        entry.thread = threading.Thread(target=self._run, args=(entry,), daemon=True,
                                        name=f"batch-{status.id}")
        entry.thread.start()
        return replace(status)

    def _run(self, entry: _Job) -> None:
        status = entry.status

        def progress(written: int, total: int) -> None:
            status.samples_written = written

        try:
            job.run(entry.spec, self.store, local=self.local, device=self.device,
                    progress=False, on_progress=progress, cancel=entry.cancel, todo=entry.todo)
            status.samples_written = status.num_samples
            status.manifest_uri = Output(entry.spec.out).uri(job.MANIFEST)
            status.state = "succeeded"
        except Cancelled:
            status.state = "cancelled"
        except GenfleetError as exc:
            status.state, status.error = "failed", str(exc)
        except Exception as exc:  # a worker died, the disk filled up, ...
            status.state, status.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            status.finished = time.time()

    def _get(self, job_id: str) -> _Job:
        with self._lock:
            entry = self._jobs.get(job_id)
        if entry is None:
            raise ModelNotFound(f"no batch job {job_id!r} on this server")
        return entry

    async def get(self, job_id: str) -> api.BatchStatus:
        return replace(self._get(job_id).status)

    async def cancel(self, job_id: str, wait_s: float = 60.0) -> api.BatchStatus:
        """Stop the job after the shards in flight; returns its final state."""
        entry = self._get(job_id)
        entry.cancel.set()
        if entry.thread is not None:
            await asyncio.to_thread(entry.thread.join, wait_s)
        return replace(entry.status)

    async def list(self) -> list[api.BatchStatus]:
        with self._lock:
            jobs = [replace(e.status) for e in self._jobs.values()]
        return sorted(jobs, key=lambda s: s.created, reverse=True)
