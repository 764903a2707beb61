"""A pruned trial keeps its last step: the tracker sees every step, even the one whose report prunes the trial."""

from __future__ import annotations

import optuna
import pytest
from conftest import Boom
from mlflow.tracking import MlflowClient
from tiny import write_tiny

from rlscale.experiments.runner import Fanout
from rlscale.experiments.sweep import run_sweep
from rlscale.tracking.run import tracking_uri

CONFIG = """[sweep]
trials = 1
[sweep.space."grpo.learning_rate"]
type = "float"
low = 1e-5
high = 1e-2
log = true
"""


@pytest.mark.parametrize("boom_first", [True, False])
def test_fanout_hands_every_step_to_every_callback(make_recorder, boom_first):
    seen = make_recorder()
    boom = Boom(at=2, exc=optuna.TrialPruned("pruned"))
    fanout = Fanout(boom, seen) if boom_first else Fanout(seen, boom)
    fanout.on_log(1, {"a": 1.0})
    with pytest.raises(optuna.TrialPruned):
        fanout.on_log(2, {"a": 2.0})
    assert seen.logs == [(1, {"a": 1.0}), (2, {"a": 2.0})]


def test_fanout_raises_the_first_error_after_all_have_seen_the_step(make_recorder):
    seen = make_recorder()
    with pytest.raises(RuntimeError, match="first"):
        Fanout(Boom(0, RuntimeError("first")), seen, Boom(0, KeyError("second"))).on_log(5, {"a": 1.0})
    assert seen.logs == [(5, {"a": 1.0})]


def test_pruned_run_records_the_step_that_pruned_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    config = write_tiny(tmp_path, "pruned", CONFIG)
    study = run_sweep(str(config), [], workers=1)
    (pruned_trial,) = study.trials
    assert pruned_trial.state == optuna.trial.TrialState.PRUNED
    ((rl_step, value),) = pruned_trial.intermediate_values.items()  # pruned at its first quick eval
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("pruned").experiment_id])
              if r.data.tags.get("pruned") == "true"]
    steps = client.get_metric_history(run.info.run_id, "train/rl_step")
    assert max((m.value for m in steps), default=None) == rl_step  # the last RL step is in MLflow
    last = max(m.step for m in steps)
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/accuracy")}
    assert evals[last] == value  # with the quick eval that pruned it
    flops = client.get_metric_history(run.info.run_id, "compute/flops")
    assert max(m.step for m in flops) == last and run.data.metrics["compute/flops"] == max(m.value for m in flops)
