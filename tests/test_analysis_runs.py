"""analysis.runs against real SQLite MLflow stores filled with fake runs (written directly, nothing trained)."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import time

import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from rlscale.analysis.runs import CORE_COLUMNS, RunsError, load_runs, metric_history

T0 = 1_750_000_000_000  # ms


@pytest.fixture(scope="session")
def blank_db(tmp_path_factory) -> str:
    """A freshly created MLflow SQLite database; copies of it skip MLflow's slow schema setup."""
    path = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return str(path)


def new_store(blank_db: str, folder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(blank_db, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def write_run(client: MlflowClient, exp: str, name: str, status: str | None, tags: dict[str, str],
              metrics: dict[str, float] | None = None, params: dict[str, str] | None = None, start: int = T0) -> str:
    run = client.create_run(exp, start_time=start, tags=tags, run_name=name)
    rid = run.info.run_id
    client.log_batch(rid, metrics=[Metric(k, v, start + 1000, 7) for k, v in (metrics or {}).items()],
                     params=[Param(k, v) for k, v in (params or {}).items()])
    if status:
        client.set_terminated(rid, status, end_time=start + 60_000)
    return rid


@pytest.fixture(scope="module")
def store(blank_db, tmp_path_factory):
    """Two experiments with runs of every fate, a sweep parent with trials, and an empty experiment."""
    uri = new_store(blank_db, tmp_path_factory.mktemp("store"))
    client = MlflowClient(uri)
    alpha, sweep = client.create_experiment("alpha"), client.create_experiment("sweep")
    client.create_experiment("nothing")
    ids = {}
    final_metrics = {"compute/flops": 1.5e18, "cost/usd": 2.5, "compute/gpu_hours": 1.25, "eval/accuracy": 0.75}
    ids["final"] = write_run(client, alpha, "final", "FINISHED",
                             {"phase": "final", "task": "arithmetic", "model.name": "nano", "seed": "3"},
                             final_metrics, {"grpo.learning_rate": "1e-05", "task.digits": "3"}, start=T0 + 5000)
    for step, flops in [(3, 3.0), (1, 1.0), (2, 2.0)]:
        client.log_batch(ids["final"], metrics=[Metric("compute/flops/rl", flops, T0 + step, step)])
    ids["sft"] = write_run(client, alpha, "sft", "FINISHED", {"phase": "sft", "note": "it's \"quoted\""},
                           {"cost/usd": 0.5}, start=T0)
    ids["failed"] = write_run(client, alpha, "failed", "FAILED", {"phase": "rl", "error.class": "RuntimeError"},
                              {"cost/usd": 0.25}, start=T0 + 1000)
    ids["killed"] = write_run(client, alpha, "killed", "KILLED", {"phase": "rl"}, {"cost/usd": 0.125}, start=T0 + 2000)
    ids["running"] = write_run(client, alpha, "running", None, {"phase": "rl"}, start=T0 + 3000)
    ids["parent"] = write_run(client, sweep, "parent", "FINISHED", {"phase": "sweep"}, start=T0 + 6000)
    for i, (lr, status, pruned) in enumerate([("0.1", "FINISHED", False), ("0.2", "KILLED", True),
                                              ("0.3", "FINISHED", False)]):
        tags = {"phase": "sweep-trial", "mlflow.parentRunId": ids["parent"], "grid.lr": lr} | (
            {"pruned": "true"} if pruned else {})
        ids[f"trial{i}"] = write_run(client, sweep, f"trial{i}", status, tags, {"cost/usd": 1.0}, start=T0 + 7000 + i)
    return uri, ids


def by_name(df: pd.DataFrame) -> dict[str, pd.Series]:
    return {row.run_name: row for _, row in df.iterrows()}


def test_every_run_with_its_tags_params_metrics_and_times(store):
    uri, ids = store
    df = load_runs(uri)
    assert list(df.columns[: len(CORE_COLUMNS)]) == CORE_COLUMNS
    assert len(df) == 9 and set(df["run_id"]) == set(ids.values())
    assert list(df["run_name"][:2]) == ["sft", "failed"]  # oldest first
    final = by_name(df)["final"]
    assert final["experiment"] == "alpha" and final["status"] == "FINISHED"
    assert (final["tags.phase"], final["tags.model.name"], final["tags.seed"]) == ("final", "nano", "3")
    assert (final["params.grpo.learning_rate"], final["params.task.digits"]) == ("1e-05", "3")
    assert (final["compute/flops"], final["cost/usd"], final["compute/gpu_hours"]) == (1.5e18, 2.5, 1.25)
    assert final["eval/accuracy"] == 0.75 and final["compute/flops/rl"] == 3.0  # the last value
    assert final["start_time"] == pd.Timestamp(T0 + 5000, unit="ms", tz="UTC")
    assert final["end_time"] == pd.Timestamp(T0 + 65000, unit="ms", tz="UTC")
    assert str(df["start_time"].dtype).startswith("datetime64") and str(df["start_time"].dt.tz) == "UTC"
    assert pd.isna(by_name(df)["running"]["end_time"])
    assert pd.isna(by_name(df)["running"]["cost/usd"])
    assert by_name(df)["failed"]["tags.error.class"] == "RuntimeError"


def test_fates_and_parents(store):
    uri, ids = store
    rows = by_name(load_runs(uri))
    fates = {name: row["fate"] for name, row in rows.items()}
    assert fates == {"final": "finished", "sft": "finished", "failed": "failed", "killed": "killed",
                     "running": "running", "parent": "finished", "trial0": "finished", "trial1": "pruned",
                     "trial2": "finished"}
    assert rows["trial1"]["status"] == "KILLED" and rows["running"]["status"] == "RUNNING"
    assert {rows[f"trial{i}"]["parent_run_id"] for i in range(3)} == {ids["parent"]}
    assert pd.isna(rows["final"]["parent_run_id"]) and pd.isna(rows["parent"]["parent_run_id"])


@pytest.mark.parametrize("kwargs, names", [
    ({"experiments": ["sweep"]}, {"parent", "trial0", "trial1", "trial2"}),
    ({"experiments": ["alpha", "sweep"], "phase": "rl"}, {"failed", "killed", "running"}),
    ({"status": "failed"}, {"failed"}),
    ({"status": ["FAILED", "KILLED"]}, {"failed", "killed", "trial1"}),
    ({"status": "RUNNING", "phase": "rl"}, {"running"}),
    ({"phase": "sweep-trial", "tags": {"grid.lr": "0.2"}}, {"trial1"}),
    ({"tags": {"pruned": "true"}}, {"trial1"}),
    ({"tags": {"model.name": "nano", "seed": "3"}}, {"final"}),
    ({"tags": {"seed": "4"}}, set()),
    ({"experiments": ["nothing"]}, set()),
])
def test_filters(store, kwargs, names):
    uri, _ = store
    df = load_runs(uri, **kwargs)
    assert set(df["run_name"]) == names
    assert list(df.columns[: len(CORE_COLUMNS)]) == CORE_COLUMNS


def test_tag_values_with_quotes(store):
    uri, ids = store
    client = MlflowClient(uri)
    client.set_tag(ids["killed"], "why", "it's late")
    client.set_tag(ids["failed"], "why", 'a "bug"')
    assert list(load_runs(uri, tags={"why": "it's late"})["run_name"]) == ["killed"]
    assert list(load_runs(uri, tags={"why": 'a "bug"'})["run_name"]) == ["failed"]
    with pytest.raises(RunsError, match="cannot filter"):  # MLflow's filter language cannot quote both kinds
        load_runs(uri, tags={"note": "it's \"quoted\""})


def test_unknown_status_and_experiment(store):
    uri, _ = store
    with pytest.raises(ValueError, match="'nope'"):
        load_runs(uri, ["alpha", "nope"])
    with pytest.raises(ValueError, match="unknown run status 'DONE'"):
        load_runs(uri, status="DONE")


def test_metric_history(store):
    uri, ids = store
    hist = metric_history(ids["final"], "compute/flops/rl", uri)
    assert list(hist.columns) == ["step", "timestamp", "value"]
    assert list(hist["step"]) == [1, 2, 3] and list(hist["value"]) == [1.0, 2.0, 3.0]
    assert hist["timestamp"][0] == pd.Timestamp(T0 + 1, unit="ms", tz="UTC")
    assert metric_history(ids["final"], "no/such/metric", uri).empty


def test_empty_store_from_env_and_root(blank_db, tmp_path, monkeypatch):
    uri = new_store(blank_db, tmp_path / "env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    df = load_runs()
    assert df.empty and list(df.columns) == CORE_COLUMNS
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    new_store(blank_db, tmp_path / "root")
    assert list(load_runs(root=tmp_path / "root").columns) == CORE_COLUMNS


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri", ["bogus://nowhere", "http://127.0.0.1:{port}", "postgresql://me:hunter2@127.0.0.1:{port}/db"])
def test_unreadable_store_is_one_clear_line(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(RunsError) as e:
        load_runs(uri.format(port=unused_port()))
    message = str(e.value)
    assert message.startswith("cannot read the MLflow store ") and "\n" not in message
    assert "hunter2" not in message


def test_many_runs_load_fast(blank_db, tmp_path):
    """300 runs shaped like real ones (written fast: WAL journal, two calls each) load at 1,000 per 10 s or better."""
    n = 300
    uri = new_store(blank_db, tmp_path)
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        con.execute("PRAGMA journal_mode=WAL")
    client = MlflowClient(uri)
    exp = client.create_experiment("bulk")
    metrics = ["compute/flops", "compute/device_seconds", "compute/gpu_hours", "cost/usd", "eval/accuracy",
               *[f"train/m{j}" for j in range(20)]]
    for i in range(n):
        run = client.create_run(exp, start_time=T0 + i, run_name=f"r{i}")
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(i), T0, i) for k in metrics],
                         params=[Param(f"p{j}", str(j)) for j in range(20)],
                         tags=[RunTag("phase", "sweep-trial"), RunTag("task", "arithmetic"), RunTag("seed", str(i))])
    start = time.perf_counter()
    df = load_runs(uri, ["bulk"])
    elapsed = time.perf_counter() - start
    assert len(df) == n and df["cost/usd"].sum() == sum(range(n))
    assert elapsed < 10 * n / 1000, f"{n} runs took {elapsed:.2f} s"
