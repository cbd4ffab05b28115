"""The catalogue's installed models on a few examples (slow: real weights; `pytest -m slow tests/test_models_slow.py`).

Each test is skipped, with the reason printed (``-rs``), when `make models` has not installed its
model; the default suite deselects them all (``-m 'not slow'``).
"""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.models.catalogue import CATALOGUE

pytestmark = pytest.mark.slow


def need(name: str) -> None:
    entry = CATALOGUE[name]
    if not entry.installed():
        pytest.skip(f"model {name!r} is not installed in {entry.path()} (run `make models`)")


def tiny_run(tiny_cfg, model: str, method: str, **kw):
    from fedsqueeze.runners import run

    values = dict(model=model, method=method, rounds=1, train_size=16, test_size=8, local_steps=1, batch_size=4, threads=1)
    values.update(kw)
    results = run(tiny_cfg(**values), show_progress=False)
    record = results["rounds"][0]
    assert record["clients_aggregated"] == 2 and record["uplink_bytes"] > 0 and record["downlink_bytes"] > 0
    return results


@pytest.mark.parametrize("method", ["lora", "fedavg"])
def test_mpnet_runs(tiny_cfg, method):
    need("mpnet")
    results = tiny_run(tiny_cfg, "mpnet", method)
    assert 109_000_000 < results["model_params"] < 110_000_000


@pytest.mark.parametrize("method", ["lora", "deltamask", "bitfit"])
def test_effnet_lite0_runs_on_fashion_mnist(tiny_cfg, method):
    need("effnet-lite0")
    results = tiny_run(tiny_cfg, "effnet-lite0", method, dataset="fashion-mnist", image_size=64)
    # 3,371,008 backbone weights (ImageNet classifier dropped) + a 1280x10 head with bias
    assert results["model_params"] == 3_371_008 + 1280 * 10 + 10


def test_effnet_lite0_keeps_its_imagenet_features():
    """The loaded backbone is the package's network minus its classifier: same features, weights_only load."""
    need("effnet-lite0")
    from efficientnet_lite_pytorch import EfficientNet

    from fedsqueeze.models.effnet import WEIGHTS_FILE, load_effnet_lite0

    folder = CATALOGUE["effnet-lite0"].path()
    ours, width = load_effnet_lite0(folder)
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        got = ours(pixel_values=(x - 0.2860) / 0.3530).last_hidden_state.mean(1)
        big = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        want = ref.extract_features(big * 2 - 1).mean((2, 3))
    assert width == 1280
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "deltamask", "decomfl"])
def test_smollm2_prompt_classification_runs(tiny_cfg, method):
    need("smollm2")
    results = tiny_run(tiny_cfg, "smollm2", method, max_length=24)
    assert 0.0 <= results["round0"]["accuracy"] <= 1.0
    assert 134_000_000 < results["model_params"] < 135_000_000


def test_smollm2_class_logits_are_its_next_token_logits():
    need("smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedsqueeze.models import load_model
    from fedsqueeze.models.prompting import encode_prompts, verbalizer_ids

    path = CATALOGUE["smollm2"].path()
    words = ["animal", "food", "person"]
    tok = AutoTokenizer.from_pretrained(path)
    inputs = encode_prompts(tok, ["a domestic cat", "a loaf of bread"], "Definition: {text}\nCategory:", 24)
    causal = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        full = causal(**inputs).logits
    last = inputs["attention_mask"].sum(1) - 1
    want = full[torch.arange(2), last][:, verbalizer_ids(tok, words)]
    loaded = load_model("smollm2", "text", 3, 0, label_words=words)
    with torch.no_grad():
        got = loaded.model(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
