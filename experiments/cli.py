"""The `rlscale` command line: the app, its entry point, and the command groups it gathers.

The commands live in files named for what they hold: `cli_train` (train, sweep, grid), `cli_store` (runs, ui),
`cli_report` (cost, prices, fit, report), `cli_config` (config, model); `cli_common` holds what they share."""

from __future__ import annotations

import signal
import sys

import typer

from rlscale.experiments.cli_common import (
    DebugOpt,
    ExpOpt,
    ProgressCallback,
    Quiet,
    SetOpt,
    UriOpt,
    console,
    fail,
    new_progress,
    plain,
    store_client,
    term,
    warn,
)
from rlscale.experiments.cli_config import config_app, config_schema, config_show, model_app, model_import
from rlscale.experiments.cli_report import FinalOpt, LedgerOpt, PricesOpt, cost, fit, prices, report
from rlscale.experiments.cli_store import runs_app, runs_list, runs_reconcile, runs_sync, ui
from rlscale.experiments.cli_train import grid, sweep, sweep_overrides, train
from rlscale.rl.checkpoint import STOP

__all__ = ["DebugOpt", "ExpOpt", "FinalOpt", "LedgerOpt", "PricesOpt", "ProgressCallback", "Quiet", "SetOpt", "UriOpt",
           "app", "config_app", "config_schema", "config_show", "console", "cost", "fail", "fit", "grid", "main",
           "model_app", "model_import", "new_progress", "plain", "prices", "report", "runs_app", "runs_list",
           "runs_reconcile", "runs_sync", "store_client", "sweep", "sweep_overrides", "term", "train", "ui", "warn"]

app = typer.Typer(
    help="rlscale: what it costs to make a model better with RL, and how that cost scales.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are literal: "[sweep]" is a TOML table, not markup
)
_client = store_client  # its name before the split


@app.callback()
def _root() -> None:
    """rlscale: what it costs to make a model better with RL, and how that cost scales."""


for _command in (train, sweep, grid, ui, cost, prices, fit, report):  # the order `rlscale --help` lists them in
    app.command()(_command)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
app.add_typer(runs_app, name="runs")


def _request_stop(signum, frame) -> None:
    """First SIGINT/SIGTERM: finish the step, checkpoint, flush, mark KILLED. A second one stops at once."""
    if STOP.is_set():
        raise KeyboardInterrupt
    STOP.set()


def main() -> None:
    """Entry point: SIGINT and SIGTERM stop a run at the next step boundary; exit code 130."""
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
