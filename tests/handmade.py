"""Hand-made cases shared by the pinned tests and the fuzz tests: small methods, payloads, frame parsing."""

from __future__ import annotations

import copy
import dataclasses
import json
import struct
import zlib

import numpy as np
from conftest import tiny_config

from fedsqueeze.codecs import frame
from fedsqueeze.methods import get_method

OUT = "/tmp/fedsqueeze-pinned-unused"


def fresh(task):
    """The same task with its own copy of the model (for methods that change the model)."""
    return dataclasses.replace(task, model=copy.deepcopy(task.model), _features={})


def build(name, task, **options):
    cfg = tiny_config(method=name, out=OUT, options=dict(options))
    method = get_method(name)(cfg)
    method.setup(task)
    return method


def hand_deltas(method, seed, scale=1e-2):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(method.shapes[n]) * scale).astype(np.float32) for n in method.names}


def parse_frame(data: bytes):
    """Our own reading of the frame layout of codecs/framing.py: (kind, meta, body, total length check)."""
    assert data[:4] == b"FSQZ" and data[4] == 1
    (kind_len,) = struct.unpack_from("<H", data, 5)
    pos = 7
    kind = data[pos : pos + kind_len].decode()
    pos += kind_len
    (meta_len,) = struct.unpack_from("<I", data, pos)
    pos += 4
    meta = json.loads(data[pos : pos + meta_len])
    pos += meta_len
    (body_len,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    body = data[pos : pos + body_len]
    pos += body_len
    (crc,) = struct.unpack_from("<I", data, pos)
    assert pos + 4 == len(data) and crc == zlib.crc32(data[:pos])
    return kind, meta, body


def frame_size(kind: str, meta: dict, body_len: int) -> int:
    return 4 + 1 + 2 + len(kind) + 4 + len(json.dumps(meta, separators=(",", ":"))) + 8 + body_len + 4


def mask_payload(m, state, ctx, client, keep, head_delta, n):
    """A client's real upload whose drawn mask is exactly ``keep`` (θ_client ∈ {0, 1} makes ``u < θ`` = keep)."""
    sym, levels = state["theta_sym"], int(state["levels"])
    theta_start = m.start_theta(m.theta_of(sym, levels))
    u = m.server_uniforms(ctx, client)  # the client's own draw (its stratum, with stratify), as the server recomputes it
    mask_meta, mask_body, _ = m.encode_mask(u, keep.astype(np.float32), theta_start, sym, levels, ctx)
    head_meta, head_body = m.wire.encode_head(head_delta)
    meta = {"n": n, "mask": mask_meta, "head": head_meta, "sections": [len(mask_body), len(head_body)]}
    return frame(m.uplink_kind, meta, mask_body + head_body)


def hand_head(m, seed):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(m.head_shapes[n]) * 1e-2).astype(np.float32) for n in m.head_names}


_TASKS: dict = {}


def task_for(cfg):
    """The task of ``cfg``'s data and model settings, built once per process and shared (copy it with
    :func:`fresh` before a set-up that changes the model)."""
    from fedsqueeze.task import build_task

    key = (cfg.model, cfg.dataset, cfg.train_size, cfg.test_size, cfg.seed, cfg.max_length, cfg.clients, cfg.partition, cfg.alpha)
    if key not in _TASKS:
        _TASKS[key] = build_task(cfg)
    return _TASKS[key]


def shared_task():
    """The tiny task of ``tiny_config()``, built once per process (mutation runs fork from a process
    that built it, so each mutant's tests skip the ~10 s of tokenization and model loading)."""
    return task_for(tiny_config(out=OUT))


def evaluate_final_state(cfg):
    """``(accuracy, loss, test examples)`` of the run's checkpointed final server state, evaluated afresh.

    The task (data and pre-trained model) is built once per data/model setting and copied, so the
    method's set-up (adapter injection...) never touches the cached one.
    """
    from fedsqueeze.runtime.checkpoint import load_checkpoint

    ckpt = load_checkpoint(cfg.out)
    assert ckpt is not None and ckpt.round == cfg.rounds, f"no checkpoint of round {cfg.rounds} in {cfg.out}"
    task = task_for(cfg)
    method = get_method(cfg.method)(cfg)
    method.setup(fresh(task))
    return (*method.evaluate(ckpt.server_state), len(task.test))


def assert_accuracy_is_real(cfg, res):
    """Every round's accuracy is a count of correct test examples, and the final one is exactly what
    evaluating the final server state gives (an assertion that a broken evaluation or state fails)."""
    acc, loss, n_test = evaluate_final_state(cfg)
    for r in res["rounds"]:
        correct = r["accuracy"] * n_test
        assert 0 <= r["accuracy"] <= 1 and abs(correct - round(correct)) < 1e-6, r["accuracy"]
    assert res["rounds"][-1]["accuracy"] == acc == res["final"]["accuracy"]
    assert abs(res["rounds"][-1]["loss"] - loss) <= 1e-9 * max(1.0, abs(loss))


def zeros_zstd(size: int, piece: int = 1 << 20) -> bytes:
    """A zstd frame of ``size`` zero bytes (content size written), made without holding them all."""
    import zstandard

    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    zero, out, left = bytes(piece), [], size
    while left:
        step = min(piece, left)
        out.append(cobj.compress(zero[:step]))
        left -= step
    out.append(cobj.flush())
    return b"".join(out)
