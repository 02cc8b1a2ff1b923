"""The ``genfleet`` command line.

Model zoo: ``train`` (a Ray Train job, or in-process with ``--local``), ``eval``, ``models``, ``zoo`` (train
every family that has no checkpoint yet, evaluate all, write grids and a report).
Serving (``services.cli_serve``): ``up``, ``down``, ``status``, ``scale``, ``deploy``,
``generate``, ``score``, ``bench``. Batch datasets (``services.cli_batch``): ``batch``.
Kubernetes (``services.cli_kube``): ``gateway``, ``k8s-serve-config``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.core.errors import CheckpointError, GenfleetError, InvalidArgument

log = logging.getLogger("genfleet")


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument("--set", f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or max(1, min(os.cpu_count() or 1, 8)))


def _store(args: argparse.Namespace) -> Any:
    from services.core.store import ModelStore

    return ModelStore(args.store)


# --------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    if not args.local:
        return _train_on_ray(args)
    from services.training.recipes import train_and_save

    _threads(args.threads)
    train_overrides = {"epochs": args.epochs, "max_minutes": args.minutes,
                       "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    checkpoint, result = train_and_save(
        args.family, store=_store(args), name=args.name, data_spec=args.data or "digits",
        config_overrides=_parse_sets(args.set), train_overrides=train_overrides,
        evaluate=not args.no_eval, eval_samples=args.eval_samples, progress=not args.quiet,
    )
    print(f"trained {checkpoint.ref} ({checkpoint.family}) in {result.seconds:.0f} s, "
          f"{result.steps} steps, {result.samples_per_second:.0f} samples/s -> {checkpoint.path}")
    if checkpoint.metrics:
        print(_format_metrics(checkpoint.metrics))
    return 0


def _train_on_ray(args: argparse.Namespace) -> int:
    """``genfleet train FAMILY --workers N``: a Ray Train job, then export (and deploy)."""
    from cluster.train import job
    from services.serving import app as serving

    if args.minutes is not None:
        raise InvalidArgument("--minutes", "only with --local; bound a Ray job with --epochs")
    train = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                               ("lr", args.lr), ("seed", args.seed)) if v is not None}
    spec = job.spec_from_config(
        args.family, path=args.config, name=args.name, job=args.job, data=args.data,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, model=_parse_sets(args.set), train=train)
    store = _store(args)
    if args.address or args.deploy:  # a running cluster (`auto`: the one `genfleet up` runs)
        serving.connect(args.address)
    else:
        needed = spec.workers * spec.cpus_per_worker + 1  # + the train controller
        serving.start_cluster(None, num_cpus=max(4, int(needed + 0.999)))
    print(f"job {spec.job}: {spec.family} on {spec.workers} worker(s) "
          f"({spec.cpus_per_worker} CPU, {spec.gpus_per_worker} GPU each), data {spec.data}; "
          f"runs in {job.storage_path(store.root) / spec.job}", flush=True)
    result = job.run(spec, store, evaluate=not args.no_eval, eval_samples=args.eval_samples,
                     progress=not args.quiet)
    print(job.describe(result))
    if result.metrics:
        print(_format_metrics(result.metrics))
    if args.deploy:
        name, version = result.ref.split("@")
        serving.rollout(store, name, int(version))
        print(f"{name} now serves version {version}")
    return 0


def _format_metrics(metrics: dict[str, Any]) -> str:
    keys = ("fd_ratio", "min_class_share", "mean_confidence", "label_accuracy",
            "test_bits_per_dim", "init_fd_ratio", "sample_ms")
    return "  ".join(f"{k}={metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))


def cmd_eval(args: argparse.Namespace) -> int:
    from services.core import data as datasets
    from services.core.store import load_model
    from services.evaluation.report import evaluate_model, write_grid

    _threads(args.threads)
    store = _store(args)
    model, meta = load_model(store, args.model)
    splits = datasets.split(datasets.load(meta.data.get("name") or "digits"))
    report = evaluate_model(model, splits, store=store, num_samples=args.num_samples,
                            seed=args.seed, progress=not args.quiet, **_parse_sets(args.set))
    print(f"{meta.ref} ({meta.family}), {args.num_samples} samples")
    print(report.table())
    for line in report.text_samples:
        print(repr(line))
    if splits.train.kind == "image":
        out = Path(args.out or f"{meta.name}-v{meta.version}.png")
        write_grid(model, out, title=f"{meta.family} {meta.ref}", **_parse_sets(args.set))
        print(f"grid: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    if args.save:
        store.update_metrics(meta.ref, report.to_json())
    return 0


def _served_models(args: argparse.Namespace) -> int:
    from services.cli_serve import _client

    with _client(args) as client:
        models = client.list_models()
    print(f"{'model':<18}{'family':<16}{'version':>8}  capabilities / options")
    for m in models:
        options = ", ".join(o.name for o in m.sampler_options) or "-"
        print(f"{m.name:<18}{m.family:<16}{m.version:>8}  {', '.join(m.capabilities)} / {options}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.served:
        return _served_models(args)
    store = _store(args)
    names = store.names()
    if not names:
        print(f"no models in {store.root}")
        return 0
    print(f"{'model':<18}{'family':<16}{'versions':<10}{'data':<12}{'fd/floor':<10}bits/dim")
    broken: list[str] = []
    for name in names:
        versions = store.versions(name)
        for version in versions:  # checksums too: this is where an operator looks
            broken.extend(store.problems(name, version, checksum=True))
        try:
            meta = store.meta(name)
        except CheckpointError:
            print(f"{name:<18}{'?':<16}{len(versions):<10}(every version is broken)")
            continue
        m = meta.metrics
        fd = f"{m['fd_ratio']:.2f}" if "fd_ratio" in m else "-"
        bpd = f"{m['test_bits_per_dim']:.3f}" if "test_bits_per_dim" in m else "-"
        print(f"{meta.ref:<18}{meta.family:<16}{len(versions):<10}"
              f"{meta.data.get('name', '?'):<12}{fd:<10}{bpd}")
    for problem in broken:
        print(f"broken: {problem}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    """Train every family that has no checkpoint yet; evaluate all; grids + report."""
    from services.core import data as datasets
    from services.core.errors import ModelNotFound
    from services.core.store import load_model
    from services.evaluation.report import evaluate_model, write_grid
    from services.models import FAMILIES
    from services.training.recipes import train_and_save

    _threads(args.threads)
    store = _store(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = args.families or sorted(FAMILIES)
    splits = datasets.split(datasets.load(args.data))
    results: dict[str, Any] = {}
    for family in families:
        try:
            meta = store.meta(family)
            print(f"[{family}] using {meta.ref} from {store.root}")
        except ModelNotFound:
            print(f"[{family}] no checkpoint: training (budget {args.minutes} min)")
            meta, _ = train_and_save(family, store=store, data_spec=args.data,
                                     train_overrides={"max_minutes": args.minutes},
                                     evaluate=False, progress=not args.quiet)
        model, meta = load_model(store, meta.ref)
        report = evaluate_model(model, splits, store=store, num_samples=args.num_samples,
                                progress=not args.quiet)
        store.update_metrics(meta.ref, report.to_json())
        grid = write_grid(model, out / f"{family}.png",
                          title=f"{meta.ref}  FD/floor {report.fd_ratio or 0:.2f}")
        print(report.table())
        print(f"grid: {grid}\n")
        results[family] = {"model": meta.ref, "training": meta.training, **report.to_json()}
    (out / "report.json").write_text(json.dumps(results, indent=2))
    print(_zoo_table(results))
    print(f"\nreport: {out / 'report.json'}")
    return 0


def _zoo_table(results: dict[str, Any]) -> str:
    head = (f"{'family':<16}{'FD/floor':>9}{'min share':>10}{'conf':>7}{'bits/dim':>10}"
            f"{'ms/sample':>10}{'train s':>9}")
    lines = [head, "-" * len(head)]
    for family, r in results.items():
        bpd = r.get("test_bits_per_dim")
        lines.append(
            f"{family:<16}{r.get('fd_ratio', float('nan')):>9.2f}"
            f"{r.get('min_class_share', float('nan')):>10.3f}"
            f"{r.get('mean_confidence', float('nan')):>7.3f}"
            f"{(f'{bpd:.3f}' if bpd is not None else '-'):>10}"
            f"{r['sample_ms']:>10.2f}{r['training'].get('seconds', float('nan')):>9.0f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfleet", description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=None,
                        help="model store directory (default $GENFLEET_STORE or ~/.genfleet/store)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model family (Ray Train job, or --local) and "
                                     "store a new version")
    p.add_argument("family")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--data", default=None, help="data spec (digits, mnist:DIR, ...)")
    p.add_argument("--name", default=None, help="model name in the store (default: family)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget (--local)")
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
    ray_args.add_argument("--config", default=None,
                          help="train YAML (default cluster/configs/train.yaml)")
    ray_args.add_argument("--address", default=None,
                          help="Ray cluster to submit to (default: a local embedded one)")
    ray_args.add_argument("--deploy", action="store_true",
                          help="roll serving to the new version (joins the running cluster)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="quality report of a stored model")
    p.add_argument("model", help="name or name@version")
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="sampler option (repeatable), e.g. --set steps=10")
    p.add_argument("--out", default=None, help="PNG grid path")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--save", action="store_true", help="store the metrics in the checkpoint")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("models", help="list stored models (--served: ask the gateway)")
    p.add_argument("--served", action="store_true", help="ListModels through the gateway")
    from services.cli_serve import _client_args

    _client_args(p)
    p.set_defaults(func=cmd_models)

    from services.cli_batch import add_parsers as add_batch
    from services.cli_kube import add_parsers as add_kube
    from services.cli_serve import add_parsers

    add_parsers(sub)
    add_batch(sub)
    add_kube(sub)

    p = sub.add_parser("zoo", help="train (if needed) and evaluate all six families")
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--data", default="digits")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="wall-time cap per family (the default schedules finish in about 4)")
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--out", default="zoo-report", help="directory for grids and report.json")
    p.set_defaults(func=cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        code: int = args.func(args)
    except GenfleetError as exc:
        print(f"genfleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genfleet: interrupted", file=sys.stderr)
        return 130
    log.debug("done in %.1f s", time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
