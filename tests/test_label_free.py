"""Label-free RL (grpo.reward = 'self_verdict'): the reward is the model's own P(yes) on its answer, so the training
answers are never read; the program verifier's accuracy is still logged beside the verdict rate."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny import CoinKey

from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.tasks import ArithmeticParams, make_task


def _train(task, reward: str) -> tuple[torch.Tensor, list[dict]]:
    model, tok = load_model(ModelConfig(size="nano"), seed=0)
    cfg = GRPOConfig(steps=3, prompts_per_step=4, num_generations=4, max_new_tokens=4, learning_rate=1e-2,
                     self_verify=False, reward=reward)
    logged: list[dict] = []

    class Log:
        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            logged.append(metrics)

    train_grpo(model, tok, task, cfg, seed=0, meter=Meter(FlopModel.of(model)), callback=Log())
    return torch.cat([p.detach().flatten() for p in model.parameters()]), logged


def test_label_free_reward_never_reads_the_answers():
    """Trained against two answer keys, the label-free run ends with the same weights (the verifier-rewarded control
    does not: the key reaches its weights), while the logged accuracy follows the key it was given."""
    task = make_task(ArithmeticParams(digits=1))
    own, own_log = _train(task, "self_verdict")
    other, other_log = _train(CoinKey(task), "self_verdict")
    assert torch.equal(own, other)
    assert [m["train/reward_mean"] for m in own_log] == [m["train/reward_mean"] for m in other_log]
    assert all(0.0 <= m["train/verdict_rate"] <= 1.0 for m in own_log)
    assert [m["train/accuracy"] for m in own_log] != [m["train/accuracy"] for m in other_log]  # logged from the key
    control, _ = _train(task, "verifier")
    control_other, _ = _train(CoinKey(task), "verifier")
    assert not torch.equal(control, control_other)  # the same test fails for a reward that reads the key


def test_label_free_refuses_self_verification_training():
    with pytest.raises(ValidationError, match="self_verify = false"):
        GRPOConfig(reward="self_verdict", self_verify=True)
