"""fedsqueeze codecs for any Flower app: a ClientApp mod and a strategy wrapper.

A plain Flower app (its ClientApp replies with its trained ``ArrayRecord``, its ServerApp runs a
``flwr.serverapp.strategy`` strategy) gains compressed uploads with two lines::

    client_app = ClientApp(mods=[compression_mod])
    strategy = CompressedStrategy(FedAvg(...), "sz3", mode="abs", bound=1e-4)

What travels (train messages only; evaluate messages and replies pass through unchanged):

- server -> client: the app's message, plus a ConfigRecord ``fedsqueeze`` naming the codec (its
  JSON config), the round, a seed and the ArrayRecords to compress. The arrays go down as Flower
  sends them.
- client -> server: for each of those ArrayRecords, instead of the trained arrays, one fedsqueeze
  payload of the *change* ``trained - received`` (non-float arrays: their values) in the
  ConfigRecord ``fedsqueeze.payload``, and a MetricRecord ``fedsqueeze`` with the client's own
  byte counts.
- The wrapper decodes every payload with the codec *it* configured, against the arrays it sent
  (names, dtypes and shapes are fixed before anything is allocated; the body may not exceed the
  raw size), adds the change back, and hands the inner strategy ordinary replies. A reply that
  fails any check is dropped for the round with its reason (``messages``, and the log).

Error-feedback codecs (``topk``, ``sign``) keep their memory in the node's ``context.state``
(ArrayRecord ``fedsqueeze.ef``), so what one round leaves out is sent later. Bytes per message are
recorded by the server in :attr:`CompressedStrategy.messages` and summed per round into the
aggregated train MetricRecord (``fsq-uplink-bytes``, ``fsq-uplink-raw-bytes``, ``fsq-uplink-ratio``,
``fsq-dropped``). Nothing is pickled: payloads are fedsqueeze frames (JSON header + raw bytes).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.codecs import Codec, CodecContext, decode_tensors, encode_tensors, get_codec
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.seeding import seed_int

log = logging.getLogger("fedsqueeze")

CONFIG = "fedsqueeze"  # ConfigRecord server -> client: codec, round, seed, records
PAYLOAD = "fedsqueeze.payload"  # ConfigRecord client -> server: record name -> payload bytes
REPORT = "fedsqueeze"  # MetricRecord client -> server: the client's own byte counts
EF_STATE = "fedsqueeze.ef"  # ArrayRecord in the node's context.state: error-feedback memory
PURPOSE = "flower-codec"

Tensors = dict[str, np.ndarray]


def record_tensors(record: ArrayRecord) -> Tensors:
    """An ArrayRecord's arrays as numpy, in its order (Flower reads them with allow_pickle=False)."""
    return {key: array.numpy() for key, array in record.items()}


def tensors_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(a)) for key, a in tensors.items()})


