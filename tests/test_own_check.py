"""The check trained on the model's own answers (grpo.verify_own, GenRM-style), the verdict-only check
(task.check = "verdict"): balanced own answers, the conversation shown, P(yes) in one pass at eval; and the check
in columns (task.check = "columns"): every sum worked one digit at a time."""

from __future__ import annotations

import random
import re

import pytest
import torch
from pydantic import ValidationError
from tiny import CoinKey

import rlscale.rl.grpo as grpo
from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.chat import VERDICT_RULE, column_working, columns, for_model
from rlscale.rl.evaluate import EvalConfig, evaluate
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.self_verify import balanced_own, check_target, p_yes, sft_examples, verify_prompt
from rlscale.rl.tasks import ArithmeticParams, DatasetParams, make_task


def test_balanced_own_keeps_every_rarer_answer_and_as_many_of_the_other():
    rng = random.Random(0)
    correct = [True, False, False, True, False, False, False, False]
    keep = balanced_own(correct, rng)
    assert keep == sorted(keep) and len(set(keep)) == len(keep)
    assert [i for i in keep if correct[i]] == [0, 3] and sum(not correct[i] for i in keep) == 2
    assert balanced_own([True] * 5, rng) == [] and balanced_own([False] * 5, rng) == []
    draws = {tuple(balanced_own(correct, random.Random(s))) for s in range(30)}
    assert len(draws) > 5  # the wrong ones kept are drawn at random, not the first two


def test_verify_own_config_needs_the_supervised_check_alone():
    GRPOConfig(verify_own=True, verify_coef=0.0, verify_sft_coef=1.0)
    for bad in ({"verify_coef": 0.5, "verify_sft_coef": 1.0}, {"verify_coef": 0.0, "verify_sft_coef": 0.0},
                {"verify_coef": 0.0, "verify_sft_coef": 1.0, "self_verify": False}):
        with pytest.raises(ValidationError, match="verify_own"):
            GRPOConfig(verify_own=True, **bad)


@pytest.mark.parametrize("check", ["written", "verdict"])
def test_verify_own_trains_the_check_on_the_steps_own_answers_balanced(check, monkeypatch):
    """Every answer the check is trained on is one the model wrote this step (never the reference or a perturbed
    one), right and wrong in equal numbers, labelled by the program verifier; no check is sampled."""
    model, tok = load_model(ModelConfig(size="nano"), seed=0)
    task = CoinKey(make_task(ArithmeticParams(digits=1, check=check)), share=0.3)
    seen: list[tuple[list[str], list[str]]] = []  # (answers written this step, answers shown to the check)
    real_sample, real_verify = grpo.sample, grpo.verify_prompt
    step: dict[str, list] = {"solved": [], "shown": [], "targets": []}

    def spy_sample(model, tokenizer, prompts, *a, **k):
        out = real_sample(model, tokenizer, prompts, *a, **k)
        if step["solved"] or step["shown"]:
            seen.append((step["solved"], step["shown"]))
        step.update(solved=list(out.texts), shown=[])
        return out

    def spy_verify(task_, problem, completion):
        step["shown"].append((problem, completion))
        return real_verify(task_, problem, completion)

    monkeypatch.setattr(grpo, "sample", spy_sample)
    monkeypatch.setattr(grpo, "verify_prompt", spy_verify)
    cfg = GRPOConfig(steps=6, prompts_per_step=8, num_generations=4, max_new_tokens=3, learning_rate=3e-3,
                     verify_own=True, verify_coef=0.0, verify_sft_coef=1.0)
    logs: list[dict] = []

    class Log:
        def on_log(self, step_: int, metrics: dict[str, float]) -> None:
            logs.append(metrics)

    train_grpo(model, tok, task, cfg, seed=0, meter=Meter(FlopModel.of(model)), callback=Log())
    seen.append((step["solved"], step["shown"]))
    assert len(seen) == 6  # one sample() a step: the solve rollouts, no sampled check
    checked = 0
    for (solved, shown), m in zip(seen, logs):
        assert all(c in solved for _, c in shown)
        oks = [task.is_correct(p, c) for p, c in shown]
        assert sum(oks) == len(oks) - sum(oks) and m["train/verify_checked"] == len(shown)
        checked += len(shown)
    assert checked > 0 and "train/verify_sft_loss" in logs[-1] and "train/verify_reward_mean" not in logs[-1]


