"""DeComFL: zeroth-order federated fine-tuning where only scalars travel (and the base of every ZO method).

After Li, Ying, Liu, Dong, Yang (ICLR 2025). Each round has one seed per local step, derived from
the run seed and the round (so no seed travels). A sampled client first catches up: it replays
every record (the averaged scalars of a round) it missed, which makes its weights bit-identical
to the server's. Then it runs K local zeroth-order steps with P perturbations each (z regenerated
from the seed, never stored; see :mod:`fedsqueeze.methods.zo`) and uploads only the K·P
directional-derivative scalars. The server averages them per (step, perturbation), applies the
record to its own weights by the same replay, and keeps the records back to its stalest client.
The wire formats are in :mod:`fedsqueeze.methods.decomfl_wire`. ``adjust_perturb`` (DeComFL's flag)
changes P at set rounds; P(round) is a pure function of the config, so both ends size every
message alike. ``momentum`` (every ZO method but fedkseed) replays records through a moving
average that the server and each client keep (:class:`fedsqueeze.methods.zo.Momentum`).

:class:`ZOMethod` holds what every seed-and-scalar method shares (fedkseed and feedsign subclass
it): what trains (``params``: LoRA on the query/value projections plus the head, every weight, or
the head alone), the warm start, the client's own copy of the weights, the learning-rate schedule,
and the loss of a zeroth-order step.

Warm start (``warm_start_rounds`` > 0): a random head makes zeroth-order training crawl, so the
first rounds are federated linear probing on the frozen backbone's cached features (the head
method's probe): the head goes down and its delta comes up through the raw codec, as float16 by
default (counted in the same results). A client that missed them receives the warm-started head
once, inside its first zeroth-order message.

Differential privacy (``dp_clip`` > 0): the server clips each client's K·P scalars to L2 norm C,
sums them, adds Gaussian noise σ·C per scalar and divides by ``clients_per_round`` (the DP-FedAvg
mechanism of :mod:`fedsqueeze.privacy` on the scalar vector); warm-start rounds go through the
same mechanism on the head delta (``dp_warm_clip``), and ε counts every round.

Simulator note: clients share one model object, so each client's own weights (what it would keep
in memory) live in its client state as ``{"synced": round, "weights": ...}``; a client loads them,
replays the records from its message, and trains. The bit-identity of the replay is tested.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, expect_tensors, get_codec
from fedsqueeze.codecs.base import all_finite
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods.base import ClientOutput, Method, RoundContext, register_method
from fedsqueeze.methods.decomfl_wire import ZOShape, decode_downlink, decode_uplink, encode_downlink, encode_uplink
from fedsqueeze.methods.head import evaluate_probe, head_names, train_probe
from fedsqueeze.methods.peft import inject_lora, split_modules
from fedsqueeze.methods.robust import SCALAR_RULES
from fedsqueeze.methods.updates import TensorUpdate, ZOUpdate, example_count, of_type, stepped, weighted_mean
from fedsqueeze.methods.weights import evaluate_weights, load_weights, named_params, read_weights
from fedsqueeze.methods.zo import Momentum, Perturber, local_zo
from fedsqueeze.methods.zo_top import TopLayers
from fedsqueeze.models import Classifier
from fedsqueeze.options import Check, above, at_least, between, option
from fedsqueeze.privacy import dp_epsilon, private_mean
from fedsqueeze.seeding import SERVER
from fedsqueeze.task import Task
from fedsqueeze.training import Encoded, batch_inputs, iterate_batches
from fedsqueeze.training import evaluate as evaluate_split

Tensors = dict[str, np.ndarray]
# measured on the default task (docs/decomfl.md): full 1e-3 diverged, 1e-4 lowered the loss but
# not the error; lora 1e-2 diverged (centralised screen), 2e-3 learnt steadily
DEFAULT_LR = {"full": 1e-4, "lora": 2e-3, "head": 1e-3, "top": 2e-3}
WARM_DTYPES = {"float16": np.float16, "float32": np.float32}
MAX_PERTURBATIONS = 4096  # the most perturbations per step adjust_perturb may reach (bounds every message)


def perturb_changes(text: str, base: int) -> tuple[tuple[int, int], ...]:
    """The ``adjust_perturb`` schedule as (round, P from that round on); ValueError if malformed.

    ``text`` is comma-separated items, each ``R`` (P doubles at round R) or ``R:P`` (P becomes P
    at round R), with strictly increasing rounds ≥ 1: ``"4,7"`` from P = 1 gives P = 1, 2, 4 from
    rounds 1, 4, 7; ``"3:5,6:2"`` gives 1, 5, 2 from rounds 1, 3, 6. ``""`` = no change.
    """
    changes: list[tuple[int, int]] = []
    p, last = base, 0
    for item in (part.strip() for part in text.split(",")):
        if not item and not text.strip():
            continue
        round_text, sep, p_text = item.partition(":")
        start = int(round_text)
        p = int(p_text) if sep else 2 * p
        if start <= last or p < 1:
            raise ValueError(f"adjust_perturb item {item!r}: rounds must increase from 1 and P be >= 1")
        changes.append((start, p))
        last = start
    return tuple(changes)


def _parses(text: str) -> bool:
    try:
        perturb_changes(text, 1)
    except ValueError:
        return False
    return True


PERTURB_SCHEDULE = Check(_parses, "empty or comma-separated R (P doubles at round R) or R:P items, rounds increasing", "0")


@dataclass
class ZOOptions:
    """The options every zeroth-order method shares."""

    mu: float = option(1e-3, "μ: finite-difference step", check=above(0.0))
    difference: str = option(
        "central", "'central' (f(w+μz) − f(w−μz)) / 2μ or 'forward' (f(w+μz) − f(w)) / μ", choices=("central", "forward")
    )
    params: str = option(
        "lora",
        "what trains: 'lora' (LoRA on query/value + head), 'full' (every weight), 'head' (classifier only), "
        "'top' (LoRA on top_modules of the top_layers layers + head, on cached lower-layer outputs); "
        "lr 0 = 2e-3, 1e-4, 1e-3, 2e-3 respectively",
        choices=tuple(DEFAULT_LR),
    )
    lr_schedule: str = option(
        "constant", "per-round lr of the zeroth-order phase: 'constant', 'cosine' (to 0) or 'exp'", choices=("constant", "cosine", "exp")
    )
    lr_decay: float = option(0.9, "factor per round for lr_schedule='exp'", check=above(0.0))
    zo_batch_size: int = option(
        0, "minibatch of each zeroth-order step; 0 = the run's batch_size, -1 = all the client's data", check=at_least(-1)
    )
    warm_start_rounds: int = option(1, "first rounds spent on federated linear probing of the head (0 = none)", check=at_least(0))
    warm_start_steps: int = option(100, "local AdamW steps on cached features in each warm-start round", check=at_least(0))
    warm_start_lr: float = option(1e-2, "learning rate of the warm-start linear probing", check=at_least(0.0))
    warm_start_dtype: str = option("float16", "wire dtype of the warm-start head and its deltas", choices=tuple(WARM_DTYPES))
    rank: int = option(8, "LoRA rank r for params='lora' and 'top'", check=at_least(1))
    lora_alpha: float = option(16.0, "LoRA scaling alpha for params='lora' and 'top' (update scaled by alpha / r)", check=above(0.0))
    top_layers: int = option(
        1,
        "params='top': how many of the encoder's top layers train (the layers below are run once per client and cached)",
        check=at_least(1),
    )
    top_modules: str = option(
        "query,key,value,dense",
        "params='top': the modules of the top layers that get LoRA (comma-separated; 'dense' = the attention output and both "
        "feed-forward projections)",
    )
    momentum: float = option(
        0.0,
        "β of a moving average of the zeroth-order steps, m ← β·m + (1−β)·ĝ, w ← w − lr·m (0 = plain ZO-SGD); "
        "server and clients keep m (one more copy of the trainable weights), so replay stays exact",
        check=between(0.0, 1.0, hi_open=True),
    )
    adam_beta2: float = option(
        0.0,
        "Adam-style ZO (ZO-AdaMM): β2 of the second moment v ← β2·v + (1−β2)·ĝ², w ← w − lr·m̂/(√v̂ + 1e-8) with m of "
        "'momentum', both bias-corrected (0 = off); server and clients keep m, v and the step count (three copies)",
        check=between(0.0, 1.0, hi_open=True),
    )


@dataclass
class HeadZOOptions(ZOOptions):
    """The shared options with fedkseed's and feedsign's defaults: the head, on whole-client batches.

    Measured on the default task (docs/zo.md): their steps on the head (cached features, a step
    costs a small matmul) learn where their steps on LoRA barely move; they want many local steps.
    """

    params: str = option(
        "head",
        "what trains: 'head' (classifier only, on cached features), 'lora' (LoRA on query/value + head), 'full' (every weight), "
        "'top' (LoRA on top_modules of the top_layers layers + head, on cached lower-layer outputs); "
        "lr 0 = the method's default for it (`fedsqueeze methods`)",
        choices=tuple(DEFAULT_LR),
    )
    zo_batch_size: int = option(
        -1, "minibatch of each zeroth-order step; -1 = all the client's data, 0 = the run's batch_size", check=at_least(-1)
    )


@dataclass
class DeComFLOptions(ZOOptions):
    # old option names (before the names were made the same across methods) say what they are now
    renamed: ClassVar[dict[str, str]] = {"aggregation": "aggregate", "lora_r": "rank"}

    perturbations: int = option(1, "P: random perturbations per local step (each uploads one float32)", check=at_least(1))
    adjust_perturb: str = option(
        "",
        "DeComFL's adjust_perturb: rounds where P changes, e.g. '4,7' (P doubles at rounds 4 and 7) or '4:2,7:8' "
        f"(P set); both ends derive P of each round, so the messages grow with it (P <= {MAX_PERTURBATIONS})",
        check=PERTURB_SCHEDULE,
    )
    aggregate: str = option(
        "mean",
        "how the server combines the clients' scalars: 'mean', or robust 'median' / 'trimmed_mean' / 'multi_krum'",
        choices=tuple(SCALAR_RULES),
    )
    trim_beta: float = option(
        0.1, "aggregate=trimmed_mean: fraction β of scalars trimmed from each end", check=between(0.0, 0.5, hi_open=True)
    )
    krum_f: int = option(1, "aggregate=multi_krum: number f of attackers tolerated (the k − f best-scored are averaged)", check=at_least(0))
    dp_clip: float = option(0.0, "DP: clip each client's K·P scalars to this L2 norm C (0 = no DP)", check=at_least(0.0))
    dp_noise: float = option(0.0, "DP: noise multiplier σ; Gaussian noise σ·C is added to each summed scalar", check=at_least(0.0))
    dp_warm_clip: float = option(0.1, "DP: L2 clip of a warm-start head delta (same σ)", check=above(0.0))
    dp_delta: float = option(1e-5, "DP: δ at which ε is reported", check=between(0.0, 1.0, lo_open=True, hi_open=True))

    def validate(self) -> None:
        top = max([p for _, p in perturb_changes(self.adjust_perturb, self.perturbations)] + [self.perturbations])
        if top > MAX_PERTURBATIONS:
            raise ConfigError(f"adjust_perturb reaches P = {top}; at most {MAX_PERTURBATIONS} perturbations per step")
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise ConfigError("dp_noise needs dp_clip > 0 (the noise is scaled by the clipping norm)")
        if self.dp_clip > 0 and self.aggregate != "mean":
            raise ConfigError("DP (dp_clip > 0) needs aggregate='mean': the noise calibration is for a sum")


class ZOMethod(Method):
    """What the zeroth-order methods share; subclasses define the zeroth-order rounds' messages.

    Hooks: :meth:`zo_downlink`, :meth:`zo_decode`, :meth:`zo_aggregate` (server) and
    :meth:`zo_catch_up`, :meth:`zo_train` (client). Server state: ``weights``, ``history`` (the
    records, each with its ``round``), ``synced`` (the round each client holds), ``warm_head``.
    """

    Options: ClassVar[type] = ZOOptions
    perturbations_per_step: int = 1
    # lr when the run's lr is 0, by what trains (a subclass may tune its own)
    default_lrs: ClassVar[dict[str, float]] = DEFAULT_LR

    def perturb_changes(self) -> tuple[tuple[int, int], ...]:
        """The rounds where P changes, as (round, P); none unless the method offers ``adjust_perturb``."""
        return ()

    # ---- set-up ---------------------------------------------------------------------------------
    def check_run(self, cfg) -> None:
        if cfg.local_steps < 1:
            raise ConfigError(f"method {self.name!r} needs local_steps >= 1 (one zeroth-order step each); got {cfg.local_steps}")

    def setup(self, task: Task) -> None:
        o = self.opts
        self.task = task
        model = task.model
        self.head = head_names(model)
        self.names = self._select(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in self.head)  # only the warm start uses autograd (on the head)
        self.named = named_params(model, self.names)
        self.perturber = Perturber(list(self.named.values()))
        moments = o.momentum > 0 or o.adam_beta2 > 0
        self.momentum = Momentum(self.perturber, o.momentum, o.adam_beta2) if moments else None
        self.k = self.cfg.local_steps
        self.p = self.perturbations_per_step
        self.warm_dtype = WARM_DTYPES[o.warm_start_dtype]
        self.head_elements = sum(self.named[n].numel() for n in self.head)
        head_shapes = {n: tuple(self.named[n].shape) for n in self.head}
        self.wire = ZOShape(self.k, self.p, head_shapes, np.dtype(self.warm_dtype), max(1, self.cfg.rounds), self.perturb_changes())
        self.initial = read_weights(self.named)  # the pre-trained weights every party starts from
        self.raw = get_codec("raw")
        model.eval()

    def _select(self, model: Classifier) -> list[str]:
        """The names of what trains, for the ``params`` option (injecting LoRA if asked)."""
        if self.opts.params == "full":
            return [n for n, _ in model.named_parameters()]
        if self.opts.params == "head":
            return list(self.head)
        if self.opts.params == "top":
            self.top = TopLayers(model, self.opts.top_layers)
            targets = split_modules(self.opts.top_modules)
            return self.top.inject_lora(self.opts.rank, self.opts.lora_alpha, targets, self.cfg.seed) + list(self.head)
        # the adapters' A matrices come from the run seed so every party builds the same model
        lora = inject_lora(model, self.opts.rank, self.opts.lora_alpha, ["query", "value"], self.name, seed=self.cfg.seed)
        return lora + list(self.head)

    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr > 0 else self.default_lrs[self.opts.params]

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.named.values())

    def p_at(self, round_: int) -> int:
        """P (perturbations per step) of ``round_``: both ends derive it from the run config."""
        return self.wire.p_at(round_)

    def lr_at(self, round_: int) -> float:
        """The zeroth-order learning rate of ``round_`` (a pure function: replay needs it too)."""
        t = round_ - self.opts.warm_start_rounds - 1
        span = max(1, self.cfg.rounds - self.opts.warm_start_rounds)
        if self.opts.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t / span))
        if self.opts.lr_schedule == "exp":
            return self.lr * self.opts.lr_decay**t
        return self.lr

    def is_warm(self, round_: int) -> bool:
        return round_ <= self.opts.warm_start_rounds

    def step_seeds(self, round_: int, seed: int) -> np.ndarray:
        """The K step seeds of ``round_``: a function of the run seed, so they never travel."""
        return (
            RoundContext(round_, self.cfg.rounds, seed).rng(SERVER, f"{self.name}-seeds").integers(0, 1 << 63, size=self.k, dtype=np.uint64)
        )

    # ---- server ---------------------------------------------------------------------------------
    def zero_momentum(self) -> dict[str, Any]:
        """The moments every party starts from (m = 0, v = 0, t = 0) if they are on, else {}."""
        if self.momentum is None:
            return {}
        zeros = {n: np.zeros_like(a) for n, a in self.initial.items()}
        return {"momentum": zeros, "zo_steps": 0, **({"second_moment": zeros} if self.momentum.second else {})}

    def load_model(self, held: dict[str, Any]) -> None:
        """Load ``held``'s weights (and moments) into the model."""
        load_weights(self.named, held["weights"])
        if self.momentum is not None:
            load_weights(dict(zip(self.named, self.momentum.buffers)), held["momentum"])
            if self.momentum.second:
                load_weights(dict(zip(self.named, self.momentum.second)), held["second_moment"])
            self.momentum.steps = int(held["zo_steps"])

    def read_model(self) -> dict[str, Any]:
        """The model's weights (and moments), as ``load_model`` takes them."""
        out: dict[str, Any] = {"weights": read_weights(self.named)}
        if self.momentum is not None:
            out["momentum"] = read_weights(dict(zip(self.named, self.momentum.buffers)))
            if self.momentum.second:
                out["second_moment"] = read_weights(dict(zip(self.named, self.momentum.second)))
            out["zo_steps"] = self.momentum.steps
        return out

    def init_server(self) -> dict[str, Any]:
        return {
            **self.zero_momentum(),
            "weights": {n: a.copy() for n, a in self.initial.items()},
            "history": [],  # the records of the rounds some client still lacks, oldest first
            "synced": np.zeros(self.cfg.clients, dtype=np.int64),  # global round each client holds
            "warm_head": {},  # the head after the warm start, in its wire dtype
        }

    def downlink(self, state: dict[str, Any], ctx: RoundContext, client: int) -> bytes:
        synced = int(state["synced"][client])
        if self.is_warm(ctx.round):
            head = {}
            if synced < ctx.round - 1:  # the head moved since this client last saw it
                head = {n: state["weights"][n].astype(self.warm_dtype) for n in self.head}
            return encode_tensors(self.raw, head, round=ctx.round)
        warm_head = state["warm_head"] if synced < self.opts.warm_start_rounds else None
        return self.zo_downlink(state, ctx, synced, warm_head)

    def missed(self, state: dict[str, Any], synced: int) -> list[dict[str, Any]]:
        """The records of the rounds after ``synced``, oldest first."""
        return [r for r in state["history"] if r["round"] > synced]

    def decode_update(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> TensorUpdate | ZOUpdate:
        if not self.is_warm(ctx.round):
            return self.zo_decode(payload, client, state, ctx)
        tensors, extra = decode_tensors(payload, self._head_ctx(), codec=self.raw)
        self._check_head(tensors, "warm-start update")
        n = example_count(extra.get("n"), client, self.task.client_sizes(), "warm-start update")
        return TensorUpdate({k: v.astype(np.float32) for k, v in tensors.items()}, n)

    def _head_ctx(self) -> CodecContext:
        """Warm-start messages carry only the head, in the warm-start dtype (checked before reading)."""
        shapes = {n: tuple(self.named[n].shape) for n in self.head}
        return CodecContext(max_elements=self.head_elements, expect=expect_tensors(shapes, self.warm_dtype))

    def _check_head(self, tensors: Tensors, what: str) -> None:
        if set(tensors) != set(self.head):
            raise PayloadError(f"{what} must carry exactly the head tensors {self.head}")
        for n, a in tensors.items():
            if tuple(a.shape) != tuple(self.named[n].shape) or a.dtype != self.warm_dtype:
                raise PayloadError(f"{what}: tensor {n!r} has shape {a.shape} / dtype {a.dtype}")
            if not all_finite(a):
                raise PayloadError(f"{what}: tensor {n!r} holds NaN or infinity")

    def aggregate(
        self,
        state: dict[str, Any],
        updates: dict[int, TensorUpdate] | dict[int, ZOUpdate],
        ctx: RoundContext,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Warm rounds: average the head deltas. Zeroth-order rounds: the subclass's rule makes a record."""
        for client in updates:
            state["synced"][client] = ctx.round - 1  # it replied, so it holds the global model of round − 1
        metrics: dict[str, float] = {}
        if self.is_warm(ctx.round):
            metrics = self._aggregate_warm(state, of_type(updates, TensorUpdate), ctx)
        elif updates:
            zo = dict(zip(updates, of_type(updates, ZOUpdate)))
            metrics = self.zo_aggregate(state, zo, ctx)
            if self.opts.params == "top":  # a loss evaluation's share of a full forward (for compute counts)
                metrics["zo_forward_share"] = self.top.fraction
        oldest = max(int(state["synced"].min()), self.opts.warm_start_rounds)
        state["history"] = [r for r in state["history"] if r["round"] > oldest]  # nobody needs the rest
        metrics["history_records"] = float(len(state["history"]))
        return state, metrics

    def _aggregate_warm(self, state: dict[str, Any], updates: list[TensorUpdate], ctx: RoundContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if updates or self.dp_on:
            like = {n: state["weights"][n] for n in self.head}
            if self.dp_on:  # uniform weights and a fixed denominator, as DP-FedAvg
                avg, metrics = private_mean(
                    [u.delta for u in updates],
                    like,
                    self.opts.dp_warm_clip,
                    self.opts.dp_noise,
                    self.cfg.clients_per_round,
                    ctx.rng(SERVER, "dp-noise"),
                )
                metrics.update(self.dp_metrics(ctx))
            else:
                counts = [u.n for u in updates]  # summed in float64: float16 deltas near 65504 cannot overflow it
                avg = {n: weighted_mean([u.delta[n] for u in updates], counts) for n in self.head}
            for n in self.head:
                # round to the wire dtype so the server holds exactly what clients will receive
                state["weights"][n] = stepped(state["weights"][n], avg[n], self.warm_dtype).astype(np.float32)
        if ctx.round == self.opts.warm_start_rounds:
            state["warm_head"] = {n: state["weights"][n].astype(self.warm_dtype) for n in self.head}
        return metrics

    @property
    def dp_on(self) -> bool:
        return getattr(self.opts, "dp_clip", 0.0) > 0

    def dp_metrics(self, ctx: RoundContext) -> dict[str, Any]:
        """ε after ``ctx.round`` rounds of the subsampled Gaussian mechanism (None: no noise, no guarantee)."""
        eps = dp_epsilon(self.cfg.clients_per_round / self.cfg.clients, self.opts.dp_noise, ctx.round, self.opts.dp_delta)
        return {"dp_epsilon": eps if np.isfinite(eps) else None, "dp_delta": self.opts.dp_delta}

    def apply_to_server(self, state: dict[str, Any], apply: Any) -> None:
        """Run ``apply()`` (a replay of one record) on the server's weights (and moving average)."""
        self.load_model(state)
        apply()
        state.update(self.read_model())

    def evaluate(self, state: dict[str, Any]) -> tuple[float, float]:
        if self.opts.params == "head":
            load_weights(self.named, state["weights"])
            return evaluate_probe(self.task, self.cfg.eval_batch_size)
        if self.opts.params == "top":
            load_weights(self.named, state["weights"])
            return evaluate_split(self.task.model, self.top_cache("test"), self.cfg.eval_batch_size, forward=self.top.forward)
        return evaluate_weights(self.task, self.named, state["weights"])

    def top_cache(self, split: str) -> Encoded:
        """params='top': the inputs of the first trainable layer on ``split``, computed once.

        The layers below it never train, so one pass of the pre-trained model serves every round
        (simulator: once for the whole split; a client would cache its own examples).
        """
        caches = self.__dict__.setdefault("_top_caches", {})
        if split not in caches:
            data = self.task.train if split == "train" else self.task.test
            caches[split] = self.top.cache(data, self.cfg.eval_batch_size)
        return caches[split]

    # ---- client ---------------------------------------------------------------------------------
    def init_client_state(self) -> dict[str, Any]:
        """What a client holds before it first takes part: the pre-trained weights, synced to round 0."""
        return {"synced": 0, "weights": self.initial, **self.zero_momentum()}

    def client_update(self, message: bytes, client: int, state: Any, ctx: RoundContext) -> ClientOutput:
        t0 = time.perf_counter()
        own = state if isinstance(state, dict) else self.init_client_state()
        self.load_model(own)  # this client's own model (simulator: clients share one model object)
        if self.is_warm(ctx.round):
            return self._warm_update(message, client, own, ctx, t0)
        own = self.zo_catch_up(message, own, ctx)
        view = self.read_model()  # == the server's weights (and moving average) after round − 1
        codec_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        payload, loss = self.zo_train(client, own, ctx)
        train_s = time.perf_counter() - t1
        new_state = {**own, **view, "synced": ctx.round - 1}
        return ClientOutput(payload, new_state, {"train_s": train_s, "codec_s": codec_s, "train_loss": loss})

    def load_warm_head(self, head: Tensors | None, synced: int, first_record: int | None) -> int:
        """Load the warm-started head if the message brought it; return the round the client now holds."""
        if head is not None:
            self._check_head(head, "warm-start head")
            load_weights(self.named, head)
            synced = max(synced, self.opts.warm_start_rounds)
        if first_record is not None and first_record <= self.opts.warm_start_rounds or synced < self.opts.warm_start_rounds:
            raise PayloadError("server message lacks the warm-start head this client needs")
        return synced

    def _loss_fn(self, client: int) -> tuple[Any, int]:
        """``loss(idx) -> float`` on this client's data, and the number of its examples."""
        idx_all = torch.from_numpy(self.task.client_indices[client])
        if self.opts.params == "head":
            feats = self.task.frozen_features("train")[idx_all]
            labels = self.task.train.labels[idx_all]
            head = self.task.model.head
            return (lambda idx: float(F.cross_entropy(head(feats[idx]), labels[idx]))), len(idx_all)
        if self.opts.params == "top":
            cached = self.top_cache("train").subset(idx_all)
            forward = self.top.forward
            return (lambda idx: float(F.cross_entropy(forward(batch_inputs(cached, idx)), cached.labels[idx]))), len(cached)
        data = self.task.client_data(client)
        model = self.task.model
        return (lambda idx: float(F.cross_entropy(model(**batch_inputs(data, idx)), data.labels[idx]))), len(data)

    def local_steps(self, client: int, seeds: np.ndarray, ctx: RoundContext, step: Any = None) -> tuple[np.ndarray, float]:
        """Run one local zeroth-order step per seed; the K×P scalars and the mean loss."""
        loss_of, n = self._loss_fn(client)
        bs = self.opts.zo_batch_size
        bs = n if bs < 0 else (bs or self.cfg.batch_size)
        self.task.model.eval()  # no dropout: both evaluations of a perturbation must see the same function
        batches = iterate_batches(n, bs, len(seeds), ctx.torch_gen(client, "batches"))
        o = self.opts
        p, lr = self.p_at(ctx.round), self.lr_at(ctx.round)
        return local_zo(self.perturber, loss_of, batches, seeds, p, o.mu, o.difference, lr, step, self.momentum)

    def _warm_update(self, message: bytes, client: int, own: dict[str, Any], ctx: RoundContext, t0: float) -> ClientOutput:
        """Federated linear probing on cached features: head down, head delta up."""
        tensors, extra = decode_tensors(message, self._head_ctx(), codec=self.raw)
        if extra.get("round") != ctx.round:
            raise PayloadError("warm-start message is for another round")
        if tensors:
            self._check_head(tensors, "warm-start head")
            load_weights(self.named, tensors)
        elif own["synced"] != ctx.round - 1:
            raise PayloadError("warm-start message lacks the head this client needs")
        view = read_weights(self.named)
        before = {n: view[n] for n in self.head}
        codec_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = train_probe(
            self.task,
            client,
            [self.named[n] for n in self.head],
            steps=self.opts.warm_start_steps,
            batch_size=self.cfg.batch_size,
            lr=self.opts.warm_start_lr,
            generator=ctx.torch_gen(client, "batches"),
        )
        train_s = time.perf_counter() - t1
        after = read_weights(self.named, self.head)
        delta = {n: (after[n] - before[n]).astype(self.warm_dtype) for n in self.head}
        payload = encode_tensors(self.raw, delta, n=len(self.task.client_indices[client]))
        new_state = {**own, "synced": ctx.round - 1, "weights": view}
        return ClientOutput(payload, new_state, {**metrics, "train_s": train_s, "codec_s": codec_s})

    # ---- the zeroth-order rounds: defined by each method ----------------------------------------
    @abstractmethod
    def zo_downlink(self, state: dict[str, Any], ctx: RoundContext, synced: int, warm_head: Tensors | None) -> bytes:
        """The zeroth-order downlink for a client synced up to round ``synced``."""

    @abstractmethod
    def zo_decode(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> ZOUpdate:
        """Decode (and bound) one client's zeroth-order upload."""

    @abstractmethod
    def zo_aggregate(self, state: dict[str, Any], updates: dict[int, ZOUpdate], ctx: RoundContext) -> dict[str, float]:
        """Fold the round's zeroth-order uploads into the server state; return round metrics."""

    @abstractmethod
    def zo_catch_up(self, message: bytes, own: dict[str, Any], ctx: RoundContext) -> dict[str, Any]:
        """Bring the loaded model (and ``own``'s extra state) to round − 1; return the updated ``own``."""

    @abstractmethod
    def zo_train(self, client: int, own: dict[str, Any], ctx: RoundContext) -> tuple[bytes, float]:
        """This client's local zeroth-order steps: the payload and the mean loss."""


@register_method
class DeComFL(ZOMethod):
    name = "decomfl"
    summary = "zeroth-order FL: K·P scalars up, the missed rounds' scalars down; communication independent of model size"
    Options = DeComFLOptions
    default_lr = DEFAULT_LR["lora"]  # of the default params; `fedsqueeze methods` shows it

    @property
    def perturbations_per_step(self) -> int:  # type: ignore[override]
        return self.opts.perturbations

    def perturb_changes(self) -> tuple[tuple[int, int], ...]:
        return perturb_changes(self.opts.adjust_perturb, self.opts.perturbations)

    def zo_downlink(self, state: dict[str, Any], ctx: RoundContext, synced: int, warm_head: Tensors | None) -> bytes:
        return encode_downlink(self.wire, ctx.round, self.missed(state, synced), warm_head)

    def zo_decode(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> ZOUpdate:
        return ZOUpdate(decode_uplink(payload, self.wire, ctx.round))

    def zo_aggregate(self, state: dict[str, Any], updates: dict[int, ZOUpdate], ctx: RoundContext) -> dict[str, float]:
        scalars = [u.scalars for u in updates.values()]
        metrics: dict[str, Any] = {}
        if self.dp_on:
            like = {"g": np.zeros((self.k, self.p_at(ctx.round)), dtype=np.float32)}
            noisy, metrics = private_mean(
                [{"g": s} for s in scalars],
                like,
                self.opts.dp_clip,
                self.opts.dp_noise,
                self.cfg.clients_per_round,
                ctx.rng(SERVER, "dp-noise"),
            )
            combined = noisy["g"]
            metrics.update(self.dp_metrics(ctx))
        else:
            combined = SCALAR_RULES[self.opts.aggregate](np.stack(scalars), self.opts.trim_beta, self.opts.krum_f)
        combined = combined.astype(np.float32)
        record = {"round": ctx.round, "scalars": combined}
        self.apply_to_server(state, lambda: self.replay(record, ctx.seed))
        state["history"].append(record)
        zo_metrics = {"zo_scalar_abs_mean": float(np.abs(combined).mean(dtype=np.float64)), "zo_lr": self.lr_at(ctx.round)}
        return {**metrics, **zo_metrics, "zo_perturbations": float(self.p_at(ctx.round))}

    def replay(self, record: dict[str, Any], seed: int) -> None:
        """Apply one record to the loaded model: ``w ← w − lr/P · Σ g[k, i] · z(seed_k, i)``, step by step (or with momentum)."""
        r = record["round"]
        self.perturber.apply_record(self.step_seeds(r, seed), record["scalars"], self.lr_at(r), self.momentum)

    def zo_catch_up(self, message: bytes, own: dict[str, Any], ctx: RoundContext) -> dict[str, Any]:
        msg = decode_downlink(message, self.wire, ctx.round)
        synced = self.load_warm_head(msg.head, int(own["synced"]), msg.rounds[0] if msg.rounds else None)
        for r, g in zip(msg.rounds, msg.scalars):
            if r > synced:  # records this client already applied are skipped
                self.replay({"round": r, "scalars": g}, ctx.seed)
        return own

    def zo_train(self, client: int, own: dict[str, Any], ctx: RoundContext) -> tuple[bytes, float]:
        scalars, loss = self.local_steps(client, self.step_seeds(ctx.round, ctx.seed), ctx)
        return encode_uplink(self.wire, ctx.round, scalars), loss
