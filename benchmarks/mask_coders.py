"""Mask coders on real masks: bits of every uplink mask coder against its own bound.

Runs a short mask-method run (``--method fedpm|deltamask``, ``--rounds``, on the default task or
``--model tiny``) and, for every client of every round, takes the client's own uniforms ``u``,
start probabilities θ_start and trained probabilities θ_client at the moment it codes its mask.
Of the flips ``f = (u < θ_client) xor (u < θ_start)`` (for deltamask: the top-κ_r of them, as sent)
it codes, and records in bits per masked weight:

* ``context`` — ANS of the flip bits per context (bin of |u − θ_start|, reference bit); bound:
  the empirical conditional entropy ``n · H(F | C)``;
* ``rice``, ``elias-fano`` — the flipped positions; bound ``log2 C(n, N)`` (no side information);
* ``fuse8`` — the paper's filter; bound ``N · log2(1/ε)`` = 8 bits per key at ε = 2^-8 (a filter's
  floor), plus the false flips it adds (about n / 256);
* ``levels`` (fedpm only) — FedPM's whole-mask code per level of θ_global; bound ``Σ_g n_g H(p_g)``.

``bits`` is each coder's mask section (for context: its packed counts and ANS words), ``header_bits``
its JSON header where it has one (levels' per-level counts; context's coder name); ``bpp`` counts both. Writes benchmarks/results/mask_coders[_tiny].json.

    OMP_NUM_THREADS=1 PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/mask_coders.py --method fedpm --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedsqueeze.codecs.ans import bernoulli_bits, encode_grouped_bits  # noqa: E402
from fedsqueeze.codecs.fusefilter import build_filter  # noqa: E402
from fedsqueeze.codecs.positions import encode_positions, entropy_bound_bits  # noqa: E402
from fedsqueeze.codecs.sideinfo import encode_flips, flip_bound_bits, flip_contexts  # noqa: E402
from fedsqueeze.config import RunConfig  # noqa: E402
from fedsqueeze.methods import get_method  # noqa: E402
from fedsqueeze.methods.deltamask import top_flips  # noqa: E402

ROWS: list[dict] = []


def code_all(method, u, theta_client, theta_start, sym, levels, ctx) -> dict:
    """Every coder's bits (and its bound) for one client's mask."""
    n = method.n
    if method.name == "fedpm":
        keys = np.flatnonzero((u < theta_client) != (u < theta_start)).astype(np.uint64)
    else:
        keys, _ = top_flips(u, theta_client, theta_start, method.flip_cap(ctx))
    flips = np.zeros(n, dtype=bool)
    flips[keys.astype(np.int64)] = True
    contexts = flip_contexts(u, theta_start)
    row: dict = {"round": ctx.round, "n": n, "flips": int(keys.size), "flip_frac": keys.size / n, "coders": {}}
    meta, body = encode_flips(flips, contexts)
    header = len(json.dumps(meta, separators=(",", ":")))
    row["coders"]["context"] = {"bits": 8 * len(body), "header_bits": 8 * header, "bound_bits": flip_bound_bits(flips, contexts)}
    blind = entropy_bound_bits(int(keys.size), n)
    for coder in ("rice", "elias-fano"):
        _, body = encode_positions(keys, n, coder)
        row["coders"][coder] = {"bits": 8 * len(body), "header_bits": 0, "bound_bits": blind}
    flt = build_filter(keys, "fuse8")
    row["coders"]["fuse8"] = {"bits": 8 * flt.fingerprints.nbytes, "header_bits": 0, "bound_bits": 8.0 * keys.size}
    if method.name == "fedpm":
        mask = u < theta_client
        groups = sym.astype(np.int64)
        meta, body = encode_grouped_bits(mask, groups, levels + 1)
        bound = bernoulli_bits(meta["ones"], np.bincount(groups, minlength=levels + 1))
        header = len(json.dumps(meta["ones"], separators=(",", ":")))
        row["coders"]["levels"] = {"bits": 8 * len(body), "header_bits": 8 * header, "bound_bits": bound}
    for c in row["coders"].values():
        c["bpp"] = (c["bits"] + c["header_bits"]) / n
        c["bits_over_bound"] = c["bits"] / c["bound_bits"] if c["bound_bits"] else None
    return row


def summarize(rows: list[dict]) -> dict:
    """Per coder: mean bpp, total bits over total bound, and the header's share."""
    summary = {}
    for k in sorted({k for r in rows for k in r["coders"]}):
        cs = [r["coders"][k] for r in rows if k in r["coders"]]
        bits = sum(c["bits"] for c in cs)
        bound = sum(c["bound_bits"] for c in cs)
        summary[k] = {
            "mean_bpp": float(np.mean([c["bpp"] for c in cs])),
            "bits_over_bound": bits / bound if bound else None,
            "header_fraction": sum(c["header_bits"] for c in cs) / max(bits, 1),
        }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="fedpm", choices=["fedpm", "deltamask"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None, help="'tiny' for the test model (default: the default task's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    overrides: dict = {"method": args.method, "rounds": args.rounds, "threads": 1}
    if args.model == "tiny":
        overrides.update(model="tiny", clients=4, clients_per_round=2, train_size=200, test_size=100, local_steps=3, batch_size=8)
    suffix = "_tiny" if args.model == "tiny" else ""
    path = Path(args.out or Path(__file__).parent / "results" / f"mask_coders_{args.method}{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": dict(overrides), "complete": False}

    def write() -> None:  # after every client: a run cut short still leaves what it measured
        result.update(masked_weights=ROWS[0]["n"] if ROWS else 0, summary=summarize(ROWS), clients=ROWS)
        path.write_text(json.dumps(result, indent=2) + "\n")

    cls = get_method(args.method)
    original = cls.encode_mask

    def spy(self, u, theta_client, theta_start, sym, levels, ctx):
        ROWS.append(code_all(self, u, theta_client, theta_start, sym, levels, ctx))
        r = ROWS[-1]
        line = {k: [round(v["bpp"], 4), round(v["bits_over_bound"] or 0, 4)] for k, v in r["coders"].items()}
        print(json.dumps({"round": r["round"], "flip_frac": r["flip_frac"], "bpp_and_bits_over_bound": line}), flush=True)
        write()
        return original(self, u, theta_client, theta_start, sym, levels, ctx)

    cls.encode_mask = spy  # type: ignore[method-assign]
    from fedsqueeze.runtime import run_local

    with tempfile.TemporaryDirectory(prefix="fsq-maskbench-") as out:
        cfg = RunConfig(**overrides, out=out).validate()
        res = run_local(cfg, show_progress=False)
    result.update(model=cfg.model, final_accuracy=res["final"]["accuracy"], complete=True)
    write()
    print(json.dumps(result["summary"], indent=1))
    print(f"→ {path}")


if __name__ == "__main__":
    main()
