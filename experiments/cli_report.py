"""`rlscale cost`, `prices`, `fit` and `report`: what a project cost, and how its scores scale."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from rlscale.experiments.cli_common import DebugOpt, fail, new_progress, term
from rlscale.tracking.cost import PriceError

FinalOpt = Annotated[str | None, typer.Option("--final", help="Run id of the final run (default: the run tagged "
                                              "phase=final).")]
LedgerOpt = Annotated[str | None, typer.Option("--ledger", help="Ledger TOML of costs that are no run.")]
PricesOpt = Annotated[str | None, typer.Option("--prices", help="Recompute every run's cost/usd with this price "
                                               "table (default: the cost each run recorded).")]


def cost(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", help="Experiment name (repeatable; "
                                                         "default: all).")] = None,
    ledger: LedgerOpt = None,
    final: FinalOpt = None,
    uri: Annotated[str | None, typer.Option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or "
                                            "mlruns/).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    prices_file: PricesOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Full project cost: every run (finished, failed, killed, pruned) plus a ledger of costs that are no run.

    Examples:
      rlscale cost
      rlscale cost --experiment addition --ledger ledger.toml --json
      rlscale cost --ledger ledger.toml --final 3f2a...   # the final run chosen by id
      rlscale cost --prices my_prices.toml                # every run repriced with another table
    """
    from rlscale.analysis.cost import cost_table, load_ledger, project_cost, reprice
    from rlscale.analysis.report import json_text
    from rlscale.analysis.runs import load_runs

    try:
        runs = load_runs(uri, experiment)  # none (not an error) when the embedded store was never created
        if prices_file:
            runs = reprice(runs, prices_file)
        result = project_cost(runs, load_ledger(ledger) if ledger else None, final)
    except ValueError as e:
        fail(str(e), debug)
        return
    if as_json:
        print(json_text(result))
        return
    table = Table(title="project cost")
    df = cost_table(result)
    for col in ("category", "usd", "share %", *(f"{u}-hours" for u in result["device_hours"])):
        table.add_column(col, justify="left" if col == "category" else "right")
    for r in df.itertuples(index=False):
        table.add_row(term(r[0]), f"{r[1]:,.2f}", f"{r[2]:.1f}", *(f"{h:,.4f}" for h in r[3:]))
    Console().print(table)
    ratio = result["ratio_total_to_final"]
    print(f"total ${result['total_usd']:,.2f}; final run "
          + ("none tagged phase=final" if result["final_run_usd"] is None else f"${result['final_run_usd']:,.2f}")
          + ("" if ratio is None else f"; total / final = {ratio:.1f}x"))
    print("runs: " + ", ".join(f"{v} {k}" for k, v in result["runs"].items() if v))
    line = result["final_lineage"]
    if line:  # what the final model took: the runs it came from, each its own work
        chain = " + ".join(f"{s['kind']} ${s['usd']:,.2f}" for s in line["steps"])
        gone = f"; {len(line['missing'])} ancestor(s) not in the store, as recorded" if line["missing"] else ""
        share = line["ratios"]["lineage_to_project"]["usd"]
        print(f"final model's lineage: {chain} = ${line['lineage']['usd']:,.2f}{gone}"
              + ("" if share is None else f" ({100 * share:.0f}% of the project)"))


def prices(
    device: Annotated[str | None, typer.Option("--device", help="A device name as the driver reports it.")] = None,
    table: Annotated[str | None, typer.Option("--prices", help="Price table TOML (default: the shipped one).")] = None,
    debug: DebugOpt = False,
) -> None:
    """The price table runs are billed with: key, device names matched, $/h, unit, source, date.

    With --device, the entry and price a run on that device gets, or why it would not start:
      rlscale prices --device "NVIDIA L40S"
    """
    from rlscale.tracking.cost import device_key, load_price_table

    try:
        entries = load_price_table(table)
        if device is not None:
            kind = "cpu" if device.lower() == "cpu" else "cuda"
            e = entries[device_key(kind, device, entries)]
            print(f"{e.key}  ${e.usd_per_hour:g} per {e.unit}-hour  ({e.source}, read {e.date}{', ' if e.url else ''}"
                  f"{e.url})")
            return
    except PriceError as e:
        fail(str(e), debug)
    out = Table(title="prices (US$ per device-hour; `rlscale prices --device NAME` for the source URL)")
    for col in ("key", "devices matched", "$/h", "unit", "source", "date"):
        out.add_column(col, justify="right" if col == "$/h" else "left", overflow="fold")
    for e in entries.values():
        out.add_row(term(e.key), term(", ".join(e.names) or ("any CPU" if e.unit == "vCPU" else "-")),
                    f"{e.usd_per_hour:g}", term(e.unit), term(e.source), term(e.date))
    Console().print(out)


