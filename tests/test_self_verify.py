"""Self-verification pieces: verdict parsing, worked checks, SFT examples, P(yes) scoring, evaluation."""

from __future__ import annotations

import random

import pytest
import torch

from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.chat import for_model
from rlscale.rl.evaluate import EvalConfig, _check, evaluate
from rlscale.rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts, sample
from rlscale.rl.model import ModelConfig, load_model
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
    probs, passes = p_yes(model, tok, prompts, [task.check_trace(p, p.solution) for p in problems])
    assert probs.shape == (6,) and torch.all((probs > 0) & (probs < 1)) and passes[0][0] > 6 * len(prompts[0])
    meter = Meter(FlopModel.of(model))
    cfg = EvalConfig(problems=6, samples=4, max_new_tokens=4, verify_max_new_tokens=8)
    metrics, table = evaluate(model, tok, task, problems, cfg, meter, torch.Generator().manual_seed(0))
    assert len(table) == 24 and {"problem", "answer", "correct", "self_check", "self_verdict"} <= set(table[0])
    for key in ("eval/accuracy", "eval/pass_at_1", "eval/pass_at_2", "eval/pass_at_4", "eval/verify_accuracy",
                "eval/best_of_4_accuracy", "eval/maj_at_4_accuracy", "eval/weighted_vote_at_4_accuracy",
                "eval/verify_tpr", "eval/verify_tnr", "eval/verify_ece", "eval/verify_balanced_accuracy"):
        if key in metrics or not key.startswith("eval/verify_t"):  # TPR, TNR: only when the class is present
            assert 0.0 <= metrics[key] <= 1.0
    assert "eval/verify_tpr" in metrics or "eval/verify_tnr" in metrics
    assert meter.flops["eval"] > 0 and meter.seconds["eval"] > 0


def _p_yes_teacher_forced(model, tok, prompts, traces):
    """The definition, computed the plain way: every row runs prompt + "{trace} verdict" + eos whole."""
    both = prompts + prompts
    ids, mask = encode_prompts(tok, both, torch.device("cpu"))
    cids, cmask = encode_completions(tok, [f"{t} yes" for t in traces] + [f"{t} no" for t in traces],
                                     torch.device("cpu"))
    logp = completion_logprobs(model, Batch(ids, mask, cids, cmask, []))
    seq = (logp * cmask).sum(-1)
    return torch.sigmoid(seq[: len(prompts)] - seq[len(prompts) :])


def test_sampled_checks_average_p_yes_over_the_k_checks(nano):
    """eval.verify_samples = K: each answer's P(yes) is the mean over K checks sampled at the eval temperature of
    P(yes | check) (GenRM-CoT); the table keeps the first check; K = 1 is the one greedy check."""
    model, tok = nano
    task = make_task(ArithmeticParams(digits=2))
    problems = task.problems(5, "eval", seed=3)
    prompts = [verify_prompt(task, p, p.solution if i % 2 else f"{int(p.solution) + 1:03d}")
               for i, p in enumerate(problems)]
    rows = [q for q in prompts for _ in range(4)]
    meter = Meter(FlopModel.of(model))
    cfg = EvalConfig(verify_samples=4, verify_max_new_tokens=12)
    texts, probs = _check(model, tok, prompts, cfg, meter, torch.Generator().manual_seed(5))
    drawn = sample(model, tok, rows, 12, 1.0, generator=torch.Generator().manual_seed(5))
    assert len(set(drawn.texts)) > len(prompts)  # sampled checks, not one greedy check repeated
    want = _p_yes_teacher_forced(model, tok, rows, [split_trace(t) for t in drawn.texts]).view(-1, 4).mean(1)
    assert texts == drawn.texts[::4] and torch.allclose(torch.tensor(probs), want, atol=1e-4)
    texts1, probs1 = _check(model, tok, prompts, EvalConfig(verify_max_new_tokens=12), meter, None)
    greedy = sample(model, tok, prompts, 12, greedy=True)
    assert texts1 == greedy.texts
    assert torch.allclose(torch.tensor(probs1), _p_yes_teacher_forced(
        model, tok, prompts, [split_trace(t) for t in greedy.texts]), atol=1e-4)


