"""Generate the Python protobuf/gRPC modules from ``protos/`` into ``services/gateway/pb``.

Run ``python -m services.gateway.codegen`` after editing a ``.proto``; the generated files
are committed, and ``tests/unit/test_protos.py`` fails when they drift from the protos.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUT = Path(__file__).resolve().parent / "pb"
PACKAGE = "services.gateway.pb"


def generate(out: Path = OUT) -> list[Path]:
    """Compile every .proto under protos/ into ``out``; returns the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    written = sorted(p for p in out.rglob("*") if p.suffix in (".py", ".pyi"))
    for path in written:
        text = path.read_text()
        # generated modules import each other as top-level "genfleet.v1"; make it ours
        text = re.sub(r"^from genfleet\.", f"from {PACKAGE}.genfleet.", text, flags=re.M)
        path.write_text(text)
    for directory in {p.parent for p in written} | {out / "genfleet"}:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


def check() -> list[str]:
    """Names of generated files that differ from a fresh generation (empty: in sync)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        names = {p.relative_to(fresh) for p in fresh.rglob("*_pb2*.py*")}
        names |= {p.relative_to(OUT) for p in OUT.rglob("*_pb2*.py*") if "__pycache__" not in p.parts}
        return sorted(str(n) for n in names
                      if not (fresh / n).exists() or not (OUT / n).exists()
                      or (fresh / n).read_bytes() != (OUT / n).read_bytes())


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)
