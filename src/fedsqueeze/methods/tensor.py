"""TensorMethod: the shared shape of every method whose messages are named float tensors.

Downlink: the global values of the trainable tensors (never the frozen backbone, which every party
already has), or with ``downlink=delta`` their coded change since the view the client holds, with
server-side error feedback (:mod:`fedsqueeze.methods.downlink`). Uplink: the client's change to them, ``delta = after − before``, weighted by its
number of examples at the server. Both directions go through a codec chosen by the options
``downlink_codec`` / ``uplink_codec`` (``raw`` = float32, FedAvg's 32 bits per parameter), so a
compressor composes with any subclass (fedavg, head, the PEFT methods...) with no new code.

Subclasses choose what trains (:meth:`select_trainable`), may change the model once
(:meth:`prepare_model`) and may replace the local loop (:meth:`local_train`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedsqueeze.codecs import CODECS, CodecContext, decode_tensors, encode_tensors, expect_tensors
from fedsqueeze.codecs.base import all_finite
from fedsqueeze.codecs.options import link_codecs, split_codec_options
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import scaffold
from fedsqueeze.methods.base import OPTIMIZERS, ClientOutput, Method, RoundContext, RoundMemo, state_digest
from fedsqueeze.methods.downlink import MODES, VIEW_KEY, DeltaDownlink
from fedsqueeze.methods.robust import TENSOR_RULES, RobustRule
from fedsqueeze.methods.scaffold import CONTROLS as SCAFFOLD_CONTROLS
from fedsqueeze.methods.server_opt import SCHEDULES, SERVER_OPTIMIZERS, ServerOpt
from fedsqueeze.methods.updates import MEAN_BLOCK, Accumulator, TensorUpdate, WeightedSum, example_count, nonfinite_part
from fedsqueeze.methods.weights import evaluate_weights, load_weights, named_params, read_weights
from fedsqueeze.models import Classifier
from fedsqueeze.options import above, at_least, between, option
from fedsqueeze.privacy import clip_update, dp_epsilon
from fedsqueeze.seeding import SERVER
from fedsqueeze.training import Encoded, num_local_steps, proximal_penalty, train_local

Tensors = dict[str, np.ndarray]


def codec_ids() -> list[str]:
    """Every registered codec (any of them can code an update)."""
    return sorted(CODECS)


def update_norm(tensors: Tensors) -> float:
    """The L2 norm of all the tensors together, summed in float64 (no overflow for float32 values)."""
    return float(np.sqrt(sum(float(np.einsum("i,i->", a.reshape(-1), a.reshape(-1), dtype=np.float64)) for a in tensors.values())))


@dataclass
class TensorOptions:
    uplink_codec: str = option("raw", "codec for the client update (see `fedsqueeze methods`)", choices=codec_ids)
    downlink: str = option(
        "full",
        "what the server sends: full = the global tensors every round; delta = their coded change since the view "
        "the client holds, with server-side error feedback (docs/codecs.md)",
        choices=MODES,
    )
    downlink_codec: str = option(
        "raw", "codec for the downlink (downlink=full: a weight codec, raw/zstd/fp16/sz3; delta: any codec)", choices=codec_ids
    )
    optimizer: str = option("adamw", "local optimizer", choices=OPTIMIZERS)
    server_opt: str = option(
        "none", "server optimizer on the combined update: none (FedAvg), avgm, adam, yogi, adagrad", choices=SERVER_OPTIMIZERS
    )
    server_lr: float = option(
        0.0, "server step size η on the combined update; 0 = the server_opt's default (1 for none/avgm, 0.01 adaptive)", check=at_least(0.0)
    )
    server_lr_schedule: str = option(
        "constant", "server η by round t of T: constant, cosine (η·½(1+cos(π(t−1)/T))) or exp (η·γ^(t−1))", choices=SCHEDULES
    )
    server_lr_decay: float = option(0.9, "server_lr_schedule=exp: factor γ per round", check=above(0.0))
    server_momentum: float = option(0.9, "FedAvgM: server momentum μ (server_opt=avgm)", check=between(0.0, 1.0, hi_open=True))
    beta1: float = option(0.9, "FedAdam/FedYogi/FedAdagrad: first-moment decay β1", check=between(0.0, 1.0, hi_open=True))
    beta2: float = option(0.99, "FedAdam/FedYogi: second-moment decay β2", check=between(0.0, 1.0, hi_open=True))
    tau: float = option(1e-3, "FedAdam/FedYogi/FedAdagrad: adaptivity τ (v starts at τ²)", check=above(0.0))
    robust: str = option(
        "mean", "how the server combines the client updates: mean (FedAvg) or a Byzantine-robust rule", choices=tuple(TENSOR_RULES)
    )
    trim_beta: float = option(0.1, "robust=trimmed_mean: fraction β of values trimmed from each end", check=between(0.0, 0.5, hi_open=True))
    krum_f: int = option(1, "robust=krum/multi_krum: number f of attackers tolerated", check=at_least(0))
    krum_m: int = option(0, "robust=multi_krum: updates averaged (0 = clients − f)", check=at_least(0))
    norm_bound: float = option(0.0, "clip each client update to this L2 norm before combining (0 = off)", check=at_least(0.0))
    cclip_tau: float = option(
        0.0,
        "robust=centered_clip: clipping radius τ (0 = the median distance of the updates to their coordinate median)",
        check=at_least(0.0),
    )
    cclip_iters: int = option(3, "robust=centered_clip: clipping iterations", check=at_least(1))
    prox_mu: float = option(0.0, "FedProx: proximal term μ/2·‖w − w_global‖² in local training (0 = off)", check=at_least(0.0))
    scaffold: bool = option(
        False, "SCAFFOLD: control variates correct every local gradient (g − c_i + c); c down and Δc_i up travel raw float32"
    )
    scaffold_control: str = option(
        "grad_mean",
        "SCAFFOLD's client variate: grad_mean (mean raw local gradient) or ii (option II, c_i − c + (x − y)/(K·lr): SGD only)",
        choices=SCAFFOLD_CONTROLS,
    )
    head_lr: float = option(
        1e-2, "learning rate of the (randomly initialised) head when backbone parameters train too; 0 = lr", check=at_least(0.0)
    )
    dp_clip: float = option(0.0, "DP-FedAvg: clip each client update to this L2 norm C (0 = no DP)", check=at_least(0.0))
    dp_noise: float = option(0.0, "DP-FedAvg: noise multiplier σ; Gaussian noise σ·C is added to the sum", check=at_least(0.0))
    dp_delta: float = option(1e-5, "DP-FedAvg: δ at which ε is reported", check=between(0.0, 1.0, lo_open=True, hi_open=True))
    max_update_norm: float = option(
        0.0,
        "reject a client update whose L2 norm exceeds this (0 = no bound); guards the model against huge finite updates",
        check=at_least(0.0),
    )

    def validate(self) -> None:
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise ConfigError("dp_noise needs dp_clip > 0 (the noise is scaled by the clipping norm)")
        if self.dp_clip > 0 and (self.robust != "mean" or self.norm_bound > 0):
            raise ConfigError("robust rules and norm_bound do not compose with DP-FedAvg (dp_clip already bounds each update)")
        if self.scaffold and self.dp_clip > 0:
            raise ConfigError("scaffold does not compose with DP-FedAvg: the accountant does not cover the control variates")


class TensorMethod(Method):
    """Global tensors down, weighted-average delta up. Subclasses pick the trainable tensors."""

    Options = TensorOptions
    # codec option defaults of this method's uplink codec, e.g. {"sz3": {"bound": 2e-2}}
    uplink_codec_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # True: the client uploads its trained tensors, not the delta (FedSZ as published)
    uplink_sends_weights: bool = False

    def __init__(self, cfg) -> None:
        # codec options (`sz3_bound=...`, see codecs/options.py) are split off before the
        # method's own options are checked, then validated against the codecs in use
        reserved = {f.name for f in dataclasses.fields(self.Options)}
        own, codec_opts = split_codec_options(cfg.options, reserved)
        super().__init__(dataclasses.replace(cfg, options=own))
        self.cfg = cfg
        self._downlink = RoundMemo()  # the round's message, keyed by the weights it encodes
        self.up_codec, self.down_codec = link_codecs(
            self.opts.uplink_codec,
            self.opts.downlink_codec,
            codec_opts,
            self.uplink_codec_defaults,
            downlink_updates=self.opts.downlink == "delta",
        )
        self.delta_downlink: DeltaDownlink | None = None  # set up with the model (downlink=delta)
        o = self.opts
        self.server_opt = ServerOpt(
            o.server_opt, o.server_lr, o.server_momentum, o.beta1, o.beta2, o.tau, o.server_lr_schedule, o.server_lr_decay, cfg.rounds
        )
        self.rule = RobustRule(o.robust, o.trim_beta, o.krum_f, o.krum_m, o.norm_bound, o.cclip_tau, o.cclip_iters)
        if o.scaffold and cfg.attack not in ("none", "label_flip"):
            # the attack rewrites the upload as one codec frame; SCAFFOLD's upload has two sections
            raise ConfigError(f"attack={cfg.attack!r} does not compose with scaffold=true (only label_flip does)")

    # ---- what trains ----------------------------------------------------------------------------
    def prepare_model(self, model: Classifier) -> None:
        """Change the model once before training (inject adapters...). Default: nothing."""

    @abstractmethod
    def select_trainable(self, model: Classifier) -> list[str]:
        """Names of the parameters that train and travel."""

    def setup(self, task) -> None:
        self.task = task
        self.prepare_model(task.model)
        named = dict(task.model.named_parameters())
        self.names = list(self.select_trainable(task.model))
        if not self.names:
            raise ValueError(f"method {self.name!r} selected no trainable parameters")
        chosen = set(self.names)
        for n, p in named.items():
            p.requires_grad_(n in chosen)
        self.named = named_params(task.model, self.names)  # what trains and travels, by name
        self.params = list(self.named.values())
        self.shapes = {n: tuple(p.shape) for n, p in self.named.items()}
        self.max_elements = sum(p.numel() for p in self.params)
        # what a payload in either direction must hold: these tensors, float32, these shapes
        self.expect = expect_tensors(self.shapes, np.float32)
        if self.opts.downlink == "delta":
            self.delta_downlink = DeltaDownlink(self.down_codec, self.expect, self.max_elements, self._check_tensors)
            self.initial_view = read_weights(self.named)  # v_0: the model every party builds before round 1

    def trainable_params(self) -> int:
        return self.max_elements

    def _check_tensors(self, tensors: Tensors, what: str) -> None:
        if tensors.keys() != self.shapes.keys():  # compared in place: two sets of a few dozen names outweigh a small head
            missing = sorted(set(self.names) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.names))[:3]
            raise PayloadError(f"{what} has the wrong tensors (missing {missing}, unexpected {extra})")
        for n, a in tensors.items():
            if tuple(a.shape) != self.shapes[n]:
                raise PayloadError(f"{what}: tensor {n!r} has shape {tuple(a.shape)}, expected {self.shapes[n]}")
            if a.dtype != np.float32:
                raise PayloadError(f"{what}: tensor {n!r} is {a.dtype}, expected float32")
            if not all_finite(a):
                raise PayloadError(f"{what}: tensor {n!r} holds NaN or infinity")

    def _decode_ctx(self, seed: int) -> CodecContext:
        return CodecContext(seed=seed, max_elements=self.max_elements, expect=self.expect)

    # ---- server ---------------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        weights = read_weights(self.named)
        state: dict[str, Any] = {"weights": weights}
        if self.server_opt.rule != "none":
            state["server_opt"] = self.server_opt.init_state(weights)
        if self.opts.scaffold:
            state["scaffold_c"] = scaffold.zeros_like(weights)
        if self.delta_downlink is not None:
            state[VIEW_KEY] = self.delta_downlink.init_state(weights)
        return state

    def downlink_for(self, state: dict[str, Any], ctx: RoundContext, client: int, held: tuple[int, int] | None) -> bytes:
        if self.delta_downlink is None:
            return self.downlink(state, ctx, client)
        # the first message of a round makes its broadcast and moves the server's client view
        self.delta_downlink.advance(state[VIEW_KEY], state["weights"], ctx.seed, ctx.round)
        return self._with_control(self.delta_downlink.message(state[VIEW_KEY], 0 if held is None else int(held[0])), state)

    def downlink(self, state: dict[str, Any], ctx: RoundContext, client: int) -> bytes:
        if self.delta_downlink is not None:  # a caller that does not say what the client holds: its initial state
            return self.downlink_for(state, ctx, client, None)

        # every client of a round gets the same bytes: encode once per round, as a real server would
        def encode() -> bytes:
            weights = encode_tensors(self.down_codec, state["weights"], CodecContext(seed=ctx.seed_for(SERVER, "downlink")))
            return self._with_control(weights, state)

        key = (ctx.round, ctx.seed, state_digest(state["weights"]), state_digest(state.get("scaffold_c")))
        return self._downlink.get(key, encode)

    def _with_control(self, message: bytes, state: dict[str, Any]) -> bytes:
        """The downlink message, with SCAFFOLD's server control variate when it runs."""
        if not self.opts.scaffold:
            return message
        return scaffold.pack(scaffold.DOWN_KIND, message, scaffold.encode_control(state["scaffold_c"]))

    def _control(self, data: memoryview, what: str) -> Tensors:
        """A control variate section (raw float32): exactly the trainable tensors, finite."""
        control = scaffold.decode_control(data, self._decode_ctx(0))
        self._check_tensors(control, what)
        return control

    def decode_update(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> TensorUpdate:
        # only the uplink codec this server configured, with its options, float32 of the expected
        # shapes (checked before anything is allocated), finite
        control = None
        if self.opts.scaffold:
            update, control_bytes = scaffold.unpack(scaffold.UP_KIND, payload)
            control = self._control(control_bytes, "client control variate update")
            payload = bytes(update)
        tensors, extra = decode_tensors(payload, self._decode_ctx(ctx.seed_for(-2, "uplink")), codec=self.up_codec)
        self._check_tensors(tensors, "client update")
        n = example_count(extra.get("n"), client, self.task.client_sizes())
        if self.uplink_sends_weights:  # the client trained from the client view (downlink=delta) or the global weights
            start = state[VIEW_KEY]["tensors"] if self.delta_downlink is not None else state["weights"]
            tensors = {n: tensors[n].astype(np.float32) - start[n] for n in self.names}
            self._check_tensors(tensors, "client update (as a delta)")
        bound = self.opts.max_update_norm
        if bound > 0:
            norm = update_norm(tensors)
            if not norm <= bound:
                raise PayloadError(f"client update has L2 norm {norm:.4g}, over the bound max_update_norm={bound:g}")
        if control is not None:
            return scaffold.ScaffoldUpdate(tensors, n, control)
        return TensorUpdate(tensors, n)

    def accumulator(self, state: dict[str, Any], ctx: RoundContext) -> TensorAccumulator | None:
        """A streamed aggregation of this round (see :class:`~fedsqueeze.methods.updates.Accumulator`),
        or None where the rule needs every update at once (the robust rules but ``mean``) or a
        subclass aggregates its own way."""
        if type(self).aggregate is not TensorMethod.aggregate or self.opts.robust != "mean":
            return None
        return TensorAccumulator(self, state, ctx)

    def aggregate(
        self, state: dict[str, Any], updates: dict[int, TensorUpdate], ctx: RoundContext
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Combine the updates (DP mean, or the ``robust`` rule), then step with the server optimizer.

        The mean rule and DP-FedAvg fold the updates in client order through :meth:`accumulator`
        (the round engine's streamed path); the other rules take them all at once, in the same order.
        """
        acc = self.accumulator(state, ctx)
        if acc is not None:
            for client, update in sorted(updates.items()):
                acc.add(client, acc.prepare(client, update))
            return acc.finish()
        if not updates:
            return state, {}
        ordered = [u for _, u in sorted(updates.items())]
        combined, metrics = self.rule.combine([u.delta for u in ordered], [u.n for u in ordered])
        opt_state = state.setdefault("server_opt", self.server_opt.init_state(state["weights"])) if self.server_opt.rule != "none" else {}
        self.server_opt.step(state["weights"], combined, opt_state, ctx.round)
        if self.opts.scaffold:  # c += Σ_S Δc_i / N, in client order (the same bits whatever order they arrived in)
            controls = [u.control for u in ordered if isinstance(u, scaffold.ScaffoldUpdate)]
            state["scaffold_c"] = scaffold.server_control(state["scaffold_c"], controls, self.cfg.clients)
        return state, metrics

    def dp_metrics(self, norms: list[float], ctx: RoundContext) -> dict[str, Any]:
        """DP-FedAvg's round metrics: the clipped fraction and mean norm of the updates, and ε at δ."""
        clip = self.opts.dp_clip
        metrics: dict[str, Any] = {
            "dp_clipped_fraction": float(np.mean([x > clip for x in norms])) if norms else 0.0,
            "dp_mean_update_norm": float(np.mean(norms)) if norms else 0.0,
        }
        eps = dp_epsilon(self.cfg.clients_per_round / self.cfg.clients, self.opts.dp_noise, ctx.round, self.opts.dp_delta)
        metrics["dp_epsilon"] = eps if np.isfinite(eps) else None  # None: no noise, no guarantee
        metrics["dp_delta"] = self.opts.dp_delta
        return metrics

    def evaluate(self, state: dict[str, Any]) -> tuple[float, float]:
        return evaluate_weights(self.task, self.named, state["weights"])

    # ---- client ---------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Optimizer groups: the new head learns at ``head_lr``, pre-trained parts at ``lr``.

        A randomly initialised head needs a far larger step than pre-trained weights; one shared
        small lr leaves it undertrained for the few local steps of a round.
        """
        head = [p for n, p in zip(self.names, self.params) if n.startswith("head.")]
        rest = [p for n, p in zip(self.names, self.params) if not n.startswith("head.")]
        head_lr = self.opts.head_lr if self.opts.head_lr > 0 else self.lr
        groups = [{"params": rest, "lr": self.lr}] if rest else []
        if head:
            groups.append({"params": head, "lr": head_lr if rest else self.lr})
        return groups

    def local_train(self, client: int, data: Encoded, steps: int, generator: torch.Generator) -> dict[str, float]:
        """Train ``self.params`` on ``data``; override for a faster or different local rule."""
        return train_local(
            self.task.model,
            self.param_groups(),
            data,
            steps=steps,
            batch_size=self.cfg.batch_size,
            lr=self.lr,
            generator=generator,
            optimizer=self.opts.optimizer,
            penalty=self.prox_penalty(),
        )

    def prox_penalty(self) -> Callable[[], torch.Tensor] | None:
        """FedProx's proximal term anchored at the trainable tensors' current (global) values, if ``prox_mu`` > 0."""
        return proximal_penalty(self.params, self.opts.prox_mu) if self.opts.prox_mu > 0 else None

    def local_lrs(self) -> dict[str, float]:
        """Each trainable tensor's learning rate in the local loop (its :meth:`param_groups` group's)."""
        by_id = {id(p): float(g["lr"]) for g in self.param_groups() for p in g["params"]}
        return {n: by_id.get(id(p), self.lr) for n, p in self.named.items()}

    def receive_downlink(self, message: bytes, state: Any, ctx: RoundContext) -> tuple[Tensors, dict[str, Any]]:
        """The tensors to train from, decoded from the server's message, and the client state to go on with.

        ``downlink=delta``: the client view this client reaches from the one its state holds (the
        initial model if none); it goes into the returned state (a new dict: a client that fails
        later in the round keeps its old state, which is the one the server believes it holds).
        """
        state = dict(state) if isinstance(state, dict) else {}
        if self.delta_downlink is None:
            weights, _ = decode_tensors(message, self._decode_ctx(ctx.seed_for(SERVER, "downlink")), codec=self.down_codec)
            self._check_tensors(weights, "server message")
            return weights, state
        held = state.get(VIEW_KEY)
        held_round, held_view = (int(held["round"]), held["tensors"]) if isinstance(held, dict) else (0, self.initial_view)
        self._check_tensors(held_view, "the client's own view")
        view = self.delta_downlink.receive(message, held_round, held_view, ctx.seed, ctx.round)
        state[VIEW_KEY] = {"round": ctx.round, "tensors": view}
        return view, state

    def client_update(self, message: bytes, client: int, state: Any, ctx: RoundContext) -> ClientOutput:
        t0 = time.perf_counter()
        own = state if isinstance(state, dict) else {}
        c: Tensors | None = None
        if self.opts.scaffold:  # state is {"codec": codec state, "c": c_i}
            section, control_bytes = scaffold.unpack(scaffold.DOWN_KIND, message)
            c, message = self._control(control_bytes, "server control variate"), bytes(section)
            own = own.get("codec") or {}
        weights, own = self.receive_downlink(message, own, ctx)
        load_weights(self.named, weights)
        codec_s = time.perf_counter() - t0

        data = self.task.client_data(client)
        steps = num_local_steps(len(data), self.cfg.batch_size, self.cfg.local_steps, self.cfg.local_epochs)
        c_i = self._own_control(state, c)
        grad_sums = scaffold.zeros_like(weights) if c is not None and self.opts.scaffold_control == "grad_mean" else None
        t1 = time.perf_counter()
        torch.manual_seed(ctx.seed_for(client, "dropout-layers"))  # model dropout draws from the global RNG
        with self._corrected(c, c_i, grad_sums):
            metrics = self.local_train(client, data, steps, ctx.torch_gen(client, "batches"))
        train_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        after = read_weights(self.named)
        delta = after if self.uplink_sends_weights else {n: after[n] - np.asarray(weights[n], dtype=after[n].dtype) for n in self.names}
        cctx = CodecContext(seed=ctx.seed_for(client, "uplink"), state=own)
        payload = self.encode_upload(delta, cctx, len(data))
        new_state: Any = cctx.state or None
        if c is not None and c_i is not None:
            if grad_sums is not None:
                c_new = {n: (g / np.float32(steps)).astype(np.float32) for n, g in grad_sums.items()}
            else:
                c_new = scaffold.option2_control(c_i, c, weights, after, steps, self.local_lrs())
            change = {n: (c_new[n] - c_i[n]).astype(np.float32) for n in self.names}
            payload = scaffold.pack(scaffold.UP_KIND, payload, scaffold.encode_control(change))
            new_state = {"codec": cctx.state, "c": c_new}
        codec_s += time.perf_counter() - t2
        return ClientOutput(payload, new_state, {**metrics, "train_s": train_s, "codec_s": codec_s})

    def encode_upload(self, delta: Tensors, cctx: CodecContext, n: int) -> bytes:
        """The client's coded update (``n`` = its example count, in the header); fedsz's budget controller overrides it."""
        return encode_tensors(self.up_codec, delta, cctx, n=n)

    def _own_control(self, state: Any, c: Tensors | None) -> Tensors | None:
        """SCAFFOLD's c_i from the client state (zero before the client's first round); None without SCAFFOLD."""
        if c is None:
            return None
        kept = state.get("c") if isinstance(state, dict) else None
        if not isinstance(kept, dict):
            return scaffold.zeros_like(c)
        self._check_tensors(kept, "client state's control variate")
        return kept

    def _corrected(self, c: Tensors | None, c_i: Tensors | None, grad_sums: Tensors | None) -> contextlib.AbstractContextManager[None]:
        """Local training with SCAFFOLD's correction c − c_i added to every gradient (nothing without SCAFFOLD)."""
        if c is None or c_i is None:
            return contextlib.nullcontext()
        correction = {n: (c[n] - c_i[n]).astype(np.float32) for n in self.names}
        return scaffold.corrected_gradients(self.named, correction, grad_sums)


@dataclass(frozen=True)
class Folded:
    """A client update as :class:`TensorAccumulator` folds it: the delta (clipped, under a norm
    bound or DP), its weight, its norm before clipping (None: not clipped), SCAFFOLD's Δc_i."""

    update: TensorUpdate  # as decoded (DP's single-client trial aggregates it again)
    delta: Tensors
    n: int
    norm: float | None
    control: Tensors | None


class TensorAccumulator(Accumulator):
    """A tensor method's round, folded in one update at a time (the round engine's streamed path).

    Holds ``Σ n_i·δ_i`` in float64 (DP: ``Σ clip(δ_i)``), SCAFFOLD's ``Σ Δc_i``, and the clients'
    norms; :meth:`finish` divides, then steps the server optimizer one tensor at a time, freeing
    each sum as it goes. The same bits as the blocked mean of every update (``WeightedSum``).
    """

    def __init__(self, method: TensorMethod, state: dict[str, Any], ctx: RoundContext) -> None:
        self.method, self.state, self.ctx = method, state, ctx
        o = method.opts
        self.dp = o.dp_clip > 0
        self.bound = o.dp_clip if self.dp else o.norm_bound
        shapes = {n: tuple(a.shape) for n, a in state["weights"].items()}
        self.sum = WeightedSum(shapes)
        self.controls = WeightedSum(shapes) if o.scaffold else None
        self.norms: list[float] = []
        self._untouched: dict[str, str | None] = {}  # the start state's parts aggregation keeps: their non-finite path

    def prepare(self, client: int, update: Any) -> Folded:
        if not isinstance(update, TensorUpdate):
            raise TypeError(f"client {client} sent no TensorUpdate (an update decoded for another round?)")
        delta, norm = update.delta, None
        if self.bound > 0:
            delta, norm = clip_update(update.delta, self.bound)
        control = update.control if isinstance(update, scaffold.ScaffoldUpdate) else None
        return Folded(update, delta, update.n, norm, control)

    def add(self, client: int, prepared: Folded) -> None:
        self.sum.add(prepared.delta, 1 if self.dp else prepared.n)  # DP-FedAvg: an unweighted sum
        if self.controls is not None and prepared.control is not None:
            self.controls.add(prepared.control, 1)
        if prepared.norm is not None:
            self.norms.append(prepared.norm)

    def copy(self) -> TensorAccumulator:
        other = copy.copy(self)
        other.sum, other.norms = self.sum.copy(), list(self.norms)
        other.controls = self.controls.copy() if self.controls is not None else None
        return other

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        m, state = self.method, self.state
        if self.sum.count == 0 and not self.dp:
            return state, {}
        opt = m.server_opt
        new = {k: v if k in ("weights", "server_opt", "scaffold_c") else copy.deepcopy(v) for k, v in state.items()}
        new["weights"] = dict(state["weights"])
        opt_state: dict[str, Tensors] = {}
        if opt.rule != "none":
            held = state.get("server_opt")
            opt_state = {k: dict(v) for k, v in held.items()} if held is not None else opt.init_state(state["weights"])
            new["server_opt"] = opt_state
        elif "server_opt" in state:
            new["server_opt"] = copy.deepcopy(state["server_opt"])
        rng = self.ctx.rng(SERVER, "dp-noise") if self.dp else None
        for name, shape in self.sum.shapes.items():  # the weights' order (DP: the order its noise is drawn in)
            if rng is not None:
                combined = self._private(name, shape, rng)
            else:
                combined = self.sum.pop_mean(name)
            opt.step(new["weights"], {name: combined}, opt_state, self.ctx.round)
            del combined
        if self.controls is not None:  # c += Σ_S Δc_i / N (the float64 sum, folded in client order)
            c = state["scaffold_c"]
            sums = {n: self.controls.sums[n].reshape(a.shape) for n, a in c.items()}
            new["scaffold_c"] = scaffold.server_control(c, [sums], m.cfg.clients)
        elif "scaffold_c" in state:
            new["scaffold_c"] = copy.deepcopy(state["scaffold_c"])
        if self.dp:
            return new, m.dp_metrics(self.norms, self.ctx)
        return new, ({"norm_bounded": float(sum(x > self.bound for x in self.norms))} if self.bound > 0 else {})

    def _private(self, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """DP-FedAvg's mean of one tensor: (Σ clip(δ_i) + N(0, (σ·C)²)) / clients_per_round, in float32."""
        o = self.method.opts
        s = self.sum.sums.pop(name).reshape(shape)
        std = o.dp_noise * o.dp_clip
        noise = rng.normal(0.0, std, size=s.shape) if std > 0 else 0.0
        return ((s + noise) / self.method.cfg.clients_per_round).astype(np.float32)

    # ---- the integrity guard's single-client trial -------------------------------------------
    def alone(self, client: int, prepared: Folded) -> str | None:
        if self.dp:  # the noise makes a blockwise trial costly: run the real one, on a copy
            with np.errstate(over="ignore", invalid="ignore"):
                new, _ = self.method.aggregate(copy.deepcopy(self.state), {client: prepared.update}, self.ctx)
            return nonfinite_part(new)
        bad = self._alone_flags(prepared)
        state, opt = self.state, self.method.server_opt
        held = state.get("server_opt")
        keys = list(state) + (["server_opt"] if opt.rule != "none" and held is None else [])
        for key in keys:  # nonfinite_part's order: the new state's keys, then each part's own order
            paths: list[tuple[str, ...]]
            if key == "weights":
                paths = [(key, n) for n in state["weights"]]
            elif key == "server_opt" and opt.rule != "none":
                parts = held if held is not None else opt.init_state({})
                paths = [(key, k, n) for k in parts for n in state["weights"]]
            elif key == "scaffold_c" and self.controls is not None:
                paths = [(key, n) for n in state["scaffold_c"]]
            else:
                if key not in self._untouched:
                    self._untouched[key] = nonfinite_part(state[key], f"state[{key!r}]")
                if self._untouched[key] is not None:
                    return self._untouched[key]
                continue
            found = next((path for path in paths if path in bad), None)
            if found is not None:
                return "state" + "".join(f"[{k!r}]" for k in found)
        return None

    def _alone_flags(self, prepared: Folded) -> set[tuple[str, ...]]:
        """The state paths a single-client aggregate would leave non-finite.

        The mean of one update is that update, and the server optimizer and SCAFFOLD's rule are
        coordinate-wise, so the trial runs them a block at a time on views: no copy of the state.
        """
        state, opt = self.state, self.method.server_opt
        held = state.get("server_opt") if opt.rule != "none" else None
        bad: set[tuple[str, ...]] = set()
        for name, w in state["weights"].items():
            flat_w, flat_d = w.reshape(-1), prepared.delta[name].reshape(-1)
            for lo in range(0, flat_w.size, MEAN_BLOCK):
                hi = min(lo + MEAN_BLOCK, flat_w.size)
                ws = {name: flat_w[lo:hi]}
                if opt.rule == "none":
                    os: dict[str, Tensors] = {}
                elif held is None:
                    os = opt.init_state(ws)
                else:
                    os = {k: {name: v[name].reshape(-1)[lo:hi]} for k, v in held.items()}
                opt.step(ws, {name: flat_d[lo:hi]}, os, self.ctx.round)
                if not all_finite(ws[name]):
                    bad.add(("weights", name))
                for k, v in os.items():
                    if not all_finite(v[name]):
                        bad.add(("server_opt", k, name))
        if self.controls is not None and prepared.control is not None:
            for name, c in state["scaffold_c"].items():
                flat_c, flat_dc = c.reshape(-1), prepared.control[name].reshape(-1)
                for lo in range(0, flat_c.size, MEAN_BLOCK):
                    hi = min(lo + MEAN_BLOCK, flat_c.size)
                    out = scaffold.server_control({name: flat_c[lo:hi]}, [{name: flat_dc[lo:hi]}], self.method.cfg.clients)
                    if not all_finite(out[name]):
                        bad.add(("scaffold_c", name))
        return bad
