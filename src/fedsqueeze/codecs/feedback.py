"""Error feedback (EF): the encoder remembers what it did not send and adds it next time.

The memory lives in ``CodecContext.state`` (the client's state, kept by the runtime between the
rounds it takes part in) under a key per codec, one float32 residual per tensor name:
``p = x + residual``, send ``c(p)``, keep ``residual = p - decode(c(p))``.
"""

from __future__ import annotations

import numpy as np

from fedsqueeze.codecs.base import CodecContext


def with_residual(ctx: CodecContext, key: str, name: str, x: np.ndarray) -> np.ndarray:
    """``x`` plus the remembered residual for ``name`` (a fresh float32 array)."""
    memory = ctx.state.get(key, {})
    p = x.reshape(-1).astype(np.float32)  # astype copies, so the residual update never aliases x
    res = memory.get(name)
    if res is not None and res.shape == p.shape:
        p += res
    return p


def remember(ctx: CodecContext, key: str, name: str, residual: np.ndarray) -> None:
    """Store ``residual`` for ``name`` as this codec's memory."""
    ctx.state.setdefault(key, {})[name] = residual.astype(np.float32, copy=False)
