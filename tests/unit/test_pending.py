"""What a call to a model that `genfleet up` is still training gets (services.serving.pending):
UNAVAILABLE saying what is happening, with an estimate and a retry delay, or NOT_FOUND once
its training failed; the status line; the board's round trip."""

from __future__ import annotations

import time

import grpc
import pytest

from services.core.errors import ModelNotFound, ModelNotReady
from services.gateway.status import status_of
from services.serving.pending import PendingModel, parse


def test_training_estimate_comes_from_the_epochs_done_and_is_bounded_by_the_cap() -> None:
    now = time.time()
    row = PendingModel("gan", "gan", phase="training", epoch=10, epochs=40, started=now - 20,
                       cap_s=300)
    assert row.eta_s(now) == pytest.approx(60.0)  # 2 s per epoch, 30 epochs left
    capped = PendingModel("gan", "gan", phase="training", epoch=1, epochs=400,
                          started=now - 20, cap_s=300)
    assert capped.eta_s(now) == pytest.approx(280.0)  # the cap ends it first
    fresh = PendingModel("gan", "gan", phase="training", epochs=40, started=now, cap_s=0)
    assert fresh.eta_s(now) is None  # no epoch yet and no cap: nothing to go by


def test_a_call_to_a_training_model_is_unavailable_with_progress_and_an_estimate() -> None:
    row = PendingModel("flow", "flow", phase="training", epoch=10, epochs=40,
                       started=time.time() - 20, cap_s=300)
    error = row.error_for_call()
    assert isinstance(error, ModelNotReady)
    status = status_of(error)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "flow has no checkpoint yet and is training (epoch 10/40)" in status.message
    assert "about 60 s" in status.message
    assert status.retry_after_s == pytest.approx(60.0, abs=1.0)  # the estimate


def test_a_queued_model_says_what_it_waits_for() -> None:
    row = PendingModel("ebm", "ebm", ahead=["gan"], evaluating="vae", cap_s=300)
    error = row.error_for_call()
    assert isinstance(error, ModelNotReady)
    assert "ebm has no checkpoint yet: it trains after vae's evaluation, gan" in str(error)
    assert "at most 5 min" in str(error)
    assert row.eta_s() == 600  # its own cap and gan's
    assert error.retry_after_s == 600.0  # at most its cap and gan's
    assert "queued after vae's evaluation, gan" in row.line()
    assert "it trains next" in str(PendingModel("ebm", "ebm").error_for_call())


def test_a_model_whose_training_failed_is_not_found_and_says_why() -> None:
    row = PendingModel("ebm", "ebm", phase="failed", error="RuntimeError: out of memory")
    error = row.error_for_call()
    assert isinstance(error, ModelNotFound)
    assert status_of(error).code == grpc.StatusCode.NOT_FOUND
    assert "training failed (RuntimeError: out of memory)" in str(error)
    assert "genfleet train ebm --local --name ebm" in str(error)


def test_a_trained_model_whose_replicas_start_is_retried_shortly() -> None:
    error = PendingModel("vae", "vae", phase="starting", version=3).error_for_call()
    assert isinstance(error, ModelNotReady) and error.retry_after_s == 2.0
    assert "version 3" in str(error)


def test_rows_survive_the_board_round_trip_and_ignore_unknown_keys() -> None:
    row = PendingModel("gan", "gan", phase="training", epoch=3, epochs=9, started=1.0)
    back = parse({"gan": {**row.to_dict(), "from_a_newer_version": 1}})
    assert back["gan"] == row
