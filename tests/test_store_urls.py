"""Store URLs against a real PostgreSQL (the throwaway cluster of tests/pg.py; skipped without its binaries): a password
given as a query parameter is masked in everything a run records, and a URL option the driver rejects is one error
line, not a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from pg import SUPERUSER, Cluster, find_bin_dir
from typer.testing import CliRunner

from rlscale.experiments.cli import app
from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.tracking.run import safe_uri

pytestmark = pytest.mark.postgres
TINY = """
name = "{name}"
output_dir = "{tmp}/out"
[model]
size = "nano"
[task]
digits = 1
eval_percent = 30
[sft]
steps = 2
[grpo]
steps = 1
prompts_per_step = 2
num_generations = 2
max_new_tokens = 3
verify_max_new_tokens = 12
eval_problems = 4
[eval]
problems = 4
samples = 2
max_new_tokens = 3
verify_max_new_tokens = 12
[tracking]
root = "{tmp}/mlruns"
uri = "{uri}"
[sweep]
trials = 1
[sweep.space."grpo.learning_rate"]
type = "float"
low = 1e-5
high = 1e-2
"""
REJECTED = 'invalid connection option "token"'


class Quiet:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


@pytest.fixture(scope="module")
def postgres():
    """A running throwaway cluster with the databases `mlflow` and `optuna`; always stopped and removed."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb, pg_ctl): apt-get install postgresql"
        print(f"skipping PostgreSQL tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    pytest.importorskip("psycopg", reason="psycopg missing: pip install -e '.[dev]'")
    try:
        cluster = Cluster(bin_dir)
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        cluster.start()
        for db in ("mlflow", "optuna"):
            cluster.create_database(db)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _config(tmp: Path, name: str, uri: str) -> str:
    path = tmp / f"{name}.toml"
    path.write_text(TINY.format(name=name, tmp=tmp.as_posix(), uri=uri))
    return str(path)


@pytest.mark.parametrize("command", [
    "runs list", "train", "sweep",
])
def test_an_option_the_driver_rejects_is_one_error_line(postgres, cwd, command):
    url = postgres.url("mlflow") + "?sslmode=disable&token=s3cret"
    storage = postgres.url("optuna") + "?token=s3cret"
    config = _config(cwd, f"rejected-{command.replace(' ', '-')}", postgres.url("mlflow"))
    argv = {"runs list": ["runs", "list", "--uri", url], "train": ["train", config, "--set", f"tracking.uri={url}"],
            "sweep": ["sweep", config, "--storage", storage]}[command]
    result = CliRunner().invoke(app, argv)
    assert "Traceback" not in result.output and result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    what, where = ("sweep storage", storage) if command == "sweep" else ("tracking store", url)
    assert lines == [f"error: {what} {safe_uri(where)} cannot be used: (psycopg.ProgrammingError) {REJECTED}"], \
        result.stderr
    assert "s3cret" not in result.output and postgres.password not in result.output
    assert sorted(p.name for p in cwd.iterdir()) == [Path(config).name]  # nothing trained, nothing written


def test_a_password_in_the_query_string_is_masked_in_what_the_run_records(postgres, cwd):
    url = f"postgresql://{SUPERUSER}@127.0.0.1:{postgres.port}/mlflow?password={postgres.password}"
    result = run_experiment(load_config(_config(cwd, "query-password", url)), Quiet(), resume=False)
    client = MlflowClient(postgres.url("mlflow"))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == f"postgresql://{SUPERUSER}@127.0.0.1:{postgres.port}/mlflow?password=***"
    config = json.loads(Path(client.download_artifacts(result.run_id, "config.json", str(cwd))).read_text())
    assert config["tracking"]["uri"] == run.data.params["tracking.uri"]
    recorded = json.dumps([run.data.params, run.data.tags, config])
    assert postgres.password not in recorded
