"""The ClientApp: a standard Flower train handler. fedsqueeze adds one thing: the mod."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsqueeze.flower_compression import compression_mod
from flower_compress_example.task import load_data, make_net, train

app = ClientApp(mods=[compression_mod])  # fedsqueeze: compresses the train replies the server asks it to


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    net = make_net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]))
    steps = int(context.run_config.get("local-steps", 10))
    loss = train(net, x, y, steps=steps)
    reply = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"train_loss": loss, "num-examples": len(x)})})
    return Message(reply, reply_to=msg)
