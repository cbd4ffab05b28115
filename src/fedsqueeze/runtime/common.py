"""Pieces of the round engine: client sampling, the link model, round records, the run header."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from fedsqueeze.config import RunConfig
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.results import bpp
from fedsqueeze.runtime.faults import purpose
from fedsqueeze.seeding import SERVER, np_rng


def sample_clients(cfg: RunConfig, ctx: RoundContext, attempt: int = 0) -> list[int]:
    """The clients taking part in round ``ctx.round`` (seeded, sorted)."""
    chosen = ctx.rng(SERVER, purpose("sample", attempt)).choice(cfg.clients, size=cfg.clients_per_round, replace=False)
    return sorted(int(c) for c in chosen)


def client_link(cfg: RunConfig, client: int) -> tuple[float, float, float]:
    """``(uplink_mbps, downlink_mbps, latency_s)`` of one client under the link model.

    With ``link_spread`` = sigma > 0 both bandwidths are multiplied by one lognormal factor
    exp(sigma·N(0, 1)) drawn once per client (round 0, purpose "link"): a client's link is a
    property of the client, the same in every round, and the configured values are the medians.
    """
    factor = 1.0
    if cfg.link_spread > 0:
        factor = float(np.exp(cfg.link_spread * np_rng(cfg.seed, 0, client, "link").standard_normal()))
    return cfg.uplink_mbps * factor, cfg.downlink_mbps * factor, cfg.latency_ms / 1000.0


def transfer_s(nbytes: int, mbps: float) -> float:
    """Seconds to move ``nbytes`` over a link of ``mbps`` megabits (10^6 bits) per second."""
    return nbytes * 8 / (mbps * 1e6)


def simulated_round_time(cfg: RunConfig, clients: dict[int, tuple[float, int, int]]) -> dict[str, Any]:
    """The link model: the round's simulated wall clock, ``sim_time_s``.

    ``clients`` maps each client that replied to ``(compute_s, downlink_bytes, uplink_bytes)``.
    A client's time is its compute plus the transfer of its downlink and uplink bytes plus the
    latency; the round lasts as long as its slowest client (the server waits for every reply it
    will get; a client that dropped out is not waited for). No reply at all: 0 s.
    """
    per_client = []
    for client, (compute_s, down, up) in sorted(clients.items()):
        up_mbps, down_mbps, latency_s = client_link(cfg, client)
        time_s = compute_s + transfer_s(down, down_mbps) + transfer_s(up, up_mbps) + latency_s
        per_client.append({"client": client, "compute_s": compute_s, "downlink_bytes": down, "uplink_bytes": up, "time_s": time_s})
    slowest = max(per_client, key=lambda c: c["time_s"], default=None)
    return {
        "sim_time_s": slowest["time_s"] if slowest else 0.0,
        "sim_slowest_client": slowest["client"] if slowest else None,
        "sim_clients": per_client,
    }


def run_header(cfg: RunConfig, model_params: int, trainable_params: int, runtime: str) -> dict[str, Any]:
    """The fixed top of results.json."""
    import torch

    return {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "model_params": model_params,
        "trainable_params": trainable_params,
        "runtime": runtime,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }


def round_record(
    *,
    round_: int,
    accuracy: float,
    loss: float,
    uplink: list[int],
    downlink: list[int],
    model_params: int,
    aggregated: int,
    dropped: list[dict[str, Any]],
    wall_s: float,
    train_s: float,
    codec_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of results.json's ``rounds``; ``uplink``/``downlink`` are per-client byte counts."""
    return {
        "round": round_,
        "accuracy": accuracy,
        "loss": loss,
        "uplink_bytes": int(sum(uplink)),
        "downlink_bytes": int(sum(downlink)),
        "uplink_bpp": bpp(sum(uplink), len(uplink), model_params),
        "downlink_bpp": bpp(sum(downlink), len(downlink), model_params),
        "clients": len(downlink),
        "clients_uploaded": len(uplink),
        "clients_aggregated": aggregated,
        "dropped": dropped,
        "wall_s": wall_s,
        "train_s": train_s,
        "codec_s": codec_s,
        **(extra or {}),
    }
