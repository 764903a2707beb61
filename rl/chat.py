"""Chat format for instruct models: any task rendered through the tokenizer's chat template.

The question is asked in words with the answer convention stated ("Put the final answer in \\boxed{}."); the
final answer is the content of the last `\\boxed{...}` of the reply (or a last `Answer: ...` line) and goes to the
task's own verifier. Cold-start SFT targets are a short explanation and `The answer is \\boxed{...}.`.
Self-verification in words: the model is shown the problem and an answer, redoes the problem, compares, and ends
with `Verdict: yes` or `Verdict: no` (the verdict word is what `rl.self_verify` parses and scores). With
`task.check = "verdict"` the model's own reply stays in the conversation and a second user turn asks whether it is
right: the answer is one word, yes or no. With `task.check = "columns"` the written check does each sum and
difference of the worked solution digit by digit (`column_working`), so a check is a chain of one-digit steps.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlscale.rl.tasks import Problem, Task

ANSWER_RULE = "Put the final answer in \\boxed{}."
VERIFY_RULE = 'Solve it yourself, compare, and end with "Verdict: yes" (correct) or "Verdict: no" (wrong).'
VERDICT_RULE = "Check your work. Is the final answer correct? Reply yes or no."
MAX_REPLY_CHARS = 4000  # longer replies are cut before parsing (the verifier's input stays bounded)
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_LINE = re.compile(r"(?im)^\W*(?:final\s+)?answer\s*[:=]\s*(.{1,200}?)\s*$")
_EQUATION = re.compile(r"\b(\d{1,12}) ?([+-]) ?(\d{1,12}) ?= ?-?\d+")


def final_answer(reply: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), else of the last `Answer: ...` line, else None."""
    reply = reply[:MAX_REPLY_CHARS]
    starts = [m.end() for m in _BOXED.finditer(reply)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(reply)):
            depth += {"{": 1, "}": -1}.get(reply[i], 0)
            if depth == 0:
                return reply[start:i].strip()
    lines = _ANSWER_LINE.findall(reply)
    return lines[-1].strip().rstrip(".") if lines else None


def columns(a: int, op: str, b: int) -> str:
    """`a + b` or `a - b` (a >= b >= 0) worked from the units up, one column at a time, each step one-digit
    arithmetic: `86 + 75` -> `6 + 5 = 11 (carry 1); 8 + 7 + 1 = 16; so 86 + 75 = 161`, `43 - 15` -> `13 - 5 = 8
    (borrow 1); 4 - 1 - 1 = 2; so 43 - 15 = 28`."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, width = [], 0, max(len(da), len(db))
    for i in range(width):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else None
        ys = [f"{op} {y}"] if y is not None else []
        if op == "+":  # the carry is added last, a borrow taken first
            terms = [str(x), *ys, *(["+ 1"] if carry else [])]
            total = x + (y or 0) + carry
            carry = total // 10
            steps.append(f"{' '.join(terms)} = {total}" + (" (carry 1)" if carry and i < width - 1 else ""))
        else:
            terms = [str(x), *(["- 1"] if carry else []), *ys]
            value = x - carry - (y or 0)
            carry = int(value < 0)
            steps.append(f"{'1' if carry else ''}{' '.join(terms)} = {value + 10 * carry}"
                         + (" (borrow 1)" if carry else ""))
    return f"{'; '.join(steps)}; so {a} {op} {b} = {a + b if op == '+' else a - b}"


def column_working(text: str) -> str:
    """`text` with each `a + b = c` and `a - b = c` (a >= b) replaced by its working in columns (`columns`), the
    result computed, not copied; anything else unchanged."""
    def redo(m: re.Match) -> str:
        a, op, b = int(m[1]), m[2], int(m[3])
        return columns(a, op, b) if op == "+" or a >= b else m[0]
    return _EQUATION.sub(redo, text)


class ChatTask(Task):
    """`base` rendered for an instruct model: chat prompts, prose answers ending in `\\boxed{}`, checks in words."""

    def __init__(self, base: Task, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None):
        super().__init__(base.params)
        self.base, self.tokenizer, self.system_prompt = base, tokenizer, system_prompt
        self.name = base.name  # the same problem keys, hence the same train/eval split

    def render(self, user: str, reply: str | None = None, follow_up: str | None = None) -> str:
        """One user turn (after the optional system prompt) through the chat template, ready for the reply; with
        `reply` and `follow_up`, the model's reply to it and a second user turn, ready for the second reply."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": user})
        if reply is not None:
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text  # encode_prompts adds bos itself

    def chat(self, p: Problem) -> Problem:
        """A problem of the base task in chat form (same key and verifier data)."""
        explanation = self.base.explanation(p)
        solution = (f"{explanation}\n" if explanation else "") + f"The answer is \\boxed{{{self.base.answer(p)}}}."
        return Problem(p.key, self.render(f"{self.base.question(p)}\n{ANSWER_RULE}"), solution, p.data)

    def sample(self, rng) -> Problem:
        return self.chat(self.base.sample(rng))

    def problems(self, n: int, split: str, seed: int) -> list[Problem]:
        return [self.chat(p) for p in self.base.problems(n, split, seed)]

    def extract(self, completion: str) -> Any | None:
        answer = final_answer(completion)
        return None if answer is None else self.base.extract(answer)

    def check(self, problem: Problem, answer: Any) -> bool:
        return self.base.check(problem, answer)

    def question(self, problem: Problem) -> str:
        return self.base.question(problem)

    def answer_text(self, completion: str) -> str:
        answer = final_answer(completion)
        return answer if answer is not None else completion.strip()[:200]

    def verify_prompt(self, problem: Problem, completion: str) -> str:
        """`check = "written"`: the problem and the proposed final answer, to be redone and compared; `"verdict"`:
        the conversation in which the model gave `completion` (its work included), then the question whether it is
        right."""
        if self.params.check == "verdict":
            return self.render(f"{self.base.question(problem)}\n{ANSWER_RULE}", completion.strip()[:MAX_REPLY_CHARS],
                               VERDICT_RULE)
        return self.render(f"Problem: {self.base.question(problem)}\nProposed answer: "
                           f"{self.answer_text(completion)}\n{VERIFY_RULE}")

    def check_trace(self, problem: Problem, completion: str) -> str:
        """The problem redone in words (its sums in columns with `check = "columns"`) and compared with the shown
        answer, up to the verdict word."""
        explanation = self.base.explanation(problem)
        explanation = column_working(explanation) if self.params.check == "columns" else explanation
        redo = f"{explanation} " if explanation else ""
        shown = self.answer_text(completion)
        same = "matches" if self.is_correct(problem, completion) else "does not match"
        return f"{redo}The answer is {self.base.answer(problem)}; the proposed answer {shown} {same}. Verdict:"


def for_model(task: Task, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task in the configured prompt format; 'auto' is chat when the tokenizer has a chat template."""
    fmt = task.params.prompt_format
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        fmt = "chat" if has_template else "compact"
    if fmt == "chat" and not has_template:
        raise ValueError("task.prompt_format = 'chat' but the model's tokenizer has no chat template")
    return ChatTask(task, tokenizer, task.params.system_prompt) if fmt == "chat" else task
