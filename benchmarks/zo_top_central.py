"""Centralised zeroth-order screen on cached inputs of the top layer: the head alone vs LoRA on the top layer + head.

From the same warm-started head as benchmarks/zo_top_ceiling.py (200 AdamW steps on the cached
features), it runs central-difference ZO-SGD steps (P = 1, mu = 1e-3; the repository's
``estimate_step`` and ``Perturber``) on random minibatches of the default task's 4,000 training
examples, and prints test accuracy at four checkpoints and the time per step. ``top`` perturbs
LoRA r = 8 on every linear map of layer 6 (of 6) and the head; each evaluation runs that layer
only, on the inputs cached once (/tmp/zo/cache5.pt). Items are NAME:LR:STEPS:BATCH (batch -1 = all).

    python benchmarks/zo_top_central.py "head:1e-2:2000:-1;top:2e-3:400:64"

Writes /tmp/zo/zo_central.json (each call rewrites it; benchmarks/results/zo_default.json keeps the runs of docs/zo.md).
"""

import json
import os
import sys
import time

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch.nn import functional as F
from zo_top_common import top_accuracy, warm_head

from fedsqueeze.config import RunConfig
from fedsqueeze.methods.zo import Perturber, estimate_step
from fedsqueeze.task import build_task

torch.manual_seed(0)
cfg = RunConfig(method="head", threads=1).validate()
task = build_task(cfg)
model = task.model
layers = model.backbone.encoder.layer
L = 5
spec = sys.argv[1].split(";")  # items name:lr:steps:batch
path = "/tmp/zo/cache5.pt"
if os.path.exists(path):
    tr_h, tr_m, te_h, te_m = torch.load(path)
else:
    from fedsqueeze.methods.zo_top import TopLayers

    top = TopLayers(model, 1)
    a, b = top.cache(task.train, 128), top.cache(task.test, 128)
    tr_h, tr_m, te_h, te_m = a.inputs["hidden"], a.inputs["attention_mask"], b.inputs["hidden"], b.inputs["attention_mask"]
    torch.save((tr_h, tr_m, te_h, te_m), path)
ytr, yte = task.train.labels, task.test.labels


def top(h, m):
    w = int(m.sum(1).max())
    h, m = h[:, :w], m[:, :w]
    ext = (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min
    out = layers[L](h, ext)
    h = out[0] if isinstance(out, tuple) else out
    mm = m.unsqueeze(-1).float()
    return model.head((h * mm).sum(1) / mm.sum(1).clamp_min(1.0))


feats = task.frozen_features("train")
tfeats = task.frozen_features("test")
warm = warm_head(model, feats, ytr)
targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=targets), layers[L])
lora = [p for n, p in layers[L].named_parameters() if "lora_" in n]
lora_init = [p.detach().clone() for p in lora]


@torch.no_grad()
def acc(use_top):
    if not use_top:
        return float((model.head(tfeats).argmax(1) == yte).float().mean())
    return top_accuracy(top, te_h, te_m, yte)


res = {}
for item in spec:
    name, lr, steps, bs = item.split(":")
    lr, steps, bs = float(lr), int(steps), int(bs)
    model.head.load_state_dict(warm)
    with torch.no_grad():
        for p, p0 in zip(lora, lora_init):
            p.copy_(p0)
    use_top = name == "top"
    params = list(model.head.parameters()) + (lora if use_top else [])
    pert = Perturber(params)
    g = torch.Generator().manual_seed(1)
    curve = [(0, acc(use_top))]
    t = time.perf_counter()
    for s in range(1, steps + 1):
        i = torch.arange(len(ytr)) if bs < 0 else torch.randint(0, len(ytr), (bs,), generator=g)
        if use_top:
            loss = lambda i=i: float(F.cross_entropy(top(tr_h[i], tr_m[i]), ytr[i]))
        else:
            loss = lambda i=i: float(F.cross_entropy(model.head(feats[i]), ytr[i]))
        with torch.no_grad():
            estimate_step(pert, loss, 1000 + s, 1, 1e-3, "central", lr)
        if s % max(1, steps // 4) == 0:
            curve.append((s, acc(use_top)))
    dt = time.perf_counter() - t
    print(item, curve, f"{dt:.0f}s ({dt / steps * 1000:.0f} ms/step)", flush=True)
    res[item] = {"curve": curve, "s_per_step": dt / steps}
    json.dump(res, open("/tmp/zo/zo_central.json", "w"), indent=1)
