"""The compact frame of the zeroth-order messages: varints, record runs, and fuzzed decoders."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import tiny_config
from fuzzing import EXAMPLES, REJECTED, TRIED, byte_mutations
from handmade import fresh, shared_task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.methods.zo_wire import Reader, compact_frame, compact_unframe, decode_runs, encode_runs, varint, varints


@given(st.lists(st.integers(0, (1 << 63) - 1), max_size=20))
def test_varints_round_trip(values):
    reader = Reader(memoryview(varints(values)))
    assert [reader.varint(1 << 63) for _ in values] == values
    reader.end()


def test_varint_layout_is_leb128():
    assert varint(0) == b"\x00" and varint(127) == b"\x7f" and varint(128) == b"\x80\x01" and varint(300) == b"\xac\x02"
    with pytest.raises(PayloadError):
        Reader(memoryview(b"\xff" * 10)).varint(1 << 63)  # longer than 9 bytes
    with pytest.raises(PayloadError):
        Reader(memoryview(varint(17))).varint(16)  # over its bound


@given(st.sets(st.integers(1, 99), max_size=40))
def test_record_runs_round_trip(rounds):
    rounds = sorted(rounds)
    fields = encode_runs(rounds, 100)
    assert decode_runs(Reader(memoryview(varints(fields))), 100, 99) == rounds


def test_runs_are_three_varints_for_consecutive_rounds():
    assert encode_runs(list(range(3, 40)), 40) == [1, 0, 37]
    assert encode_runs([2, 3, 7], 10) == [2, 2, 1, 3, 2]


def test_compact_frame_layout_and_checks():
    msg = compact_frame("decomfl-up", 300, [5], b"abc")
    assert msg[:1] == bytes([0x11]) and msg[1:3] == varint(300) and msg[3:7] == b"\x05abc"
    assert msg[7:] == zlib.crc32(msg[:7]).to_bytes(4, "little")
    reader = compact_unframe(msg, "decomfl-up", 300)
    assert reader.varint(10) == 5 and bytes(reader.take(3)) == b"abc"
    for bad, kind, r in [
        (msg, "decomfl-down", 300),
        (msg, "decomfl-up", 301),
        (msg[:-1] + b"\x00", "decomfl-up", 300),
        (b"", "decomfl-up", 1),
    ]:
        with pytest.raises(PayloadError):
            compact_unframe(bad, kind, r)


@st.composite
def compact_mutations(draw, payload: bytes) -> bytes:
    """Damage the content of a compact frame, then give it a correct CRC (so the parser is exercised)."""
    content = draw(byte_mutations(payload[:-4]))
    return content + zlib.crc32(content).to_bytes(4, "little")


def rejected(decode, data) -> bool:
    """Whether ``decode`` refused ``data`` with a PayloadError (anything else escapes and fails the test)."""
    try:
        decode(data)
    except PayloadError:
        return True
    return False


def fuzz_compact(name, decode, payload, examples=EXAMPLES):
    """Nothing but PayloadError may escape ``decode`` on mutations of ``payload`` (counted as tests/fuzzing.py does).

    tests/fuzzing.py's frame-aware mutations parse the general frame; these re-checksum the compact one.
    """
    decode(payload)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.one_of(byte_mutations(payload), compact_mutations(payload)))
    def check(mutated):
        if mutated != payload:
            TRIED[name] += 1
            REJECTED[name] += rejected(decode, mutated)

    check()


@pytest.mark.parametrize(
    "name,options",
    [
        ("decomfl", {"perturbations": 2}),
        ("fedkseed", {"pool_size": 16}),
        ("fedkseed", {"pool_size": 16, "importance": "pro"}),
        ("feedsign", {}),
    ],
)
def test_zo_decoders_raise_only_payload_errors(name, options):
    cfg = tiny_config(
        method=name,
        rounds=6,
        local_steps=3,
        out="/tmp/fedsqueeze-zo-unused",
        options={"params": "head", "warm_start_rounds": 1, "warm_start_steps": 1, **options},
    )
    m = get_method(name)(cfg)
    m.setup(fresh(shared_task()))
    state, clients = m.init_server(), {}
    for r in (1, 2):
        ctx = RoundContext(r, 6, 0)
        outs = {c: m.client_update(m.downlink(state, ctx, c), c, clients.get(c), ctx) for c in (0, 1)}
        clients.update({c: o.state for c, o in outs.items()})
        state, _ = m.aggregate(state, {c: m.decode_update(o.payload, c, state, ctx) for c, o in outs.items()}, ctx)
    ctx = RoundContext(3, 6, 0)
    up = clients_payload = m.client_update(m.downlink(state, ctx, 0), 0, clients[0], ctx).payload
    fuzz_compact(f"{name}.decode_update[zo]", lambda d: m.decode_update(d, 0, state, ctx), up, EXAMPLES // 4)
    down = m.downlink(state, ctx, 3)  # a client that lacks the warm-start head and round 2's record
    fuzz_compact(f"{name}.catch_up", lambda d: m.zo_catch_up(d, m.init_client_state(), ctx), down, EXAMPLES // 4)
    assert np.all(np.isfinite(m.decode_update(clients_payload, 0, state, ctx).scalars))