@pytest.mark.parametrize("which", ["nano", "smollm2"])
def test_p_yes_from_the_shared_prefix_equals_teacher_forcing_both_verdicts(which, nano, request):
    """The fast path (prompt and check once, the verdicts from its KV cache) gives the values of the definition:
    the same up to float32 rounding of a different batch layout (1e-4), on a character and a BPE tokenizer."""
    if which == "nano":
        model, tok = nano
        task = make_task(ArithmeticParams(digits=2))
        problems = task.problems(8, "eval", seed=0)
        answers = [p.solution if i % 2 else corrupt(p.solution, random.Random(i)) for i, p in enumerate(problems)]
        traces = [task.check_trace(p, a) if i % 3 else "" for i, (p, a) in enumerate(zip(problems, answers))]
    else:
        model, tok = load_model(ModelConfig(path=str(request.getfixturevalue("smollm2_dir"))))
        params = ArithmeticParams(digits=2, prompt_format="chat", system_prompt="You check sums.")
        task = for_model(make_task(params), tok)
        problems = task.problems(6, "eval", seed=0)
        answers = [p.solution if i % 2 else corrupt(p.solution, random.Random(i)) for i, p in enumerate(problems)]
        traces = ["", "I redo it: 12 + 30 = 42.\n", "Check:", "x", "Yes or no? The verdict:", "42 = 42,"]
    prompts = [verify_prompt(task, p, a) for p, a in zip(problems, answers)]
    model.eval()
    fast, _ = p_yes(model, tok, prompts, traces)
    with torch.no_grad():
        slow = _p_yes_teacher_forced(model, tok, prompts, traces)
    assert fast.shape == (len(prompts),) and torch.allclose(fast, slow, atol=1e-4), (fast, slow)
    assert float(slow.std()) > 0  # not a constant
    # each problem's prompt as the head: rows of one problem read it once, the same values, fewer tokens run (a chat
    # verdict check keeps the reply in the conversation, so its prompt starts with the problem's)
    if which == "smollm2":
        task = for_model(make_task(params.model_copy(update={"check": "verdict"})), tok)
    twice = [verify_prompt(task, p, a + d) for d in ("", "0") for p, a in zip(problems, answers)]
    heads = [p.prompt for p in problems] * 2
    plain, passes = p_yes(model, tok, twice, traces * 2)
    shared, passes_shared = p_yes(model, tok, twice, traces * 2, heads)
    assert len(passes_shared) == len(passes) + 1  # the heads ran apart: the template kept the prompt as its start
    assert torch.allclose(shared, plain, atol=1e-4), (shared, plain)
    assert sum(t for t, _, _ in passes_shared) < sum(t for t, _, _ in passes)


@pytest.mark.parametrize("which", ["nano", "smollm2"])
def test_p_yes_continuing_the_checks_cache_equals_the_definition(which, nano, request):
    """Evaluation reads P(yes) by continuing the KV cache of the greedy check it just wrote: the values of p_yes (the
    prompt and check run again) within 1e-4, for checks that end in a verdict, run out of tokens or are empty."""
    from rlscale.rl.self_verify import p_yes_from_cache

    if which == "nano":
        model, tok = nano
        task = make_task(ArithmeticParams(digits=2))
    else:
        model, tok = load_model(ModelConfig(path=str(request.getfixturevalue("smollm2_dir"))))
        task = for_model(make_task(ArithmeticParams(digits=2, prompt_format="chat")), tok)
    problems = task.problems(6, "eval", seed=1)
    answers = [p.solution if i % 2 else corrupt(p.solution, random.Random(i)) for i, p in enumerate(problems)]
    prompts = [verify_prompt(task, p, a) for p, a in zip(problems, answers)]
    model.eval()
    for max_new in (1, 3, 12):  # a one-token check, short ones cut off, longer ones
        checked = sample(model, tok, prompts, max_new, greedy=True, keep_cache=True)
        traces = [split_trace(t) for t in checked.texts]
        fused, passes = p_yes_from_cache(model, tok, checked, prompts, traces)
        plain, _ = p_yes(model, tok, prompts, traces)
        assert torch.allclose(fused, plain, atol=1e-4), (max_new, fused, plain)
        assert passes[0][0] >= len(prompts) and all(keys > 0 for _, keys, _ in passes)


