"""``genfleet k8s-serve-config``: regenerate (or ``--check``) the KubeRay RayService
serveConfigV2 patches in deploy/k8s from the serve YAML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_k8s_serve_config(args: argparse.Namespace) -> int:
    from services.serving import kube

    changed = kube.regenerate(Path(args.dir), Path(args.config) if args.config else None,
                              check=args.check)
    if args.check:
        for path in changed:
            print(f"stale: {path} (run genfleet k8s-serve-config)", file=sys.stderr)
        return 1 if changed else 0
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("serveConfigV2 patches are up to date")
    return 0


def add_parsers(sub: Any) -> None:
    from services.serving.config import DEFAULT_CONFIG

    repo = DEFAULT_CONFIG.parents[2]
    p = sub.add_parser("k8s-serve-config",
                       help="regenerate deploy/k8s serveConfigV2 patches from the serve YAML")
    p.add_argument("--dir", default=str(repo / "deploy" / "k8s"))
    p.add_argument("--config", default=None, help="serve YAML (default cluster/configs/serve.yaml)")
    p.add_argument("--check", action="store_true", help="only report stale patches (exit 1)")
    p.set_defaults(func=cmd_k8s_serve_config)
