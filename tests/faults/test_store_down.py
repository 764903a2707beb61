"""The tracking server goes away: training goes on, metrics wait and arrive; still down at the end, they are spooled.

A real `mlflow server` (SQLite backend in tmp) is stopped and restarted on the same port. MLflow's own HTTP
retries are set low (the test env) so an unreachable server fails fast; TrackedRun keeps what it could not
send. A server that is down when the run is to be created stops the run before training (StoreError).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import Recorder
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rlscale.experiments.cli import app
from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.tracking import run as tracking_run
from rlscale.tracking.run import StoreError, TrackedRun
from rlscale.tracking.spool import pending, read_spool, sync_spool

TINY = [
    "name=outage", "model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=5", "sft.batch_size=8",
    "grpo.steps=6",
    "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_new_tokens=3", "grpo.verify_max_new_tokens=12",
    "eval.problems=4", "eval.samples=4", "eval.max_new_tokens=3", "eval.verify_max_new_tokens=12",
    "tracking.flush_seconds=0.000001",
    "sft.reuse=false",  # one run, its steps numbered as below (a shared SFT would be a second run)
]


class Server:
    """An `mlflow server` on a fixed port that can be stopped and started again."""

    def __init__(self, tmp: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    def up(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.url}/health", timeout=2).read() == b"OK"
        except OSError:
            return False

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}",
             "--artifacts-destination", str(self.tmp / "server-artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.time() + 180
        while not self.up():
            assert self.proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        assert not self.up()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def store(server, monkeypatch):
    """The server, up, as the tracking store; MLflow's HTTP client fails fast instead of retrying for minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server shares the cores
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setattr(tracking_run, "STORE_WAIT_SECONDS", 2.0)  # the end waits 2 s, then spools
    yield server
    torch.set_num_threads(threads)


class Outage(Recorder):
    """Records every metric it is given; stops the server at step `down`, starts it again at step `up`."""

    def __init__(self, server: Server, down: int, up: int | None):
        super().__init__()
        self.server, self.down, self.up = server, down, up

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        super().on_log(step, metrics)
        if step == self.down and self.server.up():
            self.server.stop()
        if self.up is not None and step == self.up and not self.server.up():
            self.server.start()


def _given(recorder: Recorder) -> dict[str, set[tuple[int, float]]]:
    """(step, value) of every metric the trainer handed to the callbacks (NaN is not sent)."""
    out: dict[str, set[tuple[int, float]]] = {}
    for step, metrics in recorder.logs:
        for k, v in metrics.items():
            if v == v:
                out.setdefault(k, set()).add((step, float(v)))
    return out


BILLED_TO_END = ("compute/device_seconds", "compute/device_seconds/other", "compute/gpu_hours", "cost/usd")


def _assert_all_arrived(client: MlflowClient, run_id: str, given: dict[str, set[tuple[int, float]]]) -> None:
    """Every value the trainer gave is in the store, and nothing else but the run's bill topped up at its end (the
    time after the last metrics: at most one more value of each billed key, at the last step, above the trainer's)."""
    for key, values in given.items():
        stored = {(m.step, m.value) for m in client.get_metric_history(run_id, key)}
        extra = stored - values
        if key in BILLED_TO_END and extra:
            last_step, last_value = max(values)
            assert len(extra) == 1 and next(iter(extra))[0] == last_step and next(iter(extra))[1] >= last_value, key
            stored -= extra
        assert stored == values, key


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'out'}", f"tracking.root={tmp_path / 'mlruns'}",
                              *extra])


