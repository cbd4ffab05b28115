"""The mask methods' θ-delta downlink (``downlink=delta``): only the θ symbols that changed travel.

The global θ is a vector of integer symbols ``θ · L`` (``L`` levels, :mod:`fedsqueeze.methods.mask_method`),
exact on both sides, so unlike the tensor methods' delta downlink (:mod:`fedsqueeze.methods.downlink`,
whose catch-up logic this module shares: replay or refresh, kept steps, the header and its checks)
there is no codec loss and no error feedback: the **view** of round ``r`` *is* the global θ that
round's clients train from, and every client that decoded round ``r``'s message holds it bit for bit.

- **Step** ``r`` (a part of kind ``mask-theta-step``) turns the view of round ``h`` into that of
  round ``r``: the changed positions as a context code of the change bits
  (:func:`fedsqueeze.codecs.sideinfo.encode_flips`), then each changed position's new value. When
  the header names the clients whose aggregation made the step (the usual case), both ends rebuild
  their draws (:meth:`~fedsqueeze.methods.mask_method.MaskMethod.step_side`): a position changes
  where some client's ``u`` lies near θ_start, and which way depends on that client's reference bit
  (5 value groups); under the delta rule a value is the *vote count* that made it (its index among
  the rule's outcomes for the held symbol, ``SideInfo.outcomes``, header ``"values": "outcome"``), so
  a +1 vote is one symbol whether it moves 100 to 151 or saturates 242 at 255. Otherwise the context
  is the bin of the *held* symbol (``sym · 64 // (L + 1)``) and a value is ``(new − old) mod (L + 1)``.
  Each group's values are rANS-coded under their own histogram (:func:`encode_packed_symbols`; the
  histogram as Elias-gamma codes, not JSON).
  No step crosses a change of ``L`` (the Beta rule's first round): every client then gets a refresh.
- **Refresh** (a part of kind ``mask-theta``): the whole θ, its symbols under their own histogram
  (the full downlink's code, with the packed histogram).
- A client that took part in round ``h`` gets, in round ``r``, the replay of the kept steps
  ``h+1 … r`` or a refresh, whichever is smaller (:func:`fedsqueeze.methods.downlink.catch_up_parts`);
  the message names its base and target rounds and the SHA-1 of the view it reaches, checked by the
  client.

Every decoder checks what it reads before it allocates: the part's kind, its levels (those the client
holds for a step; at most the method's largest for a refresh), the counts against the positions
(at most ``n`` of them), the values' code (outcomes only where the side information gives them) and
histogram against the count, and that a changed position changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from fedsqueeze.codecs.ans import chunk_size, decode_symbols, encode_symbols
from fedsqueeze.codecs.base import split_body
from fedsqueeze.codecs.framing import frame, unframe
from fedsqueeze.codecs.sideinfo import NUM_CONTEXTS, decode_flips_counted, encode_flips, pack_counts, unpack_counts
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import state_digest
from fedsqueeze.methods.downlink import CatchUpMemo, catch_up_meta, catch_up_parts, check_catch_up, check_digest, keep_steps

STEP_KIND = "mask-theta-step"
THETA_KIND = "mask-theta"
CONTEXT_CODE = {"coder": "context"}  # the change bits' code (sideinfo's header, implied, not sent)


def theta_digest(sym: np.ndarray, levels: int) -> str:
    """The hex SHA-1 of a θ view: its symbols (dtype, shape, bytes) and level count."""
    return state_digest({"sym": sym, "levels": int(levels)}).hex()


def symbol_dtype(levels: int) -> type:
    """The dtype of θ's symbols at ``levels`` levels (as the server keeps them)."""
    return np.uint8 if levels <= 255 else np.uint16


def change_contexts(sym: np.ndarray, levels: int) -> np.ndarray:
    """Each position's context for its change bit: the bin ``sym · 64 // (L + 1)`` of the held symbol, uint8."""
    out = np.empty(sym.size, dtype=np.uint8)
    step = chunk_size(sym.size)
    for lo in range(0, sym.size, step):  # in chunks: no uint32 temporary over the whole mask
        out[lo : lo + step] = sym[lo : lo + step].astype(np.uint32) * NUM_CONTEXTS // (levels + 1)
    return out


