"""The method interface: a method is a pair of functions around bytes.

::

    server:  downlink(state, ctx, client)            -> message bytes for that client
             (the engine calls downlink_for(state, ctx, client, held), which adds the version of
             the client state it knows the client holds; by default it is downlink())
    client:  client_update(message, client, cstate, ctx) -> ClientOutput(payload bytes, cstate, metrics)
    server:  decode_update(payload, client, state, ctx) -> a decoded update (or PayloadError)
             aggregate(state, {client: update}, ctx) -> (state, metrics)

A decoded update is a typed, frozen object (:mod:`fedsqueeze.methods.updates`), made by a method's
``decode_update`` and read only by the same method's ``aggregate``:

- ``TensorUpdate(delta, n)`` — tensor methods (fedavg, topk/qsgd/signsgd/eden, fedsz, head, the PEFT
  methods) and DeComFL's warm-start rounds: the change to each trainable tensor and the client's
  example count (the weight of its update in FedAvg's mean).
- ``MaskUpdate(n, head_delta, mask)`` — fedpm and deltamask: the example count, the head delta and
  the decoded mask code: ``SampledMask(bits)`` (fedpm), ``FilterFlips(filter)`` (deltamask) or
  ``ExactFlips(positions, nbytes)`` (deltamask-exact).
- ``ZOUpdate(scalars)`` — DeComFL's zeroth-order rounds: the K×P float32 scalars.

The round engine treats them as opaque. Everything that travels is ``bytes`` from a codec, so the
same method runs in the local simulator and on Flower, and the bytes counted are the bytes sent.
Server and client states must be trees of dicts, lists, numbers, strings and numpy arrays (so
checkpoints never need pickle).

Methods register by name with :func:`register_method` and declare their options as a dataclass
(``Options``) of :func:`fedsqueeze.options.option` fields (help, choices, range; cross-field rules
in its ``validate()``); ``--set key=value`` reaches them. They are all checked when the method
object is built, before any data or model loads.
"""

from __future__ import annotations

import difflib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError
from fedsqueeze.options import parse_options
from fedsqueeze.seeding import np_rng, seed_int, torch_gen

if TYPE_CHECKING:
    from fedsqueeze.task import Task

T = TypeVar("T")


# what training.make_optimizer builds: every method's `optimizer` option takes these
OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class NoOptions:
    """A method without options."""


@dataclass
class RoundContext:
    """What every party knows about the current round."""

    round: int  # 1-based
    rounds: int
    seed: int  # the run seed
    attempt: int = 0  # 0, or the retry of a round that had too few survivors (min_clients_policy='retry')
    participants: tuple[int, ...] = ()  # the clients sampled for this attempt, sorted (set by the round engine)

    def rng(self, client: int, purpose: str) -> np.random.Generator:
        return np_rng(self.seed, self.round, client, purpose)

    def torch_gen(self, client: int, purpose: str) -> torch.Generator:
        return torch_gen(self.seed, self.round, client, purpose)

    def seed_for(self, client: int, purpose: str) -> int:
        return seed_int(self.seed, self.round, client, purpose)


def state_digest(tree: Any) -> bytes:
    """A digest of a state tree's every value (names, dtypes, shapes and bytes of its arrays).

    SHA-1 as a fast fingerprint, not for security: about 60 ms for FedAvg's 91 MB of weights,
    a fifth of encoding them once.
    """
    h = hashlib.sha1(usedforsecurity=False)

    def feed(node: Any) -> None:
        if isinstance(node, dict):
            for key in sorted(node):
                h.update(repr(key).encode())
                feed(node[key])
        elif isinstance(node, (list, tuple)):
            h.update(b"[%d" % len(node))
            for item in node:
                feed(item)
        elif isinstance(node, np.ndarray):
            h.update(f"{node.dtype.str}{node.shape}".encode())
            h.update(np.ascontiguousarray(node).data)
        else:
            h.update(repr(node).encode())

    feed(tree)
    return h.digest()


