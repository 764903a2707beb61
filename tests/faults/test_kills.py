"""SIGKILL a training at five points; the store stays sound, checkpoints whole, and a resume counts nothing twice.

Each case runs `rlscale train` in a subprocess through `fault_inject.py`, which kills it at a chosen point of
RL step 2 (after the step-1 checkpoint): mid-sampling, mid-backward, mid-checkpoint-write (a torn `state.pt`
in the temp folder), mid-metric-flush (rows inserted, not committed), and at a random time. After the kill:
SQLite's integrity check passes, `latest` names a complete, loadable checkpoint, `rlscale runs reconcile`
marks the run KILLED, and running the same command again finishes the same MLflow run with exactly the data
and FLOPs of an uninterrupted run of the same config.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlscale.experiments.cli import app
from rlscale.rl.checkpoint import latest_checkpoint
from rlscale.tracking.run import tracking_uri

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("fault_inject.py")
SFT_STEPS = 5
CONFIG = [
    "model.size=nano", "task.digits=1", "task.eval_percent=30", f"sft.steps={SFT_STEPS}", "sft.batch_size=8",
    f"sft.checkpoint_every={SFT_STEPS}", "grpo.steps=4", "grpo.checkpoint_every=1", "grpo.prompts_per_step=4",
    "grpo.num_generations=4", "grpo.max_new_tokens=3", "grpo.verify_max_new_tokens=12", "eval.problems=4",
    "eval.samples=4", "eval.max_new_tokens=3", "eval.verify_max_new_tokens=12", "tracking.flush_seconds=0.000001",
    "sft.reuse=false",  # one run, SFT and RL, killed and resumed in its own output_dir
    "grpo.verify_own=false", "grpo.verify_replay=0", "grpo.verify_coef=1.0",  # a sampled check too: two sampling
    # calls a step, both counted
]
# counted exactly: a resumed run must end with the same totals as one that was never interrupted
EXACT = ["compute/flops", "compute/flops/sft", "compute/flops/rollout", "compute/flops/verify_rollout",
         "compute/flops/policy", "compute/flops/eval", "data/problems", "data/samples", "data/samples/solve",
         "data/samples/verify", "data/tokens/prompt", "data/tokens/generated", "data/tokens/trained"]
# one thread in the killed subprocess and in the in-process runs: identical floats, identical samples
ENV = os.environ | {"MLFLOW_TRACKING_URI": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _args(root: Path, name: str) -> list[str]:
    sets = [*CONFIG, f"name={name}", f"output_dir={root / name}", f"tracking.root={root / 'mlruns'}"]
    return ["train", str(REPO / "experiments" / "addition.toml"), *[x for s in sets for x in ("--set", s)]]


def _train(root: Path, name: str, fault: tuple[str, int]) -> subprocess.Popen:
    """`rlscale train` in a subprocess, with a fault injected."""
    cmd = [sys.executable, str(INJECT), fault[0], str(fault[1]), *_args(root, name)]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_here(root: Path, name: str) -> None:
    """The same `rlscale train` command, run in this process (saves a slow interpreter start)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, _args(root, name), env={"MLFLOW_TRACKING_URI": None})
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, (result.output, result.exception)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One store for every case (each its own experiment), as on a machine where runs share `mlruns/`."""
    return tmp_path_factory.mktemp("kills")


@pytest.fixture(scope="module")
def baseline(root) -> dict[str, float]:
    _train_here(root, "baseline")
    client = MlflowClient(tracking_uri(None, root / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("baseline").experiment_id])
    assert run.info.status == "FINISHED"
    return run.data.metrics


def _integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def _check_after_kill(root: Path, name: str) -> str:
    """The state a SIGKILL leaves: store sound, the latest checkpoint whole. Returns the run id."""
    assert _integrity(root / "mlruns" / "mlflow.db") == "ok"
    ckpt_dir = root / name / "checkpoints"
    found = latest_checkpoint(ckpt_dir)
    assert found is not None, sorted(p.name for p in ckpt_dir.iterdir())
    phase, step, path = found
    assert (phase, step) == ("rl", 1), found  # killed in RL step 2: step 1's checkpoint is the latest
    load_file(path / "model.safetensors")  # complete files: both load
    state = torch.load(path / "state.pt", weights_only=True)
    assert (state["phase"], state["step"]) == (phase, step)
    # a checkpoint is written in a hidden temp folder and renamed when whole: none newer than `latest` is
    # visible (an older one may still be there, being removed, when the kill came right after a save)
    visible = [p.name for p in ckpt_dir.iterdir() if p.name.startswith("ckpt-")]
    assert path.name in visible and not [v for v in visible if v.startswith("ckpt-rl-") and v != path.name]
    run_id = (root / name / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri(None, root / "mlruns"))
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # SIGKILL: nothing in the process could react
    assert run.data.metrics["compute/flops"] > 0  # the compute of the steps before the kill is in the store
    return run_id


def _reconcile_and_resume(root: Path, name: str, run_id: str, baseline: dict[str, float]) -> None:
    uri = tracking_uri(None, root / "mlruns")
    out = CliRunner().invoke(app, ["runs", "reconcile", "--uri", uri, "--experiment", name, "--stale-seconds", "0"])
    assert out.exit_code == 0 and f"marked 1 run(s) KILLED: {run_id}" in out.stdout, out.output
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"

    _train_here(root, name)  # the same command again
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.run_id == run_id  # continued into the same MLflow run
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    got = {k: run.data.metrics[k] for k in EXACT}
    assert got == {k: baseline[k] for k in EXACT}  # no step's compute or data counted twice, none missing
    history = client.get_metric_history(run_id, "train/rl_step")
    assert sorted({m.value for m in history}) == [1.0, 2.0, 3.0, 4.0]
    ckpt_dir = root / name / "checkpoints"
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]  # temp folders cleaned
    assert latest_checkpoint(ckpt_dir)[:2] == ("rl", 4)
    assert _integrity(root / "mlruns" / "mlflow.db") == "ok"


@pytest.mark.parametrize(
    ("point", "nth"),
    [
        ("generate", 3),  # GRPO samples twice a step (solve, verify): the 3rd call is step 2's solve rollout
        ("backward", SFT_STEPS + 2),  # one backward per SFT step, then one per RL step
        ("checkpoint", 3),  # checkpoints: sft-5, rl-1, then rl-2 is torn
        ("flush", SFT_STEPS + 1 + 2),  # a flush per SFT step, the SFT eval, RL steps 1 and 2
    ],
)
def test_sigkill_at_a_point_then_reconcile_and_resume(root, baseline, point, nth):
    name = f"kill-{point}"
    rc, out = _finish(_train(root, name, (point, nth)))
    assert rc == -signal.SIGKILL, out
    if point == "checkpoint":  # the torn write is there, hidden
        torn = root / name / "checkpoints" / ".ckpt-rl-2.tmp" / "state.pt"
        assert torn.is_file()
        with pytest.raises(RuntimeError):
            torch.load(torn, weights_only=True)
    run_id = _check_after_kill(root, name)
    _reconcile_and_resume(root, name, run_id, baseline)


def test_sigkill_at_a_random_time_then_reconcile_and_resume(root, baseline):
    name = "kill-random"
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    delay = random.Random(seed).uniform(0.0, 0.5)
    proc = _train(root, name, ("slow", 300))  # each GRPO sampling call takes 0.3 s longer: a window to hit
    latest = root / name / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not (latest.is_file() and latest.read_text().strip() == "ckpt-rl-1"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    time.sleep(delay)  # somewhere in RL step 2 (0.6 s of sampling alone), seed in FAULT_SEED
    proc.send_signal(signal.SIGKILL)
    rc, out = _finish(proc)
    assert rc == -signal.SIGKILL, f"FAULT_SEED={seed}: finished before the kill\n{out}"
    run_id = _check_after_kill(root, name)
    _reconcile_and_resume(root, name, run_id, baseline)
