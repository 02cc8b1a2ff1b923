"""Shared fixtures: tiny configs for every family, small seeded data, a throw-away PKI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import trustme

# family -> config overrides small enough for a fast contract test on CPU
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "autoregressive": {"embed": 16, "layers": 1, "heads": 2, "dropout": 0.0},
    "diffusion": {"base_width": 8, "layers_per_block": 1, "sampling_steps": 3,
                  "num_train_steps": 50},
    "ebm": {"width": 4, "langevin_steps": 3},
    "flow": {"transforms": 2, "hidden": [16]},
    "gan": {"width": 8, "latent_dim": 4, "embed_dim": 4},
    "vae": {"width": 4, "hidden": 16, "latent_dim": 3, "kl_warmup_steps": 0},
}


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Six real digits as (x in [0, 1] on the 17-level grid, labels)."""
    from services.core.data import load_digits

    data = load_digits()
    x = torch.from_numpy(data.as_float()[:6])
    y = torch.from_numpy(data.labels[:6])  # type: ignore[index]
    return x, y


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    out = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@genfleet")
    paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server.key",
             "client_cert": out / "client.pem", "client_key": out / "client.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    return paths
