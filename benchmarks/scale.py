"""Scale benchmark: what one simulator machine must hold at d = 1e8 and d = 1.3e9 parameters (OPT-1.3B).

On synthetic updates and masks, per row: time, peak RSS (sampled every 20 ms) and bytes, for
- the codecs sz3 (fedsz's default: REL 2e-2, nopred), qsgd, eden and topk (encode and decode);
- server aggregation of K client updates (FedAvg's weighted mean, the project's robust-rule code);
- FedAvg's server path (``server:fedavg``): K clients' raw float32 payloads, each decoded by the
  method's own ``decode_update`` (every check, finite, views into the payload), then its
  ``aggregate`` (the mean rule and the server step on the state's weights);
- the round engine's real server path for one FedAvg round (``engine:fedavg``), unchunked: K
  clients' raw uploads of all d values, each folded into the round's running sum as it arrives
  (the engine's streamed aggregation), with the integrity guard and the server step;
- the mask methods deltamask and fedpm in both directions: K clients code their masks (uplink),
  the server decodes them and aggregates (its rebuild and Beta rule), then codes θ (downlink) and
  a client decodes it.

Work is streamed in chunks of ``--chunk`` values (1e8 by default, about the size of the largest
tensor of a 1.3B-parameter model): a codec row encodes one payload per chunk (as one payload per
tensor group); the aggregation, server and mask rows run the project's code on one chunk of
coordinates at a time (the rules are coordinate-wise; a method is instantiated over a chunk-sized
layout, as a server aggregating one tensor group at a time would hold it). So peak memory is that of one chunk, and time and bytes add up over chunks. A row is
abandoned (``aborted``) as soon as RSS passes ``--max-rss-gb``.

The JSON also gives the slope of time against d for every row measured at two sizes, and the
server state the mask methods keep per parameter.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/scale.py --d 1e8          # ~ minutes
    OMP_NUM_THREADS=1 PYTHONPATH=src /work/bin/measure python benchmarks/scale.py --d 1e8 1.3e9

Writes benchmarks/results/scale.json (the rows a run does not measure, at any d, are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, get_codec  # noqa: E402

CODECS = [
    ("sz3", {"bound": 2e-2, "name_filter": "weight", "algo": "nopred"}),
    ("qsgd", {}),
    ("eden", {}),
    ("topk", {}),
]
MASK_METHODS = ("deltamask", "fedpm")
GIB = 1 << 30


class Aborted(RuntimeError):
    pass


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` since the last ``reset``; ``check`` raises past a limit."""

    def __init__(self, limit_bytes: int) -> None:
        self.proc = psutil.Process()
        self.limit = limit_bytes
        self.peak = 0
        self.over = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            rss = self.proc.memory_info().rss
            self.peak = max(self.peak, rss)
            self.over = self.over or rss > self.limit

    def reset(self) -> None:
        self.peak, self.over = self.proc.memory_info().rss, False

    def check(self) -> None:
        if self.over:
            raise Aborted(f"RSS passed {self.limit / GIB:.1f} GiB")

    def stop(self) -> None:
        self._stop.set()


def chunks(d: int, chunk: int) -> list[int]:
    return [min(chunk, d - start) for start in range(0, d, chunk)]


