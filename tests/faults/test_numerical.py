"""A NaN in training ends the run FAILED, naming the step and the reason, with the last good checkpoint saved.

The NaN is injected in-process: a verifier reward that turns NaN in RL step 2, or NaN log-probs in SFT step 3.
No periodic checkpoints are configured, so the checkpoint found afterwards is the one written on the failure;
its weights are finite, and a resume (the fault gone) finishes the same MLflow run.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Recorder
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.rl import sft as rl_sft
from rlscale.rl.checkpoint import latest_checkpoint
from rlscale.rl.tasks.arithmetic import ArithmeticTask
from rlscale.tracking.run import tracking_uri

PROMPTS, G = 4, 4


def _cfg(tmp_path):
    return load_config(None, [
        "name=numerical", "model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=5", "sft.batch_size=8",
        "grpo.steps=3", f"grpo.prompts_per_step={PROMPTS}", f"grpo.num_generations={G}", "grpo.max_new_tokens=3",
        "grpo.verify_max_new_tokens=12", "eval.problems=4", "eval.samples=4", "eval.max_new_tokens=3",
        "eval.verify_max_new_tokens=12", f"output_dir={tmp_path / 'out'}", f"tracking.root={tmp_path / 'mlruns'}",
        "sft.reuse=false",  # one run holds SFT and RL, its checkpoints in its own output_dir
    ])


def _the_run(tmp_path):
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("numerical").experiment_id])
    return run


def _assert_failed_with_checkpoint(tmp_path, step_text: str, phase: str, step: int) -> str:
    run = _the_run(tmp_path)
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["error.class"] == "FloatingPointError"
    assert "non-finite" in tags["error.message"] and step_text in tags["error.message"], tags["error.message"]
    assert run.data.metrics["compute/flops"] > 0  # what was spent up to the fault is recorded
    found = latest_checkpoint(tmp_path / "out" / "checkpoints")
    assert found is not None and found[:2] == (phase, step), found
    weights = load_file(found[2] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the last good weights, not the poisoned
    return run.info.run_id


@pytest.fixture
def local_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_nan_reward_in_rl_fails_the_run_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                 local_store):
    calls = 0
    honest = ArithmeticTask.reward

    def reward(self, problem, completion):
        nonlocal calls
        calls += 1
        return math.nan if calls > PROMPTS * G else honest(self, problem, completion)  # from RL step 2 on

    monkeypatch.setattr(ArithmeticTask, "reward", reward)
    with pytest.raises(FloatingPointError, match="RL step 2"):
        run_experiment(_cfg(tmp_path), Recorder())
    run_id = _assert_failed_with_checkpoint(tmp_path, "RL step 2", "rl", 1)

    monkeypatch.setattr(ArithmeticTask, "reward", honest)  # the cause fixed: resume from the saved step
    result = run_experiment(_cfg(tmp_path), Recorder())
    assert result.run_id == run_id
    run = _the_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.metrics["train/rl_step"] == 3


def test_nan_loss_in_sft_fails_the_run_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch,
                                                                               local_store):
    calls = 0
    honest = rl_sft.completion_logprobs

    def logprobs(*args, **kwargs):
        nonlocal calls
        calls += 1
        logp = honest(*args, **kwargs)
        return logp * math.nan if calls == 3 else logp  # SFT step 3

    monkeypatch.setattr(rl_sft, "completion_logprobs", logprobs)
    with pytest.raises(FloatingPointError, match="SFT step 3"):
        run_experiment(_cfg(tmp_path), Recorder())
    _assert_failed_with_checkpoint(tmp_path, "SFT step 3", "sft", 2)
