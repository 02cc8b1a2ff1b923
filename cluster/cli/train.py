"""``genfleet train FAMILY``: a Ray Train job (DDP workers), or in this process with
``--local``; both take their settings from the train YAML, then the flags."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.cli.common import format_metrics, join_cluster, open_store, parse_sets, threads
from services.core.errors import InvalidArgument


def _spec(args: argparse.Namespace) -> Any:
    """The run the flags describe (YAML defaults -> family -> flags); names are checked
    here, before any work."""
    from services.training.spec import spec_from_config

    train = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                               ("lr", args.lr), ("seed", args.seed),
                               ("max_minutes", args.minutes)) if v is not None}
    return spec_from_config(
        args.family, path=args.config, name=args.name, job=args.job, data=args.data,
        preset=args.preset,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, model=parse_sets(args.set), train=train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.minutes is not None and not args.local:
        raise InvalidArgument("--minutes", "only with --local; bound a Ray job with --epochs")
    spec = _spec(args)
    if not args.local:
        return _train_on_ray(args, spec)
    from services.training.recipes import train_spec_locally

    threads(args.threads)
    checkpoint, result = train_spec_locally(spec, store=open_store(args), evaluate=not args.no_eval,
                                            eval_samples=args.eval_samples,
                                            progress=not args.quiet)
    print(f"trained {checkpoint.ref} ({checkpoint.family}) in {result.seconds:.0f} s, "
          f"{result.steps} steps, {result.samples_per_second:.0f} samples/s -> {checkpoint.path}")
    if checkpoint.metrics:
        print(format_metrics(checkpoint.metrics))
    return 0


def _train_on_ray(args: argparse.Namespace, spec: Any) -> int:
    """A Ray Train job, then export (and deploy)."""
    from cluster.train import job
    from services.serving import operations, ray_cluster

    store = open_store(args)
    if args.address or args.deploy:  # a running cluster (default: the one `genfleet up` runs)
        join_cluster(args.address, store)
    else:
        needed = spec.workers * spec.cpus_per_worker + 1  # + the train controller
        ray_cluster.start_cluster(None, num_cpus=max(4, int(needed + 0.999)))
    print(f"job {spec.job}: {spec.family} on {spec.workers} worker(s) "
          f"({spec.cpus_per_worker} CPU, {spec.gpus_per_worker} GPU each), data {spec.data}; "
          f"runs in {job.storage_path(store.root) / spec.job}", flush=True)
    result = job.run(spec, store, evaluate=not args.no_eval, eval_samples=args.eval_samples,
                     progress=not args.quiet)
    print(job.describe(result))
    if result.metrics:
        print(format_metrics(result.metrics))
    if args.deploy:
        name, version = result.ref.split("@")
        operations.rollout(store, name, int(version))
        print(f"{name} now serves version {version}")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model family (Ray Train job, or --local) and "
                                     "store a new version")
    p.add_argument("family")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--data", default=None, help="data spec (digits, mnist:DIR, ...)")
    p.add_argument("--preset", default=None,
                   help="the family's named sizes: digits, mnist, cifar10 (default: the one "
                        "named after the data's shape, e.g. 32x32x3 -> cifar10)")
    p.add_argument("--name", default=None, help="model name in the store (default: family)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget (--local): training stops after the epoch that "
                        "passes it")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (split across workers)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override (repeatable), e.g. --set width=32")
    p.add_argument("--no-eval", action="store_true", help="skip the quality evaluation")
    p.add_argument("--eval-samples", type=int, default=1000)
    ray_args = p.add_argument_group("Ray Train job (without --local)")
    ray_args.add_argument("--workers", type=int, default=None, help="DDP workers (default 2)")
    ray_args.add_argument("--gpus-per-worker", type=float, default=None)
    ray_args.add_argument("--cpus-per-worker", type=float, default=None)
    ray_args.add_argument("--job", default=None,
                          help="run name (default: the model name); re-running it resumes")
    p.add_argument("--config", default=None,
                   help="train YAML (default cluster/configs/train.yaml)")
    ray_args.add_argument("--address", default=None,
                          help="Ray cluster to submit to (default: a local embedded one)")
    ray_args.add_argument("--deploy", action="store_true",
                          help="roll serving to the new version (joins the running cluster)")
    p.set_defaults(func=cmd_train)