def test_rows_padded_together_are_grouped_by_length():
    """`p_yes_from_cache` pads each group of rows to its longest: the groups that feed the fewest tokens, padding
    included, counting PASS_TOKENS for each pass; a long outlier gets a pass of its own."""
    from rlscale.rl.self_verify import PASS_TOKENS, length_groups

    lengths = [28] * 38 + [26] * 118 + [43]  # an eval batch's verdict questions (one answer re-tokenised apart)
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted({lengths[i] for i in g}) for g in groups] == [[26], [28], [43]]
    assert [len(g) for g in length_groups([3] + [2] * 9)] == [10]  # one padded token each is cheaper than a pass
    assert length_groups([5, 5 + PASS_TOKENS + 1]) == [[0], [1]] and length_groups([]) == []


def test_eval_answers_greedy_and_sampled_in_one_batch_as_they_would_be_apart(nano):
    """evaluate() generates each problem's greedy answer and its samples in one batch (one prefill a prompt): the
    greedy answers are those of a greedy batch alone and the samples those of a sampled batch alone, same generator
    seed: the same draws, the same statistics."""
    model, tok = nano
    task = make_task(ArithmeticParams(digits=2))
    problems = task.problems(12, "eval", seed=3)
    cfg = EvalConfig(problems=12, samples=4, max_new_tokens=5, verify_max_new_tokens=8)
    model.eval()
    metrics, table = evaluate(model, tok, task, problems, cfg, Meter(FlopModel.of(model)),
                              torch.Generator().manual_seed(7))
    greedy = sample(model, tok, [p.prompt for p in problems], 5, greedy=True).texts
    sampled = sample(model, tok, [p.prompt for p in problems for _ in range(4)], 5, 1.0,
                     generator=torch.Generator().manual_seed(7)).texts
    assert [row["answer"] for row in table] == sampled
    assert metrics["eval/accuracy"] == sum(task.is_correct(p, c) for p, c in zip(problems, greedy)) / 12
    assert len(set(sampled)) > 12  # the samples differ: the draws were compared, not a greedy copy


def test_chat_verdict_read_from_the_answers_own_cache_equals_the_definition(smollm2_dir):
    """With `task.check = "verdict"` the verdict prompt repeats the problem's prompt and the model's reply, so
    evaluation reads P(yes) by continuing the KV cache of the batch that wrote the answers: p_yes's values within
    1e-4, feeding the question and verdict but not the prompt and reply again."""
    from rlscale.rl.self_verify import p_yes_from_cache

    model, tok = load_model(ModelConfig(path=str(smollm2_dir)))
    task = for_model(make_task(ArithmeticParams(digits=2, prompt_format="chat", check="verdict")), tok)
    problems = task.problems(3, "eval", seed=1)
    model.eval()
    b = sample(model, tok, [p.prompt for p in problems for _ in range(3)], 12, 1.0,
               greedy=torch.arange(9) % 3 == 0, generator=torch.Generator().manual_seed(0), keep_cache=True)
    rows = [j for j in range(9) if j % 3]
    prompts = [verify_prompt(task, problems[j // 3], b.texts[j]) for j in rows]
    fast, passes = p_yes_from_cache(model, tok, b, prompts, [""] * len(rows), rows)
    plain, _ = p_yes(model, tok, prompts, [""] * len(rows))
    assert torch.allclose(fast, plain, atol=1e-4), (fast, plain)
    shortest = min(len(tok(v, add_special_tokens=False)["input_ids"]) for v in prompts)
    fed = max(tokens // rows for tokens, _, rows in passes)  # the rest of the verdict prompt, padded, once a row
    assert fed < shortest - b.prompt_ids.shape[1]  # neither the prompt nor the reply ran again
