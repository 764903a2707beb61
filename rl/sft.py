"""Cold-start SFT on generated solutions and verification examples (the R1 pipeline: SFT, then RL)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlscale.rl import distributed
from rlscale.rl.accounting import Callback, Meter
from rlscale.rl.checkpoint import load_checkpoint, save_checkpoint, stop_if_requested
from rlscale.rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts
from rlscale.rl.grpo import lr_lambda
from rlscale.rl.self_verify import sft_examples


class SFTConfig(BaseModel):
    """Cold-start supervised fine-tuning settings."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, ge=0, description="Optimizer steps (the budget leaves RL room to improve).")
    batch_size: int = Field(64, ge=1, description="Examples per step.")
    learning_rate: float = Field(2e-3, gt=0.0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    verify_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of examples that teach verification.")
    verify_correct_share: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of verification examples showing a correct answer (the rest wrong)."
    )
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0: never).")
    reuse: bool = Field(
        True, description="Start from a finished SFT with the same inputs (model, data, SFT and eval config, seed, "
        "code) when there is one, else train it once for every run that needs it (needs tracking)."
    )
    target_accuracy: float | None = Field(
        None, gt=0.0, le=1.0, description="Stop early once greedy accuracy on training-split problems reaches this."
    )
    check_every: int = Field(20, ge=1, description="Steps between checks of `target_accuracy`.")
    check_problems: int = Field(200, ge=1, le=100_000, description="Training-split problems in each such check.")


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task,
    cfg: SFTConfig,
    *,
    seed: int,
    meter: Meter,
    callback: Callback,
    ckpt_dir: Path | None = None,
    accuracy: Callable[[], float] | None = None,
) -> int:
    """Minimise -log p(completion | prompt) on fresh generated examples each step; resumes from `ckpt_dir`.

    With `cfg.target_accuracy`, `accuracy()` is checked every `cfg.check_every` steps and SFT stops once it
    reaches the target (RL starts from a model that still has room). When checkpoints are kept, the last step's
    is marked finished: a resume from it trains no further step. Returns the number of steps run."""
    device = next(model.parameters()).device
    trained = [p for p in model.parameters() if p.requires_grad]  # every weight, or the LoRA adapters
    optimizer = torch.optim.AdamW(trained, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.steps))
    generator = torch.Generator().manual_seed(seed)
    state = load_checkpoint(ckpt_dir, "sft", model, optimizer, scheduler, generator, meter) if ckpt_dir else None
    if state and state.get("finished"):  # SFT ended before the run was interrupted: never trained again
        return state["step"]
    start = state["step"] if state else 0
    keep = ckpt_dir is not None and (cfg.checkpoint_every > 0 or state is not None)  # checkpoints are kept
    if cfg.batch_size % distributed.world():
        raise ValueError(f"sft.batch_size {cfg.batch_size} is not divisible by {distributed.world()} ranks")
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed.world() > 1 else model
    model.train()
    for step in range(start, cfg.steps):
        rng = random.Random(f"sft:{seed}:{step}")
        problems = task.problems(cfg.batch_size, "train", seed=-(seed * 1_000_003 + step) - 1)
        examples = sft_examples(task, problems, rng, cfg.verify_fraction, cfg.verify_correct_share)
        examples = examples[distributed.rank() :: distributed.world()]  # under torchrun each rank takes a slice
        with meter.phase("sft"):
            ids, mask = encode_prompts(tokenizer, [p for p, _ in examples], device)
            cids, cmask = encode_completions(tokenizer, [c for _, c in examples], device)
            batch = Batch(ids, mask, cids, cmask, [])
            logp = completion_logprobs(net, batch)
            # token-level negative log-likelihood over the global batch (all ranks' tokens)
            loss = -(logp * cmask).sum() / distributed.per_rank_mean(cmask.sum().clamp(min=1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if distributed.any_rank(not (torch.isfinite(loss) and torch.isfinite(grad_norm))):
                if ckpt_dir:  # the weights are still the last good ones: keep them for a resume
                    save_checkpoint(ckpt_dir, "sft", step, model, optimizer, scheduler, generator, meter)
                raise FloatingPointError(f"non-finite SFT loss or gradient at SFT step {step + 1} (loss {loss.item()})")
            optimizer.step()
            scheduler.step()
        meter.add("sft", meter.fm.logprobs(batch, train=True))
        meter.count(problems=len(problems) // distributed.world(), tokens_prompt=int(mask.sum()),
                    tokens_trained=int(cmask.sum()))
        metrics = {"sft/loss": loss.item(), "sft/grad_norm": float(grad_norm), "sft/lr": scheduler.get_last_lr()[0]}
        callback.on_log(step + 1, metrics | meter.metrics())
        reached = False
        if cfg.target_accuracy and accuracy and (step + 1) % cfg.check_every == 0:
            reached = distributed.from_rank0(accuracy() if distributed.rank() == 0 else None) >= cfg.target_accuracy
            model.train()
        done = reached or step + 1 == cfg.steps
        resumable = (model, optimizer, scheduler, generator, meter)
        if keep and (done or cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(ckpt_dir, "sft", step + 1, *resumable, finished=done)
        stop_if_requested(ckpt_dir, "sft", step + 1, *resumable, finished=done)
        if done:
            return step + 1
    return cfg.steps
