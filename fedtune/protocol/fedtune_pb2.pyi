from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_TRAIN: _ClassVar[TaskStatus]
    TASK_STATUS_WAIT: _ClassVar[TaskStatus]
    TASK_STATUS_DONE: _ClassVar[TaskStatus]

class SplitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_KIND_UNSPECIFIED: _ClassVar[SplitKind]
    SPLIT_KIND_ACTIVATIONS: _ClassVar[SplitKind]
    SPLIT_KIND_GRADIENTS: _ClassVar[SplitKind]
    SPLIT_KIND_LABELS: _ClassVar[SplitKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_RAW: _ClassVar[Encoding]
    ENCODING_FLOAT16: _ClassVar[Encoding]
    ENCODING_BFLOAT16: _ClassVar[Encoding]
    ENCODING_UNIFORM_INT: _ClassVar[Encoding]
    ENCODING_SPARSE_TERNARY: _ClassVar[Encoding]
    ENCODING_SEEDED_PROJECTION: _ClassVar[Encoding]
    ENCODING_AMAQ: _ClassVar[Encoding]
    ENCODING_SEEDED_SIGN: _ClassVar[Encoding]
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_TRAIN: TaskStatus
TASK_STATUS_WAIT: TaskStatus
TASK_STATUS_DONE: TaskStatus
SPLIT_KIND_UNSPECIFIED: SplitKind
SPLIT_KIND_ACTIVATIONS: SplitKind
SPLIT_KIND_GRADIENTS: SplitKind
SPLIT_KIND_LABELS: SplitKind
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
ENCODING_UNSPECIFIED: Encoding
ENCODING_RAW: Encoding
ENCODING_FLOAT16: Encoding
ENCODING_BFLOAT16: Encoding
ENCODING_UNIFORM_INT: Encoding
ENCODING_SPARSE_TERNARY: Encoding
ENCODING_SEEDED_PROJECTION: Encoding
ENCODING_AMAQ: Encoding
ENCODING_SEEDED_SIGN: Encoding

class Capabilities(_message.Message):
    __slots__ = ("memory_bytes", "flops_per_second", "uplink_bytes_per_second", "downlink_bytes_per_second", "tier", "backward_factor")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FACTOR_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    flops_per_second: float
    uplink_bytes_per_second: float
    downlink_bytes_per_second: float
    tier: str
    backward_factor: float
    def __init__(self, memory_bytes: _Optional[int] = ..., flops_per_second: _Optional[float] = ..., uplink_bytes_per_second: _Optional[float] = ..., downlink_bytes_per_second: _Optional[float] = ..., tier: _Optional[str] = ..., backward_factor: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "capabilities", "num_examples", "enrollment_secret")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    name: str
    capabilities: Capabilities
    num_examples: int
    enrollment_secret: str
    def __init__(self, name: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., num_examples: _Optional[int] = ..., enrollment_secret: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("client_id", "token")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class FetchTaskRequest(_message.Message):
    __slots__ = ("client_id", "token", "wait_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    wait_seconds: float
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class AdapterPlan(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "layers", "modules_to_save", "rank_per_layer", "freeze_a", "core", "kind")
    class RankPerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODULES_TO_SAVE_FIELD_NUMBER: _ClassVar[int]
    RANK_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    FREEZE_A_FIELD_NUMBER: _ClassVar[int]
    CORE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedScalarFieldContainer[int]
    modules_to_save: _containers.RepeatedScalarFieldContainer[str]
    rank_per_layer: _containers.ScalarMap[int, int]
    freeze_a: bool
    core: bool
    kind: str
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[int]] = ..., modules_to_save: _Optional[_Iterable[str]] = ..., rank_per_layer: _Optional[_Mapping[int, int]] = ..., freeze_a: _Optional[bool] = ..., core: _Optional[bool] = ..., kind: _Optional[str] = ...) -> None: ...

class TrainingSettings(_message.Message):
    __slots__ = ("local_steps", "batch_size", "learning_rate", "weight_decay", "max_length", "seed", "tail_penalty", "tail_fraction")
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TAIL_PENALTY_FIELD_NUMBER: _ClassVar[int]
    TAIL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    max_length: int
    seed: int
    tail_penalty: float
    tail_fraction: float
    def __init__(self, local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_length: _Optional[int] = ..., seed: _Optional[int] = ..., tail_penalty: _Optional[float] = ..., tail_fraction: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "task", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("status", "round", "model", "plan", "training", "num_tensors", "retry_after_seconds", "deadline_unix", "share_a", "options", "update_by_slot")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    SHARE_A_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_BY_SLOT_FIELD_NUMBER: _ClassVar[int]
    status: TaskStatus
    round: int
    model: ModelSpec
    plan: AdapterPlan
    training: TrainingSettings
    num_tensors: int
    retry_after_seconds: float
    deadline_unix: float
    share_a: bool
    options: _containers.ScalarMap[str, str]
    update_by_slot: bool
    def __init__(self, status: _Optional[_Union[TaskStatus, str]] = ..., round: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., plan: _Optional[_Union[AdapterPlan, _Mapping]] = ..., training: _Optional[_Union[TrainingSettings, _Mapping]] = ..., num_tensors: _Optional[int] = ..., retry_after_seconds: _Optional[float] = ..., deadline_unix: _Optional[float] = ..., share_a: _Optional[bool] = ..., options: _Optional[_Mapping[str, str]] = ..., update_by_slot: _Optional[bool] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "token", "round", "num_examples", "metrics", "num_tensors", "declined")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    num_tensors: int
    declined: str
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_tensors: _Optional[int] = ..., declined: _Optional[str] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "token", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("current_round", "training_over", "round_open")
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAINING_OVER_FIELD_NUMBER: _ClassVar[int]
    ROUND_OPEN_FIELD_NUMBER: _ClassVar[int]
    current_round: int
    training_over: bool
    round_open: bool
    def __init__(self, current_round: _Optional[int] = ..., training_over: _Optional[bool] = ..., round_open: _Optional[bool] = ...) -> None: ...

class SplitHeader(_message.Message):
    __slots__ = ("client_id", "token", "round", "step", "kind", "num_tensors", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    round: int
    step: int
    kind: SplitKind
    num_tensors: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., kind: _Optional[_Union[SplitKind, str]] = ..., num_tensors: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SplitFrame(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SplitHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[SplitHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "encoding", "payload_bytes", "codec_params", "slot")
    class CodecParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CODEC_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    payload_bytes: int
    codec_params: _containers.ScalarMap[str, str]
    slot: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., payload_bytes: _Optional[int] = ..., codec_params: _Optional[_Mapping[str, str]] = ..., slot: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("task", "update", "tensor", "chunk")
    TASK_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    task: TaskHeader
    update: UpdateHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, task: _Optional[_Union[TaskHeader, _Mapping]] = ..., update: _Optional[_Union[UpdateHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
