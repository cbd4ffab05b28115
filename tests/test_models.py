"""The model catalogue and causal-LM prompt classification, on tiny built-in models (offline, fast).

The real catalogue models (mpnet, effnet-lite0, smollm2) are exercised by tests/test_models_slow.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fedsqueeze.data.sources import NOUN_SUPERSENSES, RawSplit
from fedsqueeze.errors import ConfigError
from fedsqueeze.masking import select_masked
from fedsqueeze.models import Classifier, bundled_minilm_path, load_model
from fedsqueeze.models.backbone import lm_classifier, tiny_causal_lm
from fedsqueeze.models.catalogue import CATALOGUE, MODELS_ENV, map_module_names
from fedsqueeze.models.effnet import EffNetBackbone, plain_pointwise
from fedsqueeze.models.prompting import encode_prompts, label_words_for, template_for, verbalizer_ids

WORDS = ["animal", "food", "person"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_minilm_path())


def test_verbalizer_logits_are_the_lms_next_token_logits_of_the_label_words(tokenizer):
    causal = tiny_causal_lm(seed=3)
    template = "Definition: {text}\nCategory:"
    inputs = encode_prompts(tokenizer, ["a small dog", "bread baked in an oven and then cut into slices"], template, 24)
    with torch.no_grad():
        full = causal(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    ids = verbalizer_ids(tokenizer, WORDS)
    last = inputs["attention_mask"].sum(1) - 1
    expected = full[torch.arange(2), last][:, ids]
    model = lm_classifier(causal, tokenizer, WORDS)
    with torch.no_grad():
        got = model(**inputs)
    assert model.head.bias is None and model.head.weight.shape == (3, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the head is the output embedding's rows of the label words' first tokens, nothing random
    torch.testing.assert_close(model.head.weight, causal.get_output_embeddings().weight[ids])


def test_prompt_encoding_keeps_the_template_and_cuts_the_example(tokenizer):
    template = "Q: {text} A:"
    long_text = " ".join(["word"] * 50)
    enc = encode_prompts(tokenizer, [long_text, "cat"], template, 12)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (2, 12)
    tail = tokenizer("A:", add_special_tokens=False)["input_ids"]
    head = tokenizer("Q:", add_special_tokens=False)["input_ids"]
    for row in range(2):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right-padded
        assert ids[row, :n].tolist()[: len(head)] == head
        assert ids[row, :n].tolist()[-len(tail) :] == tail
    assert int(mask[0].sum()) == 12  # the long example filled the room left
    assert ids[1, : int(mask[1].sum())].tolist() == head + tokenizer("cat", add_special_tokens=False)["input_ids"] + tail
    with pytest.raises(ConfigError, match="no room"):
        encode_prompts(tokenizer, ["x"], template, len(head) + len(tail))


def test_label_words_and_templates():
    assert label_words_for(list(NOUN_SUPERSENSES), "")[:3] == ["tops", "act", "animal"]
    assert label_words_for(["neg", "pos"], "bad, good") == ["bad", "good"]
    with pytest.raises(ConfigError, match="one non-empty word per class"):
        label_words_for(["neg", "pos"], "bad")
    with pytest.raises(ConfigError, match="exactly once"):
        template_for("wordnet", "no placeholder")
    assert "{text}" in template_for("wordnet", "") and template_for("my.csv", "T {text}") == "T {text}"


def test_label_words_that_share_a_first_token_are_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="same token"):
        verbalizer_ids(tokenizer, ["cat", "cat"])


def test_module_aliases_translate_generic_names():
    assert map_module_names(CATALOGUE["smollm2"].aliases, ["query", "value"]) == ["q_proj", "v_proj"]
    assert map_module_names(CATALOGUE["mpnet"].aliases, ["query", "value", "custom"]) == ["q", "v", "custom"]
    assert map_module_names({}, ["query"]) == ["query"]


def test_missing_catalogue_model_names_make_models(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    for name, kind in (("mpnet", "text"), ("smollm2", "text"), ("effnet-lite0", "image")):
        assert not CATALOGUE[name].installed()
        with pytest.raises(ConfigError, match="make models"):
            load_model(name, kind, 3, 0, label_words=WORDS)
    with pytest.raises(ConfigError, match="image model"):
        load_model("effnet-lite0", "text", 3, 0)
    with pytest.raises(ConfigError, match="takes no images"):
        load_model("mpnet", "image", 3, 0)


def test_tiny_lm_needs_one_label_word_per_class():
    with pytest.raises(ConfigError, match="one per class"):
        load_model("tiny-lm", "text", 4, 0, label_words=WORDS)


def test_masked_kinds_choose_what_the_mask_methods_mask():
    model = Classifier(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(4, 5)), 5, 2, "image")
    assert select_masked(model).names == ["backbone.1.weight"]
    model.masked_kinds = (nn.Linear, nn.Conv2d)
    layout = select_masked(model)
    assert layout.names == ["backbone.0.weight", "backbone.1.weight"] and layout.total == 2 * 9 + 20


class _SamePad(nn.Conv2d):
    """Stands in for the EfficientNet package's static-same-padding convolution."""


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _SamePad(3, 4, 3, stride=2, bias=False)
        self.point = _SamePad(4, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.point(self.stem(x)))


