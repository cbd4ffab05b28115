"""fedsqueeze compression for any Flower app: examples/flower_compress (a plain Flower app) with
compression_mod and CompressedStrategy, driven message by message (fast), and through the Flower
simulation engine (slow)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, get_codec
from fedsqueeze.flower_compression import CONFIG, EF_STATE, PAYLOAD, REPORT, CompressedStrategy, codec_seed, compression_mod, record_tensors

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flower_compress"
sys.path.insert(0, str(EXAMPLE))

from flower_compress_example.client_app import app as client_app  # noqa: E402
from flower_compress_example.server_app import make_server_app  # noqa: E402
from flower_compress_example.task import make_net  # noqa: E402

NODES = [11, 12]
BOUND = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    """The example's MLP is tiny: several torch threads only fight over a shared machine's cores."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a Flower process need the identity Flower would give that process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class Grid:
    """What FedAvg.configure_train asks of a Grid: the connected nodes."""

    def get_node_ids(self):
        return list(NODES)


def contexts():
    return {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(), run_config={}) for i, n in enumerate(NODES)
    }


def train_round(strategy, arrays, ctxs, server_round=1, tamper=None):
    """One round as Flower plays it: configure, every node's ClientApp (mods included), aggregate."""
    messages = sorted(strategy.configure_train(server_round, arrays, ConfigRecord({}), Grid()), key=lambda m: m.metadata.dst_node_id)
    replies = [client_app(m, ctxs[m.metadata.dst_node_id]) for m in messages]
    if tamper:
        replies = tamper(replies)
    sizes = [sum(len(v) for v in r.content.config_records[PAYLOAD].values()) if PAYLOAD in r.content.config_records else 0 for r in replies]
    return (*strategy.aggregate_train(server_round, replies), sizes)


def arrays_of(record):
    return {k: v.numpy() for k, v in record.items()}


def test_sz3_compresses_a_real_update_10x_and_stays_within_its_bound():
    init = ArrayRecord(make_net().state_dict())
    plain, _, _ = train_round(FedAvg(fraction_evaluate=0.0), init, contexts())
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), "sz3", mode="abs", bound=BOUND)
    squeezed, metrics, sent = train_round(strategy, init, contexts())

    # the server counts the exact lengths of the payloads the replies carried
    assert [m.payload_bytes for m in strategy.messages] == sent
    assert metrics["fsq-uplink-bytes"] == sum(sent)
    raw = 2 * ArrayRecord(make_net().state_dict()).count_bytes()  # what Flower would have sent
    assert metrics["fsq-uplink-raw-bytes"] == raw and metrics["fsq-uplink-ratio"] == raw / sum(sent)
    assert metrics["fsq-uplink-ratio"] >= 10
    params = sum(a.size for a in arrays_of(init).values())
    assert 2 * params * 4 / sum(sent) >= 10  # also against bare float32
    assert metrics["fsq-dropped"] == 0 and "train_loss" in metrics  # the app's own metrics still aggregate

    # FedAvg of changes each within the bound of the exact ones is within the bound of FedAvg's result
    a, b = arrays_of(plain), arrays_of(squeezed)
    assert list(a) == list(b)
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert worst <= BOUND * (1 + 1e-3)
    assert worst > 0  # it is lossy: the test would notice compression silently switched off


def test_each_client_reports_its_bytes_and_the_payload_decodes_to_its_change():
    init = ArrayRecord(make_net().state_dict())
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), "qsgd", seed=5)
    msg = next(iter(strategy.configure_train(3, init, ConfigRecord({}), Grid())))
    conf = msg.content.config_records[CONFIG]
    assert json.loads(conf["codec"]) == get_codec("qsgd").get_config() and conf["round"] == 3 and conf["records"] == ["arrays"]
    node = msg.metadata.dst_node_id
    reply = client_app(msg, contexts()[node])
    report = reply.content.metric_records[REPORT]
    payload = reply.content.config_records[PAYLOAD]["arrays"]
    assert report["payload-bytes"] == len(payload) and report["raw-bytes"] == init.count_bytes()
    change, _ = decode_tensors(payload, CodecContext(seed=codec_seed(5, 3, node)), codec=get_codec("qsgd"))
    assert set(change) == set(arrays_of(init))


def test_topk_error_feedback_lives_in_the_node_state():
    init = ArrayRecord(make_net().state_dict())
    ctxs = contexts()
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), "topk", k=0.05)
    msg = next(m for m in strategy.configure_train(1, init, ConfigRecord({}), Grid()) if m.metadata.dst_node_id == NODES[0])
    reply = client_app(msg, ctxs[NODES[0]])
    memory = record_tensors(ctxs[NODES[0]].state.array_records[EF_STATE])
    sent, _ = decode_tensors(reply.content.config_records[PAYLOAD]["arrays"], codec=get_codec("topk", k=0.05))
    # what was sent plus what is remembered is the whole change (first round: no older residual)
    from flower_compress_example.task import load_data, train

    net = make_net()
    train(net, *load_data(0))
    for name, before in arrays_of(init).items():
        change = net.state_dict()[name].numpy() - before
        np.testing.assert_allclose(sent[name].ravel() + memory[f"ef:topk/{name}"], change.ravel(), atol=1e-7)
    assert np.count_nonzero(memory["ef:topk/0.weight"]) > 0


