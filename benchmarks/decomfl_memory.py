"""Peak memory of a DeComFL client step against inference alone, on MiniLM (full model).

Each mode runs in a fresh subprocess and reports its peak resident set size (``ru_maxrss``) and
the RSS right after the model is loaded, so the increment due to the work itself is visible too:

- ``inference``: K forward passes of a batch under ``no_grad``;
- ``zo-step``: K zeroth-order steps (central difference, P perturbations, in-place perturbation);
- ``zo-client``: the same plus the copy of the synced weights a DeComFL client keeps to stay
  bit-exact with the server (what ``decomfl`` does with ``params=full``);
- ``zo-client-lora``: the zo-client of ``params=lora`` (the default): LoRA (r 8, query/value)
  injected, only LoRA and the head perturbed, the synced copy of just those kept;
- ``backprop``: K first-order AdamW steps, for reference.

Run under the shared lock:
    flock /tmp/fedsqueeze-heavy.lock env PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/decomfl_memory.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ["inference", "zo-step", "zo-client", "zo-client-lora", "backprop"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, steps: int, batch: int, perturbations: int) -> dict:
    import torch
    from torch.nn import functional as F

    from fedsqueeze.data import load_dataset
    from fedsqueeze.methods.zo import Perturber, estimate_step
    from fedsqueeze.models import load_model

    torch.set_num_threads(1)
    raw = load_dataset("wordnet", 200, 50)
    loaded = load_model("minilm", "text", raw.num_classes, 0)
    model = loaded.model.eval()
    enc = loaded.tokenizer(raw.train.texts[:batch], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    labels = torch.from_numpy(raw.train.labels[:batch])
    loaded_rss = rss_mb()
    t0 = time.perf_counter()
    if mode == "inference":
        with torch.no_grad():
            for _ in range(steps):
                model(**inputs)
    elif mode in ("zo-step", "zo-client", "zo-client-lora"):
        for p in model.parameters():
            p.requires_grad_(False)
        if mode == "zo-client-lora":
            from fedsqueeze.methods.peft import inject_lora

            names = set(inject_lora(model, 8, 16, ["query", "value"], "decomfl", seed=0)) | {
                n for n, _ in model.named_parameters() if n.startswith("head.")
            }
            params = [p.requires_grad_(False) for n, p in model.named_parameters() if n in names]
        else:
            params = list(model.parameters())
        keep = [p.detach().clone() for p in params] if mode != "zo-step" else None
        pert = Perturber(params)
        with torch.no_grad():
            loss = lambda: float(F.cross_entropy(model(**inputs), labels))
            for k in range(steps):
                estimate_step(pert, loss, seed=1000 + k, perturbations=perturbations, mu=1e-3, difference="central", lr=1e-6)
        del keep
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(steps):
            loss = F.cross_entropy(model(**inputs), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "peak_rss_mb": peak,
        "loaded_rss_mb": loaded_rss,
        "work_mb": peak - loaded_rss,
        "seconds_per_step": seconds / steps,
    }


def main() -> None:
    steps, batch, perts = 5, 16, 1
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], steps, batch, perts)))
        return
    rows = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[mode], flush=True)
    base = rows["inference"]["peak_rss_mb"]
    summary = {m: round(r["peak_rss_mb"] / base, 3) for m, r in rows.items()}
    result = {
        "model": "minilm (22.7M params, float32)",
        "batch": batch,
        "max_length": 32,
        "steps": steps,
        "perturbations": perts,
        "threads": 1,
        "modes": rows,
        "peak_rss_vs_inference": summary,
    }
    path = Path(__file__).parent / "results" / "decomfl_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
