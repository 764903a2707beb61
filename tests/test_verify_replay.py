"""grpo.verify_replay: with the check trained on the model's own answers (verify_own), the wrong answers of the last
N steps stay candidates for the check, so late in RL, when a step has few wrong answers, the check still sees
enough of its slips; the kept answers survive a resume."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny import CoinKey

import rlscale.rl.grpo as grpo
from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.checkpoint import latest_checkpoint
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.self_verify import verify_prompt
from rlscale.rl.tasks import ArithmeticParams, make_task

OWN = {"verify_own": True, "verify_coef": 0.0, "verify_sft_coef": 1.0}


class Log:
    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.logs.append((step, metrics))


def test_verify_replay_needs_the_check_on_own_answers():
    GRPOConfig(verify_replay=4, **OWN)
    with pytest.raises(ValidationError, match="verify_replay"):
        GRPOConfig(verify_replay=4)


def test_the_check_sees_wrong_answers_of_the_last_n_steps_and_no_older(monkeypatch):
    model, tok = load_model(ModelConfig(size="nano"), seed=0)
    task = CoinKey(make_task(ArithmeticParams(digits=2)), share=0.7)  # few wrong answers: the replay is drawn on
    cfg = GRPOConfig(steps=6, prompts_per_step=8, num_generations=4, max_new_tokens=3, verify_replay=2, **OWN)
    texts: list[list[str]] = []  # each step's answers
    checked: list[list[str]] = []  # each step's check prompts
    real_sample, real_encode = grpo.sample, grpo.encode_prompts

    def spy_sample(model_, tokenizer, prompts, *a, **k):
        out = real_sample(model_, tokenizer, prompts, *a, **k)
        texts.append(list(out.texts))
        return out

    def spy_encode(tokenizer, prompts, device):
        checked.append(list(prompts))
        return real_encode(tokenizer, prompts, device)

    monkeypatch.setattr(grpo, "sample", spy_sample)
    monkeypatch.setattr(grpo, "encode_prompts", spy_encode)
    log = Log()
    train_grpo(model, tok, task, cfg, seed=0, meter=Meter(FlopModel.of(model)), callback=log)
    assert len(texts) == len(checked) == 6
    right_now, wrong_now = [], []  # per step: check prompts of its right and of its wrong answers
    for step, answers in enumerate(texts):
        problems = task.problems(cfg.prompts_per_step, "train", seed=step)  # the loop's draw for seed 0
        rows = [p for p in problems for _ in range(cfg.num_generations)]
        right_now.append({verify_prompt(task, p, c) for p, c in zip(rows, answers) if task.is_correct(p, c)})
        wrong_now.append({verify_prompt(task, p, c) for p, c in zip(rows, answers) if not task.is_correct(p, c)})
    replayed = 0
    for step, prompts in enumerate(checked):
        kept = set().union(*wrong_now[max(0, step - 2) : step])  # the wrong answers of the 2 steps before
        assert all(q in right_now[step] | wrong_now[step] | kept for q in prompts)  # nothing older, nothing else
        right = sum(q in right_now[step] for q in prompts)
        assert 2 * right == len(prompts)  # right and wrong in equal numbers, the replayed ones counted as wrong
        assert log.logs[step][1]["train/verify_checked"] == len(prompts)
        replayed += sum(q in kept and q not in wrong_now[step] and q not in right_now[step] for q in prompts)
    assert replayed > 0  # some checks were of an earlier step's slips


def _run(tmp_path, log, **kw):
    model, tok = load_model(ModelConfig(size="nano"), seed=0)
    task = CoinKey(make_task(ArithmeticParams(digits=2)), share=0.7)
    cfg = GRPOConfig(steps=6, prompts_per_step=8, num_generations=4, max_new_tokens=3, learning_rate=1e-3,
                     checkpoint_every=2, verify_replay=3, **OWN)
    train_grpo(model, tok, task, cfg, seed=3, meter=Meter(FlopModel.of(model)), callback=log, ckpt_dir=tmp_path, **kw)
    return model


def test_a_resume_keeps_the_replayed_answers(tmp_path):
    straight = Log()
    model_a = _run(tmp_path / "a", straight)
    _run(tmp_path / "b", Log(), stop_after=4)
    assert latest_checkpoint(tmp_path / "b")[:2] == ("rl", 4)
    resumed = Log()
    model_b = _run(tmp_path / "b", resumed)
    assert [s for s, _ in resumed.logs] == [5, 6]
    for (_, ma), (_, mb) in zip(straight.logs[4:], resumed.logs):
        assert ma["train/verify_checked"] == mb["train/verify_checked"]
        assert ma["train/verify_sft_loss"] == mb["train/verify_sft_loss"]
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
