"""``genfleet batch``: fill a dataset with samples (shards + manifest), on Ray Data."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cluster.cli.common import open_store, parse_sets
from services.core.batch import DEFAULT_SHARD_SIZE


def cmd_batch(args: argparse.Namespace) -> int:
    from cluster.batch import job
    from services.core.batch import BatchRequest
    from services.serving import ray_cluster

    spec = BatchRequest(model=args.model, num_samples=args.num_samples, out=args.out,
                        format=args.format, encoding=args.encoding, shard_size=args.shard_size,
                        seed=args.seed, labels=args.labels, options=parse_sets(args.set),
                        workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                        chunk=args.chunk)
    store = open_store(args)
    spec, todo = job.plan(spec, store)  # user errors before a cluster starts or a file is written
    if not args.local:
        if args.address:
            ray_cluster.connect(args.address)
        else:
            ray_cluster.start_cluster(None, num_cpus=max(4, spec.workers + 2))
    manifest = job.run(spec, store, local=args.local, progress=not args.quiet, todo=todo)
    print(json.dumps({k: manifest[k] for k in ("job_id", "model", "version", "num_samples",
                                               "num_shards", "label_histogram")}))
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("batch", help="generate a dataset: shards + manifest (a Ray Data job)")
    p.add_argument("model", help="name or name@version")
    p.add_argument("-n", "--num-samples", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory (or file:// URI)")
    p.add_argument("--format", default="parquet", help="parquet | png | npz")
    p.add_argument("--encoding", default="tensor",
                   help="parquet rows hold the tensor, png bytes (text: the string), or both")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default="", help="balanced, or class ids to cycle (0,3,7); "
                                                "default: none (the model's own choice)")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="sampler option (see genfleet models)")
    p.add_argument("--workers", type=int, default=1, help="Ray Data actors holding the model")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--chunk", type=int, default=256, help="samples per forward pass")
    p.add_argument("--local", action="store_true", help="in this process, without Ray")
    p.add_argument("--address", default=None, help="run on this Ray cluster ('auto': genfleet up's)")
    p.set_defaults(func=cmd_batch)
