"""The spool and the retries, on an embedded SQLite store with a client that fails on demand (fast; no server).

What a run could not send waits in memory (backoff between tries), spills to its spool file when there is too
much, and goes to the spool at the end if the store is still down; `sync_spool` (`rlscale runs sync`) delivers
it, idempotently, and deletes a file only when the store took all of it.
"""

from __future__ import annotations

import json

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rlscale.experiments.cli import app
from rlscale.tracking import run as tracking_run
from rlscale.tracking.run import TrackedRun, tracking_uri
from rlscale.tracking.runs import reconcile, sync
from rlscale.tracking.spool import Spool, pending, read_spool, sync_spool


class Flaky:
    """A real client whose writes fail like a locked database while `down` is set."""

    def __init__(self, client: MlflowClient):
        self.client, self.down, self.calls = client, False, 0

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if name not in ("log_batch", "set_terminated", "set_tag", "log_dict", "log_artifacts", "delete_tag"):
            return attr

        def call(*args, **kwargs):
            self.calls += 1
            if self.down:
                raise MlflowException("(sqlite3.OperationalError) database is locked", TEMPORARILY_UNAVAILABLE)
            return attr(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return tmp_path_factory.mktemp("spool") / "mlruns"  # one store for the module: creating one takes seconds


@pytest.fixture
def client(store_root, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return MlflowClient(tracking_uri(None, store_root))


def _run(client, tmp_path, experiment="spool", **kw) -> TrackedRun:
    return TrackedRun(client, experiment, "r", {"phase": "rl"}, {"p": "1"}, "cpu_core", prices={"cpu_core": 1.0},
                      flush_seconds=1e-6, root=tmp_path / "mlruns", spool_dir=tmp_path / "mlruns" / "spool", **kw)


def _history(client, run_id, key="x"):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_locked_store_mid_run_backs_off_and_delivers_everything(client, tmp_path):
    flaky = Flaky(client)
    with _run(flaky, tmp_path, store_wait_seconds=5) as run:
        run.on_log(0, {"x": 0.0})
        flaky.down = True
        calls = flaky.calls
        for step in range(1, 50):
            run.on_log(step, {"x": float(step)})  # no exception reaches the training
        assert flaky.calls - calls == 1  # one failed try, then a pause (backoff), not a try per step
        assert not run.flush() and len(run._buffer) > 0
        flaky.down = False
    assert _history(client, run.run_id) == [(s, float(s)) for s in range(50)]
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert not pending(tmp_path / "mlruns" / "spool")


def test_too_much_waiting_spills_to_the_spool_and_the_run_drains_it(client, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_run, "MAX_BUFFER", 40)
    flaky = Flaky(client)
    with _run(flaky, tmp_path) as run:
        flaky.down = True
        for step in range(100):
            run.on_log(step, {"x": float(step)})
        spool = tmp_path / "mlruns" / "spool" / f"{run.run_id}.jsonl"
        assert spool.is_file() and len(run._buffer) <= 40  # memory bounded, nothing dropped
        flaky.down = False
        run._retry_at = 0.0
        assert run.flush() and not spool.exists()  # back: the spool first, then the buffer
    assert _history(client, run.run_id) == [(s, float(s)) for s in range(100)]


def test_down_at_the_end_spools_metrics_tags_and_status_then_sync_delivers(client, tmp_path):
    flaky = Flaky(client)
    with pytest.raises(RuntimeError, match="boom"):
        with _run(flaky, tmp_path, "spool-end", store_wait_seconds=0.2) as run:
            for step in range(10):
                run.on_log(step, {"x": float(step), "inf": float("inf")})
            flaky.down = True
            run.on_log(10, {"x": 10.0, "inf": float("inf")})
            run.set_tag("model.params", 7)
            run.log_dict({"rows": [1]}, "eval_samples.json")
            raise RuntimeError("boom")
    spool_dir = tmp_path / "mlruns" / "spool"
    (path,) = pending(spool_dir)
    header, records = read_spool(path)
    assert [r["kind"] for r in records] == ["metrics", "tags", "dict", "tags", "status"]
    assert records[-1]["status"] == "FAILED" and records[-2]["tags"]["error.class"] == "RuntimeError"
    assert client.get_run(run.run_id).info.status == "RUNNING"
    # meanwhile `runs reconcile` takes it for dead; the sync knows better
    assert reconcile(client, ["spool-end"], stale_seconds=0) == [run.run_id]

    result = sync(spool_dir, client.tracking_uri)
    assert result.synced == [run.run_id] and not result.failed and result.metrics == 2 + 1 and not path.exists()
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FAILED" and "reconciled" not in stored.data.tags
    assert stored.data.tags["error.message"] == "boom" and stored.data.tags["model.params"] == "7"
    assert _history(client, run.run_id) == [(s, float(s)) for s in range(11)]
    assert stored.data.metrics["inf"] > 1e308  # inf went through the JSON spool (MLflow stores it as max float)
    assert sync(spool_dir, client.tracking_uri).synced == []  # nothing left: a second sync is a no-op


def test_sync_keeps_a_file_the_store_refuses_and_goes_on(client, tmp_path):
    spool_dir = tmp_path / "spool"
    good = client.create_run(client.create_experiment("s")).info.run_id
    gone = client.create_run(client.get_experiment_by_name("s").experiment_id).info.run_id
    client.delete_run(gone)
    uri = client.tracking_uri
    Spool(spool_dir, good, uri).append([{"kind": "metrics", "metrics": [["x", 1.0, 1000, 1]]},
                                        {"kind": "status", "status": "FINISHED", "end_time": 2000}])
    Spool(spool_dir, gone, uri).append([{"kind": "metrics", "metrics": [["x", 1.0, 1000, 1]]}])
    bad = spool_dir / "not-a-spool.jsonl"
    bad.write_text("garbage\n")
    result = sync_spool(spool_dir, uri)
    assert result.synced == [good] and set(result.failed) == {str(spool_dir / f"{gone}.jsonl"), str(bad)}
    assert (spool_dir / f"{gone}.jsonl").is_file() and bad.is_file()  # kept whole for a later look
    assert client.get_run(good).info.status == "FINISHED" and _history(client, good) == [(1, 1.0)]


def test_a_torn_last_line_is_ignored(tmp_path):
    spool = Spool(tmp_path, "abc", "sqlite:///x.db")
    spool.append([{"kind": "metrics", "metrics": [["x", 1.0, 1, 1]]}])
    with open(spool.path, "a") as fh:
        fh.write('{"kind": "metrics", "metr')  # the process died mid-write
    header, records = read_spool(spool.path)
    assert header["run_id"] == "abc" and records == [{"kind": "metrics", "metrics": [["x", 1.0, 1, 1]]}]
    spool.path.write_text(json.dumps({"kind": "metrics"}) + "\n")
    with pytest.raises(ValueError, match="not a spool file"):
        read_spool(spool.path)


def test_runs_sync_command(client, tmp_path, monkeypatch):
    run_id = client.create_run(client.create_experiment("cli")).info.run_id
    spool_dir = tmp_path / "spool"
    Spool(spool_dir, run_id, client.tracking_uri).append([{"kind": "status", "status": "FINISHED"}])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)  # the current store: the file's own
    out = CliRunner().invoke(app, ["runs", "sync", "--spool", str(spool_dir)])
    assert out.exit_code == 0 and "synced 1 run(s)" in out.stdout, out.output
    assert client.get_run(run_id).info.status == "FINISHED" and not pending(spool_dir)


def test_a_run_reconciled_during_an_outage_comes_back_running_then_finishes(client, tmp_path):
    flaky = Flaky(client)
    with _run(flaky, tmp_path, "spool-reconciled") as run:
        run.on_log(0, {"x": 0.0})
        flaky.down = True
        run.on_log(1, {"x": 1.0})  # not delivered: its heartbeat goes stale in the store
        assert reconcile(client, ["spool-reconciled"], stale_seconds=0) == [run.run_id]  # taken for dead
        flaky.down = False
        run._retry_at = 0.0
        run.on_log(2, {"x": 2.0})
        stored = client.get_run(run.run_id)
        assert stored.info.status == "RUNNING" and "reconciled" not in stored.data.tags  # alive after all
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and _history(client, run.run_id) == [(0, 0.0), (1, 1.0), (2, 2.0)]


def _planted(spool_dir, run_id, uri, records) -> str:
    """A spool file for `run_id` written by someone else (any records), as text."""
    lines = [{"kind": "run", "run_id": run_id, "tracking_uri": uri, "created": 0}, *records]
    return "".join(json.dumps(r) + "\n" for r in lines)


@pytest.mark.parametrize("link", ["run folder", "model folder", "folder inside", "file inside", "spool file"])
def test_sync_refuses_symbolic_links_and_uploads_nothing(client, tmp_path, link):
    run_id = client.create_run(client.create_experiment(f"links: {link}")).info.run_id
    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_rsa").write_text("PRIVATE")
    spool_dir, uri = tmp_path / "spool", client.tracking_uri
    home, spool = spool_dir / run_id, spool_dir / f"{run_id}.jsonl"
    spool_dir.mkdir()
    folder, refused = home / "artifacts-x", home
    if link in ("run folder", "model folder"):  # <spool>/<run_id> -> ~/.ssh: the folder the checks trusted
        home.symlink_to(secret)
        folder = home
    elif link == "folder inside":
        (folder / "keys").parent.mkdir(parents=True)
        (folder / "keys").symlink_to(secret)
        refused = folder / "keys"
    elif link == "file inside":
        folder.mkdir(parents=True)
        (folder / "ok.txt").write_text("fine")
        (folder / "id_rsa").symlink_to(secret / "id_rsa")
        refused = folder / "id_rsa"
    kind = "logged_model" if link == "model folder" else "artifacts"
    record = {"kind": kind, "local_dir": str(folder), "artifact_path": "loot", "name": "model", "step": 1,
              "timestamp": 0, "metrics": {}}
    text = _planted(spool_dir, run_id, uri, [{"kind": "tags", "tags": {"x": "1"}}, record])
    if link == "spool file":  # <spool>/<run_id>.jsonl -> a file elsewhere
        elsewhere = tmp_path / "elsewhere.jsonl"
        elsewhere.write_text(_planted(spool_dir, run_id, uri, [{"kind": "tags", "tags": {"x": "1"}}]))
        spool.symlink_to(elsewhere)
        refused = spool
    else:
        spool.write_text(text)

    out = CliRunner().invoke(app, ["runs", "sync", "--spool", str(spool_dir), "--uri", uri])
    assert out.exit_code == 1 and out.stdout.splitlines()[0] == "synced 0 run(s), 0 metric value(s)", out.output
    assert out.stdout.splitlines()[1:] == [f"  not synced: {spool}: ValueError: {refused} is a symbolic link: "
                                           "refused (nothing of this spool file was delivered)"], out.stdout
    run = client.get_run(run_id)
    assert client.list_artifacts(run_id) == [] and "x" not in run.data.tags  # nothing uploaded, nothing set
    assert client.search_logged_models([run.info.experiment_id]) == []
    assert spool.is_symlink() or spool.read_text() == text  # kept whole, for a look
    assert (secret / "id_rsa").read_text() == "PRIVATE"


def test_a_run_never_writes_through_a_planted_link(tmp_path):
    spool_dir, elsewhere = tmp_path / "spool", tmp_path / "elsewhere"
    spool_dir.mkdir()
    elsewhere.mkdir()
    (spool_dir / "r1").symlink_to(elsewhere)  # the run folder of run r1
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (spool_dir / "r2.jsonl").symlink_to(victim)  # the spool file of run r2
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights").write_text("w")
    with pytest.raises(ValueError, match=r"r1 is a symbolic link: refused"):
        Spool(spool_dir, "r1", "sqlite:///x.db").append([{"kind": "artifacts", "local_dir": str(model)}])
    with pytest.raises(ValueError, match=r"r2\.jsonl is a symbolic link: refused"):
        Spool(spool_dir, "r2", "sqlite:///x.db").append([{"kind": "status", "status": "FINISHED"}])
    assert list(elsewhere.iterdir()) == [] and victim.read_text() == "keep"


def test_sync_refuses_a_spool_file_named_for_another_run(client, tmp_path):
    run_id = client.create_run(client.create_experiment("renamed")).info.run_id
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "other.jsonl").write_text(_planted(spool_dir, run_id, client.tracking_uri,
                                                    [{"kind": "tags", "tags": {"x": "1"}}]))
    result = sync_spool(spool_dir, client.tracking_uri)
    assert not result.synced and "x" not in client.get_run(run_id).data.tags
    assert result.failed == {str(spool_dir / "other.jsonl"): f"ValueError: written for the run {run_id}, not for "
                             "'other' (its file name): refused"}
