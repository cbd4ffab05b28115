"""The mask methods' wire formats: the coded θ downlink and the uplink's sections (each one frame).

Downlink (``kind = "mask-down"``), the same body for every client, is *coded*, not 32 bpp:
``θ`` is sent as integer symbols ``θ · L`` with ``L`` levels, entropy-coded with rANS under their
own histogram (:func:`fedsqueeze.codecs.ans.encode_symbols`); the head follows as float32 (or
float16). Body: ``[θ symbols ANS words][head weights]``; meta: ``levels``, the histogram, the
head's tensor table, the section lengths and, with stratified draws, the client's ``stratum``
``[k, K]``.

Delta downlink (``kind = "mask-delta-down"``, ``downlink=delta``): the catch-up header of
:mod:`fedsqueeze.methods.mask_downlink` (base and target rounds, mode, rounds, part lengths, the
digest of the view reached), the head's table, the two section lengths and the stratum; body:
``[parts][head weights]``, the parts being θ steps (a replay) or the whole θ (a refresh).

Uplink (``kind`` = the method's, e.g. ``"fedpm-up"``): body ``[mask code][head delta]``; meta:
``n`` (examples), the mask code's header (the method's own, see :meth:`MaskMethod.encode_mask`),
the head's tensor table and the section lengths.

Every decoder checks what it reads and raises PayloadError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from fedsqueeze.codecs import CodecContext, RawCodec, expect_tensors
from fedsqueeze.codecs.ans import decode_symbols, encode_symbols
from fedsqueeze.codecs.base import all_finite, split_body
from fedsqueeze.codecs.framing import frame, unframe
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.updates import example_count

Tensors = dict[str, np.ndarray]
DOWN_KIND = "mask-down"
DELTA_DOWN_KIND = "mask-delta-down"


def split_sections(body: memoryview, lengths: Any, count: int) -> list[memoryview]:
    """``body`` cut into exactly ``count`` sections of the header's ``lengths``."""
    parts = split_body(body, lengths)
    if len(parts) != count:
        raise PayloadError(f"payload has {len(parts)} sections, expected {count}")
    return parts


def parse_stratum(meta: dict[str, Any]) -> tuple[int, int] | None:
    """The ``[k, K]`` stratum a downlink header names (None without one), checked."""
    stratum = meta.get("stratum")
    if stratum is None:
        return None
    if not (
        isinstance(stratum, list) and len(stratum) == 2 and all(type(x) is int for x in stratum) and 0 <= stratum[0] < stratum[1] <= 1 << 20
    ):
        raise PayloadError(f"server message has an invalid stratum {stratum!r}")
    return stratum[0], stratum[1]


@dataclass(frozen=True)
class MaskDownlink:
    """A decoded ``mask-down`` message."""

    sym: np.ndarray  # θ symbols: uint8, or uint16 above 255 levels
    levels: int
    head: Tensors  # float32
    stratum: tuple[int, int] | None


@dataclass(frozen=True)
class MaskLimits:
    """The largest mask section and mask header an honest client sends this round, in bytes.

    Each method works them out from its configuration and the model (masked weights, the round's
    cap on flipped positions, the filter kind); the server refuses anything larger before it parses
    the header or allocates for the mask.
    """

    body_bytes: int
    meta_bytes: int


@dataclass(frozen=True)
class MaskUplink:
    """The sections of a decoded uplink frame; the mask code is left to the method."""

    n: int
    mask_meta: Any
    mask_body: memoryview
    head_delta: Tensors  # float32


