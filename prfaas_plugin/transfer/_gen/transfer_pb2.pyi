from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemSpec(_message.Message):
    __slots__ = ("name", "nbytes", "order")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    nbytes: int
    order: int
    def __init__(self, name: _Optional[str] = ..., nbytes: _Optional[int] = ..., order: _Optional[int] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("protocol_version", "request_id", "sender_id", "receiver_id", "fingerprint_json", "fingerprint_digest", "items", "token", "chunk_bytes", "data_planes", "metadata_json", "checksums", "partial_items")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_JSON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANES_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    sender_id: str
    receiver_id: str
    fingerprint_json: str
    fingerprint_digest: str
    items: _containers.RepeatedCompositeFieldContainer[ItemSpec]
    token: str
    chunk_bytes: int
    data_planes: _containers.RepeatedScalarFieldContainer[str]
    metadata_json: str
    checksums: _containers.RepeatedScalarFieldContainer[str]
    partial_items: bool
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., receiver_id: _Optional[str] = ..., fingerprint_json: _Optional[str] = ..., fingerprint_digest: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ItemSpec, _Mapping]]] = ..., token: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., data_planes: _Optional[_Iterable[str]] = ..., metadata_json: _Optional[str] = ..., checksums: _Optional[_Iterable[str]] = ..., partial_items: _Optional[bool] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("session_key", "data_plane", "data_host", "data_port", "receiver_id", "checksum", "skip_bytes", "max_frame_bytes")
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    DATA_HOST_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SKIP_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_key: bytes
    data_plane: str
    data_host: str
    data_port: int
    receiver_id: str
    checksum: str
    skip_bytes: _containers.RepeatedScalarFieldContainer[int]
    max_frame_bytes: int
    def __init__(self, session_key: _Optional[bytes] = ..., data_plane: _Optional[str] = ..., data_host: _Optional[str] = ..., data_port: _Optional[int] = ..., receiver_id: _Optional[str] = ..., checksum: _Optional[str] = ..., skip_bytes: _Optional[_Iterable[int]] = ..., max_frame_bytes: _Optional[int] = ...) -> None: ...

class ItemProgress(_message.Message):
    __slots__ = ("bytes_landed", "items_done")
    BYTES_LANDED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_DONE_FIELD_NUMBER: _ClassVar[int]
    bytes_landed: int
    items_done: int
    def __init__(self, bytes_landed: _Optional[int] = ..., items_done: _Optional[int] = ...) -> None: ...

class ItemDone(_message.Message):
    __slots__ = ("item", "bytes_landed")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    BYTES_LANDED_FIELD_NUMBER: _ClassVar[int]
    item: int
    bytes_landed: int
    def __init__(self, item: _Optional[int] = ..., bytes_landed: _Optional[int] = ...) -> None: ...

class Resend(_message.Message):
    __slots__ = ("item", "offset", "reason")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    item: int
    offset: int
    reason: str
    def __init__(self, item: _Optional[int] = ..., offset: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("bytes", "seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ReceiverEvent(_message.Message):
    __slots__ = ("accepted", "progress", "item_done", "resend", "completed")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ITEM_DONE_FIELD_NUMBER: _ClassVar[int]
    RESEND_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    progress: ItemProgress
    item_done: ItemDone
    resend: Resend
    completed: Completed
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[ItemProgress, _Mapping]] = ..., item_done: _Optional[_Union[ItemDone, _Mapping]] = ..., resend: _Optional[_Union[Resend, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "session_key", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_key: bytes
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., session_key: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("was_open",)
    WAS_OPEN_FIELD_NUMBER: _ClassVar[int]
    was_open: bool
    def __init__(self, was_open: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("request_id", "session_key")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_key: bytes
    def __init__(self, request_id: _Optional[str] = ..., session_key: _Optional[bytes] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("state", "bytes_landed", "items_done", "items_total", "elapsed_s", "error")
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_LANDED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_DONE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    state: str
    bytes_landed: int
    items_done: int
    items_total: int
    elapsed_s: float
    error: str
    def __init__(self, state: _Optional[str] = ..., bytes_landed: _Optional[int] = ..., items_done: _Optional[int] = ..., items_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("session_key", "item", "offset", "crc32", "data", "checksum64")
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM64_FIELD_NUMBER: _ClassVar[int]
    session_key: bytes
    item: int
    offset: int
    crc32: int
    data: bytes
    checksum64: int
    def __init__(self, session_key: _Optional[bytes] = ..., item: _Optional[int] = ..., offset: _Optional[int] = ..., crc32: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum64: _Optional[int] = ...) -> None: ...

class PushSummary(_message.Message):
    __slots__ = ("chunks", "bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