def as_change(after: Tensors, before: Tensors) -> Tensors:
    """What a client sends: ``after - before`` for float arrays, the value itself for the rest.

    ``after`` must hold exactly ``before``'s names, dtypes and shapes (the app trained the model it
    received); anything else cannot be rebuilt by the server and is a ConfigError.
    """
    if list(after) != list(before):
        raise ConfigError(f"the reply's arrays {sorted(after)[:5]} are not the ones received {sorted(before)[:5]}")
    out: Tensors = {}
    for name, a in after.items():
        b = before[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise ConfigError(f"array {name!r} came back as {a.dtype}{a.shape}, was sent as {b.dtype}{b.shape}")
        out[name] = a - b if np.issubdtype(a.dtype, np.floating) else a
    return out


def from_change(change: Tensors, before: Tensors) -> Tensors:
    """Invert :func:`as_change` on the server: ``before + change`` for float arrays."""
    return {name: (b + change[name]).astype(b.dtype) if np.issubdtype(b.dtype, np.floating) else change[name] for name, b in before.items()}


def codec_seed(seed: int, server_round: int, node_id: int) -> int:
    """The seed of one node's encoder in one round; both sides derive it, nothing sends it."""
    return seed_int(seed, server_round, node_id % (1 << 62), PURPOSE)


# ---- client side ------------------------------------------------------------------------------------
def _load_memory(context: Context) -> dict[str, Any]:
    record = context.state.array_records.get(EF_STATE)
    memory: dict[str, dict[str, np.ndarray]] = {}
    for key, array in (record or {}).items():
        codec_key, _, name = key.partition("/")
        memory.setdefault(codec_key, {})[name] = array.numpy()
    return memory


def _save_memory(context: Context, memory: dict[str, Any]) -> None:
    flat = {f"{codec_key}/{name}": a for codec_key, table in memory.items() for name, a in table.items()}
    if flat:
        context.state[EF_STATE] = tensors_record(flat)


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: compress the train reply's ArrayRecords with the codec the server names.

    Messages without the server's ``fedsqueeze`` ConfigRecord (evaluate, query, an uncompressed
    server) pass through untouched.
    """
    conf = msg.content.config_records.get(CONFIG)
    if conf is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    try:
        codec = get_codec(json.loads(str(conf["codec"])))
        records, server_seed, server_round = conf["records"], conf["seed"], conf["round"]
        if not (isinstance(records, list) and isinstance(server_seed, int) and isinstance(server_round, int)):
            raise TypeError("records must be a list, seed and round integers")
        names = [str(name) for name in records]
        sent = {name: record_tensors(msg.content.array_records[name]) for name in names}
        seed = codec_seed(server_seed, server_round, context.node_id)
    except Exception as exc:  # the server's message is malformed: say so, train nothing
        return Message(_error(f"fedsqueeze: bad compression config: {type(exc).__name__}: {exc}"), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    t0 = time.perf_counter()
    try:
        memory = _load_memory(context)
        payloads: dict[str, bytes] = {}
        raw = 0
        for name in names:
            trained = record_tensors(reply.content.array_records[name])
            raw += reply.content.array_records[name].count_bytes()
            ctx = CodecContext(seed=seed, state=memory)
            payloads[name] = encode_tensors(codec, as_change(trained, sent[name]), ctx)
            del reply.content[name]
        _save_memory(context, memory)
    except Exception as exc:
        return Message(_error(f"fedsqueeze: cannot compress the reply: {type(exc).__name__}: {exc}"), reply_to=msg)
    sizes = sum(len(p) for p in payloads.values())
    reply.content[PAYLOAD] = ConfigRecord(dict(payloads))
    reply.content[REPORT] = MetricRecord({"payload-bytes": sizes, "raw-bytes": raw, "encode-s": time.perf_counter() - t0})
    return reply


def _error(reason: str) -> Error:
    return Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)


# ---- server side ------------------------------------------------------------------------------------
@dataclass
class MessageBytes:
    """One reply as the server saw it."""

    round: int
    node: int
    payload_bytes: int  # the fedsqueeze payloads' lengths
    raw_bytes: int  # what the decoded ArrayRecords weigh in Flower (count_bytes)
    error: str | None = None


class CompressedStrategy(Strategy):
    """Wrap a Flower strategy so its clients' train replies arrive compressed by a fedsqueeze codec.

    ``codec`` is a codec id with ``options`` (``CompressedStrategy(FedAvg(), "topk", k=0.01)``), a
    config dict or a Codec. The clients need :func:`compression_mod` in their ClientApp. ``seed``
    seeds the codecs that draw random numbers (qsgd, eden), per node and round.
    """

    def __init__(self, strategy: Strategy, codec: str | dict[str, Any] | Codec = "sz3", seed: int = 0, **options: Any) -> None:
        self.strategy = strategy
        self.codec = get_codec(codec, **options)
        self.seed = seed
        self.messages: list[MessageBytes] = []
        self._sent: dict[int, dict[str, Tensors]] = {}  # node -> record name -> arrays sent this round
        self._round = 0

    # the strategy's own work is the inner strategy's
    def summary(self) -> None:
        log.info("fedsqueeze: train replies compressed with %r", self.codec)
        self.strategy.summary()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._round, self._sent = server_round, {}
        decoded: dict[int, dict[str, Tensors]] = {}  # one numpy copy per distinct content, however many nodes share it
        for msg in messages:
            content = msg.content
            if id(content) not in decoded:
                decoded[id(content)] = {name: record_tensors(rec) for name, rec in content.array_records.items()}
                content[CONFIG] = ConfigRecord(
                    {
                        "codec": json.dumps(self.codec.get_config()),
                        "round": server_round,
                        "seed": self.seed,
                        "records": list(decoded[id(content)]),
                    }
                )
            self._sent[msg.metadata.dst_node_id] = decoded[id(content)]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept: list[Message] = []
        seen: list[MessageBytes] = []
        for reply in replies:
            if reply.has_error():
                kept.append(reply)
                continue
            node = reply.metadata.src_node_id
            try:
                kept.append(self._decompress(server_round, node, reply, seen))
            except PayloadError as exc:
                log.warning("fedsqueeze: reply of node %d dropped in round %d: %s", node, server_round, exc)
                seen.append(MessageBytes(server_round, node, _payload_size(reply), 0, str(exc)))
        self.messages += seen
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        ok = [m for m in seen if m.error is None]
        total, raw = sum(m.payload_bytes for m in ok), sum(m.raw_bytes for m in ok)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["fsq-uplink-bytes"] = total
        metrics["fsq-uplink-raw-bytes"] = raw
        metrics["fsq-uplink-ratio"] = raw / total if total else 0.0
        metrics["fsq-dropped"] = len(seen) - len(ok)
        return arrays, metrics

    def _decompress(self, server_round: int, node: int, reply: Message, seen: list[MessageBytes]) -> Message:
        """The reply with its payloads decoded back into ArrayRecords; PayloadError if it is not usable."""
        sent = self._sent.get(node)
        if sent is None or server_round != self._round:
            raise PayloadError(f"node {node} was not sent a train message this round")
        if any(m.node == node for m in seen):
            raise PayloadError(f"node {node} replied twice")
        payloads = reply.content.config_records.get(PAYLOAD)
        if payloads is None:
            raise PayloadError("reply carries no fedsqueeze payload (is compression_mod in the ClientApp's mods?)")
        if set(payloads.keys()) != set(sent) or any(name in reply.content for name in sent):
            raise PayloadError(f"reply's payloads {sorted(payloads.keys())} are not exactly the records sent {sorted(sent)}")
        content = RecordDict({k: v for k, v in reply.content.items() if k not in (PAYLOAD, REPORT)})
        nbytes = raw = 0
        for name, before in sent.items():
            data = payloads[name]
            if not isinstance(data, bytes):
                raise PayloadError(f"payload of record {name!r} is not bytes")
            expect = {n: (str(a.dtype), tuple(a.shape)) for n, a in before.items()}
            limit = 2 * sum(a.nbytes for a in before.values()) + 65536  # lossy or not, never far above raw
            ctx = CodecContext(
                seed=codec_seed(self.seed, server_round, node),
                max_elements=sum(math.prod(s) for _, s in expect.values()),
                expect=expect,
            )
            change, _ = decode_tensors(data, ctx, codec=self.codec, max_body_bytes=limit)
            if set(change) != set(before):
                raise PayloadError(f"payload of record {name!r} does not hold every array sent")
            if any(not np.isfinite(a).all() for a in change.values() if np.issubdtype(a.dtype, np.floating)):
                raise PayloadError(f"payload of record {name!r} holds NaN or infinite values")
            record = tensors_record(from_change(change, before))
            content[name] = record
            nbytes += len(data)
            raw += record.count_bytes()
        seen.append(MessageBytes(server_round, node, nbytes, raw))
        reply.content = content
        return reply


def _payload_size(reply: Message) -> int:
    payloads = reply.content.config_records.get(PAYLOAD)
    return sum(len(v) for v in (payloads or {}).values() if isinstance(v, bytes))
