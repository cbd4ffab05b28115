"""The delta downlink of the tensor methods (``--set downlink=delta``), with server-side error feedback.

With ``downlink=full`` (the default) the server sends the global trainable tensors every round,
coded by ``downlink_codec``. With ``downlink=delta`` it sends only their change, and keeps what
the clients will have made of it:

- The server holds the **client view** ``v_r``: the model every client that decoded the round-``r``
  broadcast holds, bit for bit. ``v_0`` is the initial model, which every party builds itself.
- Round ``r``'s broadcast is ``B_r = code(w_r − v_{r−1})`` (``downlink_codec``, seeded from the
  run seed and the round). The server decodes ``B_r`` itself and sets
  ``v_r = v_{r−1} + decode(B_r)`` (float32), exactly as each client does. What the codec lost,
  ``w_r − v_r``, is not dropped: it is in the next round's delta (error feedback), so the global
  model ``w`` is never biased by the downlink codec.
- Clients train from ``v_r``. A client that took part in round ``h`` holds ``v_h``; when the server
  sends it round ``r``'s message it sends whichever is smaller: the **replay** of the kept
  broadcasts ``B_{h+1} … B_r``, or a **refresh**, ``v_r`` itself as raw float32 (exact, so the
  client lands on the shared view too). The server keeps only the newest broadcasts whose sizes
  add up to at most a refresh's: an older one could never win.
- The message names the round of the view it applies to and the SHA-1 of the view it produces;
  the client checks both, so a client whose view drifted (or whose initial model differs) is
  refused with a reason, never trained on a silently different model.

Wire format: one frame of kind ``delta-downlink`` whose JSON header is
``{"base": h, "target": r, "mode": "replay"|"refresh", "rounds": [...], "lengths": [...],
"digest": hex}`` and whose body is the parts (each a complete codec frame) one after another:
the broadcasts of ``rounds`` for a replay, one raw frame of ``v_r`` for a refresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from fedsqueeze.codecs import Codec, CodecContext, RawCodec, decode_tensors, encode_tensors, frame, unframe
from fedsqueeze.codecs.base import split_body, tensor_table
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import state_digest
from fedsqueeze.seeding import SERVER, seed_int

Tensors = dict[str, np.ndarray]
T = TypeVar("T")
KIND = "delta-downlink"
MODES = ("full", "delta")
VIEW_KEY = "client_view"  # where a client state and the server state keep the view
# a header holds two short lists of one entry per replayed round, a digest and a few integers
META_PER_ROUND = 48
META_FIXED = 512


def view_digest(tensors: Tensors) -> str:
    """The hex SHA-1 of a view's every name, dtype, shape and byte (what both sides compare)."""
    return state_digest(tensors).hex()


def plan_catch_up(held: int, target: int, steps: Sequence[tuple[int, int, int]], refresh_size: int) -> tuple[int, ...] | None:
    """The rounds whose broadcasts bring a client holding view ``held`` to ``target``; None: a refresh.

    ``steps`` are the kept broadcasts, oldest first, as ``(base, round, nbytes)``: each turns the
    view of round ``base`` into that of ``round``. The replay wins when its parts add up to at
    most ``refresh_size`` bytes (the refresh's one part) and the kept broadcasts reach back to
    ``held``; an empty tuple means the client already holds the target view.
    """
    if held == target:
        return ()
    chain = [s for s in steps if s[1] > held]
    if not chain or chain[0][0] != held or chain[-1][1] != target:
        return None
    if sum(s[2] for s in chain) > refresh_size:
        return None
    return tuple(s[1] for s in chain)


def keep_steps(steps: list[dict[str, Any]], refresh_size: int) -> list[dict[str, Any]]:
    """The newest broadcasts whose sizes add up to at most ``refresh_size`` (older ones never win)."""
    kept: list[dict[str, Any]] = []
    total = 0
    for step in reversed(steps):
        total += int(step["bytes"].size)
        if total > refresh_size:
            break
        kept.append(step)
    return kept[::-1]


def refresh_size(view: Tensors) -> int:
    """The bytes of a refresh's one part (a raw frame of the view), computed without building it."""
    return len(frame(RawCodec.codec_id, {"tensors": tensor_table(view)}, b"")) + sum(int(a.nbytes) for a in view.values())


