"""Tests of the verifiable tasks: generators, verifiers, rewards, train/eval split and hostile input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlscale.rl.tasks import (
    ArithmeticParams,
    ArithmeticTask,
    CountdownParams,
    CountdownTask,
    Problem,
    RecipeParams,
    RecipeTask,
    Task,
    TaskParams,
    make_task,
)

ALL_PARAMS = [
    ArithmeticParams(),
    ArithmeticParams(digits=3, ops=["+", "*"]),
    CountdownParams(),
    CountdownParams(num_numbers=6, max_number=50, max_target=500),
    RecipeParams(),
    RecipeParams(num_ingredients=6, max_servings=12),
]
IDS = ["arith", "arith-mul", "countdown", "countdown-6", "recipe", "recipe-6"]

PAYLOADS = [
    "__import__('os').system('touch /tmp/pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()",
    "9**9**9",
    "(" * 10000,
    "(" * 10000 + "1" + ")" * 10000,
    "1+" * 50_000 + "1",
    "-" * 99 + "1",
    "[" * 200,
    "lambda: 1",
    "1 if 1 else 2",
    "\x00",
    "1\x00",
    "",
    " ",
    "\n\n",
    "\U0001d7d9+\U0001d7da",  # double-struck digits
    "\uff11+\uff12",  # fullwidth digits
    "\u0663",  # Arabic-Indic digit
    "9" * 100_000,
    "flour 1e309g",
    "egg nan",
    "egg inf",
    ",",
    "egg 1,,egg 2",
]


def _rewards(task: Task) -> set[float]:
    return {0.0, task.params.format_reward, 1.0}


# ---------------------------------------------------------------- arithmetic


class _FixedRng:
    """Stands in for random.Random in `ArithmeticTask.sample`: fixed operands and operator."""

    def __init__(self, a: int, b: int, op: str) -> None:
        self.values, self.op = [a, b], op

    def randint(self, lo: int, hi: int) -> int:
        return self.values.pop(0)

    def choice(self, seq: list[str]) -> str:
        return self.op


@pytest.mark.parametrize("op", ["+", "*"])
@pytest.mark.parametrize("zero_pad", [True, False])
def test_arithmetic_exhaustive_one_digit(op: str, zero_pad: bool) -> None:
    task = ArithmeticTask(ArithmeticParams(digits=1, ops=[op], zero_pad=zero_pad))
    for a in range(10):
        for b in range(10):
            p = task.sample(_FixedRng(a, b, op))  # type: ignore[arg-type]
            assert p.prompt == f"{a}{op}{b}="
            result = a + b if op == "+" else a * b
            assert p.solution == (f"{result:02d}" if zero_pad else str(result))
            assert task.reward(p, str(result)) == 1.0 and task.reward(p, f"0{result}") == 1.0
            assert task.reward(p, p.solution) == 1.0
            assert task.reward(p, f" {result}\n") == 1.0
            assert task.reward(p, str(result + 1)) == task.params.format_reward
            assert task.reward(p, f"{result}x") == 0.0


def test_arithmetic_generated_solutions() -> None:
    task = ArithmeticTask(ArithmeticParams(digits=4, ops=["+", "*"]))
    rng = random.Random(0)
    for _ in range(500):
        p = task.sample(rng)
        assert task.reward(p, p.solution) == 1.0
        assert task.reward(p, str(p.data["result"] - 1)) == task.params.format_reward


# ---------------------------------------------------------------- countdown


@pytest.mark.parametrize(
    "params",
    [
        CountdownParams(),
        CountdownParams(num_numbers=2, max_number=5, max_target=3),
        CountdownParams(num_numbers=6, max_number=100, max_target=1000),
    ],
)
def test_countdown_generated_solutions(params: CountdownParams) -> None:
    task = CountdownTask(params)
    rng = random.Random(1)
    for _ in range(500):
        p = task.sample(rng)
        numbers, target = p.data["numbers"], p.data["target"]
        assert len(numbers) == params.num_numbers
        assert numbers == sorted(numbers)
        assert all(1 <= n <= params.max_number for n in numbers)
        assert isinstance(target, int)
        assert 1 <= target <= params.max_target
        assert p.prompt == " ".join(map(str, numbers)) + f">{target}:"
        assert task.reward(p, p.solution) == 1.0, p


def _countdown(numbers: list[int], target: int) -> tuple[CountdownTask, Problem]:
    shown = " ".join(map(str, sorted(numbers)))
    p = Problem(
        key=f"{shown}>{target}",
        prompt=f"{shown}>{target}:",
        solution="",
        data={"numbers": sorted(numbers), "target": target},
    )
    return CountdownTask(CountdownParams()), p


@pytest.mark.parametrize("expr", ["3*5+7", "7+3*5", "(3*5)+7", " 5*3 + 7 ", "((7))+(5*(3))", "15+7", "15+(7)"])
def test_countdown_correct(expr: str) -> None:
    task, p = _countdown([3, 5, 7, 15], 22)
    assert task.reward(p, expr) == 1.0


def test_countdown_multiset() -> None:
    task, p = _countdown([3, 3, 5], 11)
    assert task.reward(p, "3+3+5") == 1.0  # two 3s given, two used
    task, p = _countdown([3, 5, 8], 11)
    assert task.reward(p, "3+3+5") == task.params.format_reward  # only one 3 given
    assert task.reward(p, "3+8") == 1.0  # not every number has to be used


def test_countdown_exact_fractions() -> None:
    task, p = _countdown([1, 3, 6], 2)
    assert task.reward(p, "(1/3)*6") == 1.0  # non-integer intermediates are exact
    task, p = _countdown([1, 1, 3, 3], 0)
    assert task.reward(p, "1/3*3-1") == 1.0


@pytest.mark.parametrize(
    "expr",
    [
        "3*5+6",  # wrong value
        "3*5",  # wrong value
        "7+7+7+1",  # 7 reused and 1 not given
        "11+11",  # 11 not given
        "22",  # the target itself is not given
        "5/(3-3)+7",  # division by zero
        "7/(5-5)",
        "(3+5+7)*0",  # 0 not given
    ],
)
def test_countdown_well_formed_wrong(expr: str) -> None:
    task, p = _countdown([3, 5, 7], 22)
    assert task.extract(expr) is not None
    assert task.reward(p, expr) == task.params.format_reward


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "1 if 1 else 2",
        "2**10",
        "-3+25",
        "+22",
        "25+-3",
        "1.5*14+1",
        "22.0",
        "x",
        "abs(22)",
        "int.real",
        "(22).real",
        "lambda: 22",
        "15//1+7",
        "15%8+21",
        "15<<1",
        "3*5+7,",
        "(3*5+7",
        "3*5+7)",
        "3 5",
        "()",
        "1_5+7",
        "0x16",
        "015+7",
        "3*5+7=22",
        "3*5+7\n=22",
        "True+21",
        "[22]",
        "",
        "1+" * 60 + "1",  # over 100 characters
        "(" * 60 + "22" + ")" * 60,
    ],
)
def test_countdown_refused(expr: str) -> None:
    task, p = _countdown([3, 5, 7, 15, 22, 25], 22)
    assert task.extract(expr) is None
    assert task.reward(p, expr) == 0.0


# ---------------------------------------------------------------- recipe


@pytest.mark.parametrize(
    "params",
    [
        RecipeParams(),
        RecipeParams(num_ingredients=1, max_servings=2),
        RecipeParams(num_ingredients=6, max_servings=100),
    ],
)
def test_recipe_generated_solutions(params: RecipeParams) -> None:
    task = RecipeTask(params)
    rng = random.Random(2)
    for _ in range(500):
        p = task.sample(rng)
        assert p.prompt.endswith("=")
        assert p.key == p.prompt[:-1]
        assert len(p.data["scaled"]) == params.num_ingredients
        assert task.reward(p, p.solution) == 1.0, p
        reordered = ",".join(reversed(p.solution.split(",")))
        assert task.reward(p, reordered) == 1.0


def _recipe(tolerance: float = 0.01) -> tuple[RecipeTask, Problem]:
    p = Problem(
        key="4>6:flour 200g,egg 3",
        prompt="4>6:flour 200g,egg 3=",
        solution="flour 300g,egg 4.5",
        data={"scaled": {"flour": 300.0, "egg": 4.5}, "units": {"flour": "g", "egg": ""}},
    )
    return RecipeTask(RecipeParams(tolerance=tolerance)), p


@pytest.mark.parametrize(
    "answer",
    [
        "flour 300g,egg 4.5",
        "egg 4.5,flour 300g",
        " flour 300 g , egg 4.50 ",
        "flour 302.9g,egg 4.46",
        "flour 297.1g,egg 4.54",
        "flour 300.00g,egg 4.5",
    ],
)
def test_recipe_correct(answer: str) -> None:
    task, p = _recipe()
    assert task.reward(p, answer) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "flour 303.1g,egg 4.5",  # over 1% off
        "flour 296.9g,egg 4.5",
        "flour 300g,egg 4.6",
        "flour 200g,egg 3",  # unscaled
        "flour 300g",  # missing ingredient
        "egg 4.5",
        "flour 300g,egg 4.5,salt 1tsp",  # extra ingredient
        "flour 300ml,egg 4.5",  # wrong unit
        "flour 300,egg 4.5",
        "flour 300g,egg 4.5g",
        "flower 300g,egg 4.5",
    ],
)
def test_recipe_well_formed_wrong(answer: str) -> None:
    task, p = _recipe()
    assert task.extract(answer) is not None
    assert task.reward(p, answer) == task.params.format_reward


def test_recipe_tolerance() -> None:
    task, p = _recipe(tolerance=0.1)
    assert task.reward(p, "flour 329g,egg 4.9") == 1.0
    assert task.reward(p, "flour 331g,egg 4.5") == task.params.format_reward
    task, p = _recipe(tolerance=0.0)
    assert task.reward(p, "flour 300.01g,egg 4.5") == 1.0  # 0.01 absolute slack
    assert task.reward(p, "flour 300.02g,egg 4.5") == task.params.format_reward


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "flour300g,egg 4.5",
        "flour 300g;egg 4.5",
        "flour 300g,egg 4.5,",
        "flour 300g,,egg 4.5",
        "flour 300g,flour 300g,egg 4.5",  # repeated name
        "flour -300g,egg 4.5",
        "flour 3e2g,egg 4.5",
        "flour .5g,egg 4.5",
        "Flour 300g,egg 4.5",
        "flour 300g egg 4.5",
        "flour 300g,egg 4.5 eggs please",
        "flour 300g,egg " + "4" * 400,
        "flour 300g,egg nan",
        "flour 300g,egg inf",
        "flour \uff13\uff10\uff10g,egg 4.5",  # fullwidth digits
    ],
)
def test_recipe_malformed(answer: str) -> None:
    task, p = _recipe()
    assert task.extract(answer) is None
    assert task.reward(p, answer) == 0.0


# ---------------------------------------------------------------- all tasks


@pytest.mark.parametrize("params", ALL_PARAMS, ids=IDS)
def test_reward_levels(params: TaskParams) -> None:
    task = make_task(params)
    p = task.sample(random.Random(3))
    assert task.reward(p, p.solution) == 1.0
    assert task.reward(p, "###") == 0.0
    assert task.reward(p, "") == 0.0


@pytest.mark.parametrize("params", ALL_PARAMS, ids=IDS)
def test_split_disjoint_and_deterministic(params: TaskParams) -> None:
    task = make_task(params)
    eval_problems = task.problems(500, "eval", seed=7)
    train_problems = task.problems(2000, "train", seed=7)
    eval_keys = [p.key for p in eval_problems]
    assert len(set(eval_keys)) == 500
    assert not set(eval_keys) & {p.key for p in train_problems}
    assert all(task.split_of(p) == "eval" for p in eval_problems)
    assert all(task.split_of(p) == "train" for p in train_problems)
    assert task.problems(500, "eval", seed=7) == eval_problems
    assert task.problems(2000, "train", seed=7) == train_problems
    assert task.problems(50, "train", seed=8) != train_problems[:50]
    # the split depends on the key only, not on the seed
    assert not set(eval_keys) & {p.key for p in task.problems(2000, "train", seed=9)}


def test_problems_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        make_task(ArithmeticParams()).problems(1, "test", seed=0)


@pytest.mark.parametrize("params", ALL_PARAMS, ids=IDS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_payloads_never_raise(params: TaskParams, payload: str) -> None:
    task = make_task(params)
    p = task.sample(random.Random(4))
    assert task.reward(p, payload) in _rewards(task)
    task.extract(payload)  # extract alone must not raise either


@pytest.mark.parametrize("params", ALL_PARAMS, ids=IDS)
def test_payload_creates_no_file(params: TaskParams, tmp_path: Path) -> None:
    task = make_task(params)
    p = task.sample(random.Random(5))
    target = tmp_path / "pwned"
    payloads = [
        f"__import__('pathlib').Path({str(target)!r}).touch()",
        f"open({str(target)!r}, 'w').write('x')",
        f"__import__('os').system('touch {target}')",
    ]
    for payload in payloads:
        assert task.reward(p, payload) == 0.0
    assert not target.exists()


_text = st.one_of(
    st.text(),
    st.text(alphabet="0123456789+-*/() .,=>:abcdefglmnorstuwy", max_size=120),
    st.text(min_size=1, max_size=20).map(lambda s: s * (100_000 // len(s))),  # long strings
    st.binary(max_size=500).map(lambda b: b.decode("latin-1")),
    st.sampled_from(PAYLOADS),
)


@pytest.mark.parametrize("params", ALL_PARAMS, ids=IDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(s=_text)
def test_arbitrary_strings_never_raise(params: TaskParams, s: str) -> None:
    task = make_task(params)
    p = task.sample(random.Random(6))
    assert task.reward(p, s) in _rewards(task)
    assert task.reward(p, p.solution + s) in _rewards(task)
