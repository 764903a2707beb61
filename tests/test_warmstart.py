"""Shared SFT warm starts: each distinct SFT trained once as its own run, reused by RL runs, billed once, with the
lineage of every RL run; concurrent workers, killed trainers and other machines (fetch from artifacts)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from tiny import write_tiny

from rlscale.experiments.config import load_config
from rlscale.experiments.grid import grid_points, run_point
from rlscale.experiments.runner import run_experiment
from rlscale.experiments.warmstart import claim, sft_key
from rlscale.tracking.run import tracking_uri

GRID = """
[grid.axes]
"grpo.steps" = [2, 3]
"""


class Quiet:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(tmp_path: Path, name: str = "ws", text: str = "", sft_steps: int = 4) -> str:
    return write_tiny(tmp_path, name, text, sft_steps=sft_steps, tracking="flush_seconds = 1.0\n")


def _runs(tmp_path: Path, name: str = "ws", root: str = "mlruns") -> list:
    client = MlflowClient(tracking_uri(None, tmp_path / root))
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def _phase(runs: list, phase: str) -> list:
    return [r for r in runs if r.data.tags.get("phase") == phase]


def _train(config: str, *sets: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlscale.experiments.cli", "train", config,
                             *[a for s in sets for a in ("--set", s)]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))


def test_grid_over_rl_knobs_trains_one_sft_billed_once(tmp_path):
    config = _write(tmp_path, text=GRID)
    for point in grid_points(config, []):
        run_point(point, Quiet())
    runs = _runs(tmp_path)
    (sft,), rl = _phase(runs, "sft"), _phase(runs, "rl")
    assert len(rl) == 2 and sft.info.status == "FINISHED" and "recipe" not in sft.data.tags
    s = sft.data.metrics
    assert s["compute/flops/sft"] > 0 and s["cost/usd"] > 0
    for r in rl:
        m = r.data.metrics
        assert r.data.tags["sft.run_id"] == sft.info.run_id and r.data.tags["sft.key"] == sft.data.tags["sft.key"]
        assert m["compute/flops/sft"] == 0  # its own work only: RL and its evals
        assert m["compute/flops/lineage"] == pytest.approx(m["compute/flops"] + s["compute/flops"])
        assert m["cost/usd_lineage"] == pytest.approx(m["cost/usd"] + s["cost/usd"])
        assert m["eval/sft_accuracy"] == s["eval/accuracy"]  # RL started from that model
    # project total: the SFT once and both RL runs
    total = math.fsum(r.data.metrics["compute/flops"] for r in runs)
    assert total == pytest.approx(s["compute/flops"] + sum(r.data.metrics["compute/flops"] for r in rl))
    assert total < sum(r.data.metrics["compute/flops/lineage"] for r in rl)  # what two cold starts would have cost
    # the grid again: nothing is retrained, no SFT either
    for point in grid_points(config, []):
        if point.id not in {r.data.tags.get("grid.id") for r in rl}:
            run_point(point, Quiet())
    assert len(_runs(tmp_path)) == 3
    # a resumed RL run (its checkpoint kept) starts from the same SFT, which is not trained again
    cfg = load_config(config, ["grpo.steps=3", "grpo.checkpoint_every=1", f"output_dir={tmp_path}/resumed"])
    run_experiment(cfg, Quiet())
    run_experiment(cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"steps": 4})}), Quiet())
    assert len(_phase(_runs(tmp_path), "sft")) == 1


def test_any_sft_input_makes_a_new_sft_and_rl_knobs_do_not(tmp_path):
    config = _write(tmp_path)
    key = sft_key(load_config(config))
    for same in ("grpo.learning_rate=0.5", "grpo.steps=9", "output_dir=/elsewhere", "sft.reuse=false",
                 "model.device='cpu'", "tracking.phase='final'", "sft.checkpoint_every=2"):
        assert sft_key(load_config(config, [same])) == key, same
    for other in ("sft.learning_rate=0.01", "sft.steps=5", "seed=1", "model.size='micro'", "task.digits=2",
                  "eval.problems=5", "sft.verify_fraction=0.1", "model.lora.rank=4"):
        assert sft_key(load_config(config, [other])) != key, other
    data = tmp_path / "p.jsonl"  # a dataset task: its file's content is part of the key, not only its path
    data.write_text("".join(f'{{"question": "{i}+1", "answer": "{i + 1}"}}\n' for i in range(20)))
    task = ['task.name="dataset"', f'task.path="{data}"', "task.eval_percent=30"]
    before = sft_key(load_config(None, task))
    data.write_text(data.read_text().replace('"2+1"', '"2+2"'))
    os.utime(data, ns=(time.time_ns() + 10**9,) * 2)
    assert sft_key(load_config(None, task)) != before
    # trained: a changed SFT setting is a second SFT run
    run_experiment(load_config(config, [f"output_dir={tmp_path}/a"]), Quiet())
    run_experiment(load_config(config, [f"output_dir={tmp_path}/b", "sft.learning_rate=0.01"]), Quiet())
    sfts = _phase(_runs(tmp_path), "sft")
    assert len(sfts) == 2 and len({r.data.tags["sft.key"] for r in sfts}) == 2


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reuse_off_is_todays_run_and_reuse_on_gives_the_same_model(tmp_path, lora):
    config = _write(tmp_path, text="[model.lora]\nrank = 4\n" if lora else "")
    cold = run_experiment(load_config(config, [f"output_dir={tmp_path}/cold", "sft.reuse=false"]), Quiet())
    warm = run_experiment(load_config(config, [f"output_dir={tmp_path}/warm"]), Quiet())
    runs = {r.info.run_id: r for r in _runs(tmp_path)}
    c, w = runs[cold.run_id], runs[warm.run_id]
    assert "sft.run_id" not in c.data.tags and c.data.metrics["compute/flops/sft"] > 0
    assert c.data.metrics["compute/flops/lineage"] == c.data.metrics["compute/flops"]  # no ancestor: its own
    assert not (tmp_path / "cold" / "mlruns").exists() and (tmp_path / "cold" / "sft").is_dir()
    # the warm start is the same model: RL from it ends in the same weights, the same scores, the same lineage
    a, b = (load_file(next((tmp_path / d / "final").glob("*.safetensors"))) for d in ("cold", "warm"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in warm.metrics.items() if k.startswith("eval/")} == \
           {k: v for k, v in cold.metrics.items() if k.startswith("eval/")}
    assert w.data.metrics["compute/flops/lineage"] == pytest.approx(c.data.metrics["compute/flops"], rel=1e-9)
    assert w.data.metrics["compute/flops"] < c.data.metrics["compute/flops"]


def test_two_concurrent_workers_train_the_sft_once(tmp_path):
    config = _write(tmp_path, sft_steps=100)
    procs = [_train(config, f"output_dir={tmp_path}/w{i}") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    runs = _runs(tmp_path)
    (sft,), rl = _phase(runs, "sft"), _phase(runs, "rl")
    assert len(rl) == 2 and {r.data.tags["sft.run_id"] for r in rl} == {sft.info.run_id}
    assert sft.info.status == "FINISHED" and sft.data.metrics["compute/flops/sft"] > 0
    assert max(float(r.data.tags["sft.waited_seconds"]) for r in rl) > 1  # one waited for the other's SFT


def _wait_for_sft_metrics(tmp_path: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        sft = _phase(_runs(tmp_path), "sft")
        if sft and sft[0].data.metrics.get("compute/device_seconds", 0) > 0:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    raise AssertionError("the SFT run logged no compute")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_sft_is_billed_as_killed_and_never_reused(tmp_path, sig):
    config = _write(tmp_path, sft_steps=150)
    proc = _train(config, f"output_dir={tmp_path}/killed")
    _wait_for_sft_metrics(tmp_path, proc)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    (torn,) = _phase(_runs(tmp_path), "sft")
    assert torn.info.status == ("RUNNING" if sig == signal.SIGKILL else "KILLED")  # SIGKILL: nobody could say
    # the next run needing the same SFT: the torn one is marked KILLED, billed for what it did, and not reused
    result = run_experiment(load_config(config, [f"output_dir={tmp_path}/next"]), Quiet())
    sfts = {r.info.run_id: r for r in _phase(_runs(tmp_path), "sft")}
    torn = sfts.pop(torn.info.run_id)
    assert torn.info.status == "KILLED" and torn.data.metrics["compute/device_seconds"] > 0
    assert torn.data.metrics["cost/usd"] > 0 and torn.data.metrics["compute/flops/sft"] > 0
    (fresh,) = sfts.values()
    assert fresh.info.status == "FINISHED" and fresh.data.metrics["eval/sft_steps"] == 150
    (rl,) = [r for r in _runs(tmp_path) if r.info.run_id == result.run_id]
    assert rl.data.tags["sft.run_id"] == fresh.info.run_id


def test_another_machine_fetches_the_sft_from_the_runs_artifacts(tmp_path):
    config = _write(tmp_path)
    run_experiment(load_config(config, [f"output_dir={tmp_path}/here"]), Quiet())
    (sft,) = _phase(_runs(tmp_path), "sft")
    # another machine: the same store (its URI), another disk (tracking.root: no warm-start folder there)
    uri = tracking_uri(None, tmp_path / "mlruns")
    there = run_experiment(load_config(config, [f"output_dir={tmp_path}/there", f"tracking.uri='{uri}'",
                                                f"tracking.root='{tmp_path}/other-disk'"]), Quiet())
    fetched = tmp_path / "other-disk" / "warmstarts" / sft.data.tags["sft.key"] / sft.info.run_id / "sft"
    assert (fetched / "eval.json").is_file() and any(fetched.glob("*.safetensors"))
    runs = {r.info.run_id: r for r in _runs(tmp_path)}
    assert runs[there.run_id].data.tags["sft.run_id"] == sft.info.run_id
    assert len(_phase(list(runs.values()), "sft")) == 1


def test_a_claim_left_by_this_process_is_not_waited_for(tmp_path):
    """A claim whose training raised before its run began (or whose end is still spooled) holds this process's pid:
    the next run needing the key marks it KILLED and trains, it never waits for itself."""
    config = _write(tmp_path)
    cfg = load_config(config)
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    exp_id = client.create_experiment("ws")
    left = claim(client, exp_id, sft_key(cfg), "left")
    result = run_experiment(cfg, Quiet())
    sfts = {r.info.run_id: r for r in _phase(_runs(tmp_path), "sft")}
    assert sfts.pop(left).info.status == "KILLED"
    (trained,) = sfts.values()
    assert trained.info.status == "FINISHED" and [r.data.tags["sft.run_id"] for r in _runs(tmp_path)
                                                  if r.info.run_id == result.run_id] == [trained.info.run_id]
