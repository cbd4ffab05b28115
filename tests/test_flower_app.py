"""The Flower app's pieces, without a SuperLink: records, config, the ClientApp on one message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.methods.updates import TensorUpdate
from fedsqueeze.runtime.engine import prepare
from fedsqueeze.runtime.flower import app_pyproject, flower_env, write_flwr_config
from fedsqueeze.runtime.flower_app import RUN_CONFIG_KEY
from fedsqueeze.runtime.flower_client import client_app
from fedsqueeze.runtime.flower_wire import (
    CONFIG,
    PAYLOAD,
    STATE,
    bytes_record,
    config_from_json,
    config_to_json,
    record_bytes,
)


def test_payload_bytes_travel_unchanged_as_uint8():
    data = bytes(range(256)) * 3 + b"\x00"
    rec = bytes_record(data)
    assert rec["bytes"].dtype == "uint8" and rec["bytes"].shape == (len(data),)
    assert record_bytes(RecordDict({PAYLOAD: rec})) == data
    assert record_bytes(RecordDict({PAYLOAD: bytes_record(b"")})) == b""


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(4, dtype=np.float32),  # Flower must never see floats it could average
        np.zeros((2, 2), dtype=np.uint8),
    ],
)
def test_payload_record_rejects_anything_but_1d_uint8(bad):
    with pytest.raises(PayloadError):
        record_bytes(RecordDict({PAYLOAD: ArrayRecord({"bytes": Array(bad)})}))
    with pytest.raises(PayloadError):
        record_bytes(RecordDict())


def test_run_config_round_trips_through_json(tiny_cfg):
    cfg = tiny_cfg(method="head", options={"optimizer": "sgd"})
    assert config_from_json(config_to_json(cfg)) == cfg
    with pytest.raises(ConfigError):
        config_from_json('{"not_a_field": 1}')
    with pytest.raises(ConfigError):
        config_from_json("[1, 2]")


def test_app_pyproject_is_a_valid_flower_app(tmp_path, tiny_cfg):
    import tomli_w
    from flwr.cli.config_utils import load_and_validate

    cfg = tiny_cfg(method="head")
    (tmp_path / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(cfg)))
    config, warnings = load_and_validate(tmp_path / "pyproject.toml")
    assert not warnings
    assert config_from_json(config["tool"]["flwr"]["app"]["config"][RUN_CONFIG_KEY]) == cfg


def test_private_flower_home_and_env(tmp_path):
    import tomllib

    write_flwr_config(tmp_path, "10.0.0.5:9093", None)
    conf = tomllib.loads((tmp_path / "config.toml").read_text())
    assert conf["superlink"]["default"] == "fedsqueeze"
    assert conf["superlink"]["fedsqueeze"] == {"address": "10.0.0.5:9093", "insecure": True}
    env = flower_env(tmp_path, base={"PATH": "/usr/bin"})
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


@pytest.fixture
def task_identity():
    """Messages built outside a Flower process need the identity Flower would give that process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _train_message(cfg: RunConfig, message: bytes, client: int, round_: int) -> Message:
    conf = ConfigRecord({"config": config_to_json(cfg), "round": round_, "rounds": cfg.rounds, "seed": cfg.seed, "client": client})
    return Message(
        RecordDict({PAYLOAD: bytes_record(message), CONFIG: conf}), dst_node_id=7, message_type=MessageType.TRAIN, group_id=str(round_)
    )


def test_client_app_matches_the_local_client_function(tiny_cfg, task_identity):
    """One train message through the ClientApp gives the very bytes the local runtime's client makes."""
    cfg = tiny_cfg(method="head")
    method, _ = prepare(cfg)
    state = method.init_server()
    ctx = RoundContext(round=1, rounds=cfg.rounds, seed=cfg.seed)
    message = method.downlink(state, ctx, 1)
    expected = method.client_update(message, 1, method.init_client(1), ctx).payload

    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    reply = client_app(_train_message(cfg, message, 1, 1), context)
    assert not reply.has_error()
    got = record_bytes(reply.content)
    assert got == expected
    assert isinstance(method.decode_update(got, 1, state, ctx), TensorUpdate)
    assert STATE in context.state.config_records  # client state persists in the node's context


def test_client_app_reports_a_failing_client(tiny_cfg, task_identity):
    cfg = tiny_cfg(method="head")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client_app(_train_message(cfg, b"not a framed payload", 0, 1), context)
    assert "error" in reply.content.config_records[CONFIG]
    assert PAYLOAD not in reply.content.array_records


def test_query_returns_the_partition_id(task_identity):
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    reply = client_app(Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY), context)
    assert reply.content.config_records[CONFIG]["partition-id"] == 3
    assert get_method("head")  # registry intact after importing the app


class FakeGrid:
    """Nodes answer the partition query at once; ``partitions`` maps node id -> partition-id (None: a reply without config)."""

    def __init__(self, partitions: dict[int, int]) -> None:
        self.partitions = partitions
        self.sent: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.partitions)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.sent)}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            msg = self.sent[mid]
            pid = self.partitions[msg.metadata.dst_node_id]
            # None: the node replies without any fsq.config record
            content = RecordDict({}) if pid is None else RecordDict({CONFIG: ConfigRecord({"partition-id": pid})})
            reply = Message(content, reply_to=msg)
            out.append(reply)
        return out


