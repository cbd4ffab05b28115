"""Centralised first-order ceilings of 'top layer(s) + head' on cached lower-layer outputs.

What could zeroth-order training of the top layer reach at best? This trains, first-order and
centrally (AdamW, batch 32, on all 4,000 training examples of the default task), the head alone
and the head with LoRA r = 8 on the top layer (query/value, the feed-forward output only, every
linear map) or the whole top layer, from the same warm-started head (200 AdamW steps on the cached
features, lr 1e-2, batch 64), and prints test accuracy every 100 steps. The inputs of layer L
(0-based) are cached once; each step runs layers L.. only. Heavy: run it under /work/bin/measure.

    python benchmarks/zo_top_ceiling.py 5 head,lora-qv,ffn-out,lora-all,full 400
    # M=tiny N=300 NT=200 python benchmarks/zo_top_ceiling.py 1 head 100   (a quick check)

Writes /tmp/zo/ceiling-L{L}.json.
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch.nn import functional as F
from zo_top_common import top_accuracy, warm_head

from fedsqueeze.config import RunConfig
from fedsqueeze.task import build_task
from fedsqueeze.training import batch_inputs

torch.manual_seed(0)
cfg = RunConfig(
    method="head",
    threads=1,
    model=os.environ.get("M", "minilm"),
    train_size=int(os.environ.get("N", 4000)),
    test_size=int(os.environ.get("NT", 1000)),
).validate()
t0 = time.perf_counter()
task = build_task(cfg)
model = task.model
layers = model.backbone.encoder.layer
L = int(sys.argv[1]) if len(sys.argv) > 1 else 5
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["head", "lora-qv", "lora-all", "ffn-out", "full"]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 400


def cache(data):
    got = {}

    def hook(mod, args, kwargs):
        got["h"] = args[0].detach().clone()
        got["m"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        raise StopIteration

    hs = []
    handle = layers[L].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for s in range(0, len(data), 128):
            idx = torch.arange(s, min(s + 128, len(data)))
            inp = {k: v[idx] for k, v in data.inputs.items()}  # full width 32, no trimming
            try:
                model.backbone(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
            except StopIteration:
                pass
            hs.append(got["h"])
    handle.remove()
    return torch.cat(hs), data.inputs["attention_mask"]


tr_h, tr_m = cache(task.train)
te_h, te_m = cache(task.test)
print(f"cached in {time.perf_counter() - t0:.0f}s, train {tuple(tr_h.shape)}, mean len {tr_m.sum(1).float().mean():.1f}", flush=True)
ytr, yte = task.train.labels, task.test.labels


def top(h, m):
    w = int(m.sum(1).max())
    h, m = h[:, :w], m[:, :w]
    ext = (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer in layers[L:]:
        out = layer(h, ext)
        h = out[0] if isinstance(out, tuple) else out
    mm = m.unsqueeze(-1).float()
    return model.head((h * mm).sum(1) / mm.sum(1).clamp_min(1.0))


# sanity: the top on cached inputs == the full model
with torch.no_grad():
    idx = torch.arange(64)
    full = model(**batch_inputs(task.test, idx))
    mine = top(te_h[idx], te_m[idx])
    print("max diff vs full forward", float((full - mine).abs().max()), flush=True)
    t = time.perf_counter()
    cidx = torch.arange(min(400, len(tr_h)))
    top(tr_h[cidx], tr_m[cidx])
    print(f"one top forward on 400 examples: {time.perf_counter() - t:.3f}s", flush=True)

pristine = copy.deepcopy(model.state_dict())
# warm start the head as the ZO methods do (centralised stand-in: 200 AdamW steps on the features)
feats = task.frozen_features("train")
warm_head_state = warm_head(model, feats, ytr)


def evaluate():
    return top_accuracy(top, te_h, te_m, yte)


results = {}
targets = {
    "lora-qv": ["query", "value"],
    "lora-all": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "ffn-out": ["output.dense"],
}
for v in variants:
    model.load_state_dict(pristine)
    model.head.load_state_dict(warm_head_state)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.head.parameters())
    lr = 1e-3
    if v.startswith("lora") or v == "ffn-out":
        for layer in layers[L:]:
            tm = targets[v]
            if v == "ffn-out":
                tm = r"^output\.dense$"
            inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=tm), layer)
            params += [p for n, p in layer.named_parameters() if "lora_" in n]
        lr = 1e-3
    elif v == "full":
        for layer in layers[L:]:
            params += list(layer.parameters())
        lr = 1e-4
    for p in params:
        p.requires_grad_(True)
    ntrain = sum(p.numel() for p in params)
    opt = torch.optim.AdamW([{"params": list(model.head.parameters()), "lr": 1e-3}, {"params": params[2:], "lr": lr}])
    g = torch.Generator().manual_seed(0)
    curve = [(0, evaluate())]
    t = time.perf_counter()
    for s in range(1, steps + 1):
        i = torch.randint(0, len(ytr), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(top(tr_h[i], tr_m[i]), ytr[i]).backward()
        opt.step()
        if s % 100 == 0:
            curve.append((s, evaluate()))
    print(v, ntrain, "params", curve, f"{time.perf_counter() - t:.0f}s", flush=True)
    results[v] = {"params": ntrain, "curve": curve}
    # undo LoRA: reload a fresh copy by rebuilding layers' modules is awkward; unload adapters instead
    for layer in layers[L:]:
        for name, mod in list(layer.named_modules()):
            if hasattr(mod, "base_layer"):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], mod.base_layer)
        if hasattr(layer, "peft_config"):
            del layer.peft_config
Path("/tmp/zo").mkdir(exist_ok=True)
Path(f"/tmp/zo/ceiling-L{L}.json").write_text(json.dumps(results, indent=1))
