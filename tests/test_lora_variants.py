"""ffa-lora (A frozen, only B and the head travel) and fedsa-lora (A and the head shared, B kept local)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config
from handmade import OUT, build, fresh, shared_task

from fedsqueeze.codecs import decode_tensors
from fedsqueeze.methods import get_method
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.peft import is_lora_a, is_lora_b
from fedsqueeze.methods.weights import read_weights


@pytest.fixture(scope="module")
def task():
    return shared_task()


def test_ffa_lora_freezes_a_and_sends_only_b_and_the_head(task):
    m = build("ffa-lora", fresh(task))
    a_names = [n for n in m.added if is_lora_a(n)]
    assert a_names and not any(is_lora_a(n) for n in m.names)
    assert any(is_lora_b(n) for n in m.names) and any(n.startswith("head.") for n in m.names)
    params = dict(m.task.model.named_parameters())
    a_before = read_weights(params, a_names)
    ctx = RoundContext(round=1, rounds=1, seed=0)
    out = m.client_update(m.downlink(m.init_server(), ctx, 0), 0, None, ctx)
    sent, _ = decode_tensors(out.payload)
    assert set(sent) == set(m.names)
    assert any(np.abs(sent[n]).max() > 0 for n in m.names if is_lora_b(n))  # B trained
    assert all(np.array_equal(a_before[n], params[n].detach().numpy()) for n in a_names)  # A did not move
    # every party builds the same frozen A from the run seed
    again = build("ffa-lora", fresh(task))
    assert all(np.array_equal(a_before[n], dict(again.task.model.named_parameters())[n].detach().numpy()) for n in a_names)


def test_fedsa_lora_keeps_b_in_the_client_state(task):
    m = build("fedsa-lora", fresh(task))
    b_names = m.local_names
    assert b_names and not any(is_lora_b(n) for n in m.names) and any(is_lora_a(n) for n in m.names)
    state = m.init_server()
    ctx1, ctx2 = RoundContext(round=1, rounds=2, seed=0), RoundContext(round=2, rounds=2, seed=0)
    out = m.client_update(m.downlink(state, ctx1, 0), 0, None, ctx1)
    assert set(decode_tensors(out.payload)[0]) == set(m.names)  # no B on the wire
    b1 = out.state["b"]
    assert set(b1) == set(b_names) and any(np.abs(b).max() > 0 for b in b1.values())
    assert 0.0 <= out.metrics["personal_accuracy"] <= 1.0
    # round 2: client 0 continues from its own B
    loaded = {}
    original = m.local_train

    def spy(*args, **kw):
        loaded.update(read_weights(m.local_named))
        return original(*args, **kw)

    m.local_train = spy
    m.client_update(m.downlink(state, ctx2, 0), 0, out.state, ctx2)
    assert all(np.array_equal(loaded[n], b1[n]) for n in b_names)
    # the server evaluates the shared part with B = 0
    m.evaluate(state)
    assert all(np.abs(b).max() == 0 for b in read_weights(m.local_named).values())


def test_fedsa_lora_round_reports_personal_accuracy(task):
    from fedsqueeze.runtime.local import run_round

    cfg = tiny_config(out=OUT, method="fedsa-lora")
    m = get_method("fedsa-lora")(cfg)
    m.setup(fresh(task))
    states: dict = {}
    _, record = run_round(m, m.task, cfg, m.init_server(), states, RoundContext(round=1, rounds=1, seed=0))
    assert 0.0 <= record["personal_accuracy"] <= 1.0 and len(states) == 2
    assert all(set(s["b"]) == set(m.local_names) for s in states.values())
