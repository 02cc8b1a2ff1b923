"""``cluster.bench.fastpath`` pieces without a deployment: the bare server, the client
process and the CPU accounting (no numbers are asserted: benchmarks report them)."""

from __future__ import annotations

from pathlib import Path

from cluster.bench import fastpath
from services.gateway.client import generation_protocol


def test_the_client_measures_a_bare_server_and_counts_cpu(tmp_path: Path) -> None:
    pb, _ = generation_protocol()
    reply = pb.GenerateResponse(model="gan", version=3).SerializeToString()
    bare = fastpath.BareServer(reply, tmp_path)
    try:
        result = fastpath.run_client(bare.target, "gan", 4, 1.0, warmup_s=0.2,
                                     own={bare.proc.pid: "bare"})
    finally:
        bare.close()
    assert result["ok"] > 0 and result["errors"] == {}
    assert result["calls_total"] >= result["ok"]
    assert result["p50_ms"] > 0
    budget = result["cpu_ms_per_call"]
    assert budget["bare"] > 0 and budget["client (grpc.aio, this benchmark)"] > 0


def test_cpu_per_call_labels_processes_and_divides_by_calls() -> None:
    before = {1: (1.0, "gateway"), 2: (0.5, "replica gan")}
    after = {1: (2.0, "gateway"), 2: (0.5, "replica gan"), 3: (0.25, "client")}
    assert fastpath.cpu_per_call(before, after, 100) == {"client": 2.5, "gateway": 10.0}
    assert fastpath._label("ray::ServeReplica:genfleet:gan", {}, 7) == "replica genfleet:gan"
    assert fastpath._label("x", {7: "mine"}, 7) == "mine"
