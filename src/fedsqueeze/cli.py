"""The ``fedsqueeze`` command line."""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer
from rich.console import Console

from fedsqueeze.errors import FedsqueezeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning at a tiny communication cost.")
err = Console(stderr=True)

RUNTIMES = ("local",)


@app.command()
def run(
    method: Optional[str] = typer.Option(None, help="method name (see `fedsqueeze methods`)"),
    model: Optional[str] = typer.Option(None, help="'minilm' (bundled), 'tiny', a local path or a Hub id"),
    dataset: Optional[str] = typer.Option(None, help="'wordnet', 'fashion-mnist', a .csv/.jsonl/.parquet file or hf:NAME[:CONFIG]"),
    clients: Optional[int] = typer.Option(None, help="number of clients"),
    clients_per_round: Optional[int] = typer.Option(None, help="clients sampled per round"),
    rounds: Optional[int] = typer.Option(None, help="federated rounds"),
    seed: Optional[int] = typer.Option(None, help="run seed"),
    out: Optional[str] = typer.Option(None, help="output directory"),
    runtime: Optional[str] = typer.Option(None, help=f"one of: {', '.join(RUNTIMES)}"),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with any run field and an [options] table"),
    set_: list[str] = typer.Option([], "--set", help="key=value for run, method or codec options (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or tables"),
) -> None:
    """Run one federated fine-tuning job; writes OUT/results.json and OUT/rounds.csv."""
    from fedsqueeze.config import build_config, parse_sets
    from fedsqueeze.methods import get_method

    cli = dict(method=method, model=model, dataset=dataset, clients=clients, clients_per_round=clients_per_round,
               rounds=rounds, seed=seed, out=out, runtime=runtime)
    cfg = build_config(config, cli, parse_sets(set_))
    get_method(cfg.method)  # fail fast on an unknown method, before any loading
    if cfg.runtime not in RUNTIMES:
        raise FedsqueezeError(f"unknown runtime {cfg.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    from fedsqueeze.runtime import run_local

    results = run_local(cfg, show_progress=not quiet)
    final = results["final"]
    err.print(
        f"final accuracy {final['accuracy']:.4f}  uplink {final['total_uplink_bytes']:,} B "
        f"({final['mean_uplink_bpp']:.4g} bpp)  downlink {final['total_downlink_bytes']:,} B "
        f"({final['mean_downlink_bpp']:.4g} bpp)  → {cfg.out}/results.json"
    )


@app.command()
def methods() -> None:
    """List every method and codec with its options and defaults."""
    from rich.table import Table

    from fedsqueeze.codecs import CODECS
    from fedsqueeze.config import RunConfig
    from fedsqueeze.methods import METHODS
    from fedsqueeze.methods.base import describe_options

    console = Console()
    for name in sorted(METHODS):
        cls = METHODS[name]
        table = Table(title=f"[bold]{name}[/bold] — {cls.summary}", title_justify="left", show_edge=False)
        table.add_column("option")
        table.add_column("default")
        table.add_column("help")
        table.add_row("lr", str(cls.default_lr), "default local learning rate (run option `lr` overrides)")
        for opt, default, help_ in describe_options(cls.Options):
            table.add_row(opt, repr(default), help_)
        console.print(table)
        console.print()
    codecs = Table(title="[bold]codecs[/bold] (uplink_codec= / downlink_codec=)", title_justify="left", show_edge=False)
    codecs.add_column("id")
    codecs.add_column("lossless")
    codecs.add_column("what it does")
    codecs.add_column("options (--set ID_OPTION=value)")
    for cid in sorted(CODECS):
        doc = (CODECS[cid].__doc__ or "").strip().splitlines()[0]
        opts = ", ".join(f"{cid}_{opt}={default!r}" for opt, default, _ in describe_options(CODECS[cid].Options))
        codecs.add_row(cid, "yes" if CODECS[cid].lossless else "no", doc, opts)
    console.print(codecs)
    console.print()
    run_opts = Table(title="[bold]run options[/bold] (CLI flags, --config TOML, or --set)", title_justify="left", show_edge=False)
    run_opts.add_column("option")
    run_opts.add_column("default")
    run_opts.add_column("help")
    from dataclasses import fields

    for f in fields(RunConfig):
        if f.name != "options":
            run_opts.add_row(f.name, repr(f.default), f.metadata.get("help", ""))
    console.print(run_opts)


def main() -> None:
    """Console entry point: typed errors become one clear line and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except FedsqueezeError as exc:
        err.print(f"[red]error:[/red] {exc}")
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
