from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_TENSOR: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_BOTH: _ClassVar[OutputFormat]

class ScoreKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_KIND_UNSPECIFIED: _ClassVar[ScoreKind]
    SCORE_KIND_EXACT: _ClassVar[ScoreKind]
    SCORE_KIND_LOWER_BOUND: _ClassVar[ScoreKind]
    SCORE_KIND_UNNORMALIZED: _ClassVar[ScoreKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_TENSOR: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_BOTH: OutputFormat
SCORE_KIND_UNSPECIFIED: ScoreKind
SCORE_KIND_EXACT: ScoreKind
SCORE_KIND_LOWER_BOUND: ScoreKind
SCORE_KIND_UNNORMALIZED: ScoreKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OptionValue(_message.Message):
    __slots__ = ("number", "text", "flag")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    number: float
    text: str
    flag: bool
    def __init__(self, number: _Optional[float] = ..., text: _Optional[str] = ..., flag: _Optional[bool] = ...) -> None: ...

class OptionInfo(_message.Message):
    __slots__ = ("name", "kind", "default_value", "min", "max", "choices", "help", "multiplies_work")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIES_WORK_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    default_value: OptionValue
    min: float
    max: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    help: str
    multiplies_work: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., default_value: _Optional[_Union[OptionValue, _Mapping]] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ..., help: _Optional[str] = ..., multiplies_work: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "version", "capabilities", "sample_shape", "sample_dtype", "levels", "classes", "data_kind", "sampler_options", "score_options", "score_kind", "latent_shape", "max_samples_per_request", "metrics", "max_samples_per_stream", "max_examples_per_request", "max_work_per_request")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    DATA_KIND_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SCORE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_STREAM_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_WORK_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    version: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    sample_dtype: DType
    levels: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    data_kind: str
    sampler_options: _containers.RepeatedCompositeFieldContainer[OptionInfo]
    score_options: _containers.RepeatedCompositeFieldContainer[OptionInfo]
    score_kind: ScoreKind
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    max_samples_per_request: int
    metrics: _containers.ScalarMap[str, float]
    max_samples_per_stream: int
    max_examples_per_request: int
    max_work_per_request: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., version: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., sample_shape: _Optional[_Iterable[int]] = ..., sample_dtype: _Optional[_Union[DType, str]] = ..., levels: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., data_kind: _Optional[str] = ..., sampler_options: _Optional[_Iterable[_Union[OptionInfo, _Mapping]]] = ..., score_options: _Optional[_Iterable[_Union[OptionInfo, _Mapping]]] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., latent_shape: _Optional[_Iterable[int]] = ..., max_samples_per_request: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., max_samples_per_stream: _Optional[int] = ..., max_examples_per_request: _Optional[int] = ..., max_work_per_request: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "num_samples", "seed", "labels", "options", "output", "start_index", "chunk_size")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: OptionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[OptionValue, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_samples: int
    seed: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    options: _containers.MessageMap[str, OptionValue]
    output: OutputFormat
    start_index: int
    chunk_size: int
    def __init__(self, model: _Optional[str] = ..., num_samples: _Optional[int] = ..., seed: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., options: _Optional[_Mapping[str, OptionValue]] = ..., output: _Optional[_Union[OutputFormat, str]] = ..., start_index: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("model", "version", "samples", "png", "text", "seeds", "labels", "start_index", "timings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    samples: Tensor
    png: _containers.RepeatedScalarFieldContainer[bytes]
    text: _containers.RepeatedScalarFieldContainer[str]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    start_index: int
    timings: Timings
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ..., text: _Optional[_Iterable[str]] = ..., seeds: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[int]] = ..., start_index: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "data", "labels", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: OptionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[OptionValue, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    data: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    options: _containers.MessageMap[str, OptionValue]
    def __init__(self, model: _Optional[str] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., options: _Optional[_Mapping[str, OptionValue]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "version", "log_prob", "bits_per_dim", "kind", "timings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    log_prob: _containers.RepeatedScalarFieldContainer[float]
    bits_per_dim: _containers.RepeatedScalarFieldContainer[float]
    kind: ScoreKind
    timings: Timings
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., log_prob: _Optional[_Iterable[float]] = ..., bits_per_dim: _Optional[_Iterable[float]] = ..., kind: _Optional[_Union[ScoreKind, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "data", "labels", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: OptionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[OptionValue, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    data: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    options: _containers.MessageMap[str, OptionValue]
    def __init__(self, model: _Optional[str] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., options: _Optional[_Mapping[str, OptionValue]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("model", "version", "latents", "timings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    latents: Tensor
    timings: Timings
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "latents", "labels", "options", "output")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: OptionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[OptionValue, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    latents: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    options: _containers.MessageMap[str, OptionValue]
    output: OutputFormat
    def __init__(self, model: _Optional[str] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., options: _Optional[_Mapping[str, OptionValue]] = ..., output: _Optional[_Union[OutputFormat, str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("model", "version", "samples", "png", "text", "timings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    samples: Tensor
    png: _containers.RepeatedScalarFieldContainer[bytes]
    text: _containers.RepeatedScalarFieldContainer[str]
    timings: Timings
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ..., text: _Optional[_Iterable[str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...
