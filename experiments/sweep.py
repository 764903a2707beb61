"""Optuna sweeps: each trial is a child MLflow run under one parent run of the sweep.

The study lives in Optuna storage (default: a journal file under the tracking root, safe for several
processes on one machine; any RDB URL works), so re-running a sweep resumes it and K worker processes can
share it. A pruned trial is still a run with its compute: it cost money.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import optuna
import torch
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from rlscale.experiments.config import ExperimentConfig, SearchDim, load_config
from rlscale.experiments.runner import run_experiment
from rlscale.tracking.run import experiment_id, open_client, safe_uri, wait_for_store

PARENT_ATTR = "mlflow_parent_run_id"
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
ACTIVE = (*DONE, optuna.trial.TrialState.RUNNING)
HOST = socket.gethostname()


class StudyFull(Exception):
    """The study already has its trials (other workers or machines ran them): this one is not run."""


def _alive(t: optuna.trial.FrozenTrial) -> bool:
    """False for a RUNNING trial whose process on this host is gone (a killed sweep); others count."""
    if t.state != optuna.trial.TrialState.RUNNING or t.user_attrs.get("host") != HOST:
        return True
    try:
        os.kill(int(t.user_attrs.get("pid", 0)), 0)
    except (OSError, ValueError):
        return False
    return True


@dataclass
class SweepSpec:
    """What a worker process needs to rebuild the study and the trial configs."""

    config: str
    overrides: list[str]
    storage: str
    study: str
    trials: int


def storage_url(cfg: ExperimentConfig) -> str:
    """The study's storage: `sweep.storage`, else a journal file `<tracking.root>/optuna.log`."""
    assert cfg.sweep is not None
    if cfg.sweep.storage:
        return cfg.sweep.storage
    root = Path(cfg.tracking.root)
    root.mkdir(parents=True, exist_ok=True)
    return str(root / "optuna.log")


RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "oracle")
STORAGE_FORMS = ("a journal file path (mlruns/optuna.log, or journal:///abs/path/optuna.log) or an RDB URL "
                 "(postgresql://user@host/db, mysql://..., sqlite:///file.db)")


def journal_path(storage: str) -> str | None:
    """The journal file of a study storage (a path, or `journal:` + path), None for an RDB URL; any other form is a
    ValueError naming the accepted ones."""
    if storage.startswith("journal:"):
        path = storage.removeprefix("journal:").removeprefix("//")
        if not path:
            raise ValueError(f"sweep storage {storage!r}: no file; use {STORAGE_FORMS}")
        return path
    if "://" not in storage:
        return storage
    scheme = storage.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in RDB_SCHEMES:
        raise ValueError(f"sweep storage {safe_uri(storage)!r}: unknown kind {scheme!r}; use {STORAGE_FORMS}")
    return None


def open_study(cfg: ExperimentConfig, storage: str, name: str, worker: int = 0) -> optuna.Study:
    """Create or load the study (sampler seeded, worker k gets seed + k; median pruner unless 'none')."""
    sw = cfg.sweep
    assert sw is not None
    seed = sw.sampler_seed + worker
    sampler = optuna.samplers.TPESampler(seed=seed) if sw.sampler == "tpe" else optuna.samplers.RandomSampler(seed)
    pruner = (optuna.pruners.MedianPruner(sw.pruner_startup_trials, sw.pruner_warmup_steps) if sw.pruner == "median"
              else ScalingPruner(cfg.grpo.steps, cfg.grpo.eval_problems, cfg.eval.problems, sw.pruner_warmup_steps,
                                 sw.pruner_startup_trials) if sw.pruner == "scaling"
              else optuna.pruners.NopPruner())
    path = journal_path(storage)
    if path is None:  # RDB: heartbeats let any worker fail the trials of a dead one
        wait_for_store(storage, what="sweep storage")
        store: Any = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180)
    else:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        store = optuna.storages.JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path)))
    return optuna.create_study(storage=store, sampler=sampler, pruner=pruner, study_name=name,
                               direction=sw.direction, load_if_exists=True)


