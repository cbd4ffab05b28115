"""Runners: the layer between the CLI and the round engine. ``run``, ``resume`` and ``compare``
dispatch a config to its runtime (local simulator, Flower simulation, Flower deployment) the same way.

Layers point down only: cli -> runners -> runtime (engine, transports) -> methods -> codecs;
report/ only reads results.json files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, FedsqueezeError
from fedsqueeze.runtime.checkpoint import Checkpoint
from fedsqueeze.runtime.support import check_runtime

log = logging.getLogger("fedsqueeze")

DEFAULT_SUPERLINK = "127.0.0.1:9093"


def run(
    cfg: RunConfig,
    show_progress: bool = True,
    superlink: str = DEFAULT_SUPERLINK,
    root_certificates: str | None = None,
    resume: Checkpoint | None = None,
    insecure: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` on its runtime (from the checkpoint ``resume`` if given); results.json's content.

    ``--runtime flower`` returns the results when the SuperLink runs on this machine; a run whose
    ServerApp wrote its results elsewhere is a FedsqueezeError saying where they are.
    """
    from fedsqueeze.methods import get_method
    from fedsqueeze.runtime.engine import check_out_free

    get_method(cfg.method)(cfg)  # the method and its options, checked before anything loads
    check_runtime(cfg)
    if cfg.runtime != "local" and importlib.util.find_spec("flwr") is None:
        raise FedsqueezeError(f"--runtime {cfg.runtime} needs Flower: pip install 'fedsqueeze[flower]'")
    if resume is None:
        check_out_free(cfg)  # here too: a Flower run would find out only once its ServerApp starts
    if cfg.runtime == "flower-sim":
        from fedsqueeze.runtime.flower import run_flower_sim

        return run_flower_sim(cfg, show_progress=show_progress, resume=resume)
    if cfg.runtime == "flower":
        from fedsqueeze.runtime.flower import run_flower

        results = run_flower(
            cfg,
            superlink=superlink,
            root_certificates=root_certificates,
            show_progress=show_progress,
            resume=resume is not None,
            insecure=insecure,
        )
        if results is None:
            raise FedsqueezeError(
                f"no results.json of this run in {cfg.out} here: the run failed (see the log above), "
                "or the SuperLink runs on another machine, which holds the results"
            )
        return results
    from fedsqueeze.runtime.local import run_local

    return run_local(cfg, show_progress=show_progress, resume=resume)


def resume(
    out_dir: str | Path,
    show_progress: bool = True,
    superlink: str = DEFAULT_SUPERLINK,
    root_certificates: str | None = None,
    insecure: bool = False,
) -> dict[str, Any]:
    """Continue the killed run in ``out_dir`` on the runtime it ran on, from its last checkpoint."""
    from fedsqueeze.runtime.engine import load_resume

    cfg, ckpt = load_resume(out_dir)
    return run(cfg, show_progress, superlink, root_certificates, resume=ckpt, insecure=insecure)


# ---- compare ---------------------------------------------------------------------------------------
def _rejection(base: RunConfig, method: str, options: dict[str, Any]) -> str | None:
    """None if ``method`` takes ``options`` (its constructor checks them, cheaply), else why not."""
    from fedsqueeze.methods import get_method

    try:
        get_method(method)(dataclasses.replace(base, method=method, options=options))
    except ConfigError as exc:
        return str(exc)
    return None


def split_options(options: dict[str, Any], methods: list[str], base: RunConfig | None = None) -> dict[str, dict[str, Any]]:
    """Route shared ``options`` to each method of a comparison.

    A plain key goes to every method that takes it: one its ``Options`` declare, or any other key
    its constructor accepts (codec options such as ``sz3_bound`` for a method that uses that codec).
    A key no compared method takes is an error, so a typo is never silently dropped.
    ``METHOD.key`` (``--set lora.rank=4``) or a TOML table ``[options.METHOD]`` goes to that method
    only and wins over a plain key.
    """
    from fedsqueeze.methods import get_method

    base = base or RunConfig()
    declared = {m: {f.name for f in fields(get_method(m).Options)} for m in methods}
    plain: dict[str, Any] = {}
    specific: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in options.items():
        if isinstance(value, dict):  # a TOML table [options.METHOD]
            prefix, own = key, value
        elif "." in key:  # --set METHOD.key=value
            prefix, name = key.split(".", 1)
            own = {name: value}
        else:
            plain[key] = value
            continue
        if prefix not in declared:
            raise ConfigError(f"option {key!r} names {prefix!r}, which is not one of the compared methods: {', '.join(methods)}")
        specific[prefix].update(own)
    routed = {m: {k: v for k, v in plain.items() if k in declared[m]} for m in methods}
    for key, value in plain.items():
        if any(key in declared[m] for m in methods):
            continue
        why = {m: _rejection(base, m, {**routed[m], key: value, **specific[m]}) for m in methods}
        for m in methods:
            if why[m] is None:
                routed[m][key] = value
        if all(why.values()):
            raise ConfigError(f"option {key!r} is taken by none of the compared methods: " + "; ".join(f"{m}: {w}" for m, w in why.items()))
    return {m: {**routed[m], **specific[m]} for m in methods}


def method_configs(base: RunConfig, methods: list[str], out_dir: str | Path) -> list[RunConfig]:
    """One config per method: the same task, partition and seed; output in ``out_dir/<method>``."""
    if not methods:
        raise ConfigError("--methods needs at least one method name")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {', '.join(methods)}")
    routed = split_options(base.options, methods, base)
    return [dataclasses.replace(base, method=m, out=str(Path(out_dir) / m), options=routed[m]).validate() for m in methods]


def run_compare(
    base: RunConfig,
    methods: list[str],
    out_dir: str | Path,
    target: float | None = None,
    show_progress: bool = True,
    command: str | None = None,
    superlink: str = DEFAULT_SUPERLINK,
    root_certificates: str | None = None,
    insecure: bool = False,
) -> dict[str, Any]:
    """Run every method on ``base``'s task and runtime, one after the other, then write the report and plots."""
    from rich.console import Console

    from fedsqueeze.methods import get_method
    from fedsqueeze.report.compare import write_report

    configs = method_configs(base, methods, out_dir)
    for cfg in configs:  # every method's options and runtime are checked before the first (long) run starts
        get_method(cfg.method)(cfg)
        check_runtime(cfg)
    console = Console(stderr=True)
    results, failed = [], []
    for i, cfg in enumerate(configs, 1):
        if show_progress:
            console.rule(f"compare: run {i}/{len(configs)}: {cfg.method} ({cfg.runtime})")
        try:
            # each run builds a fresh task: setup() changes the model (freezing, adapters)
            res = run(cfg, show_progress=show_progress, superlink=superlink, root_certificates=root_certificates, insecure=insecure)
        except Exception as exc:  # one failing method must not throw away the others' (long) runs
            log.error("compare: method %s failed: %s: %s", cfg.method, type(exc).__name__, exc)
            failed.append({"method": cfg.method, "error": f"{type(exc).__name__}: {exc}"})
            continue
        res["_path"] = str(Path(cfg.out) / "results.json")
        results.append(res)
    if not results:
        raise FedsqueezeError("compare: every method failed: " + "; ".join(f"{f['method']}: {f['error']}" for f in failed))
    return write_report(results, out_dir, target=target, command=command, failed=failed)
