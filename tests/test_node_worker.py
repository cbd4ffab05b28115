"""The SuperNode's node worker: its frames, its socket path, and (slow) a ClientApp handing a round to a
real worker process, with the same reply as the in-process path."""

from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path

import pytest

from fedsqueeze.runtime import node_worker
from fedsqueeze.runtime.flower_client import request_from_header, request_header
from fedsqueeze.runtime.flower_wire import TrainRequest


def framed(header, blobs):
    buf = io.BytesIO()
    node_worker.send(buf, header, blobs)
    return buf.getvalue()


def test_frames_round_trip():
    data = framed({"a": 1, "b": [2, 3]}, [b"", b"\x00" * 5, b"xyz"])
    assert data.startswith(node_worker.MAGIC)
    assert node_worker.receive(io.BytesIO(data)) == ({"a": 1, "b": [2, 3]}, [b"", b"\x00" * 5, b"xyz"])


def test_bad_frames_are_refused_before_anything_large_is_read(monkeypatch):
    good = framed({"k": "v"}, [b"abc"])
    head = len(node_worker.MAGIC) + 4 + len(b'{"k": "v"}')
    cases = {
        "magic": b"XXXXX\n" + good[len(node_worker.MAGIC) :],
        "truncated": good[:-1],
        "header cap": node_worker.MAGIC + struct.pack("<I", node_worker.MAX_HEADER + 1),
        "blob count": good[:head] + struct.pack("<I", node_worker.MAX_BLOBS + 1),
        "blob cap": good[:head] + struct.pack("<I", 1) + struct.pack("<Q", node_worker.MAX_BLOB + 1),
        "not an object": framed([1, 2], []),  # type: ignore[arg-type]
    }
    for name, data in cases.items():
        with pytest.raises((node_worker.WorkerError, ValueError)):
            node_worker.receive(io.BytesIO(data))
        assert name


def test_socket_path_is_short_and_private(tmp_path):
    short = node_worker.socket_path(str(tmp_path / "s"))
    assert short == (tmp_path / "s").resolve() / node_worker.SOCKET_NAME
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    long = node_worker.socket_path(str(deep))
    assert len(str(long)) <= 107 and long.parent.name == f"fsq-workers-{os.getuid()}"
    assert long.parent.stat().st_mode & 0o077 == 0
    assert long != node_worker.socket_path(str(tmp_path / ("d" * 60) / ("f" * 60)))  # one socket per node


def test_request_header_round_trips():
    req = TrainRequest("{}", 3, 10, 7, 2, 1, (0, 2, 5), (2, 0), "/state", b"\x01\x02")
    assert request_from_header(request_header(req), req.message) == req
    initial = TrainRequest("{}", 1, 10, 7, 2, 0, (2,), None, None, b"")
    assert request_from_header(request_header(initial), b"") == initial


def test_a_worker_answers_a_bad_request_with_an_error_and_stops_by_its_own_pid(tmp_path):
    path = node_worker.socket_path(str(tmp_path / "node"))
    header, blobs = node_worker.call(path, 30.0, {"round": 1}, [b"only one blob"])  # starts the worker
    assert header == {"ok": False, "error": "WorkerError: a train request has two blobs: message and client state"}
    assert blobs == []
    pid = int(path.with_suffix(".pid").read_text())
    # a PID file naming another process (this one) is never signalled
    path.with_suffix(".pid").write_text(str(os.getpid()))
    assert not node_worker.stop(path)
    path.with_suffix(".pid").write_text(str(pid))
    assert node_worker.stop(path)
    for _ in range(400):  # until its clean-up has run to the end
        if "exiting" in path.with_suffix(".log").read_text():
            break
        time.sleep(0.05)
    assert not path.exists() and not path.with_suffix(".pid").exists()  # SIGTERM ran its clean-up
    assert "exiting" in path.with_suffix(".log").read_text()


@pytest.mark.slow
def test_a_clientapp_hands_its_round_to_the_node_worker_and_gets_the_same_reply(tmp_path, tiny_cfg):
    """Two rounds of one client through a real worker process: the same payloads and client states
    as the in-process path; the second round reuses the worker's prepared task."""
    import time

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsqueeze.runtime.engine import prepare
    from fedsqueeze.runtime.flower_client import train
    from fedsqueeze.runtime.flower_wire import config_to_json, read_reply, train_message

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    cfg = tiny_cfg(method="topk", clients=2, clients_per_round=1, threads=1, local_steps=2)  # topk: a client state (EF)
    method, _ = prepare(cfg)
    server = method.init_server()
    replies, files = {}, {}
    for mode, node_config in (("local", {}), ("worker", {"worker-idle-s": 60.0})):
        state_dir = tmp_path / mode
        context = Context(
            run_id=1,
            node_id=5,
            node_config={"partition-id": 0, "state-dir": str(state_dir), **node_config},
            state=RecordDict(),
            run_config={},
        )
        got = []
        for rnd, version in ((1, None), (2, (1, 0))):
            from fedsqueeze.methods import RoundContext

            message = method.downlink(server, RoundContext(round=rnd, rounds=2, seed=0), 0)
            req = TrainRequest(config_to_json(cfg), rnd, 2, 0, 0, 0, (0,), version, None, message)
            t0 = time.perf_counter()
            payload, metrics, error = read_reply(train(train_message(req, 5), context))
            assert error is None, error
            got.append((payload, time.perf_counter() - t0))
        replies[mode] = got
        files[mode] = {p.name: p.read_bytes() for p in state_dir.rglob("client-0-*.tree")}
    assert [p for p, _ in replies["worker"]] == [p for p, _ in replies["local"]]
    # the same client states, kept the same way (the version the server knows, and the new one)
    assert sorted(files["worker"]) == ["client-0-r000001-a000.tree", "client-0-r000002-a000.tree"]
    assert files["worker"] == files["local"]
    log = (tmp_path / "worker" / "fsq-worker.log").read_text()
    assert log.count("round 1 client 0") == 1 and log.count("round 2 client 0") == 1
    sock = Path(tmp_path / "worker" / node_worker.SOCKET_NAME)
    assert sock.exists()  # still serving (until 60 s idle, or its owner is gone): stopped by its PID
    assert node_worker.stop(sock)