class ScalingPruner(optuna.pruners.BasePruner):
    """Prune a trial whose own curve cannot reach the best finished trial by its full budget.

    Once `startup_trials` trials are complete, after `warmup_steps` RL steps and at least `min_reports` quick evals,
    the trial's scores are fitted by a line in the step (compute grows in step with the steps of a trial) through
    its last 4 evals and extrapolated to its own budget (`grpo.steps`, the trial's drawn value where it is searched).
    The upper end, the larger of that and its last eval, is widened by twice the residual spread (at least 0.02)
    plus z binomial standard errors of the two evals it compares: this trial's quick eval (`grpo.eval_problems`
    problems) and the best trial's final eval (`eval.problems`). z is the one-sided normal quantile of `alpha`
    split over the trial's looks (Bonferroni), so that sampling noise alone prunes a trial flat at the best's level
    at most `alpha` of the time over all its quick evals. A learning curve flattens, so a line through its recent evals
    over-states where it ends: the trial is pruned only when even that upper end is below the best completed
    trial's final value (above it, for a minimised metric). Metrics outside [0, 1] get no binomial term."""

    def __init__(self, total_steps: int, quick_problems: int, final_problems: int, warmup_steps: int = 0,
                 startup_trials: int = 0, min_reports: int = 3, alpha: float = 0.05):
        self.total_steps, self.quick_problems, self.final_problems = total_steps, quick_problems, final_problems
        self.warmup_steps, self.startup_trials, self.min_reports, self.alpha = (warmup_steps, startup_trials,
                                                                                min_reports, alpha)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        reports = sorted(trial.intermediate_values.items())
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if (len(reports) < self.min_reports or len(done) < max(1, self.startup_trials)
                or reports[-1][0] < self.warmup_steps):
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        sign = 1.0 if maximize else -1.0
        best = max(done, key=lambda t: sign * t.value)
        total = int(trial.params.get("grpo.steps", self.total_steps))  # the trial's own budget
        steps, values = (np.array(v, dtype=float) for v in zip(*reports[-4:], strict=True))
        slope, intercept = np.polyfit(steps, sign * values, 1)
        spread = float(np.std(sign * values - (slope * steps + intercept)))
        looks = max(1, round(len(reports) * total / max(1, reports[-1][0])) - self.min_reports + 1)
        z = NormalDist().inv_cdf(1 - self.alpha / looks)
        noise = np.hypot(_binomial_se(float(np.mean(values)), int(trial.params.get("grpo.eval_problems",
                                                                                    self.quick_problems))),
                         _binomial_se(best.value, int(best.params.get("eval.problems", self.final_problems))))
        upper = max(sign * values[-1], slope * total + intercept) + max(0.02, 2 * spread) + z * noise
        return bool(upper < sign * best.value)


def _binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy `p` measured on `n` problems (kept off 0 and 1 by a pseudo-count: 0 of 50
    right does not mean no noise); 0 for a metric outside [0, 1]."""
    if not 0.0 <= p <= 1.0:
        return 0.0
    p = min(max(p, 1 / (n + 2)), 1 - 1 / (n + 2))
    return float(np.sqrt(p * (1 - p) / n))


def suggest(trial: optuna.Trial, key: str, dim: SearchDim) -> Any:
    """One sampled value of a search dimension."""
    if dim.type == "categorical":
        return trial.suggest_categorical(key, dim.choices)
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)


class Reporter:
    """Reports the objective of each quick eval during RL to Optuna and prunes when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, progress=None):
        self.trial, self.metric, self.progress = trial, metric, progress

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.on_log(step, metrics)
        if self.metric in metrics and "train/rl_step" in metrics:  # an intermediate eval, not the final one
            # at its RL step: trials compared step for step, whatever SFT took; the pruner's budget is grpo.steps
            self.trial.report(metrics[self.metric], int(metrics["train/rl_step"]))
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: {self.metric} = {metrics[self.metric]:.4f}")


def gpu_slots(workers: int, gpus: int) -> list[tuple[int | None, float]]:
    """(GPU index, share of it billed) for each of `workers` processes over `gpus` visible GPUs: round-robin, one
    GPU each where there are enough; k workers on one GPU are billed 1/k each. Without GPUs they share the CPUs:
    (None, 1/workers) each."""
    if gpus == 0:
        return [(None, 1.0 / workers) for _ in range(workers)]
    return [(i % gpus, 1.0 / len(range(i % gpus, workers, gpus))) for i in range(workers)]


