"""Benchmark suites: declared grids of runs, filled (resumably) into the results store (:mod:`fedsqueeze.store`).

A suite (``benchmarks/suites/*.toml``) declares tasks × settings × methods × seeds; every entry is
a set of RunConfig overrides (base < task < setting < method < seed). ``fedsqueeze bench SUITE``
runs each entry not yet in the store and keeps its results.json, wrapped in a small record, at
``STORE/<key>.json``; ``--report-only`` rebuilds the report (and the README table) from the store
alone. docs/bench.md describes the suite and record formats and the key rule.

**The key** of an entry is a hash of its resolved config and the results epoch (``store.RESULTS_EPOCH``):
``sha256(epoch, run fields that differ from RunConfig's defaults, method options that differ from
the method's defaults)``. Fields at their default are left out so that a new option (added at a
default that changes nothing) does not invalidate every stored run; ``out``, ``overwrite`` and
``checkpoint`` never change a result and are left out too. The epoch is bumped by hand when a code
change moves results; each record also keeps the git commit and whether src/ was modified
("dirty"), and the report shows them, so runs made by different code are visible, never silent.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

from fedsqueeze.config import RunConfig, build_config
from fedsqueeze.errors import ConfigError, FedsqueezeError
from fedsqueeze.store import PRE_PIPELINE, RESULTS_EPOCH, Entry, Found, Suite, make_record, read_store, write_record

log = logging.getLogger("fedsqueeze")

NO_RESULT_FIELDS = ("out", "overwrite", "checkpoint")  # never change a run's numbers
SUITE_KEYS = {
    "name",
    "description",
    "reference",
    "seeds",
    "store",
    "report",
    "readme",
    "readme_table",
    "base",
    "tasks",
    "settings",
    "methods",
}


# ---- the suite -------------------------------------------------------------------------------------
def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key!r} must be a table, got {value!r}")
    return value


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: a seed is listed twice: {value!r}")
    return list(value)


def load_suite(path: str | Path) -> Suite:
    """Read a suite TOML file: ``name``, ``seeds``, ``[base]``, ``[tasks.NAME]``, ``[[settings]]``
    (``name``, ``methods``, optional ``seeds`` and ``[settings.set]``) and ``[methods.NAME]``.

    Every entry's config is built and checked (RunConfig rules and the method's options) here, so a
    typo fails before the first run starts.
    """
    from fedsqueeze.methods import get_method

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"suite file {str(p)!r} cannot be read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"suite file {str(p)!r} is not valid TOML: {exc}") from exc
    where = f"suite {str(p)!r}"
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; a suite takes {sorted(SUITE_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{where}: 'name' must be a non-empty string without '/'")
    seeds = _seeds(data.get("seeds"), where)
    base = _table(data, "base", where)
    tasks = _table(data, "tasks", where) or {"default": {}}
    per_method = _table(data, "methods", where)
    settings = data.get("settings") or [{"name": "default", "methods": [data.get("reference", "fedavg")]}]
    if not isinstance(settings, list):
        raise ConfigError(f"{where}: [[settings]] must be an array of tables")
    readme_table = data.get("readme_table")
    if readme_table is not None and (not isinstance(readme_table, list) or len(readme_table) != 2):
        raise ConfigError(f"{where}: readme_table must be [TASK, SETTING], got {readme_table!r}")
    suite = Suite(
        name=name,
        path=p,
        description=str(data.get("description", "")),
        reference=str(data.get("reference", "fedavg")),
        store=Path(data.get("store", f"results/{name}")),
        report=Path(data.get("report", f"runs/report/{name}")),
        readme=Path(data["readme"]) if data.get("readme") else None,
        readme_table=(str(readme_table[0]), str(readme_table[1])) if readme_table else None,
    )
    for setting in settings:
        sname = setting.get("name")
        methods = setting.get("methods")
        swhere = f"{where}, setting {sname!r}"
        if not isinstance(sname, str) or not sname or not isinstance(methods, list) or not methods:
            raise ConfigError(f"{where}: every [[settings]] needs a 'name' and a non-empty 'methods' list")
        extra = sorted(set(setting) - {"name", "methods", "seeds", "set"})
        if extra:
            raise ConfigError(f"{swhere}: unknown keys {extra}")
        for m in methods:
            get_method(m)  # an unknown method name fails here, with the list of known ones
        sseeds = _seeds(setting["seeds"], swhere) if "seeds" in setting else seeds
        for tname, tset in tasks.items():
            for seed in sseeds:
                for m in methods:
                    sets = {**base, **tset, **_table(setting, "set", swhere), **per_method.get(m, {}), "method": m, "seed": seed}
                    try:
                        cfg = build_config(None, None, sets)
                        get_method(m)(cfg)  # the method's options, checked
                    except ConfigError as exc:
                        raise ConfigError(f"{swhere}, task {tname!r}, method {m!r}: {exc}") from exc
                    suite.entries.append(Entry(tname, sname, m, seed, cfg))
    ids = [e.id for e in suite.entries]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: two entries have the same task/setting/method/seed")
    if suite.readme_table is not None and not any((e.task, e.setting) == suite.readme_table for e in suite.entries):
        raise ConfigError(f"{where}: readme_table {list(suite.readme_table)} names no task and setting of the suite")
    return suite


# ---- keys and code version -------------------------------------------------------------------------
def _not_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(values.items()) if k not in defaults or v != defaults[k]}


def config_identity(cfg: RunConfig) -> dict[str, Any]:
    """What a run's numbers depend on: run fields and method options that differ from their defaults."""
    from fedsqueeze.methods import get_method

    defaults = RunConfig().to_dict()
    run = _not_default({k: v for k, v in cfg.to_dict().items() if k not in NO_RESULT_FIELDS and k != "options"}, defaults)
    run["method"] = cfg.method  # always named, even when it is the default method
    method = get_method(cfg.method)(cfg)
    opts = dataclasses.asdict(method.opts) if dataclasses.is_dataclass(method.opts) and not isinstance(method.opts, type) else {}
    opt_defaults = {f.name: f.default for f in dataclasses.fields(method.Options) if f.default is not dataclasses.MISSING}
    options = _not_default(opts, opt_defaults)
    options.update({k: v for k, v in cfg.options.items() if k not in opts})  # codec options, as given
    return {"run": run, "options": options}


