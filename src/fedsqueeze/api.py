"""The public Python API: codecs on named tensors, runs from code, and the extension points.

Everything here is also reachable as ``fedsqueeze.<name>`` (loaded on first use, so
``import fedsqueeze`` stays cheap). docs/api.md shows each call; its examples run as tests.

- :func:`codec`, :func:`encode`, :func:`decode`, :func:`bits_per_param`: compress a dict of named
  numpy arrays with any registered codec and count the exact bits per parameter of the payload.
- :func:`run_config`, :func:`run`: build a :class:`RunConfig` and run it on its runtime, as
  ``fedsqueeze run`` does; the results are results.json's content.
- :class:`Codec` / :func:`register_codec`, :class:`Method` / :func:`register_method`: add a codec
  or a method by subclassing; a package can register them through the entry point groups
  ``fedsqueeze.codecs`` / ``fedsqueeze.methods`` (:mod:`fedsqueeze.plugins`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.codecs import CODECS, Codec, CodecContext, decode_tensors, encode_tensors, get_codec, register_codec
from fedsqueeze.config import RunConfig, build_config
from fedsqueeze.errors import ConfigError, FedsqueezeError, PayloadError
from fedsqueeze.methods import METHODS, ClientOutput, Method, RoundContext, register_method
from fedsqueeze.plugins import CODEC_GROUP, METHOD_GROUP, load_group

Tensors = dict[str, np.ndarray]
Expect = dict[str, tuple[str, tuple[int, ...]]]

__all__ = [
    "CODECS",
    "METHODS",
    "ClientOutput",
    "Codec",
    "CodecContext",
    "ConfigError",
    "FedsqueezeError",
    "Method",
    "PayloadError",
    "RoundContext",
    "RunConfig",
    "bits_per_param",
    "codec",
    "decode",
    "encode",
    "expected",
    "load_plugins",
    "register_codec",
    "register_method",
    "run",
    "run_config",
]  # re-exported as fedsqueeze.<name>


def codec(spec: str | dict[str, Any] | Codec, **options: Any) -> Codec:
    """A codec by id with its options (``codec("sz3", mode="abs", bound=1e-3)``), or from a
    ``get_config()`` dict. Unknown ids and options are a :class:`ConfigError` naming the valid ones."""
    return get_codec(spec, **options)


def encode(codec: Codec, tensors: Tensors, ctx: CodecContext | None = None) -> bytes:
    """One framed payload holding ``tensors`` (names, dtypes and shapes travel with it).

    ``ctx`` carries the round's shared seed and, for codecs with error feedback (topk, sign), the
    encoder's memory: pass the same context every round to one encoder.
    """
    return encode_tensors(codec, tensors, ctx)


def expected(like: Tensors | Expect) -> Expect:
    """The ``expect`` table (name -> (dtype, shape)) of a dict of arrays, or the table itself."""
    table: Expect = {}
    for name, value in like.items():
        if isinstance(value, np.ndarray):
            table[name] = (str(value.dtype), tuple(value.shape))
        else:
            dtype, shape = value
            table[name] = (str(np.dtype(dtype)), tuple(int(d) for d in shape))
    return table


def decode(payload: bytes | bytearray | memoryview, codec: Codec, like: Tensors | Expect | None = None, seed: int = 0) -> Tensors:
    """The tensors of a payload made by ``codec``; a :class:`PayloadError` if it is anything else.

    ``like`` (arrays, or a name -> (dtype, shape) table) is what the receiver expects: with it, a
    payload naming any other tensor, dtype or shape is refused before anything is allocated, so
    bytes from a peer never decide how much memory is used. ``seed`` is the encoder's ``ctx.seed``.
    """
    expect = None if like is None else expected(like)
    cap = None if expect is None else sum(math.prod(shape) for _, shape in expect.values())
    tensors, _ = decode_tensors(payload, CodecContext(seed=seed, max_elements=cap, expect=expect), codec=codec)
    return tensors


def bits_per_param(payload: bytes | bytearray | memoryview | int, tensors: Tensors | int) -> float:
    """Exact bits per parameter: the payload's length (headers included) times 8 over the number
    of values in ``tensors`` (or a count of them)."""
    nbytes = payload if isinstance(payload, int) else len(payload)
    count = tensors if isinstance(tensors, int) else sum(int(a.size) for a in tensors.values())
    if count <= 0:
        raise ConfigError("bits_per_param needs at least one parameter")
    return nbytes * 8 / count


def run_config(source: RunConfig | dict[str, Any] | str | Path | None = None, **fields: Any) -> RunConfig:
    """A validated :class:`RunConfig` from a TOML file, a dict or a RunConfig, with ``fields`` on top.

    Keys that are not run fields (and the ``options`` table) are method and codec options, exactly
    as ``--set`` and ``[options]`` in a TOML file: ``run_config(method="topk", topk_k=0.001)``.
    """
    path: str | Path | None = None
    values: dict[str, Any] = {}
    if isinstance(source, RunConfig):
        values = source.to_dict()
    elif isinstance(source, dict):
        values = dict(source)
    elif source is not None:
        path = source
    merged = {**values, **fields}
    options = merged.pop("options", {}) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"options must be a dict, got {type(options).__name__}")
    from fedsqueeze.models.catalogue import default_dataset  # lazy: the models package imports torch

    return build_config(path, None, {**options, **merged}, dataset_for_model=default_dataset)


def run(source: RunConfig | dict[str, Any] | str | Path | None = None, *, progress: bool = False, **fields: Any) -> dict[str, Any]:
    """Run a config (see :func:`run_config`) on its runtime; results.json's content.

    Like ``fedsqueeze run``, it writes ``OUT/results.json`` and ``OUT/rounds.csv`` and refuses an
    ``out`` that already holds a run's results unless ``overwrite=True``. For ``runtime="flower"``
    pass ``superlink=`` and ``root_certificates=`` (or ``insecure=True``).
    """
    from fedsqueeze import runners

    link = {k: fields.pop(k) for k in ("superlink", "root_certificates", "insecure") if k in fields}
    return runners.run(run_config(source, **fields), show_progress=progress, **link)


def load_plugins() -> dict[str, list[str]]:
    """(Re)scan the installed entry points of both groups (importing fedsqueeze scans them once);
    the codecs and methods that are new."""
    before: dict[str, dict[str, type]] = {"codecs": dict(CODECS), "methods": dict(METHODS)}
    load_group(CODEC_GROUP, CODECS, Codec, "codec_id")
    load_group(METHOD_GROUP, METHODS, Method, "name")
    now: dict[str, dict[str, type]] = {"codecs": dict(CODECS), "methods": dict(METHODS)}
    return {kind: sorted(n for n, cls in now[kind].items() if before[kind].get(n) is not cls) for kind in now}
