"""The method interface: a method is a pair of functions around bytes.

::

    server:  downlink(state, ctx, client)            -> message bytes for that client
    client:  client_update(message, client, cstate, ctx) -> ClientOutput(payload bytes, cstate, metrics)
    server:  decode_update(payload, state, ctx)      -> a decoded update (or PayloadError)
             aggregate(state, {client: update}, ctx) -> (state, metrics)

Everything that travels is ``bytes`` from a codec, so the same method runs in the local simulator
and on Flower, and the bytes counted are the bytes sent. Server and client states must be trees of
dicts, lists, numbers, strings and numpy arrays (so checkpoints never need pickle).

Methods register by name with :func:`register_method` and declare their options as a dataclass
(``Options``) whose fields carry a ``help`` text; ``--set key=value`` reaches them.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError
from fedsqueeze.seeding import np_rng, seed_int, torch_gen

if TYPE_CHECKING:
    from fedsqueeze.task import Task


def option(default: Any, help: str) -> Any:
    """Declare a method option with its default and help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class NoOptions:
    """A method without options."""


@dataclass
class RoundContext:
    """What every party knows about the current round."""

    round: int  # 1-based
    rounds: int
    seed: int  # the run seed

    def rng(self, client: int, purpose: str) -> np.random.Generator:
        return np_rng(self.seed, self.round, client, purpose)

    def torch_gen(self, client: int, purpose: str) -> torch.Generator:
        return torch_gen(self.seed, self.round, client, purpose)

    def seed_for(self, client: int, purpose: str) -> int:
        return seed_int(self.seed, self.round, client, purpose)


@dataclass
class ClientOutput:
    payload: bytes
    state: Any = None
    metrics: dict[str, float] = field(default_factory=dict)  # train_s, codec_s, train_loss, ...


def _coerce_option(name: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"option {name!r} expects true/false, got {value!r}")
    try:
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} expects {type(default).__name__}, got {value!r}") from None
    return value


def parse_options(options_cls: type, given: dict[str, Any], owner: str) -> Any:
    """Build ``options_cls`` from ``given``; unknown keys are a ConfigError naming the valid ones."""
    known = {f.name: f for f in fields(options_cls)}
    for key in given:
        if key not in known:
            hint = difflib.get_close_matches(key, list(known) + RunConfig.field_names(), n=1)
            msg = f"unknown option {key!r}: neither a run option nor an option of {owner}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            valid = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{msg}; its options are: {valid}; run options are listed by `fedsqueeze methods`")
    values = {}
    for name, f in known.items():
        if name in given:
            default = f.default if f.default is not MISSING else None
            values[name] = _coerce_option(name, default, given[name])
    return options_cls(**values)


def describe_options(options_cls: type) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for each option."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(options_cls)]


class Method(ABC):
    """Base class of every federated method. See the module docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_lr: ClassVar[float] = 1e-3

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.opts = parse_options(self.Options, cfg.options, f"method {self.name!r}")
        self.task: Task | None = None

    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr > 0 else self.default_lr

    # ---- shared by server and clients -----------------------------------------------------------
    @abstractmethod
    def setup(self, task: "Task") -> None:
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

    @abstractmethod
    def decode_update(self, payload: bytes, state: Any, ctx: RoundContext) -> Any:
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