def run_key(cfg: RunConfig, epoch: int | str = RESULTS_EPOCH) -> str:
    """The store key of a run: 16 hex digits of sha256(epoch, :func:`config_identity`)."""
    text = json.dumps({"epoch": epoch, **config_identity(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """fedsqueeze's version, the git commit of its source tree, and whether src/ differs from it."""
    import fedsqueeze

    src = Path(fedsqueeze.__file__).resolve().parent
    info: dict[str, Any] = {"version": fedsqueeze.__version__, "commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return info  # not a git checkout (an installed package): the version alone
    if commit.returncode == 0 and status.returncode == 0:
        info["commit"] = commit.stdout.strip()
        info["dirty"] = bool(status.stdout.strip())
    return info


# ---- the store -------------------------------------------------------------------------------------
def match(entries: list[Entry], records: list[dict[str, Any]]) -> list[Found]:
    """For each entry, its current record, else the latest stale one with the same labels, else missing."""
    by_key = {r["key"]: r for r in records}
    found = []
    for e in entries:
        key = run_key(e.config)
        if key in by_key:
            found.append(Found(e, by_key[key], "current"))
            continue
        same = [r for r in records if r.get("entry") == e.labels()]
        if same:
            found.append(Found(e, max(same, key=lambda r: r.get("stored", "")), "stale"))
        else:
            found.append(Found(e, None, "missing"))
    return found


# ---- filling ---------------------------------------------------------------------------------------
def select(entries: list[Entry], only: list[str]) -> list[Entry]:
    """The entries whose id (``task/setting/method/sSEED``) matches one of the ``only`` globs (all if none)."""
    if not only:
        return entries
    chosen = [e for e in entries if any(fnmatch.fnmatchcase(e.id, pat) for pat in only)]
    if not chosen:
        raise ConfigError(f"--only {only} matches no entry; ids look like {entries[0].id!r}")
    return chosen


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / total) if total else width
    return "█" * filled + "·" * (width - filled)


def _run_entry(cfg: RunConfig, scratch: Path, show_progress: bool) -> dict[str, Any]:
    """Run ``cfg`` in ``scratch``: continue a killed run of the same config there, else start afresh."""
    from fedsqueeze import runners
    from fedsqueeze.runtime.engine import load_resume

    cfg = dataclasses.replace(cfg, out=str(scratch), overwrite=True)
    if (scratch / "config.toml").is_file():
        try:
            saved, _ = load_resume(scratch)
            if run_key(saved) == run_key(cfg):
                results_file = scratch / "results.json"
                if results_file.is_file():
                    res = json.loads(results_file.read_text())
                    if len(res.get("rounds", [])) == cfg.rounds:
                        return res  # it finished, but was not stored (killed in between)
                log.info("bench: continuing the killed run in %s", scratch)
                return runners.resume(scratch, show_progress=show_progress)
        except (ConfigError, OSError, json.JSONDecodeError) as exc:
            log.warning("bench: cannot continue the run in %s (%s); starting it again", scratch, exc)
    return runners.run(cfg, show_progress=show_progress)


def fill(
    suite: Suite,
    only: list[str] | None = None,
    scratch: Path = Path("runs/bench"),
    show_progress: bool = True,
    keep_going: bool = True,
) -> dict[str, Any]:
    """Run every selected entry that has no current record; store each as it finishes.

    A failing run is logged and skipped (``keep_going``), so one broken method does not stop a
    night's fill; the scratch run directory ``scratch/<suite>/<key>`` lets a killed run continue.
    """
    from rich.console import Console

    entries = select(suite.entries, only or [])
    store = suite.store
    have = {r["key"] for r in read_store(store)} if store.is_dir() else set()
    todo = [e for e in entries if run_key(e.config) not in have]
    console = Console(stderr=True)
    done = len(entries) - len(todo)
    failed: list[dict[str, str]] = []
    ran: list[str] = []
    code = code_version()
    if code["dirty"]:
        log.warning("bench: src/ has uncommitted changes; the runs are stored with dirty=true")
    started = time.monotonic()
    for i, e in enumerate(todo):
        eta = ""
        if ran:
            left = (time.monotonic() - started) / len(ran) * (len(todo) - i)
            eta = f", about {left / 60:.0f} min left"
        console.rule(f"bench {suite.name} {_bar(done, len(entries))} {done}/{len(entries)}{eta}: {e.id}")
        key = run_key(e.config)
        try:
            res = _run_entry(e.config, scratch / suite.name / key, show_progress)
        except Exception as exc:  # one failing entry must not throw away the rest of the fill
            if not keep_going:
                raise
            log.error("bench: %s failed: %s: %s", e.id, type(exc).__name__, exc)
            failed.append({"id": e.id, "error": f"{type(exc).__name__}: {exc}"})
            continue
        write_record(store, make_record(res, e.labels(), suite.name, key, RESULTS_EPOCH, code, "fedsqueeze bench"))
        done += 1
        ran.append(e.id)
    console.rule(f"bench {suite.name} {_bar(done, len(entries))} {done}/{len(entries)} stored")
    return {"ran": ran, "failed": failed, "skipped": len(entries) - len(todo), "total": len(entries)}


def import_run(suite: Suite, results_file: Path, entry_id: str, source: str) -> Path:
    """Store a results.json made before this pipeline, as entry ``task/setting/method/sSEED``.

    Its epoch is :data:`PRE_PIPELINE` and its code version unknown (commit and dirty are None);
    its recorded config is kept as it is. The record is stale for every entry, so the report marks it.
    """
    res = json.loads(results_file.read_text())
    matches = [e for e in suite.entries if e.id == entry_id]
    if not matches:
        raise ConfigError(f"suite {suite.name!r} has no entry {entry_id!r}")
    e = matches[0]
    if res.get("method") != e.method or res.get("config", {}).get("seed") != e.seed:
        raise FedsqueezeError(f"{results_file} is a {res.get('method')} run with seed {res.get('config', {}).get('seed')}, not {entry_id}")
    fields = set(RunConfig.field_names())
    recorded = {k: v for k, v in res["config"].items() if k in fields or k == "options"}
    cfg = build_config(None, None, {**{k: v for k, v in recorded.items() if k != "options"}, **recorded.get("options", {})})
    key = run_key(cfg, PRE_PIPELINE)
    code = {"version": None, "commit": None, "dirty": None}
    return write_record(suite.store, make_record(res, e.labels(), suite.name, key, PRE_PIPELINE, code, source))
