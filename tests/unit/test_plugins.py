"""Plugin families (entry point group ``genfleet.families``): discovery and its errors,
and the example plugin kept under tests/plugins (installed by .ci/run) trained, evaluated,
listed, served through a real gateway and called over gRPC and OIP v2. It also meets the
whole model contract: tests/unit/test_contract.py runs over every installed family."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import services.models as models
from cluster.cli.main import main as genfleet
from services.core.errors import InvalidArgument
from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.models import BUILTIN, PLUGIN_GROUP, discover, model_class
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread

PLUGIN = "factorized"
INSTALLED = importlib.util.find_spec("genfleet_plugin_example") is not None
needs_plugin = pytest.mark.skipif(
    not INSTALLED, reason="the example plugin is not installed: "
                          "pip install -e tests/plugins/genfleet-plugin-example (.ci/run does)")


def _entry(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=PLUGIN_GROUP)


# ------------------------------------------------------------------ discovery
def test_a_plugin_named_like_a_built_in_is_ignored_with_one_clear_problem() -> None:
    found, where, problems = discover([_entry("gan", "evil.gan:GAN"),
                                       _entry("mine", "pkg.mine:Mine"),
                                       _entry("mine", "other.mine:Mine"),
                                       _entry("bad", "no_colon_here")])
    assert found == {"mine": ("pkg.mine", "Mine")} and "mine = pkg.mine:Mine" in where["mine"]
    assert len(problems) == 3
    assert "'gan = evil.gan:GAN'" in problems[0] and "built-in" in problems[0]
    assert "registered twice" in problems[1] and "'bad = no_colon_here'" in problems[2]
    # the built-ins are untouched by any of it
    assert all(model_class(f).family == f for f in BUILTIN)


@pytest.mark.parametrize(("target", "message"), [
    (("genfleet_no_such_module", "Model"), "failed to load from entry point 'broken = "
                                           "genfleet_no_such_module:Model'"),
    (("json", "dumps"), "is not a services.models.GenerativeModel subclass"),
    (("services.models.gan", "GANModel"), "its class says family = 'gan'"),
])
def test_a_broken_plugin_fails_alone_naming_its_entry_point(
        monkeypatch: pytest.MonkeyPatch, target: tuple[str, str], message: str) -> None:
    monkeypatch.setitem(models.FAMILIES, "broken", target)
    monkeypatch.setitem(models._PLUGIN_SOURCES, "broken", f"entry point 'broken = "
                                                          f"{target[0]}:{target[1]}'")
    with pytest.raises(InvalidArgument, match=message):
        model_class("broken")
    assert model_class("vae").family == "vae"  # the others still load


def test_the_cli_lists_families_with_their_source_and_problems(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(models, "PLUGIN_PROBLEMS", ["entry point 'gan = x:Y': ignored"])
    assert genfleet(["models", "--families"]) == 0
    out = capsys.readouterr().out
    for family in BUILTIN:
        assert family in out
    assert "built-in" in out and "entry point 'gan = x:Y': ignored" in out
    if INSTALLED:
        assert f"{PLUGIN}" in out and "genfleet-plugin-example" in out


# ------------------------------------------------------------------ the example plugin
@pytest.fixture(scope="module")
def plugin_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not INSTALLED:
        pytest.skip("the example plugin is not installed")
    root = tmp_path_factory.mktemp("plugin-store")
    assert genfleet(["--store", str(root), "-q", "train", PLUGIN, "--local", "--epochs", "3",
                     "--eval-samples", "200"]) == 0
    return root


@needs_plugin
def test_the_plugin_trains_and_evaluates_through_the_cli(plugin_store: Path,
                                                         tmp_path: Path) -> None:
    meta = ModelStore(plugin_store).meta(PLUGIN)
    assert meta.family == PLUGIN and meta.version == 1
    assert meta.metrics["test_bits_per_dim"] > 0
    assert genfleet(["--store", str(plugin_store), "-q", "eval", PLUGIN, "-n", "200",
                     "--out", str(tmp_path / "grid.png"), "--json",
                     str(tmp_path / "report.json")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.fixture(scope="module")
def plugin_gateway(plugin_store: Path) -> Iterator[GatewayThread]:
    thread = GatewayThread(lambda: InProcessBackend(plugin_store, [PLUGIN]),
                           GatewayConfig(host="127.0.0.1", port=0, http_port=0))
    yield thread
    thread.stop()


@needs_plugin
def test_the_plugin_serves_over_grpc_and_oip(plugin_gateway: GatewayThread) -> None:
    import tritonclient.grpc as tgrpc

    with GenfleetClient(plugin_gateway.target, retries=0, timeout=60) as client:
        (info,) = client.list_models()
        assert info.family == PLUGIN and "log_prob" in info.capabilities
        assert [o.name for o in info.sampler_options] == ["temperature"]
        one = client.generate(PLUGIN, 6, seed=3, labels=[0, 1, 2, 3, 4, 5])
        again = client.generate(PLUGIN, 6, seed=3, labels=[0, 1, 2, 3, 4, 5])
        assert one.samples is not None and again.samples is not None
        assert one.samples.tobytes() == again.samples.tobytes()
        assert one.samples.shape == (6, 1, 8, 8)
        score = client.score(PLUGIN, one.samples)
        assert score.kind == "exact" and all(np.isfinite(score.log_prob))
    v2 = tgrpc.InferenceServerClient(plugin_gateway.target)
    seed = tgrpc.InferInput("SEED", [1], "UINT64")
    seed.set_data_from_numpy(np.array([3], np.uint64))
    out = v2.infer(PLUGIN, [seed])
    assert out.as_numpy("SAMPLES").shape == (1, 1, 8, 8)
    assert v2.get_model_metadata(f"{PLUGIN}.score", as_json=True)["platform"] == \
        f"genfleet_{PLUGIN}"
    v2.close()