@dataclass(frozen=True)
class MaskWire:
    """What both sides know of the mask messages: the masked weights' count and the head's layout."""

    n: int  # masked weights
    head_shapes: dict[str, tuple[int, ...]]  # in wire order
    head_dtype: str  # "float32" or "float16"

    # ---- the head section ---------------------------------------------------------------------
    @property
    def head_bytes(self) -> int:
        """Bytes of the head section: every head tensor in the wire dtype."""
        return sum(int(np.prod(s)) for s in self.head_shapes.values()) * np.dtype(self.head_dtype).itemsize

    @cached_property
    def head_meta_bytes(self) -> int:
        """A cap on the head section's table: the honest table's own JSON length and 64 bytes of slack.

        Parsing JSON takes up to ~25 bytes of Python objects per byte of text (a table of empty
        lists), so the generic bound for a tensor table (``meta_bound``: 16 KiB and more) would let a
        header of empty lists make a tiny model's server allocate twice the mask's budget.
        """
        table, _ = self.encode_head({n: np.zeros(s, np.float32) for n, s in self.head_shapes.items()})
        return len(json.dumps(table, separators=(",", ":"))) + 64

    def encode_head(self, tensors: Tensors) -> tuple[dict[str, Any], bytes]:
        """Head weights or deltas as raw tensors in the wire dtype: ``(table, body)``."""
        dt = np.dtype(self.head_dtype)
        return RawCodec().encode({n: np.asarray(a).astype(dt) for n, a in tensors.items()}, CodecContext())

    def decode_head(self, meta: Any, body: memoryview, what: str) -> Tensors:
        """The head tensors (float32) of a section: exactly the head's names and shapes, finite."""
        if not isinstance(meta, dict):
            raise PayloadError(f"{what}: no head table")
        cap = sum(int(np.prod(s)) for s in self.head_shapes.values())
        # exactly the head's names, the wire dtype and shapes, checked before anything is read
        expect = expect_tensors(self.head_shapes, self.head_dtype)
        try:
            tensors = RawCodec().decode(meta, body, CodecContext(max_elements=cap, expect=expect))
        except PayloadError as exc:
            raise PayloadError(f"{what}: head tensor table: {exc}") from None
        if set(tensors) != set(self.head_shapes):
            raise PayloadError(f"{what}: head tensors {sorted(tensors)} are not {list(self.head_shapes)}")
        out = {}
        for n, a in tensors.items():
            if a.dtype not in (np.float32, np.float16) or tuple(a.shape) != self.head_shapes[n]:
                raise PayloadError(f"{what}: head tensor {n!r} has dtype {a.dtype} and shape {a.shape}")
            if not all_finite(a):
                raise PayloadError(f"{what}: head tensor {n!r} holds NaN or infinity")
            out[n] = a.astype(np.float32)
        return out

    # ---- downlink -----------------------------------------------------------------------------
    def encode_downlink_body(self, theta_sym: np.ndarray, levels: int, head: Tensors) -> tuple[dict[str, Any], bytes]:
        """The header and body every client of a round shares (θ symbols, then the head)."""
        sym_meta, sym_body = encode_symbols(theta_sym, levels + 1)
        head_meta, head_body = self.encode_head(head)
        meta = {"levels": levels, "theta": sym_meta, "head": head_meta, "sections": [len(sym_body), len(head_body)]}
        return meta, sym_body + head_body

    @staticmethod
    def frame_downlink(meta: dict[str, Any], body: bytes, stratum: tuple[int, int] | None) -> bytes:
        """One client's message: the shared header (plus its stratum, if draws are stratified) and body."""
        if stratum is not None:
            meta = {**meta, "stratum": list(stratum)}
        return frame(DOWN_KIND, meta, body)

    def decode_downlink(self, message: bytes) -> MaskDownlink:
        """Parse and check a ``mask-down`` frame."""
        _, meta, body = unframe(message, expect_kind=DOWN_KIND)
        levels = meta.get("levels")
        if not isinstance(levels, int) or not 1 <= levels <= 65535:
            raise PayloadError(f"server message has an invalid level count {levels!r}")
        stratum = parse_stratum(meta)
        sym_body, head_body = split_sections(body, meta.get("sections"), 2)
        sym = decode_symbols(meta.get("theta", {}), sym_body, self.n, levels + 1)
        head = self.decode_head(meta.get("head"), head_body, "server message")
        return MaskDownlink(sym.astype(np.uint16 if levels > 255 else np.uint8), levels, head, stratum)

    def encode_delta_downlink(self, catch_up: dict[str, Any], parts: bytes, head: Tensors, stratum: tuple[int, int] | None) -> bytes:
        """One client's ``mask-delta-down`` message: the catch-up header and parts
        (:class:`~fedsqueeze.methods.mask_downlink.MaskDeltaDownlink`), then the head."""
        head_meta, head_body = self.encode_head(head)
        meta = {**catch_up, "head": head_meta, "sections": [len(parts), len(head_body)]}
        if stratum is not None:
            meta["stratum"] = list(stratum)
        return frame(DELTA_DOWN_KIND, meta, parts + head_body)

    def decode_delta_downlink(
        self, message: bytes, max_meta_bytes: int, max_parts_bytes: int
    ) -> tuple[dict[str, Any], list[memoryview], Tensors, tuple[int, int] | None]:
        """``(catch-up header, parts, head, stratum)`` of a ``mask-delta-down`` frame, its sizes bounded
        by the caller (the catch-up header's own fields are checked by the catch-up)."""
        _, meta, body = unframe(
            message,
            expect_kind=DELTA_DOWN_KIND,
            max_meta_bytes=max_meta_bytes + self.head_meta_bytes,
            max_body_bytes=max_parts_bytes + self.head_bytes,
        )
        parts_body, head_body = split_sections(body, meta.get("sections"), 2)
        lengths = meta.get("lengths")
        parts = split_body(parts_body, lengths, len(lengths) if isinstance(lengths, list) else None)
        head = self.decode_head(meta.get("head"), head_body, "server message")
        return meta, parts, head, parse_stratum(meta)

    # ---- uplink -------------------------------------------------------------------------------
    def encode_uplink(self, kind: str, n: int, mask_meta: Any, mask_body: bytes, head_delta: Tensors) -> bytes:
        """A client's upload: its example count, mask code and head delta."""
        head_meta, head_body = self.encode_head(head_delta)
        meta = {"n": n, "mask": mask_meta, "head": head_meta, "sections": [len(mask_body), len(head_body)]}
        return frame(kind, meta, mask_body + head_body)

    def decode_uplink(self, kind: str, payload: bytes, client: int, partition_sizes: list[int], limits: MaskLimits) -> MaskUplink:
        """Parse and check an upload's frame, count (at most ``client``'s partition size) and head;
        the mask section is returned as is, once its header and body are within ``limits``."""
        max_meta = 256 + limits.meta_bytes + self.head_meta_bytes
        max_body = limits.body_bytes + self.head_bytes
        _, meta, body = unframe(payload, expect_kind=kind, max_body_bytes=max_body, max_meta_bytes=max_meta)
        n = example_count(meta.get("n"), client, partition_sizes)
        mask_body, head_body = split_sections(body, meta.get("sections"), 2)
        if len(mask_body) > limits.body_bytes:
            raise PayloadError(f"mask section of {len(mask_body)} bytes exceeds the {limits.body_bytes} this round's mask can need")
        return MaskUplink(n, meta.get("mask"), mask_body, self.decode_head(meta.get("head"), head_body, "client update"))