def catch_up_parts(view: dict[str, Any], held: int, refresh_bytes: int, refresh: Callable[[], bytes]) -> tuple[str, list[int], list[bytes]]:
    """``(mode, rounds, parts)`` of the message that brings a client holding view ``held`` to ``view``.

    ``view`` holds ``round`` and the kept ``steps`` (:func:`keep_steps`); ``refresh()`` makes the
    refresh's one part, of ``refresh_bytes`` bytes, called only when the replay loses.
    """
    target = int(view["round"])
    steps = view["steps"]
    plan = plan_catch_up(held, target, [(int(s["base"]), int(s["round"]), int(s["bytes"].size)) for s in steps], refresh_bytes)
    if plan is None:
        return "refresh", [target], [refresh()]
    by_round = {int(s["round"]): s["bytes"] for s in steps}
    return "replay", list(plan), [by_round[r].tobytes() for r in plan]


def catch_up_meta(view: dict[str, Any], held: int, mode: str, rounds: list[int], parts: list[bytes]) -> dict[str, Any]:
    """The header naming a catch-up's base and target rounds, its parts and the digest of the view it reaches."""
    return {
        "base": held,
        "target": int(view["round"]),
        "mode": mode,
        "rounds": rounds,
        "lengths": [len(p) for p in parts],
        "digest": view["digest"],
    }


def catch_up_meta_bytes(held: int, round_: int) -> int:
    """A cap on a catch-up header for a client holding view ``held`` in round ``round_``."""
    return META_FIXED + META_PER_ROUND * (round_ - held + 1)


def check_catch_up(meta: dict[str, Any], held: int, round_: int) -> tuple[str, list[int], str]:
    """``(mode, rounds, digest)`` of a catch-up header, refused (PayloadError) unless it is for round
    ``round_`` and, for a replay, names increasing rounds from the view ``held`` this client holds."""
    base, target, mode, rounds, digest = (meta.get(k) for k in ("base", "target", "mode", "rounds", "digest"))
    if target != round_ or type(target) is not int:
        raise PayloadError(f"downlink message is for round {target!r}, this is round {round_}")
    if mode not in ("replay", "refresh") or not isinstance(digest, str) or not isinstance(rounds, list):
        raise PayloadError("downlink message has a malformed header")
    if mode == "replay":
        if base != held:
            raise PayloadError(f"downlink replays from the view of round {base!r}, this client holds round {held}'s")
        ok = all(type(r) is int for r in rounds) and rounds == sorted(set(rounds)) and all(held < r <= round_ for r in rounds)
        if not ok or (rounds and rounds[-1] != round_):
            raise PayloadError(f"downlink replay names rounds {rounds[:4]!r}, not increasing rounds after {held} up to {round_}")
    elif rounds != [round_]:
        raise PayloadError("downlink refresh must name exactly this round")
    return mode, rounds, digest


def check_digest(got: str, digest: str) -> None:
    """Refuse (PayloadError) a view whose digest is not the one the server sent."""
    if got != digest:
        raise PayloadError(f"downlink view digest {got[:12]} differs from the server's {digest[:12]}: this client's view drifted")


class CatchUpMemo:
    """This round's catch-up messages, by ``(round, view digest, held)``; a new round clears them."""

    def __init__(self) -> None:
        self._messages: dict[tuple[Any, ...], Any] = {}

    def get(self, view: dict[str, Any], held: int, build: Callable[[], T]) -> T:
        """The message for a client holding view ``held``, built once per round and view."""
        key = (int(view["round"]), view["digest"], held)
        if key not in self._messages:
            if any(k[:2] != key[:2] for k in self._messages):
                self._messages.clear()  # a new round (or a changed view): the old messages are stale
            self._messages[key] = build()
        return self._messages[key]


