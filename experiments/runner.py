"""Wires a validated experiment to the trainer and the tracker: one training run = one MLflow run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from rlscale.experiments.config import ExperimentConfig, recipe_of
from rlscale.experiments.pretraining import pretraining
from rlscale.experiments.warmstart import (
    POLL_SECONDS,
    WarmStart,
    abandon,
    claim,
    find,
    local_model,
    sft_key,
    work_dir,
)
from rlscale.rl.accounting import Callback, cpu_devices
from rlscale.rl.checkpoint import latest_checkpoint
from rlscale.rl.model import pick_device, pick_dtype
from rlscale.rl.pipeline import RunResult, check_inputs, run_pipeline
from rlscale.rl.tasks import Problem, Task
from rlscale.tracking.cost import device_key, load_price_table
from rlscale.tracking.run import TrackedRun, experiment_id, flatten, git_info, masked, open_client, safe_uri

log = logging.getLogger(__name__)


class Fanout:
    """Hands every metric to several callbacks. Each sees every step, whatever their order, even when another
    raises (a pruned trial's reporter): the first exception is raised once all have seen the step, so the tracker
    records the step that caused it."""

    def __init__(self, *callbacks: Callback):
        self.callbacks = callbacks

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        error: BaseException | None = None
        for cb in self.callbacks:
            try:
                cb.on_log(step, metrics)
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error


def run_experiment(
    cfg: ExperimentConfig,
    progress: Callback,
    resume: bool = True,
    *,
    tags: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    pruned_on: tuple[type[BaseException], ...] = (),
    run_name: str | None = None,
    device_share: float = 1.0,
    sft_only: bool = False,
    claimed: str | None = None,
) -> RunResult:
    """Train `cfg`; with tracking on, the run, its metrics, cost and fate go to MLflow.

    `tags` and `params` are added to the run's own (a sweep trial's parent and trial number, grid coordinates);
    an exception of a `pruned_on` type marks the run pruned. `device_share` is the part of its GPU the run is
    billed for (1/k when k sweep workers share one). With `sft.reuse` (and tracking, one process), RL starts from
    the shared SFT of the same inputs, trained first as its own run when the store has none (`warm_start`): the
    run is billed from then to its end, for its own work; `compute/flops/lineage` and `cost/usd_lineage` add the
    SFT's. `sft_only` trains just the SFT, into the run `claimed` (created by the warm start's claim)."""
    started = time.perf_counter()
    task, eval_problems = check_inputs(cfg)  # bad input stops here, before a run exists in the store
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun only rank 0 writes to MLflow
    if not cfg.tracking.enabled or int(os.environ.get("RANK", "0")) != 0:
        return run_pipeline(cfg, progress, resume=resume, started=started, device_share=device_share)
    root = Path(cfg.tracking.root)
    table = load_price_table(cfg.tracking.prices)
    device = pick_device(cfg.model.device)
    cuda = device.type == "cuda"
    name = device_name(device)
    price_key = device_key(device.type, name, table, cfg.tracking.price_key)  # an unknown GPU stops here
    held = world * (device_share if cuda else cpu_devices())  # what the run is billed for, every second
    client = open_client(cfg.tracking.uri, root)
    warm, ancestors = None, {}
    if cfg.sft.reuse and world == 1 and not sft_only:
        warm = warm_start(cfg, client, progress, device_share)
        ancestors = {"compute/flops": warm.metrics.get("compute/flops/lineage", warm.metrics.get("compute/flops", 0.0)),
                     "cost/usd": warm.metrics.get("cost/usd_lineage", warm.metrics.get("cost/usd", 0.0))}
        started = time.perf_counter()  # the SFT run billed its own time; waiting for another worker's is idle
    commit, _ = git_info()
    tags = {
        "mlflow.source.name": safe_uri(shlex.join(["rlscale" if Path(sys.argv[0]).name == "rlscale" else sys.argv[0],
                                                   *sys.argv[1:]]))[:500],
        "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": commit,
        "phase": cfg.tracking.phase, "recipe": recipe_of(cfg), "task": cfg.task.name, "model.name": cfg.model.name,
        "device.type": device.type, "device.name": name, "device.unit": table[price_key].unit,
        "device.count": f"{held:g}", "device.share": f"{device_share:g}", "world_size": str(world),
        "device.dtype": str(pick_dtype(cfg.model.dtype, device)).removeprefix("torch."),
        "device.threads_vcpus": f"{1.0 if cuda else cpu_devices(torch.get_num_threads(), share=0.0):g}",  # MFU's peak
        "seed": str(cfg.seed), "rlscale.version": version("rlscale"),
    } | (tags or {})
    if sft_only:  # a shared SFT is no recipe's point: its score is the start of each RL run's curve
        tags.pop("recipe")
    if warm is not None:
        tags |= {"sft.run_id": warm.run_id, "sft.key": warm.key, "sft.waited_seconds": f"{warm.waited_seconds:.1f}"}
    run_name = run_name or f"{cfg.model.name}-{cfg.task.name}-s{cfg.seed}"
    # a run resumed from a checkpoint continues the MLflow run that wrote it (no step is counted twice)
    id_file = Path(cfg.output_dir) / "mlflow_run_id"
    resume_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    if resume_id and latest_checkpoint(Path(cfg.output_dir) / "checkpoints") is None:
        resume_id = None
    if resume_id and not run_exists(client, resume_id):  # the store was switched since: a new run here
        log.warning("the checkpoint in %s belongs to run %s, which is not in the store %s: the resumed training is "
                    "recorded as a new run there", cfg.output_dir, resume_id, safe_uri(client.tracking_uri))
        resume_id = None
    left_out = {"sweep", "grid", "grpo"} if sft_only else {"sweep", "grid"}  # a shared SFT has no RL settings
    run_params = flatten(cfg.model_dump(exclude=left_out)) | (params or {})
    prices = {k: e.usd_per_hour for k, e in table.items()}
    with TrackedRun(client, cfg.name, run_name, tags, run_params, price_key, prices, cfg.tracking.flush_seconds,
                    root, resume_run_id=claimed or resume_id, devices=held, system_metrics=cfg.tracking.system_metrics,
                    pruned_on=pruned_on, joined=claimed is not None, ancestors=ancestors) as tracked:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(tracked.run_id)
        tracked.log_dict(masked(cfg.model_dump(mode="json", exclude=left_out)), "config.json")
        train_set, eval_set = problem_sets(cfg, task, eval_problems)
        tracked.log_dataset(train_set, "train")
        tracked.log_dataset(eval_set, "eval")
        tracked.summary = f"{cfg.task.name} on {cfg.model.name}"
        try:
            result = run_pipeline(cfg, Fanout(progress, tracked), resume=resume, started=started,
                                  device_share=device_share, warm_start=warm and warm.folder, sft_only=sft_only)
            if sft_only:  # the model travels with its run: any machine on this store can start from it
                tracked.log_artifacts(result.model_dir, "sft")
        finally:  # a failed or killed run's checkpoint is what a resume needs: keep it with the run
            ckpt = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
            if cfg.tracking.log_checkpoints and ckpt is not None:
                tracked.log_artifacts(ckpt[2], f"checkpoints/{ckpt[2].name}")
        tracked.set_tags({"model.params": result.n_params, "model.trainable_params": result.trainable_params})
        if (pretrained := pretraining(cfg.model, result.n_params)) is not None:  # the model's first ancestor
            tracked.on_log(int(result.metrics.get("eval/sft_steps", 0)) + (0 if sft_only else cfg.grpo.steps),
                           pretrained["metrics"])
            tracked.set_tags(pretrained["tags"])
        tracked.log_dict({"rows": result.eval_table}, "eval_samples.json")
        if cfg.tracking.log_model and result.model_dir and not sft_only:  # a LoggedModel, its scores linked to it
            scores = {k: v for k, v in result.metrics.items() if k.startswith("eval/")}
            tracked.log_model(result.model_dir, "model", int(result.metrics.get("eval/sft_steps", 0))
                              + cfg.grpo.steps, scores, eval_set,
                              params={"model.params": str(result.n_params), "task": cfg.task.name},
                              tags={"recipe.model": cfg.model.name, "lora": str(cfg.model.lora is not None).lower()})
    result.run_id = tracked.run_id
    result.metrics |= {k: v for k, v in tracked.last.items() if k.startswith(("cost/", "compute/flops/lineage"))}
    return result


def warm_start(cfg: ExperimentConfig, client, progress: Callback, device_share: float = 1.0) -> WarmStart:
    """The shared SFT `cfg` starts from: the store's finished one with the same key, else trained now as its own run
    (phase `sft`), or waited for while another worker trains it."""
    root = Path(cfg.tracking.root)
    key = sft_key(cfg)
    exp_id = experiment_id(client, cfg.name, root)
    since, waiting = time.monotonic(), None
    while True:
        done, live = find(client, exp_id, key)
        if done is not None:
            return WarmStart(done.info.run_id, key, local_model(client, root, done), done.data.metrics,
                             time.monotonic() - since)
        if live is not None:
            if waiting != live.info.run_id:
                log.info("waiting for SFT run %s (host %s), which trains the same warm start", live.info.run_id,
                         live.data.tags.get("sft.host"))
                waiting = live.info.run_id
            time.sleep(POLL_SECONDS)
            continue
        run_id = claim(client, exp_id, key, f"sft-{cfg.model.name}-{cfg.task.name}-s{cfg.seed}")
        if run_id is None:
            continue
        sft_cfg = cfg.model_copy(update={
            "output_dir": str(work_dir(root, key, run_id)),
            "tracking": cfg.tracking.model_copy(update={"phase": "sft"})})
        try:
            result = run_experiment(sft_cfg, progress, resume=False, run_name=f"sft-{key[:8]}",
                                    device_share=device_share, sft_only=True, claimed=run_id)
        except BaseException:
            abandon(client, run_id)
            raise
        # its own: used as trained (the store may be down now, the run's end spooled), never read back
        return WarmStart(run_id, key, Path(result.model_dir), result.metrics, 0.0)


def problem_sets(cfg: ExperimentConfig, task: Task, eval_problems: list[Problem]) -> tuple[dict, dict]:
    """The run's training and held-out data as MLflow dataset fields (name, digest, source, schema, profile).

    Held out: the problems actually evaluated (question, answer). Training: a dataset task's training rows from its
    file; a generated task's generator (task params and seed: digest and planned size, the draws are not kept)."""
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource

    def frame(problems: list[Problem]) -> pd.DataFrame:
        return pd.DataFrame({"question": [task.question(p) for p in problems],
                             "answer": [task.answer(p) for p in problems]})

    params = cfg.task.model_dump(mode="json")
    path = getattr(cfg.task, "path", None)
    eval_path = getattr(cfg.task, "eval_path", None) or path
    eval_source = str(Path(eval_path).resolve()) if path else CodeDatasetSource(
        {"task": cfg.task.name, "params": json.dumps(params, sort_keys=True), "seed": str(cfg.eval.seed)})
    eval_set = dataset_fields(frame(eval_problems), f"{cfg.task.name}-eval", eval_source)
    rows = getattr(task, "rows", None)
    if path and rows is not None:
        train_set = dataset_fields(frame(rows("train")), f"{cfg.task.name}-train", str(Path(path).resolve()))
    else:
        spec = json.dumps({"task": cfg.task.name, "params": params, "seed": cfg.seed}, sort_keys=True)
        planned = cfg.sft.steps * cfg.sft.batch_size + cfg.grpo.steps * cfg.grpo.prompts_per_step
        train_set = {"name": f"{cfg.task.name}-train", "digest": hashlib.sha256(spec.encode()).hexdigest()[:8],
                     "source_type": "code", "source": json.dumps({"tags": {"generator": spec}}), "schema": None,
                     "profile": json.dumps({"num_rows": planned, "drawn": "at random from the generator"})}
    return train_set, eval_set


def dataset_fields(data: Any, name: str, source: Any = None) -> dict:
    """An MLflow dataset's fields (name, digest, source, schema, profile) for a DataFrame, a Hugging Face Dataset or a
    list of rows; nested cells (chat messages) are recorded as JSON text."""
    import mlflow.data
    import pandas as pd

    df = data if isinstance(data, pd.DataFrame) else data.to_pandas() if hasattr(data, "to_pandas") else (
        pd.DataFrame(list(data)))
    nested = [c for c in df.columns if df[c].map(lambda v: isinstance(v, list | dict | tuple)).any()]
    if nested:
        df = df.assign(**{c: df[c].map(lambda v: json.dumps(v, default=str)) for c in nested})
    with warnings.catch_warnings():  # a file path "can be interpreted in multiple ways": all of them local
        warnings.simplefilter("ignore")
        e = mlflow.data.from_pandas(df, source=source, name=name)._to_mlflow_entity()
    return {"name": e.name, "digest": e.digest, "source_type": e.source_type, "source": e.source, "schema": e.schema,
            "profile": e.profile}


def device_name(device: torch.device) -> str:
    """What a price table and a reader tell devices apart by: the GPU's name, or the CPU's model (not `x86_64`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model Name", "cpu model", "Processor") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