def test_verdict_check_teaches_only_the_verdict_and_eval_reads_it_in_one_pass(nano):
    model, tok = nano
    task = make_task(ArithmeticParams(digits=2, check="verdict"))
    p = task.problems(1, "eval", seed=0)[0]
    assert check_target(task, p, p.solution, True) == " yes" and check_target(task, p, "1", False) == " no"
    written = make_task(ArithmeticParams(digits=2))
    assert check_target(written, p, p.solution, True) == f"{written.check_trace(p, p.solution)} yes"
    examples = sft_examples(task, task.problems(40, "train", seed=0), random.Random(0), verify_fraction=1.0)
    assert {c for _, c in examples} == {" yes", " no"}
    problems = task.problems(6, "eval", seed=0)
    meter = Meter(FlopModel.of(model))
    cfg = EvalConfig(problems=6, samples=4, max_new_tokens=4, verify_max_new_tokens=8)
    metrics, table = evaluate(model, tok, task, problems, cfg, meter, torch.Generator().manual_seed(0))
    assert all(row["self_check"] == "" for row in table)  # nothing written: the verdict alone
    prompts = [verify_prompt(task, problems[i // 4], row["answer"]) for i, row in enumerate(table)]
    direct, _ = p_yes(model, tok, prompts, [""] * len(prompts))
    assert [row["p_yes"] for row in table] == pytest.approx(direct.tolist(), abs=1e-4)
    assert 0.0 <= metrics["eval/verify_balanced_accuracy"] <= 1.0 and meter.flops["eval"] > 0


def test_chat_verdict_check_shows_the_models_own_reply_and_asks(smollm2_dir):
    """In chat form the check is the conversation the answer came from, the reply (work included) kept, then a
    second user turn: its prompt starts with the problem's own prompt and the reply."""
    tok = load_model(ModelConfig(path=str(smollm2_dir)))[1]
    task = for_model(make_task(ArithmeticParams(digits=2, prompt_format="chat", check="verdict")), tok)
    p = task.problems(1, "eval", seed=0)[0]
    reply = "12 + 30 = 41.\nThe answer is \\boxed{41}."
    prompt = verify_prompt(task, p, f" {reply} ")
    assert prompt.startswith(p.prompt + reply) and prompt.count(VERDICT_RULE) == 1
    assert prompt.endswith(task.render("x")[-len("<|im_start|>assistant\n"):])  # ready for the second reply
    assert check_target(task, p, reply, False) == " no"


def test_columns_known_cases():
    assert columns(86, "+", 75) == "6 + 5 = 11 (carry 1); 8 + 7 + 1 = 16; so 86 + 75 = 161"
    assert columns(43, "-", 15) == "13 - 5 = 8 (borrow 1); 4 - 1 - 1 = 2; so 43 - 15 = 28"
    assert columns(105, "-", 97) == "15 - 7 = 8 (borrow 1); 10 - 1 - 9 = 0 (borrow 1); 1 - 1 = 0; so 105 - 97 = 8"
    assert columns(7, "+", 15) == "7 + 5 = 12 (carry 1); 0 + 1 + 1 = 2; so 7 + 15 = 22"
    assert column_working("43 - 15 = 28. Then 3 - 9 = -6.") == f"{columns(43, '-', 15)}. Then 3 - 9 = -6."


def test_columns_every_step_is_one_digit_arithmetic_and_right():
    """Each step is `x [op y] [op 1] = v` with one-digit operands (a borrowed column shows 1x), its value right, the
    carry or borrow noted when the next column takes it, and the result that of the whole sum."""
    rng = random.Random(0)
    step = re.compile(r"^(1?\d)( [+-] \d)?( [+-] 1)?( [+-] \d)? = (\d+)( \((carry|borrow) 1\))?$")
    for _ in range(2000):
        a, b, op = rng.randrange(10_000), rng.randrange(10_000), rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        work, result = columns(a, op, b).split("; so ")
        assert result == f"{a} {op} {b} = {a + b if op == '+' else a - b}"
        carry, digits = 0, []
        for s in work.split("; "):
            m = step.match(s)
            assert m, s
            terms = s.split(" = ")[0].replace("- ", "-").replace("+ ", "").split()
            assert int(m[5]) == sum(map(int, terms)), s
            if carry:  # the previous column's carry is added last, its borrow taken first
                assert terms[-1] == "1" if op == "+" else terms[1] == "-1", s
            carry = 1 if m[6] else 0
            digits.append(int(m[5]) % 10)
        assert int("".join(map(str, reversed(digits)))) == (a + b if op == "+" else a - b) % 10 ** len(digits)


def test_chat_check_in_columns_works_the_sum_and_compares(smollm2_dir):
    tok = load_model(ModelConfig(path=str(smollm2_dir)))[1]
    params = DatasetParams(path="experiments/data/word_problems.jsonl", explanation_column="explanation",
                           verifier="numeric", prompt_format="chat", check="columns")
    task = for_model(make_task(params), tok)
    p = task.problems(1, "eval", seed=0)[0]
    a, op, b = re.match(r"(\d+) ([+-]) (\d+)", p.data["explanation"]).groups()
    right, wrong = p.data["answer"], str(int(p.data["answer"]) + 10)
    assert check_target(task, p, f"\\boxed{{{right}}}", True).startswith(columns(int(a), op, int(b)))
    assert check_target(task, p, f"\\boxed{{{wrong}}}", False).endswith(
        f"the proposed answer {wrong} does not match. Verdict: no")
