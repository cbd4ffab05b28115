import json

from handmade import assert_accuracy_is_real

from fedsqueeze.runtime import run_local

CONTRACT_ROUND = {
    "round",
    "accuracy",
    "loss",
    "uplink_bytes",
    "downlink_bytes",
    "uplink_bpp",
    "downlink_bpp",
    "clients",
    "wall_s",
    "train_s",
    "codec_s",
}
CONTRACT_FINAL = {"accuracy", "total_uplink_bytes", "total_downlink_bytes", "mean_uplink_bpp", "mean_downlink_bpp"}


def test_fedavg_contract_and_32_bpp(tiny_cfg):
    cfg = tiny_cfg(method="fedavg")
    res = run_local(cfg, show_progress=False)
    saved = json.loads((__import__("pathlib").Path(cfg.out) / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert {"method", "config", "model_params", "trainable_params", "rounds", "final"} <= set(res)
    assert res["trainable_params"] == res["model_params"]
    for r in res["rounds"]:
        assert CONTRACT_ROUND <= set(r)
        assert r["clients"] == 2
        # 32 bits per parameter plus a small header, nothing more
        assert 32.0 < r["uplink_bpp"] < 32.2 and 32.0 < r["downlink_bpp"] < 32.2
        assert r["uplink_bytes"] * 8 / (2 * res["model_params"]) == r["uplink_bpp"]
    assert CONTRACT_FINAL <= set(res["final"])
    rows = (__import__("pathlib").Path(cfg.out) / "rounds.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + cfg.rounds


def test_head_sends_only_the_head(tiny_cfg):
    cfg = tiny_cfg(method="head", rounds=3)
    res = run_local(cfg, show_progress=False)
    head = res["trainable_params"]
    assert head == 32 * 26 + 26
    for r in res["rounds"]:
        exact = 32 * head / res["model_params"]
        assert exact < r["uplink_bpp"] < exact * 1.2  # header: names, dtypes, shapes, checksum
    assert res["final"]["accuracy"] > 1 / 26


def test_same_seed_same_results(tiny_cfg):
    a = run_local(tiny_cfg(method="fedavg"), show_progress=False)
    b = run_local(tiny_cfg(method="fedavg"), show_progress=False)
    strip = lambda res: [(r["accuracy"], r["loss"], r["uplink_bytes"]) for r in res["rounds"]]
    assert strip(a) == strip(b)
    c = run_local(tiny_cfg(method="fedavg", seed=1), show_progress=False)
    assert strip(a) != strip(c)


def test_corrupt_and_truncated_payloads_drop_the_client(tiny_cfg):
    cfg = tiny_cfg(method="head", rounds=4, clients=6, clients_per_round=3, fault_corrupt=0.3, fault_truncate=0.3)
    res = run_local(cfg, show_progress=False)
    assert len(res["rounds"]) == 4
    reasons = [d["reason"] for r in res["rounds"] for d in r["dropped"]]
    assert any("corrupted" in x for x in reasons) and any("truncated" in x for x in reasons)
    for r in res["rounds"]:
        assert r["clients_aggregated"] == r["clients_uploaded"] - len(r["dropped"])
    assert_accuracy_is_real(cfg, res)


def test_dropout_clients_do_not_upload(tiny_cfg):
    res = run_local(tiny_cfg(method="head", rounds=4, clients=8, clients_per_round=4, dropout=0.5), show_progress=False)
    dropped = sum(len(r["dropped"]) for r in res["rounds"])
    assert dropped > 0
    for r in res["rounds"]:
        assert r["clients_uploaded"] == r["clients"] - len(r["dropped"])
