"""Configs, the command line, Optuna sweeps (real studies, real child runs) and scaling grids."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from tiny import write_tiny
from typer.testing import CliRunner

from rlscale.experiments.cli import app
from rlscale.experiments.config import ConfigError, load_config
from rlscale.experiments.sweep import run_sweep
from rlscale.tracking.run import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
SWEEP = """
[sweep]
trials = 4
pruner_startup_trials = 1
[sweep.space."grpo.learning_rate"]
type = "float"
low = 1e-5
high = 1e-2
log = true
[sweep.space."grpo.num_generations"]
type = "categorical"
choices = [2, 4]
"""


def _write(tmp_path: Path, text: str, name: str = "exp") -> str:
    return write_tiny(tmp_path, name, text)


def _runs(tmp_path: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_sweep_two_workers_child_runs_and_resume(tmp_path):
    config = _write(tmp_path, SWEEP)
    study = run_sweep(config, [], trials=4, workers=2)
    states = [t.state for t in study.get_trials()]
    assert len(states) == 4 and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                     for s in states), states
    assert (tmp_path / "mlruns" / "optuna.log").is_file()  # default: journal storage under the store root
    runs = _runs(tmp_path, "exp")
    (parent,) = [r for r in runs if r.data.tags.get("phase") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    (sft,) = [r for r in runs if r.data.tags.get("phase") == "sft"]  # two workers, one shared SFT
    assert len(children) == 4 and len(runs) == 6 and sft.info.status == "FINISHED"
    assert {r.data.tags["sft.run_id"] for r in children} == {sft.info.run_id}
    assert sorted(int(r.data.params["trial.number"]) for r in children) == [0, 1, 2, 3]
    for r in children:
        assert r.data.tags["phase"] == "sweep-trial" and "trial.grpo.learning_rate" in r.data.params
        assert r.data.params["grpo.learning_rate"] == r.data.params["trial.grpo.learning_rate"]
        assert r.data.metrics["compute/flops"] > 0
    assert parent.info.status == "FINISHED" and "best.trial" in parent.data.tags
    assert "best/eval/accuracy" in parent.data.metrics
    # the same command again: the study is resumed, no trial repeated, no run added
    study = run_sweep(config, [], trials=4, workers=2)
    assert len(study.get_trials()) == 4 and len(_runs(tmp_path, "exp")) == 6


def test_pruned_trial_keeps_its_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    config = _write(tmp_path, SWEEP)
    study = run_sweep(config, ["sweep.sampler_seed=3"], trials=2, workers=1)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "PRUNED"]
    (pruned,) = [r for r in _runs(tmp_path, "exp") if r.data.tags.get("pruned") == "true"]
    assert pruned.info.status == "KILLED" and pruned.data.tags["optuna.trial"] == "1"
    assert pruned.data.metrics["compute/flops"] > 0 and pruned.data.metrics["cost/usd"] > 0


def test_sweep_sampler_seed_is_reproducible(tmp_path):
    cfg = load_config(_write(tmp_path, SWEEP))
    from rlscale.experiments.sweep import open_study, suggest

    draws = []
    for i in range(2):
        study = open_study(cfg, f"sqlite:///{tmp_path}/s{i}.db", "s")
        trial = study.ask()
        draws.append({k: suggest(trial, k, d) for k, d in cfg.sweep.space.items()})
    assert draws[0] == draws[1]


@pytest.mark.parametrize("bad, message", [
    ('[sweep.space."grpo.lrate"]\ntype = "float"\nlow = 1.0\nhigh = 2.0\n', "grpo.lrate: unknown key"),
    ('[sweep.space."grpo.steps"]\ntype = "int"\nlow = -5\nhigh = 2\n', "grpo.steps = -5"),
    ('[sweep.space."grpo.learning_rate"]\ntype = "float"\nlow = 0.0\nhigh = 1e-3\nlog = true\n', "log dimension"),
    ('[sweep]\ntrials = 0\n', "sweep.trials"),
])
def test_sweep_config_errors_write_nothing(tmp_path, bad, message):
    config = _write(tmp_path, bad)
    out = CliRunner().invoke(app, ["sweep", config, "--trials", "2"])
    assert out.exit_code == 2 and message in out.stderr and config in out.stderr, out.output
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlruns").exists()  # nothing written: no store, no study


def test_grid_runs_each_point_once_and_skips_finished(tmp_path):
    config = _write(tmp_path, '[grid.axes]\n"grpo.steps" = [1, 2]\nseed = [0]\n', name="grid")
    out = CliRunner().invoke(app, ["grid", config])
    assert out.exit_code == 0, out.output
    assert "2 points, 0 already finished, 2 run now, 0 failed" in out.stdout
    runs = [r for r in _runs(tmp_path, "grid") if r.data.tags["phase"] != "sft"]  # + 1 SFT per seed, shared
    assert sorted(r.data.tags["grid.grpo.steps"] for r in runs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" and r.data.tags["grid.seed"] == "0" for r in runs)
    out = CliRunner().invoke(app, ["grid", config, "--set", "grid.axes.seed=[0, 1]"])
    assert out.exit_code == 0, out.output
    assert "4 points, 2 already finished, 2 run now, 0 failed" in out.stdout
    assert len(_runs(tmp_path, "grid")) == 4 + 2
    out = CliRunner().invoke(app, ["grid", config, "--set", "grid.axes.seed=[0, 1]"])
    assert "4 points, 4 already finished, 0 run now" in out.stdout and len(_runs(tmp_path, "grid")) == 4 + 2


def test_grid_config_error_names_the_field(tmp_path):
    config = _write(tmp_path, '[grid.axes]\n"model.sise" = ["nano"]\n', name="grid")
    out = CliRunner().invoke(app, ["grid", config])
    assert out.exit_code == 2 and "model.sise: unknown key" in out.stderr and config in out.stderr
    assert not (tmp_path / "mlruns").exists()


def test_set_overrides_and_config_show(tmp_path):
    config = _write(tmp_path, "")
    out = CliRunner().invoke(app, ["config", "show", config, "--set", "grpo.steps=7", "--set", "task.ops=['*']"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.stdout)
    assert shown["grpo"]["steps"] == 7 and shown["task"]["ops"] == ["*"] and shown["model"]["size"] == "nano"
    out = CliRunner().invoke(app, ["config", "show", config, "--set", "grpo.steps=many"])
    assert out.exit_code == 2 and "grpo.steps" in out.stderr and "'many'" in out.stderr
    with pytest.raises(ConfigError, match="grpo.stepz: unknown key"):
        load_config(config, ["grpo.stepz=1"])


def test_config_schema_lists_every_field():
    out = CliRunner().invoke(app, ["config", "schema"], env={"COLUMNS": "300"})
    assert out.exit_code == 0
    for key in ("grpo.verify_coef", "sweep.space.<field>.log", "grid.axes", "tracking.system_metrics"):
        assert key in out.stdout, key
    schema = json.loads(CliRunner().invoke(app, ["config", "schema", "--json"]).stdout)
    assert "grpo" in schema["properties"]


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "experiments").glob("*.toml")))
def test_shipped_configs_validate(config):
    cfg = load_config(ROOT / "experiments" / config)
    assert cfg.name


@pytest.mark.parametrize("command", [[], ["train"], ["sweep"], ["grid"], ["ui"], ["fit"], ["cost"], ["report"],
                                     ["config", "show"], ["config", "schema"], ["runs", "list"],
                                     ["runs", "reconcile"], ["runs", "sync"], ["model", "import"]])
def test_every_command_has_help_with_examples(command):
    out = CliRunner().invoke(app, [*command, "--help"])
    assert out.exit_code == 0
    assert command == [] or "Examples" in out.stdout, out.stdout


def test_ui_answers_on_health(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "rlscale.experiments.cli", "ui", "--port", str(port), "--uri", uri]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.read().decode().strip() == "OK"
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "mlflow UI did not come up"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_model_import_of_a_missing_file_is_one_line(tmp_path):
    for source in (str(tmp_path / "none.gguf"), "pkg:no_such_package_here/x.gguf", str(tmp_path)):
        out = CliRunner().invoke(app, ["model", "import", source])
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.output
