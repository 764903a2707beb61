"""Evaluation on held-out problems: greedy accuracy, pass@k, majority vote, the model as a verifier of its own answers
(TPR, TNR, balanced accuracy, calibration) and the answers it picks with its verdicts (best-of-N, weighted vote)."""

from __future__ import annotations

from math import comb

import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import rankdata
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlscale.rl.accounting import Meter
from rlscale.rl.generate import sample
from rlscale.rl.self_verify import p_yes_from_cache, split_trace, verify_prompt
from rlscale.rl.tasks import Problem, Task


class EvalConfig(BaseModel):
    """Held-out evaluation settings."""

    model_config = ConfigDict(extra="forbid")
    problems: int = Field(500, ge=1, description="Held-out problems in the full evaluation (before and after RL).")
    samples: int = Field(8, ge=1, description="N answers sampled per problem for pass@k and self-verified best-of-N.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the N answers.")
    max_new_tokens: int = Field(16, ge=1, description="Longest answer generated.")
    verify_max_new_tokens: int = Field(32, ge=1, description="Longest check-and-verdict generated.")
    verify_samples: int = Field(1, ge=1, description="Written checks per answer: 1 = one greedy check; K > 1 = K "
                                "checks sampled at `temperature`, P(yes) averaged over them (GenRM-CoT, arXiv "
                                "2408.15240). No effect where the check is a verdict alone.")
    batch_size: int = Field(1024, ge=1, description="Rows generated at once.")
    seed: int = Field(12345, description="Seed of the held-out problem draw (the same set for every run).")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def verifier_scores(pred: list[bool], truth: list[bool], p_yes: list[float], bins: int = 10) -> dict[str, float]:
    """A verifier's TPR (says yes to a correct answer) and TNR (says no to a wrong one), each only when that class is
    present, raw and balanced accuracy (mean of the recalls of the classes present), and the expected calibration
    error of P(yes): the sample-weighted mean |mean P(yes) - share correct| over `bins` equal-width bins of P(yes)
    (Guo et al. 2017), and, when both classes are present, the AUC of P(yes): the odds that a correct answer scores
    above a wrong one, ties half (Mann-Whitney; how well P(yes) ranks answers, whatever the threshold)."""
    pos = [i for i, t in enumerate(truth) if t]
    neg = [i for i, t in enumerate(truth) if not t]
    recalls = {}
    if pos:
        recalls["verify_tpr"] = sum(pred[i] for i in pos) / len(pos)
    if neg:
        recalls["verify_tnr"] = sum(not pred[i] for i in neg) / len(neg)
    bucket: dict[int, list[int]] = {}
    for i, p in enumerate(p_yes):
        bucket.setdefault(min(int(p * bins), bins - 1), []).append(i)
    ece = sum(abs(sum(p_yes[i] for i in idx) - sum(truth[i] for i in idx)) for idx in bucket.values()) / len(truth)
    auc = {}
    if pos and neg:  # Mann-Whitney U from the ranks of P(yes), ties at their mean rank
        ranks = rankdata(p_yes)
        auc["verify_auc"] = float(sum(ranks[i] for i in pos) - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
    return recalls | auc | {
        "verify_accuracy": sum(p == t for p, t in zip(pred, truth)) / len(truth),
        "verify_balanced_accuracy": sum(recalls.values()) / len(recalls),
        "verify_ece": ece,
    }


def pick(answers: list[str], scores: list[float], how: str) -> int:
    """Index of the answer a selection rule keeps from one problem's N samples: "vote" (the most frequent answer),
    "weighted_vote" (the answer with the most summed P(yes)), "best" (the single sample with the highest P(yes)).
    Ties go to the answer given first."""
    if how == "best":
        return max(range(len(answers)), key=lambda j: (scores[j], -j))
    weight: dict[str, float] = {}
    for a, s in zip(answers, scores):
        weight[a] = weight.get(a, 0.0) + (1.0 if how == "vote" else s)
    top = max(weight.values())
    return next(j for j, a in enumerate(answers) if weight[a] == top)


def _answer(model, tokenizer, task: Task, problems: list[Problem], cfg: EvalConfig, meter: Meter,
            generator: torch.Generator | None) -> tuple[list[str], list[str], dict[str, float]]:
    """Each problem's greedy answer and its `samples` sampled ones, generated in one batch (each prompt prefilled
    once for all of them; the samples draw as they would alone). With a verdict-only check (`task.check =
    "verdict"`), P(yes) of each distinct sampled answer too, read by continuing the KV cache of the row that wrote
    it (`p_yes_from_cache`: the prompt and answer are not run again). Returns the greedy answers, the sampled ones
    (`samples` a problem, in order) and P(yes) by verify prompt (empty with a written check)."""
    per = cfg.samples + 1  # each problem's rows: its greedy answer, then its samples
    step = max(1, cfg.batch_size // per)  # problems per batch
    verdict = task.params.check == "verdict"
    greedy, sampled, score_of = [], [], {}
    for i in range(0, len(problems), step):
        chunk = problems[i : i + step]
        with meter.phase("eval"):
            b = sample(model, tokenizer, [p.prompt for p in chunk for _ in range(per)], cfg.max_new_tokens,
                       cfg.temperature, greedy=torch.arange(len(chunk) * per) % per == 0, generator=generator,
                       keep_cache=verdict)
        meter.add("eval", meter.fm.generation(b))
        greedy += b.texts[::per]
        sampled += [t for j, t in enumerate(b.texts) if j % per]
        if verdict:  # an answer given twice to the same problem is judged once
            first: dict[str, int] = {}
            for j, t in enumerate(b.texts):
                if j % per:
                    first.setdefault(verify_prompt(task, chunk[j // per], t), j)
            with meter.phase("eval"):
                p, passes = p_yes_from_cache(model, tokenizer, b, list(first), [""] * len(first),
                                             list(first.values()))
            meter.add("eval", sum(meter.fm.forward(*x) for x in passes))
            score_of |= dict(zip(first, p.tolist()))
        b.cache = None  # its memory back before the next chunk
    return greedy, sampled, score_of


def _check(model, tokenizer, prompts, cfg: EvalConfig, meter: Meter,
           generator: torch.Generator | None) -> tuple[list, list]:
    """Each answer checked by the model: a greedy written check (or `verify_samples` sampled ones), then its
    verdict's P(yes) read by continuing the check's KV cache (`p_yes_from_cache`: the values of `p_yes` without
    running prompt and check again), averaged over the checks. Returns the first check written for each answer and
    its P(yes)."""
    texts: list[str] = []
    probs: list[float] = []
    k = cfg.verify_samples
    rows = max(1, cfg.batch_size // k)  # answers per batch: k checks each
    for i in range(0, len(prompts), rows):
        chunk = [c for c in prompts[i : i + rows] for _ in range(k)]
        with meter.phase("eval"):
            b = sample(model, tokenizer, chunk, cfg.verify_max_new_tokens,
                       cfg.temperature, greedy=k == 1, generator=generator, keep_cache=True)
            p, passes = p_yes_from_cache(model, tokenizer, b, chunk, [split_trace(t) for t in b.texts])
        b.cache = None  # its memory back before the next chunk
        meter.add("eval", meter.fm.generation(b) + sum(meter.fm.forward(*x) for x in passes))
        texts += b.texts[::k]
        probs += p.view(-1, k).mean(1).tolist()  # P(yes) = mean over the k checks of P(yes | check)
    return texts, probs


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
    greedy, sampled, score_of = _answer(model, tokenizer, task, problems, cfg, meter, generator)
    greedy_ok = [task.is_correct(p, c) for p, c in zip(problems, greedy)]
    rows = [p for p in problems for _ in range(n)]
    ok = [task.is_correct(p, c) for p, c in zip(rows, sampled)]
    # the model checks each answer: P(yes) after its answer (a verdict alone, read above), or a written check,
    # greedy or k sampled, then P(yes) vs P(no) as its verdict; an answer given twice to the same problem is checked
    # once
    vprompts = [verify_prompt(task, p, c) for p, c in zip(rows, sampled)]
    if task.params.check == "verdict":
        checks, scores = [""] * len(vprompts), [score_of[v] for v in vprompts]
    else:
        distinct = list(dict.fromkeys(vprompts))
        checked, trusted = _check(model, tokenizer, distinct, cfg, meter, generator)
        check_of, score_of = dict(zip(distinct, checked)), dict(zip(distinct, trusted))
        checks, scores = [check_of[v] for v in vprompts], [score_of[v] for v in vprompts]
    verdicts = [s > 0.5 for s in scores]

    answers = [task.answer_text(c) for c in sampled]
    chosen = {how: [] for how in ("vote", "weighted_vote", "best")}
    for i in range(len(problems)):
        for how, ok_of in chosen.items():
            j = i * n + pick(answers[i * n : (i + 1) * n], scores[i * n : (i + 1) * n], how)
            ok_of.append(ok[j])

    metrics = {
        "eval/accuracy": sum(greedy_ok) / len(problems),
        "eval/sample_accuracy": sum(ok) / len(ok),
        **{f"eval/{k}": v for k, v in verifier_scores(verdicts, ok, scores).items()},
        f"eval/maj_at_{n}_accuracy": sum(chosen["vote"]) / len(problems),
        f"eval/weighted_vote_at_{n}_accuracy": sum(chosen["weighted_vote"]) / len(problems),
        f"eval/best_of_{n}_accuracy": sum(chosen["best"]) / len(problems),
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
