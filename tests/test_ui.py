"""What a user sees in the MLflow UI: `rlscale ui` serves the store; through its REST API the experiment is marked
as model training, a run has its datasets, its LoggedModel and a description, a sweep parent names its best trial;
headless Chromium renders the runs table with the run and its dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
from conftest import wait_for_health
from mlflow.tracking import MlflowClient

from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.experiments.sweep import run_sweep
from rlscale.tracking.run import tracking_uri

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SETS = ["model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=3", "grpo.steps=2",
        "grpo.prompts_per_step=4", "grpo.num_generations=2", "grpo.max_new_tokens=3", "grpo.verify_max_new_tokens=8",
        "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=3", "eval.verify_max_new_tokens=8"]


class _Quiet:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A store with a tracked run (model logged) and a 2-trial sweep, served by `rlscale ui`."""
    tmp = tmp_path_factory.mktemp("ui")
    root = tmp / "mlruns"
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = load_config(None, ["name=browse", *SETS, "tracking.log_model=true", f"output_dir={tmp / 'run'}",
                                 f"tracking.root={root}"])
        result = run_experiment(cfg, _Quiet())
        (tmp / "sweep.toml").write_text('name = "browse-sweep"\n[sweep]\ntrials = 2\n'
                                        '[sweep.space."grpo.learning_rate"]\nlow = 1e-4\nhigh = 1e-3\nlog = true\n')
        run_sweep(str(tmp / "sweep.toml"), [*SETS, f"output_dir={tmp / 'sweep'}", f"tracking.root={root}"])
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tracking_uri(None, root)
    cmd = [sys.executable, "-m", "rlscale.experiments.cli", "ui", "--port", str(port), "--uri", store]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # the server line and one URL per experiment
        views = dict(re.findall(r"^\s+(\S+): (http\S+)$", "".join(lines), re.M))
        wait_for_health(url, proc)
        yield {"url": url, "views": views, "run_id": result.run_id, "tmp": tmp, "store": store}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_experiments_are_marked_as_model_training(ui):
    for name in ("browse", "browse-sweep"):
        exp = _get(f"{ui['url']}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")["experiment"]
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development", name
        view = json.loads(tags["mlflow.sharedViewState.rlscale"])
        assert "metrics.`eval/accuracy`" in view["selectedColumns"] and "metrics.`cost/usd`" in view["selectedColumns"]
        assert ui["views"][name].endswith(f"/#/experiments/{exp['experiment_id']}/runs?viewStateShareKey=rlscale")


def test_existing_experiment_gets_the_kind(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    exp_id = client.create_experiment("old")  # made before rlscale marked its experiments
    run_experiment(load_config(None, ["name=old", *SETS, f"output_dir={tmp_path / 'o'}",
                                      f"tracking.root={tmp_path / 'mlruns'}", "sft.steps=1", "grpo.steps=1"]), _Quiet())
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_has_datasets_model_source_and_description(ui):
    run = _get(f"{ui['url']}/api/2.0/mlflow/runs/get?run_id={ui['run_id']}")["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    inputs = run["inputs"]["dataset_inputs"]
    by_context = {next(t["value"] for t in d["tags"] if t["key"] == "mlflow.data.context"): d["dataset"]
                  for d in inputs}
    assert set(by_context) == {"train", "eval"}
    assert by_context["eval"]["name"] == "arithmetic-eval"
    assert json.loads(by_context["eval"]["profile"])["num_rows"] == 4
    assert by_context["train"]["source_type"] == "code" and by_context["train"]["digest"]
    assert tags["mlflow.source.name"].startswith(sys.argv[0])  # the command that trained it (here: pytest)
    assert tags["mlflow.source.type"] == "LOCAL" and re.fullmatch(r"[0-9a-f]{40}|unknown",
                                                                     tags["mlflow.source.git.commit"])
    note = tags["mlflow.note.content"]
    assert note.startswith("arithmetic on llama-nano; held-out accuracy ")
    assert "after SFT ->" in note and "FLOPs" in note
    assert "vCPU-hours" in note and note.endswith("finished")
    (out,) = run["outputs"]["model_outputs"]
    model = _get(f"{ui['url']}/api/2.0/mlflow/logged-models/{out['model_id']}")["model"]
    assert model["info"]["source_run_id"] == ui["run_id"] and model["info"]["status"] == "LOGGED_MODEL_READY"
    linked = {m["key"]: m for m in model["data"]["metrics"]}
    assert "eval/accuracy" in linked and linked["eval/accuracy"]["dataset_name"] == "arithmetic-eval"
    assert linked["eval/accuracy"]["dataset_digest"] == by_context["eval"]["digest"]
    files = MlflowClient(ui["store"]).list_logged_model_artifacts(out["model_id"])
    assert "model.safetensors" in {f.path for f in files}


def test_sweep_parent_names_its_best_trial_and_study(ui):
    client = MlflowClient(ui["store"])
    exp = client.get_experiment_by_name("browse-sweep")
    (parent,) = client.search_runs([exp.experiment_id], "tags.phase = 'sweep'")
    tags = parent.data.tags
    best = tags["best.trial"]
    assert f"best trial {best} (eval/accuracy = " in tags["mlflow.note.content"]
    assert tags["optuna.study"] == "browse-sweep-sweep" and tags["optuna.storage"].endswith("optuna.log")


def test_chromium_shows_the_runs_table_with_run_and_dataset(ui):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)}); "
                    "install one, e.g. apt-get install chromium")
    run_name = MlflowClient(ui["store"]).get_run(ui["run_id"]).info.run_name
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={ui['tmp'] / 'profile'}", "--virtual-time-budget=30000", "--window-size=2400,1000",
           "--dump-dom", ui["views"]["browse"]]
    dom = ""
    for _ in range(3):  # the app loads its chunks and the runs lazily: give it a few tries on a slow machine
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
        if run_name in dom and "arithmetic-eval" in dom:
            break
    assert run_name in dom, dom[-3000:]
    assert "arithmetic-eval" in dom  # the Dataset column
    assert "eval/accuracy" in dom  # a column of the saved view
