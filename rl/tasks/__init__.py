"""Verifiable tasks: generated problems, prompts, answer extraction and programmatic verifiers.

A task draws problems from a seed, formats a prompt, and scores a completion with a program:
reward = 1 for a correct answer, `format_reward` for a well-formed wrong one, 0 otherwise.
Train and eval problems never overlap: each problem's canonical key is hashed into a split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Problem:
    """One generated problem."""

    key: str  # canonical identity, hashed to decide the train/eval split
    prompt: str  # text the model continues
    solution: str  # a reference completion (used for cold-start SFT)
    data: dict[str, Any] = field(default_factory=dict)  # what the verifier needs


class TaskParams(BaseModel):
    """Fields shared by every task's config."""

    model_config = ConfigDict(extra="forbid")
    format_reward: float = Field(0.1, ge=0.0, lt=1.0, description="Reward for a well-formed but wrong answer.")
    eval_percent: float = Field(10.0, gt=0.0, lt=100.0, description="Percent of the problem space held out for eval.")
    prompt_format: Literal["auto", "compact", "chat"] = Field(
        "auto", description="'chat': the tokenizer's chat template, answers in prose ending in \\boxed{}; "
        "'compact': `07+45=` for character models; 'auto': chat when the tokenizer has a template."
    )
    system_prompt: str | None = Field(None, description="System message of chat prompts (None: the template's own).")
    check: Literal["written", "columns", "verdict"] = Field(
        "written", description="How the model checks an answer: 'written': it redoes the problem, then gives its "
        "verdict; 'columns': the same with each sum and difference worked digit by digit (chat prompts); 'verdict': "
        "it reads the whole reply (its work included) and answers only yes or no, read as P(yes) in one forward pass."
    )


class Task:
    """Base class: subclasses implement `sample`, `extract` and `check`."""

    name: str = ""

    def __init__(self, params: TaskParams):
        self.params = params

    def sample(self, rng: random.Random) -> Problem:
        """Draw one problem (any split)."""
        raise NotImplementedError

    def extract(self, completion: str) -> Any | None:
        """Parse the answer from a completion; None when it is not well-formed."""
        raise NotImplementedError

    def check(self, problem: Problem, answer: Any) -> bool:
        """True when a parsed answer is correct."""
        raise NotImplementedError

    def question(self, problem: Problem) -> str:
        """The problem in words, for chat prompts."""
        raise NotImplementedError

    def answer(self, problem: Problem) -> str:
        """The reference final answer as written inside `\\boxed{}` in chat format (parsed by `extract`)."""
        return problem.solution

    def explanation(self, problem: Problem) -> str:
        """A short worked solution in words, written before the boxed answer in chat SFT targets ('' for none)."""
        return ""

    def verify_prompt(self, problem: Problem, completion: str) -> str:
        """The prompt asking the model to judge an answer (compact: `07+45=052 ok?`)."""
        return f"{problem.prompt}{self.answer_text(completion)} ok?"

    def answer_text(self, completion: str) -> str:
        """The part of a completion that is the answer (shown back to the model when it self-verifies)."""
        return completion.strip()[:200]

    def check_trace(self, problem: Problem, completion: str) -> str:
        """The worked check written before a verdict: by default the problem redone, to compare against."""
        return problem.solution

    def is_correct(self, problem: Problem, completion: str) -> bool:
        answer = self.extract(completion)
        return answer is not None and self.check(problem, answer)

    def reward(self, problem: Problem, completion: str) -> float:
        """1 if correct, `format_reward` if well-formed but wrong, else 0. Never raises."""
        try:
            answer = self.extract(completion)
            if answer is None:
                return 0.0
            return 1.0 if self.check(problem, answer) else self.params.format_reward
        except Exception:  # a verifier must never crash on model output
            return 0.0

    def split_of(self, problem: Problem) -> str:
        """'eval' or 'train', fixed by a hash of the problem's key."""
        h = int.from_bytes(hashlib.sha256(f"{self.name}:{problem.key}".encode()).digest()[:8], "big")
        return "eval" if (h % 10_000) < self.params.eval_percent * 100 else "train"

    def problems(self, n: int, split: str, seed: int) -> list[Problem]:
        """`n` problems of one split drawn from `seed` (with replacement for train, distinct for eval)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Problem] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise ValueError(f"task {self.name!r}: cannot draw {n} distinct {split} problems; widen the task")
            p = self.sample(rng)
            if self.split_of(p) != split or (split == "eval" and p.key in seen):
                continue
            seen.add(p.key)
            out.append(p)
        return out


# Imported after the base class: each module subclasses Task.
from rlscale.rl.tasks.arithmetic import ArithmeticParams, ArithmeticTask  # noqa: E402
from rlscale.rl.tasks.countdown import CountdownParams, CountdownTask  # noqa: E402
from rlscale.rl.tasks.dataset import DatasetParams, DatasetTask  # noqa: E402
from rlscale.rl.tasks.recipe import RecipeParams, RecipeTask  # noqa: E402

TaskConfig = Annotated[
    Union[ArithmeticParams, CountdownParams, DatasetParams, RecipeParams], Field(discriminator="name")
]
TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask, "countdown": CountdownTask, "dataset": DatasetTask, "recipe": RecipeTask
}


def make_task(params: TaskParams) -> Task:
    """Build the task a validated config names."""
    return TASKS[params.name](params)  # type: ignore[attr-defined]