PART_META_BYTES = 128  # a part's JSON header: the levels and three lengths (plus, for a step, its clients)
META_PER_CLIENT = 24  # a step's header names each aggregated client (and its stratum)


# ---- symbols with a packed histogram ----------------------------------------------------------------


def encode_packed_symbols(symbols: np.ndarray, alphabet: int) -> bytes:
    """Integer ``symbols`` in ``[0, alphabet)``: their histogram as Elias-gamma codes
    (:func:`fedsqueeze.codecs.sideinfo.pack_counts`, ~1 bit an unused value, where JSON spends 2),
    then their rANS words under it (:func:`fedsqueeze.codecs.ans.encode_symbols`)."""
    meta, words = encode_symbols(symbols, alphabet)
    return pack_counts(np.asarray(meta["hist"]), np.full(alphabet, symbols.size)) + words


def decode_packed_symbols(body: memoryview, count: int, alphabet: int) -> np.ndarray:
    """Invert :func:`encode_packed_symbols`: exactly ``count`` symbols, the histogram checked first."""
    hist, used = unpack_counts(body, np.full(alphabet, count))
    if sum(hist) != count:
        raise PayloadError(f"symbol histogram counts {sum(hist)} symbols, expected {count}")
    return decode_symbols({"hist": hist}, body[used:], count, alphabet)


# ---- the two kinds of part ------------------------------------------------------------------------


def encode_theta(sym: np.ndarray, levels: int) -> bytes:
    """A refresh part: the whole θ, its symbols under their own histogram."""
    return frame(THETA_KIND, {"levels": int(levels)}, encode_packed_symbols(sym, levels + 1))


def decode_theta(part: bytes | memoryview, n: int, max_levels: int) -> tuple[np.ndarray, int]:
    """``(symbols, levels)`` of a refresh part: ``n`` symbols at ``1 ≤ L ≤ max_levels`` levels."""
    _, meta, body = unframe(part, expect_kind=THETA_KIND, max_meta_bytes=PART_META_BYTES)
    levels = meta.get("levels")
    if type(levels) is not int or not 1 <= levels <= max_levels:
        raise PayloadError(f"downlink refresh has an invalid level count {levels!r} (at most {max_levels})")
    sym = decode_packed_symbols(body, n, levels + 1)
    return sym.astype(symbol_dtype(levels)), levels


class SideInfo(NamedTuple):
    """What both ends rebuild for a step: the change contexts, optionally a value group per position
    (in ``[0, VALUE_GROUPS)``, each group's values coded apart) and the step's *outcomes*.

    ``outcomes[s, j]`` (``levels + 1`` rows) is the symbol a position holding ``s`` takes for value
    index ``j``: for the delta rule, the aggregation's result for each count of votes (index 0 the
    count 0, then +1, −1, +2, …), so a change is coded as the count that made it, whatever the held
    symbol (a count of +1 is one symbol whether it moves 100 to 151 or saturates 242 at 255).
    Without outcomes a change is coded as ``(new − old) mod (L + 1)``.
    """

    contexts: np.ndarray
    groups: np.ndarray | None = None
    outcomes: np.ndarray | None = None


VALUE_GROUPS = 5  # with side information, the changes' values are coded in this many groups
OUTCOME_CODE = "outcome"  # a step header's ``values`` when its changes are coded as outcome indices
SideInfoFn = Callable[[dict[str, Any], np.ndarray, int, int], SideInfo]


