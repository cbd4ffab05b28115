"""Classification with a causal LM through a prompt and label words, as MeZO and DeComFL do it.

Each example becomes ``template.format(text=...)`` (the template holds ``{text}`` once) and the
model predicts the next token after it. Each class has one *label word* (the verbalizer); its
first token (with the leading space a word has after the prompt) is the class's token. The
class logits are the LM's next-token logits of those tokens at the last prompt position, and the
loss is the cross-entropy over them: no new head, no random weights, so the untrained model
already has a (zero-shot) accuracy.

Encoding keeps the end of the prompt whole: the template's text before and after ``{text}`` is
tokenized apart from the example, and only the example's tokens are cut to fit ``max_length``.
Sequences are right-padded; the classifier reads the hidden state at the last real token.

WordNet's label words are its supersense names in lower case (``act``, ``animal``, ...); any
other text dataset uses its label names unless ``label_words`` gives others.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsqueeze.errors import ConfigError

DEFAULT_TEMPLATES = {
    "wordnet": "Definition: {text}\nCategory:",
}
GENERIC_TEMPLATE = "{text}\nLabel:"
WORD_PREFIX = " "  # a label word follows the prompt after a space


def template_for(dataset: str, template: str) -> str:
    """The prompt template: ``template`` if given, else the dataset's default; ConfigError without ``{text}``."""
    chosen = template or DEFAULT_TEMPLATES.get(dataset, GENERIC_TEMPLATE)
    if chosen.count("{text}") != 1:
        raise ConfigError(f"prompt_template must contain '{{text}}' exactly once; got {chosen!r}")
    return chosen


def label_words_for(label_names: list[str], words: str) -> list[str]:
    """One label word per class: the comma-separated ``words`` if given, else the label names (lower case)."""
    if not words:
        return [n.lower() for n in label_names]
    chosen = [w.strip() for w in words.split(",")]
    if len(chosen) != len(label_names) or not all(chosen):
        raise ConfigError(
            f"label_words must give one non-empty word per class, in label order ({len(label_names)}: "
            f"{', '.join(label_names[:5])}{', ...' if len(label_names) > 5 else ''}); got {len(chosen)}"
        )
    return chosen


def verbalizer_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """The first token of each label word (after a space); ConfigError when two classes share one."""
    ids: list[int] = []
    for w in words:
        toks = tokenizer(WORD_PREFIX + w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"label word {w!r} tokenizes to nothing")
        ids.append(int(toks[0]))
    seen: dict[int, str] = {}
    for w, t in zip(words, ids):
        if t in seen:
            raise ConfigError(f"label words {seen[t]!r} and {w!r} start with the same token; choose words that differ in their first token")
        seen[t] = w
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id right padding uses (never attended to): pad, else end-of-sequence, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def encode_prompts(tokenizer: Any, texts: list[str], template: str, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [N, max_length] of the prompts, right-padded.

    The template's own tokens are always kept; the example is cut to the room left.
    """
    before, _, after = template.partition("{text}")
    # the space before the example belongs to its first token (as it would in one string)
    sep = before[len(before.rstrip()) :]
    before = before.rstrip()
    pre = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    post = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    room = max_length - len(pre) - len(post)
    if room < 1:
        raise ConfigError(f"max_length={max_length} leaves no room for the example after the prompt's {len(pre) + len(post)} tokens")
    body = tokenizer([sep + t for t in texts], add_special_tokens=False)["input_ids"]
    ids = torch.full((len(texts), max_length), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(texts), max_length), dtype=torch.long)
    for i, toks in enumerate(body):
        seq = pre + list(toks[:room]) + post
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}
