"""FedKSeed: zeroth-order federated fine-tuning from a finite pool of shared seeds.

After Qin et al., *Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes* (ICML 2024). Every party derives the same pool of
``pool_size`` seeds from the run seed. Each local step of each client draws one seed of the pool
(uniformly, or by importance: FedKSeed-Pro) from a generator of (run seed, round, client), so the
server knows which seed each uploaded scalar belongs to and only the scalars travel up.

Because every step moves the model along one of only ``pool_size`` fixed directions, the global
model is ``w0 + Σ_j C_j · z_j``: the server keeps the accumulated coefficient ``C_j`` of each seed.
A round's record is the sparse vector of the round's mean scalar per touched seed; applying it is
``C_j ← C_j − lr·ĝ_j`` and ``w ← w − lr·ĝ_j·z_j`` for each touched j in increasing order.

A stale client catches up along the cheaper of two paths, both measured every time and reported
(``catchup_replay_bytes``, ``catchup_accumulated_bytes``; the smaller one is sent):

- *replay*: the records of the rounds it missed (it ends bit-identical to the server);
- *accumulated*: the current ``C_j`` of the seeds touched since it last took part (sparse), or of
  the whole pool (dense: ``4·pool_size`` bytes whatever the number of missed rounds). The client
  moves by ``C_new − C_old`` per seed; it then holds the server's C exactly and its weights up to
  float32 rounding (the same sum, added in another order).

FedKSeed-Pro (``importance=pro``): seed j is drawn with probability softmax of its min-max
normalised mean amplitude, ``mean |clip(ĝ_j)|`` over the rounds that touched it (with an initial 0,
as the paper's history). Every party holds these statistics exactly (replayed, or sent along with
C on the accumulated path), so the draws agree everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods.base import RoundContext, register_method
from fedsqueeze.methods.decomfl import DEFAULT_LR, HeadZOOptions, ZOMethod
from fedsqueeze.methods.decomfl_wire import read_finite, read_head
from fedsqueeze.methods.updates import ZOUpdate
from fedsqueeze.methods.zo_wire import Reader, compact_frame, compact_unframe, decode_runs, encode_runs, varint, varints
from fedsqueeze.options import above, between, option
from fedsqueeze.seeding import SERVER

Tensors = dict[str, np.ndarray]
UP_KIND, DOWN_KIND = "fedkseed-up", "fedkseed-down"
REPLAY, SPARSE, DENSE = 0, 1, 2  # the catch-up paths a downlink may take
PATHS = {REPLAY: "replay", SPARSE: "accumulated", DENSE: "accumulated"}


@dataclass
class FedKSeedOptions(HeadZOOptions):
    pool_size: int = option(1024, "K: number of seeds in the shared pool", check=between(2, 1 << 20))
    importance: str = option(
        "uniform",
        "how a step draws its seed: 'uniform' (FedKSeed) or 'pro' (by gradient amplitude, FedKSeed-Pro)",
        choices=("uniform", "pro"),
    )
    importance_clip: float = option(5.0, "FedKSeed-Pro: |scalar| is clipped to this before it enters a seed's amplitude", check=above(0.0))

    def validate(self) -> None:
        if self.momentum > 0 or self.adam_beta2 > 0:
            raise ConfigError(
                "momentum (and adam_beta2) is not offered for fedkseed: a stale client may jump to the accumulated seed coefficients, "
                "which do not carry the moving average m, and a round's record sums each seed's steps out of order "
                "(use decomfl or feedsign with momentum)"
            )


def _gaps(index: np.ndarray) -> list[int]:
    """Strictly increasing indices as gaps: the first index, then each step minus one."""
    return [int(index[0])] + [int(d) - 1 for d in np.diff(index)] if index.size else []


def _read_index(reader: Reader, count: int, pool: int) -> np.ndarray:
    """``count`` strictly increasing seed indices below ``pool``, as written by :func:`_gaps`."""
    out = np.empty(count, dtype=np.int64)
    last = -1
    for i in range(count):
        last += 1 + reader.varint(pool)
        if last >= pool:
            raise PayloadError(f"message names seed {last} of a pool of {pool}")
        out[i] = last
    return out


@register_method
class FedKSeed(ZOMethod):
    name = "fedkseed"
    summary = "zeroth-order FL from a pool of K shared seeds: scalars up; a stale client catches up from K accumulated scalars"
    Options = FedKSeedOptions
    default_lrs = {**DEFAULT_LR, "head": 1e-2}  # measured on the head: K = 500 steps at 1e-2 (docs/zo.md)
    default_lr = default_lrs["head"]  # of the default params; `fedsqueeze methods` shows it

    def setup(self, task) -> None:
        super().setup(task)
        self.pool = self.opts.pool_size
        self.pro = self.opts.importance == "pro"
        self.pool_seeds = np.random.default_rng(self._pool_seed()).integers(0, 1 << 63, size=self.pool, dtype=np.uint64)
        self.catchup_log: dict[str, float] = {}

    def _pool_seed(self) -> int:
        return RoundContext(0, self.cfg.rounds, self.cfg.seed).seed_for(SERVER, "fedkseed-pool")

    # ---- the seed statistics every party holds --------------------------------------------------
    def fresh_stats(self) -> dict[str, np.ndarray]:
        return {
            "coef": np.zeros(self.opts.pool_size, dtype=np.float32),  # C_j: the model is w0 + Σ C_j z_j
            "amp_sum": np.zeros(self.opts.pool_size, dtype=np.float32),  # Σ |clip(ĝ_j)| over the rounds touching j
            "amp_count": np.zeros(self.opts.pool_size, dtype=np.int64),  # how many rounds touched j
        }

    def probabilities(self, stats: dict[str, np.ndarray]) -> np.ndarray | None:
        """FedKSeed-Pro's seed distribution (None = uniform)."""
        if not self.pro:
            return None
        amp = stats["amp_sum"].astype(np.float64) / (stats["amp_count"].astype(np.float64) + 1.0)
        amp = (amp - amp.min()) / (amp.max() - amp.min() + 1e-10)
        e = np.exp(amp - amp.max())
        return e / e.sum()

    def step_indices(self, round_: int, seed: int, client: int, stats: dict[str, np.ndarray]) -> np.ndarray:
        """The pool index of each of ``client``'s local steps in ``round_`` (known to the server too)."""
        rng = RoundContext(round_, self.cfg.rounds, seed).rng(client, "fedkseed-steps")
        probs = self.probabilities(stats)
        if probs is None:
            return rng.integers(0, self.pool, size=self.k)
        return rng.choice(self.pool, size=self.k, p=probs)

    def replay(self, record: dict[str, Any], stats: dict[str, np.ndarray]) -> None:
        """Apply one round's record to the loaded model and to ``stats``, seed by seed in index order."""
        lr = self.lr_at(record["round"])
        coef = stats["coef"]
        for j, g in zip(record["index"], record["scalars"]):
            step = np.float32(-lr * float(g))
            coef[j] = np.float32(coef[j] + step)
            self.perturber.add(int(self.pool_seeds[j]), 0, float(step))
        if self.pro:
            stats["amp_sum"][record["index"]] += np.abs(np.clip(record["scalars"], -self.opts.importance_clip, self.opts.importance_clip))
            stats["amp_count"][record["index"]] += 1

    def jump(self, index: np.ndarray, values: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> None:
        """The accumulated path: move the loaded model to the sent coefficients and take the sent statistics."""
        coef = stats["coef"]
        for j, new in zip(index, values["coef"]):
            step = float(np.float32(new - coef[j]))
            if step != 0.0:
                self.perturber.add(int(self.pool_seeds[j]), 0, step)
            coef[j] = new
        if self.pro:
            stats["amp_sum"][index] = values["amp_sum"]
            stats["amp_count"][index] = values["amp_count"]

    # ---- server ---------------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {**super().init_server(), **self.fresh_stats()}

    def zo_downlink(self, state: dict[str, Any], ctx: RoundContext, synced: int, warm_head: Tensors | None) -> bytes:
        options = self.catch_up_messages(state, ctx, synced, warm_head)
        mode = min(options, key=lambda m: (len(options[m]), m))
        log = self.catchup_log
        log["catchup_replay_bytes"] = log.get("catchup_replay_bytes", 0.0) + len(options[REPLAY])
        log["catchup_accumulated_bytes"] = log.get("catchup_accumulated_bytes", 0.0) + min(len(options[SPARSE]), len(options[DENSE]))
        log[f"catchup_{PATHS[mode]}_sent"] = log.get(f"catchup_{PATHS[mode]}_sent", 0.0) + 1
        return options[mode]

    def catch_up_messages(self, state: dict[str, Any], ctx: RoundContext, synced: int, warm_head: Tensors | None) -> dict[int, bytes]:
        """The downlink along each catch-up path (REPLAY, SPARSE, DENSE) for a client that holds round ``synced``."""
        records = self.missed(state, synced)
        head = b"".join(warm_head[n].astype(self.wire.head_dtype.newbyteorder("<")).tobytes() for n in self.head) if warm_head else b""
        has_head = int(warm_head is not None)
        replay = bytearray(varints(encode_runs([r["round"] for r in records], ctx.round)))
        replay += head
        for r in records:
            replay += varint(len(r["index"])) + varints(_gaps(r["index"])) + r["scalars"].astype("<f4").tobytes()
        # the coefficients (and Pro statistics) of what moved since ``synced``, or of the whole pool
        touched = np.unique(np.concatenate([r["index"] for r in records])) if records else np.zeros(0, np.int64)
        sparse = varint(len(touched)) + varints(_gaps(touched)) + head + self._stats_bytes(state, touched)
        dense = head + self._stats_bytes(state, np.arange(self.pool))
        bodies = {REPLAY: bytes(replay), SPARSE: sparse, DENSE: dense}
        return {m: compact_frame(DOWN_KIND, ctx.round, [m, has_head], body) for m, body in bodies.items()}

    def _stats_bytes(self, stats: dict[str, Any], index: np.ndarray) -> bytes:
        out = stats["coef"][index].astype("<f4").tobytes()
        if self.pro:
            out += stats["amp_sum"][index].astype("<f4").tobytes() + varints(int(c) for c in stats["amp_count"][index])
        return out

    def zo_decode(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> ZOUpdate:
        reader = compact_unframe(payload, UP_KIND, ctx.round)
        scalars = read_finite(reader.take(self.k * 4), (self.k, 1))
        reader.end()
        return ZOUpdate(scalars)

    def zo_aggregate(self, state: dict[str, Any], updates: dict[int, ZOUpdate], ctx: RoundContext) -> dict[str, float]:
        """ĝ_j = (1/|S|) Σ over the survivors' steps that drew seed j of their scalars."""
        total = np.zeros(self.pool, dtype=np.float64)
        touched = np.zeros(self.pool, dtype=bool)
        for client, u in updates.items():
            idx = self.step_indices(ctx.round, ctx.seed, client, state)
            np.add.at(total, idx, u.scalars[:, 0].astype(np.float64))
            touched[idx] = True
        index = np.flatnonzero(touched)
        scalars = (total[index] / len(updates)).astype(np.float32)
        record = {"round": ctx.round, "index": index, "scalars": scalars}
        self.apply_to_server(state, lambda: self.replay(record, state))
        state["history"].append(record)
        metrics = {
            **self.catchup_log,
            "zo_scalar_abs_mean": float(np.abs(scalars).mean()) if scalars.size else 0.0,
            "zo_lr": self.lr_at(ctx.round),
        }
        metrics["seeds_touched"] = float(index.size)
        self.catchup_log = {}
        return metrics

    # ---- client ---------------------------------------------------------------------------------
    def init_client_state(self) -> dict[str, Any]:
        return {**super().init_client_state(), **self.fresh_stats()}

    def zo_catch_up(self, message: bytes, own: dict[str, Any], ctx: RoundContext) -> dict[str, Any]:
        reader = compact_unframe(message, DOWN_KIND, ctx.round)
        mode, has_head = reader.varint(DENSE), reader.varint(1)
        stats = {k: own[k].copy() for k in ("coef", "amp_sum", "amp_count")}
        synced = int(own["synced"])
        if mode == REPLAY:
            rounds = decode_runs(reader, ctx.round, self.wire.max_records)
            head = read_head(reader.take(self.wire.head_bytes), self.wire) if has_head else None
            synced = self.load_warm_head(head, synced, rounds[0] if rounds else None)
            for r in rounds:
                count = reader.varint(self.pool)
                index = _read_index(reader, count, self.pool)
                scalars = read_finite(reader.take(4 * count), (count,))
                if r > synced:  # records this client already applied are skipped
                    self.replay({"round": r, "index": index, "scalars": scalars}, stats)
        else:
            index = np.arange(self.pool) if mode == DENSE else _read_index(reader, reader.varint(self.pool), self.pool)
            head = read_head(reader.take(self.wire.head_bytes), self.wire) if has_head else None
            self.load_warm_head(head, synced, None)
            values = {"coef": read_finite(reader.take(4 * index.size), (index.size,))}
            if self.pro:
                values["amp_sum"] = read_finite(reader.take(4 * index.size), (index.size,))
                values["amp_count"] = np.array([reader.varint(self.cfg.rounds) for _ in range(index.size)], dtype=np.int64)
                if np.any(values["amp_sum"] < 0):
                    raise PayloadError("message holds a negative seed amplitude")
            self.jump(index, values, stats)
        reader.end()
        return {**own, **stats}

    def zo_train(self, client: int, own: dict[str, Any], ctx: RoundContext) -> tuple[bytes, float]:
        index = self.step_indices(ctx.round, ctx.seed, client, own)
        scalars, loss = self.local_steps(client, self.pool_seeds[index], ctx)
        return compact_frame(UP_KIND, ctx.round, [], scalars.astype("<f4").tobytes()), loss
