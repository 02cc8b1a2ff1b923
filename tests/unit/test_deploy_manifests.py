"""The manifests in deploy/ are consistent with the code that runs inside them."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from services.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _load(path: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / path).read_text())
    return doc


def test_rayjob_runs_a_valid_train_command_that_fits_its_cluster() -> None:
    job = _load("deploy/kuberay/rayjob-train.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "genfleet"
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on a bad flag
    assert args.command == "train" and not args.local and args.address == "auto"
    cluster = job["spec"]["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]
                                          ["limits"].get("nvidia.com/gpu", 0)) for g in groups)
    assert args.workers * args.gpus_per_worker <= gpus
    cpus = min(float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in groups)
    assert args.cpus_per_worker <= cpus
    # the store (and the train runs beside it) is on the volume every pod mounts
    mounts = [c["volumeMounts"] for c in
              [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] +
              [g["template"]["spec"]["containers"][0] for g in groups]]
    for pod_mounts in mounts:
        assert any(args.store.startswith(m["mountPath"] + "/") for m in pod_mounts)
    assert cluster["rayVersion"].startswith("2.60")