def test_effnet_backbone_resizes_replicates_and_freezes_batch_norm():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 1, 28, 28)
    before = EffNetBackbone(net, 16)(pixel_values=x).last_hidden_state.detach()
    plain_pointwise(net)
    assert type(net.point) is nn.Conv2d and type(net.stem) is _SamePad  # only the 1x1 stride-1 one
    backbone = EffNetBackbone(net, 16).train()
    assert not net.bn.training  # running statistics frozen even in training mode
    stats = net.bn.running_mean.clone()
    out = backbone(pixel_values=x).last_hidden_state
    assert out.shape == (2, 7 * 7, 6)  # 16x16 input, 3x3 stride-2 unpadded stem → 7x7 tokens of 6 channels
    torch.testing.assert_close(out.detach(), before)  # same function after the swap
    assert torch.equal(net.bn.running_mean, stats)


def test_prompt_options_need_a_causal_lm(tiny_cfg):
    from fedsqueeze.task import build_task

    with pytest.raises(ConfigError, match="causal LM"):
        build_task(tiny_cfg(train_size=20, test_size=10, prompt_template="{text} is"))


def test_tiny_lm_run_reports_zero_shot_as_round_0(tiny_cfg):
    from fedsqueeze.data.sources import RawDataset
    from fedsqueeze.runners import run
    from fedsqueeze.task import build_task

    texts = [f"a thing number {i}" for i in range(24)]
    raw = RawDataset(
        "toy",
        "text",
        RawSplit(labels=np.arange(16) % 3, texts=texts[:16]),
        RawSplit(labels=np.arange(8) % 3, texts=texts[16:]),
        ["Animal", "Food", "Person"],
    )
    cfg = dataclasses.replace(tiny_cfg(model="tiny-lm", train_size=16, test_size=8, rounds=1), max_length=16)
    task = build_task(cfg, raw)
    assert task.prompted and task.zero_shot is not None
    assert task.num_classes == 3 and task.model.head.weight.shape == (3, 32)
    results = run(tiny_cfg(model="tiny-lm", method="lora", train_size=30, test_size=20, rounds=1), show_progress=False)
    zero = results["round0"]
    assert zero["round"] == 0 and 0.0 <= zero["accuracy"] <= 1.0 and zero["loss"] > 0
    assert results["rounds"][0]["uplink_bytes"] > 0


def test_models_command_lists_every_model(capsys):
    from typer.testing import CliRunner

    from fedsqueeze.cli import app

    out = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"}).output
    for name, entry in CATALOGUE.items():
        assert name in out and entry.license in out
