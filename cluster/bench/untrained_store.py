"""A store of every family at its default config with random weights, for serving
benchmarks where no trained zoo is at hand: compute per sample is what a trained model of
the same config costs, and nothing is trained.

    python -m cluster.bench.untrained_store /tmp/bench-store
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from services.core.data import load_digits
from services.core.store import ModelStore
from services.models import BUILTIN, build


def main(root: str) -> None:
    store = ModelStore(Path(root))
    data = load_digits()
    x = torch.from_numpy(data.as_float()[:256])
    y = torch.from_numpy(data.labels[:256])  # type: ignore[index]
    for family in sorted(BUILTIN):
        torch.manual_seed(0)
        model = build(family)
        model.prepare(x, y)  # data statistics (class prior, initialisers)
        meta = store.save(family, family=family, config=model.config.to_dict(),
                          state=model.state_dict(), data=data.describe() | {"name": "digits"})
        params = sum(p.numel() for p in model.parameters())
        print(f"{meta.ref:<20} {params:>10,} parameters (untrained)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-store")
