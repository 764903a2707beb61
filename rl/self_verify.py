"""Self-verification: the model is shown its own answer ("problem answer ok?"), writes a short check
(by default it redoes the problem) and ends with a verdict, yes or no.

The verdict is rewarded by agreement with the program verifier (RISE-style), so the model learns to check
its own homework; at test time the same verdicts pick among sampled answers (self-verified best-of-N).
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlscale.rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts
from rlscale.rl.tasks import Problem, Task

YES, NO = "yes", "no"


def verify_prompt(task: Task, problem: Problem, completion: str) -> str:
    """The prompt asking the model to judge one of its answers (the task's format: compact or chat)."""
    return task.verify_prompt(problem, completion)


def parse_verdict(text: str) -> bool | None:
    """True for yes, False for no (the last word, trailing punctuation and markup ignored), None when malformed."""
    words = text.split()
    last = words[-1].lower().strip(".!*_`'\"") if words else ""
    return True if last == YES else False if last == NO else None


def split_trace(text: str) -> str:
    """The check written before the verdict word ('' when the model wrote only a verdict)."""
    words = text.rsplit(maxsplit=1)
    if words and parse_verdict(words[-1]) is not None:
        return words[0] if len(words) == 2 else ""
    return text.strip()


def verdict_reward(verdict_text: str, truth: bool) -> float:
    """1 when the model's verdict agrees with the program verifier, else 0."""
    return 1.0 if parse_verdict(verdict_text) == truth else 0.0


def corrupt(text: str, rng: random.Random) -> str:
    """A wrong answer: each digit changed with odds 0.6 (at least one), or (1 in 5) a character dropped or added."""
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    if not digits or rng.random() < 0.2:
        if len(text) < 2 or rng.random() < 0.5:
            i = rng.randrange(len(text) + 1)
            return text[:i] + rng.choice("0123456789") + text[i:]
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1 :]
    chars = list(text)
    changed = [i for i in digits if rng.random() < 0.6] or [rng.choice(digits)]  # most digits: no "all equal" prior
    for i in changed:
        chars[i] = rng.choice([d for d in "0123456789" if d != chars[i]])
    return "".join(chars)


def sft_examples(
    task: Task, problems: list[Problem], rng: random.Random, verify_fraction: float, correct_share: float = 0.5
) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: solutions, and verification examples of reference or corrupted answers.

    Mostly-corrupted verification examples (`correct_share` < 0.5) keep the model from learning to copy the
    answer it is shown into its check instead of redoing the problem."""
    out = []
    for p in problems:
        if rng.random() >= verify_fraction:
            out.append((p.prompt, p.solution))
            continue
        answer = p.solution if rng.random() < correct_share else corrupt(p.solution, rng)
        verdict = YES if task.is_correct(p, answer) else NO
        out.append((verify_prompt(task, p, answer), f"{task.check_trace(p, answer)} {verdict}"))
    return out


@torch.no_grad()
def p_yes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], traces: list[str]
) -> tuple[torch.Tensor, Batch]:
    """P(yes) / (P(yes) + P(no)) after each prompt and its check, by teacher-forcing both verdicts.

    Also returns the batch of 2 x len(prompts) sequences it ran (for FLOP accounting)."""
    device = next(model.parameters()).device
    both = prompts + prompts
    ids, mask = encode_prompts(tokenizer, both, device)
    verdicts = [f"{t} {YES}" for t in traces] + [f"{t} {NO}" for t in traces]
    cids, cmask = encode_completions(tokenizer, verdicts, device)
    batch = Batch(ids, mask, cids, cmask, [])
    logp, _ = completion_logprobs(model, batch, dedupe=True)  # each prompt runs once for both verdicts
    seq = (logp * cmask).sum(-1)  # the shared trace tokens cancel in the difference
    yes, no = seq[: len(prompts)], seq[len(prompts) :]
    return torch.sigmoid(yes - no), batch
