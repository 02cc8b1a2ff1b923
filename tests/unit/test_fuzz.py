"""Property-based fuzzing of every RPC of GenerationService and BatchService through a real
grpc.aio gateway over the in-process backend (2,030 examples): arbitrary messages — every
field, NaN and infinities, extreme integers, empty, huge and unicode strings, wrong and
overflowing shapes and dtypes, unknown options — never get INTERNAL or UNKNOWN, and the
gateway stays SERVING with bounded memory. tests/integration/test_fuzz_ray.py runs the
same strategies through a real Ray cluster behind `genfleet up`."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from cluster.batch.manager import BatchManager
from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.serving.inprocess import InProcessBackend
from tests import fuzz
from tests.helpers import GatewayThread, tiny_store


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("fuzz")
    tiny_store(root / "store", steps=2)
    batches = BatchManager(ModelStore(root / "store"), root / "batches", local=True)
    thread = GatewayThread(
        lambda: InProcessBackend(root / "store", fuzz.FAMILIES, device="cpu", limits=fuzz.LIMITS),
        GatewayConfig(host="127.0.0.1", port=0, health_interval_s=0.5,
                      max_message_bytes=4 * 1024 * 1024),
        batches=lambda: batches)
    channel = grpc.insecure_channel(thread.target)
    caller = fuzz.Caller(channel)
    caller.call(caller.stub.Generate, pb.GenerateRequest(model="gan", num_samples=8))  # warm
    state: dict[str, object] = {"caller": caller, "thread": thread, "rss0": fuzz.rss_mib()}
    yield state
    for job in thread.run(batches.list()):
        thread.run(batches.cancel(job.id))
    channel.close()
    thread.stop()


SERVED = fuzz.FAMILIES


# 2,030 examples in all
test_fuzz_generate = fuzz.fuzz_test("Generate", 700)
test_fuzz_generate_stream = fuzz.fuzz_test("GenerateStream", 300)
test_fuzz_score = fuzz.fuzz_test("Score", 300)
test_fuzz_encode = fuzz.fuzz_test("Encode", 250)
test_fuzz_decode = fuzz.fuzz_test("Decode", 250)
test_fuzz_submit_batch = fuzz.fuzz_test("SubmitBatch", 150)
test_fuzz_batch_lookups_and_list_models = fuzz.fuzz_test("Lookup", 80)


def test_after_the_fuzz_the_gateway_serves_with_bounded_memory(state: dict[str, object]
                                                               ) -> None:
    caller: fuzz.Caller = state["caller"]  # type: ignore[assignment]
    thread: GatewayThread = state["thread"]  # type: ignore[assignment]
    seen = sum(caller.codes.values())
    print(f"fuzz: {seen} calls, statuses {dict(caller.codes)}; "
          f"RSS {state['rss0']:.0f} -> {fuzz.rss_mib():.0f} MiB")
    if seen < 2000:
        pytest.skip("run with the fuzz tests above (it checks what they left behind)")
    # hostile and valid requests both ran: the fuzz reached the models, not only the codec
    assert caller.codes["INVALID_ARGUMENT"] > 500 and caller.codes["OK"] > 150, caller.codes
    with GenfleetClient(thread.target, retries=0) as client:
        assert client.health() == "SERVING"
        for family in fuzz.FAMILIES:
            assert client.health(family) == "SERVING"
            out = client.generate(family, 2, seed=1)
            assert out.samples is not None and len(out.seeds) == 2
    growth = fuzz.rss_mib() - float(state["rss0"])  # type: ignore[arg-type]
    assert growth < fuzz.RSS_GROWTH_BOUND_MIB, f"RSS grew {growth:.0f} MiB over the fuzz"
    assert thread.gateway.admission.rpcs == 0 and thread.gateway.admission.bytes == 0

