"""`rlscale train --from-sweep`: a real 2-trial sweep in a temporary SQLite store, then the final run trained with its
best trial's values and tagged with where they came from."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from tiny import write_tiny
from typer.testing import CliRunner

from rlscale.experiments.cli import app
from rlscale.experiments.sweep import best_trial, run_sweep
from rlscale.tracking.run import tracking_uri

CONFIG = """[sweep]
trials = 2
sampler = "random"
sampler_seed = 5        # trial 0: eval.problems 4, trial 1: 8 (and another learning rate)
pruner = "none"
metric = "eval/problems"  # an objective these seconds-long runs decide for sure (accuracy would tie at 0)
[sweep.space."grpo.learning_rate"]
type = "float"
low = 1e-4
high = 1e-1
log = true
[sweep.space."eval.problems"]
type = "categorical"
choices = [4, 8]
"""
TAGS = ("sweep.parent_run_id", "sweep.best_trial", "sweep.best_run_id", "sweep.study")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished 2-trial sweep (both complete) and a 1-trial one whose only trial was pruned, in one store."""
    tmp = tmp_path_factory.mktemp("from_sweep")
    config = Path(write_tiny(tmp, "exp", CONFIG))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        study = run_sweep(str(config), [], trials=2)
        mp.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
        pruned = run_sweep(str(config), [], trials=1, study_name="all-pruned")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
    assert [t.state.name for t in pruned.get_trials()] == ["PRUNED"]
    client = MlflowClient(tracking_uri(None, tmp / "mlruns"))
    parent = next(r for r in _runs(client) if r.data.tags.get("phase") == "sweep"
                  and r.data.tags["optuna.study"] == "exp-sweep")
    return {"tmp": tmp, "config": str(config), "study": study, "client": client, "parent": parent.info.run_id}


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _runs(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("exp").experiment_id], max_results=1000)


def _train(swept, *args: str):
    return CliRunner().invoke(app, ["train", swept["config"], *args])


def _final(swept, output_dir: str):
    (run,) = [r for r in _runs(swept["client"]) if r.data.params.get("output_dir") == output_dir
              and "sweep.best_trial" in r.data.tags]  # not a shared SFT run it may have started from
    return run


def test_train_from_the_parent_run_uses_the_best_trial(swept):
    best = swept["study"].best_trial
    assert best.number == 1  # the trial with more eval problems: not simply the first one
    out = f"{swept['tmp']}/final-by-id"
    result = _train(swept, "--from-sweep", swept["parent"], "--set", f"output_dir={out}")
    assert result.exit_code == 0, result.output
    run = _final(swept, out)
    trial_run = next(r for r in _runs(swept["client"]) if r.data.tags.get("optuna.trial") == "1"
                     and r.data.tags.get("mlflow.parentRunId") == swept["parent"])
    # typed as the trial trained: the float exactly as sampled, the int choice an int
    assert run.data.params["grpo.learning_rate"] == str(best.params["grpo.learning_rate"])
    assert run.data.params["grpo.learning_rate"] == trial_run.data.params["grpo.learning_rate"]
    assert run.data.params["eval.problems"] == "8" and run.data.metrics["eval/problems"] == 8.0
    assert {k: run.data.tags[k] for k in TAGS} == {
        "sweep.parent_run_id": swept["parent"], "sweep.best_trial": "1", "sweep.best_run_id": trial_run.info.run_id,
        "sweep.study": "exp-sweep"}
    assert run.info.status == "FINISHED" and run.data.tags["phase"] != "sweep-trial"
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("from sweep")]
    assert "best trial 1" in line and f"grpo.learning_rate={best.params['grpo.learning_rate']!r}" in line
    assert "eval.problems=8" in line and "warning" not in result.stderr


def test_by_study_name_and_set_wins_with_a_warning(swept):
    out = f"{swept['tmp']}/final-by-name"
    result = _train(swept, "--from-sweep", "exp-sweep", "--set", f"output_dir={out}",
                    "--set", "grpo.learning_rate=0.5")
    assert result.exit_code == 0, result.output
    run = _final(swept, out)
    assert run.data.params["grpo.learning_rate"] == "0.5"  # the user's --set
    assert run.data.params["eval.problems"] == "8"  # the sweep's, not overridden
    assert run.data.tags["sweep.parent_run_id"] == swept["parent"] and run.data.tags["sweep.best_trial"] == "1"
    warnings = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "--set grpo.learning_rate=0.5 overrides the sweep's grpo.learning_rate=" in warnings[0]


@pytest.mark.parametrize("ref, message", [
    ("no-such-sweep", "no sweep parent run with this id, and no study of this name in experiment 'exp'"),
    ("all-pruned", "has no complete trial (1 pruned): nothing to train from"),
    ("trial-of-exp-sweep", "not a sweep: pass its parent run"),
])
def test_bad_refs_are_one_line_and_train_nothing(swept, ref, message):
    if ref == "trial-of-exp-sweep":
        ref = next(r.info.run_id for r in _runs(swept["client"]) if r.data.tags.get("optuna.trial") == "0"
                   and r.data.tags.get("mlflow.parentRunId") == swept["parent"])
    before = len(_runs(swept["client"]))
    out = Path(swept["tmp"]) / "never"
    result = _train(swept, "--from-sweep", ref, "--set", f"output_dir={out}")
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --from-sweep") and message in lines[0], result.stderr
    assert len(_runs(swept["client"])) == before and not out.exists()


def test_a_sweep_still_running_is_read_from_its_child_runs(swept):
    client = swept["client"]
    client.update_run(swept["parent"], status="RUNNING")  # killed before it ended: its best.trial tag not trusted
    try:
        best = best_trial(client, swept["parent"], "exp")
    finally:
        client.set_terminated(swept["parent"], "FINISHED")
    assert best.running and best.number == swept["study"].best_trial.number
    assert best.values == swept["study"].best_trial.params  # typed by the TOML reading of their text
    assert best.value == 8.0 and best.metric == "eval/problems" and best.direction == "maximize"
