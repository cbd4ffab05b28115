"""Reliability benchmark: kill a run with SIGKILL, resume it, compare with an uninterrupted run;
then a run where about 30% of clients fail every round. Writes benchmarks/results/reliability.json.

    PYTHONPATH=src python benchmarks/reliability.py                       # --model tiny, seconds
    PYTHONPATH=src python benchmarks/reliability.py --model minilm --method head --rounds 10 --kill-after 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK = {"wall_s", "train_s", "codec_s"}


def cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "fedsqueeze", "run", "--quiet", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def csv_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def strip(res: dict) -> dict:
    return {
        "rounds": [{k: v for k, v in r.items() if k not in CLOCK} for r in res["rounds"]],
        "final": {k: v for k, v in res["final"].items() if k != "wall_s"},
    }


def reason_kind(reason: str) -> str:
    for words, kind in (
        (("crashed",), "raised"),
        (("timeout", "hung"), "hung (timeout)"),
        (("bad payload", "garbage"), "garbage"),
        (("straggler",), "straggler"),
        (("dropout",), "dropout"),
    ):
        if any(w in reason for w in words):
            return kind
    return "other"


def run_to_end(args: list[str]) -> float:
    t0 = time.perf_counter()
    p = cli(args)
    _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(err[-3000:])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--method", default="fedavg")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--kill-after", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--client-timeout", type=float, default=10.0, help="seconds before a (hung) client is abandoned")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsqz-reliability-"))
    base = ["--method", a.method, "--model", a.model, "--rounds", str(a.rounds)]
    for s in a.sets:
        base += ["--set", s]

    ref_s = run_to_end([*base, "--out", str(work / "reference")])
    killed = work / "killed"
    t0 = time.perf_counter()
    p = cli([*base, "--out", str(killed)])
    while csv_rows(killed / "rounds.csv") < a.kill_after:
        if p.poll() is not None:
            raise SystemExit("the run ended before it could be killed")
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_s = time.perf_counter() - t0
    sys.path.insert(0, str(ROOT / "src"))
    from fedsqueeze.runtime.checkpoint import load_checkpoint

    killed_at = load_checkpoint(killed).round
    resume_s = run_to_end(["--resume", str(killed)])
    ref = json.loads((work / "reference" / "results.json").read_text())
    got = json.loads((killed / "results.json").read_text())

    faulty = [
        "--method",
        a.method,
        "--model",
        a.model,
        "--rounds",
        str(a.rounds),
        "--clients",
        "10",
        "--clients-per-round",
        "10",
        "--set",
        "fault_raise=0.1",
        "--set",
        "fault_hang=0.1",
        "--set",
        "fault_garbage=0.1",
        "--set",
        f"client_timeout={a.client_timeout:g}",
        "--set",
        "min_clients=2",
        "--set",
        "min_clients_policy=retry",
        *sum((["--set", s] for s in a.sets), []),
        "--set",
        "clients_per_round=10",
    ]
    fault_s = run_to_end([*faulty, "--out", str(work / "faulty")])
    fres = json.loads((work / "faulty" / "results.json").read_text())
    reasons: dict[str, int] = {}
    for r in fres["rounds"]:
        for d in r["dropped"]:
            reasons[reason_kind(d["reason"])] = reasons.get(reason_kind(d["reason"]), 0) + 1

    result = {
        "command": " ".join(base),
        "sets": a.sets,
        "resume": {
            "killed_after_round": killed_at,
            "identical_rounds_except_wall_clock": strip(ref) == strip(got),
            "final_accuracy_reference": ref["final"]["accuracy"],
            "final_accuracy_resumed": got["final"]["accuracy"],
            "reference_s": round(ref_s, 1),
            "killed_run_s": round(killed_s, 1),
            "resume_s": round(resume_s, 1),
            "checkpoint_bytes": (killed / "checkpoint").stat().st_size,
        },
        "faults_30pct": {
            "rounds_completed": len(fres["rounds"]),
            "client_rounds": sum(r["clients"] for r in fres["rounds"]),
            "dropped": sum(len(r["dropped"]) for r in fres["rounds"]),
            "dropped_by_reason": reasons,
            "attempts": [r["attempts"] for r in fres["rounds"]],
            "skipped": [r["skipped"] for r in fres["rounds"]],
            "final_accuracy": fres["final"]["accuracy"],
            "run_s": round(fault_s, 1),
        },
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
