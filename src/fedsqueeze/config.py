"""One typed run configuration, read from CLI options, a TOML file and ``--set key=value``.

Precedence: defaults < TOML file (``--config``) < explicit CLI options < ``--set``.
Keys of :class:`RunConfig` set run fields; any other ``--set`` key is a method (or codec) option,
checked against that method's declared options, so a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsqueeze.errors import ConfigError
from fedsqueeze.options import above, at_least, between, check_fields, coerce, kind_of, option, option_fields

OWNER = "the run"  # how errors name the run options' owner
RUNTIMES = ("local", "flower-sim", "flower")
PROBABILITY = between(0.0, 1.0, hi_open=True)  # a seeded per-client draw; 1 would fail every client
SECONDS = at_least(0.0)
POSITIVE = at_least(1)

# attack -> what its attackers do (run option `attack`; the rewrites are in fedsqueeze.attacks and runtime/faults.py)
ATTACKS = {
    "none": "no attacker",
    "sign_flip": "send −Δ (the negated update; for ZO scalars, the negated scalars)",
    "scale": "send attack_scale · Δ",
    "gaussian": "send Gaussian noise of attack_scale × the update's RMS instead of Δ",
    "label_flip": "train on labels y → C − 1 − y (data poisoning)",
    "mask_all": "mask methods: a mask flipped at every position (a filter over all positions)",
    "zo_huge": "DeComFL: every scalar ±attack_scale · 1000 (seeded signs)",
    "inflate_count": "claim 1000 × the true example count",
}


def attacker_count(fraction: float, clients: int) -> int:
    """How many of ``clients`` attack: the fraction rounded half up."""
    return int(math.floor(fraction * clients + 0.5))


@dataclass
class RunConfig:
    """Everything that defines a run. Every field is an :func:`~fedsqueeze.options.option`: its help,
    choices and range drive the checks, the CLI flags of ``run``/``compare`` and ``fedsqueeze methods``."""

    method: str = option("fedavg", "federated method (see `fedsqueeze methods`)")
    model: str = option(
        "minilm", "backbone: a `fedsqueeze models` name (minilm, tiny, mpnet, effnet-lite0, smollm2...), a local path or a Hub id"
    )
    dataset: str = option(
        "wordnet",
        "'wordnet', 'fashion-mnist', a .csv/.jsonl/.parquet file, or hf:NAME[:CONFIG]; when not given, an image model (effnet-lite0) takes fashion-mnist",
    )
    runtime: str = option(
        "local", "'local' (in-process simulator), 'flower-sim' (Flower simulation engine) or 'flower' (SuperLink)", choices=RUNTIMES
    )
    clients: int = option(10, "number of clients the training data is split over", check=POSITIVE)
    clients_per_round: int = option(5, "clients sampled each round", check=POSITIVE)
    rounds: int = option(10, "federated rounds", check=POSITIVE)
    seed: int = option(0, "run seed: every random draw derives from it")
    out: str = option("runs/latest", "output directory for results.json and rounds.csv")
    partition: str = option("iid", "'iid' or 'dirichlet' (label skew with concentration `alpha`)", choices=("iid", "dirichlet"))
    alpha: float = option(0.5, "Dirichlet concentration for partition='dirichlet' (smaller = more skewed)", check=above(0.0))
    train_size: int = option(4000, "training examples drawn from the dataset (split over the clients)", check=POSITIVE)
    test_size: int = option(1000, "held-out test examples (never trained on)", check=POSITIVE)
    max_length: int = option(32, "tokens per text example (truncation)", check=POSITIVE)
    local_steps: int = option(10, "local optimizer steps per client per round", check=at_least(0))
    local_epochs: float = option(0.0, "if > 0, local passes over the client's data instead of local_steps", check=at_least(0.0))
    batch_size: int = option(16, "local minibatch size", check=POSITIVE)
    lr: float = option(0.0, "local learning rate; 0 means the method's default", check=at_least(0.0))
    eval_batch_size: int = option(128, "batch size for evaluation", check=POSITIVE)
    dropout: float = option(0.0, "probability that a sampled client fails to return its update (seeded)", check=PROBABILITY)
    fault_corrupt: float = option(0.0, "probability that a returned payload is corrupted in transit (fault injection)", check=PROBABILITY)
    fault_truncate: float = option(0.0, "probability that a returned payload is truncated in transit (fault injection)", check=PROBABILITY)
    fault_raise: float = option(
        0.0, "probability that a sampled client raises an error instead of replying (fault injection)", check=PROBABILITY
    )
    fault_hang: float = option(
        0.0, "probability that a sampled client hangs until abandoned (fault injection; needs client_timeout > 0)", check=PROBABILITY
    )
    fault_garbage: float = option(
        0.0, "probability that a client returns garbage instead of its update (fault injection)", check=PROBABILITY
    )
    attack: str = option("none", "attack by a fixed seeded set of clients (see docs/strategies.md)", choices=tuple(ATTACKS))
    attack_fraction: float = option(0.2, "fraction of the clients that attack (rounded half up)", check=between(0.0, 1.0))
    attack_scale: float = option(10.0, "strength of the scale, gaussian and zo_huge attacks", check=above(0.0))
    client_timeout: float = option(
        0.0, "seconds a client's update may take before the client is dropped for the round (0 = no limit)", check=SECONDS
    )
    straggler: float = option(
        0.0, "probability that a sampled client is a straggler whose reply is late by straggler_delay (seeded)", check=PROBABILITY
    )
    straggler_delay: float = option(60.0, "simulated extra seconds before a straggler's reply arrives", check=SECONDS)
    deadline: float = option(
        0.0, "seconds after a round starts by which a reply must arrive, or it is dropped (0 = no deadline)", check=SECONDS
    )
    min_clients: int = option(1, "fewest surviving updates a round needs; with fewer, the round is retried or skipped", check=at_least(0))
    min_clients_policy: str = option(
        "skip", "'retry' (re-sample other clients, up to max_retries times) or 'skip' (keep the model)", choices=("retry", "skip")
    )
    max_retries: int = option(3, "re-samples of a round with too few survivors before it is skipped (policy 'retry')", check=at_least(0))
    max_client_examples: int = option(
        0,
        "cap on the example count a client reports (its FedAvg weight); larger counts are clipped and recorded (0 = no cap)",
        check=at_least(0),
    )
    budget_bpp: float = option(
        0.0,
        "uplink budget: each client's upload is tuned every round to land within ±10% of this many bits per model parameter "
        "(uplink_bytes · 8 / model_params, the scale of the reported uplink_bpp; fedsz: the SZ3 error bound, deltamask: "
        "the number of flips sent; docs/codecs.md). 0 = off",
        check=at_least(0.0),
    )
    checkpoint: bool = option(True, "write OUT/checkpoint after every round so `fedsqueeze run --resume OUT` can continue")
    overwrite: bool = option(False, "replace an earlier run's results in OUT (without it, a run refuses an OUT that holds one)")
    threads: int = option(0, "torch CPU threads; 0 = all cores", check=at_least(0))
    uplink_mbps: float = option(10.0, "link model: each client's uplink bandwidth in Mbit/s (median if link_spread > 0)", check=above(0.0))
    downlink_mbps: float = option(
        50.0, "link model: each client's downlink bandwidth in Mbit/s (median if link_spread > 0)", check=above(0.0)
    )
    latency_ms: float = option(50.0, "link model: round-trip latency per client per round, in ms", check=at_least(0.0))
    link_spread: float = option(
        0.0, "link model: sigma of a lognormal factor on each client's bandwidths (0 = all equal)", check=at_least(0.0)
    )
    prompt_template: str = option(
        "", "causal LMs (smollm2, tiny-lm): the prompt, with {text} where the example goes ('' = the dataset's default)"
    )
    label_words: str = option("", "causal LMs: one label word per class, comma-separated, in label order ('' = the label names)")
    image_size: int = option(
        0, "image models with a fixed input (effnet-lite0): side images are resized to; 0 = the network's own", check=at_least(0)
    )
    text_column: str = option("text", "text column of a file or HF dataset")
    label_column: str = option("label", "label column of a file or HF dataset")
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "method and codec options"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """The run options' names (every field but ``options``)."""
        return [f.name for f in option_fields(cls)]

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` for values no run can use: each field's range, then the rules across fields."""
        check_fields(self, OWNER)
        if self.clients_per_round > self.clients:
            raise ConfigError(f"clients_per_round must be in [1, clients={self.clients}], got {self.clients_per_round}")
        if self.fault_raise + self.fault_hang + self.fault_garbage >= 1.0:
            raise ConfigError("fault_raise + fault_hang + fault_garbage must be below 1")
        if self.fault_hang > 0 and self.client_timeout <= 0:
            raise ConfigError("fault_hang needs client_timeout > 0, or a hung client would stall the run forever")
        if self.min_clients > self.clients_per_round:
            raise ConfigError(f"min_clients must be in [0, clients_per_round={self.clients_per_round}], got {self.min_clients}")
        if self.attack != "none" and attacker_count(self.attack_fraction, self.clients) == 0:
            raise ConfigError(
                f"attack={self.attack!r} with attack_fraction={self.attack_fraction:g} of {self.clients} clients makes no attacker"
            )
        if self.train_size < self.clients:
            raise ConfigError("train_size must be at least the number of clients")
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


def build_config(
    config_file: str | Path | None = None,
    cli: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
    dataset_for_model: Callable[[str], str] | None = None,
) -> RunConfig:
    """Merge a TOML file, explicit CLI values (None = not given) and ``--set`` pairs into a RunConfig.

    ``dataset_for_model`` names the dataset of a run that names a model but no dataset (the CLI passes
    :func:`fedsqueeze.models.catalogue.default_dataset`, so an image model takes Fashion-MNIST).
    """
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    names = set(RunConfig.field_names())
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
        for key, value in data.items():
            if key == "options":
                if not isinstance(value, dict):
                    raise ConfigError(f"[options] in the config file must be a table; got {value!r}")
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
    if "dataset" not in values and "model" in values and dataset_for_model is not None:
        values["dataset"] = dataset_for_model(str(values["model"]))
    run_opts = {f.name: f for f in option_fields(RunConfig)}
    coerced = {k: coerce(v, kind_of(run_opts[k]), k, OWNER) for k, v in values.items()}
    return RunConfig(**coerced, options=options).validate()


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (round-trips through ``build_config``)."""
    import tomli_w

    d = cfg.to_dict()
    options = d.pop("options")
    return tomli_w.dumps({**d, "options": options})
