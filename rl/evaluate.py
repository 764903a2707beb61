"""Evaluation on held-out problems: greedy accuracy, pass@k, self-verification and self-verified best-of-N."""

from __future__ import annotations

from math import comb

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlscale.rl.accounting import Meter
from rlscale.rl.generate import sample
from rlscale.rl.self_verify import p_yes, split_trace, verify_prompt
from rlscale.rl.tasks import Problem, Task


class EvalConfig(BaseModel):
    """Held-out evaluation settings."""

    model_config = ConfigDict(extra="forbid")
    problems: int = Field(500, ge=1, description="Held-out problems in the full evaluation (before and after RL).")
    samples: int = Field(8, ge=1, description="N answers sampled per problem for pass@k and self-verified best-of-N.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the N answers.")
    max_new_tokens: int = Field(16, ge=1, description="Longest answer generated.")
    verify_max_new_tokens: int = Field(32, ge=1, description="Longest check-and-verdict generated.")
    batch_size: int = Field(1024, ge=1, description="Rows generated at once.")
    seed: int = Field(12345, description="Seed of the held-out problem draw (the same set for every run).")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def balanced_accuracy(pred: list[bool], truth: list[bool]) -> float:
    """Mean of the recall on each class present."""
    recalls = []
    for cls in (True, False):
        idx = [i for i, t in enumerate(truth) if t == cls]
        if idx:
            recalls.append(sum(pred[i] == cls for i in idx) / len(idx))
    return sum(recalls) / len(recalls) if recalls else float("nan")


def _generate(model, tokenizer, prompts, cfg: EvalConfig, meter: Meter, greedy: bool, generator, max_new) -> list[str]:
    texts: list[str] = []
    for i in range(0, len(prompts), cfg.batch_size):
        with meter.phase("eval"):
            b = sample(model, tokenizer, prompts[i : i + cfg.batch_size], max_new,
                       cfg.temperature, greedy=greedy, generator=generator)
        meter.add("eval", meter.fm.generation(b))
        texts += b.texts
    return texts


def _p_yes(model, tokenizer, prompts, traces, cfg: EvalConfig, meter: Meter) -> list[float]:
    out: list[float] = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i : i + cfg.batch_size]
        with meter.phase("eval"):
            probs, batch = p_yes(model, tokenizer, chunk, traces[i : i + cfg.batch_size])
        meter.add("eval", meter.fm.logprobs(batch, dedupe=True))
        out += probs.tolist()
    return out


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    cfg: EvalConfig,
    meter: Meter,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Scores under `eval/...` names, and a table of every sampled answer with its verdicts."""
    n = cfg.samples
    greedy = _generate(model, tokenizer, [p.prompt for p in problems], cfg, meter, True, generator, cfg.max_new_tokens)
    greedy_ok = [task.is_correct(p, c) for p, c in zip(problems, greedy)]

    rows = [p for p in problems for _ in range(n)]
    sampled = _generate(model, tokenizer, [p.prompt for p in rows], cfg, meter, False, generator, cfg.max_new_tokens)
    ok = [task.is_correct(p, c) for p, c in zip(rows, sampled)]
    # the model checks each answer: a greedy check, then P(yes) vs P(no) as its verdict (both deterministic, so
    # an answer given twice to the same problem is checked once)
    vprompts = [verify_prompt(task, p, c) for p, c in zip(rows, sampled)]
    distinct = list(dict.fromkeys(vprompts))
    checked = _generate(model, tokenizer, distinct, cfg, meter, True, generator, cfg.verify_max_new_tokens)
    trusted = _p_yes(model, tokenizer, distinct, [split_trace(c) for c in checked], cfg, meter)
    check_of, score_of = dict(zip(distinct, checked)), dict(zip(distinct, trusted))
    checks, scores = [check_of[v] for v in vprompts], [score_of[v] for v in vprompts]
    verdicts = [s > 0.5 for s in scores]

    answers = [task.answer_text(c) for c in sampled]
    best_ok = []
    for i in range(len(problems)):
        # keep the answer the model itself trusts most: P(yes) summed over the samples that gave it
        group = range(i * n, (i + 1) * n)
        trust: dict[str, float] = {}
        for j in group:
            trust[answers[j]] = trust.get(answers[j], 0.0) + scores[j]
        best = max(trust, key=trust.get)
        best_ok.append(next(ok[j] for j in group if answers[j] == best))

    metrics = {
        "eval/accuracy": sum(greedy_ok) / len(problems),
        "eval/sample_accuracy": sum(ok) / len(ok),
        "eval/verify_accuracy": sum(v == t for v, t in zip(verdicts, ok)) / len(ok),
        "eval/verify_balanced_accuracy": balanced_accuracy(verdicts, ok),
        f"eval/best_of_{n}_accuracy": sum(best_ok) / len(problems),
        "eval/problems": float(len(problems)),
    }
    for k in sorted({1, n // 2, n} - {0}):
        counts = [sum(ok[i * n : (i + 1) * n]) for i in range(len(problems))]
        metrics[f"eval/pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(problems)
    table = [
        {"problem": p.prompt, "answer": c, "correct": t, "self_check": k, "self_verdict": v, "p_yes": round(s, 4)}
        for p, c, t, k, v, s in zip(rows, sampled, ok, checks, verdicts, scores)
    ]
    return metrics, table
