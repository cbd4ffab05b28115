"""The ``fedsqueeze`` command line."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import Field
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, FedsqueezeError
from fedsqueeze.options import describe_values, kind_of, option_fields

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning at a tiny communication cost.")
err = Console(stderr=True)

RUN_PANEL = "Run options (also settable in --config or with --set)"


def _flag(f: Field, help_: str | None) -> inspect.Parameter:
    """The typer option for run option ``f``: unset (None) unless given, so a TOML file's value stands."""
    values = describe_values(f)
    text = (help_ or f.metadata["help"]) + (f" ({values})" if values else "") + f" (default: {f.default!r})"
    default = typer.Option(None, help=escape(text), show_default=False, rich_help_panel=RUN_PANEL)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Optional[kind_of(f)])


def run_flags(exclude: tuple[str, ...] = (), help: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Give a command taking ``**flags`` one CLI flag per RunConfig option (from its metadata).

    The command receives every option in ``flags``, None where the flag was not given.
    """

    def add(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        generated = [_flag(f, (help or {}).get(f.name)) for f in option_fields(RunConfig) if f.name not in exclude]
        fn.__signature__ = inspect.Signature(own + generated)  # type: ignore[attr-defined]  # typer reads the flags from this
        return fn

    return add


@app.command()
@run_flags(help={"method": "method name (see `fedsqueeze methods`)"})
def run(
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with any run field and an \\[options] table"),
    set_: list[str] = typer.Option([], "--set", help="key=value for run, method or codec options (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or tables"),
    superlink: str = typer.Option("127.0.0.1:9093", help="--runtime flower: the SuperLink's address host:port"),
    root_certificates: Optional[str] = typer.Option(
        None, help="--runtime flower: CA certificate (ca.crt) of the SuperLink; a run without it is refused unless --insecure"
    ),
    insecure: bool = typer.Option(False, "--insecure", help="--runtime flower: connect without TLS (plain text; warns)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue the killed run in this output directory (uses its saved config)"),
    **flags: Any,
) -> None:
    """Run one federated fine-tuning job; writes OUT/results.json and OUT/rounds.csv."""
    from fedsqueeze import runners
    from fedsqueeze.config import build_config, parse_sets

    cli = flags
    if resume is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in cli.items() if v is not None]
        given += ["--config"] * (config is not None) + ["--set"] * bool(set_)
        if given:
            raise ConfigError(f"--resume takes every setting from the run's saved config.toml; drop {', '.join(given)}")
        results = runners.resume(
            resume, show_progress=not quiet, superlink=superlink, root_certificates=root_certificates, insecure=insecure
        )
        _print_final(results, resume)
        return
    cfg = build_config(config, cli, parse_sets(set_), dataset_for_model=_default_dataset)
    results = runners.run(cfg, show_progress=not quiet, superlink=superlink, root_certificates=root_certificates, insecure=insecure)
    _print_final(results, cfg.out)


def _default_dataset(model: str) -> str:
    """An image model given no dataset takes Fashion-MNIST (the catalogue decides; imported lazily: torch)."""
    from fedsqueeze.models.catalogue import default_dataset

    return default_dataset(model)


def _print_final(results: dict, out: str) -> None:
    final = results["final"]
    if final["accuracy"] is None:
        return
    err.print(
        f"final accuracy {final['accuracy']:.4f}  uplink {final['total_uplink_bytes']:,} B "
        f"({final['mean_uplink_bpp']:.4g} bpp)  downlink {final['total_downlink_bytes']:,} B "
        f"({final['mean_downlink_bpp']:.4g} bpp)  → {out}/results.json"
    )


@app.command()
def federation(
    nodes: int = typer.Option(2, help="SuperNodes to start; node i holds partition-id i (use --clients N)"),
    host: str = typer.Option("127.0.0.1", help="address the SuperLink listens on (0.0.0.0 for other machines)"),
    port: int = typer.Option(9093, help="the SuperLink's port (Fleet, Control and Runtime APIs)"),
    tls_dir: Optional[str] = typer.Option(
        None, help="directory with ca.crt, server.pem, server.key (scripts/make_certs.sh); default: made in WORKDIR/certs"
    ),
    tls_name: list[str] = typer.Option([], "--tls-name", help="extra host name or IP for a generated certificate (repeatable)"),
    workdir: Optional[str] = typer.Option(None, help="where logs, private FLWR_HOMEs, certificates and node keys go (default: a temp dir)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS and no SuperNode authentication: any process may join (warns)"),
    open_control: bool = typer.Option(
        False, "--open-control", help="let any client that reaches the port submit runs (default: loopback only)"
    ),
    register: list[str] = typer.Option(
        [], "--register", help="public key file (OpenSSH, EC) of a SuperNode on another machine to admit (repeatable)"
    ),
) -> None:
    """Start a Flower SuperLink and N SuperNodes on this machine; Ctrl-C stops them all.

    Secure by default: TLS (certificates made in WORKDIR/certs unless --tls-dir), SuperNode
    authentication (one registered key per node: no other node can join), and job submission
    from this machine only.
    """
    import signal
    import time
    import warnings

    from fedsqueeze.runtime.flower_deploy import Federation, TLSFiles

    def interrupt(signum, frame):  # SIGTERM/SIGHUP stop the processes too, not only Ctrl-C
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    if insecure and tls_dir:
        raise ConfigError("--insecure and --tls-dir: choose one")
    tls = TLSFiles.from_dir(tls_dir) if tls_dir else None
    fed = Federation(
        nodes=nodes,
        host=host,
        port=port,
        tls=tls,
        workdir=workdir,
        insecure=insecure,
        tls_names=tuple(tls_name),
        open_control=open_control,
        public_keys=tuple(register),
    )
    if insecure:
        err.print("[yellow]warning:[/yellow] --insecure: no TLS, no SuperNode authentication; anyone who reaches the port can join")
    if open_control:
        err.print("[yellow]warning:[/yellow] --open-control: anyone who reaches the port can submit a run (code runs on this machine)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed above, as one line
        fed.start()
    try:
        mode = "insecure" if insecure else f"TLS, CA {fed.root_certificates}, SuperNode authentication"
        err.print(escape(f"SuperLink on {host}:{fed.port} ({mode}), {nodes} SuperNodes; logs in {fed.workdir}"))
        extra = f" --root-certificates {fed.root_certificates}" if fed.root_certificates else " --insecure"
        err.print(escape(f"run against it:  fedsqueeze run --runtime flower --superlink {fed.address} --clients {nodes}{extra} ..."))
        err.print("Ctrl-C stops every process started here")
        try:
            while all(p.poll() is None for p in fed.procs):
                time.sleep(1.0)
            err.print("[red]a Flower process exited; stopping the rest[/red]")
        except KeyboardInterrupt:
            pass
    finally:
        fed.stop()


@app.command()
@run_flags(exclude=("method",), help={"out": "output directory (default runs/compare); each run goes to OUT/<method>"})
def compare(
    methods: str = typer.Option(..., "--methods", help="comma-separated method names, e.g. fedavg,head,lora"),
    target: Optional[float] = typer.Option(None, help="target accuracy for time-to-accuracy (default: 90% of the best final)"),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with any run field and an \\[options] table"),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="key=value for run options; a method option goes to every method that has it, METHOD.key=value to one (repeatable)",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars or tables"),
    superlink: str = typer.Option("127.0.0.1:9093", help="--runtime flower: the SuperLink's address host:port"),
    root_certificates: Optional[str] = typer.Option(
        None, help="--runtime flower: CA certificate (ca.crt) of the SuperLink; a run without it is refused unless --insecure"
    ),
    insecure: bool = typer.Option(False, "--insecure", help="--runtime flower: connect without TLS (plain text; warns)"),
    **flags: Any,
) -> None:
    """Run several methods on the same task and seed; write OUT/report.md, pareto.png, accuracy.png, bpp.png."""
    from fedsqueeze.config import build_config, parse_sets
    from fedsqueeze.methods import get_method
    from fedsqueeze.runners import run_compare

    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        get_method(name)  # fail fast on an unknown method, before any loading
    sets = parse_sets(set_)
    # method options are checked per method (split_options), so keep them out of the shared config's check
    cli = dict(flags, method=names[0] if names else None)
    cfg = build_config(config, cli, sets, dataset_for_model=_default_dataset)
    out = flags["out"]
    out_dir = cfg.out if out is not None or cfg.out != RunConfig.out else "runs/compare"
    done = run_compare(
        cfg,
        names,
        out_dir,
        target=target,
        show_progress=not quiet,
        command=_command_line(),
        superlink=superlink,
        root_certificates=root_certificates,
        insecure=insecure,
    )
    _print_summary(done)
    if done["failed"]:
        raise FedsqueezeError("compare: failed: " + ", ".join(f["method"] for f in done["failed"]) + f" (see {done['report']})")


def _command_line() -> str:
    """The command as typed, for the report (so a table can always be traced to its command)."""
    import shlex

    return "fedsqueeze " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _print_summary(done: dict) -> None:
    from rich.table import Table

    console = Console(stderr=True, width=None if err.is_terminal else 140)
    table = Table(title=f"comparison (target accuracy {done['target']:.4f})")
    for col in ("method", "final acc", "uplink B", "downlink B", "uplink bpp", "downlink bpp", "sim s", "wall s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for label, s in zip(done["labels"], done["summaries"]):
        table.add_row(
            label,
            f"{s['accuracy']:.4f}",
            f"{s['uplink_bytes']:,}",
            f"{s['downlink_bytes']:,}",
            f"{s['uplink_bpp']:.4g}",
            f"{s['downlink_bpp']:.4g}",
            f"{s['sim_time_s']:.1f}" if s["sim_time_s"] is not None else "n/a",
            f"{s['wall_s']:.1f}",
        )
    console.print(table)
    console.print(f"→ {done['report']}  " + "  ".join(str(p) for p in done["plots"]))


def _report(paths: list[str], out: str, target: Optional[float]) -> None:
    from fedsqueeze.report.compare import load_results, write_report

    done = write_report(load_results(list(paths)), out, target=target, command=_command_line())
    _print_summary(done)


_REPORT_PATHS = typer.Argument(..., help="results.json files, run directories, or a compare directory")
_REPORT_OUT = typer.Option("runs/report", "--out", help="directory for report.md and the plots")
_REPORT_TARGET = typer.Option(None, help="target accuracy (default: 90% of the best final accuracy)")


@app.command()
def report(paths: list[str] = _REPORT_PATHS, out: str = _REPORT_OUT, target: Optional[float] = _REPORT_TARGET) -> None:
    """Write report.md, pareto.png, accuracy.png and bpp.png from earlier runs' results.json."""
    _report(paths, out, target)


@app.command()
def plot(paths: list[str] = _REPORT_PATHS, out: str = _REPORT_OUT, target: Optional[float] = _REPORT_TARGET) -> None:
    """Same as `report`: the plots (and report.md) from earlier runs' results.json."""
    _report(paths, out, target)


@app.command()
def bench(
    suite_file: str = typer.Argument(..., help="suite TOML (benchmarks/suites/*.toml)"),
    report_only: bool = typer.Option(False, "--report-only", help="run nothing: rebuild the report and README table from the store"),
    only: list[str] = typer.Option([], "--only", help="run only entries whose id TASK/SETTING/METHOD/sSEED matches this glob (repeatable)"),
    bytes_axis: str = typer.Option("total", "--bytes", help="figures' byte axis: 'total' (uplink + downlink) or 'uplink'"),
    store: Optional[str] = typer.Option(None, help="results store directory (default: the suite's `store`)"),
    report_dir: Optional[str] = typer.Option(
        None, "--report-dir", help="where report.md and the figures go (default: the suite's `report`)"
    ),
    readme: Optional[str] = typer.Option(None, help="README whose marked table is regenerated (default: the suite's `readme`)"),
    no_readme: bool = typer.Option(False, "--no-readme", help="leave the README alone"),
    import_run: Optional[str] = typer.Option(None, "--import-run", help="store this pre-pipeline results.json (needs --as and --source)"),
    as_entry: Optional[str] = typer.Option(None, "--as", help="--import-run: the entry id it stands in for, TASK/SETTING/METHOD/sSEED"),
    source: Optional[str] = typer.Option(None, "--source", help="--import-run: where the file came from, recorded as given"),
    quiet: bool = typer.Option(False, "--quiet", help="no per-run progress bars"),
) -> None:
    """Fill a benchmark suite (runs missing from its results store, resumable), then write its report and README table."""
    from pathlib import Path

    from fedsqueeze import bench as bench_mod
    from fedsqueeze import store as store_mod
    from fedsqueeze.report.suite import shown, write_suite_report

    if bytes_axis not in ("total", "uplink"):
        raise ConfigError(f"--bytes must be 'total' or 'uplink', got {bytes_axis!r}")
    suite = bench_mod.load_suite(suite_file)
    suite.store = Path(store) if store else suite.store
    suite.report = Path(report_dir) if report_dir else suite.report
    suite.readme = Path(readme) if readme else suite.readme
    if import_run is not None:
        if not as_entry or not source:
            raise ConfigError("--import-run needs --as TASK/SETTING/METHOD/sSEED and --source TEXT")
        path = bench_mod.import_run(suite, Path(import_run), as_entry, source)
        err.print(f"stored {import_run} as {as_entry} (epoch {store_mod.PRE_PIPELINE}) → {path}")
        return
    failed: list[dict[str, str]] = []
    if not report_only:
        done = bench_mod.fill(suite, only=only, show_progress=not quiet)
        failed = done["failed"]
        err.print(f"bench {suite.name}: ran {len(done['ran'])}, already stored {done['skipped']}, failed {len(failed)}")
    found = bench_mod.match(suite.entries, store_mod.read_store(suite.store) if suite.store.is_dir() else [])
    written = write_suite_report(suite, found, f"fedsqueeze bench {shown(Path(suite_file))} --report-only", bytes_axis, not no_readme)
    err.print(
        f"→ {written['report']}  " + "  ".join(str(p) for p in written["figures"]) + (f"  {written['readme']}" if written["readme"] else "")
    )
    if failed:
        raise FedsqueezeError("bench: failed: " + "; ".join(f"{f['id']}: {f['error']}" for f in failed))


def _options_table(title: str, rows: list[tuple[str, str, str]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("option", no_wrap=True)
    table.add_column("default", no_wrap=True)
    table.add_column("help")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))  # text, not markup: "[1, 2]" must show
    return table


def _strategies_table():
    """Server optimizers, robust rules and attacks, each as the setting that picks it and what it does."""
    from rich.table import Table

    from fedsqueeze.config import ATTACKS
    from fedsqueeze.methods.robust import SCALAR_RULES, TENSOR_RULES
    from fedsqueeze.methods.server_opt import DESCRIPTIONS

    table = Table(title="[bold]strategies[/bold] (docs/strategies.md)", title_justify="left", show_edge=False)
    table.add_column("setting", no_wrap=True)
    table.add_column("applies to")
    table.add_column("what it does")
    for rule, text in DESCRIPTIONS.items():
        table.add_row(f"server_opt={rule}", "tensor methods", text)
    for rule, fn in TENSOR_RULES.items():
        table.add_row(f"robust={rule}", "tensor methods", (fn.__doc__ or "").strip().splitlines()[0])
    table.add_row("norm_bound=C", "tensor methods", "clip each client update to L2 norm C before the robust rule")
    table.add_row("prox_mu=μ", "tensor methods", "FedProx: μ/2·‖w − w_global‖² added to the local loss")
    table.add_row("client_flip_cap=c", "mask methods", "ignore a client whose mask flips more than a fraction c of the positions")
    table.add_row("vote_trim=β", "mask methods", "per-position trimmed vote (β dropped at each end)")
    for rule, fn in SCALAR_RULES.items():
        table.add_row(f"aggregate={rule}", "decomfl", (fn.__doc__ or "").strip().splitlines()[0])
    for attack, text in ATTACKS.items():
        table.add_row(f"attack={attack}", "run option (attack_fraction, attack_scale)", text)
    return table


@app.command()
def methods(
    name: Optional[str] = typer.Argument(None, help="show only this method, codec, or 'run' for the run options"),
) -> None:
    """List every method and codec with its options and defaults (or one of them: `methods NAME`)."""
    from rich.table import Table

    from fedsqueeze.codecs import CODECS
    from fedsqueeze.methods import METHODS
    from fedsqueeze.options import describe_options

    if name is not None and name not in METHODS and name not in CODECS and name != "run":
        import difflib

        hint = difflib.get_close_matches(name, [*METHODS, *CODECS, "run"], n=1)
        raise FedsqueezeError(
            f"no method or codec named {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; methods: {', '.join(sorted(METHODS))}; codecs: {', '.join(sorted(CODECS))}"
        )
    console = Console(width=None if Console().is_terminal else 120)
    if name is None:
        overview = Table(
            title="[bold]methods[/bold] (--method NAME; `fedsqueeze methods NAME` for one)", title_justify="left", show_edge=False
        )
        overview.add_column("method", no_wrap=True)
        overview.add_column("what it does")
        for m in sorted(METHODS):
            overview.add_row(m, METHODS[m].summary)
        console.print(overview)
        console.print()
    for m in sorted(METHODS):
        if name in (None, m):
            cls = METHODS[m]
            rows = [("lr", str(cls.default_lr), "default local learning rate (run option `lr` overrides)")]
            rows += [(opt, repr(default), help_) for opt, default, help_ in describe_options(cls.Options)]
            if cls.budget_knob is not None:
                rows.append(
                    ("budget_bpp", "0.0", f"uplink budget in bits per model parameter (run option; 0 = off): tunes {cls.budget_knob}")
                )
            console.print(_options_table(f"[bold]{m}[/bold] — {cls.summary}", rows))
            console.print()
    if name is None or name in CODECS:
        # codecs may declare an ``Options`` dataclass; each option is set as --set CODEC_OPTION=value
        codecs = Table(title="[bold]codecs[/bold] (uplink_codec= / downlink_codec=)", title_justify="left", show_edge=False)
        codecs.add_column("id", no_wrap=True)
        codecs.add_column("lossless")
        codecs.add_column("what it does")
        codecs.add_column("options (--set ID_OPTION=value)")
        for cid in sorted(CODECS):
            if name in (None, cid):
                doc = (CODECS[cid].__doc__ or "").strip().splitlines()[0]
                opts = describe_options(CODECS[cid].Options) if hasattr(CODECS[cid], "Options") else []
                codecs.add_row(
                    cid,
                    "yes" if CODECS[cid].lossless else "no",
                    doc,
                    ", ".join(f"{cid}_{opt}={default!r}" for opt, default, _ in opts) or "none",
                )
        console.print(codecs)
        console.print()
        if name in CODECS and hasattr(CODECS[name], "Options"):
            rows = [(f"{name}_{opt}", repr(default), help_) for opt, default, help_ in describe_options(CODECS[name].Options)]
            console.print(_options_table(f"[bold]{name}[/bold] options", rows))
    if name is None:
        console.print(_strategies_table())
        console.print()
    if name in (None, "run"):
        rows = [(opt, repr(default), help_) for opt, default, help_ in describe_options(RunConfig)]
        console.print(_options_table("[bold]run options[/bold] (CLI flags, --config TOML, or --set)", rows))


@app.command()
def models() -> None:
    """List every model (--model NAME): kind, parameters, size on disk, licence, source and whether it is installed."""
    from rich.table import Table

    from fedsqueeze.models.catalogue import CATALOGUE, models_dir

    console = Console(width=None if Console().is_terminal else 160)
    table = Table(
        title=f"[bold]models[/bold] (--model NAME; `make models` installs into {models_dir()})", title_justify="left", show_edge=False
    )
    for col in ("model", "kind", "parameters", "on disk", "license", "installed", "source"):
        table.add_column(col, no_wrap=col in ("model", "kind", "on disk", "installed"))
    for e in CATALOGUE.values():
        size = e.size_on_disk()
        installed = "yes" if e.installed() else "no: make models"
        table.add_row(
            *(escape(c) for c in (e.name, e.kind, e.params, f"{size / 1e6:.1f} MB" if size else "-", e.license, installed, e.source))
        )
    console.print(table)


def os_error_text(exc: OSError) -> str:
    """One line for an OSError: what went wrong and on which path ("No space left on device: 'runs/x/rounds.csv'")."""
    what = exc.strerror or str(exc) or type(exc).__name__
    paths = [repr(str(p)) for p in (exc.filename, exc.filename2) if p is not None]
    return " ".join(f"{what}: {' -> '.join(paths)}".split()) if paths else " ".join(what.split())


def main() -> None:
    """Console entry point: typed errors become one clear line and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except FedsqueezeError as exc:
        # one line, however long (no wrapping), and the message is text, not rich markup ("got [1, 2]")
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # --out is a file or unwritable, the disk is full...: the user's to fix, not a bug
        err.print(f"[red]error:[/red] {escape(os_error_text(exc))}", soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