def test_partitions_map_to_nodes_and_gaps_or_clashes_are_errors(task_identity):
    from fedsqueeze.runtime.flower_app import discover_partitions

    assert discover_partitions(FakeGrid({11: 1, 22: 0, 33: 5}), clients=2, wait_s=1) == {0: 22, 1: 11}
    with pytest.raises(ConfigError, match=r"partition-id \[1\]"):
        discover_partitions(FakeGrid({11: 0}), clients=2, wait_s=0.5)
    # a second claimant of a taken partition, or a node with a non-integer partition-id, is ignored: it
    # neither takes the partition over nor ends the run
    assert discover_partitions(FakeGrid({11: 0, 22: 0, 33: 1}), clients=2, wait_s=1) == {0: 11, 1: 33}
    assert discover_partitions(FakeGrid({11: "one", 22: 0, 33: 1.0, 44: 1}), clients=2, wait_s=1) == {0: 22, 1: 44}
    # a query reply without fsq.config claims nothing (it used to end the ServerApp)
    assert discover_partitions(FakeGrid({11: None, 22: 0, 33: 1}), clients=2, wait_s=1) == {0: 22, 1: 33}
    with pytest.raises(ConfigError, match=r"partition-id \[1\]"):
        discover_partitions(FakeGrid({11: 0, 22: 0}), clients=2, wait_s=0.5)


class ScriptedGrid(FakeGrid):
    """Train messages are answered by ``answer(message) -> reply or None`` (None: never answers)."""

    def __init__(self, answer) -> None:
        super().__init__({})
        self.answer = answer

    def pull_messages(self, ids):
        return [r for r in (self.answer(self.sent[mid]) for mid in ids) if r is not None]


def _hostile_replies():
    """Replies a broken or hostile node could send, and the drop reason each must give."""
    from flwr.app import MetricRecord

    from fedsqueeze.runtime.flower_wire import METRICS

    def payload(msg, **records):
        return Message(RecordDict({PAYLOAD: bytes_record(b"\x00" * 8), **records}), reply_to=msg)

    bad_npy = ArrayRecord({"bytes": Array(dtype="uint8", shape=(4,), stype="numpy.ndarray", data=b"not npy")})
    return {
        0: (
            lambda m: Message(RecordDict({CONFIG: ConfigRecord({"error": "ValueError: boom"})}), reply_to=m),
            "client error: ValueError: boom",
        ),
        1: (lambda m: Message(RecordDict(), reply_to=m), "bad reply: message carries no payload record"),
        2: (lambda m: Message(RecordDict({PAYLOAD: bad_npy}), reply_to=m), "bad reply: payload array is malformed"),
        3: (lambda m: payload(m, **{METRICS: MetricRecord({"train_s": [1.0, 2.0], "codec_s": 1e300})}), None),
        4: (lambda m: None, "no reply within 1s"),
        5: (lambda m: payload(m, **{METRICS: MetricRecord({"train_s": 1e300})}), None),
    }


def test_flower_transport_turns_every_hostile_reply_into_a_drop_reason(tiny_cfg, task_identity):
    from fedsqueeze.runtime.engine import ClientCall
    from fedsqueeze.runtime.flower_app import FlowerTransport, ServerSettings

    cases = _hostile_replies()
    grid = ScriptedGrid(lambda msg: cases[msg.content.config_records[CONFIG]["client"]][0](msg))
    cfg = tiny_cfg(method="head", clients=6, clients_per_round=6)
    transport = FlowerTransport(grid, {c: 100 + c for c in cases}, cfg, ServerSettings(reply_timeout_s=1.0))
    ctx = RoundContext(round=1, rounds=1, seed=0, participants=tuple(cases))
    replies = transport.exchange([ClientCall(c, b"msg", ctx, None) for c in cases])
    for client, (_, reason) in cases.items():
        if reason is None:
            continue
        assert replies[client].payload is None and replies[client].error.startswith(reason), (client, replies[client])
    # list-valued or absurd metrics are not numbers the engine may use: dropped from the metrics, time bounded
    good = replies[3]
    assert good.error is None and good.payload == b"\x00" * 8
    assert "train_s" not in good.metrics and good.compute_s <= 1.5 and good.metrics["codec_s"] <= 1.5
    # a self-reported train_s of 1e300 never reaches the link model: bounded by the time the server waited
    huge = replies[5]
    assert huge.error is None and huge.metrics["train_s"] <= 1.5 and huge.compute_s <= 1.5


def test_deployment_resume_reads_the_checkpoint_of_the_same_config_only(tiny_cfg, tmp_path):
    import dataclasses

    from fedsqueeze.runtime.checkpoint import encode_checkpoint, save_checkpoint
    from fedsqueeze.runtime.flower_app import RESUME_KEY, ServerSettings, _resume_checkpoint

    cfg = tiny_cfg(method="head")
    Path(cfg.out).mkdir(parents=True)
    record = {"round": 1}
    save_checkpoint(
        cfg.out,
        encode_checkpoint(
            config=cfg.to_dict(), round_=1, server_state={"w": 1}, client_states={}, rounds=[record], state_versions={0: (1, 0)}
        ),
    )
    assert _resume_checkpoint(cfg, ServerSettings()) is None  # a fresh run never reads one
    ckpt = _resume_checkpoint(cfg, ServerSettings(resume_from_out=True))
    assert (ckpt.round, ckpt.server_state, ckpt.state_versions) == (1, {"w": 1}, {0: (1, 0)})
    with pytest.raises(ConfigError, match="another config"):
        _resume_checkpoint(dataclasses.replace(cfg, seed=5), ServerSettings(resume_from_out=True))
    assert app_pyproject(cfg, resume=True)["tool"]["flwr"]["app"]["config"][RESUME_KEY] is True
