"""Write `word_problems.jsonl`: 800 short arithmetic word problems for the `dataset` task.

Two-digit addition and subtraction (never a negative result) in 12 everyday settings, each row a question, its
answer and a one-line explanation, e.g. `Tom has 23 apples and buys 45 more. How many apples does he have now?`
-> `68` (`23 + 45 = 68.`). Deterministic (seed 0); regenerate with

    .venv/bin/python experiments/data/make_word_problems.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "word_problems.jsonl"
COUNT = 800
NAMES = [("Tom", "he"), ("Ana", "she"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"), ("Lea", "she"),
         ("Raj", "he"), ("Zoe", "she"), ("Leo", "he"), ("Ivy", "she")]
# (addition template, subtraction template); {n} a name, {p} its pronoun, {a} and {b} the two numbers
TEMPLATES = [
    ("{n} has {a} apples and buys {b} more. How many apples does {p} have now?",
     "{n} has {a} apples and gives away {b}. How many apples does {p} have left?"),
    ("{n} has {a} coins and finds {b} more. How many coins does {p} have now?",
     "{n} has {a} coins and spends {b}. How many coins are left?"),
    ("A book has {a} pages in part one and {b} pages in part two. How many pages does it have?",
     "{n} must read {a} pages and has read {b}. How many pages are left?"),
    ("{n} has {a} marbles and wins {b} more. How many marbles does {p} have now?",
     "{n} has {a} marbles and loses {b}. How many marbles are left?"),
    ("{n} drives {a} kilometres in the morning and {b} in the afternoon. How many kilometres is that in all?",
     "A trip is {a} kilometres long and {n} has driven {b}. How many kilometres are left?"),
    ("{n} has {a} stickers and gets {b} more. How many stickers does {p} have now?",
     "{n} has {a} stickers and gives {b} to a friend. How many stickers are left?"),
    ("{n} bakes {a} cookies and then {b} more. How many cookies did {p} bake?",
     "{n} bakes {a} cookies and sells {b}. How many cookies are left?"),
    ("A shelf holds {a} books and {n} adds {b} more. How many books are on the shelf?",
     "A shelf holds {a} books and {n} takes {b} away. How many books are on the shelf now?"),
    ("{a} birds sit on a tree and {b} more land. How many birds are on the tree?",
     "{a} birds sit on a tree and {b} fly away. How many birds are still on the tree?"),
    ("{n} saves {a} dollars in May and {b} dollars in June. How many dollars did {p} save?",
     "{n} has {a} dollars and spends {b} on a gift. How many dollars are left?"),
    ("A class has {a} girls and {b} boys. How many students are in the class?",
     "A bus carries {a} students and {b} get off. How many students are still on the bus?"),
    ("{n} reads for {a} minutes on Monday and {b} minutes on Tuesday. How many minutes is that in total?",
     "A film lasts {a} minutes and {n} has watched {b}. How many minutes are left?"),
]


def make(count: int = COUNT, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct problems drawn from `seed`."""
    rng = random.Random(seed)
    rows: dict[str, dict[str, str]] = {}
    while len(rows) < count:
        add, sub = rng.choice(TEMPLATES)
        name, pronoun = rng.choice(NAMES)
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            template, result, sign = add, a + b, "+"
        else:
            a, b = max(a, b), min(a, b)
            template, result, sign = sub, a - b, "-"
        question = template.format(n=name, p=pronoun, a=a, b=b)
        explanation = f"{a} {sign} {b} = {result}."
        rows.setdefault(question, {"question": question, "answer": str(result), "explanation": explanation})
    return list(rows.values())


def main() -> None:
    OUT.write_text("".join(json.dumps(row) + "\n" for row in make()), encoding="utf-8")
    print(f"wrote {COUNT} problems to {OUT}")


if __name__ == "__main__":
    main()
