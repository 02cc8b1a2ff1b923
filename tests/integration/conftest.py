"""One local Ray cluster per test session (explicit logical CPUs, no dashboard)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray
    from ray import serve
    from ray.serve.config import ProxyLocation

    # 2 physical cores: replicas take 0.25 logical CPU each; Ray's own actors need headroom
    os.environ["GENFLEET_LANE_HOST"] = "127.0.0.1"  # replicas' lanes: loopback only
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(proxy_location=ProxyLocation.Disabled)
    yield
    serve.shutdown()
    ray.shutdown()
