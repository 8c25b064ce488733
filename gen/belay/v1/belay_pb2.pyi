from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason

class PackedInt32(_message.Message):
    __slots__ = ("data", "lengths")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class PackedFloat32(_message.Message):
    __slots__ = ("data", "lengths")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("service", "model_id", "tokenizer_fingerprint", "policy_version", "model_revision")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    service: str
    model_id: str
    tokenizer_fingerprint: str
    policy_version: int
    model_revision: str
    def __init__(self, service: _Optional[str] = ..., model_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., policy_version: _Optional[int] = ..., model_revision: _Optional[str] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("prompt_ids", "response_ids", "temperature", "top_k")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: PackedInt32
    response_ids: PackedInt32
    temperature: float
    top_k: int
    def __init__(self, prompt_ids: _Optional[_Union[PackedInt32, _Mapping]] = ..., response_ids: _Optional[_Union[PackedInt32, _Mapping]] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("logprobs", "policy_version", "top_ids", "top_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: PackedFloat32
    policy_version: int
    top_ids: PackedInt32
    top_logprobs: PackedFloat32
    def __init__(self, logprobs: _Optional[_Union[PackedFloat32, _Mapping]] = ..., policy_version: _Optional[int] = ..., top_ids: _Optional[_Union[PackedInt32, _Mapping]] = ..., top_logprobs: _Optional[_Union[PackedFloat32, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_new_tokens", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "sampling", "samples_per_prompt", "metadata_json", "messages_json")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingParams
    samples_per_prompt: int
    metadata_json: _containers.RepeatedScalarFieldContainer[str]
    messages_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., samples_per_prompt: _Optional[int] = ..., metadata_json: _Optional[_Iterable[str]] = ..., messages_json: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt_ids", "response_ids", "logprobs", "response_texts", "finish_reasons", "prompt_index", "policy_version", "metadata_json")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXTS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: PackedInt32
    response_ids: PackedInt32
    logprobs: PackedFloat32
    response_texts: _containers.RepeatedScalarFieldContainer[str]
    finish_reasons: _containers.RepeatedScalarFieldContainer[FinishReason]
    prompt_index: _containers.RepeatedScalarFieldContainer[int]
    policy_version: int
    metadata_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_ids: _Optional[_Union[PackedInt32, _Mapping]] = ..., response_ids: _Optional[_Union[PackedInt32, _Mapping]] = ..., logprobs: _Optional[_Union[PackedFloat32, _Mapping]] = ..., response_texts: _Optional[_Iterable[str]] = ..., finish_reasons: _Optional[_Iterable[_Union[FinishReason, str]]] = ..., prompt_index: _Optional[_Iterable[int]] = ..., policy_version: _Optional[int] = ..., metadata_json: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("version", "checkpoint_path", "transport", "rendezvous", "group_key", "new_group", "rank", "world_size", "manifest", "bucket_bytes", "ipc_buffers", "backend")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    GROUP_KEY_FIELD_NUMBER: _ClassVar[int]
    NEW_GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    IPC_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    version: int
    checkpoint_path: str
    transport: str
    rendezvous: str
    group_key: str
    new_group: bool
    rank: int
    world_size: int
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    bucket_bytes: int
    ipc_buffers: _containers.RepeatedCompositeFieldContainer[CudaIpcBuffer]
    backend: str
    def __init__(self, version: _Optional[int] = ..., checkpoint_path: _Optional[str] = ..., transport: _Optional[str] = ..., rendezvous: _Optional[str] = ..., group_key: _Optional[str] = ..., new_group: _Optional[bool] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., bucket_bytes: _Optional[int] = ..., ipc_buffers: _Optional[_Iterable[_Union[CudaIpcBuffer, _Mapping]]] = ..., backend: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class CudaIpcBuffer(_message.Message):
    __slots__ = ("device_uuid", "numel", "dtype", "storage_handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    numel: int
    dtype: str
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, device_uuid: _Optional[str] = ..., numel: _Optional[int] = ..., dtype: _Optional[str] = ..., storage_handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("current_version", "pending_version")
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    current_version: int
    pending_version: int
    def __init__(self, current_version: _Optional[int] = ..., pending_version: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("prompts", "responses", "metadata_json")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    responses: _containers.RepeatedScalarFieldContainer[str]
    metadata_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., responses: _Optional[_Iterable[str]] = ..., metadata_json: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "reward_model_id", "reward_model_revision", "components")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    reward_model_id: str
    reward_model_revision: str
    components: _containers.RepeatedCompositeFieldContainer[ComponentScores]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., reward_model_id: _Optional[str] = ..., reward_model_revision: _Optional[str] = ..., components: _Optional[_Iterable[_Union[ComponentScores, _Mapping]]] = ...) -> None: ...

class ComponentScores(_message.Message):
    __slots__ = ("name", "weight", "scores")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...