def objective(spec: SweepSpec, parent_id: str, progress_factory=None, gpu: int | None = None,
              share: float | Callable[[], float] = 1.0):
    """The objective of the study: one tracked training run per trial (on GPU `gpu`, billed for `share` of its
    device, or `share()` read at each trial's start), returning its final metric."""

    def run_trial(trial: optuna.Trial) -> float:
        # trial numbers come from the shared storage: past the budget, this one is surplus of a concurrent start
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=ACTIVE)
                 if t.number < trial.number and _alive(t)]
        if len(ahead) >= spec.trials:
            trial.study.stop()
            raise StudyFull(f"the study already has {spec.trials} trials")
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        base = load_config(spec.config, spec.overrides)
        assert base.sweep is not None
        values = {k: suggest(trial, k, dim) for k, dim in base.sweep.space.items()}
        cfg = load_config(spec.config, spec.overrides, values | {
            "tracking.phase": "sweep-trial", "output_dir": f"{base.output_dir}/{spec.study}/trial-{trial.number}",
        } | ({"model.device": f"cuda:{gpu}"} if gpu is not None else {}))
        tags = {"mlflow.parentRunId": parent_id, "optuna.study": spec.study, "optuna.trial": str(trial.number)}
        params = {"trial.number": str(trial.number)} | {f"trial.{k}": str(v) for k, v in values.items()}
        progress = progress_factory(cfg) if progress_factory else None
        part = share() if callable(share) else share
        try:
            result = run_experiment(cfg, Reporter(trial, base.sweep.metric, progress), resume=False, tags=tags,
                                    params=params, pruned_on=(optuna.TrialPruned,),
                                    run_name=f"trial-{trial.number}", device_share=part)
        finally:
            if progress is not None:
                progress.close()
        if base.sweep.metric not in result.metrics:
            raise KeyError(f"the run has no metric {base.sweep.metric!r}")
        return result.metrics[base.sweep.metric]

    return run_trial


def _worker(spec: SweepSpec, parent_id: str, n_trials: int, worker: int, threads: int, gpu: int | None,
            live: Any, device: int) -> None:
    """One sweep process: its trials on GPU `gpu` (None: the config's device), sharing device number `device` with
    the `live[device]` workers still running there."""
    torch.set_num_threads(threads)  # the workers share the machine's cores instead of each taking all of them
    cfg = load_config(spec.config, spec.overrides)
    study = open_study(cfg, spec.storage, spec.study, worker)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def share() -> float:
        """This worker's part of its device as a trial starts: 1/k while k workers are left on it (a worker whose
        siblings have finished holds all of it). A CPU run reads it from RLSCALE_CPU_SHARE (`cpu_devices`)."""
        part = 1.0 / max(1, live[device])
        os.environ["RLSCALE_CPU_SHARE"] = repr(part)
        return part

    try:
        study.optimize(objective(spec, parent_id, gpu=gpu, share=share), n_trials=n_trials, catch=(Exception,))
    finally:
        with live.get_lock():
            live[device] -= 1


def worker_slots(device: str, workers: int) -> list[tuple[int | None, float]]:
    """Where each sweep worker trains and the share of its device it is billed: spread over the visible GPUs for
    'auto'/'cuda', all on the one GPU of 'cuda:N' (1/workers each), the CPUs on a CPU (1/workers of them each)."""
    if device.startswith("cuda:"):
        return [(None, 1.0 / workers) for _ in range(workers)]
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") and torch.cuda.is_available() else 0
    return gpu_slots(workers, gpus)


def parent_run(client: MlflowClient, cfg: ExperimentConfig, study: optuna.Study, storage: str = "") -> str:
    """The sweep's parent run: created with the study (its storage and name as tags, so the study can be found
    from the run), reopened (RUNNING) when the sweep is resumed."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    assert cfg.sweep is not None
    tags = {"phase": "sweep", "optuna.study": study.study_name, "optuna.storage": safe_uri(storage),
            "project": cfg.name, "sweep.metric": cfg.sweep.metric, "sweep.direction": cfg.sweep.direction}
    run = client.create_run(experiment_id(client, cfg.name, Path(cfg.tracking.root)), tags=tags,
                            run_name=study.study_name)
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    time.sleep(1.0)  # two sweeps started together both create one: the last writer's is kept, the other deleted
    winner = study.user_attrs[PARENT_ATTR]
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
        client.update_run(winner, status=RunStatus.to_string(RunStatus.RUNNING))
    return winner


def finish_parent(client: MlflowClient, run_id: str, study: optuna.Study, metric: str, status: str) -> None:
    """Best value and params of the study on the parent run (tags, since they change as a study grows)."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    now = int(time.time() * 1000)
    metrics = [Metric(f"sweep/trials_{k}", float(v), now, 0) for k, v in counts.items() if v]
    done = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no trials"
    tags = [RunTag("mlflow.note.content", f"Optuna study {study.study_name}: {done}; no trial finished yet")]
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        best = study.best_trial
        metrics.append(Metric(f"best/{metric}", float(best.value), now, 0))
        setting = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best.params.items())
        tags = [RunTag("best.trial", str(best.number))] + [RunTag(f"best.{k}", str(v)) for k, v in best.params.items()]
        tags.append(RunTag("mlflow.note.content", f"Optuna study {study.study_name}: {done}; best trial "
                           f"{best.number} ({metric} = {best.value:.4g}; {setting})"))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.set_terminated(run_id, status)


