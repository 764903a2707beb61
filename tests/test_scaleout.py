"""Scale-out on existing engines: an MLflow server on PostgreSQL, distributed Optuna sweeps on a PostgreSQL study,
and MLflow's basic-auth app. Each test uses a throwaway PostgreSQL cluster (tests/pg.py) that is stopped and
removed at the end of the session; without PostgreSQL binaries (`apt-get install postgresql`) they are skipped.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
import torch
from mlflow.tracking import MlflowClient
from pg import Cluster, find_bin_dir, mlflow_server
from tiny import write_tiny

from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.experiments.sweep import run_sweep

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[1]
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
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


class Quiet:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


def _write(tmp_path: Path, name: str, text: str = "") -> str:
    return write_tiny(tmp_path, name, text, tracking="flush_seconds = 1.0\n")


def _runs(url: str, experiment: str) -> list:
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="session")
def postgres():
    """A running throwaway cluster with databases `mlflow`, `optuna` and `mlflow_auth`; always stopped and removed."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb, pg_ctl): apt-get install postgresql"
        print(f"skipping PostgreSQL tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    pytest.importorskip("psycopg", reason="psycopg missing: pip install -e '.[dev]'")
    try:
        cluster = Cluster(bin_dir)
    except RuntimeError as e:
        print(f"skipping PostgreSQL tests: {e}", file=sys.stderr)
        pytest.skip(str(e))
    try:
        cluster.start()
        for db in ("mlflow", "optuna", "mlflow_auth"):
            cluster.create_database(db)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """An MLflow tracking server on the PostgreSQL database `mlflow`, artifacts in a local folder."""
    tmp = tmp_path_factory.mktemp("server")
    with mlflow_server(postgres.url("mlflow"), tmp / "artifacts", log=tmp / "server.log") as url:
        yield url


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    """No store or credentials from the caller's environment; one torch thread here and in every worker process
    (these models are tiny: on a shared 2-core machine, threads that wait for each other make a run ~20x slower)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.set_num_threads(threads)


def test_training_run_on_a_server_backed_by_postgres(postgres, server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    result = run_experiment(load_config(_write(tmp_path, "pg-train")), Quiet(), resume=False)
    client = MlflowClient(server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["compute/flops"] > 0 and run.data.metrics["cost/usd"] > 0
    assert "eval/accuracy" in run.data.metrics
    assert "config.json" in {f.path for f in client.list_artifacts(result.run_id)}  # proxied to the server's folder
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing went to the embedded store
    engine = sa.create_engine(postgres.url("mlflow"))  # the run is a row in PostgreSQL
    try:
        with engine.connect() as db:
            status = db.execute(sa.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": result.run_id})
            assert status.scalar_one() == "FINISHED"
    finally:
        engine.dispose()


def _check_sweep(url: str, storage: str, experiment: str, study_name: str, total: int) -> None:
    """`total` trials, numbered 0..total-1, each COMPLETE or PRUNED and each one child run with compute."""
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(total)), [(t.number, t.state.name) for t in trials]
    assert all(t.state in DONE for t in trials), [(t.number, t.state.name) for t in trials]
    runs = _runs(url, experiment)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("phase") == "sweep"}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parents and all(r.data.tags["mlflow.parentRunId"] in parents for r in children)
    sfts = [r for r in runs if r.data.tags.get("phase") == "sft"]  # every trial starts from the one shared SFT
    assert len(sfts) == 1 and {r.data.tags["sft.run_id"] for r in children} == {sfts[0].info.run_id}
    assert len(runs) == len(parents) + total + 1
    assert sorted(int(r.data.params["trial.number"]) for r in children) == list(range(total))
    for r in children:
        assert r.data.tags["phase"] == "sweep-trial" and r.data.tags["optuna.study"] == study_name
        assert r.info.status in ("FINISHED", "KILLED") and r.data.metrics["compute/flops"] > 0
    for p in parents.values():
        assert p.info.status == "FINISHED" and p.data.tags["optuna.study"] == study_name


def test_sweep_workers_share_a_postgres_study(postgres, server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # inherited by the worker processes
    config, storage = _write(tmp_path, "pg-sweep", SWEEP), postgres.url("optuna")
    study = run_sweep(config, [], trials=4, workers=2, storage=storage, study_name="pg-sweep")
    assert len(study.get_trials()) == 4
    _check_sweep(server, storage, "pg-sweep", "pg-sweep", 4)
    (parent,) = [r for r in _runs(server, "pg-sweep") if r.data.tags.get("phase") == "sweep"]
    assert "best.trial" in parent.data.tags and parent.data.metrics["sweep/trials_complete"] >= 1
    # the same command again resumes the study: no trial and no run added
    study = run_sweep(config, [], trials=4, workers=2, storage=storage, study_name="pg-sweep")
    assert len(study.get_trials()) == 4 and len(_runs(server, "pg-sweep")) == 6


def test_two_workers_on_postgres_train_a_shared_sft_once(postgres, server, tmp_path):
    config = Path(_write(tmp_path, "pg-warm"))
    config.write_text(config.read_text().replace("steps = 4\n[grpo]", "steps = 100\n[grpo]"))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": server}
    procs = [subprocess.Popen([sys.executable, "-m", "rlscale.experiments.cli", "train", str(config), "--set",
                               f"output_dir={tmp_path}/w{i}", "--set", f"tracking.root={tmp_path}/disk{i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    runs = _runs(server, "pg-warm")
    (sft,) = [r for r in runs if r.data.tags.get("phase") == "sft"]
    rl = [r for r in runs if r.data.tags.get("phase") == "rl"]
    assert len(rl) == 2 and {r.data.tags["sft.run_id"] for r in rl} == {sft.info.run_id}
    # each worker on its own disk: the one that did not train it fetched the model from the server's artifacts
    for i in range(2):
        assert (tmp_path / f"disk{i}" / "warmstarts" / sft.data.tags["sft.key"] / sft.info.run_id / "sft"
                / "eval.json").is_file()


def test_two_separate_sweep_commands_share_one_study(postgres, server, tmp_path):
    """Two `rlscale sweep` processes started at once (as on two machines) on the same study and store."""
    config, storage = _write(tmp_path, "pg-cli", SWEEP), postgres.url("optuna")
    cmd = [sys.executable, "-m", "rlscale.experiments.cli", "sweep", config, "--trials", "4",
           "--storage", storage, "--study", "pg-cli"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    # the experiment does not exist yet: both commands race to create it (tracking.run.experiment_id), and both
    # must end up in the same one
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    trials = optuna.load_study(study_name="pg-cli", storage=storage).trials
    done = sorted(t.number for t in trials if t.state in DONE)
    assert done == [0, 1, 2, 3], [(t.number, t.state.name) for t in trials]  # none lost, none run twice
    surplus = [t for t in trials if t.state not in DONE]  # a start that raced past the budget runs nothing
    assert all(t.state.name == "FAIL" and t.number >= 4 for t in surplus)
    runs = _runs(server, "pg-cli")
    parents = [r for r in runs if r.data.tags.get("phase") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 6  # and the one shared SFT
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert sorted(int(r.data.params["trial.number"]) for r in children) == done
    assert all(r.data.metrics["compute/flops"] > 0 for r in children)


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_basic_auth_server_on_postgres(postgres, tmp_path, monkeypatch):
    admin = ("rlscale-admin", secrets.token_urlsafe(24))
    ini = tmp_path / "basic_auth.ini"
    ini.write_text("[mlflow]\n"
                   "default_permission = READ\n"
                   f"database_uri = {postgres.url('mlflow_auth')}\n"
                   f"admin_username = {admin[0]}\n"
                   f"admin_password = {admin[1]}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    ini.chmod(0o600)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    with mlflow_server(postgres.url("mlflow"), tmp_path / "artifacts", "--app-name", "basic-auth", env=env,
                       log=tmp_path / "server.log") as url:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(search) == 401
        assert _get(search, (admin[0], "wrong-password-123")) == 401
        assert _get(search, admin) == 200
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        result = run_experiment(load_config(_write(tmp_path, "pg-auth")), Quiet(), resume=False)
        run = MlflowClient(url).get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["compute/flops"] > 0
        get_run = f"{url}/api/2.0/mlflow/runs/get?run_id={result.run_id}"
        assert _get(get_run) == 401 and _get(get_run, admin) == 200
