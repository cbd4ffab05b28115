"""Upload bytes of the plain Flower app in examples/flower_compress with each fedsqueeze codec.

One train round per codec (two nodes, partitions 0 and 1, 10 SGD steps each, the same initial
model), played message by message through the app's ClientApp (with ``compression_mod``) and
``CompressedStrategy(FedAvg())`` exactly as Flower would call them, without Ray. Reports the bytes
the server received, the ratio against the ArrayRecords Flower would have sent, and the largest
difference between the aggregated model and the uncompressed run's. Writes
benchmarks/results/flower_compression.json. Usage: python benchmarks/flower_compression.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "flower_compression.json"
CODECS = [
    ("", {}),
    ("sz3", {"mode": "abs", "bound": 1e-3}),
    ("sz3", {"mode": "abs", "bound": 1e-4}),
    ("qsgd", {}),
    ("eden", {}),
    ("topk", {"k": 0.05}),
    ("fp16", {}),
]


def main() -> None:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "examples" / "flower_compress")]
    torch.set_num_threads(1)
    from flower_compress_example.client_app import app as client_app
    from flower_compress_example.task import make_net
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fedsqueeze.flower_compression import CompressedStrategy

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # as in a ServerApp process
    nodes = [11, 12]

    class Grid:
        def get_node_ids(self) -> list[int]:
            return nodes

    rows, plain = [], None
    for codec, options in CODECS:
        ctxs = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(), run_config={}) for i, n in enumerate(nodes)
        }
        strategy = FedAvg(fraction_evaluate=0.0)
        if codec:
            strategy = CompressedStrategy(strategy, codec, **options)
        init = ArrayRecord(make_net().state_dict())
        messages = list(strategy.configure_train(1, init, ConfigRecord({}), Grid()))
        replies = [client_app(m, ctxs[m.metadata.dst_node_id]) for m in messages]
        raw = sum(r.content.array_records["arrays"].count_bytes() for r in replies) if not codec else None
        arrays, metrics = strategy.aggregate_train(1, replies)
        model = {k: v.numpy() for k, v in arrays.items()}
        if not codec:
            plain = model
            rows.append({"codec": "none (Flower ArrayRecords)", "uplink_bytes": raw, "ratio": 1.0, "max_abs_diff_vs_uncompressed": 0.0})
            continue
        diff = max(float(np.abs(model[k].astype(np.float64) - plain[k]).max()) for k in plain)
        rows.append(
            {
                "codec": codec,
                "options": options,
                "uplink_bytes": int(metrics["fsq-uplink-bytes"]),
                "raw_bytes": int(metrics["fsq-uplink-raw-bytes"]),
                "ratio": round(float(metrics["fsq-uplink-ratio"]), 2),
                "max_abs_diff_vs_uncompressed": diff,
            }
        )
        print(rows[-1], flush=True)
    params = sum(a.size for a in plain.values())
    result = {
        "app": "examples/flower_compress (MLP 32-256-256-10, SGD lr 0.05, 10 steps, 256 examples per node)",
        "round": 1,
        "nodes": len(nodes),
        "params": int(params),
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
