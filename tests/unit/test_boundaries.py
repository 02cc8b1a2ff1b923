"""Dependency direction: model code imports neither ray nor grpc (DESIGN.md §2); it may use
core's errors and option specs (pure Python, shared with the gateway's validation)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import services.models

MODELS = Path(services.models.__file__).parent
FORBIDDEN = ("ray", "grpc", "google.protobuf", "services.serving", "services.gateway",
             "services.training", "services.evaluation", "cluster")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_model_files_import_no_ray_grpc_or_upper_layers() -> None:
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
            if name.startswith("services."):
                assert name.startswith(("services.models", "services.core.errors",
                                        "services.core.options")), name


def test_importing_every_family_loads_no_ray_or_grpc() -> None:
    code = (
        "import sys\n"
        "from services.models import FAMILIES, model_class\n"
        "for f in FAMILIES: model_class(f)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


SERVICES = MODELS.parent


def _modules_importing(prefixes: tuple[str, ...]) -> set[str]:
    found = set()
    for path in SERVICES.rglob("*.py"):
        if "pb" in path.relative_to(SERVICES).parts:
            continue
        if any(name.startswith(prefixes) for name in _imports(path)):
            found.add(str(path.relative_to(SERVICES.parent)))
    return found


def test_only_serving_imports_ray() -> None:
    offenders = {p for p in _modules_importing(("ray",))
                 if not p.startswith(("services/serving/", "cluster/"))}
    assert not offenders, offenders


def test_only_the_gateway_imports_generated_protobuf_code() -> None:
    offenders = {p for p in _modules_importing(("services.gateway.pb",))
                 if not p.startswith("services/gateway/")}
    assert not offenders, offenders


def test_core_options_and_validation_import_nothing_heavy() -> None:
    """The validation every request goes through runs in the gateway: no torch, ray, grpc."""
    code = (
        "import sys\n"
        "import services.core.validation, services.core.options\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'grpc')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