def update_chunk(size: int, seed: int) -> np.ndarray:
    """A synthetic update: Gaussian, scale 1e-3 (a fine-tuning step's order of magnitude), float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size, dtype=np.float32)
    x *= np.float32(1e-3)  # in place: the same float32 products, no second array
    return x


def codec_row(codec_id: str, options: dict, sizes: list[int], rss: PeakRSS) -> dict[str, Any]:
    codec = get_codec(codec_id, **options)
    enc_s = dec_s = 0.0
    nbytes = 0
    for i, size in enumerate(sizes):
        x = update_chunk(size, i)
        t0 = time.perf_counter()
        payload = encode_tensors(codec, {"layer.weight": x}, CodecContext(seed=i))
        t1 = time.perf_counter()
        out, _ = decode_tensors(payload, CodecContext(seed=i, max_elements=size), codec=codec)
        dec_s += time.perf_counter() - t1
        enc_s += t1 - t0
        nbytes += len(payload)
        assert out["layer.weight"].shape == x.shape
        del x, out, payload
        rss.check()
    return {"encode_s": enc_s, "decode_s": dec_s, "time_s": enc_s + dec_s, "bytes": nbytes}


def aggregate_row(sizes: list[int], clients: int, rss: PeakRSS) -> dict[str, Any]:
    from fedsqueeze.methods.robust import RobustRule

    rule = RobustRule("mean")
    agg_s = 0.0
    for i, size in enumerate(sizes):
        deltas = [{"w": update_chunk(size, 1000 * i + k)} for k in range(clients)]
        t0 = time.perf_counter()
        combined, _ = rule.combine(deltas, [100 + k for k in range(clients)])
        agg_s += time.perf_counter() - t0
        assert combined["w"].shape == (size,)
        del deltas, combined
        rss.check()
    return {"time_s": agg_s, "clients": clients, "bytes": 0}


def tensor_method_over(name: str, size: int, clients: int, parts: list[int] | None = None):
    """The tensor method ``name`` set up over a model of one ``size``-value weight (zeros) and a
    2-class head; with ``parts``, one weight of each of those sizes instead (a model's tensors)."""
    import torch
    from torch import nn

    from fedsqueeze.config import RunConfig
    from fedsqueeze.methods import get_method
    from fedsqueeze.models import Classifier

    backbone = nn.Sequential(*(nn.Linear(part, 1, bias=False, device="meta") for part in (parts or [size])))
    model = Classifier(backbone, 1, 2, "text").to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    task = SimpleNamespace(model=model, client_sizes=lambda: [100] * clients)
    method = get_method(name)(RunConfig(method=name, clients=clients, clients_per_round=clients, model="tiny"))
    method.setup(task)
    return method


def server_row(name: str, sizes: list[int], clients: int, rss: PeakRSS) -> dict[str, Any]:
    """The tensor method's own server path per chunk: K clients' raw payloads, each decoded by
    ``decode_update`` (checked, finite, views into the payload), then ``aggregate`` (the mean rule
    and the server step on the state's weights), as a server would for one tensor group."""
    from fedsqueeze.methods.base import RoundContext

    t = {"client_encode_s": 0.0, "server_decode_s": 0.0, "aggregate_s": 0.0}
    up = 0
    for i, size in enumerate(sizes):
        method = tensor_method_over(name, size, clients)
        state = method.init_server()
        ctx = RoundContext(round=1, rounds=10, seed=i, participants=tuple(range(clients)))
        updates = {}
        for client in range(clients):
            delta = {n: update_chunk(math.prod(s), 1000 * i + client).reshape(s) for n, s in method.shapes.items()}
            t0 = time.perf_counter()
            payload = encode_tensors(method.up_codec, delta, CodecContext(seed=client), n=100)
            del delta
            t1 = time.perf_counter()
            updates[client] = method.decode_update(payload, client, state, ctx)
            t["server_decode_s"] += time.perf_counter() - t1
            t["client_encode_s"] += t1 - t0
            up += len(payload)
            del payload  # the decoded update's arrays are views into it
            rss.check()
        t0 = time.perf_counter()
        state, _ = method.aggregate(state, updates, ctx)
        t["aggregate_s"] += time.perf_counter() - t0
        assert all(np.isfinite(w).all() for w in state["weights"].values())
        del method, state, updates
        rss.check()
    return {**t, "time_s": t["server_decode_s"] + t["aggregate_s"], "clients": clients, "bytes": up // clients}


def engine_row(name: str, d: int, clients: int, rss: PeakRSS, tensor: int) -> dict[str, Any]:
    """One real round of the round engine at ``d`` parameters, unchunked: ``clients`` raw float32
    uploads of a model of d values in tensors of at most ``tensor`` values (OPT-1.3B's largest,
    its token embedding, is 1.03e8) and the head, each made when the engine asks for its reply,
    then validated, decoded, checked by the integrity guard's single-client trial and folded into
    the round's float64 sum by the engine's streamed path (``Engine.play_round``), and the server
    step. ``server_peak_rss_gib`` is the peak outside the synthetic clients' encoding (what the
    server holds, its broadcast message included); the row's ``peak_rss_gib`` also counts a
    client's update and payload while it is made."""
    import torch

    from fedsqueeze.methods.base import RoundContext
    from fedsqueeze.runtime.engine import ClientReply, Engine, Transport

    method = tensor_method_over(name, d, clients, chunks(d, tensor))
    state = method.init_server()
    for p in method.params:  # the server's state holds the weights; the model itself only evaluates (not measured)
        p.data = torch.empty(0)
    method.evaluate = lambda state: (0.0, 0.0)
    task = SimpleNamespace(model=method.task.model, model_params=d + 4, zero_shot=None)
    t = {"client_encode_s": 0.0}
    peaks = {"server": 0, "all": 0}
    up = 0

    class Clients(Transport):
        """Synthetic clients whose uploads are made one at a time, as the engine takes each reply."""

        def exchange(self, calls):  # the engine takes replies(), one at a time
            raise NotImplementedError

        def replies(self, calls):
            nonlocal up
            for call in calls:
                peaks["server"] = max(peaks["server"], rss.peak)  # the server's work since the last client
                t0 = time.perf_counter()
                delta = {n: update_chunk(math.prod(s), 1000 * call.client + k).reshape(s) for k, (n, s) in enumerate(method.shapes.items())}
                payload = encode_tensors(method.up_codec, delta, CodecContext(seed=call.client), n=100)
                del delta
                t["client_encode_s"] += time.perf_counter() - t0
                up += len(payload)
                rss.check()
                peaks["all"] = max(peaks["all"], rss.peak)
                rss.reset()
                yield call, ClientReply(payload=payload)
                del payload  # the engine has folded it in

    engine = Engine(method.cfg, method, task, Clients(), runtime="bench", show_progress=False)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    state, record = engine.play_round(state, RoundContext(round=1, rounds=10, seed=0))
    round_s = time.perf_counter() - t0
    peaks["server"] = max(peaks["server"], rss.peak)
    peaks["all"] = max(peaks["all"], rss.peak)
    assert record["clients_aggregated"] == clients and not record["dropped"], record
    assert all(np.isfinite(w).all() for w in state["weights"].values())
    rss.check()
    server_s = round_s - t["client_encode_s"]
    return {
        **t,
        "server_s": server_s,
        "time_s": server_s,
        "clients": clients,
        "bytes": up // clients,
        "server_peak_rss_gib": peaks["server"] / GIB,
        "server_bytes_per_param": peaks["server"] / d,
        "all_peak_rss_gib": peaks["all"] / GIB,
    }


def mask_method_over(name: str, size: int, clients: int):
    """The mask method ``name`` set up over a layout of exactly ``size`` masked weights (no real model)."""
    from torch import nn

    from fedsqueeze.config import RunConfig
    from fedsqueeze.methods import get_method
    from fedsqueeze.models import Classifier

    backbone = nn.Sequential(nn.Linear(size, 1, bias=False, device="meta"))  # shapes only: nothing allocated or run
    model = Classifier(backbone, 1, 2, "text")
    task = SimpleNamespace(model=model, client_sizes=lambda: [100] * clients)
    method = get_method(name)(RunConfig(method=name, clients=clients, clients_per_round=clients, model="tiny"))
    method.setup(task)
    return method


def mask_row(name: str, sizes: list[int], clients: int, rss: PeakRSS) -> dict[str, Any]:
    from fedsqueeze.methods.base import RoundContext

    t = {"client_encode_s": 0.0, "server_decode_s": 0.0, "aggregate_s": 0.0, "downlink_encode_s": 0.0, "downlink_decode_s": 0.0}
    up = down = 0
    state_bytes = 0
    for i, size in enumerate(sizes):
        method = mask_method_over(name, size, clients)
        state = method.init_server()
        ctx = RoundContext(round=1, rounds=10, seed=i, participants=tuple(range(clients)))
        message = method.downlink(state, ctx, 0)
        sym, levels, head, _ = method.decode_downlink(message)
        theta_start = method.start_theta(method.theta_of(sym, levels))
        updates = {}
        for client in range(clients):
            rng = np.random.default_rng(10_000 * i + client)
            moved = rng.random(size, dtype=np.float32) < 0.02  # 2% of the probabilities moved by training
            theta_client = np.where(moved, np.clip(theta_start - 0.5, 0.0, 1.0), theta_start).astype(np.float32)
            del moved
            t0 = time.perf_counter()
            u = method.uniforms(ctx, client, None)
            meta, body, _ = method.encode_mask(u, theta_client, theta_start, sym, levels, ctx)
            payload = method.wire.encode_uplink(method.uplink_kind, 100, meta, body, {n: np.zeros_like(v) for n, v in head.items()})
            t1 = time.perf_counter()
            updates[client] = method.decode_update(payload, client, state, ctx)
            t["server_decode_s"] += time.perf_counter() - t1
            t["client_encode_s"] += t1 - t0
            up += len(payload)
            del u, theta_client, payload
            rss.check()
        t0 = time.perf_counter()
        state, _ = method.aggregate(state, updates, ctx)
        t["aggregate_s"] += time.perf_counter() - t0
        state_bytes += sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))
        ctx2 = RoundContext(round=2, rounds=10, seed=i, participants=tuple(range(clients)))
        t0 = time.perf_counter()
        message = method.downlink(state, ctx2, 0)
        t1 = time.perf_counter()
        method.decode_downlink(message)
        t["downlink_decode_s"] += time.perf_counter() - t1
        t["downlink_encode_s"] += t1 - t0
        down += len(message)
        del method, state, updates, message, theta_start
        rss.check()
    return {
        **t,
        "time_s": sum(t.values()),
        "clients": clients,
        "bytes": up // clients,  # one client's uplink (summed over chunks), as a codec row's payload
        "uplink_bytes_all_clients": up,
        "downlink_bytes": down,
        "server_state_bytes": state_bytes,
        "server_state_bytes_per_param": state_bytes / sum(sizes),
    }


