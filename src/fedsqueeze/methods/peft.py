"""FedPEFT (Sun et al., arXiv 2210.01708): parameter-efficient federated fine-tuning.

The pre-trained backbone stays frozen; each method adds or selects a small set of tensors, and
only those plus the classification head train and travel (global values down, deltas up). Every
method is a :class:`~fedsqueeze.methods.tensor.TensorMethod`, so its payload goes through the same
codec path as FedAvg's (``uplink_codec=...`` composes with no new code) and DP-FedAvg applies too.

- ``bitfit``  — BitFit: every bias of the backbone, plus the head.
- ``lora``    — HF peft LoRA injected into the backbone's linear layers (``target_modules``).
- ``adapter`` — Houlsby-style bottleneck adapters (down-project, GELU, up-project, residual) built
  here and placed after the attention output projection and after the FFN output projection of
  every layer; peft has no such tuner. The up-projection starts at zero, so training starts from
  the pre-trained function.
- ``prompt``  — peft prompt tuning (learned virtual tokens prepended to the input embeddings) or,
  with ``mode=prefix``, peft prefix tuning (learned keys/values in every layer). With prompt tuning
  the backbone's output is longer than the input; the virtual positions are dropped before the
  Classifier's mean pooling so pooling still runs over the real tokens only. Text models only.
- ``ia3``     — HF peft (IA)³: learned scaling vectors on keys, values and the FFN.
- ``ffa-lora``  — FFA-LoRA (Sun et al., ICLR 2024): LoRA with every A frozen at its seeded initial
  value (the same on every party), so only B and the head train and travel; the server's mean of
  the B's is then the exact mean of the clients' ΔW = B·A.
- ``fedsa-lora`` — FedSA-LoRA (Guo et al., ICLR 2025): A and the head are shared (trained, sent,
  averaged); each client's B trains too but stays in its client state. See :class:`FedSaLora`
  for how its personalised models are evaluated.

The head is trained by every method, at TensorMethod's ``head_lr`` (a freshly initialised linear
layer wants a larger step than the pre-trained backbone's small add-ons).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from fedsqueeze.errors import ConfigError
from fedsqueeze.methods.base import ClientOutput, RoundContext, register_method
from fedsqueeze.methods.head import head_names
from fedsqueeze.methods.tensor import TensorMethod, TensorOptions
from fedsqueeze.methods.weights import load_weights, named_params, read_weights
from fedsqueeze.models import Classifier
from fedsqueeze.options import above, at_least, between, names_list, option
from fedsqueeze.seeding import SERVER, seed_int, seeded_torch
from fedsqueeze.training import evaluate


def added_parameters(model: nn.Module, inject: Callable[[], object]) -> list[str]:
    """Run ``inject`` (which changes ``model`` in place) and return the names of the parameters it added.

    Parameters are matched by identity, so a tuner that renames the frozen weights it wraps still
    reports only what it created.
    """
    before = {id(p) for p in model.parameters()}
    inject()
    return [n for n, p in model.named_parameters() if id(p) not in before]


def split_modules(text: str) -> list[str]:
    """``"query, value"`` → ``["query", "value"]``."""
    return [m.strip() for m in text.split(",") if m.strip()]


class PeftMethod(TensorMethod):
    """A frozen backbone plus a few trainable tensors (chosen by :meth:`inject`) and the head."""

    def inject(self, model: Classifier) -> list[str]:
        """Change the model (add tuner modules) and return the names of the new trainable parameters."""
        return []

    def init_seed(self) -> int:
        """The seed of this method's tuner initialisation: from (run seed, round 0, SERVER, purpose).

        Every party of a run (server, clients, any process or runtime) builds the same tuner.
        """
        return seed_int(self.cfg.seed, 0, SERVER, f"init:{self.name}")

    def prepare_model(self, model: Classifier) -> None:
        # tuners (peft's, nn.Linear's init) draw from torch's global RNG: seed a fork of it, so the
        # run's seed decides the initial values and no other draw is disturbed
        with seeded_torch(self.init_seed()):
            self.added = self.inject(model)

    def select_trainable(self, model: Classifier) -> list[str]:
        return list(self.added) + head_names(model)


# ---- BitFit -----------------------------------------------------------------------------------


@register_method
class BitFit(PeftMethod):
    name = "bitfit"
    summary = "BitFit: only the backbone's biases and the head train and travel"
    default_lr = 5e-3

    def inject(self, model: Classifier) -> list[str]:
        biases = [n for n, _ in model.backbone.named_parameters(prefix="backbone") if n.endswith(".bias")]
        if not biases:  # e.g. Llama-style LMs: BitFit would be linear probing under another name
            raise ConfigError("bitfit: this backbone has no biases to train; use --method head for the head alone")
        return biases


# ---- LoRA -------------------------------------------------------------------------------------


@dataclass
class LoraOptions(TensorOptions):
    rank: int = option(8, "LoRA rank r", check=at_least(1))
    lora_alpha: float = option(16.0, "LoRA scaling alpha (update scaled by alpha / r)", check=above(0.0))
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input", check=between(0.0, 1.0, hi_open=True))
    target_modules: str = option("query,value", "comma-separated module-name suffixes to adapt", check=names_list())


@register_method
class Lora(PeftMethod):
    name = "lora"
    summary = "LoRA (HF peft) on the backbone's attention projections, plus the head"
    Options = LoraOptions
    default_lr = 2e-3

    def inject(self, model: Classifier) -> list[str]:
        o = self.opts
        targets = split_modules(o.target_modules)
        return inject_lora(model, o.rank, o.lora_alpha, targets, self.name, dropout=o.lora_dropout, seed=self.init_seed())


def is_lora_a(name: str) -> bool:
    """Whether a parameter name is a LoRA A (down-projection) matrix of peft."""
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    """Whether a parameter name is a LoRA B (up-projection) matrix of peft."""
    return ".lora_B." in name


@register_method
class FfaLora(Lora):
    name = "ffa-lora"
    summary = "FFA-LoRA: LoRA with A frozen at its seeded init; only B and the head train and travel"

    def select_trainable(self, model: Classifier) -> list[str]:
        return [n for n in self.added if not is_lora_a(n)] + head_names(model)


@register_method
class FedSaLora(Lora):
    """FedSA-LoRA: A and the head travel and are averaged; each client keeps its own B.

    A client's state is ``{"b": {name: B}, "codec": codec state}``; a client that never took part
    starts from B = 0 (peft's initialisation). Evaluation: the server's accuracy is that of the
    shared part alone (global A and head with B = 0, so the backbone is the pre-trained one and
    the LoRA branch is inert). Each client's *personalised* model (global A and head, its own B,
    after its local training) is evaluated by the client on the test examples of the classes its
    training data holds; the round record's ``personal_accuracy`` is the mean over the round's
    reporting clients.
    """

    name = "fedsa-lora"
    summary = "FedSA-LoRA: LoRA A and the head shared, each client's B kept local (personalised)"

    def select_trainable(self, model: Classifier) -> list[str]:
        return [n for n in self.added if not is_lora_b(n)] + head_names(model)

    def setup(self, task) -> None:
        super().setup(task)
        self.local_names = [n for n in self.added if is_lora_b(n)]
        self.local_named = named_params(task.model, self.local_names)
        for p in self.local_named.values():
            p.requires_grad_(True)  # trains on the client, never travels
        self.initial_b = read_weights(self.local_named)

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        groups[0]["params"] = list(groups[0]["params"]) + list(self.local_named.values())  # B at the backbone lr
        return groups

    def evaluate(self, state: dict[str, Any]) -> tuple[float, float]:
        load_weights(self.local_named, self.initial_b)  # the shared part alone
        return super().evaluate(state)

    def client_update(self, message: bytes, client: int, state: Any, ctx: RoundContext) -> ClientOutput:
        own = state.get("b") if isinstance(state, dict) else None
        load_weights(self.local_named, own if isinstance(own, dict) else self.initial_b)
        codec_state = state.get("codec") if isinstance(state, dict) else None
        out = super().client_update(message, client, codec_state, ctx)
        metrics = {**out.metrics, "personal_accuracy": self.personal_accuracy(client)}
        return ClientOutput(out.payload, {"b": read_weights(self.local_named), "codec": out.state or {}}, metrics)

    def personal_accuracy(self, client: int) -> float:
        """The loaded (personalised) model's accuracy on the test examples of ``client``'s classes."""
        task = self.task
        held = torch.unique(task.train.labels[torch.from_numpy(task.client_indices[client])])
        idx = torch.nonzero(torch.isin(task.test.labels, held)).flatten()
        if idx.numel() == 0:
            return 0.0
        acc, _ = evaluate(task.model, task.test.subset(idx), self.cfg.eval_batch_size)
        return acc


def inject_lora(
    model: Classifier,
    rank: int,
    alpha: float,
    target_modules: list[str],
    method: str,
    *,
    dropout: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """Inject HF peft LoRA into ``model.backbone``'s ``target_modules``; the names of the new parameters.

    B starts at zero, so the model's function is unchanged until training moves it. The random A
    matrices draw from torch's global RNG, or, given ``seed``, from a fork of it seeded with it
    (so every party of a run builds the same model); ConfigError if no module matched.
    """
    from peft import LoraConfig

    # peft annotates lora_alpha as int but scales by alpha / r in floats; a float alpha is meant
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
    )
    if seed is None:
        return _inject_peft(model, config, method)
    with seeded_torch(seed):
        return _inject_peft(model, config, method)


def _inject_peft(model: Classifier, config: Any, method: str) -> list[str]:
    """Inject a peft tuner into ``model.backbone`` in place; ConfigError if it matched nothing."""
    from peft import inject_adapter_in_model

    # generic names (query, value, ...) as this backbone calls them (the model catalogue's aliases)
    config.target_modules = set(model.module_names(config.target_modules))
    if getattr(config, "feedforward_modules", None):
        config.feedforward_modules = set(model.module_names(config.feedforward_modules))
    try:
        names = added_parameters(model, lambda: inject_adapter_in_model(config, model.backbone))
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"{method}: {exc}") from exc
    if not names:
        raise ConfigError(f"{method}: target modules {sorted(config.target_modules)} matched nothing in the backbone")
    return names


# ---- Adapters ---------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """``x + up(gelu(down(x)))`` with ``up`` zero-initialised (identity at the start)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(nn.functional.gelu(self.down(x)))