def fit(
    csv: Annotated[str, typer.Option("--csv", help="CSV file with one row per run or point.")],
    x: Annotated[str, typer.Option("--x", help="Column of x (compute, data, model size...).")],
    y: Annotated[str, typer.Option("--y", help="Column of y (score or loss).")],
    form: Annotated[str, typer.Option("--form", help="power, saturating, loss, sigmoid or chinchilla.")],
    x2: Annotated[str | None, typer.Option("--x2", help="Second variable (tokens D) for chinchilla.")] = None,
    exclude_below: Annotated[float | None, typer.Option("--exclude-below", help="Drop points with x below this.")
                             ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap refits for the intervals (0: none; "
                                           "fewer is faster on large files).")] = 200,
    debug: DebugOpt = False,
) -> None:
    """Fit a scaling form to a CSV from anywhere: parameters, 95% bootstrap intervals and fit quality.

    Examples:
      rlscale fit --csv runs.csv --x compute/flops --y eval/accuracy --form saturating
      rlscale fit --csv chinchilla.csv --x N --x2 D --y loss --form chinchilla --json
    """
    from rlscale.analysis.fits import FORMS, fit_csv
    from rlscale.analysis.report import json_text

    if form not in FORMS:
        fail(f"--form {form!r}: choose one of {', '.join(FORMS)}", debug)
    try:
        result = fit_csv(csv, x, y, form, x2, exclude_below, n_boot=bootstrap)
    except (ValueError, OSError) as e:
        fail(str(e), debug)
        return
    if as_json:
        print(json_text(result.to_dict(), indent=None))
        return
    table = Table(title=term(f"{form} fit of {y} on {x}" + (f" and {x2}" if x2 else "")))
    for col in ("param", "estimate", "95% low", "95% high"):
        table.add_column(col, justify="left" if col == "param" else "right")
    for k, v in result.params.items():
        lo, hi = result.ci.get(k, (float("nan"), float("nan")))
        table.add_row(term(k), f"{v:.6g}", f"{lo:.6g}", f"{hi:.6g}")
    Console().print(table)
    print(f"r2 {result.r2:.4f}, rmse {result.rmse:.4g}, {result.n} points"
          + (f" ({result.n_excluded} excluded below {exclude_below:g})" if result.n_excluded else ""))


def report(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", help="Experiment name (repeatable; "
                                                         "default: all).")] = None,
    ledger: LedgerOpt = None,
    final: FinalOpt = None,
    out: Annotated[str, typer.Option("--out", help="Folder the report is written to.")] = "outputs/report",
    uri: Annotated[str | None, typer.Option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or "
                                            "mlruns/).")] = None,
    prices_file: PricesOpt = None,
    bootstrap: Annotated[int | None, typer.Option("--bootstrap", min=0, help="Bootstrap resamples behind every "
                                                  "interval and band (score fits and recipe fits; 0: none). Default: "
                                                  "sized for the store: 200, or fewer when one resample refits many "
                                                  "points, 2,000,000 / (2 x eval points on recipe curves + 3 x scored "
                                                  "runs), at least 50 (1,000 runs of 10 evals each: 86).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Write the cost and scaling report (HTML + Markdown with plots, CSV, JSON) and log it to MLflow.

    Progress is shown on stderr when it is a terminal.

    Examples:
      rlscale report
      rlscale report --experiment demo --ledger ledger.toml --out outputs/report
      rlscale report --prices my_prices.toml   # every run repriced with another table
      rlscale report --bootstrap 1000          # tighter interval estimates, slower
    """
    from rlscale.analysis.report import build_report

    bar = new_progress()
    bar.disable = not sys.stderr.isatty()  # no bar in logs, pipes or captured output (FORCE_COLOR or not)
    tasks: dict[str, TaskID] = {}

    def progress(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    try:
        with bar:
            result = build_report(uri, experiment, ledger, final, out, prices=prices_file, n_boot=bootstrap,
                                  progress=progress)
    except (ValueError, OSError) as e:
        fail(str(e), debug)
        return
    print(f"report: {Path(result.html).resolve()}")
    print(f"        {Path(result.markdown).resolve()}")
    print("browse the runs: rlscale ui   (then open http://127.0.0.1:5000)")
