from services.gateway.pb.genfleet.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_FORMAT_UNSPECIFIED: _ClassVar[BatchFormat]
    BATCH_FORMAT_PARQUET: _ClassVar[BatchFormat]
    BATCH_FORMAT_PNG: _ClassVar[BatchFormat]
    BATCH_FORMAT_NPZ: _ClassVar[BatchFormat]

class BatchState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_STATE_UNSPECIFIED: _ClassVar[BatchState]
    BATCH_STATE_RUNNING: _ClassVar[BatchState]
    BATCH_STATE_SUCCEEDED: _ClassVar[BatchState]
    BATCH_STATE_FAILED: _ClassVar[BatchState]
    BATCH_STATE_CANCELLED: _ClassVar[BatchState]
BATCH_FORMAT_UNSPECIFIED: BatchFormat
BATCH_FORMAT_PARQUET: BatchFormat
BATCH_FORMAT_PNG: BatchFormat
BATCH_FORMAT_NPZ: BatchFormat
BATCH_STATE_UNSPECIFIED: BatchState
BATCH_STATE_RUNNING: BatchState
BATCH_STATE_SUCCEEDED: BatchState
BATCH_STATE_FAILED: BatchState
BATCH_STATE_CANCELLED: BatchState

class SubmitBatchRequest(_message.Message):
    __slots__ = ("model", "num_samples", "output", "format", "shard_size", "seed", "labels", "options", "workers", "gpus_per_worker", "encoding")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _generation_pb2.OptionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_generation_pb2.OptionValue, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_samples: int
    output: str
    format: BatchFormat
    shard_size: int
    seed: int
    labels: str
    options: _containers.MessageMap[str, _generation_pb2.OptionValue]
    workers: int
    gpus_per_worker: float
    encoding: str
    def __init__(self, model: _Optional[str] = ..., num_samples: _Optional[int] = ..., output: _Optional[str] = ..., format: _Optional[_Union[BatchFormat, str]] = ..., shard_size: _Optional[int] = ..., seed: _Optional[int] = ..., labels: _Optional[str] = ..., options: _Optional[_Mapping[str, _generation_pb2.OptionValue]] = ..., workers: _Optional[int] = ..., gpus_per_worker: _Optional[float] = ..., encoding: _Optional[str] = ...) -> None: ...

class BatchJob(_message.Message):
    __slots__ = ("id", "state", "model", "version", "num_samples", "samples_written", "output_uri", "manifest_uri", "error", "created", "finished")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_URI_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: BatchState
    model: str
    version: int
    num_samples: int
    samples_written: int
    output_uri: str
    manifest_uri: str
    error: str
    created: float
    finished: float
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[BatchState, str]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., num_samples: _Optional[int] = ..., samples_written: _Optional[int] = ..., output_uri: _Optional[str] = ..., manifest_uri: _Optional[str] = ..., error: _Optional[str] = ..., created: _Optional[float] = ..., finished: _Optional[float] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[BatchJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[BatchJob, _Mapping]]] = ...) -> None: ...