class AdaptedLinear(nn.Module):
    """A frozen linear layer followed by a bottleneck adapter."""

    def __init__(self, base: nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(base.out_features, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


@dataclass
class AdapterOptions(TensorOptions):
    bottleneck: int = option(16, "adapter bottleneck width", check=at_least(1))
    after: str = option(
        "attention.output.dense,output.dense",
        "comma-separated suffixes of the linear layers an adapter follows (attention output, FFN output)",
        check=names_list(),
    )


@register_method
class Adapter(PeftMethod):
    name = "adapter"
    summary = "bottleneck adapters after each attention and FFN output projection, plus the head"
    Options = AdapterOptions
    default_lr = 2e-3

    def inject(self, model: Classifier) -> list[str]:
        suffixes = tuple(model.module_names(split_modules(self.opts.after)))
        # one pass to find, then replace: never mutate a module tree while iterating it
        targets = [
            (name, module)
            for name, module in model.backbone.named_modules()
            if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)
        ]
        if not targets:
            raise ConfigError(f"adapter: no linear layer of the backbone ends with {list(suffixes)}")

        def place() -> None:
            for name, module in targets:
                parent_name, _, attr = name.rpartition(".")
                parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
                setattr(parent, attr, AdaptedLinear(module, self.opts.bottleneck))

        with seeded_torch(self.init_seed()):  # nn.Linear's and the down-projection's init draw from the global RNG
            return added_parameters(model, place)


# ---- Prompt / prefix tuning ---------------------------------------------------------------------


class DropVirtualTokens(nn.Module):
    """Wraps a peft prompt-tuning model: removes the virtual-token positions from its output.

    The Classifier then mean-pools over the real tokens with the attention mask it already has.
    """

    def __init__(self, peft_model: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__()
        self.peft = peft_model
        self.num_virtual_tokens = num_virtual_tokens

    def forward(self, **inputs: torch.Tensor) -> BaseModelOutput:
        hidden = self.peft(**inputs).last_hidden_state
        return BaseModelOutput(last_hidden_state=hidden[:, self.num_virtual_tokens :])


@dataclass
class PromptOptions(TensorOptions):
    mode: str = option(
        "prompt", "'prompt' (virtual input tokens) or 'prefix' (virtual keys/values in every layer)", choices=("prompt", "prefix")
    )
    virtual_tokens: int = option(10, "number of virtual tokens", check=at_least(1))
    init: str = option(
        "vocab", "prompt-mode initialisation: 'vocab' (embeddings of random tokens) or 'random'", choices=("vocab", "random")
    )


@register_method
class Prompt(PeftMethod):
    name = "prompt"
    summary = "prompt tuning or prefix tuning (HF peft) on the backbone, plus the head (text only)"
    Options = PromptOptions
    default_lr = 3e-2

    def check_run(self, cfg) -> None:
        if cfg.dataset == "fashion-mnist":  # known to be images before loading; other datasets are checked in inject
            raise ConfigError(
                "method 'prompt' needs a text dataset: prompt and prefix tuning need a text model; got dataset 'fashion-mnist'"
            )

    def inject(self, model: Classifier) -> list[str]:
        from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        if model.kind not in ("text", "lm"):
            raise ConfigError("prompt: prompt and prefix tuning need a text model")
        n = self.opts.virtual_tokens
        config: PromptTuningConfig | PrefixTuningConfig
        if self.opts.mode == "prompt":
            init = PromptTuningInit.SAMPLE_VOCAB if self.opts.init == "vocab" else PromptTuningInit.RANDOM
            config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=n, prompt_tuning_init=init)
        else:  # "prefix" (the option's choices allow no other)
            config = PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=n)

        def wrap() -> None:
            # SAMPLE_VOCAB draws token ids from the global RNG: fork it so the run's seed decides
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.seed)
                wrapped = get_peft_model(model.backbone, config)
            model.backbone = DropVirtualTokens(wrapped, n) if self.opts.mode == "prompt" else wrapped

        return added_parameters(model, wrap)


# ---- (IA)³ ------------------------------------------------------------------------------------


@dataclass
class Ia3Options(TensorOptions):
    target_modules: str = option("key,value,output.dense", "comma-separated module-name suffixes to scale", check=names_list())
    feedforward_modules: str = option("output.dense", "which of the targets scale their input (FFN) instead of their output")

    def validate(self) -> None:
        extra = sorted(set(split_modules(self.feedforward_modules)) - set(split_modules(self.target_modules)))
        if extra:  # peft would reject it only when the model is built
            raise ConfigError(f"option 'feedforward_modules' of method 'ia3' must be among target_modules; got {', '.join(extra)}")


@register_method
class Ia3(PeftMethod):
    name = "ia3"
    summary = "(IA)^3 (HF peft): learned scaling of keys, values and FFN activations, plus the head"
    Options = Ia3Options
    default_lr = 1e-2

    def inject(self, model: Classifier) -> list[str]:
        from peft import IA3Config

        config = IA3Config(
            target_modules=split_modules(self.opts.target_modules),
            feedforward_modules=split_modules(self.opts.feedforward_modules),
        )
        return _inject_peft(model, config, self.name)
