"""torchrun: GRPO under DistributedDataParallel on CPU (gloo), compute and data summed over ranks, rank 0 logs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.tracking.run import tracking_uri

STEPS, PROMPTS, G = 3, 4, 2
SETS = [
    "name=ddp", "model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=4", "sft.batch_size=8",
    f"grpo.steps={STEPS}", f"grpo.prompts_per_step={PROMPTS}", f"grpo.num_generations={G}", "grpo.max_new_tokens=3",
    "grpo.verify_max_new_tokens=12", "grpo.checkpoint_every=1", "eval.problems=4", "eval.samples=2",
    "eval.max_new_tokens=3", "eval.verify_max_new_tokens=12",
]


def _runs(root):
    client = MlflowClient(tracking_uri(None, root))
    return client.search_runs([client.get_experiment_by_name("ddp").experiment_id])


def test_torchrun_two_ranks_sum_compute_and_log_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "mlruns"
    sets = [*SETS, f"tracking.root={root}"]
    args = [a for s in sets for a in ("--set", s)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    (tmp_path / "ddp.toml").write_text('name = "ddp"\n')
    cmd = [sys.executable, "-m", "rlscale.experiments.cli", "train", "ddp.toml", "--nproc", "2",
           "--set", f"output_dir={tmp_path / 'ddp'}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = _runs(root)  # only rank 0 writes to MLflow
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and tags["world_size"] == "2" and tags["device.count"] == "2"
    # each rank sampled half the prompts; the logged counters are the sums over ranks: the global batch
    assert m["data/samples/solve"] == STEPS * PROMPTS * G and m["data/samples/verify"] == STEPS * PROMPTS * G
    assert m["data/problems"] == 4 * 8 + STEPS * PROMPTS
    # the same global batch in one process spends the same compute (padding differs a little per rank)
    single = run_experiment(load_config(None, [*sets, f"output_dir={tmp_path / 'one'}",
                                               "tracking.enabled=false"]), _Quiet())
    assert m["data/tokens/trained"] == pytest.approx(single.metrics["data/tokens/trained"], rel=0.1)
    assert m["compute/flops"] == pytest.approx(single.metrics["compute/flops"], rel=0.15)
    assert m["compute/flops/policy"] > 0 and m["compute/device_seconds"] > 0
    # SFT is deterministic: 2 ranks with the same global batch reach the one-process weights (each rank dividing
    # by its own token count, as before, left them 1e-3 apart)
    two, one = (load_file(tmp_path / d / "sft" / "model.safetensors") for d in ("ddp", "one"))
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 1e-5


class _Quiet:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


def test_prompts_must_split_evenly_over_ranks(monkeypatch):
    from rlscale.rl import distributed

    monkeypatch.setattr(distributed, "world", lambda: 3)
    from rlscale.rl.grpo import GRPOConfig, train_grpo

    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        train_grpo(None, None, None, GRPOConfig(prompts_per_step=4), seed=0, meter=None, callback=None)
