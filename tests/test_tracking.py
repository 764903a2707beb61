"""Runs recorded in a real MLflow SQLite store in a temp dir: metrics, params, tags, cost and fate."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import Boom, wait_for_health
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rlscale.experiments.cli import app
from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.rl.checkpoint import latest_checkpoint
from rlscale.tracking.cost import PriceError, cost_usd, load_prices
from rlscale.tracking.run import experiment_id, flatten, tracking_uri
from rlscale.tracking.runs import list_runs, reconcile

SCHEMA = [
    "compute/flops", "compute/flops/sft", "compute/flops/rollout", "compute/flops/verify_rollout",
    "compute/flops/policy", "compute/flops/eval", "compute/device_seconds", "compute/device_seconds/policy",
    "compute/gpu_hours", "cost/usd", "heartbeat", "data/problems", "data/samples", "data/samples/solve",
    "data/samples/verify", "data/tokens/prompt", "data/tokens/generated", "data/tokens/trained",
    "eval/accuracy", "eval/pass_at_4", "eval/verify_accuracy", "eval/verify_balanced_accuracy",
    "eval/best_of_4_accuracy", "train/reward_mean", "train/reward_std", "train/clip_frac", "train/entropy",
    "train/grad_norm", "train/zero_std_frac", "train/verify_reward_mean", "sft/loss",
]


def _cfg(tmp_path, *extra):
    return load_config(None, [
        "name=tracked", "model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=5",
        "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_new_tokens=3",
        "grpo.verify_max_new_tokens=12", "eval.problems=4", "eval.samples=4", "eval.max_new_tokens=3",
        "eval.verify_max_new_tokens=12", f"output_dir={tmp_path / 'out'}", f"tracking.root={tmp_path / 'mlruns'}",
        "sft.reuse=false",  # one run holds SFT and RL (shared warm starts: tests/test_warmstart.py)
        *extra,
    ])


def _client(tmp_path) -> MlflowClient:
    return MlflowClient(tracking_uri(None, tmp_path / "mlruns"))


def test_finished_run_has_the_whole_schema(tmp_path, recorder, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_experiment(_cfg(tmp_path, "tracking.log_model=true"), recorder)
    run = _client(tmp_path).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    (out,) = run.outputs.model_outputs  # the final model: a LoggedModel of the run
    model_files = {f.path for f in _client(tmp_path).list_logged_model_artifacts(out.model_id)}
    assert "model.safetensors" in model_files
    missing = [k for k in SCHEMA if k not in run.data.metrics]
    assert not missing, missing
    m = run.data.metrics
    assert m["compute/flops"] == pytest.approx(result.metrics["compute/flops"])
    assert m["cost/usd"] == pytest.approx(m["compute/device_seconds"] / 3600 * load_prices()["vcpu"])
    assert run.data.params["grpo.learning_rate"] == "0.0003" and run.data.params["task.digits"] == "1"
    tags = run.data.tags
    for key in ("phase", "task", "model.name", "model.params", "device.type", "device.count", "seed",
                "git.commit", "git.dirty", "host", "rlscale.version"):
        assert key in tags, key
    assert tags["phase"] == "rl" and tags["task"] == "arithmetic" and int(tags["model.params"]) > 100_000
    files = {f.path for f in _client(tmp_path).list_artifacts(result.run_id)}
    assert {"config.json", "eval_samples.json"} <= files
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()



    uri = tracking_uri(None, tmp_path / "mlruns")
    out = CliRunner().invoke(app, ["runs", "list", "--uri", uri, "--experiment", "tracked"])
    assert out.exit_code == 0 and "FINISHED" in out.stdout and "rl" in out.stdout, out.output
    out = CliRunner().invoke(app, ["runs", "reconcile", "--uri", uri])
    assert out.exit_code == 0 and "marked 0 run(s) KILLED" in out.stdout
    out = CliRunner().invoke(app, ["runs", "list", "--uri", uri, "--experiment", "missing"])
    assert out.exit_code == 2 and "no experiment named 'missing'" in out.stderr


def test_exception_marks_failed_and_keeps_compute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="injected"):
        run_experiment(_cfg(tmp_path), Boom(at=7, exc=RuntimeError("injected")))
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error.class"] == "RuntimeError" and "injected" in run.data.tags["error.message"]
    assert run.data.metrics["compute/flops"] > 0 and run.data.metrics["cost/usd"] > 0


def test_interrupt_marks_killed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(tmp_path), Boom(at=3, exc=KeyboardInterrupt()))
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "KILLED" and run.data.metrics["compute/flops"] > 0


def test_cost_recomputed_with_another_price_table(tmp_path):
    table = tmp_path / "prices.toml"
    table.write_text("[devices.cpu_core]\nusd_per_hour = 1.5\n[devices.h100]\nusd_per_hour = 3.0\n")
    prices = load_prices(table)
    assert cost_usd(7200.0, "h100", prices) == pytest.approx(6.0)
    assert cost_usd(3600.0, "cpu_core", prices) == pytest.approx(1.5)
    with pytest.raises(PriceError, match="no price for device 'tpu'"):
        cost_usd(1.0, "tpu", prices)
    bad = tmp_path / "bad.toml"
    bad.write_text("[devices.h100]\nusd_per_hour = -1\n")
    with pytest.raises(PriceError, match="non-negative"):
        load_prices(bad)


def test_secret_looking_params_are_masked():
    flat = flatten({"tracking": {"api_token": "abc", "uri": "x"}, "db_password": "p", "key_path": None, "n": 3})
    assert flat == {"tracking.api_token": "***", "tracking.uri": "x", "db_password": "***", "key_path": "None",
                    "n": "3"}


def _start_training(tmp_path, name: str):
    """A long training subprocess recording to a store under tmp_path; returns it once compute is in the store."""

    root = tmp_path / "mlruns"
    cmd = [sys.executable, "-m", "rlscale.experiments.cli", "train", "experiments/addition.toml",
           "--set", "model.size=nano", "--set", "sft.steps=100000", "--set", "sft.target_accuracy=1.0",
           "--set", "sft.reuse=false",
           "--set", "tracking.flush_seconds=1", "--set", f"tracking.root={root}",
           "--set", f"output_dir={tmp_path / 'out'}", "--set", f"name={name}"]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=os.environ | {"MLFLOW_TRACKING_URI": ""})
    client = MlflowClient(tracking_uri(None, root))
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run has sent some compute
        exp = client.get_experiment_by_name(name) if (root / "mlflow.db").exists() else None
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].data.metrics.get("compute/flops", 0) > 0:
            return proc, client, runs[0].info.run_id
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(proc.communicate(timeout=5)[0])


def test_sigterm_marks_killed_with_compute(tmp_path):

    proc, client, run_id = _start_training(tmp_path, "sigterm")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics["compute/flops"] > 0 and run.data.metrics["cost/usd"] > 0

    phase, step, _ = latest_checkpoint(tmp_path / "out" / "checkpoints")  # written on the signal
    assert phase == "sft" and step >= 1


def test_sigkill_then_reconcile_marks_killed_and_keeps_recent_compute(tmp_path):


    proc, client, run_id = _start_training(tmp_path, "sigkill")
    time.sleep(3)
    proc.kill()  # SIGKILL: nothing in the process can react
    killed_at = time.time()
    proc.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert reconcile(client, ["sigkill"], stale_seconds=60) == []  # heartbeat still fresh: not touched
    time.sleep(1.5)
    assert reconcile(client, ["sigkill"], stale_seconds=1) == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["reconciled"] == "heartbeat stopped"
    assert killed_at - run.data.metrics["heartbeat"] < 30  # recorded compute at most 30 s behind the kill
    history = client.get_metric_history(run_id, "compute/flops")
    assert history[-1].value > 0 and killed_at - history[-1].timestamp / 1000 < 30
    rows = list_runs(client, ["sigkill"])
    assert rows[0]["status"] == "KILLED" and rows[0]["flops"] > 0
    with pytest.raises(ValueError, match="no experiment named"):
        list_runs(client, ["nope"])


def test_resume_continues_the_same_run_without_double_counting(tmp_path, recorder, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path, "grpo.checkpoint_every=1", "grpo.steps=4")
    with pytest.raises(RuntimeError):
        run_experiment(cfg, Boom(at=8, exc=RuntimeError("crash")))  # dies in RL step 3 (global step 8)
    client = _client(tmp_path)
    (first,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert first.info.status == "FAILED"
    result = run_experiment(cfg, recorder)
    assert result.run_id == first.info.run_id
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.metrics["data/samples/solve"] == 4 * 16  # 4 RL steps x 16 samples, none counted twice
    assert [s for s, m in recorder.logs if "train/rl_step" in m] == [8, 9]  # resumed after the step-2 checkpoint


def test_logs_to_an_mlflow_server_over_http(tmp_path, recorder, monkeypatch):

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        result = run_experiment(_cfg(tmp_path), recorder)
        run = MlflowClient(url).get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["compute/flops"] > 0 and "eval/accuracy" in run.data.metrics
        assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing went to the embedded store
    finally:

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_artifact_location_never_escapes_the_root(tmp_path, monkeypatch):


    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "mlruns"
    client = MlflowClient(tracking_uri(None, root))
    for name in ("../../evil", "a/../../b", "..", "/abs/path"):
        exp = client.get_experiment(experiment_id(client, name, root))
        location = Path(urlparse(exp.artifact_location).path).resolve()
        assert location.is_relative_to((root / "artifacts").resolve()), (name, location)


def test_system_metrics_checkpoint_artifacts_and_no_fake_energy(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = _cfg(tmp_path, "tracking.system_metrics=true", "tracking.log_checkpoints=true",
               "grpo.checkpoint_every=1", "grpo.steps=4")
    with pytest.raises(RuntimeError, match="injected"):
        run_experiment(cfg, Boom(at=7, exc=RuntimeError("injected")))  # fails during RL, after a checkpoint
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FAILED"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert "energy/gpu_kwh" not in run.data.metrics  # CPU run: skipped, not faked
    (ckpt,) = client.list_artifacts(run.info.run_id, "checkpoints")
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run.info.run_id, ckpt.path)}
    assert files == {"model.safetensors", "state.pt"}


def test_gpu_energy_without_nvml(monkeypatch):
    import types

    from rlscale.rl.energy import GpuEnergy

    def broken():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=broken))
    assert not GpuEnergy(["GPU-0"]).available and GpuEnergy(["GPU-0"]).kwh() is None


def test_dataset_row_created_by_another_run_at_the_same_moment_is_linked(tmp_path):
    """Two sweep workers log the same eval set at once: the loser of the insert race gets a unique-key violation
    (seen on PostgreSQL in CI), and logging again must link its run to the row the winner made."""
    from mlflow.exceptions import MlflowException

    from rlscale.tracking.spool import deliver

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("race")).info.run_id
    dataset = {"name": "arithmetic-eval", "digest": "1d7e198e", "source_type": "code", "source": "{}",
               "schema": None, "profile": None}

    class Racing:
        def __init__(self, error: str):
            self.error, self.calls = error, 0

        def log_inputs(self, run_id, inputs):
            self.calls += 1
            if self.calls == 1:
                raise MlflowException(self.error)
            client.log_inputs(run_id, inputs)

    racing = Racing('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"')
    deliver(racing, run_id, {"kind": "dataset", "context": "eval", "dataset": dataset})
    assert racing.calls == 2
    (linked,) = client.get_run(run_id).inputs.dataset_inputs
    assert linked.dataset.name == "arithmetic-eval" and linked.tags[0].value == "eval"
    with pytest.raises(MlflowException, match="permission denied"):  # any other error is not retried
        deliver(Racing("permission denied"), run_id, {"kind": "dataset", "context": "eval", "dataset": dataset})
