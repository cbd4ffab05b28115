"""Which runtime honours which run setting: every RunConfig field is honoured, or rejected up front.

The round engine plays every round the same way over every transport, so nearly every setting
holds everywhere. The table is explicit all the same: a new RunConfig field must be classified
here (a test fails otherwise), and a field set away from its default under a runtime that does
not honour it is a ConfigError naming the runtime, before anything loads.
"""

from __future__ import annotations

from dataclasses import fields

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError

RUNTIMES = ("local", "flower-sim", "flower")
EVERY = frozenset(RUNTIMES)

# field -> the runtimes that honour it (and where, when it is not obvious)
FIELD_SUPPORT: dict[str, frozenset[str]] = {
    # the task: built by the same `prepare` on the server and on every client
    **{
        name: EVERY
        for name in (
            "method",
            "model",
            "dataset",
            "clients",
            "clients_per_round",
            "rounds",
            "seed",
            "partition",
            "alpha",
            "train_size",
            "test_size",
            "max_length",
            "local_steps",
            "local_epochs",
            "batch_size",
            "lr",
            "eval_batch_size",
            "text_column",
            "label_column",
            "prompt_template",
            "label_words",
            "image_size",
            "options",
        )
    },
    "runtime": EVERY,
    "out": EVERY,  # flower: on the machine that runs the ServerApp (the SuperLink's)
    "threads": EVERY,  # set by `prepare` in every process that builds the task, client nodes included
    # the round engine's own: sampling, faults, deadlines, retries (server side) ...
    **{
        name: EVERY
        for name in (
            "dropout",
            "fault_corrupt",
            "fault_truncate",
            "straggler",
            "straggler_delay",
            "deadline",
            "min_clients",
            "min_clients_policy",
            "max_retries",
            "max_client_examples",  # applied by the engine to every decoded update
            "checkpoint",
            "overwrite",
        )
    },
    # ... and the client-side fault wrapper (the local transport and the ClientApp alike)
    **{name: EVERY for name in ("fault_raise", "fault_hang", "fault_garbage")},
    # attacks: the same seeded attackers everywhere; their uploads are rewritten by the same client-side
    # wrapper, and label_flip poisons the attackers' labels when the task is built (in every process)
    **{name: EVERY for name in ("attack", "attack_fraction", "attack_scale")},
    # the budget controller runs inside each client's encode (and the server's decode), in every process
    "budget_bpp": EVERY,
    "client_timeout": EVERY,  # local: per client call; flower: how long the server pulls for replies
    # the link model: computed by the engine from the bytes of each round
    **{name: EVERY for name in ("uplink_mbps", "downlink_mbps", "latency_ms", "link_spread")},
}


def check_runtime(cfg: RunConfig, support: dict[str, frozenset[str]] | None = None) -> None:
    """Raise ConfigError unless ``cfg.runtime`` exists and honours every field set away from its default."""
    support = FIELD_SUPPORT if support is None else support
    if cfg.runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {cfg.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    defaults = RunConfig()
    for f in fields(RunConfig):
        if f.name not in support:
            raise ConfigError(f"run option {f.name!r} is not classified for any runtime (runtime/support.py)")
        if cfg.runtime not in support[f.name] and getattr(cfg, f.name) != getattr(defaults, f.name):
            honoured = ", ".join(sorted(support[f.name])) or "no runtime"
            raise ConfigError(
                f"--runtime {cfg.runtime} does not honour {f.name}={getattr(cfg, f.name)!r} "
                f"(honoured by: {honoured}); leave it at its default {getattr(defaults, f.name)!r}"
            )