class DeltaDownlink:
    """Both halves of the delta downlink of one tensor method (see the module docstring).

    ``check(tensors, what)`` is the method's validation of a decoded tensor dict (names, shapes,
    float32, finite); ``expect`` / ``max_elements`` bound what any decode may allocate.
    """

    def __init__(
        self,
        codec: Codec,
        expect: dict[str, tuple[str, tuple[int, ...]]],
        max_elements: int,
        check: Callable[[Tensors, str], None],
    ) -> None:
        self.codec, self.expect, self.max_elements, self.check = codec, expect, max_elements, check
        self._messages: CatchUpMemo = CatchUpMemo()

    def _ctx(self, seed: int) -> CodecContext:
        return CodecContext(seed=seed, max_elements=self.max_elements, expect=self.expect)

    # ---- shared: one broadcast applied to a view (the server and every client run this same code) ----
    def apply(self, view: Tensors, part: bytes | memoryview, run_seed: int, round_: int) -> Tensors:
        """``view + decode(part)`` in float32, ``part`` being round ``round_``'s broadcast."""
        delta, _ = decode_tensors(part, self._ctx(seed_int(run_seed, round_, SERVER, "downlink")), codec=self.codec)
        self.check(delta, f"round {round_} downlink delta")
        return {n: np.add(view[n], delta[n], dtype=np.float32) for n in view}

    # ---- server ---------------------------------------------------------------------------------------
    def init_state(self, weights: Tensors) -> dict[str, Any]:
        """The server's view before round 1: the initial model (every client builds the same)."""
        tensors = {n: np.array(a, dtype=np.float32) for n, a in weights.items()}
        return {"round": 0, "tensors": tensors, "digest": view_digest(tensors), "steps": []}

    def advance(self, view: dict[str, Any], weights: Tensors, run_seed: int, round_: int) -> None:
        """Make round ``round_``'s broadcast (once per round) and move the view by what it decodes to."""
        if int(view["round"]) >= round_:
            return
        old = view["tensors"]
        delta = {n: np.subtract(weights[n], old[n], dtype=np.float32) for n in old}
        # a fresh codec state: the view *is* the error feedback, so no codec keeps a memory of its own
        part = encode_tensors(self.codec, delta, CodecContext(seed=seed_int(run_seed, round_, SERVER, "downlink")))
        view["tensors"] = self.apply(old, part, run_seed, round_)
        view["digest"] = view_digest(view["tensors"])
        step = {"base": int(view["round"]), "round": round_, "bytes": np.frombuffer(part, np.uint8).copy()}
        view["steps"] = keep_steps([*view["steps"], step], refresh_size(view["tensors"]))
        view["round"] = round_

    def message(self, view: dict[str, Any], held: int) -> bytes:
        """The message that brings a client holding view ``held`` to the server's view (replay or refresh)."""
        return self._messages.get(view, held, lambda: self._build(view, held))

    def _build(self, view: dict[str, Any], held: int) -> bytes:
        mode, rounds, parts = catch_up_parts(view, held, refresh_size(view["tensors"]), lambda: encode_tensors(RawCodec(), view["tensors"]))
        return frame(KIND, catch_up_meta(view, held, mode, rounds, parts), b"".join(parts))

    # ---- client ---------------------------------------------------------------------------------------
    def receive(self, message: bytes, held: int, view: Tensors, run_seed: int, round_: int) -> Tensors:
        """The view a client holding ``view`` (of round ``held``) reaches from ``message`` in round ``round_``.

        Refused (PayloadError, with the reason) unless the message is for this round, applies to
        the view this client holds, decodes part by part with the configured codec into the
        configured tensors only, and lands exactly on the view whose digest the server sent.
        """
        held = min(max(held, 0), round_)  # held == round_: a retry of this round, the client already holds its view
        _, meta, body = unframe(message, expect_kind=KIND, max_meta_bytes=catch_up_meta_bytes(held, round_))
        mode, rounds, digest = check_catch_up(meta, held, round_)
        parts = split_body(body, meta.get("lengths"), len(rounds))
        if mode == "refresh":
            fresh, _ = decode_tensors(parts[0], self._ctx(0), codec=RawCodec())
            self.check(fresh, "downlink refresh")
            view = {n: np.array(fresh[n], dtype=np.float32) for n in view}
        else:
            for r, part in zip(rounds, parts):
                view = self.apply(view, part, run_seed, r)
        check_digest(view_digest(view), digest)
        return view