def test_server_down_mid_run_then_back_loses_nothing(store, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="rlscale.tracking.run")
    outage = Outage(store, down=3, up=8)  # down during SFT, back in RL (SFT is 5 steps; RL steps are 6..11)
    result = run_experiment(_cfg(tmp_path), outage)
    assert "not reachable" in caplog.text and "is back" in caplog.text  # it did fail, and recovered
    client = MlflowClient(store.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    _assert_all_arrived(client, result.run_id, _given(outage))
    assert run.data.metrics["compute/flops"] == result.metrics["compute/flops"]
    assert not pending(tmp_path / "mlruns" / "spool")  # nothing had to be spooled


def test_trackedrun_down_at_the_end_spools_then_syncs(store, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="rlscale.tracking.run")
    client = MlflowClient(store.url)
    spool_dir = tmp_path / "spool"
    given: dict[str, set[tuple[int, float]]] = {}
    with TrackedRun(client, "outage-unit", "unit", {"phase": "rl"}, {"a": "1"}, "cpu_core",
                    prices={"cpu_core": 1.0}, flush_seconds=1e-6, root=tmp_path, spool_dir=spool_dir) as run:
        for step in range(1, 61):
            if step == 20:
                store.stop()
            metrics = {"train/loss": 1.0 / step, "compute/device_seconds": float(step)}
            run.on_log(step, metrics)
            for k, v in metrics.items():
                given.setdefault(k, set()).add((step, v))
        run.set_tag("model.params", "123")
        run.log_dict({"rows": [1, 2]}, "eval_samples.json")
    (path,) = pending(spool_dir)
    header, records = read_spool(path)
    assert header["run_id"] == run.run_id and header["tracking_uri"] == store.url
    assert records[-1]["kind"] == "status" and records[-1]["status"] == "FINISHED"
    assert "rlscale runs sync" in caplog.text

    failed = sync_spool(spool_dir, store.url)  # still down: the file stays, whole
    assert failed.synced == [] and list(failed.failed) == [str(path)] and path.is_file()

    store.start()
    result = sync_spool(spool_dir, store.url)
    assert result.synced == [run.run_id] and not result.failed and not path.exists()
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.tags["model.params"] == "123"
    _assert_all_arrived(client, run.run_id, given)
    assert stored.data.metrics["cost/usd"] == pytest.approx(60 / 3600)
    assert json.loads(Path(client.download_artifacts(run.run_id, "eval_samples.json", str(tmp_path))).read_text()
                      ) == {"rows": [1, 2]}


def test_training_with_server_down_at_the_end_is_spooled_then_synced(store, tmp_path):
    outage = Outage(store, down=8, up=None)  # goes down in RL and stays down
    result = run_experiment(_cfg(tmp_path), outage)  # the training itself must not fail
    spool_dir = tmp_path / "mlruns" / "spool"
    (path,) = pending(spool_dir)
    store.start()
    assert sync_spool(spool_dir, store.url).synced == [result.run_id] and not path.exists()
    client = MlflowClient(store.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["model.params"]) > 0
    _assert_all_arrived(client, result.run_id, _given(outage))


def test_server_down_at_start_fails_before_training(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking_run, "STORE_WAIT_SECONDS", 0.5)
    recorder = Recorder()
    with pytest.raises(StoreError, match="unreachable"):
        run_experiment(_cfg(tmp_path), recorder)
    assert recorder.logs == [] and not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("scheme", ["http", "postgresql"])
def test_cli_store_down_at_start_is_one_error_line_at_once(scheme, tmp_path, monkeypatch):
    """An MLflow server or a PostgreSQL store that does not answer: one error line, exit 2, nothing trained. For
    the database, MLflow alone would retry for ~100 s; `open_client` probes it first."""
    if scheme == "postgresql":
        pytest.importorskip("psycopg")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}" if scheme == "http" else f"postgresql://rlscale:hunter2@127.0.0.1:{port}/mlflow"
    monkeypatch.setattr(tracking_run, "STORE_WAIT_SECONDS", 0.5)
    args = [a for s in TINY + [f"output_dir={tmp_path / 'out'}"] for a in ("--set", s)]
    (tmp_path / "c.toml").write_text("")
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.toml"), *args],
                                env={"MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "unreachable" in lines[0], result.output
    assert "hunter2" not in result.output and time.monotonic() - t0 < 20
    assert not (tmp_path / "out").exists()
