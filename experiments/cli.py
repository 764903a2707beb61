"""The `rlscale` command line."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from experiments.config import ConfigError, load_config
from experiments.runner import run_experiment
from rl.checkpoint import STOP
from rl.pipeline import InputError
from tracking.cost import PriceError

app = typer.Typer(
    help="rlscale: what it costs to make a model better with RL, and how that cost scales.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config field: key.sub=value.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


@app.callback()
def _root() -> None:
    """rlscale: what it costs to make a model better with RL, and how that cost scales."""


def fail(message: str, debug: bool = False) -> None:
    """One clear error line and exit code 2 (the traceback only with --debug)."""
    if debug:
        console.print_exception()
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class ProgressCallback:
    """Drives a rich progress bar from the trainer's metrics; the bar appears with the first metric."""

    def __init__(self, sft_steps: int, rl_steps: int):
        self.sft_steps = sft_steps  # SFT may stop early; RL steps are placed after the whole SFT budget
        self.total = sft_steps + rl_steps
        self.progress: Progress | None = None

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=console,
            )
            self.progress.start()
            self.progress.add_task("", total=self.total)
        if "train/reward_mean" in metrics:
            verify = metrics.get("train/verify_reward_mean", 0.0)
            desc = f"GRPO reward {metrics['train/reward_mean']:.2f} verify {verify:.2f}"
        elif "sft/loss" in metrics:
            desc = f"SFT loss {metrics['sft/loss']:.3f}"
        else:
            desc = f"eval accuracy {metrics.get('eval/accuracy', float('nan')):.3f}"
        done = self.sft_steps + metrics["train/rl_step"] if "train/rl_step" in metrics else step
        self.progress.update(self.progress.task_ids[0], completed=done, description=desc)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="Experiment TOML file.")],
    set_: SetOpt = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Ignore checkpoints in output_dir.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run cold-start SFT, then GRPO with self-verification, and evaluate before and after RL.

    Examples:
      rlscale train experiments/addition.toml
      rlscale train experiments/addition.toml --set grpo.steps=100 --set seed=1
    """
    try:
        cfg = load_config(config, set_)
        bar = ProgressCallback(cfg.sft.steps, cfg.grpo.steps)
        try:
            result = run_experiment(cfg, bar, resume=not no_resume)
        finally:
            bar.close()
    except (ConfigError, InputError, PriceError) as e:
        fail(str(e), debug)
        return
    table = Table(title=f"{cfg.name}: {cfg.model.name} on {cfg.task.name}")
    table.add_column("metric")
    table.add_column("after SFT", justify="right")
    table.add_column("after RL", justify="right")
    for key, value in result.metrics.items():
        if key.startswith("eval/") and "/sft_" not in key and key != "eval/rl_gain":
            before = result.sft_metrics.get(key)
            table.add_row(key, "" if before is None else f"{before:.3f}", f"{value:.3f}")
    Console().print(table)
    print(f"model saved to {result.model_dir}")
    if result.run_id:
        print(f"MLflow run {result.run_id} in experiment {cfg.name!r}")


runs_app = typer.Typer(help="Runs in the store: list, reconcile.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
UriOpt = Annotated[str | None, typer.Option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or mlruns/).")]
ExpOpt = Annotated[list[str] | None, typer.Option("--experiment", help="Experiment name (repeatable).")]


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    from tracking.run import tracking_uri

    return MlflowClient(tracking_uri(uri))


@runs_app.command("list")
def runs_list(experiment: ExpOpt = None, uri: UriOpt = None, debug: DebugOpt = False) -> None:
    """Print a table of runs with status, phase, compute, cost and score.

    Examples:
      rlscale runs list
      rlscale runs list --experiment addition
    """
    from tracking.runs import list_runs

    try:
        rows = list_runs(_client(uri), experiment)
    except ValueError as e:
        fail(str(e), debug)
        return
    table = Table(title="runs")
    for col in ("run", "status", "phase", "FLOPs", "device-hours", "cost $", "accuracy"):
        table.add_column(col, justify="left" if col in ("run", "status", "phase") else "right")

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    for r in rows:
        table.add_row(r["name"], r["status"], r["phase"], fmt(r["flops"], ".3g"), fmt(r["device_hours"], ".4f"),
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
    from tracking.runs import reconcile

    try:
        killed = reconcile(_client(uri), experiment, stale_seconds)
    except ValueError as e:
        fail(str(e), debug)
        return
    print(f"marked {len(killed)} run(s) KILLED" + (": " + ", ".join(killed) if killed else ""))


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
