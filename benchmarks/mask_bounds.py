"""Mask coders against their bounds on real masks: issue 16's "each mask coder within 3 % of its bound".

Runs a short mask-method run (default: the default task, MiniLM, ``--rounds 2``) for each of
``--methods`` and, at the moment each client codes its mask, lets the method's own encoder code it
(its default coder; its header stats give the code's bits and bound), then codes the same flips
with every other uplink mask coder (``mask_coders.code_all``). For each coder, the gap is its bits
over its matching bound, minus one:

* ``context`` (the default of fedpm, deltamask, deltamask-exact): ``n · H(F | C)``, the empirical
  conditional entropy of the flip bits given the contexts (bin of ``|u − θ_start|``, reference bit);
* ``levels`` (FedPM as published): ``Σ_g n_g H(p_g)``, the empirical entropy of the mask per level
  of θ_global;
* ``rice``, ``elias-fano``: ``log2 C(n, N)`` for N flipped positions (no side information);
* ``fuse8``: ``N · log2(1/ε)`` = 8 bits a key at ε = 2^-8, any filter's floor.

``gap`` counts the coder's body (for context: its packed per-context counts and ANS words);
``gap_with_header`` adds its JSON header where it has one. Writes benchmarks/results/mask_bounds.json
after every client, so a run cut short keeps what it measured.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/mask_bounds.py --methods fedpm,deltamask --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mask_coders import code_all  # noqa: E402  (the sibling benchmark: every coder on one client's mask)

from fedsqueeze.config import RunConfig  # noqa: E402
from fedsqueeze.methods import get_method  # noqa: E402

TARGET_GAP = 0.03


def gaps(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per coder over all clients and rounds: total bits over total bound, minus one (body, and with header)."""
    out: dict[str, dict[str, Any]] = {}
    for coder in sorted({k for r in rows for k in r["coders"]}):
        cs = [r["coders"][coder] for r in rows if coder in r["coders"]]
        bits = sum(c["bits"] for c in cs)
        header = sum(c["header_bits"] for c in cs)
        bound = sum(c["bound_bits"] for c in cs)
        per = [c["bits"] / c["bound_bits"] - 1 for c in cs if c["bound_bits"]]
        out[coder] = {
            "clients": len(cs),
            "bits": bits,
            "header_bits": header,
            "bound_bits": bound,
            "gap": bits / bound - 1 if bound else None,
            "gap_with_header": (bits + header) / bound - 1 if bound else None,
            "worst_client_gap": max(per) if per else None,
            "within_target": bool(bound and bits / bound - 1 <= TARGET_GAP),
            "mean_bpp": sum((c["bits"] + c["header_bits"]) / r["n"] for c, r in zip(cs, rows)) / len(cs),
        }
    return out


def run_method(method: str, overrides: dict[str, Any], result: dict[str, Any], write) -> None:
    """One run of ``method``; every client's mask coded by every coder, into ``result["runs"][method]``."""
    cls = get_method(method)
    original = cls.encode_mask
    rows: list[dict[str, Any]] = []
    entry: dict[str, Any] = {"config": {**overrides, "method": method}, "complete": False, "clients": rows}
    result["runs"][method] = entry

    def spy(self, u, theta_client, theta_start, sym, levels, ctx):
        meta, body, stats = original(self, u, theta_client, theta_start, sym, levels, ctx)
        row = code_all(self, u, theta_client, theta_start, sym, levels, ctx)
        # the method's own code of this mask: what it sends, against the bound it reports
        header = len(json.dumps(meta, separators=(",", ":")))
        row["own"] = {"bits": 8 * len(body), "header_bits": 8 * header, "bound_bits": stats.get("mask_bound_bits")}
        if row["own"]["bound_bits"] is not None and row["own"]["bits"] != row["coders"]["context"]["bits"]:
            raise AssertionError("the method's context code and the benchmark's differ")
        rows.append(row)
        print(
            json.dumps(
                {
                    "method": method,
                    "round": ctx.round,
                    "flip_frac": round(row["flip_frac"], 5),
                    **{k: round(v["bits_over_bound"] - 1, 5) for k, v in row["coders"].items()},
                }
            ),
            flush=True,
        )
        entry.update(masked_weights=row["n"], gaps=gaps(rows))
        write()
        return meta, body, stats

    cls.encode_mask = spy  # type: ignore[method-assign]
    from fedsqueeze.runtime import run_local

    try:
        with tempfile.TemporaryDirectory(prefix="fsq-maskbounds-") as out:
            cfg = RunConfig(**overrides, method=method, out=out).validate()
            res = run_local(cfg, show_progress=False)
    finally:
        cls.encode_mask = original  # type: ignore[method-assign]
    entry.update(model=cfg.model, final_accuracy=res["final"]["accuracy"], complete=True)
    write()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="fedpm,deltamask", help="comma-separated mask methods")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None, help="'tiny' for the test model (default: the default task's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mask_bounds.json"))
    args = ap.parse_args()
    overrides: dict[str, Any] = {"rounds": args.rounds, "threads": 1}
    if args.model == "tiny":
        overrides.update(model="tiny", clients=4, clients_per_round=2, train_size=200, test_size=100, local_steps=3, batch_size=8)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    result: dict[str, Any] = {
        "command": f"python benchmarks/mask_bounds.py --methods {args.methods} --rounds {args.rounds}"
        + (" --model tiny" if args.model else ""),
        "code": code,
        "target_gap": TARGET_GAP,
        "bounds": {
            "context": "n·H(F|C): flips given (bin of |u − θ_start|, reference bit)",
            "levels": "Σ_g n_g H(p_g): the mask per level of θ_global",
            "rice": "log2 C(n, N)",
            "elias-fano": "log2 C(n, N)",
            "fuse8": "8 bits a key (ε = 2^-8)",
        },
        "runs": {},
    }

    def write() -> None:
        path.write_text(json.dumps(result, indent=2) + "\n")

    for method in args.methods.split(","):
        run_method(method.strip(), overrides, result, write)
    for method, entry in result["runs"].items():
        print(method, json.dumps({k: round(v["gap"], 5) for k, v in entry["gaps"].items()}))
    print(f"→ {path}")


if __name__ == "__main__":
    main()
