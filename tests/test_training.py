"""Short real training runs: SFT then GRPO raises reward; checkpoint/resume is exact to the step."""

from __future__ import annotations

import pytest
import torch

from rl.accounting import FlopModel, Meter
from rl.checkpoint import latest_checkpoint
from rl.grpo import GRPOConfig, train_grpo
from rl.model import ModelConfig, load_model
from rl.pipeline import PipelineConfig, run_pipeline
from rl.tasks import ArithmeticParams, make_task


def test_sft_then_grpo_reward_rises(tmp_path, recorder):
    cfg = PipelineConfig.model_validate({
        "seed": 0,
        "model": {"size": "nano"},
        "task": {"name": "arithmetic", "digits": 1, "eval_percent": 30},
        "sft": {"steps": 40, "batch_size": 32, "learning_rate": 3e-3},
        "grpo": {"steps": 40, "prompts_per_step": 8, "num_generations": 8, "max_new_tokens": 4,
                 "learning_rate": 2e-3, "eval_every": 20, "eval_problems": 5},
        "eval": {"problems": 8, "samples": 4, "max_new_tokens": 4},
        "output_dir": str(tmp_path / "run"),
    })
    result = run_pipeline(cfg, recorder, resume=False)
    reward = recorder.series("train/reward_mean")
    assert len(reward) == 40
    early, late = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    assert late > early + 0.1, (early, late)
    m = result.metrics
    for key in ("eval/accuracy", "eval/pass_at_4", "eval/verify_balanced_accuracy", "eval/best_of_4_accuracy",
                "eval/sft_accuracy", "compute/flops/rollout", "compute/flops/verify_rollout", "compute/flops/policy",
                "compute/flops/eval", "compute/flops/sft", "data/tokens/trained", "data/samples/verify"):
        assert key in m and m[key] >= 0, key
    assert m["compute/flops"] == pytest.approx(sum(m[f"compute/flops/{p}"] for p in
                                                   ("sft", "rollout", "verify_rollout", "policy", "reference", "eval")))
    assert m["data/problems"] == 40 * 32 + 40 * 8
    assert m["data/samples/solve"] == 40 * 64 and m["data/samples/verify"] == 40 * 64
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    for name in ("train/clip_frac", "train/kl", "train/entropy", "train/completion_len", "train/grad_norm",
                 "train/zero_std_frac", "train/reward_std", "train/verify_reward_mean"):
        assert len(recorder.series(name)) == 40, name
    assert len(recorder.series("eval/accuracy")) == 3  # after SFT, mid-RL, final


def _grpo(tmp_path, recorder, **kw):
    model, tok = load_model(ModelConfig(size="nano"), seed=0)
    task = make_task(ArithmeticParams(digits=1))
    cfg = GRPOConfig(steps=6, prompts_per_step=4, num_generations=4, max_new_tokens=3, learning_rate=1e-3,
                     num_iterations=2, beta=0.05, checkpoint_every=2, lr_schedule="cosine", warmup_steps=1)
    meter = Meter(FlopModel.of(model))
    ref, _ = load_model(ModelConfig(size="nano"), seed=0)
    train_grpo(model, tok, task, cfg, seed=3, meter=meter, callback=recorder, ref_model=ref,
               ckpt_dir=tmp_path, **kw)
    return model, meter


def test_resume_gives_identical_next_steps(tmp_path, make_recorder):
    Recorder = make_recorder
    straight = Recorder()
    model_a, meter_a = _grpo(tmp_path / "a", straight)
    first = Recorder()
    _grpo(tmp_path / "b", first, stop_after=4)  # "crash" after step 4 (checkpoint at 4)
    assert latest_checkpoint(tmp_path / "b")[:2] == ("rl", 4)
    resumed = Recorder()
    model_b, meter_b = _grpo(tmp_path / "b", resumed)
    assert [s for s, _ in resumed.logs] == [5, 6]  # no step is run (or counted) twice
    for (sa, ma), (sb, mb) in zip(straight.logs[4:], resumed.logs):
        assert sa == sb
        assert ma["train/loss"] == mb["train/loss"] and ma["train/verify_loss"] == mb["train/verify_loss"]
        assert ma["compute/flops"] == mb["compute/flops"] and ma["data/tokens/trained"] == mb["data/tokens/trained"]
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
