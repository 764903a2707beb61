"""`rlscale train`, `sweep` and `grid`: the commands that train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rlscale.experiments.cli_common import (
    DebugOpt,
    ProgressCallback,
    Quiet,
    SetOpt,
    fail,
    new_progress,
    plain,
    term,
    warn,
)
from rlscale.experiments.config import ConfigError, ExperimentConfig, load_config
from rlscale.experiments.runner import run_experiment
from rlscale.rl.pipeline import InputError, env_rank
from rlscale.tracking.cost import PriceError
from rlscale.tracking.run import StoreError, wait_for_store

FromSweepOpt = Annotated[str | None, typer.Option(
    "--from-sweep", metavar="REF",
    help="Train with the best trial of a sweep: REF is its parent MLflow run id or its Optuna study name (looked up "
    "in the config's experiment). The trial's values are applied as overrides and the run is tagged "
    "sweep.parent_run_id, sweep.best_trial, sweep.best_run_id and sweep.study. A --set of the same key wins over the "
    "sweep's value (a warning line names it). A sweep with no complete trial is an error; nothing is trained.")]


def sweep_overrides(cfg: ExperimentConfig, ref: str, overrides: list[str] | None,
                    announce: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The best trial of sweep `ref` as (typed values to apply, tags of the run); the values --set also sets are left
    out (the user's --set wins). With `announce`, one line says which trial and values, and a warning line names
    each sweep key a --set overrides."""
    from rlscale.experiments.sweep import best_trial
    from rlscale.tracking.run import open_client

    root = Path(cfg.tracking.root)
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")) and not (root / "mlflow.db").is_file():
        raise ValueError(f"--from-sweep {ref!r}: no store at {root} (tracking.root): no sweep to read")
    best = best_trial(open_client(cfg.tracking.uri, root), ref, cfg.name, cfg.sweep.space if cfg.sweep else None)
    user = [o.partition("=")[0].strip() for o in overrides or [] if "=" in o]

    def clash(key: str) -> str | None:
        return next((u for u in user if u == key or key.startswith(u + ".") or u.startswith(key + ".")), None)

    values = {k: v for k, v in best.values.items() if clash(k) is None}
    if announce:
        setting = ", ".join(f"{k}={v!r}" for k, v in best.values.items()) or "no searched values"
        print(plain(f"from sweep {best.study} (parent run {best.parent_run_id}): best trial {best.number} (run "
                    f"{best.run_id}, {best.metric} {best.value:.4g}, {best.direction}): {setting}"), flush=True)
        for k in best.values.keys() - values.keys():
            given = next(o for o in overrides or [] if o.partition("=")[0].strip() == clash(k))
            warn(f"--set {given} overrides the sweep's {k}={best.values[k]!r}")
        if best.running:
            warn(f"sweep {best.study} is still RUNNING (under way, or killed before it ended): its best complete "
                 f"trial so far is used")
        if best.experiment != cfg.name:
            warn(f"the sweep ran in experiment {best.experiment!r}; this run goes to {cfg.name!r}")
    tags = {"sweep.parent_run_id": best.parent_run_id, "sweep.best_trial": str(best.number),
            "sweep.best_run_id": best.run_id, "sweep.study": best.study}
    return values, tags


def train(
    config: Annotated[str, typer.Argument(help="Experiment TOML file.")],
    set_: SetOpt = None,
    from_sweep: FromSweepOpt = None,
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
      rlscale train experiments/demo.toml --from-sweep demo-sweep --set tracking.phase=final
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        try:
            cfg = load_config(config, set_)  # a bad config stops here, once, not in every rank
            if from_sweep:
                load_config(config, set_, sweep_overrides(cfg, from_sweep, set_, announce=False)[0])
        except (ConfigError, StoreError, ValueError) as e:
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
        tags = None
        if from_sweep:
            try:
                values, tags = sweep_overrides(cfg, from_sweep, set_, announce=rank == 0)
            except ValueError as e:  # no such sweep, no complete trial: one line, nothing trained
                fail(str(e), debug)
                return
            cfg = load_config(config, set_, values)
        bar = ProgressCallback(cfg.sft.steps, cfg.grpo.steps) if rank == 0 else Quiet()
        try:
            result = run_experiment(cfg, bar, resume=not no_resume, tags=tags)
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
