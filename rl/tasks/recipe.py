"""Recipe scaling: ingredient quantities for `s1` servings scaled to `s2` servings.

Prompt: `s1>s2:` then comma-separated `name qty unit` parts (no space before the unit), then `=`,
e.g. `4>6:flour 200g,egg 3=`. Solution: the same parts with scaled quantities, e.g. `flour 300g,egg 4.5`.
Quantities are written with at most 2 decimals, trailing zeros stripped; ingredients keep a fixed order.

The verifier parses the completion (at most 300 characters) into {name: (quantity, unit)}; it is
well-formed when every comma-separated part is `name qty[unit]` and no name repeats. It is correct
when the names are exactly the recipe's, each unit is the ingredient's unit, and each quantity is
within relative `tolerance` (or 0.01 absolute) of the exact scaled value.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Literal

from pydantic import Field

from rlscale.rl.tasks import Problem, Task, TaskParams

MAX_ANSWER_CHARS = 300
_PART = re.compile(r"([a-z]{1,20}) ([0-9]{1,9}(?:\.[0-9]{1,9})?) ?([a-z]{0,5})")

# name -> (unit, per-serving step, most steps per serving); per-serving quantities are step multiples,
# so both the given and the scaled quantities have at most 2 decimals.
INGREDIENTS: dict[str, tuple[str, Fraction, int]] = {
    "flour": ("g", Fraction(5), 20),
    "sugar": ("g", Fraction(5), 10),
    "butter": ("g", Fraction(5), 10),
    "rice": ("g", Fraction(10), 10),
    "milk": ("ml", Fraction(10), 20),
    "water": ("ml", Fraction(25), 12),
    "cream": ("ml", Fraction(10), 10),
    "oil": ("ml", Fraction(5), 6),
    "egg": ("", Fraction(1, 4), 8),
    "salt": ("tsp", Fraction(1, 4), 4),
    "yeast": ("g", Fraction(1, 2), 10),
    "honey": ("tbsp", Fraction(1, 4), 8),
}


def fmt(x: Fraction | float) -> str:
    """A quantity with at most 2 decimals, trailing zeros stripped: 4.50 -> '4.5', 300.00 -> '300'."""
    return f"{float(x):.2f}".rstrip("0").rstrip(".")


class RecipeParams(TaskParams):
    """Config of the `recipe` task."""

    name: Literal["recipe"] = Field("recipe", description="Task name.")
    num_ingredients: int = Field(2, ge=1, le=6, description="How many ingredients the recipe lists.")
    max_servings: int = Field(8, ge=2, le=100, description="Servings (from and to) are drawn from 1..max_servings.")
    tolerance: float = Field(0.01, ge=0.0, lt=1.0, description="Relative tolerance on each scaled quantity.")


class RecipeTask(Task):
    """`4>6:flour 200g,egg 3=`; the answer lists the scaled quantities, e.g. `flour 300g,egg 4.5`."""

    name = "recipe"
    params: RecipeParams

    def sample(self, rng: random.Random) -> Problem:
        p = self.params
        s1, s2 = rng.sample(range(1, p.max_servings + 1), 2)
        names = sorted(rng.sample(list(INGREDIENTS), p.num_ingredients), key=list(INGREDIENTS).index)
        given, answer, scaled, units = [], [], {}, {}
        for name in names:
            unit, step, most = INGREDIENTS[name]
            per_serving = step * rng.randint(1, most)
            given.append(f"{name} {fmt(per_serving * s1)}{unit}")
            answer.append(f"{name} {fmt(per_serving * s2)}{unit}")
            scaled[name], units[name] = float(per_serving * s2), unit
        head = f"{s1}>{s2}:{','.join(given)}"
        return Problem(key=head, prompt=f"{head}=", solution=",".join(answer),
                       data={"scaled": scaled, "units": units, "servings": (s1, s2), "given": given})

    def question(self, problem: Problem) -> str:
        s1, s2 = problem.data["servings"]
        return (f"A recipe for {s1} servings uses {', '.join(problem.data['given'])}. Scale it to {s2} servings; "
                "answer as comma-separated `name quantity+unit` parts in the same order, like `flour 300g,egg 2`.")

    def explanation(self, problem: Problem) -> str:
        s1, s2 = problem.data["servings"]
        return f"Every quantity is multiplied by {s2}/{s1}."

    def extract(self, completion: str) -> dict[str, tuple[float, str]] | None:
        text = completion.strip()
        if not text or len(text) > MAX_ANSWER_CHARS:
            return None
        out: dict[str, tuple[float, str]] = {}
        for part in text.split(","):
            m = _PART.fullmatch(part.strip())
            if m is None or m.group(1) in out:
                return None
            out[m.group(1)] = (float(m.group(2)), m.group(3))
        return out

    def check(self, problem: Problem, answer: dict[str, tuple[float, str]]) -> bool:
        scaled: dict[str, float] = problem.data["scaled"]
        if set(answer) != set(scaled):
            return False
        for name, (qty, unit) in answer.items():
            true = scaled[name]
            if unit != problem.data["units"][name]:
                return False
            if abs(qty - true) > max(self.params.tolerance * abs(true), 0.01):
                return False
        return True
