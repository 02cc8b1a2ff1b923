"""``genfleet models`` (stored versions, or what the gateway serves) and ``genfleet eval``
(a stored model's quality report and sample grid)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cluster.cli.common import client, client_args, open_store, parse_sets, threads
from services.core.errors import CheckpointError, InvalidArgument


def cmd_eval(args: argparse.Namespace) -> int:
    from services.core import data as datasets
    from services.evaluation.report import evaluate_model, write_grid
    from services.models import load_model

    threads(args.threads)
    store = open_store(args)
    model, meta = load_model(store, args.model)
    spec = args.data or meta.data.get("name")
    if not spec:
        raise InvalidArgument("data", f"{meta.ref} records no training data (an imported "
                                      f"model?): pass --data SPEC, e.g. --data cifar10:DIR")
    data = datasets.load(spec)
    _check_fits(model, data)
    splits = datasets.split(data)
    report = evaluate_model(model, splits, store=store, num_samples=args.num_samples,
                            seed=args.seed, progress=not args.quiet, **parse_sets(args.set))
    print(f"{meta.ref} ({meta.family}), {args.num_samples} samples")
    print(report.table())
    for line in report.text_samples:
        print(repr(line))
    if splits.train.kind == "image":
        out = Path(args.out or f"{meta.name}-v{meta.version}.png")
        write_grid(model, out, title=f"{meta.family} {meta.ref}", **parse_sets(args.set))
        print(f"grid: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    if args.save:
        store.update_metrics(meta.ref, report.to_json())
    return 0


def _check_fits(model: Any, data: Any) -> None:
    """The data a model is evaluated on or imported for has its shape and levels."""
    if tuple(data.shape) != tuple(model.data_shape) or data.levels != model.config.levels:
        raise InvalidArgument("data", f"{data.name} is {tuple(data.shape)} with {data.levels} "
                                      f"levels; the model is {tuple(model.data_shape)} with "
                                      f"{model.config.levels} levels")


def cmd_import(args: argparse.Namespace) -> int:
    """Write a model trained elsewhere into the store as a new version of ``--name``."""
    import torch

    from services.core import data as datasets
    from services.models.importers import diffusers_pipeline

    store = open_store(args)
    model = diffusers_pipeline(Path(args.directory), null_label=args.null_label,
                               levels=args.levels, sampling_steps=args.steps,
                               invariant_batch=args.invariant_batch)
    described: dict[str, Any] = {}
    if args.data:
        data = datasets.load(args.data)
        _check_fits(model, data)
        if data.labels is not None and model.config.num_classes:
            if data.num_classes != model.config.num_classes:
                raise InvalidArgument("data", f"{data.name} has {data.num_classes} classes; "
                                              f"the UNet {model.config.num_classes}")
            model.prepare(torch.empty(0), torch.from_numpy(data.labels))  # the class prior
        described = data.describe()
    meta = store.save(args.name, family=model.family, config=model.config.to_dict(),
                      state=model.state_dict(), data=described,
                      training={"imported": args.format, "source": str(Path(args.directory)
                                                                       .resolve())})
    c = model.config
    conditional = (f"{c.num_classes} classes, guidance {'on' if c.null_label else 'off (no null label)'}"
                   if c.num_classes else "unconditional")
    params = sum(p.numel() for p in model.parameters())
    print(f"imported {meta.ref}: diffusion {c.channels}x{c.image_size}x{c.image_size}, "
          f"{conditional}, {params:,} parameters, {c.num_train_steps} train steps, "
          f"{c.prediction_type} prediction")
    print(f"serve it: genfleet up --models {args.name}")
    return 0


def _served_models(args: argparse.Namespace) -> int:
    with client(args) as gateway:
        models = gateway.list_models()
    print(f"{'model':<18}{'family':<16}{'version':>8}  capabilities / options")
    for m in models:
        options = ", ".join(o.name for o in m.sampler_options) or "-"
        print(f"{m.name:<18}{m.family:<16}{m.version:>8}  {', '.join(m.capabilities)} / {options}")
    return 0


def _families() -> int:
    """Every family this installation knows, where it comes from, and plugin problems."""
    from services import models
    from services.core.errors import InvalidArgument

    print(f"{'family':<16}{'capabilities':<46}source")
    for family in sorted(models.FAMILIES):
        try:
            capabilities = ", ".join(sorted(c.value for c in models.model_class(family).capabilities))
        except InvalidArgument as exc:  # a plugin that does not load: listed, with why
            capabilities = f"(does not load: {exc})"
        print(f"{family:<16}{capabilities:<46}{models.family_source(family)}")
    for problem in models.PLUGIN_PROBLEMS:
        print(f"plugin problem: {problem}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.families:
        return _families()
    if args.served:
        return _served_models(args)
    store = open_store(args)
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


def add_parsers(sub: Any) -> None:
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

    p.add_argument("--data", default=None,
                   help="data spec to evaluate against (default: the model's training data)")

    p = sub.add_parser("import", help="store a model trained elsewhere (a diffusers pipeline)")
    p.add_argument("format", choices=["diffusers"])
    p.add_argument("directory", help="pipeline directory (DDPMPipeline.save_pretrained layout)")
    p.add_argument("--name", required=True, help="model name in the store")
    p.add_argument("--null-label", action="store_true",
                   help="class-conditional UNet: its last class embedding is the "
                        "unconditional label (enables classifier-free guidance)")
    p.add_argument("--levels", type=int, default=256, help="values per pixel (8-bit: 256)")
    p.add_argument("--steps", type=int, default=20, help="default solver steps of a call")
    p.add_argument("--invariant-batch", type=int, default=8,
                   help="the UNet runs on chunks of N rows so a sample's bits do not depend "
                        "on its batch-mates (0: off; faster for single samples)")
    p.add_argument("--data", default=None,
                   help="data spec it models (checked against its shape; recorded for eval; "
                        "its labels give the class prior)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("models", help="list stored models (--served: ask the gateway)")
    p.add_argument("--served", action="store_true", help="ListModels through the gateway")
    p.add_argument("--families", action="store_true",
                   help="the families this installation knows: built-in and plugins "
                        "(entry point group genfleet.families)")
    client_args(p)
    p.set_defaults(func=cmd_models)
