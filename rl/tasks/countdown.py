"""Countdown (as in TinyZero): combine given numbers with + - * / and parentheses to reach a target.

Prompt: the numbers, sorted ascending and space-separated, then `>` and the target, then `:`,
e.g. `3 5 7>22:`. The completion is an expression such as `3*5+7`. Each given number may be used
at most once (a multiset: `3 3 5>...` allows two 3s); not every number has to be used.

The verifier never evaluates code: the completion (at most 100 characters of digits, spaces,
`+ - * / ( )`) is parsed with `ast.parse(..., mode="eval")`, walked with a strict whitelist
(binary + - * / over non-negative int literals; no unary operators, powers, names or calls) and
evaluated exactly with `fractions.Fraction`. Division by zero makes the answer wrong.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Literal

from pydantic import Field

from rlscale.rl.tasks import Problem, Task, TaskParams

MAX_ANSWER_CHARS = 100
_ALLOWED = re.compile(rf"[0-9+\-*/() ]{{1,{MAX_ANSWER_CHARS}}}")
_OPS: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_LEAF_PREC = 3

# A parsed answer: an int literal, or (op, left, right) with op in "+-*/".
Expr = int | tuple[str, "Expr", "Expr"]


class CountdownParams(TaskParams):
    """Config of the `countdown` task."""

    name: Literal["countdown"] = Field("countdown", description="Task name.")
    num_numbers: int = Field(3, ge=2, le=6, description="How many numbers are given.")
    max_number: int = Field(20, ge=2, le=1000, description="Given numbers are drawn from 1..max_number.")
    max_target: int = Field(100, ge=1, le=1_000_000, description="Targets are integers in 1..max_target.")


class _RefusedError(ValueError):
    """A syntax node outside the whitelist."""


def _to_expr(node: ast.AST) -> Expr:
    """Whitelisted AST -> nested tuples; raises `_RefusedError` on anything else."""
    if type(node) is ast.Constant:
        value = node.value
        if type(value) is not int or value < 0:  # type() also rules out bool
            raise _RefusedError("literal")
        return value
    if type(node) is ast.BinOp and type(node.op) in _OPS:
        return (_OPS[type(node.op)], _to_expr(node.left), _to_expr(node.right))
    raise _RefusedError(type(node).__name__)


def _leaves(expr: Expr) -> list[int]:
    """The int literals of an expression, left to right."""
    if isinstance(expr, int):
        return [expr]
    return _leaves(expr[1]) + _leaves(expr[2])


def evaluate(expr: Expr) -> Fraction:
    """Exact value of a parsed expression; raises ZeroDivisionError on division by zero."""
    if isinstance(expr, int):
        return Fraction(expr)
    op, left, right = expr
    a, b = evaluate(left), evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def _random_expr(rng: random.Random, numbers: list[int]) -> tuple[int, str, int]:
    """A random binary tree over `numbers` (in order) with every intermediate a non-negative integer.

    Returns (value, text with minimal parentheses, precedence of the top operator).
    """
    if len(numbers) == 1:
        return numbers[0], str(numbers[0]), _LEAF_PREC
    cut = rng.randint(1, len(numbers) - 1)
    lv, lt, lp = _random_expr(rng, numbers[:cut])
    rv, rt, rp = _random_expr(rng, numbers[cut:])
    ops = ["+", "*"]
    if lv >= rv:
        ops.append("-")
    if rv != 0 and lv % rv == 0:
        ops.append("/")
    op = rng.choice(ops)
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv // rv if rv else 0}[op]
    prec = _PREC[op]
    if lp < prec:
        lt = f"({lt})"
    if rp < prec or (rp == prec and op in "-/"):
        rt = f"({rt})"
    return value, f"{lt}{op}{rt}", prec


class CountdownTask(Task):
    """`3 5 7>22:`; the answer is an expression over the given numbers equal to the target, e.g. `3*5+7`."""

    name = "countdown"
    params: CountdownParams

    def sample(self, rng: random.Random) -> Problem:
        p = self.params
        while True:  # redraw until the random expression hits a target in 1..max_target
            numbers = [rng.randint(1, p.max_number) for _ in range(p.num_numbers)]
            used = rng.sample(numbers, rng.randint(2, p.num_numbers))
            target, solution, _ = _random_expr(rng, used)
            if 1 <= target <= p.max_target:
                break
        numbers.sort()
        shown = " ".join(map(str, numbers))
        return Problem(
            key=f"{shown}>{target}",
            prompt=f"{shown}>{target}:",
            solution=solution,
            data={"numbers": numbers, "target": target},
        )

    def question(self, problem: Problem) -> str:
        numbers = ", ".join(map(str, problem.data["numbers"]))
        return (f"Using the numbers {numbers} (each at most once) with +, -, *, / and parentheses, write an "
                f"expression equal to {problem.data['target']}.")

    def explanation(self, problem: Problem) -> str:
        return f"{problem.solution} = {problem.data['target']}."

    def extract(self, completion: str) -> Expr | None:
        text = completion.strip()
        if not _ALLOWED.fullmatch(text):
            return None
        try:
            tree = ast.parse(text, mode="eval")
            return _to_expr(tree.body)
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # _RefusedError is a ValueError
            return None

    def check_trace(self, problem: Problem, completion: str) -> str:
        """The value of the proposed expression (`!` when it uses numbers not given, `?` when malformed)."""
        expr = self.extract(completion)
        if expr is None:
            return "?"
        if Counter(_leaves(expr)) - Counter(problem.data["numbers"]):
            return "!"
        try:
            value = evaluate(expr)
        except ZeroDivisionError:
            return "?"
        return f"={value.numerator}" if value.denominator == 1 else f"={value.numerator}/{value.denominator}"

    def check(self, problem: Problem, answer: Expr) -> bool:
        if Counter(_leaves(answer)) - Counter(problem.data["numbers"]):
            return False  # a number not given, or used more often than given
        try:
            return evaluate(answer) == problem.data["target"]
        except ZeroDivisionError:
            return False
