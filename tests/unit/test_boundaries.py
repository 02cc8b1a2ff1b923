"""The dependency rules of DESIGN.md §2 and the layout, enforced on the source (AST):

- packages depend one way: core <- models <- evaluation <- training, models <- serving,
  core <- gateway, and ``cluster`` (jobs, benchmarks, the CLI) on top; ``services`` never
  imports ``cluster``, and ``core`` never imports ``models`` (the store returns metadata
  and tensors; ``services.models.load_model`` builds the model);
- model code imports neither ray nor grpc, and of ``core`` only errors, option specs and
  the store; only ``serving`` and ``cluster`` import ray; only the gateway imports the
  generated protobuf code;
- no circle between modules, counting imports inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import services.models

SERVICES = Path(services.models.__file__).parents[1]
REPO = SERVICES.parent
MODELS = SERVICES / "models"

# package -> the packages it may import (besides itself and third-party code)
CORE, MODELS_PKG, EVALUATION, TRAINING, SERVING, GATEWAY = (
    "services.core", "services.models", "services.evaluation", "services.training",
    "services.serving", "services.gateway")
SERVICE_PACKAGES = {CORE, MODELS_PKG, EVALUATION, TRAINING, SERVING, GATEWAY}
ALLOWED: dict[str, set[str]] = {
    CORE: set(),
    MODELS_PKG: {CORE},
    EVALUATION: {CORE, MODELS_PKG},
    TRAINING: {CORE, MODELS_PKG, EVALUATION},
    SERVING: {CORE, MODELS_PKG},
    GATEWAY: {CORE},  # it gets its backend injected: the gateway only translates
    "cluster.train": {CORE, MODELS_PKG, TRAINING, SERVING},
    "cluster.batch": {CORE, MODELS_PKG, SERVING},
    "cluster.bench": SERVICE_PACKAGES | {"cluster.batch", "cluster.train"},
    "cluster.cli": SERVICE_PACKAGES | {"cluster.batch", "cluster.bench", "cluster.train"},
}


def _sources() -> Iterator[tuple[str, Path]]:
    """(module name, path) of every project module outside generated code."""
    for top in ("services", "cluster"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            if "pb" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from pkg import module``: an edge to the module itself
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


MODULES = dict(_sources())


def test_packages_depend_one_way() -> None:
    assert set(map(_package, MODULES)) - {"services", "cluster"} <= set(ALLOWED), \
        "a new package needs its row in ALLOWED"
    offenders = []
    for module, path in MODULES.items():
        own = _package(module)
        for name in _imports(path):
            if name.split(".")[0] not in ("services", "cluster") or name in ("services", "cluster"):
                continue
            target = _package(name)
            if target != own and target not in ALLOWED.get(own, set()):
                offenders.append(f"{module} imports {name}")
    assert not offenders, "\n".join(sorted(offenders))


def test_services_never_import_cluster_and_core_never_imports_models() -> None:
    for module, path in MODULES.items():
        for name in _imports(path):
            if module.startswith("services"):
                assert not name.startswith("cluster"), f"{module} imports {name}"
            if module.startswith(CORE):
                assert not name.startswith(("services.models", "services.serving",
                                            "services.gateway", "services.training",
                                            "services.evaluation")), f"{module} imports {name}"


def test_no_circle_between_modules() -> None:
    graph = {m: {n for n in _imports(p) if n in MODULES and n != m} for m, p in MODULES.items()}
    # Tarjan's strongly connected components: a component of two or more is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


FORBIDDEN_IN_MODELS = ("ray", "grpc", "google.protobuf", "services.serving", "services.gateway",
                       "services.training", "services.evaluation", "cluster")


def test_model_files_import_no_ray_grpc_or_upper_layers() -> None:
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN_IN_MODELS), f"{path.name} imports {name}"
            if name.startswith("services.") and not name.startswith("services.models"):
                assert name.startswith(("services.core.errors", "services.core.options",
                                        "services.core.store")), f"{path.name} imports {name}"


def _loads_none_of(code: str, forbidden: set[str]) -> None:
    """Run ``code`` in a fresh interpreter; fail if it loaded any ``forbidden`` package."""
    check = (f"import sys\n{code}\n"
             f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & {forbidden!r})\n"
             "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_importing_every_family_loads_no_ray_or_grpc() -> None:
    _loads_none_of("from services.models import FAMILIES, model_class\n"
                   "for f in FAMILIES: model_class(f)", {"ray", "grpc"})


def _modules_importing(prefix: str) -> set[str]:
    return {m for m, p in MODULES.items()
            if any(n == prefix or n.startswith(prefix + ".") for n in _imports(p))}


def test_only_serving_and_cluster_import_ray() -> None:
    offenders = {m for m in _modules_importing("ray")
                 if not m.startswith((SERVING, "cluster"))}
    assert not offenders, offenders


def test_only_the_gateway_imports_generated_protobuf_code() -> None:
    offenders = {m for m in _modules_importing("services.gateway.pb")
                 if not m.startswith(GATEWAY)}
    assert not offenders, offenders


def test_the_gateway_side_of_serving_imports_no_ray_or_torch() -> None:
    """``Backend`` (what the gateway calls) and the gateway's own modules stay light; Ray
    enters the gateway process only through ``ServeBackend``, and torch not at all."""
    _loads_none_of("import services.serving.backend, services.gateway.grpc_server, "
                   "services.gateway.codec", {"torch", "ray"})
    _loads_none_of("import services.serving.serve_backend", {"torch"})


def test_core_options_and_validation_import_nothing_heavy() -> None:
    """The validation every request goes through runs in the gateway: no torch, ray, grpc."""
    _loads_none_of("import services.core.validation, services.core.options, "
                   "services.core.batch", {"torch", "ray", "grpc"})
