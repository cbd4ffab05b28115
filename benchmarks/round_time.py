"""Round-time breakdown (train / codec / everything else) and peak memory for 10 and 100 clients.

Each configuration runs in its own process so its peak RSS is its own. Writes
benchmarks/results/round_time.json. Usage:

    python benchmarks/round_time.py [--model minilm] [--method fedavg] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "round_time.json"


def child(args: argparse.Namespace) -> None:
    from fedsqueeze.config import RunConfig
    from fedsqueeze.runtime import run_local

    cfg = RunConfig(
        method=args.method, model=args.model, clients=args.clients, clients_per_round=5, rounds=args.rounds, out=args.out
    ).validate()
    res = run_local(cfg, show_progress=False)
    rounds = res["rounds"]
    n = len(rounds)
    mean = lambda key: sum(r[key] for r in rounds) / n
    wall, train, codec = mean("wall_s"), mean("train_s"), mean("codec_s")
    print(
        json.dumps(
            {
                "method": args.method,
                "model": args.model,
                "clients": args.clients,
                "clients_per_round": 5,
                "rounds": n,
                "model_params": res["model_params"],
                "round_wall_s": wall,
                "round_train_s": train,
                "round_codec_s": codec,
                "round_other_s": wall - train - codec,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "final_accuracy": res["final"]["accuracy"],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--method", default="fedavg")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clients:
        child(args)
        return
    rows = []
    for n_clients in (10, 100):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--method",
                args.method,
                "--rounds",
                str(args.rounds),
                "--clients",
                str(n_clients),
                "--out",
                tmp,
            ]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent / "src")}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "runs": rows}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
