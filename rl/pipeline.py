"""The R1 pipeline end to end: build or load a model, cold-start SFT, evaluate, GRPO, evaluate, save."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel

from rlscale.rl import distributed
from rlscale.rl.accounting import Callback, FlopModel, Meter, cpu_devices
from rlscale.rl.chat import for_model
from rlscale.rl.checkpoint import (
    check_checkpoints,
    check_replaceable,
    clear_checkpoints,
    fresh_tmp,
    latest_checkpoint,
    publish,
)
from rlscale.rl.energy import GpuEnergy, gpu_uuid
from rlscale.rl.evaluate import EvalConfig, evaluate
from rlscale.rl.generate import sample
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import (
    ModelConfig,
    add_lora,
    check_model_path,
    count_params,
    load_model,
    merge_lora,
    merged_copy,
    pick_device,
    save_model,
    sync_merged,
)
from rlscale.rl.sft import SFTConfig, train_sft
from rlscale.rl.tasks import ArithmeticParams, Problem, Task, TaskConfig, make_task


class InputError(ValueError):
    """Bad input (task, model path, data) found before any training starts."""


class PipelineConfig(BaseModel):
    """Everything one training run needs."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, description="Seed of weights init, training problems and sampling.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    task: TaskConfig = Field(default_factory=ArithmeticParams, description="The verifiable task.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Cold-start SFT.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO with self-verification.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    output_dir: str = Field("outputs/run", description="Where checkpoints and models are written.")


@dataclass
class RunResult:
    """What a finished pipeline hands back."""

    metrics: dict[str, float]  # final eval, compute and data metrics
    sft_metrics: dict[str, float]  # eval of the SFT checkpoint RL started from
    eval_table: list[dict] = field(default_factory=list)
    model_dir: Path | None = None
    n_params: int = 0  # the base model's parameters (LoRA adapters not included)
    trainable_params: int = 0  # what the optimizer updates: every weight, or the LoRA adapters
    run_id: str | None = None  # set by the tracking layer


def _save_atomic(model, tokenizer, path: Path, extra: dict[str, str] | None = None) -> None:
    """Save the model (and `extra` files: name -> text) to a temporary folder, then publish it at `path`: only
    over a folder rlscale wrote there (check_inputs refused anything else before training)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp(path)
    try:
        save_model(model, tokenizer, tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        publish(tmp, path, "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse (ValueError) an output_dir whose checkpoints/, sft/ or final/ rlscale did not write: nothing there
    is ever replaced or removed unless rlscale wrote it."""
    out = Path(output_dir)
    check_checkpoints(out / "checkpoints")
    for name in ("sft", "final"):
        check_replaceable(out / name, "model")


def env_rank(name: str = "RANK", default: int = 0) -> int:
    """A torchrun variable (RANK, WORLD_SIZE, LOCAL_RANK) as an int; anything else is an InputError."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value[:40]!r} is not an integer (set by torchrun; unset it to run alone)") from None


def check_inputs(cfg: PipelineConfig) -> tuple[Task, list[Problem]]:
    """Everything that can be wrong with the input, found before anything runs or is written."""
    try:
        task = make_task(cfg.task)
        eval_problems = task.problems(cfg.eval.problems, "eval", seed=cfg.eval.seed)
        task.problems(1, "train", seed=cfg.seed)
        if cfg.model.path:
            check_model_path(cfg.model.path)
        elif cfg.task.prompt_format == "chat":
            raise ValueError("task.prompt_format = 'chat' needs a model with a chat template (model.path); "
                             "the tiny character models use 'compact'")
        pick_device(cfg.model.device)
        check_output_dir(cfg.output_dir)
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            env_rank(name, default)
    except (ValueError, OSError) as e:
        raise InputError(str(e).splitlines()[0]) from e
    return task, eval_problems


def run_pipeline(cfg: PipelineConfig, callback: Callback, resume: bool = True, *, started: float | None = None,
                 device_share: float = 1.0, warm_start: Path | None = None, sft_only: bool = False) -> RunResult:
    """SFT then GRPO with self-verification, evaluated before and after RL; resumes from checkpoints.

    `warm_start` is a finished SFT's folder (its merged model and `eval.json`): RL starts from it and SFT is not
    trained, so the run's compute is its own RL and evals. `sft_only` stops after SFT, its model saved in
    `<output_dir>/sft`. Compute is billed from `started` (a `time.perf_counter()` value; default: now) to the end:
    the run holds its vCPUs on a CPU, `device_share` of its GPU on a GPU (1/k when k runs share one)."""
    started = time.perf_counter() if started is None else started
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    base_task, _ = check_inputs(cfg)
    if not resume:
        clear_checkpoints(ckpt_dir)
    found = latest_checkpoint(ckpt_dir)
    sft_dir = Path(warm_start) if warm_start is not None else out / "sft"
    # a warm start, or LoRA resuming RL (the adapters are in the checkpoint): the SFT weights (merged) from sft_dir
    from_sft = warm_start is not None or cfg.model.lora is not None and found is not None and found[0] == "rl"
    try:
        model_cfg = cfg.model.model_copy(update={"path": str(sft_dir)}) if from_sft else cfg.model
        model, tokenizer = load_model(model_cfg, seed=cfg.seed)
        task = for_model(base_task, tokenizer)  # chat prompts for an instruct model's template
        eval_problems = task.problems(cfg.eval.problems, "eval", seed=cfg.eval.seed)
    except (ValueError, OSError) as e:
        raise InputError(str(e).splitlines()[0]) from e
    n_params = count_params(model)
    if cfg.model.lora is not None:  # SFT's adapters, or RL's on top of the merged SFT weights
        model = add_lora(model, cfg.model.lora, seed=cfg.seed + from_sft)
    n_trainable = count_params(model, trainable=True)
    device = next(model.parameters()).device
    distributed.setup(device)  # under torchrun: join the process group (gloo on CPU, nccl on GPU)
    lead = distributed.rank() == 0  # evaluates, saves models and (in tracking) writes to MLflow
    # device-seconds count every vCPU a CPU run holds (the unit CPU time is priced in), its share of each GPU;
    # under torchrun each rank counts its own (and its own GPU's energy) and the meter sums them
    cuda = device.type == "cuda"
    meter = Meter(FlopModel.of(model), devices=device_share if cuda else cpu_devices(), started=started,
                  energy=GpuEnergy([gpu_uuid(device)]) if cuda else None)

    # LoRA: rollouts and evals sample from a copy with the adapters folded in, refreshed before each use
    sampler = merged_copy(model) if cfg.model.lora is not None and cfg.model.lora.merged_sampling else None

    def drawing() -> tuple[PreTrainedModel, FlopModel]:
        """What an eval samples from, refreshed (the merged copy, or the model itself), and its FLOP model."""
        if sampler is None:
            return model, meter.fm
        with meter.phase("eval"):
            meter.add("eval", sync_merged(sampler, model))
        return sampler, meter.fm.without_adapter()

    def run_eval(problems, step: int) -> tuple[dict[str, float], list[dict]]:
        if not lead:
            return {}, []
        gen = torch.Generator(device=device).manual_seed(cfg.eval.seed + step)
        draw, fm = drawing()
        with meter.counting(fm):
            metrics, table = evaluate(draw, tokenizer, task, problems, cfg.eval, meter, gen)
        model.train()
        return metrics, table

    # 1. cold-start SFT (skipped from a warm start, or when an RL checkpoint exists: its weights include it)
    if warm_start is None and (found is None or found[0] == "sft"):
        check_problems = task.problems(cfg.sft.check_problems, "train", seed=-cfg.seed - 10**9)  # no eval leakage

        def train_accuracy() -> float:
            draw, fm = drawing()
            with meter.phase("eval"):
                b = sample(draw, tokenizer, [p.prompt for p in check_problems], cfg.eval.max_new_tokens, greedy=True)
            meter.add("eval", fm.generation(b))
            return sum(task.is_correct(p, c) for p, c in zip(check_problems, b.texts)) / len(check_problems)

        sft_steps = train_sft(model, tokenizer, task, cfg.sft, seed=cfg.seed, meter=meter, callback=callback,
                              ckpt_dir=ckpt_dir, accuracy=train_accuracy)
        sft_metrics, sft_table = run_eval(eval_problems, sft_steps)
        sft_metrics["eval/sft_steps"] = float(sft_steps)
        callback.on_log(sft_steps, sft_metrics | meter.metrics())
        model = merge_lora(model)  # LoRA: the SFT adapters folded into the weights; RL trains fresh ones on top
        if lead:  # the SFT model and its eval in one folder, published whole
            _save_atomic(model, tokenizer, sft_dir, {"eval.json": json.dumps(sft_metrics)})
        distributed.barrier()
        if sft_only:
            return RunResult(sft_metrics | meter.metrics(), sft_metrics, sft_table, sft_dir, n_params, n_trainable)
        if cfg.model.lora is not None:
            model = add_lora(model, cfg.model.lora, seed=cfg.seed + 1)
    else:
        sft_metrics = json.loads((sft_dir / "eval.json").read_text())
        if warm_start is not None and found is None:  # the curve starts at the SFT model's score, none of its compute
            callback.on_log(int(sft_metrics["eval/sft_steps"]), sft_metrics | meter.metrics())
    sft_steps = int(sft_metrics["eval/sft_steps"])

    # 2. GRPO from the SFT checkpoint, against a frozen copy of it when beta > 0 (with LoRA: the same weights
    #    with the adapters switched off, no second copy)
    ref_model = None
    if cfg.grpo.beta > 0 and cfg.model.lora is None:
        ref_model, _ = load_model(cfg.model.model_copy(update={"path": str(sft_dir)}), seed=cfg.seed)
        ref_model.eval().requires_grad_(False)
    quick = eval_problems[: cfg.grpo.eval_problems]
    train_grpo(
        model, tokenizer, task, cfg.grpo, seed=cfg.seed, meter=meter, callback=callback, ref_model=ref_model,
        ckpt_dir=ckpt_dir, step_offset=sft_steps, on_eval=lambda step: run_eval(quick, step)[0], sampler=sampler,
    )

    # 3. final held-out evaluation on the same problems as the SFT checkpoint's
    metrics, table = run_eval(eval_problems, sft_steps + cfg.grpo.steps)
    for k, v in sft_metrics.items():
        metrics[k if k.startswith("eval/sft_") else k.replace("eval/", "eval/sft_", 1)] = v
    if lead:
        metrics["eval/rl_gain"] = metrics["eval/accuracy"] - sft_metrics["eval/accuracy"]
    metrics |= meter.metrics()
    callback.on_log(sft_steps + cfg.grpo.steps, metrics)
    if lead:  # the final model as one plain HF folder (LoRA adapters merged)
        _save_atomic(merge_lora(model), tokenizer, out / "final")
    distributed.barrier()
    return RunResult(metrics, sft_metrics, table, out / "final", n_params, n_trainable)