def run_sweep(config: str, overrides: list[str], trials: int | None = None, workers: int = 1,
              storage: str | None = None, study_name: str | None = None, progress_factory=None,
              on_trial=None) -> optuna.Study:
    """Run (or resume) a sweep until `trials` trials are complete or pruned; returns the study.

    With `workers` > 1, that many processes share the study; `on_trial(done, total)` is called as trials end."""
    cfg = load_config(config, overrides)
    if cfg.sweep is None or not cfg.sweep.space:
        raise ValueError(f"{config}: no [sweep] with a search space (sweep.space)")
    total = trials or cfg.sweep.trials
    spec = SweepSpec(config, list(overrides), storage or storage_url(cfg), study_name or cfg.sweep.study
                     or f"{cfg.name}-sweep", total)
    study = open_study(cfg, spec.storage, spec.study)
    client = open_client(cfg.tracking.uri, Path(cfg.tracking.root))
    parent_id = parent_run(client, cfg, study, spec.storage)
    done = len(study.get_trials(deepcopy=False, states=DONE))
    remaining = max(0, total - done)
    shares = [remaining // workers + (1 if i < remaining % workers else 0) for i in range(workers)]

    def report(*_) -> None:
        if on_trial:
            on_trial(len(study.get_trials(deepcopy=False, states=DONE)), total)

    status = "FINISHED"
    try:
        report()
        if workers == 1:
            study.optimize(objective(spec, parent_id, progress_factory), n_trials=remaining, catch=(Exception,),
                           callbacks=[report])
        else:
            ctx = multiprocessing.get_context("spawn")
            threads = max(1, torch.get_num_threads() // workers)
            active = [(i, n) for i, n in enumerate(shares) if n]
            slots = worker_slots(cfg.model.device, len(active))
            devices = [gpu or 0 for gpu, _ in slots]  # the workers on each device (one: the CPU or GPU of cuda:N)
            live = ctx.Array("i", [devices.count(d) for d in range(max(devices, default=0) + 1)])
            procs = [ctx.Process(target=_worker, args=(spec, parent_id, n, i, threads, gpu, live, d), daemon=True)
                     for (i, n), (gpu, _), d in zip(active, slots, devices)]
            for p in procs:
                p.start()
            while any(p.is_alive() for p in procs):
                report()
                time.sleep(1.0)
            for p in procs:
                p.join()
            report()
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        finish_parent(client, parent_id, study, cfg.sweep.metric, status)
    return study


@dataclass
class BestTrial:
    """A sweep's best complete trial, as its MLflow runs record it: what `rlscale train --from-sweep` trains."""

    parent_run_id: str
    study: str
    experiment: str  # the experiment the sweep ran in
    number: int
    run_id: str  # the trial's own MLflow run
    metric: str
    direction: str
    value: float
    values: dict[str, Any]  # config key -> the value the trial trained with, typed as the config reads it
    running: bool  # the parent run is RUNNING: a sweep under way, or one killed before it ended


def best_trial(client: MlflowClient, ref: str, experiment: str,
               space: dict[str, SearchDim] | None = None) -> BestTrial:
    """The best complete trial of a sweep: `ref` is its parent run id, or its study name (the parent run of that study
    in `experiment`). Any problem (no such sweep, no complete trial) is a one-line ValueError.

    Read from the MLflow store, not the Optuna storage: the store is the one the new run is written to anyway, while
    the storage may be a journal path relative to another directory, an RDB URL whose password the parent's tag
    masks, or a `--storage` given to the sweep only; and the trial's run id comes from the store in any case. The
    best trial is the one the study chose, as `finish_parent` tagged it (`best.trial`) when the sweep ended; for a
    sweep still RUNNING (or killed) it is the best FINISHED, unpruned child run by the sweep's metric (its final-eval
    value, the trial's objective) and direction, ties to the lowest trial number as in Optuna. Values are the
    trial's `trial.<key>` params, typed by the search dimension in `space` (the config's), else read as TOML
    literals: a float exactly as sampled (str of a float round-trips), an int as an int."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    from rlscale.experiments.config import parse_value

    what = f"--from-sweep {ref!r}"
    parent = None
    try:
        parent = client.get_run(ref)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    if parent is not None and parent.info.lifecycle_stage == "deleted":
        raise ValueError(f"{what}: that run is deleted")
    if parent is not None and not (parent.data.tags.get("phase") == "sweep" and "optuna.study" in parent.data.tags):
        tags = parent.data.tags
        if "optuna.trial" in tags and "mlflow.parentRunId" in tags:
            raise ValueError(f"{what}: that run is trial {tags['optuna.trial']} of study {tags.get('optuna.study')!r},"
                             f" not a sweep: pass its parent run {tags['mlflow.parentRunId']} or the study name")
        raise ValueError(f"{what}: run {ref} is not a sweep's parent run (no phase=sweep and optuna.study tags)")
    if parent is None:
        exp = client.get_experiment_by_name(experiment)
        found, token = [], None
        while exp is not None:
            page = client.search_runs([exp.experiment_id], "tags.phase = 'sweep'", ViewType.ACTIVE_ONLY,
                                      max_results=1000, page_token=token)
            found += [r for r in page if r.data.tags.get("optuna.study") == ref]
            token = page.token
            if not token:
                break
        if not found:
            raise ValueError(f"{what}: no sweep parent run with this id, and no study of this name in experiment "
                             f"{experiment!r}")
        if len(found) > 1:
            raise ValueError(f"{what}: {len(found)} sweeps of this study name in experiment {experiment!r} (parent "
                             f"runs {', '.join(r.info.run_id for r in found)}): pass one parent run id")
        parent = found[0]
    pid, tags = parent.info.run_id, parent.data.tags
    study, metric = tags["optuna.study"], tags.get("sweep.metric", "eval/accuracy")
    direction = tags.get("sweep.direction", "maximize")
    children, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pid}'",
                                  ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        children += [r for r in page if r.data.tags.get("optuna.trial", "").isdigit()]
        token = page.token
        if not token:
            break

    def fate(r) -> str:
        if r.data.tags.get("pruned") == "true":
            return "pruned"
        value = r.data.metrics.get(metric)
        if r.info.status == "FINISHED":
            return "complete" if value is not None and value == value else f"without {metric}"
        return r.info.status.lower()

    complete = {int(r.data.tags["optuna.trial"]): r for r in children if fate(r) == "complete"}
    if not complete:
        counts: dict[str, int] = {}
        for r in children:
            counts[fate(r)] = counts.get(fate(r), 0) + 1
        states = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no trial run"
        raise ValueError(f"{what}: sweep {study!r} (parent run {pid}) has no complete trial ({states}): nothing to "
                         f"train from")
    running = parent.info.status == "RUNNING"
    tagged = tags.get("best.trial", "")
    if not running and tagged.isdigit() and int(tagged) in complete:
        number = int(tagged)
    else:
        sign = -1.0 if direction == "maximize" else 1.0
        number = min(complete, key=lambda n: (sign * complete[n].data.metrics[metric], n))
    best = complete[number]

    def typed(key: str, text: str) -> Any:
        dim = (space or {}).get(key)
        try:
            if dim is not None and dim.type == "float":
                return float(text)
            if dim is not None and dim.type == "int":
                return int(text)
        except ValueError:
            pass
        if dim is not None and dim.type == "categorical":
            match = [c for c in dim.choices or [] if str(c) == text]
            if match:
                return match[0]
        return parse_value(text)

    values = {k.removeprefix("trial."): typed(k.removeprefix("trial."), v) for k, v in best.data.params.items()
              if k.startswith("trial.") and k != "trial.number"}
    exp_name = client.get_experiment(parent.info.experiment_id).name
    return BestTrial(pid, study, exp_name, number, best.info.run_id, metric, direction,
                     float(best.data.metrics[metric]), values, running)
