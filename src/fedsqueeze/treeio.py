"""Safe serialization of state trees (server state, client state, checkpoints, Flower records).

A tree is built from dicts (str or int keys), lists, tuples, str, int, float, bool, None and numpy
arrays. ``pack_tree`` writes a framed payload: a JSON skeleton in the header where every array is
``{"__array__": i}``, and the arrays' raw bytes in the body (table: dtype, shape). No pickle, no eval:
``unpack_tree`` only ever builds the types above.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsqueeze.codecs.base import CodecContext, check_table, tensor_table
from fedsqueeze.codecs.framing import frame, unframe
from fedsqueeze.errors import PayloadError

KIND = "tree"


def _encode(obj: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        arrays.append(np.ascontiguousarray(obj))
        return {"__array__": len(arrays) - 1}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), arrays)
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"tree dict keys must be str or int, got {type(k).__name__}")
        return {"__dict__": [[k, _encode(v, arrays)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_encode(v, arrays) for v in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state tree")


def pack_tree(obj: Any) -> bytes:
    """Serialize a state tree to framed bytes."""
    arrays: list[np.ndarray] = []
    skeleton = _encode(obj, arrays)
    named = {str(i): a for i, a in enumerate(arrays)}
    body = b"".join(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in arrays)
    return frame(KIND, {"skeleton": skeleton, "arrays": tensor_table(named)}, body)


def _decode(node: Any, arrays: list[np.ndarray], depth: int = 0) -> Any:
    if depth > 64:
        raise PayloadError("state tree nested too deeply")
    if isinstance(node, dict):
        if set(node) == {"__array__"}:
            i = node["__array__"]
            if not isinstance(i, int) or not 0 <= i < len(arrays):
                raise PayloadError("state tree refers to a missing array")
            return arrays[i]
        if set(node) == {"__dict__"} and isinstance(node["__dict__"], list):
            out = {}
            for item in node["__dict__"]:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))):
                    raise PayloadError("malformed dict entry in state tree")
                out[item[0]] = _decode(item[1], arrays, depth + 1)
            return out
        if set(node) == {"__list__", "tuple"} and isinstance(node["__list__"], list):
            items = [_decode(v, arrays, depth + 1) for v in node["__list__"]]
            return tuple(items) if node["tuple"] else items
        if set(node) == {"__float__"} and node["__float__"] in ("nan", "inf", "-inf"):
            return float(node["__float__"])
        raise PayloadError("unknown node in state tree")
    if node is None or isinstance(node, (str, int, float, bool)):
        return node
    raise PayloadError("unknown value in state tree")


def unpack_tree(data: bytes | bytearray | memoryview, max_elements: int | None = None) -> Any:
    """Inverse of :func:`pack_tree`; arrays are fresh, writable copies."""
    _, meta, body = unframe(data, expect_kind=KIND)
    rows = check_table(meta.get("arrays"), CodecContext(max_elements=max_elements))
    need = sum(numel * dt.itemsize for _, dt, _, numel in rows)
    if need != len(body):
        raise PayloadError(f"state tree body is {len(body)} bytes, its table needs {need}")
    arrays, pos = [], 0
    for _, dt, shape, numel in rows:
        nbytes = numel * dt.itemsize
        arrays.append(np.frombuffer(body[pos : pos + nbytes], dtype=dt.newbyteorder("<")).reshape(shape).copy())
        pos += nbytes
    return _decode(meta.get("skeleton"), arrays)
