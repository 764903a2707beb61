"""Arithmetic: addition and multiplication of integers with a configurable number of digits."""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field

from rlscale.rl.tasks import Problem, Task, TaskParams

_INT = re.compile(r"-?[0-9]{1,64}")


class ArithmeticParams(TaskParams):
    """Config of the `arithmetic` task."""

    name: Literal["arithmetic"] = Field("arithmetic", description="Task name.")
    digits: int = Field(2, ge=1, le=12, description="Largest number of digits of each operand.")
    ops: list[Literal["+", "*"]] = Field(["+"], min_length=1, description="Operators drawn from: '+' and/or '*'.")
    zero_pad: bool = Field(True, description="Write operands and solutions with leading zeros to a fixed width.")


class ArithmeticTask(Task):
    """`a+b=` or `a*b=` (e.g. `07+45=` -> `052` when zero-padded); the answer is the integer result."""

    name = "arithmetic"
    params: ArithmeticParams

    def sample(self, rng: random.Random) -> Problem:
        hi = 10**self.params.digits - 1
        a, b, op = rng.randint(0, hi), rng.randint(0, hi), rng.choice(self.params.ops)
        result = a + b if op == "+" else a * b
        d = self.params.digits if self.params.zero_pad else 0
        width = (d + 1 if op == "+" else 2 * d) if d else 0
        prompt = f"{a:0{d}d}{op}{b:0{d}d}=" if d else f"{a}{op}{b}="
        solution = f"{result:0{width}d}" if d else str(result)
        return Problem(
            key=f"{a}{op}{b}", prompt=prompt, solution=solution, data={"a": a, "b": b, "op": op, "result": result}
        )

    def question(self, problem: Problem) -> str:
        d = problem.data
        return f"What is {d['a']} {'plus' if d['op'] == '+' else 'times'} {d['b']}?"

    def answer(self, problem: Problem) -> str:
        return str(problem.data["result"])

    def explanation(self, problem: Problem) -> str:
        d = problem.data
        return f"{d['a']} {d['op']} {d['b']} = {d['result']}."

    def extract(self, completion: str) -> int | None:
        text = completion.strip()
        return int(text) if _INT.fullmatch(text) else None

    def check_trace(self, problem: Problem, completion: str) -> str:
        """Column addition from the units up, one group per digit: the two digits, the carry in, their two-digit
        sum, the shown digit, and `=` or `!` (`07+05=053`: `750123!,001015!`). Products are checked
        digit by digit against the result (correct digit, shown digit, mark). `?` when nothing parses."""
        answer = self.extract(completion)
        if answer is None:
            return "?"
        correct, given = str(problem.data["result"]), str(answer)
        if problem.data.get("op") != "+" or answer < 0:
            width = max(len(correct), len(given))
            pairs = zip(correct.zfill(width), given.zfill(width))
            return "".join(f"{c}{g}{'=' if c == g else '!'}" for c, g in pairs)
        a, b = str(problem.data["a"]), str(problem.data["b"])
        width = max(len(correct), len(given))
        a, b, given = a.zfill(width)[::-1], b.zfill(width)[::-1], given.zfill(width)[::-1]
        groups, carry = [], 0
        for da, db, dg in zip(a, b, given):
            total = int(da) + int(db) + carry
            groups.append(f"{da}{db}{carry}{total:02d}{dg}{'=' if total % 10 == int(dg) else '!'}")
            carry = total // 10
        return ",".join(groups)

    def check(self, problem: Problem, answer: int) -> bool:
        return answer == problem.data["result"]
