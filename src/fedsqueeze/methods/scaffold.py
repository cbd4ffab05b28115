"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates that correct client drift.

Every tensor method (fedavg, the codecs, fedsz, head, the PEFT methods) runs it with
``--set scaffold=true``. With x the global trainable tensors, c the server's control variate and
c_i client i's (zero before its first round):

- client: each local step's gradient g of the trainable tensors becomes g − c_i + c, applied to
  ``p.grad`` after backward and before the optimizer step (so AdamW/Adam normalise the corrected
  gradient, and FedProx's term is part of g). After the K local steps, ending at y_i:

  - ``scaffold_control=ii`` (option II of the paper; measured harmful with AdamW, see docs): c_i⁺ = c_i − c + (x − y_i) / (K·lr), with K
    the local steps the loop ran (``local_steps``, or what ``local_epochs`` makes of them) and lr
    the learning rate of the tensor's optimizer group (``lr``; ``head_lr`` for the head when backbone
    parameters train too). Under plain SGD this is the mean of the raw minibatch gradients; the
    paper's derivation assumes SGD, so with ``optimizer=adamw`` (the default) or ``sgd`` (momentum
    0.9 here) the quotient is a rescaled step, not a gradient.
  - ``scaffold_control=grad_mean`` (the default): c_i⁺ = the mean of the raw (uncorrected) minibatch gradients
    of the K steps: what option II equals under plain SGD, and a gradient under any optimizer.

  The client keeps c_i⁺ in its client state (``{"codec": codec state, "c": c_i}``, checkpointed
  and resumed like any client state, and kept in a Flower node's state directory) and uploads
  Δc_i = c_i⁺ − c_i next to its model update.
- server: x is updated exactly as without SCAFFOLD (mean or robust rule, then ``server_opt``), and
  c += (|S|/N)·mean_{i∈S} Δc_i = (1/N)·Σ_{i∈S} Δc_i, S the clients whose updates were accepted this
  round and N = ``clients``. The downlink carries c to every client.

Wire: both directions become a ``scaffold-down`` / ``scaffold-up`` frame of two sections: the
method's own message (the weights or the update, coded by its codec as without SCAFFOLD) and the
control variate (c down, Δc_i up) as a ``raw`` float32 frame. The control variates are not
compressed: a lossy code of Δc_i would break c = mean of the c_i unless every client tracked its
decoded value; their bytes are counted, both ways, as part of the real payloads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, get_codec
from fedsqueeze.codecs.framing import frame, unframe
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.updates import TensorUpdate

Tensors = dict[str, np.ndarray]

DOWN_KIND = "scaffold-down"
UP_KIND = "scaffold-up"
CONTROLS = ("grad_mean", "ii")


@dataclass(frozen=True)
class ScaffoldUpdate(TensorUpdate):
    """A tensor update plus the client's change Δc_i to its control variate."""

    control: Tensors


def zeros_like(tensors: Tensors) -> Tensors:
    """A zero float32 tensor per name (c and c_i before any round)."""
    return {n: np.zeros(a.shape, dtype=np.float32) for n, a in tensors.items()}


# ---- the rules ------------------------------------------------------------------------------------


def option2_control(c_i: Tensors, c: Tensors, x: Tensors, y: Tensors, steps: int, lrs: dict[str, float]) -> Tensors:
    """Option II: c_i⁺ = c_i − c + (x − y) / (K·lr), per tensor with its own lr, in float32."""
    return {n: (c_i[n] - c[n] + (x[n] - y[n]) / np.float32(steps * lrs[n])).astype(np.float32) for n in c_i}


def server_control(c: Tensors, deltas: Sequence[Tensors], total_clients: int) -> Tensors:
    """c + (|S|/N)·mean(Δc_i) = c + Σ Δc_i / N, summed in float64 in the given order."""
    out = {}
    for n, a in c.items():
        total = np.zeros(a.shape, dtype=np.float64)
        for d in deltas:
            total += d[n]
        out[n] = (a.astype(np.float64) + total / total_clients).astype(np.float32)
    return out


@contextmanager
def corrected_gradients(params: dict[str, torch.Tensor], correction: Tensors, grad_sums: Tensors | None = None) -> Iterator[None]:
    """While open, every backward pass leaves ``p.grad + correction[name]`` in each parameter's grad.

    The correction is added once per backward, after the gradient is accumulated and before the
    optimizer reads it. With ``grad_sums``, the raw gradient (before the correction) is added to
    ``grad_sums[name]`` first (for ``scaffold_control=grad_mean``).
    """
    handles = []
    for name, p in params.items():
        corr = torch.from_numpy(correction[name]).to(p.dtype)

        def hook(param: torch.Tensor, corr: torch.Tensor = corr, name: str = name) -> None:
            if param.grad is None:
                return
            if grad_sums is not None:
                grad_sums[name] += param.grad.detach().cpu().numpy().astype(np.float32)
            param.grad.add_(corr.to(param.grad.device))

        handles.append(p.register_post_accumulate_grad_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- the wire -------------------------------------------------------------------------------------

RAW = get_codec("raw")


def encode_control(tensors: Tensors) -> bytes:
    """A control variate (c or Δc_i) as a raw float32 frame."""
    return encode_tensors(RAW, tensors)


def decode_control(data: memoryview | bytes, limits: CodecContext) -> Tensors:
    """A control variate from a raw frame, decoded within ``limits`` (the caller checks names, shapes, values)."""
    tensors, _ = decode_tensors(data, limits, codec=RAW)
    return tensors


def pack(kind: str, message: bytes, control: bytes) -> bytes:
    """One frame of two sections: the method's own message, then the control variate's frame."""
    return frame(kind, {"sections": [len(message), len(control)]}, message + control)


def unpack(kind: str, data: bytes | memoryview) -> tuple[memoryview, memoryview]:
    """The two sections of a :func:`pack` frame; PayloadError unless their lengths fill the body."""
    _, meta, body = unframe(data, expect_kind=kind, max_meta_bytes=256)
    sections = meta.get("sections") if isinstance(meta, dict) else None
    if (
        not isinstance(sections, list)
        or len(sections) != 2
        or not all(type(s) is int and s >= 0 for s in sections)
        or sum(sections) != len(body)
    ):
        raise PayloadError(f"{kind} frame: bad 'sections' {sections!r} for a {len(body)}-byte body")
    return body[: sections[0]], body[sections[0] :]
