"""rlscale's GRPO loss is TRL's: on one batch of completions, the same loss value and the same gradient as
TRL GRPOTrainer's own `_compute_loss`, for each aggregation both implement (what makes the side-by-side benchmarks
compare speed at equal learning per completion, not two different objectives)."""

from __future__ import annotations

import pytest
import torch
from trl_setup import tiny_grpo

from rlscale.rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts
from rlscale.rl.grpo import GRPOConfig, grpo_loss
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.tasks import ArithmeticParams, make_task


def test_loss_and_gradient_equal_trls_on_one_batch(tmp_path):
    torch.manual_seed(0)
    task = make_task(ArithmeticParams(digits=2))
    prompts = [p.prompt for p in task.problems(4, "train", seed=0) for _ in range(4)] + ["3+4="] * 4
    completions = ["7", "12", "7", "1234"] * 5  # unequal lengths (padding on both sides); rows 0 and 2 of a group alike
    mine, tok = load_model(ModelConfig(size="nano", attn_implementation="eager"), seed=0)
    theirs, _ = load_model(ModelConfig(size="nano", attn_implementation="eager"), seed=0)
    batch = Batch(*encode_prompts(tok, prompts, "cpu"), *encode_completions(tok, completions, "cpu"), completions)
    assert batch.prompt_mask.float().mean() < 1 and batch.completion_mask.float().mean() < 1
    adv = torch.randn(len(prompts))  # A_i: any values; the loss is linear in them
    # the sampling policy a little off the current one, so the ratio and its clipping act
    old = completion_logprobs(mine, batch).detach() + 0.3 * torch.randn(batch.completion_ids.shape)
    trainer, _ = tiny_grpo(tmp_path / "store", tmp_path / "out", model=(theirs, tok), epsilon=0.2,
                           epsilon_high=0.28, beta=0.0, max_completion_length=6)
    trainer.current_gradient_accumulation_steps = 1  # what TRL's training_step sets
    theirs.train()
    inputs = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "completion_ids": batch.completion_ids,
              "completion_mask": batch.completion_mask, "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": batch.completion_mask.sum()}
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        mine.zero_grad(), theirs.zero_grad()
        cfg = GRPOConfig(loss_type=loss_type, beta=0.0, epsilon_low=0.2, epsilon_high=0.28)
        logp = completion_logprobs(mine, batch, dedupe=True)  # as train_grpo: prompts once, alike rows once
        loss, stats = grpo_loss(logp, old, None, adv, batch.completion_mask, cfg, max_len=6)  # L: the longest
        loss.backward()
        assert stats["clip_frac"] > 0
        trainer.loss_type = loss_type
        trl_loss = trainer._compute_loss(theirs, inputs)
        trl_loss.backward()
        assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7), loss_type
        for (name, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=f"{loss_type}: {name}")