def test_messages_without_the_servers_config_pass_through():
    seen = []

    def app(msg, ctx):
        seen.append(msg)
        return Message(RecordDict({"arrays": ArrayRecord({})}), reply_to=msg)

    msg = Message(RecordDict({"arrays": ArrayRecord(make_net().state_dict())}), dst_node_id=11, message_type=MessageType.TRAIN)
    reply = compression_mod(msg, contexts()[11], app)
    assert seen == [msg] and "arrays" in reply.content.array_records and PAYLOAD not in reply.content.config_records


def _with(replies, index, edit):
    edit(replies[index].content)
    return replies


def _payload_of(codec, tensors):
    return ConfigRecord({"arrays": encode_tensors(get_codec(codec), tensors)})


def _set(key, value):
    def edit(content):
        content[key] = value

    return edit


def _weights(change=None):
    arrays = arrays_of(ArrayRecord(make_net().state_dict()))
    if change:
        change(arrays)
    return arrays


HOSTILE = {
    "truncated": lambda c: c.__setitem__(PAYLOAD, ConfigRecord({"arrays": c.config_records[PAYLOAD]["arrays"][:-9]})),
    "another codec": _set(PAYLOAD, _payload_of("fp16", _weights())),
    "wrong shape": _set(PAYLOAD, _payload_of("sz3", _weights(lambda a: a.__setitem__("0.bias", np.zeros(3, np.float32))))),
    "an extra tensor": _set(PAYLOAD, _payload_of("sz3", _weights(lambda a: a.__setitem__("x", np.zeros(3, np.float32))))),
    "a missing tensor": _set(PAYLOAD, _payload_of("sz3", _weights(lambda a: a.pop("0.bias")))),
    "NaN": _set(PAYLOAD, _payload_of("sz3", _weights(lambda a: a["0.bias"].__setitem__(0, np.nan)))),
    "no payload": lambda c: c.__delitem__(PAYLOAD),
    "not bytes": _set(PAYLOAD, ConfigRecord({"arrays": "text"})),
    "another record": _set(PAYLOAD, ConfigRecord({"weights": b"x"})),
    "arrays as well": _set("arrays", ArrayRecord(make_net().state_dict())),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_bad_reply_is_dropped_with_its_reason_and_the_rest_aggregate(attack):
    init = ArrayRecord(make_net().state_dict())
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), "sz3", mode="abs", bound=BOUND)
    arrays, metrics, _ = train_round(strategy, init, contexts(), tamper=lambda rs: _with(rs, 1, HOSTILE[attack]))
    assert metrics["fsq-dropped"] == 1
    bad = [m for m in strategy.messages if m.error]
    assert [m.node for m in bad] == [NODES[1]] and bad[0].error
    # FedAvg went on with the good reply alone: its arrays are that client's decoded model
    assert arrays is not None and metrics["fsq-uplink-bytes"] == strategy.messages[0].payload_bytes


def test_a_reply_from_a_node_not_asked_is_dropped():
    init = ArrayRecord(make_net().state_dict())
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1), "sz3")
    messages = list(strategy.configure_train(1, init, ConfigRecord({}), Grid()))
    ctxs = contexts()
    replies = [client_app(m, ctxs[m.metadata.dst_node_id]) for m in messages]
    _, metrics = strategy.aggregate_train(2, replies)  # round 2 was never configured: stale replies
    assert metrics["fsq-dropped"] == 2 and metrics["fsq-uplink-bytes"] == 0


@pytest.mark.slow
def test_the_plain_flower_app_on_the_simulation_engine(tmp_path, monkeypatch):
    """The example app, uncompressed and with sz3, three rounds each on Flower's simulation engine
    (Ray): the same model within the bound after round 1, >= 10x fewer upload bytes every round,
    and the same accuracy at the end."""
    import ray
    from flwr.simulation import run_simulation

    monkeypatch.setenv("TMPDIR", os.environ.get("FSQ_SIM_TMP", "/tmp/fsq-library"))
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    paths = [str(EXAMPLE), str(Path(__file__).resolve().parent.parent / "src"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))  # Ray's workers import the app

    def simulate(codec):
        done: list = []
        models: dict = {}
        backend = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": 2,
                "logging_level": "error",
                "log_to_driver": False,
                "_temp_dir": tempfile.mkdtemp(prefix="fsq-ray-"),
            },
        }
        app = make_server_app(codec, {"mode": "abs", "bound": BOUND}, rounds=3, done=done, models=models)
        try:
            run_simulation(app, client_app, 2, backend_config=backend)
        finally:
            if ray.is_initialized():
                ray.shutdown()
        assert done, "the ServerApp did not finish"
        return done[0][0], done[0][1], models

    plain, _, plain_models = simulate("")
    squeezed, strategy, squeezed_models = simulate("sz3")
    a, b = arrays_of(plain_models[1]), arrays_of(squeezed_models[1])
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert 0 < worst <= BOUND * (1 + 1e-3)
    assert all(squeezed.train_metrics_clientapp[r]["fsq-uplink-ratio"] >= 10 for r in (1, 2, 3))
    assert len(strategy.messages) == 6 and all(m.error is None and m.payload_bytes > 0 for m in strategy.messages)
    acc_plain, acc_sz3 = plain.evaluate_metrics_serverapp[3]["accuracy"], squeezed.evaluate_metrics_serverapp[3]["accuracy"]
    assert acc_sz3 > 0.5 and abs(acc_plain - acc_sz3) <= 0.05, (acc_plain, acc_sz3)
    print(
        f"sim: round-1 max |diff| {worst:.3g}; ratios {[round(squeezed.train_metrics_clientapp[r]['fsq-uplink-ratio'], 2) for r in (1, 2, 3)]}; accuracy {acc_plain:.3f} vs {acc_sz3:.3f}"
    )
