"""One typed run configuration, read from CLI options, a TOML file and ``--set key=value``.

Precedence: defaults < TOML file (``--config``) < explicit CLI options < ``--set``.
Keys of :class:`RunConfig` set run fields; any other ``--set`` key is a method (or codec) option,
checked against that method's declared options, so a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsqueeze.errors import ConfigError


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Everything that defines a run. Every field has a help text (``fedsqueeze methods`` shows them)."""

    method: str = _opt("fedavg", "federated method (see `fedsqueeze methods`)")
    model: str = _opt("minilm", "backbone: 'minilm' (bundled all-MiniLM-L6-v2), 'tiny', a local path or a Hub id")
    dataset: str = _opt("wordnet", "'wordnet', 'fashion-mnist', a .csv/.jsonl/.parquet file, or hf:NAME[:CONFIG]")
    runtime: str = _opt("local", "'local' (in-process simulator), 'flower-sim' (Flower simulation engine) or 'flower' (SuperLink)")
    clients: int = _opt(10, "number of clients the training data is split over")
    clients_per_round: int = _opt(5, "clients sampled each round")
    rounds: int = _opt(10, "federated rounds")
    seed: int = _opt(0, "run seed: every random draw derives from it")
    out: str = _opt("runs/latest", "output directory for results.json and rounds.csv")
    partition: str = _opt("iid", "'iid' or 'dirichlet' (label skew with concentration `alpha`)")
    alpha: float = _opt(0.5, "Dirichlet concentration for partition='dirichlet' (smaller = more skewed)")
    train_size: int = _opt(4000, "training examples drawn from the dataset (split over the clients)")
    test_size: int = _opt(1000, "held-out test examples (never trained on)")
    max_length: int = _opt(32, "tokens per text example (truncation)")
    local_steps: int = _opt(10, "local optimizer steps per client per round")
    local_epochs: float = _opt(0.0, "if > 0, local passes over the client's data instead of local_steps")
    batch_size: int = _opt(16, "local minibatch size")
    lr: float = _opt(0.0, "local learning rate; 0 means the method's default")
    eval_batch_size: int = _opt(128, "batch size for evaluation")
    dropout: float = _opt(0.0, "probability that a sampled client fails to return its update (seeded)")
    fault_corrupt: float = _opt(0.0, "probability that a returned payload is corrupted in transit (fault injection)")
    fault_truncate: float = _opt(0.0, "probability that a returned payload is truncated in transit (fault injection)")
    fault_raise: float = _opt(0.0, "probability that a sampled client raises an error instead of replying (fault injection)")
    fault_hang: float = _opt(0.0, "probability that a sampled client hangs until abandoned (fault injection; needs client_timeout > 0)")
    fault_garbage: float = _opt(0.0, "probability that a client returns garbage instead of its update (fault injection)")
    client_timeout: float = _opt(0.0, "seconds a client's update may take before the client is dropped for the round (0 = no limit)")
    straggler: float = _opt(0.0, "probability that a sampled client is a straggler whose reply is late by straggler_delay (seeded)")
    straggler_delay: float = _opt(60.0, "simulated extra seconds before a straggler's reply arrives")
    deadline: float = _opt(0.0, "seconds after a round starts by which a reply must arrive, or it is dropped (0 = no deadline)")
    min_clients: int = _opt(1, "fewest surviving updates a round needs; with fewer, the round is retried or skipped")
    min_clients_policy: str = _opt("skip", "'retry' (re-sample other clients, up to max_retries times) or 'skip' (keep the model)")
    max_retries: int = _opt(3, "re-samples of a round with too few survivors before it is skipped (policy 'retry')")
    checkpoint: bool = _opt(True, "write OUT/checkpoint after every round so `fedsqueeze run --resume OUT` can continue")
    threads: int = _opt(0, "torch CPU threads; 0 = all cores")
    uplink_mbps: float = _opt(10.0, "link model: each client's uplink bandwidth in Mbit/s (median if link_spread > 0)")
    downlink_mbps: float = _opt(50.0, "link model: each client's downlink bandwidth in Mbit/s (median if link_spread > 0)")
    latency_ms: float = _opt(50.0, "link model: round-trip latency per client per round, in ms")
    link_spread: float = _opt(0.0, "link model: sigma of a lognormal factor on each client's bandwidths (0 = all equal)")
    text_column: str = _opt("text", "text column of a file or HF dataset")
    label_column: str = _opt("label", "label column of a file or HF dataset")
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "method and codec options"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "options"]

    def validate(self) -> "RunConfig":
        """Raise :class:`ConfigError` for values no run can use."""
        if self.clients < 1:
            raise ConfigError("clients must be >= 1")
        if not 1 <= self.clients_per_round <= self.clients:
            raise ConfigError(f"clients_per_round must be in [1, clients={self.clients}], got {self.clients_per_round}")
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")
        if self.partition not in ("iid", "dirichlet"):
            raise ConfigError(f"partition must be 'iid' or 'dirichlet', got {self.partition!r}")
        if self.alpha <= 0:
            raise ConfigError("alpha must be > 0")
        for name in ("dropout", "fault_corrupt", "fault_truncate", "fault_raise", "fault_hang", "fault_garbage", "straggler"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1)")
        if self.fault_raise + self.fault_hang + self.fault_garbage >= 1.0:
            raise ConfigError("fault_raise + fault_hang + fault_garbage must be below 1")
        for name in ("client_timeout", "straggler_delay", "deadline"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds")
        if self.fault_hang > 0 and self.client_timeout <= 0:
            raise ConfigError("fault_hang needs client_timeout > 0, or a hung client would stall the run forever")
        if not 0 <= self.min_clients <= self.clients_per_round:
            raise ConfigError(f"min_clients must be in [0, clients_per_round={self.clients_per_round}], got {self.min_clients}")
        if self.min_clients_policy not in ("retry", "skip"):
            raise ConfigError(f"min_clients_policy must be 'retry' or 'skip', got {self.min_clients_policy!r}")
        if self.max_retries < 0:
            raise ConfigError("max_retries must be >= 0")
        if self.train_size < self.clients:
            raise ConfigError("train_size must be at least the number of clients")
        if self.uplink_mbps <= 0 or self.downlink_mbps <= 0:
            raise ConfigError("uplink_mbps and downlink_mbps must be > 0")
        if self.latency_ms < 0 or self.link_spread < 0:
            raise ConfigError("latency_ms and link_spread must be >= 0")
        if self.batch_size < 1 or self.local_steps < 0 or self.local_epochs < 0:
            raise ConfigError("batch_size must be >= 1, local_steps and local_epochs >= 0")
        return self


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML literal (int, float, bool, string, list), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}``; a malformed item is a ConfigError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key] = parse_value(value.strip())
    return out


def _coerce(name: str, value: Any) -> Any:
    ftype = {f.name: f.type for f in fields(RunConfig)}[name]
    try:
        if ftype == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if ftype == "float":
            return float(value)
        if ftype == "str":
            return str(value)
        if ftype == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if value in (0, 1):
                return bool(value)
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{name} expects {ftype}, got {value!r}") from None
    return value


def build_config(
    config_file: str | Path | None = None,
    cli: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
) -> RunConfig:
    """Merge a TOML file, explicit CLI values (None = not given) and ``--set`` pairs into a RunConfig."""
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    names = set(RunConfig.field_names())
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
        for key, value in data.items():
            if key == "options":
                if not isinstance(value, dict):
                    raise ConfigError("[options] in the config file must be a table")
                options.update(value)
            elif key in names:
                values[key] = value
            else:
                options[key] = value
    for key, value in (cli or {}).items():
        if value is not None:
            values[key] = value
    for key, value in (sets or {}).items():
        if key in names:
            values[key] = value
        else:
            options[key] = value
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()}, options=options)
    return cfg.validate()


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (round-trips through ``build_config``)."""
    import tomli_w

    d = cfg.to_dict()
    options = d.pop("options")
    return tomli_w.dumps({**d, "options": options})
