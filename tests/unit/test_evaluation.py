"""Evaluation pieces: the Fréchet distance formula, grids, the report table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.evaluation.fid import frechet_distance
from services.evaluation.grid import save_grid
from services.evaluation.report import QualityReport


def test_frechet_distance_matches_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(m, 4 I): |m|^2 + tr(I + 4I - 2 * 2I) = |m|^2 + 4
    b = rng.normal(size=(20000, 4)) * 2 + np.array([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(5.0 + 4.0, rel=0.03)
    with pytest.raises(ValueError, match="equal F"):
        frechet_distance(a, b[:, :3])


def test_grid_is_an_enlarged_png(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((20, 1, 8, 8))
    path = save_grid(images, tmp_path / "g.png", ncols=10, scale=6, title="t",
                     row_labels=["0", "1"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 10 * 8 * 6 and im.height > 2 * 8 * 6


def test_report_table_puts_samples_next_to_real_data() -> None:
    report = QualityReport(family="gan", num_samples=10, sample_ms=0.5, batch_size=10, fd=20.0,
                           fd_floor=10.0, fd_ratio=2.0, class_share=[0.5, 0.5],
                           min_class_share=0.5, mean_confidence=0.9,
                           real_class_share=[0.4, 0.6], real_mean_confidence=0.99)
    table = report.table()
    assert "FD / floor" in table and "2.00" in table and "0.400" in table
    assert "test bits/dim" not in table
    assert report.to_json()["fd_ratio"] == 2.0
