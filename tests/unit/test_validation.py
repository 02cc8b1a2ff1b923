"""services.core.validation and the codec's wire checks: every hostile value is
INVALID_ARGUMENT naming its field, every cap is checked before any work."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.core import api, validation
from services.core.errors import InvalidArgument, UnsupportedOperation
from services.core.options import OptionSpec, resolve_options
from services.gateway import codec
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb

STEPS = OptionSpec("int", 20, "solver steps", min=1, max=1000, cost=True)
TOP_K = OptionSpec("int", 0, "top k", min=0, max=65536)
TEMP = OptionSpec("float", 1.0, "temperature", min=0.0, max=2.0)
SAMPLER = OptionSpec("str", "ddim", "solver", choices=("ddim", "dpmsolver++"))


def _info(**limits: int) -> api.ModelInfo:
    return api.ModelInfo(
        name="m", family="diffusion", version=1,
        capabilities=("conditional", "decode", "encode", "log_prob", "sample"),
        sample_shape=(1, 8, 8), sample_dtype="float32", levels=17,
        classes=tuple(str(i) for i in range(10)), data_kind="image",
        sampler_options=(api.OptionInfo("steps", STEPS), api.OptionInfo("top_k", TOP_K),
                         api.OptionInfo("temperature", TEMP), api.OptionInfo("sampler", SAMPLER)),
        score_options=(api.OptionInfo("timesteps", STEPS),), score_kind="lower_bound",
        latent_shape=(1, 8, 8), limits=api.Limits(**limits))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e300, -1.0, 2.5, "7", True])
@pytest.mark.parametrize("spec", [STEPS, TOP_K], ids=["steps", "top_k"])
def test_int_options_reject_nan_inf_huge_fractional_and_wrong_types(spec: OptionSpec,
                                                                     value: object) -> None:
    with pytest.raises(InvalidArgument, match=r"^options\.x: "):
        resolve_options({"x": spec}, {"x": value})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 3.0, "hot"])
def test_float_options_reject_non_finite_and_out_of_range(value: object) -> None:
    with pytest.raises(InvalidArgument, match=r"^options\.t: "):
        resolve_options({"t": TEMP}, {"t": value})


def test_error_messages_never_echo_a_huge_input() -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_options({"s": SAMPLER}, {"s": "x" * 1_000_000})
    assert len(str(info.value)) < 300
    with pytest.raises(InvalidArgument) as info:
        resolve_options({"s": SAMPLER}, {"y" * 1_000_000: 1.0})
    assert len(str(info.value)) < 300
    with pytest.raises(InvalidArgument, match="at most 64 entries"):
        resolve_options({"s": SAMPLER}, {str(i): 1.0 for i in range(65)})


def test_generate_is_checked_and_resolved_once() -> None:
    req = validation.check_generate(api.GenerateRequest("m", 4, seed=1, labels=(1, 2, 3, 4),
                                                        options={"steps": 5.0}), _info())
    assert req.options == {"steps": 5, "top_k": 0, "temperature": 1.0, "sampler": "ddim"}
    assert isinstance(req.options["steps"], int)
    assert validation.check_generate(req, _info()) == req  # idempotent: a replica re-checks


@pytest.mark.parametrize(("request_", "field"), [
    (api.GenerateRequest("m", 0), "num_samples"),
    (api.GenerateRequest("m", 257), "num_samples"),
    (api.GenerateRequest("m", -5), "num_samples"),
    (api.GenerateRequest("m", 2, seed=-1), "seed"),
    (api.GenerateRequest("m", 2, seed=2**64), "seed"),
    (api.GenerateRequest("m", 2, start_index=2**62), "start_index"),
    (api.GenerateRequest("m", 2, labels=(1,)), "labels"),
    (api.GenerateRequest("m", 2, labels=(1, 10)), "labels"),
    (api.GenerateRequest("m", 2, labels=(-1, 0)), "labels"),
    (api.GenerateRequest("m", 2, options={"steps": math.nan}), "options.steps"),
    (api.GenerateRequest("m", 2, options={"bogus": 1.0}), "options.bogus"),
    (api.GenerateRequest("m", 2, output="jpeg"), "output"),  # type: ignore[arg-type]
])
def test_bad_generate_fields_are_invalid_argument(request_: api.GenerateRequest,
                                                  field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.check_generate(request_, _info())
    assert info.value.field == field


def test_the_compute_budget_counts_options_that_multiply_work() -> None:
    info = _info(max_work_per_request=1000)
    validation.check_generate(api.GenerateRequest("m", 50, options={"steps": 20}), info)
    with pytest.raises(InvalidArgument, match=r"num_samples x steps = 1020 exceeds "
                                              r"max_work_per_request=1000"):
        validation.check_generate(api.GenerateRequest("m", 51, options={"steps": 20}), info)
    with pytest.raises(InvalidArgument, match="max_work_per_request=1000"):
        validation.check_score(api.ScoreRequest("m", np.zeros((2, 1, 8, 8), np.float32),
                                                options={"timesteps": 501}), info)


def test_streams_have_their_own_cap_and_a_budget_per_message() -> None:
    info = _info(max_samples_per_request=16, max_samples_per_stream=1000)
    ok = validation.check_generate(api.GenerateRequest("m", 1000), info, chunk=16)
    assert ok.num_samples == 1000
    with pytest.raises(InvalidArgument, match=r"\[1, 1000\] \(max_samples_per_stream"):
        validation.check_generate(api.GenerateRequest("m", 2**31 - 1), info, chunk=1)
    with pytest.raises(InvalidArgument, match="chunk_size"):
        validation.check_generate(api.GenerateRequest("m", 100), info, chunk=17)
    with pytest.raises(InvalidArgument, match="chunk_size"):
        validation.check_generate(api.GenerateRequest("m", 100), info, chunk=-3)


def test_a_response_over_the_message_limit_is_refused_before_compute() -> None:
    info = _info()
    req = api.GenerateRequest("m", 256, output="both", max_response_bytes=64 * 1024)
    with pytest.raises(InvalidArgument, match="message limit of 65536 bytes"):
        validation.check_generate(req, info)
    small = api.GenerateRequest("m", 8, output="both", max_response_bytes=64 * 1024)
    validation.check_generate(small, info)
    decode = api.DecodeRequest("m", np.zeros((1024, 1, 8, 8), np.float32),
                               max_response_bytes=64 * 1024)
    with pytest.raises(InvalidArgument) as exc:
        validation.check_decode(decode, info)
    assert exc.value.field == "latents"


@pytest.mark.parametrize(("data", "message"), [
    (np.zeros((2, 1, 8, 7), np.float32), "expected shape"),
    (np.zeros((0, 1, 8, 8), np.float32), "expected shape"),
    (np.zeros((1025, 1, 8, 8), np.uint8), "max_examples_per_request"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), "finite"),
    (np.full((2, 1, 8, 8), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((2, 1, 8, 8), 17, np.uint8), r"\[0, 16\]"),
    (np.full((2, 1, 8, 8), -1, np.int64), r"\[0, 16\]"),
])
def test_score_and_encode_data_is_checked(data: np.ndarray, message: str) -> None:
    for check, req in ((validation.check_score, api.ScoreRequest("m", data)),
                       (validation.check_encode, api.EncodeRequest("m", data))):
        with pytest.raises(InvalidArgument, match=message):
            check(req, _info())  # type: ignore[operator]


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e30])
def test_latents_must_be_finite_and_bounded(value: float) -> None:
    latents = np.full((2, 1, 8, 8), value, np.float32)
    with pytest.raises(InvalidArgument, match="latents"):
        validation.check_decode(api.DecodeRequest("m", latents), _info())


def test_capabilities_are_unimplemented() -> None:
    info = api.ModelInfo(**{**_info().__dict__, "capabilities": ("sample",)})
    with pytest.raises(UnsupportedOperation):
        validation.check_score(api.ScoreRequest("m", np.zeros((1, 1, 8, 8), np.float32)), info)
    with pytest.raises(InvalidArgument, match="not class-conditional"):
        validation.check_generate(api.GenerateRequest("m", 1, labels=(0,)), info)


@pytest.mark.parametrize(("shape", "message"), [
    ([2**32, 2**32], "at most"),
    ([2**62, 2**62, 4], "at most"),
    ([0, 2**62], "at most"),  # no elements, but no shape numpy can make either
    ([-1, 1, 8, 8], "non-negative"),
    ([], "1 to 8 dimensions"),
    ([1] * 9, "1 to 8 dimensions"),
])
def test_overflowing_and_malformed_shapes_are_invalid_argument(shape: list[int],
                                                               message: str) -> None:
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, data=b"")
    with pytest.raises(InvalidArgument, match=message):
        codec.tensor_to_array(tensor, "data")


def test_counts_are_checked_before_conversion() -> None:
    req = pb.GenerateRequest(model="m", num_samples=1, labels=[0] * (codec.MAX_LABELS + 1))
    with pytest.raises(InvalidArgument, match="labels: at most"):
        codec.generate_request_from_pb(req, None)
    req = pb.GenerateRequest(model="m", num_samples=1,
                             options={str(i): pb.OptionValue(number=1) for i in range(65)})
    with pytest.raises(InvalidArgument, match="options: at most 64"):
        codec.generate_request_from_pb(req, None)


def test_limits_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="max_work_per_request"):
        api.Limits(max_work_per_request=0)
    with pytest.raises(InvalidArgument, match="max_samples_per_stream"):
        api.Limits(max_samples_per_request=100, max_samples_per_stream=10)
