"""The Flower app's pieces, without a SuperLink: records, config, the ClientApp on one message."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.methods.updates import TensorUpdate
from fedsqueeze.runtime.flower import app_pyproject, flower_env, write_flwr_config
from fedsqueeze.runtime.engine import prepare
from fedsqueeze.runtime.flower_app import RUN_CONFIG_KEY
from fedsqueeze.runtime.flower_client import client_app
from fedsqueeze.runtime.flower_wire import (
    CONFIG, PAYLOAD, STATE, bytes_record, config_from_json, config_to_json, record_bytes,
)


def test_payload_bytes_travel_unchanged_as_uint8():
    data = bytes(range(256)) * 3 + b"\x00"
    rec = bytes_record(data)
    assert rec["bytes"].dtype == "uint8" and rec["bytes"].shape == (len(data),)
    assert record_bytes(RecordDict({PAYLOAD: rec})) == data
    assert record_bytes(RecordDict({PAYLOAD: bytes_record(b"")})) == b""


@pytest.mark.parametrize("bad", [
    np.zeros(4, dtype=np.float32),  # Flower must never see floats it could average
    np.zeros((2, 2), dtype=np.uint8),
])
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
    conf = ConfigRecord({"config": config_to_json(cfg), "round": round_, "rounds": cfg.rounds, "seed": cfg.seed,
                         "client": client})
    return Message(RecordDict({PAYLOAD: bytes_record(message), CONFIG: conf}), dst_node_id=7,
                   message_type=MessageType.TRAIN, group_id=str(round_))


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
    """Nodes answer the partition query at once; ``partitions`` maps node id -> partition-id."""

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
            reply = Message(RecordDict({CONFIG: ConfigRecord({"partition-id": pid})}), reply_to=msg)
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
    with pytest.raises(ConfigError, match=r"partition-id \[1\]"):
        discover_partitions(FakeGrid({11: 0, 22: 0}), clients=2, wait_s=0.5)
