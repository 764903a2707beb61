"""Self-verification: the model is shown its own answer ("problem answer ok?") and says yes or no.

The verdict is rewarded by agreement with the program verifier (RISE-style), so the model learns to check
its own homework; at test time the same verdicts pick among sampled answers (self-verified best-of-N).
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts
from rl.tasks import Problem, Task

YES, NO = "yes", "no"


def verify_prompt(task: Task, problem: Problem, completion: str) -> str:
    """The prompt asking the model to judge one of its answers."""
    return f"{problem.prompt}{task.answer_text(completion)} ok?"


def parse_verdict(text: str) -> bool | None:
    """True for yes, False for no, None when the verdict is malformed."""
    head = text.strip()[:1].lower()
    return True if head == "y" else False if head == "n" else None


def verdict_reward(verdict_text: str, truth: bool) -> float:
    """1 when the model's verdict agrees with the program verifier, else 0."""
    return 1.0 if parse_verdict(verdict_text) == truth else 0.0


def corrupt(text: str, rng: random.Random) -> str:
    """A plausible wrong answer: change one or two digits of a reference solution (or drop a character)."""
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    if not digits:
        return text[:-1] if len(text) > 1 else text + "0"
    chars = list(text)
    for i in rng.sample(digits, k=min(len(digits), rng.choice((1, 1, 2)))):
        chars[i] = rng.choice([d for d in "0123456789" if d != chars[i]])
    return "".join(chars)


def sft_examples(
    task: Task, problems: list[Problem], rng: random.Random, verify_fraction: float
) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: solutions, and verification examples (half correct, half corrupted)."""
    out = []
    for p in problems:
        if rng.random() >= verify_fraction:
            out.append((p.prompt, p.solution))
            continue
        answer = p.solution if rng.random() < 0.5 else corrupt(p.solution, rng)
        out.append((verify_prompt(task, p, answer), YES if task.is_correct(p, answer) else NO))
    return out


@torch.no_grad()
def p_yes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[torch.Tensor, int]:
    """P(yes) / (P(yes) + P(no)) for each verification prompt, by teacher-forcing both verdicts.

    Also returns the padded length of the 2 x len(prompts) sequences it ran (for FLOP accounting)."""
    device = next(model.parameters()).device
    both = prompts + prompts
    ids, mask = encode_prompts(tokenizer, both, device)
    cids, cmask = encode_completions(tokenizer, [YES] * len(prompts) + [NO] * len(prompts), device)
    batch = Batch(ids, mask, cids, cmask, [])
    logp, _ = completion_logprobs(model, batch)
    seq = (logp * cmask).sum(-1)
    yes, no = seq[: len(prompts)], seq[len(prompts) :]
    return torch.sigmoid(yes - no), batch.input_ids.shape[1]
