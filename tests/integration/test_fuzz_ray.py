"""The fuzz of tests/unit/test_fuzz.py at 10,030 examples through what a user runs: `genfleet
up` (a real local Ray cluster, the six families as Serve deployments, its gateway), from a
client that knows only the protocol. Pass: no INTERNAL or UNKNOWN, the gateway still
SERVING, every replica process still the one that started (none died or restarted), and
the gateway process's memory growth bounded."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.gateway.client import GenfleetClient
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from tests import fuzz
from tests.helpers import genfleet_up, tiny_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVED = fuzz.FAMILIES


def _title(pid: int | str) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None  # gone


# Ray titles a replica process ray::ServeReplica:<app>:<deployment>, with .<method> while it
# runs one, or ray::SERVE_REPLICA::<app>#<deployment>#<id>:... while it starts
_REPLICA = re.compile(r"ray::(?:SERVE_REPLICA::genfleet#|ServeReplica:genfleet:)([\w-]+)")


def replica_pids() -> dict[int, str]:
    """Model replica processes on this machine -> their model."""
    found = {}
    for proc in Path("/proc").iterdir():
        title = _title(proc.name) if proc.name.isdigit() else None
        match = _REPLICA.match(title or "")
        if match and match.group(1) in SERVED:
            found[int(proc.name)] = match.group(1)
    return found


def still_running(pid: int, model: str) -> bool:
    """The replica process ``pid`` still lives and still serves ``model`` (a replica that
    died and was replaced has another pid)."""
    match = _REPLICA.match(_title(pid) or "")
    return match is not None and match.group(1) == model


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("fuzz-up")
    tiny_store(base / "store", steps=2)
    config = yaml.safe_load(Path("cluster/configs/serve.yaml").read_text())
    config["defaults"]["limits"] = dataclasses.asdict(fuzz.LIMITS)
    config["defaults"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    (base / "serve.yaml").write_text(yaml.safe_dump(config))
    with genfleet_up(base, "--config", str(base / "serve.yaml"), "--num-cpus", "4", "--port",
                     "0", "--metrics-port", "-1", "--ray-metrics-port", "-1",
                     "--max-inflight-mib", "64") as state, \
            grpc.insecure_channel(state["target"]) as channel:
        caller = fuzz.Caller(channel, timeout_s=30)
        for family in SERVED:  # every replica answers before the pids are taken
            caller.call(caller.stub.Generate, pb.GenerateRequest(model=family, num_samples=1))
        pids = replica_pids()
        assert len(pids) == len(SERVED), pids
        yield {"caller": caller, "target": state["target"], "pid": state["pid"],
               "replicas": pids, "rss0": fuzz.rss_mib(state["pid"]), "log": state["log"]}


# 10,030 examples in all
test_fuzz_generate = fuzz.fuzz_test("Generate", 3500, "up")
test_fuzz_generate_stream = fuzz.fuzz_test("GenerateStream", 1200, "up")
test_fuzz_score = fuzz.fuzz_test("Score", 1500, "up")
test_fuzz_encode = fuzz.fuzz_test("Encode", 1300, "up")
test_fuzz_decode = fuzz.fuzz_test("Decode", 1300, "up")
test_fuzz_submit_batch = fuzz.fuzz_test("SubmitBatch", 900, "up")
test_fuzz_batch_lookups_and_list_models = fuzz.fuzz_test("Lookup", 330, "up")


def test_after_the_fuzz_every_replica_lives_and_the_gateway_serves(up: dict[str, Any]) -> None:
    caller: fuzz.Caller = up["caller"]
    seen = sum(caller.codes.values())
    rss = fuzz.rss_mib(up["pid"])
    print(f"fuzz through genfleet up: {seen} calls, statuses {dict(caller.codes)}; "
          f"gateway RSS {up['rss0']:.0f} -> {rss:.0f} MiB")
    if seen < 10_000:
        pytest.skip("run with the fuzz tests above (it checks what they left behind)")
    assert caller.codes["OK"] > 1000, caller.codes
    with GenfleetClient(up["target"], retries=0) as client:
        assert client.health() == "SERVING"
        for family in SERVED:
            assert client.health(family) == "SERVING"
            assert client.generate(family, 2, seed=1).samples is not None
    gone = {m: p for p, m in up["replicas"].items() if not still_running(p, m)}
    assert not gone, f"replicas died or were restarted during the fuzz: {gone}"
    assert rss - up["rss0"] < fuzz.RSS_GROWTH_BOUND_MIB, f"gateway RSS grew {rss - up['rss0']:.0f} MiB"
    log = Path(up["log"]).read_text()
    assert "internal error, request id" not in log, log[-5000:]
