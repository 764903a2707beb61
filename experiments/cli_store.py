"""`rlscale runs` (list, reconcile, sync the runs of a store) and `rlscale ui` (the MLflow UI on it)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rlscale.experiments.cli_common import DebugOpt, ExpOpt, UriOpt, fail, plain, store_client, term
from rlscale.tracking.run import safe_uri


def ui(
    port: Annotated[int, typer.Option(help="Port to serve on.", min=1, max=65535)] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind (default: this machine only).")] = "127.0.0.1",
    uri: Annotated[str | None, typer.Option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or "
                                            "mlruns/).")] = None,
    experiment: Annotated[list[str] | None, typer.Option("--experiment", help="Experiment to open (repeatable; "
                                                         "default: every one).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Start the MLflow UI on the store and print the URL of each experiment's runs table, with the columns that
    matter (phase, model, accuracy, RL gain, self-verification, FLOPs, cost) saved as its view.

    Examples:
      rlscale ui
      rlscale ui --experiment demo --port 5001
    """
    import subprocess

    from rlscale.tracking.run import tracking_uri
    from rlscale.tracking.runs import VIEW_KEY, save_runs_view

    store = tracking_uri(uri)
    try:
        views = save_runs_view(store_client(store), experiment)
    except typer.Exit:
        raise
    except Exception as e:  # an unreadable store, an unknown experiment: one line
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, debug)
        return
    print(f"MLflow UI on http://{host}:{port} (store {safe_uri(store)}); Ctrl-C stops it", flush=True)
    for name, exp_id in views.items():
        print(f"  {plain(name)}: http://{host}:{port}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}",
              flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", store, "--workers", "1"]
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        raise typer.Exit(proc.wait())
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)


runs_app = typer.Typer(help="Runs in the store: list, reconcile, sync.", no_args_is_help=True, rich_markup_mode=None)


@runs_app.command("list")
def runs_list(experiment: ExpOpt = None, uri: UriOpt = None, debug: DebugOpt = False) -> None:
    """Print a table of runs with status, phase, compute, cost and score.

    Examples:
      rlscale runs list
      rlscale runs list --experiment addition
    """
    from rlscale.tracking.runs import list_runs

    try:
        rows = list_runs(store_client(uri), experiment)
    except ValueError as e:
        fail(str(e), debug)
        return
    table = Table(title="runs")
    for col in ("run", "status", "phase", "recipe", "FLOPs", "device-hours", "cost $", "accuracy"):
        table.add_column(col, justify="left" if col in ("run", "status", "phase", "recipe") else "right",
                         min_width=8 if col == "status" else None, max_width=10 if col == "recipe" else None)

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    for r in rows:
        table.add_row(term(r["name"]), term(r["status"]), term(r["phase"]), term(r["recipe"]), fmt(r["flops"], ".3g"),
                      fmt(r["device_hours"], ".4f"),
                      fmt(r["cost_usd"], ".4f"), fmt(r["accuracy"], ".3f"))
    Console().print(table)


@runs_app.command("reconcile")
def runs_reconcile(
    experiment: ExpOpt = None,
    uri: UriOpt = None,
    stale_seconds: Annotated[float, typer.Option(help="Heartbeat age that counts as dead.")] = 90.0,
    debug: DebugOpt = False,
) -> None:
    """Mark RUNNING runs whose heartbeat stopped (SIGKILL, power loss) as KILLED, keeping their compute.

    Examples:
      rlscale runs reconcile
      rlscale runs reconcile --experiment addition --stale-seconds 300
    """
    from rlscale.tracking.runs import reconcile

    try:
        killed = reconcile(store_client(uri), experiment, stale_seconds)
    except ValueError as e:
        fail(str(e), debug)
        return
    print(f"marked {len(killed)} run(s) KILLED" + (": " + ", ".join(killed) if killed else ""))


@runs_app.command("sync")
def runs_sync(
    uri: UriOpt = None,
    spool: Annotated[Path, typer.Option(help="Spool folder: what runs could not deliver while their store was down.")]
    = Path("mlruns/spool"),
    debug: DebugOpt = False,
) -> None:
    """Deliver spooled metrics, tags, artifacts and final statuses to the store; exit 1 if some could not be.

    Examples:
      rlscale runs sync
      rlscale runs sync --uri http://127.0.0.1:5000 --spool /scratch/mlruns/spool
    """
    from rlscale.tracking.runs import sync

    try:
        result = sync(spool, uri)
    except (ValueError, OSError) as e:
        fail(str(e), debug)
        return
    print(f"synced {len(result.synced)} run(s), {result.metrics} metric value(s)")
    for path, error in result.failed.items():
        print(plain(f"  not synced: {path}: {error}"))
    if result.failed:
        raise typer.Exit(1)
