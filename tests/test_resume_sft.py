"""A finished SFT is never trained again: a run whose SFT stopped early at `sft.target_accuracy`, interrupted in RL
before the first RL checkpoint and resumed, goes straight to RL and ends with the SFT steps and compute of a run
that was never interrupted."""

from __future__ import annotations

import pytest
from conftest import Boom

from rlscale.rl.checkpoint import latest_checkpoint
from rlscale.rl.pipeline import PipelineConfig, run_pipeline
from rlscale.rl.tasks.arithmetic import ArithmeticTask

SFT_STOP = 4  # the first accuracy check, of 12 planned SFT steps


def _config(tmp_path, name: str) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "seed": 0,
        "model": {"size": "nano"},
        "task": {"name": "arithmetic", "digits": 1, "eval_percent": 30},
        "sft": {"steps": 12, "batch_size": 8, "checkpoint_every": SFT_STOP, "target_accuracy": 0.5,
                "check_every": SFT_STOP, "check_problems": 4},
        "grpo": {"steps": 2, "checkpoint_every": 2, "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 3,
                 "verify_max_new_tokens": 8, "eval_problems": 2},
        "eval": {"problems": 4, "samples": 2, "max_new_tokens": 3, "verify_max_new_tokens": 8},
        "output_dir": str(tmp_path / name),
    })


def test_resume_after_an_early_sft_stop_does_not_train_sft_again(tmp_path, monkeypatch, make_recorder):
    monkeypatch.setattr(ArithmeticTask, "is_correct", lambda self, problem, completion: True)  # target reached
    straight = make_recorder()
    baseline = run_pipeline(_config(tmp_path, "a"), straight, resume=False)
    assert baseline.metrics["eval/sft_steps"] == SFT_STOP

    cfg = _config(tmp_path, "b")
    with pytest.raises(RuntimeError, match="killed"):  # in RL step 1, before the first RL checkpoint (step 2)
        run_pipeline(cfg, Boom(at=SFT_STOP + 1, exc=RuntimeError("killed")), resume=False)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints")[:2] == ("sft", SFT_STOP)

    resumed = make_recorder()
    result = run_pipeline(cfg, resumed, resume=True)
    assert resumed.series("sft/loss") == []  # no SFT step trained again
    assert min(step for step, _ in resumed.logs) == SFT_STOP  # the SFT eval, then RL
    assert result.metrics["eval/sft_steps"] == SFT_STOP
    for key in ("compute/flops/sft", "compute/flops", "data/tokens/trained", "data/samples"):
        assert result.metrics[key] == baseline.metrics[key], key  # nothing counted twice, nothing missing
    assert result.sft_metrics == pytest.approx(baseline.sft_metrics)