def slopes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row name, seconds per 1e9 parameters between its smallest and largest d (linear time: constant)."""
    out: dict[str, Any] = {}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_name.setdefault(r["row"], []).append(r)
    for name, rs in by_name.items():
        if len({r["d"] for r in rs}) < 2:
            continue
        lo, hi = min(rs, key=lambda r: r["d"]), max(rs, key=lambda r: r["d"])
        out[name] = {
            "s_per_1e9_params": (hi["time_s"] - lo["time_s"]) / (hi["d"] - lo["d"]) * 1e9,
            "time_ratio": hi["time_s"] / lo["time_s"] if lo["time_s"] > 0 else None,
            "d_ratio": hi["d"] / lo["d"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=float, nargs="+", default=[1e8], help="parameter counts")
    parser.add_argument("--chunk", type=float, default=1e8, help="values per chunk")
    parser.add_argument("--clients", type=int, default=5, help="clients per round (aggregation, mask rows)")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="abandon a row past this RSS (GiB)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (e.g. codec:sz3 aggregate:fedavg mask:deltamask)")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    args = parser.parse_args()
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    ds = [int(d) for d in args.d]
    rss = PeakRSS(int(args.max_rss_gb * GIB))
    plan: list[tuple[str, Any]] = [(f"codec:{cid}", (cid, opts)) for cid, opts in CODECS]
    plan += [("aggregate:fedavg", None), ("server:fedavg", "fedavg"), ("engine:fedavg", "fedavg")] + [
        (f"mask:{m}", m) for m in MASK_METHODS
    ]
    if args.rows:
        plan = [p for p in plan if p[0] in args.rows]
    planned = {name for name, _ in plan}
    rows = [r for r in old.get("rows", []) if not (r["d"] in ds and r["row"] in planned)]  # every other row is kept
    for d in ds:
        sizes = chunks(d, int(args.chunk))
        for name, spec in plan:
            rss.reset()
            t0 = time.perf_counter()
            row: dict[str, Any] = {"row": name, "d": d, "chunks": len(sizes), "chunk": int(args.chunk)}
            try:
                if name.startswith("codec:"):
                    row.update(codec_row(spec[0], spec[1], sizes, rss))
                elif name.startswith("aggregate:"):
                    row.update(aggregate_row(sizes, args.clients, rss))
                elif name.startswith("server:"):
                    row.update(server_row(spec, sizes, args.clients, rss))
                elif name.startswith("engine:"):
                    row.update(engine_row(spec, d, args.clients, rss, int(args.chunk)))
                    row["chunks"], row["tensors"] = 1, len(sizes)  # one real round of len(sizes) tensors: nothing chunked
                else:
                    row.update(mask_row(spec, sizes, args.clients, rss))
                row["status"] = "ok"
            except Aborted as exc:
                row["status"] = f"aborted: {exc}"
            row["wall_s"] = time.perf_counter() - t0
            row["peak_rss_gib"] = row.pop("all_peak_rss_gib", rss.peak / GIB)  # engine rows reset the sampler per client
            if "bytes" in row and row["bytes"]:
                row["bits_per_param"] = 8 * row["bytes"] / d
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"rows": rows}, indent=1))
    rss.stop()
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "mem_gib": psutil.virtual_memory().total / GIB},
        "rows": sorted(rows, key=lambda r: (r["row"], r["d"])),
        "slopes": slopes(rows),
        "note": "chunked: peak RSS is one chunk's; time and bytes are summed over chunks (see the module docstring)",
    }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["slopes"], indent=1))
    assert math.isfinite(sum(r.get("time_s", 0.0) for r in rows))


if __name__ == "__main__":
    main()
