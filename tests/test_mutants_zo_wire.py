"""The zeroth-order methods' compact frame (methods/zo_wire.py) byte by byte on hand-made cases
(mutation testing: benchmarks/mutants.py, section ``zo_wire``)."""

from __future__ import annotations

import struct
import zlib

import pytest

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.zo_wire import (
    COMPACT_VERSION,
    KINDS,
    MAX_VARINT_BYTES,
    Reader,
    compact_frame,
    compact_unframe,
    decode_runs,
    encode_runs,
    varint,
    varints,
)


def _reader(data: bytes) -> Reader:
    return Reader(memoryview(data))


def _framed(content: bytes) -> bytes:
    return content + struct.pack("<I", zlib.crc32(content))


def test_constants():
    assert COMPACT_VERSION == 1 and MAX_VARINT_BYTES == 9
    assert KINDS == {"decomfl-up": 1, "decomfl-down": 2, "fedkseed-up": 3, "fedkseed-down": 4, "feedsign-up": 5, "feedsign-down": 6}


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),  # low 7 bits first, high bit: more follow
        (300, b"\xac\x02"),  # 300 = 0b10_0101100
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        ((1 << 63) - 1, b"\xff" * 8 + b"\x7f"),
    ],
)
def test_varint_bytes_and_back(value, encoded):
    assert varint(value) == encoded
    reader = _reader(encoded)
    assert reader.varint(value) == value  # a value equal to its limit is allowed
    assert reader.pos == len(encoded) and reader.rest() == 0
    reader.end()


def test_varint_range_and_varints():
    for bad in (-1, 1 << 63):
        with pytest.raises(ValueError, match="varint out of range"):
            varint(bad)
    assert varints([1, 128, 0]) == b"\x01\x80\x01\x00"
    assert varints([]) == b""


def test_reader_varint_refuses_what_is_over_its_bound_truncated_or_too_long():
    with pytest.raises(PayloadError, match="message field 301 is over its bound 300"):
        _reader(varint(301)).varint(300)
    with pytest.raises(PayloadError, match="truncated inside a varint"):
        _reader(b"\x80").varint(10)
    with pytest.raises(PayloadError, match="truncated inside a varint"):
        _reader(b"").varint(10)
    with pytest.raises(PayloadError, match="longer than 9 bytes"):
        _reader(b"\x80" * 9 + b"\x00").varint(1 << 62)
    nine = b"\x80" * 8 + b"\x01"  # 1 << 56 in exactly nine bytes: read
    assert _reader(nine).varint(1 << 62) == 1 << 56
    reader = _reader(b"\x05\x81\x01\x07")
    assert [reader.varint(200), reader.varint(200), reader.varint(200)] == [5, 129, 7]


def test_reader_take_rest_and_end():
    reader = _reader(b"abcdef")
    assert bytes(reader.take(2)) == b"ab" and reader.pos == 2 and reader.rest() == 4
    assert bytes(reader.take(0)) == b""
    with pytest.raises(PayloadError, match="truncated: 5 bytes needed, 4 left"):
        reader.take(5)
    assert reader.pos == 2  # nothing consumed by the refusal
    with pytest.raises(PayloadError, match="has 4 trailing bytes"):
        reader.end()
    assert bytes(reader.take(4)) == b"cdef" and reader.rest() == 0
    reader.end()


def test_compact_frame_bytes():
    frame = compact_frame("fedkseed-up", 5, [1, 300], b"ab")
    content = b"\x31" + b"\x05" + b"\x01\xac\x02" + b"ab"  # tag = 3 << 4 | 1
    assert frame == _framed(content)
    assert compact_frame("decomfl-up", 200, [], b"") == _framed(b"\x11\xc8\x01")


def test_compact_unframe_checks_everything_and_positions_after_the_round():
    frame = compact_frame("feedsign-down", 300, [7], b"xyz")
    reader = compact_unframe(frame, "feedsign-down", 300)
    assert reader.pos == 3  # tag (1) + round 300 (2)
    assert reader.varint(10) == 7 and bytes(reader.take(3)) == b"xyz"
    reader.end()  # the CRC is not part of the content
    assert compact_unframe(bytearray(frame), "feedsign-down", 300).rest() == 4
    assert compact_unframe(memoryview(frame), "feedsign-down", 300).rest() == 4
    with pytest.raises(PayloadError, match="round 300, expected 301"):
        compact_unframe(frame, "feedsign-down", 301)
    with pytest.raises(PayloadError, match=r"kind 6 where 'feedsign-up' \(5\) was expected"):
        compact_unframe(frame, "feedsign-up", 300)
    with pytest.raises(PayloadError, match="unsupported compact message version 2 \\(this build reads 1\\)"):
        compact_unframe(_framed(b"\x62\x01"), "feedsign-down", 1)
    bad = bytearray(frame)
    bad[4] ^= 1
    with pytest.raises(PayloadError, match="checksum mismatch"):
        compact_unframe(bytes(bad), "feedsign-down", 300)
    bad = bytearray(frame)
    bad[-1] ^= 1  # the CRC itself
    with pytest.raises(PayloadError, match="checksum mismatch"):
        compact_unframe(bytes(bad), "feedsign-down", 300)
    # the smallest frame: tag, one round byte, CRC (6 bytes); one byte less is too short
    smallest = _framed(b"\x61\x01")
    assert compact_unframe(smallest, "feedsign-down", 1).rest() == 0
    with pytest.raises(PayloadError, match=r"too short \(5 bytes\)"):
        compact_unframe(smallest[:5], "feedsign-down", 1)


@pytest.mark.parametrize(
    ("rounds", "current", "fields"),
    [
        ([], 5, [0]),
        ([1, 2, 3, 4], 5, [1, 0, 4]),  # every round since: one run right below current
        ([2], 9, [1, 6, 1]),  # 9 - 2 - 1 = 6 rounds skipped
        ([1, 2, 5, 6], 8, [2, 1, 2, 2, 2]),  # newest first: (5, 6) after a gap of 1, then (1, 2) after a gap of 2
        ([1, 3, 5], 6, [3, 0, 1, 1, 1, 1, 1]),
    ],
)
def test_record_runs_both_ways(rounds, current, fields):
    assert encode_runs(rounds, current) == fields
    reader = _reader(varints(fields))
    assert decode_runs(reader, current, max(len(rounds), 1)) == rounds
    reader.end()


def test_decode_runs_refuses_a_malformed_or_oversized_list():
    with pytest.raises(PayloadError, match="over its bound 3"):
        decode_runs(_reader(varints([4])), 10, 3)  # more runs than records allowed
    with pytest.raises(PayloadError, match="malformed record list"):
        decode_runs(_reader(varints([1, 0, 0])), 10, 3)  # a run of length 0
    with pytest.raises(PayloadError, match="malformed record list"):
        decode_runs(_reader(varints([1, 3, 2])), 5, 3)  # last = 5 - 3 - 1 = 1, first = 0: before round 1
    assert decode_runs(_reader(varints([1, 3, 1])), 5, 3) == [1]  # first = 1: allowed
    with pytest.raises(PayloadError, match="over its bound 1"):
        decode_runs(_reader(varints([2, 0, 2, 0, 2])), 10, 3)  # the second run's length is capped by what is left
    with pytest.raises(PayloadError, match="over its bound 10"):
        decode_runs(_reader(varints([1, 11, 1])), 10, 3)  # a gap beyond current
