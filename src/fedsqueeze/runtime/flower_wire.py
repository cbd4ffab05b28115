"""What crosses the wire between fedsqueeze's ServerApp and ClientApp (Message API of flwr 1.41).

- ``fsq.payload``  ArrayRecord with one 1-D ``uint8`` Array: the method's bytes, untouched. Flower
  never averages or reinterprets them, and the byte counts in results.json are ``len()`` of them.
- ``fsq.config``   ConfigRecord: the resolved run config (JSON), round, attempt, participants,
  seed, client id and the version of the client state the server knows the client holds; in a
  reply, ``error`` when the client failed.
- ``fsq.metrics``  MetricRecord in the reply: train_s, codec_s, train_loss.

Nothing is pickled: arrays travel through numpy's ``.npy`` format, read back by :func:`npy_bytes`
(its header checked against its length; never ``np.load``). Everything a peer sends is checked here
before use: a malformed message is a PayloadError.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy_format

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, PayloadError

PAYLOAD = "fsq.payload"
CONFIG = "fsq.config"
METRICS = "fsq.metrics"
STATE = "fsq.client-state"
PARTITION_KEY = "partition-id"
STATE_DIR_KEY = "state-dir"  # node config: where a node keeps its client state across restarts


def bytes_record(data: bytes) -> ArrayRecord:
    """Wrap payload bytes as a one-Array record of raw uint8 (no float conversion, no pickle)."""
    return ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8))})


def record_bytes(content: RecordDict) -> bytes:
    """The payload bytes of a message; PayloadError unless it is one 1-D uint8 Array."""
    if PAYLOAD not in content.array_records:
        raise PayloadError("message carries no payload record")
    record = content.array_records[PAYLOAD]
    if list(record.keys()) != ["bytes"]:
        raise PayloadError("payload record must hold exactly one array named 'bytes'")
    arr = record["bytes"]
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise PayloadError(f"payload must be 1-D uint8, got {arr.dtype} {tuple(arr.shape)}")
    if arr.stype != SType.NUMPY:
        raise PayloadError(f"payload array has serialisation type {str(arr.stype)[:40]!r}, not {SType.NUMPY!r}")
    return npy_bytes(arr.data)


def npy_bytes(data: bytes) -> bytes:
    """The bytes of a 1-D uint8 ``.npy`` buffer, read without ``np.load``: that allocates what the
    buffer's header claims before it reads the data (a 131-byte reply claiming 2^30 bytes made the
    server allocate 1 GiB). Here the header must state uint8, one dimension and exactly the bytes that
    follow it; nothing is allocated but the returned bytes, and nothing is unpickled."""
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy version {version}")
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except Exception as exc:  # a malformed .npy buffer
        raise PayloadError(f"payload array is malformed: {type(exc).__name__}") from None
    start = f.tell()
    if dtype != np.uint8 or len(shape) != 1 or shape[0] != len(data) - start:
        raise PayloadError("payload array does not match its declared dtype/shape")
    return bytes(data[start:])


def config_to_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> RunConfig:
    """Rebuild the run config sent by the server (plain JSON, validated like any other config)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config is not valid JSON: {exc}") from exc
    if not isinstance(values, dict) or not isinstance(values.get("options", {}), dict):
        raise ConfigError("run config must be a JSON object")
    known = set(RunConfig.field_names()) | {"options"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"run config has unknown fields {unknown}")
    return RunConfig(**values).validate()


@dataclass
class TrainRequest:
    """The content of a ``train`` message, as the ClientApp reads it."""

    config_json: str
    round: int
    rounds: int
    seed: int
    client: int
    attempt: int
    participants: tuple[int, ...]
    state_version: tuple[int, int] | None
    state_dir: str | None
    message: bytes


def train_message(req: TrainRequest, node: int) -> Message:
    """The ``train`` Message that carries ``req`` to ``node``."""
    values: dict[str, Any] = {
        "config": req.config_json,
        "round": req.round,
        "rounds": req.rounds,
        "seed": req.seed,
        "client": req.client,
        "attempt": req.attempt,
        "participants": list(req.participants),
    }
    if req.state_version is not None:
        values["state-version"] = list(req.state_version)
    if req.state_dir:
        values["state-dir"] = req.state_dir
    return Message(
        RecordDict({PAYLOAD: bytes_record(req.message), CONFIG: ConfigRecord(values)}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
        group_id=f"{req.round}.{req.attempt}",
    )


def _int(conf: Any, key: str, default: int | None = None) -> int:
    value = conf.get(key, default) if hasattr(conf, "get") else None
    if type(value) is not int:
        raise PayloadError(f"train message field {key!r} is not an integer: {value!r}")
    return value


def _ints(value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(x) is int for x in value) or (length is not None and len(value) != length):
        raise PayloadError(f"train message field {what!r} is malformed: {value!r}")
    return tuple(value)


def read_train(msg: Message) -> TrainRequest:
    """Parse and check a ``train`` message; PayloadError if anything is missing or mistyped."""
    conf = msg.content.config_records.get(CONFIG)
    if conf is None:
        raise PayloadError("train message carries no fsq.config record")
    config_json = conf.get("config")
    if not isinstance(config_json, str):
        raise PayloadError("train message carries no run config")
    version = conf.get("state-version")
    state_dir = conf.get("state-dir")
    return TrainRequest(
        config_json=config_json,
        round=_int(conf, "round"),
        rounds=_int(conf, "rounds"),
        seed=_int(conf, "seed"),
        client=_int(conf, "client"),
        attempt=_int(conf, "attempt", 0),
        participants=_ints(conf.get("participants", []), "participants"),
        state_version=None if version is None else _ints(version, "state-version", 2),  # type: ignore[arg-type]
        state_dir=state_dir if isinstance(state_dir, str) else None,
        message=record_bytes(msg.content),
    )


def reply_error(msg: Message, error: str) -> Message:
    """The reply of a client that failed: the reason, no payload."""
    return Message(RecordDict({CONFIG: ConfigRecord({"error": error})}), reply_to=msg)


def finite_numbers(metrics: Any) -> dict[str, float]:
    """The entries of ``metrics`` that are finite scalar numbers, as floats (anything else is dropped)."""
    return {
        str(k): float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def reply_update(msg: Message, payload: bytes, metrics: dict[str, Any]) -> Message:
    """The reply of a client that trained: its payload bytes and its numeric metrics."""
    numeric: dict[str, int | float | list[int] | list[float]] = dict(finite_numbers(metrics))
    return Message(RecordDict({PAYLOAD: bytes_record(payload), METRICS: MetricRecord(numeric)}), reply_to=msg)


def read_reply(reply: Message) -> tuple[bytes | None, dict[str, float], str | None]:
    """``(payload, metrics, error)`` of a client's reply; PayloadError if it is malformed.

    Metrics are hostile: only finite scalar numbers are kept.
    """
    conf = reply.content.config_records.get(CONFIG)
    if conf is not None and "error" in conf:
        return None, {}, str(conf["error"])[:500]
    return record_bytes(reply.content), finite_numbers(reply.content.metric_records.get(METRICS)), None
