"""The KServe SDK's v2 clients, unmodified, against a genfleet gateway; run as a child
process (``python -m tests.oip_kserve GRPC_TARGET HTTP_URL MODEL N SEED``) because the
SDK's v2 service code and tritonclient's define the same protobuf names, which one process
cannot hold. Prints one JSON line: readiness, the ModelMetadata the SDK's own gRPC stub
reads, and the SAMPLES each client got (hex) for the caller to compare with native calls.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb


def _request(model: str, n: int, seed: int) -> InferRequest:
    count = InferInput("NUM_SAMPLES", [1], "INT64")
    count.set_data_from_numpy(np.array([n], np.int64))
    seed_in = InferInput("SEED", [1], "UINT64")
    seed_in.set_data_from_numpy(np.array([seed], np.uint64))
    return InferRequest(model_name=model, infer_inputs=[count, seed_in], request_id="kserve-1")


async def main(target: str, url: str, model: str, n: int, seed: int) -> dict[str, object]:
    out: dict[str, object] = {}
    grpc_client = InferenceGRPCClient(target, timeout=60, retries=2)
    try:
        out["grpc_live"] = await grpc_client.is_server_live()
        out["grpc_ready"] = await grpc_client.is_server_ready()
        out["grpc_model_ready"] = await grpc_client.is_model_ready(model)
        meta = await grpc_client._client_stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
        out["grpc_metadata"] = {"name": meta.name, "versions": list(meta.versions),
                                "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
                                "outputs": [[t.name, t.datatype, list(t.shape)]
                                            for t in meta.outputs]}
        response = await grpc_client.infer(_request(model, n, seed))
        samples = next(o for o in response.outputs if o.name == "SAMPLES").as_numpy()
        out["grpc_samples"] = samples.astype("<f4").tobytes().hex()
        out["grpc_id"] = response.id
    finally:
        await grpc_client.close()
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        out["rest_live"] = await rest.is_server_live(url)
        out["rest_ready"] = await rest.is_server_ready(url)
        out["rest_model_ready"] = await rest.is_model_ready(url, model)
        response = await rest.infer(url, _request(model, n, seed), model_name=model)
        samples = next(o for o in response.outputs if o.name == "SAMPLES").as_numpy()
        out["rest_samples"] = np.asarray(samples, np.float32).astype("<f4").tobytes().hex()
        try:
            await rest.infer(url, _request(model, 10**9, seed), model_name=model)
            out["rest_error"] = None
        except Exception as exc:  # httpx.HTTPStatusError, with the server's message
            status = getattr(getattr(exc, "response", None), "status_code", None)
            out["rest_error"] = [status, str(exc)[:300]]
    finally:
        await rest.close()
    return out


if __name__ == "__main__":
    target, url, model, n, seed = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(target, url, model, int(n), int(seed)))))
