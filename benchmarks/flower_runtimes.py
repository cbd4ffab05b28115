"""Wall time and peak memory of one small run on each runtime: local, flower-sim, flower (deployment).

The run: ``--method head --model tiny --rounds 2 --clients 2 --clients-per-round 2`` (other options at
their defaults). Each runtime runs through the CLI in a fresh process; for the deployment, a
SuperLink and two SuperNodes are started first (their start-up is timed apart). Memory is sampled
every 0.1 s over the whole process tree (Ray's daemons and actors, Flower's SuperLink, SuperNodes,
SuperExecs, ServerApp and ClientApp processes): ``peak_tree_rss_mb`` is the peak of the summed RSS
(shared pages counted once per process, so an upper bound), ``peak_process_rss_mb`` the largest
single process. Writes benchmarks/results/flower_runtimes.json. Usage:

    python benchmarks/flower_runtimes.py [--rounds 2] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "flower_runtimes.json"


class TreeSampler:
    """Peak summed RSS over the process trees under ``roots`` (sampled in a thread)."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.peak_tree = 0
        self.peak_proc = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        procs = []
        for pid in list(self.roots):
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        rss = []
        for p in procs:
            try:
                rss.append(p.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        if rss:
            self.peak_tree = max(self.peak_tree, sum(rss))
            self.peak_proc = max(self.peak_proc, max(rss))
            self.max_procs = max(self.max_procs, len(rss))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.1)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        return {
            "peak_tree_rss_mb": round(self.peak_tree / 2**20, 1),
            "peak_process_rss_mb": round(self.peak_proc / 2**20, 1),
            "max_processes": self.max_procs,
        }


def cli(args: argparse.Namespace, runtime: str, out: Path, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedsqueeze",
        "run",
        "--quiet",
        "--runtime",
        runtime,
        "--method",
        "head",
        "--model",
        "tiny",
        "--rounds",
        str(args.rounds),
        "--clients",
        str(args.clients),
        "--clients-per-round",
        str(args.clients),
        "--out",
        str(out),
        *(extra or []),
    ]


def timed_run(cmd: list[str], env: dict[str, str], extra_roots: list[int] | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TreeSampler([proc.pid, *(extra_roots or [])]) as sampler:
        _, stderr = proc.communicate(timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return {"wall_s": round(wall, 2), **sampler.report()}


def summary(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    return {
        "final_accuracy": res["final"]["accuracy"],
        "total_uplink_bytes": res["final"]["total_uplink_bytes"],
        "total_downlink_bytes": res["final"]["total_downlink_bytes"],
        "round_wall_s": [round(r["wall_s"], 2) for r in res["rounds"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from fedsqueeze.runtime.flower import flower_env
    from fedsqueeze.runtime.flower_deploy import Federation

    tmp = Path(tempfile.mkdtemp(prefix="fsq-bench-flower-"))
    env = flower_env(tmp / "home")
    results: dict = {"load_before": os.getloadavg()}
    for runtime in ("local", "flower-sim"):
        out = tmp / runtime
        results[runtime] = {**timed_run(cli(args, runtime, out), env), **summary(out)}
        print(runtime, results[runtime], flush=True)

    fed = Federation(nodes=args.clients, workdir=str(tmp / "federation"))
    t0 = time.perf_counter()
    try:
        fed.start()
        startup = time.perf_counter() - t0
        out = tmp / "flower"
        run = timed_run(
            cli(args, "flower", out, ["--superlink", fed.address, "--root-certificates", str(fed.root_certificates)]),
            env,
            [p.pid for p in fed.procs],
        )
    finally:
        fed.stop()
    results["flower"] = {**run, "federation_start_s": round(startup, 2), **summary(out)}
    print("flower", results["flower"], flush=True)

    results.update(
        {
            "run": f"fedsqueeze run --method head --model tiny --rounds {args.rounds} --clients {args.clients} "
            f"--clients-per-round {args.clients} (other options default)",
            "load_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "wall_s is the CLI process from start to exit; the machine was shared (see load averages)",
        }
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
