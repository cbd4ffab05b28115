"""Wall time and peak memory of one small run on each runtime: local, flower-sim, flower (deployment).

The run: ``--method head --model tiny --rounds 2 --clients 2 --clients-per-round 2`` (other options at
their defaults; ``--model minilm --rounds 3 --clients 3`` for the MiniLM comparison). Each runtime
runs through the CLI in a fresh process; for the deployment, a SuperLink and one SuperNode per
client are started first (their start-up is timed apart). ``flower`` keeps each node's prepared
task in a node worker (the default of ``fedsqueeze federation``); ``flower-noworker`` rebuilds it
for every message, as Flower's one-process-per-message ClientApp does by itself.
``deployment_vs_local`` compares the rounds after the first (round 1 starts the workers) as the
ratio of the mean round wall time, deployment over local, measured in this one run. Memory is sampled
every 0.1 s over the whole process tree (Ray's daemons and actors, Flower's SuperLink, SuperNodes,
SuperExecs, ServerApp and ClientApp processes): ``peak_tree_rss_mb`` is the peak of the summed RSS
(shared pages counted once per process, so an upper bound), ``peak_process_rss_mb`` the largest
single process. Writes benchmarks/results/flower_runtimes.json. Usage:

    python benchmarks/flower_runtimes.py [--rounds 2] [--clients 2] [--model tiny] [--method head] [--runtimes local,flower-sim,flower]
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
RESULTS = HERE / "results"


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
        args.method,
        "--model",
        args.model,
        "--rounds",
        str(args.rounds),
        "--clients",
        str(args.clients),
        "--clients-per-round",
        str(args.clients),
        "--out",
        str(out),
        "--set",
        f"threads={args.threads}",
        *(extra or []),
    ]


def timed_run(cmd: list[str], env: dict[str, str], extra_roots: list[int] | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TreeSampler([proc.pid, *(extra_roots or [])]) as sampler:
        _, stderr = proc.communicate(timeout=3600)
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


def mean_later_rounds(res: dict) -> float:
    later = res["round_wall_s"][1:] or res["round_wall_s"]
    return sum(later) / len(later)


def deploy(args: argparse.Namespace, tmp: Path, env: dict, name: str, worker_idle_s: float) -> dict:
    from fedsqueeze.runtime.flower_deploy import Federation

    fed = Federation(nodes=args.clients, workdir=str(tmp / f"federation-{name}"), worker_idle_s=worker_idle_s)
    t0 = time.perf_counter()
    out = tmp / name
    try:
        fed.start()
        startup = time.perf_counter() - t0
        run = timed_run(
            cli(args, "flower", out, ["--superlink", fed.address, "--root-certificates", str(fed.root_certificates)]),
            env,
            [p.pid for p in fed.procs],
        )
    finally:
        fed.stop()
    return {**run, "federation_start_s": round(startup, 2), **summary(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--method", default="head", help="the method every runtime runs (head: the cheapest client work)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--runtimes",
        default="local,flower-sim,flower",
        help="comma-separated, in order, repeats allowed: local, flower-sim, flower, flower-noworker",
    )
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from fedsqueeze.runtime.flower import flower_env

    tmp = Path(tempfile.mkdtemp(prefix="fsq-bench-flower-"))
    env = flower_env(tmp / "home")
    results: dict = {"load_before": os.getloadavg()}
    suffix = ("" if args.model == "tiny" else f"_{args.model}") + ("" if args.method == "head" else f"_{args.method}")
    out_path = RESULTS / f"flower_runtimes{suffix}.json"
    seen: dict[str, int] = {}
    for runtime in args.runtimes.split(","):
        seen[runtime] = seen.get(runtime, 0) + 1
        name = runtime if seen[runtime] == 1 else f"{runtime}-{seen[runtime]}"  # a runtime listed twice runs twice
        if runtime in ("local", "flower-sim"):
            out = tmp / name
            results[name] = {**timed_run(cli(args, runtime, out), env), **summary(out)}
        elif runtime in ("flower", "flower-noworker"):
            results[name] = deploy(args, tmp, env, runtime, 600.0 if runtime == "flower" else 0.0)
        else:
            raise SystemExit(f"unknown runtime {runtime!r}")
        results[name]["load_after"] = os.getloadavg()
        print(name, results[name], flush=True)
        write(out_path, args, results)  # after every runtime: a long benchmark cut short keeps what it measured
    write(out_path, args, results)
    print(f"wrote {out_path}")


def write(out_path: Path, args: argparse.Namespace, results: dict) -> None:
    locals_ = [mean_later_rounds(r) for name, r in results.items() if name.split("-")[0] == "local" and isinstance(r, dict)]
    if locals_:
        # the local baseline averages every local run: `--runtimes local,flower,local` brackets the deployment, so a
        # load that drifts over the benchmark weighs on both sides
        base = sum(locals_) / len(locals_)
        results["deployment_vs_local"] = {
            name: round(mean_later_rounds(r) / base, 2)
            for name, r in results.items()
            if name.split("-")[0] == "flower" and isinstance(r, dict) and "round_wall_s" in r
        }
    results.update(
        {
            "run": f"fedsqueeze run --method {args.method} --model {args.model} --rounds {args.rounds} --clients {args.clients} "
            f"--clients-per-round {args.clients} --set threads={args.threads} (other options default)",
            "load_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "wall_s is the CLI process from start to exit; round_wall_s is results.json's per-round wall time; "
            "deployment_vs_local is the mean wall time of rounds 2.. over local's; the machine was shared (see load averages)",
        }
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
