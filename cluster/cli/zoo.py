"""``genfleet zoo``: train every family that has no checkpoint yet, evaluate all, write
their grids and a report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cluster.cli.common import open_store, threads


def cmd_zoo(args: argparse.Namespace) -> int:
    """Train every family that has no checkpoint yet; evaluate all; grids + report."""
    from services.core import data as datasets
    from services.core.errors import ModelNotFound
    from services.evaluation.report import evaluate_model, write_grid
    from services.models import BUILTIN, load_model
    from services.training.recipes import train_and_save

    threads(args.threads)
    store = open_store(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = args.families or sorted(BUILTIN)
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


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("zoo", help="train (if needed) and evaluate all six families")
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--data", default="digits")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="wall-time cap per family (the default schedules finish in about 4)")
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--out", default="zoo-report", help="directory for grids and report.json")
    p.set_defaults(func=cmd_zoo)