def outcome_indices(outcomes: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray | None:
    """For each changed position (``old`` → ``new``), the first value index whose outcome is ``new``;
    None when some change is no outcome (then the step codes differences)."""
    index = np.empty(old.size, dtype=np.int64)
    step = chunk_size(max(old.size, 1))
    for lo in range(0, old.size, step):  # in chunks: one row of outcomes per change would be large
        hit = outcomes[old[lo : lo + step]] == new[lo : lo + step, None]
        if not hit.any(axis=1).all():
            return None
        index[lo : lo + step] = hit.argmax(axis=1)
    return index


def encode_step(old: np.ndarray, new: np.ndarray, levels: int, side: SideInfo | None = None, extra: dict[str, Any] | None = None) -> bytes:
    """A step part: where ``new`` differs from ``old`` (both at ``levels`` levels), and how.

    ``side``: what both ends compute (:class:`SideInfo`; default: the contexts
    :func:`change_contexts` of ``old``, no groups, differences); ``extra``: the header fields the
    receiver computes it from.
    """
    side = side if side is not None else SideInfo(change_contexts(old, levels))
    changed = old != new
    _, change_body = encode_flips(changed, side.contexts)  # its header only names the coder
    values, alphabet, code = None, levels + 1, {}
    if side.outcomes is not None:
        values = outcome_indices(side.outcomes, old[changed], new[changed])
        if values is not None:
            alphabet, code = int(side.outcomes.shape[1]), {"values": OUTCOME_CODE}
    if values is None:
        values = (new[changed].astype(np.int64) - old[changed].astype(np.int64)) % (levels + 1)
    if side.groups is None:
        coded = [encode_packed_symbols(values, alphabet)]
    else:
        g = side.groups[changed]
        coded = [encode_packed_symbols(values[g == k], alphabet) for k in range(VALUE_GROUPS)]
    meta = {"levels": int(levels), **(extra or {}), **code, "sections": [len(change_body), *map(len, coded)]}
    return frame(STEP_KIND, meta, change_body + b"".join(coded))


def apply_step(
    sym: np.ndarray, levels: int, part: bytes | memoryview, round_: int = 0, side_for: SideInfoFn | None = None, max_clients: int = 0
) -> np.ndarray:
    """The view a step part (of round ``round_``) makes of ``sym`` (at ``levels`` levels); refused unless
    it fits that view exactly. ``side_for(meta, sym, levels, round_)`` rebuilds (and checks) the side
    information the header names (:func:`encode_step`'s ``side``); without it, the default contexts.
    The header may name up to ``max_clients`` clients."""
    _, meta, body = unframe(part, expect_kind=STEP_KIND, max_meta_bytes=PART_META_BYTES + META_PER_CLIENT * max_clients)
    if meta.get("levels") != levels:
        raise PayloadError(f"downlink step is at {meta.get('levels')!r} levels, this client's view at {levels}")
    side = side_for(meta, sym, levels, round_) if side_for is not None else SideInfo(change_contexts(sym, levels))
    code = meta.get("values")
    if code not in (None, OUTCOME_CODE) or (code == OUTCOME_CODE and side.outcomes is None):
        raise PayloadError(f"downlink step codes its values as {str(code)[:40]!r}, which this step's side information does not give")
    outcomes = side.outcomes if code == OUTCOME_CODE else None
    alphabet = levels + 1 if outcomes is None else int(outcomes.shape[1])
    parts = split_body(body, meta.get("sections"), 2 if side.groups is None else 1 + VALUE_GROUPS)
    positions, _ = decode_flips_counted(CONTEXT_CODE, parts[0], side.contexts, sym.size)
    if side.groups is None:
        values = decode_packed_symbols(parts[1], int(positions.size), alphabet)
    else:
        g = side.groups[positions]
        values = np.empty(positions.size, dtype=np.int64)
        for k in range(VALUE_GROUPS):
            values[g == k] = decode_packed_symbols(parts[1 + k], int((g == k).sum()), alphabet)
    held = sym[positions].astype(np.int64)
    moved = (held + values) % (levels + 1) if outcomes is None else outcomes[held, values].astype(np.int64)
    if np.any(moved == held):
        raise PayloadError("downlink step changes a position to the value it holds")
    out = sym.copy()
    out[positions] = moved
    return out


# ---- both halves --------------------------------------------------------------------------------------


class MaskDeltaDownlink:
    """The θ view, steps and catch-up of the mask methods' delta downlink (see the module docstring).

    ``n`` masked positions; ``max_levels`` the most levels the method's θ can have (a refresh at more
    is refused before its histogram is read); ``max_clients`` the most clients a step's header names.
    """

    def __init__(self, n: int, max_levels: int, max_clients: int = 0) -> None:
        self.n, self.max_levels, self.max_clients = n, max_levels, max_clients
        self._messages: CatchUpMemo = CatchUpMemo()
        self._refresh: dict[tuple[int, str], bytes] = {}  # the round's refresh part, made at most once

    # ---- server -------------------------------------------------------------------------------------
    def init_state(self, sym: np.ndarray, levels: int) -> dict[str, Any]:
        """The server's view before round 1: the initial θ (every client builds the same)."""
        sym = np.array(sym, copy=True)
        return {
            "round": 0,
            "sym": sym,
            "levels": int(levels),
            "digest": theta_digest(sym, levels),
            "steps": [],
            "refresh_bytes": 0,
            "step_bytes": 0,
        }

    def advance(
        self, view: dict[str, Any], sym: np.ndarray, levels: int, round_: int, side: Callable[[], tuple[SideInfo, dict[str, Any]] | None]
    ) -> None:
        """Move the view to round ``round_``'s θ (once per round), keeping the step that does it;
        ``side()`` gives the step's side information and the header fields naming it (None: the default)."""
        if int(view["round"]) >= round_:
            return
        old, old_levels = view["sym"], int(view["levels"])
        steps: list[dict[str, Any]] = list(view["steps"])
        if levels == old_levels and sym.dtype == old.dtype:
            made = side()
            part = encode_step(old, sym, levels, *(made if made is not None else (None, None)))
            steps.append({"base": int(view["round"]), "round": round_, "bytes": np.frombuffer(part, np.uint8).copy()})
            view["step_bytes"] = len(part)
        else:
            steps, view["step_bytes"] = [], 0  # no step crosses a change of levels: a refresh for everyone
        view.update(round=round_, sym=np.array(sym, copy=True), levels=int(levels), digest=theta_digest(sym, levels))
        view["refresh_bytes"] = len(self.refresh_part(view))
        view["steps"] = keep_steps(steps, int(view["refresh_bytes"]))

    def refresh_part(self, view: dict[str, Any]) -> bytes:
        """The refresh part of the view (made once per round and view)."""
        key = (int(view["round"]), str(view["digest"]))
        if key not in self._refresh:
            self._refresh = {key: encode_theta(view["sym"], int(view["levels"]))}
        return self._refresh[key]

    def catch_up(self, view: dict[str, Any], held: int) -> tuple[dict[str, Any], bytes]:
        """``(header, parts)`` bringing a client holding view ``held`` to ``view``: a replay or a refresh, the smaller."""

        def build() -> tuple[dict[str, Any], bytes]:
            refresh_bytes = int(view["refresh_bytes"]) or len(self.refresh_part(view))
            mode, rounds, parts = catch_up_parts(view, held, refresh_bytes, lambda: self.refresh_part(view))
            return catch_up_meta(view, held, mode, rounds, parts), b"".join(parts)

        return self._messages.get(view, held, build)

    # ---- client -------------------------------------------------------------------------------------
    def receive(
        self,
        meta: dict[str, Any],
        parts: Sequence[memoryview],
        held: int,
        sym: np.ndarray,
        levels: int,
        round_: int,
        side_for: SideInfoFn | None = None,
    ) -> tuple[np.ndarray, int]:
        """The view ``(symbols, levels)`` a client holding ``sym`` (of round ``held``) reaches in round ``round_``.

        Refused (PayloadError, with the reason) unless the header is for this round and this view
        (:func:`fedsqueeze.methods.downlink.check_catch_up`), every part decodes against the view it
        applies to, and the result has the digest the server sent.
        """
        mode, rounds, digest = check_catch_up(meta, held, round_)
        if len(parts) != len(rounds):
            raise PayloadError(f"downlink message has {len(parts)} parts for {len(rounds)} rounds")
        if mode == "refresh":
            sym, levels = decode_theta(parts[0], self.n, self.max_levels)
        else:
            for r, part in zip(rounds, parts):
                sym = apply_step(sym, levels, part, r, side_for, self.max_clients)
        check_digest(theta_digest(sym, levels), digest)
        return sym, levels
