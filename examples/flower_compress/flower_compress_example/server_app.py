"""The ServerApp: FedAvg with centralized evaluation. fedsqueeze adds one thing: the wrapper."""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from fedsqueeze.flower_compression import CompressedStrategy
from flower_compress_example.task import evaluate, load_data, make_net


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    net = make_net()
    net.load_state_dict(arrays.to_torch_state_dict())
    accuracy, loss = evaluate(net, *load_data(-1, examples=1000))
    return MetricRecord({"accuracy": accuracy, "loss": loss})


def make_server_app(
    codec: str = "", codec_options: dict[str, Any] | None = None, rounds: int = 3, done: list | None = None, models: dict | None = None
) -> ServerApp:
    """The app's ServerApp; ``codec`` ("" = none) and ``rounds`` may also come from the run config.

    In-process callers (tests, benchmarks) may pass ``done``, which receives ``(Result, strategy)``
    at the end, and ``models``, which receives the global ArrayRecord of every round.
    """
    app = ServerApp()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if models is not None:
            models[server_round] = arrays
        return global_evaluate(server_round, arrays)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        name = str(context.run_config.get("codec", codec))
        options = json.loads(str(context.run_config.get("codec-options", json.dumps(codec_options or {}))))
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        if name:
            strategy = CompressedStrategy(strategy, name, **options)  # fedsqueeze: compressed uploads
        result: Result = strategy.start(
            grid,
            ArrayRecord(make_net().state_dict()),
            num_rounds=int(context.run_config.get("num-server-rounds", rounds)),
            train_config=ConfigRecord({}),
            evaluate_fn=evaluate_fn,
        )
        if done is not None:
            done.append((result, strategy))

    return app


app = make_server_app()