class RoundMemo:
    """An explicit memo of one value: the last ``make()`` result and the key it was made for.

    Methods keep their downlink encoding here, keyed by ``(round, ..., state_digest(what it
    encodes))``: every client of a round gets the same bytes, encoded once, and a state that
    changed in any byte (aggregation, a resumed checkpoint, a test editing it) misses the memo
    instead of being served stale. It holds no other state, so dropping it changes nothing.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._value: Any = None

    def get(self, key: tuple[Any, ...], make: Callable[[], T]) -> T:
        """The value for ``key``: remembered if the last call had the same key, else ``make()``."""
        if self._key != key:
            self._value = make()
            self._key = key  # only once made: a failing make() leaves no entry behind
        return self._value


@dataclass
class ClientOutput:
    payload: bytes
    state: Any = None
    metrics: dict[str, float] = field(default_factory=dict)  # train_s, codec_s, train_loss, ...


class Method(ABC):
    """Base class of every federated method. See the module docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_lr: ClassVar[float] = 1e-3
    # what the budget controller (run option budget_bpp, methods/budget.py) tunes; None: no controller
    budget_knob: ClassVar[str | None] = None

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        # every option is coerced and checked here, before any data or model loads
        self.opts = parse_options(self.Options, cfg.options, f"method {self.name!r}", suggest=RunConfig.field_names())
        if cfg.budget_bpp > 0 and self.budget_knob is None:
            able = ", ".join(sorted(m for m, c in METHODS.items() if c.budget_knob is not None))
            raise ConfigError(f"method {self.name!r} has no budget controller, so budget_bpp must stay 0; methods with one: {able}")
        self.check_run(cfg)
        self._task: Task | None = None

    @property
    def task(self) -> Task:
        """The task this method was set up on (``setup`` sets it)."""
        if self._task is None:
            raise RuntimeError(f"method {self.name!r} is not set up: call setup(task) first")
        return self._task

    @task.setter
    def task(self, task: Task) -> None:
        self._task = task

    def check_run(self, cfg: RunConfig) -> None:
        """Raise ConfigError if this method cannot run with ``cfg``'s run options. Default: it can."""

    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr > 0 else self.default_lr

    # ---- shared by server and clients -----------------------------------------------------------
    @abstractmethod
    def setup(self, task: Task) -> None:
        """Prepare the model for this method (freeze, inject adapters...). Called once per process."""

    @abstractmethod
    def trainable_params(self) -> int:
        """Number of parameters this method trains (and, for tensor methods, sends)."""

    # ---- server ---------------------------------------------------------------------------------
    @abstractmethod
    def init_server(self) -> Any:
        """The server state before round 1."""

    @abstractmethod
    def downlink(self, state: Any, ctx: RoundContext, client: int) -> bytes:
        """The message the server sends to ``client`` this round."""

    def downlink_for(self, state: Any, ctx: RoundContext, client: int, held: tuple[int, int] | None) -> bytes:
        """The message for ``client``, which holds the client state it made in round ``held[0]``
        (attempt ``held[1]``; None: its initial state), as the round engine knows from its replies.

        A method whose message depends on what the client holds (the tensor methods' delta
        downlink) overrides this; the default ignores it and sends :meth:`downlink`.
        """
        return self.downlink(state, ctx, client)

    @abstractmethod
    def decode_update(self, payload: bytes, client: int, state: Any, ctx: RoundContext) -> Any:
        """Decode and validate one client's payload; raise PayloadError if it is unusable."""

    @abstractmethod
    def aggregate(self, state: Any, updates: dict[int, Any], ctx: RoundContext) -> tuple[Any, dict[str, float]]:
        """Fold the decoded updates of this round's surviving clients into the server state."""

    @abstractmethod
    def evaluate(self, state: Any) -> tuple[float, float]:
        """Accuracy and loss of the global model on the task's test split."""

    # ---- client ---------------------------------------------------------------------------------
    @abstractmethod
    def client_update(self, message: bytes, client: int, state: Any, ctx: RoundContext) -> ClientOutput:
        """Train locally from the server's message; return the payload to upload."""

    def init_client(self, client: int) -> Any:
        """A client's state before it first takes part (most methods keep none)."""
        return None


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a ConfigError listing the valid names otherwise."""
    if name not in METHODS:
        hint = difflib.get_close_matches(name, list(METHODS), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"unknown method {name!r}{extra}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]
