"""A small Python client for the gateway: numpy in and out, a deadline on every call, and
retries only where the server says a retry can help: a status carrying the
``grpc-retry-pushback-ms`` trailer (queue or gateway full, no replica yet), waiting at
least the delay it names, or UNAVAILABLE from the transport (a gateway that went away).
Every call it makes is idempotent (seeded), so a retry cannot duplicate work's effect.

``target`` may name several gateways (``ipv4:10.0.0.1:50051,10.0.0.2:50051``, or a DNS
name with several addresses such as Kubernetes' headless service,
``dns:///genfleet-gateway-headless.genfleet:50051``): calls are spread over them
round-robin, and a call that a gateway's death or stop cut off (UNAVAILABLE, or CANCELLED
from a gateway stopping: see ``retry_delay``) is retried on another, so a client loses no
call when one gateway dies or is restarted.

    with GenfleetClient("127.0.0.1:50051") as client:
        out = client.generate("diffusion", 16, seed=7, labels=range(16))
        out.samples.shape   # (16, 1, 8, 8)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import api
from services.core.batch import DEFAULT_SHARD_SIZE
from services.gateway import codec
from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb
from services.gateway.pb.genfleet.v1 import batch_pb2_grpc as bpb_grpc
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc

T = TypeVar("T")
PUSHBACK = "grpc-retry-pushback-ms"


def generation_protocol() -> tuple[Any, Any]:
    """The generated ``genfleet.v1`` message module and ``GenerationServiceStub`` class,
    for callers that want the bare protocol and nothing of this client (benchmarks,
    grpc.aio callers): ``pb, Stub = generation_protocol()``."""
    return pb, pb_grpc.GenerationServiceStub


_RETRY_AT_ONCE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def retry_delay(exc: grpc.RpcError) -> float | None:
    """Seconds the server asks to wait before a retry; None: do not retry.

    A status with the pushback trailer is retryable after that delay (a negative value
    means never, as in gRPC's retry design); UNAVAILABLE without it comes from the transport
    (connection refused or reset) and may be retried at once; so may CANCELLED: this client
    never cancels a call itself, and a grpc server that stops gracefully answers the calls
    that race its stop (arrived, never given to a handler) CANCELLED (grpc/grpc#41785).
    Anything else is final.
    """
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == PUSHBACK:
            try:
                ms = int(value)
            except ValueError:
                return None
            return None if ms < 0 else ms / 1000
    return 0.0 if exc.code() in _RETRY_AT_ONCE else None
_OUTPUT = {"tensor": pb.OUTPUT_FORMAT_TENSOR, "png": pb.OUTPUT_FORMAT_PNG,
           "both": pb.OUTPUT_FORMAT_BOTH}


class GenfleetClient:
    """Blocking client. ``timeout`` is the default deadline of one call (seconds)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None,
                 tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, timeout: float = 60.0, retries: int = 4,
                 backoff_s: float = 0.1, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.lb_policy_name", "round_robin")]  # one address: the same as none
        if tls_ca or tls_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls_ca.read_bytes() if tls_ca else None,
                private_key=tls_key.read_bytes() if tls_key else None,
                certificate_chain=tls_cert.read_bytes() if tls_cert else None)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.batch_stub = bpb_grpc.BatchServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s

    def __enter__(self) -> GenfleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _retry(self, call: Callable[[float], T], timeout: float | None) -> T:
        deadline = time.monotonic() + (timeout or self.timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return call(max(0.001, remaining))
            except grpc.RpcError as exc:
                attempt += 1
                asked = retry_delay(exc)
                if asked is None or attempt > self.retries:
                    raise
                backoff = self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                pause = max(asked, backoff)
                if pause >= deadline - time.monotonic():
                    raise
                time.sleep(pause)

    # ------------------------------------------------------------------ calls
    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        resp = self._retry(lambda t: self.stub.ListModels(pb.ListModelsRequest(), timeout=t,
                                                          metadata=self.metadata), timeout)
        return list(resp.models)

    def _generate_request(self, model: str, n: int, seed: int, labels: Iterable[int] | None,
                          options: Mapping[str, Any] | None, output: str, start_index: int,
                          chunk_size: int = 0) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            model=model, num_samples=n, seed=seed, labels=list(labels or []),
            options={k: codec.option_value(v) for k, v in (options or {}).items()},
            output=_OUTPUT[output], start_index=start_index, chunk_size=chunk_size)

    def generate(self, model: str, n: int, *, seed: int = 0, labels: Iterable[int] | None = None,
                 options: Mapping[str, Any] | None = None, output: str = "tensor",
                 start_index: int = 0, timeout: float | None = None) -> api.GenerateResult:
        req = self._generate_request(model, n, seed, labels, options, output, start_index)
        resp = self._retry(lambda t: self.stub.Generate(req, timeout=t, metadata=self.metadata),
                           timeout)
        return codec.generate_result_from_pb(resp)

    def generate_stream(self, model: str, n: int, *, seed: int = 0,
                        labels: Iterable[int] | None = None,
                        options: Mapping[str, Any] | None = None, output: str = "tensor",
                        chunk_size: int = 0, timeout: float | None = None
                        ) -> Iterator[api.GenerateResult]:
        req = self._generate_request(model, n, seed, labels, options, output, 0, chunk_size)
        for resp in self.stub.GenerateStream(req, timeout=timeout or self.timeout,
                                             metadata=self.metadata):
            yield codec.generate_result_from_pb(resp)

    def score(self, model: str, data: np.ndarray, *, labels: Iterable[int] | None = None,
              options: Mapping[str, Any] | None = None, timeout: float | None = None
              ) -> api.ScoreResult:
        req = pb.ScoreRequest(model=model, data=codec.array_to_tensor(data),
                              labels=list(labels or []),
                              options={k: codec.option_value(v) for k, v in (options or {}).items()})
        resp = self._retry(lambda t: self.stub.Score(req, timeout=t, metadata=self.metadata),
                           timeout)
        return codec.score_result_from_pb(resp)

    def encode(self, model: str, data: np.ndarray, *, labels: Iterable[int] | None = None,
               options: Mapping[str, Any] | None = None, timeout: float | None = None
               ) -> np.ndarray:
        req = pb.EncodeRequest(model=model, data=codec.array_to_tensor(data),
                               labels=list(labels or []),
                               options={k: codec.option_value(v) for k, v in (options or {}).items()})
        resp = self._retry(lambda t: self.stub.Encode(req, timeout=t, metadata=self.metadata),
                           timeout)
        return codec.tensor_to_array(resp.latents, "latents")

    def decode(self, model: str, latents: np.ndarray, *, labels: Iterable[int] | None = None,
               options: Mapping[str, Any] | None = None, output: str = "tensor",
               timeout: float | None = None) -> api.DecodeResult:
        req = pb.DecodeRequest(model=model, latents=codec.array_to_tensor(latents),
                               labels=list(labels or []), output=_OUTPUT[output],
                               options={k: codec.option_value(v) for k, v in (options or {}).items()})
        resp = self._retry(lambda t: self.stub.Decode(req, timeout=t, metadata=self.metadata),
                           timeout)
        return codec.decode_result_from_pb(resp)

    # -------------------------------------------------------------- batch jobs
    def submit_batch(self, model: str, n: int, output: str, *, format: str = "parquet",
                     encoding: str = "tensor",
                     shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, labels: str = "",
                     options: Mapping[str, Any] | None = None, workers: int = 1,
                     gpus_per_worker: float = 0.0, timeout: float | None = None
                     ) -> bpb.BatchJob:
        """Start a dataset job under the server's batch root (``output``: a directory name)."""
        req = bpb.SubmitBatchRequest(
            model=model, num_samples=n, output=output,
            format=bpb.BatchFormat.Value(f"BATCH_FORMAT_{format.upper()}"), encoding=encoding,
            shard_size=shard_size, seed=seed, labels=labels,
            options={k: codec.option_value(v) for k, v in (options or {}).items()},
            workers=workers, gpus_per_worker=gpus_per_worker)
        return self._retry(lambda t: self.batch_stub.SubmitBatch(
            req, timeout=t, metadata=self.metadata), timeout)

    def get_batch(self, job_id: str, timeout: float | None = None) -> bpb.BatchJob:
        return self._retry(lambda t: self.batch_stub.GetBatch(
            bpb.GetBatchRequest(id=job_id), timeout=t, metadata=self.metadata), timeout)

    def cancel_batch(self, job_id: str, timeout: float | None = None) -> bpb.BatchJob:
        return self._retry(lambda t: self.batch_stub.CancelBatch(
            bpb.CancelBatchRequest(id=job_id), timeout=t, metadata=self.metadata), timeout)

    def list_batches(self, timeout: float | None = None) -> list[bpb.BatchJob]:
        resp = self._retry(lambda t: self.batch_stub.ListBatches(
            bpb.ListBatchesRequest(), timeout=t, metadata=self.metadata), timeout)
        return list(resp.jobs)

    def wait_batch(self, job_id: str, timeout: float = 3600.0, poll_s: float = 0.5
                   ) -> bpb.BatchJob:
        """Poll until the job is no longer running."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_batch(job_id)
            if job.state != bpb.BATCH_STATE_RUNNING or time.monotonic() > deadline:
                return job
            time.sleep(poll_s)

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING, NOT_SERVING or SERVICE_UNKNOWN (standard grpc.health.v1)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
