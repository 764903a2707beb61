"""GRPO with self-verification, readable top to bottom.

Shao et al. 2024 (DeepSeekMath) group-relative advantages; DAPO (Yu et al. 2025) clip-higher and token-level
loss; Dr. GRPO (Liu et al. 2025) unscaled advantages and constant normaliser; RISE-style self-verification:
each step the model also judges its own answers and is rewarded for agreeing with the program verifier.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlscale.rl import distributed
from rlscale.rl.accounting import Callback, Meter
from rlscale.rl.checkpoint import load_checkpoint, save_checkpoint, stop_if_requested
from rlscale.rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts, sample
from rlscale.rl.model import sync_merged
from rlscale.rl.self_verify import balanced_own, check_target, corrupt, p_yes, verdict_reward, verify_prompt
from rlscale.rl.tasks import Task


class GRPOConfig(BaseModel):
    """GRPO settings (names follow TRL's GRPOConfig where one exists)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(200, ge=0, description="RL steps (one batch of rollouts each).")
    prompts_per_step: int = Field(16, ge=1, description="Distinct problems per step.")
    num_generations: int = Field(8, ge=2, description="G: completions sampled per problem (the group).")
    max_new_tokens: int = Field(8, ge=1, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (log-probs use the same).")
    learning_rate: float = Field(3e-4, gt=0.0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    optim: Literal["adamw_torch", "adamw_torch_fused"] = Field(
        "adamw_torch", exclude_if=lambda v: v == "adamw_torch",
        description="AdamW's kernel, named as in transformers: 'adamw_torch_fused' (transformers' default, so TRL's) "
        "updates every weight in one kernel, ~7% of a tiny step on a CPU, with other float rounding than the measured "
        "tables, which use 'adamw_torch'.",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    num_iterations: int = Field(1, ge=1, description="mu: optimisation passes over each batch of rollouts.")
    epsilon_low: float = Field(0.2, ge=0.0, lt=1.0, description="Lower clip of the importance ratio (1 - eps_low).")
    epsilon_high: float = Field(0.28, ge=0.0, description="Upper clip of the importance ratio (1 + eps_high).")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient to the frozen reference (0: no reference model).")
    scale_rewards: bool = Field(True, description="Divide advantages by the group std (False: Dr. GRPO).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "cispo"] = Field(
        "dapo", description="Aggregation: per-sequence mean (grpo), token-level (dapo), constant (dr_grpo); cispo: "
        "the clipped ratio as a stop-gradient weight on log pi, token-level (MiniMax-M1)."
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Importance ratio per token, or per sequence (GSPO: the geometric mean over o_i)."
    )
    reward: Literal["verifier", "self_verdict"] = Field(
        "verifier", description="r_i: the program verifier's score (reads the answers), or 'self_verdict': the model's "
        "own P(yes) on its answer, label-free (the training answers are never read; needs self_verify = false)."
    )
    self_verify: bool = Field(True, description="Also train the model to verify its own answers.")
    verify_coef: float = Field(0.5, ge=0.0, description="Weight of the verification loss next to the solving loss.")
    verify_max_new_tokens: int = Field(32, ge=1, description="Longest check-and-verdict sampled.")
    verify_sft_coef: float = Field(
        0.0, ge=0.0, description="Weight of a supervised loss on the program's check of the shown answers (0: off)."
    )
    verify_balanced: bool = Field(
        True, description="Show right and wrong answers for checking at equal odds (own answers where they fit)."
    )
    verify_own: bool = Field(
        False, description="Check only the step's own answers, labelled by the program verifier, the larger class cut "
        "to the smaller's size (GenRM), trained by the supervised check loss alone (needs verify_sft_coef > 0, "
        "verify_coef = 0)."
    )
    verify_replay: int = Field(
        0, ge=0, description="With verify_own, the wrong own answers of the last N steps stay candidates for the check "
        "(late in RL wrong answers are few; the program's labels never go stale), right ones drawn to match (0: off)."
    )
    eval_every: int = Field(0, ge=0, description="Quick held-out eval every N steps (0: only before and after RL).")
    eval_problems: int = Field(200, ge=1, description="Held-out problems in a quick eval.")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0: never).")

    @model_validator(mode="after")
    def _label_free(self) -> GRPOConfig:
        if self.reward == "self_verdict" and self.self_verify:
            raise ValueError("grpo.reward = 'self_verdict' is label-free, but grpo.self_verify trains the verdicts on "
                             "the answers: set grpo.self_verify = false")
        if self.verify_replay and not self.verify_own:
            raise ValueError("grpo.verify_replay keeps own wrong answers for the check: it needs grpo.verify_own = "
                             "true")
        if self.verify_own and not (self.self_verify and self.verify_sft_coef > 0 and self.verify_coef == 0):
            raise ValueError("grpo.verify_own trains the check on the model's own answers by the supervised check "
                             "loss: it needs grpo.self_verify = true, verify_sft_coef > 0 and verify_coef = 0")
        return self


# ---------------------------------------------------------------- the math
SKIP_ZERO_ADVANTAGE = True  # the policy pass leaves out rows whose advantage is 0 where that changes nothing


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps); without `scale`, A_i = r_i - mean (Dr. GRPO)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def grpo_loss(
    logp: torch.Tensor,  # (B, T) log pi_theta(o_t | q, o_<t)
    old_logp: torch.Tensor,  # (B, T) log pi_theta_old, the sampling policy
    ref_logp: torch.Tensor | None,  # (B, T) log pi_ref, or None when beta = 0
    advantages: torch.Tensor,  # (B,) A_i, one per completion
    mask: torch.Tensor,  # (B, T) 1 on completion tokens
    cfg: GRPOConfig,
    num_tokens: float | None = None,  # sum_i |o_i| for `dapo` (default: this batch's; under DDP: per-rank mean)
    max_len: int | None = None,  # L for `dr_grpo`: the configured longest completion (default: this batch's width)
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective with optional k3 KL, aggregated as `cfg.loss_type`.

    `importance_sampling_level = "sequence"` (GSPO, arXiv 2507.18071) replaces each token's ratio with the
    sequence's s_i = exp(1/|o_i| sum_t log(pi_theta / pi_theta_old)), shared by its tokens.
    `loss_type = "cispo"` (MiniMax-M1, arXiv 2506.13585) keeps every token's gradient and clips only its weight:
    L = -1/sum_i |o_i| sum_i sum_t sg(min(rho_t, 1 + eps_high)) A_i log pi_theta(o_t)."""
    mask = mask.float()
    A = advantages[:, None]
    log_ratio = logp - old_logp
    if cfg.importance_sampling_level == "sequence":  # log s_i = 1/|o_i| sum_t log rho_t, one per sequence
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio)  # rho_t = pi_theta / pi_theta_old (or s_i)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)  # clip(rho_t, 1-eps_low, 1+eps_high)
    if cfg.loss_type == "cispo":
        weight = torch.clamp(ratio, max=1 + cfg.epsilon_high).detach()  # sg(min(rho_t, 1 + eps_high))
        per_token = -weight * A * logp  # -sg(w_t) A log pi_theta(o_t): the gradient of every token survives
    else:
        per_token = -torch.min(ratio * A, clipped * A)  # -min(rho_t A, clip(rho_t) A)
    kl = torch.zeros_like(logp)
    if cfg.beta > 0 and ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # k3 estimator of KL(pi_theta || pi_ref)
        per_token = per_token + cfg.beta * kl  # + beta * D_KL
    if cfg.loss_type == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif cfg.loss_type in ("dapo", "cispo"):  # 1/sum_i |o_i| sum_i sum_t
        loss = (per_token * mask).sum() / (num_tokens or mask.sum().clamp(min=1))
    else:  # dr_grpo: 1/(G * L) sum_i sum_t, L a constant
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        if cfg.loss_type == "cispo":  # a truncated weight, whatever the sign of A
            is_clipped = ratio > 1 + cfg.epsilon_high
        else:
            is_clipped = ((ratio < 1 - cfg.epsilon_low) & (A < 0)) | ((ratio > 1 + cfg.epsilon_high) & (A > 0))
        stats = {"clip_frac": float((is_clipped * mask).sum() / n), "kl": float((kl * mask).sum() / n)}
    return loss, stats


def lr_lambda(schedule: str, warmup: int, total_steps: int):
    """Multiplier of the peak learning rate at a step: linear warmup, then constant, linear or cosine decay."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return f


# ---------------------------------------------------------------- the loop
def train_grpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: GRPOConfig,
    *,
    seed: int,
    meter: Meter,
    callback: Callback,
    ref_model: PreTrainedModel | None = None,
    ckpt_dir: Path | None = None,
    step_offset: int = 0,
    on_eval=None,
    stop_after: int | None = None,
    sampler: PreTrainedModel | None = None,
) -> None:
    """Run `cfg.steps` GRPO steps, resuming from `ckpt_dir` when it holds an RL checkpoint.

    `on_eval(step)` runs a quick held-out eval every `cfg.eval_every` steps; metrics leave through `callback`
    at global step `step_offset + step`. `stop_after` ends the loop early (for tests of resume). With beta > 0
    the reference is `ref_model`, or when it is None the model's LoRA adapters switched off. `sampler`, a LoRA
    model's `merged_copy`, is refreshed at each step's start and samples the step's answers and checks."""
    G = cfg.num_generations
    if cfg.prompts_per_step % distributed.world():
        raise ValueError(f"grpo.prompts_per_step {cfg.prompts_per_step} is not divisible by {distributed.world()} "
                         "ranks")
    fm = meter.fm
    draw, fm_draw = (model, fm) if sampler is None else (sampler, fm.without_adapter())  # what samples, its FLOPs
    device = next(model.parameters()).device
    trained = [p for p in model.parameters() if p.requires_grad]  # every weight, or the LoRA adapters
    # not fused by default: its other rounding moved addition.toml's seed 1 SFT from 53.6% to 10.8% held-out (its
    # constant-lr end point is that sensitive): the measured tables are of the unfused optimizer
    optimizer = torch.optim.AdamW(trained, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=cfg.optim == "adamw_torch_fused")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.steps))
    generator = torch.Generator(device=device).manual_seed(seed + 7919 * distributed.rank())
    start = 0
    replay: list[list[tuple[str, str]]] = []  # per past step, its wrong answers: (check prompt, program's check)
    state = load_checkpoint(ckpt_dir, "rl", model, optimizer, scheduler, generator, meter) if ckpt_dir else None
    if state is not None:
        start = state["step"]
        replay = [[tuple(x) for x in past] for past in state["loop"].get("replay", [])]
    # under torchrun, DistributedDataParallel averages gradients over ranks; sampling uses the bare model
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed.world() > 1 else model

    for step in range(start, cfg.steps):
        if stop_after is not None and step >= stop_after:
            return
        model.train()
        replay_before = replay  # rebuilt, never mutated, in the step: a checkpoint of this step's start keeps it
        # 1. sample G completions for each of the step's problems: o_1..o_G ~ pi_theta_old(. | q)
        problems = task.problems(cfg.prompts_per_step, "train", seed=seed * 1_000_003 + step)
        problems = problems[distributed.rank() :: distributed.world()]  # under torchrun each rank takes a slice
        rng = random.Random(f"grpo:{seed}:{step}:{distributed.rank()}")
        rows = [p for p in problems for _ in range(G)]
        with meter.phase("rollout"):
            fold = sync_merged(sampler, model) if sampler is not None else 0.0  # W + alpha/r BA, this step's
            solve = sample(draw, tokenizer, [p.prompt for p in rows], cfg.max_new_tokens, cfg.temperature,
                           generator=generator, with_entropy=True)
        meter.add("rollout", fold + fm_draw.generation(solve))
        if cfg.reward == "verifier":
            rewards = torch.tensor([task.reward(p, c) for p, c in zip(rows, solve.texts)])  # r_i from the verifier
            correct = (rewards == 1.0).tolist()  # reward is 1 exactly when the verifier accepts the answer
        else:  # label-free: r_i = the model's own P(yes) on its answer, no answer key read
            judge = [verify_prompt(task, p, c) for p, c in zip(rows, solve.texts)]
            with meter.phase("verify_rollout"):
                rewards, passes = p_yes(draw, tokenizer, judge, [""] * len(rows), [p.prompt for p in rows])
            meter.add("verify_rollout", sum(fm_draw.forward(*x) for x in passes))
            rewards = rewards.float().cpu()
            correct = [task.is_correct(p, c) for p, c in zip(rows, solve.texts)]  # logged only, never a reward
        batches: list[tuple[str, Batch, torch.Tensor, float]] = [
            ("solve", solve, group_advantages(rewards, G, cfg.scale_rewards).to(device), 1.0)
        ]
        meter.count(problems=len(problems), samples_solve=len(rows), tokens_prompt=int(solve.prompt_mask.sum()),
                    tokens_generated=int(solve.completion_mask.sum()))

        # 2. self-verification: the model checks answers. Own answers only (verify_own, GenRM): the step's answers
        #    labelled by the program verifier, the larger class cut to the smaller's size. Else a class drawn at equal
        #    odds for each answer, its own where it fits (else the reference, or its answer perturbed); a sampled
        #    check is rewarded by agreement with the program verifier (RISE).
        if cfg.self_verify:
            shown, checked_rows, old = list(solve.texts), list(rows), []
            if cfg.verify_own:  # this step's answers, and the wrong ones kept from the last verify_replay steps
                past = [x for kept in replay for x in kept]  # (check prompt, program's check) of a wrong answer
                keep = balanced_own(correct + [False] * len(past), rng)
                old = [past[i - len(rows)] for i in keep if i >= len(rows)]
                mine = [i for i in keep if i < len(rows)]
                shown, checked_rows = [shown[i] for i in mine], [rows[i] for i in mine]
                if cfg.verify_replay:
                    wrong = [(verify_prompt(task, p, c), check_target(task, p, c, False))
                             for p, c, ok in zip(rows, solve.texts, correct) if not ok]
                    replay = [*replay, wrong][-cfg.verify_replay :]
            elif cfg.verify_balanced:
                for i, (p, ok) in enumerate(zip(rows, correct)):
                    want_correct = rng.random() < 0.5
                    if want_correct and not ok:
                        shown[i] = p.solution
                    elif not want_correct and ok:
                        shown[i] = corrupt(shown[i].strip(), rng)
            truth = [task.is_correct(p, c) for p, c in zip(checked_rows, shown)] + [False] * len(old)
            judge = [verify_prompt(task, p, c) for p, c in zip(checked_rows, shown)] + [j for j, _ in old]
            if cfg.verify_coef > 0:
                with meter.phase("verify_rollout"):
                    verify = sample(draw, tokenizer, judge, cfg.verify_max_new_tokens, cfg.temperature,
                                    generator=generator, with_entropy=True)
                meter.add("verify_rollout", fm_draw.generation(verify))
                v_rewards = torch.tensor([verdict_reward(v, ok) for v, ok in zip(verify.texts, truth)])
                batches.append(("verify", verify, group_advantages(v_rewards, G, cfg.scale_rewards).to(device),
                                cfg.verify_coef))
                meter.count(samples_verify=len(judge), tokens_prompt=int(verify.prompt_mask.sum()),
                            tokens_generated=int(verify.completion_mask.sum()))
            check = None  # the program's own check of the same answers, teacher-forced (none: no answer to check)
            if cfg.verify_sft_coef > 0 and judge:
                targets = [check_target(task, p, c, ok) for p, c, ok in zip(checked_rows, shown, truth)]
                targets += [t for _, t in old]
                check = Batch(*encode_prompts(tokenizer, judge, device),
                              *encode_completions(tokenizer, targets, device), targets)
            if cfg.verify_sft_coef > 0:  # every rank joins the mean, with or without answers to check
                n_check = check.completion_mask.sum() if check is not None else torch.zeros((), device=device)
                check_tokens = distributed.per_rank_mean(n_check.clamp(min=1))

        # 3. log-probs of the sampling policy (only needed when mu > 1) and of the reference (only when beta > 0)
        old, ref = {}, {}
        # completion tokens per batch, as the mean over ranks: token-level losses then average the global batch
        n_tok = {name: distributed.per_rank_mean(b.completion_mask.sum().clamp(min=1)) for name, b, _, _ in batches}
        with torch.no_grad():
            for name, b, _, _ in batches:
                if cfg.num_iterations > 1:
                    with meter.phase("policy"):
                        old[name] = completion_logprobs(model, b, cfg.temperature, dedupe=True)
                    meter.add("policy", fm.logprobs(b, dedupe=True))
                if cfg.beta > 0:  # pi_ref: a frozen copy of the SFT model, or with LoRA the adapters switched off
                    lora_off = ref_model is None
                    with meter.phase("reference"), (model.disable_adapter() if lora_off else nullcontext()):
                        ref[name] = completion_logprobs(model if lora_off else ref_model, b, cfg.temperature,
                                                        dedupe=True)
                    meter.add("reference", (fm.without_adapter() if lora_off else fm).logprobs(b, dedupe=True))

        # 4. mu passes of the clipped objective: L = L_solve + verify_coef * L_verify + verify_sft_coef * L_check
        metrics: dict[str, float] = {}
        # a row with A_i = 0 adds nothing to the loss's gradient when beta = 0, nor to its clip fraction but in cispo
        # with mu > 1 (its ratio is 1 here): it is not run (at least one row is, so every DDP rank joins backward)
        skip_zero = SKIP_ZERO_ADVANTAGE and cfg.beta == 0 and (cfg.num_iterations == 1 or cfg.loss_type != "cispo")
        for _ in range(cfg.num_iterations):
            with meter.phase("policy"):
                total = torch.zeros((), device=device)
                for name, b, adv, coef in batches:
                    live = adv != 0 if skip_zero else torch.ones_like(adv, dtype=torch.bool)
                    live[0] |= ~live.any()
                    part = b.select(live.nonzero().squeeze(1))
                    # a group's G rows share one prompt: it runs once, identical samples once (same gradients)
                    logp = old[name].clone() if name in old else torch.zeros(b.completion_ids.shape, device=device)
                    logp[live, : part.completion_ids.shape[1]] = completion_logprobs(
                        net, part, cfg.temperature, dedupe=True)
                    old_logp = old.get(name, logp.detach())  # mu = 1: pi_theta_old = pi_theta, no extra forward
                    max_len = cfg.max_new_tokens if name == "solve" else cfg.verify_max_new_tokens
                    loss, stats = grpo_loss(logp, old_logp, ref.get(name), adv, b.completion_mask, cfg, n_tok[name],
                                            max_len)
                    total = total + coef * loss
                    mask = b.completion_mask.float()
                    prefix = "train/" if name == "solve" else "train/verify_"
                    metrics[prefix + "loss"] = loss.item()
                    metrics[prefix + "clip_frac"] = stats["clip_frac"]
                    metrics[prefix + "kl"] = stats["kl"]
                    # the sampling policy's entropy at each sampled token (at mu = 1, pi_theta's)
                    metrics[prefix + "entropy"] = float((b.entropy * mask).sum() / mask.sum().clamp(min=1))
                    meter.add("policy", fm.logprobs(part, train=True, dedupe=True))
                    meter.count(tokens_trained=int(b.completion_mask.sum()))
                if cfg.self_verify and check is not None:
                    logp = completion_logprobs(net, check, dedupe=True)
                    cmask = check.completion_mask.float()
                    nll = -(logp * cmask).sum() / check_tokens  # L_check = -log p(program's check)
                    total = total + cfg.verify_sft_coef * nll
                    metrics["train/verify_sft_loss"] = nll.item()
                    meter.add("policy", fm.logprobs(check, train=True, dedupe=True))
                    meter.count(tokens_trained=int(check.completion_mask.sum()))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if distributed.any_rank(not (torch.isfinite(total) and torch.isfinite(grad_norm))):
                    if ckpt_dir:  # the weights are still the last good ones: keep them for a resume
                        save_checkpoint(ckpt_dir, "rl", step, model, optimizer, scheduler, generator, meter,
                                        loop={"replay": replay_before})
                    raise FloatingPointError(f"non-finite GRPO loss or gradient at RL step {step + 1} (loss "
                                             f"{total.item()}, grad norm {float(grad_norm)}, reward mean "
                                             f"{float(rewards.mean())})")
                optimizer.step()
        scheduler.step()

        # 5. report
        groups = rewards.view(-1, G)
        metrics.update({
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std()),
            "train/accuracy": sum(correct) / len(correct),  # the program verifier's, in either reward mode
            "train/zero_std_frac": float((groups.std(dim=1) == 0).float().mean()),
            "train/completion_len": float(solve.completion_mask.sum(-1).float().mean()),
            "train/grad_norm": float(grad_norm),
            "train/lr": scheduler.get_last_lr()[0],
            "train/rl_step": float(step + 1),
        })
        if cfg.reward == "self_verdict":  # reward hacking of its own verifier shows as this rising, accuracy not
            metrics["train/verdict_rate"] = float((rewards > 0.5).float().mean())
        if cfg.self_verify and cfg.verify_coef > 0:
            metrics["train/verify_reward_mean"] = float(v_rewards.mean())
            metrics["train/verify_zero_std_frac"] = float((v_rewards.view(-1, G).std(dim=1) == 0).float().mean())
        if cfg.self_verify:
            metrics["train/verify_checked"] = float(len(judge))  # answers the check was trained on this step
        if on_eval is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            metrics.update(on_eval(step_offset + step + 1))
        metrics.update(meter.metrics())
        callback.on_log(step_offset + step + 1, metrics)
        if ckpt_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_dir, "rl", step + 1, model, optimizer, scheduler, generator, meter,
                            loop={"replay": replay})
        stop_if_requested(ckpt_dir, "rl", step + 1, model, optimizer, scheduler, generator, meter)
