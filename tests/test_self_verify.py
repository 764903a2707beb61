"""Self-verification pieces: verdict parsing, worked checks, SFT examples, P(yes) scoring, evaluation."""

from __future__ import annotations

import random

import torch

from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.evaluate import EvalConfig, evaluate
from rlscale.rl.self_verify import (
    corrupt,
    p_yes,
    parse_verdict,
    sft_examples,
    split_trace,
    verdict_reward,
    verify_prompt,
)
from rlscale.rl.tasks import ArithmeticParams, CountdownParams, Problem, RecipeParams, make_task


def test_parse_verdict_and_split_trace():
    assert parse_verdict("260088=,930122! no") is False
    assert parse_verdict("030033= yes") is True
    assert parse_verdict("yes no maybe") is None and parse_verdict("") is None
    assert split_trace("260088=,930122! no") == "260088=,930122!"
    assert split_trace("030033=") == "030033="


def test_verdict_reward_is_agreement_with_the_verifier():
    assert verdict_reward("750123!,001015! no", False) == 1.0 and verdict_reward("750123!,001015! yes", False) == 0.0
    assert verdict_reward("030033= yes", True) == 1.0 and verdict_reward("030033=", True) == 0.0


def test_arithmetic_check_is_column_addition():
    task = make_task(ArithmeticParams(digits=2))
    p = task.sample(random.Random(0))
    a, b = p.data["a"], p.data["b"]
    assert parse_verdict(task.check_trace(p, p.solution) + " x") is None
    assert "!" not in task.check_trace(p, p.solution)
    assert "!" in task.check_trace(p, str(a + b + 1))
    assert task.check_trace(p, "abc") == "?"
    q = Problem(key="7+5", prompt="07+05=", solution="012", data={"a": 7, "b": 5, "op": "+", "result": 12})
    assert task.check_trace(q, "053") == "750123!,001015!"  # units: 7+5+0=12 vs 3; tens: 0+0+1=01 vs 5
    assert task.check_trace(q, "012") == "750122=,001011="


def test_sft_examples_labels_come_from_the_verifier():
    rng = random.Random(0)
    for params in (ArithmeticParams(), CountdownParams(), RecipeParams()):
        task = make_task(params)
        problems = task.problems(200, "train", seed=1)
        examples = sft_examples(task, problems, rng, verify_fraction=0.5, correct_share=0.3)
        verify = [(pr, c) for pr, c in examples if pr.endswith(" ok?")]
        assert 60 < len(verify) < 140
        by_prompt = {p.prompt: p for p in problems}
        yes = 0
        for prompt, completion in verify:
            problem = next(by_prompt[k] for k in by_prompt if prompt.startswith(k))
            shown = prompt[len(problem.prompt) : -len(" ok?")]
            assert parse_verdict(completion) == task.is_correct(problem, shown)
            yes += parse_verdict(completion)
        assert 0.15 < yes / len(verify) < 0.5  # mostly wrong answers shown, as configured


def test_corrupt_gives_wrong_answers():
    task = make_task(ArithmeticParams(digits=3))
    rng = random.Random(0)
    problems = task.problems(300, "train", seed=2)
    wrong = sum(not task.is_correct(p, corrupt(p.solution, rng)) for p in problems)
    assert wrong >= 280  # a leading zero added can leave the value unchanged, rarely


def test_p_yes_and_evaluate_on_a_tiny_model(nano):
    model, tok = nano
    task = make_task(ArithmeticParams(digits=2))
    problems = task.problems(6, "eval", seed=0)
    prompts = [verify_prompt(task, p, p.solution) for p in problems]
    probs, batch = p_yes(model, tok, prompts, [task.check_trace(p, p.solution) for p in problems])
    assert probs.shape == (6,) and torch.all((probs > 0) & (probs < 1)) and batch.input_ids.shape[1] > len(prompts[0])
    meter = Meter(FlopModel.of(model))
    cfg = EvalConfig(problems=6, samples=4, max_new_tokens=4, verify_max_new_tokens=8)
    metrics, table = evaluate(model, tok, task, problems, cfg, meter, torch.Generator().manual_seed(0))
    assert len(table) == 24 and {"problem", "answer", "correct", "self_check", "self_verdict"} <= set(table[0])
    for key in ("eval/accuracy", "eval/pass_at_1", "eval/pass_at_2", "eval/pass_at_4", "eval/verify_accuracy",
                "eval/best_of_4_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert meter.flops["eval"] > 0 and meter.seconds["eval"] > 0
