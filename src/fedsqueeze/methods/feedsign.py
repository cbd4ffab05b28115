"""FeedSign: zeroth-order federated fine-tuning with one bit per step per client.

After *FeedSign: Robust Full-parameter Federated Fine-tuning of Large Models with Extremely Low
Communication Overhead of One Bit* (2025). Each round has one seed per local step, derived from
the run seed (as in DeComFL). A client estimates the directional derivative g along z(seed) as
DeComFL does, but uploads only its sign: one bit per step (bit = g > 0). Locally it steps
``w ← w − lr · sign(g) · z``. The server takes the majority of the votes per step (a tie is broken
by a seeded coin, so the result is one bit as well), and the global step is
``w ← w − lr · vote · z``: the record of a round is K bits, and a stale client catches up by
replaying the records it missed, K bits each (bit-identical to the server).

A sign vote bounds each client's influence on a step to one vote, which is FeedSign's argument
for robustness to Byzantine clients; the step size is ``lr`` itself (there is no magnitude).
With ``momentum`` β > 0 the votes go through the moving average instead: ``m ← β·m + (1 − β)·vote·z``,
``w ← w − lr·m`` (server, replay and the client's own steps alike).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext, register_method
from fedsqueeze.methods.decomfl import DEFAULT_LR, HeadZOOptions, ZOMethod
from fedsqueeze.methods.decomfl_wire import read_head
from fedsqueeze.methods.updates import ZOUpdate
from fedsqueeze.methods.zo_wire import Reader, compact_frame, compact_unframe, decode_runs, encode_runs
from fedsqueeze.seeding import SERVER

Tensors = dict[str, np.ndarray]
UP_KIND, DOWN_KIND = "feedsign-up", "feedsign-down"


def pack_signs(signs: np.ndarray) -> bytes:
    """±1 values as bits (1 = +1), little-endian bit order, zero padding."""
    return np.packbits(np.asarray(signs) > 0, bitorder="little").tobytes()


def read_signs(reader: Reader, count: int) -> np.ndarray:
    """``count`` ±1 values (float32) from their ceil(count/8) bytes; the padding bits must be 0."""
    raw = np.frombuffer(reader.take((count + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")
    if bits[count:].any():
        raise PayloadError("message has non-zero padding bits")
    return np.where(bits[:count] == 1, 1.0, -1.0).astype(np.float32)


def majority(votes: list[np.ndarray], coin: np.ndarray) -> np.ndarray:
    """Per step: the sign of the sum of the ±1 votes; ``coin`` (±1) breaks a tie."""
    total = np.sum(votes, axis=0)
    return np.where(total > 0, 1.0, np.where(total < 0, -1.0, coin)).astype(np.float32)


def sign_step(grads: np.ndarray) -> np.ndarray:
    """What a client's own step uses: the sign of its estimate (g = 0 counts as −1, like its vote)."""
    return np.where(grads > 0, 1.0, -1.0).astype(np.float32)


@register_method
class FeedSign(ZOMethod):
    name = "feedsign"
    summary = "zeroth-order FL with a 1-bit sign vote per step per client and a server majority"
    Options = HeadZOOptions  # the head on whole-client batches, measured best (docs/zo.md); give it many local_steps
    default_lr = DEFAULT_LR["head"]  # of the default params; `fedsqueeze methods` shows it

    def replay(self, record: dict[str, Any], seed: int) -> None:
        """``w ← w − lr · vote_k · z(seed_k)`` for each step k in order (or through the moving average)."""
        r = record["round"]
        self.perturber.apply_record(self.step_seeds(r, seed), record["votes"][:, None], self.lr_at(r), self.momentum)

    # ---- server ---------------------------------------------------------------------------------
    def zo_downlink(self, state: dict[str, Any], ctx: RoundContext, synced: int, warm_head: Tensors | None) -> bytes:
        records = self.missed(state, synced)
        fields = [int(warm_head is not None), *encode_runs([r["round"] for r in records], ctx.round)]
        head = b"".join(warm_head[n].astype(self.wire.head_dtype.newbyteorder("<")).tobytes() for n in self.head) if warm_head else b""
        votes = np.concatenate([r["votes"] for r in records]) if records else np.zeros(0)
        return compact_frame(DOWN_KIND, ctx.round, fields, head + pack_signs(votes))

    def zo_decode(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> ZOUpdate:
        reader = compact_unframe(payload, UP_KIND, ctx.round)
        votes = read_signs(reader, self.k)
        reader.end()
        return ZOUpdate(votes[:, None])

    def zo_aggregate(self, state: dict[str, Any], updates: dict[int, ZOUpdate], ctx: RoundContext) -> dict[str, float]:
        coin = np.where(ctx.rng(SERVER, "feedsign-ties").integers(0, 2, size=self.k) == 1, 1.0, -1.0)
        votes = [u.scalars[:, 0] for u in updates.values()]
        record = {"round": ctx.round, "votes": majority(votes, coin)}
        self.apply_to_server(state, lambda: self.replay(record, ctx.seed))
        state["history"].append(record)
        agree = float(np.mean([np.mean(v == record["votes"]) for v in votes]))
        return {"vote_agreement": agree, "zo_lr": self.lr_at(ctx.round)}

    # ---- client ---------------------------------------------------------------------------------
    def zo_catch_up(self, message: bytes, own: dict[str, Any], ctx: RoundContext) -> dict[str, Any]:
        reader = compact_unframe(message, DOWN_KIND, ctx.round)
        has_head = reader.varint(1)
        rounds = decode_runs(reader, ctx.round, self.wire.max_records)
        head = read_head(reader.take(self.wire.head_bytes), self.wire) if has_head else None
        votes = read_signs(reader, len(rounds) * self.k).reshape(len(rounds), self.k)
        reader.end()
        synced = self.load_warm_head(head, int(own["synced"]), rounds[0] if rounds else None)
        for r, v in zip(rounds, votes):
            if r > synced:  # records this client already applied are skipped
                self.replay({"round": r, "votes": v}, ctx.seed)
        return own

    def zo_train(self, client: int, own: dict[str, Any], ctx: RoundContext) -> tuple[bytes, float]:
        scalars, loss = self.local_steps(client, self.step_seeds(ctx.round, ctx.seed), ctx, sign_step)
        return compact_frame(UP_KIND, ctx.round, [], pack_signs(sign_step(scalars[:, 0]))), loss
