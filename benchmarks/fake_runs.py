"""Fill an MLflow store with fake training runs of the run schema, fast (nothing is trained).

    python benchmarks/fake_runs.py STORE [--runs 1000] [--seed 0]

STORE is a SQLite file (created, WAL journal) or a tracking URI. Runs spread over a few experiments: compute from
1e12 to 1e17 FLOPs, eval/accuracy on a saturating curve with noise, cost from device-seconds at the H100 price;
mostly finished, some failed (no eval), killed or pruned, one sweep parent with its trials, one run phase=final.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

EXPERIMENTS = ("scaling-nano", "scaling-tiny", "scaling-small", "lr-sweep")
SIZES = {"nano": 2e5, "tiny": 1.1e6, "small": 6.3e6}
USD_PER_GPU_HOUR = 2.5
FLOPS_PER_SECOND = 4e14  # effective H100 throughput of these tiny models
T0 = 1_750_000_000_000  # ms


def store_uri(store: str | Path) -> str:
    """A tracking URI for `store`: a URI as given, else a SQLite file (tables created, WAL journal)."""
    if "://" in str(store):
        return str(store)
    path = Path(store).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{path}"
    MlflowClient(uri).search_experiments()  # creates MLflow's tables
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")  # persistent: every later commit appends to the log
    return uri


def _no_sync(connection, _record) -> None:
    """Fake data need no crash safety: SQLite commits without waiting for the disk."""
    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA synchronous=OFF")


def write_fake_runs(store: str | Path, n: int = 1000, seed: int = 0) -> dict[str, int]:
    """Write `n` runs (one of them the sweep parent, one phase=final) into `store`; returns the count of each fate."""
    event.listen(Engine, "connect", _no_sync)
    try:
        return _write(MlflowClient(store_uri(store)), n, np.random.default_rng(seed))
    finally:
        event.remove(Engine, "connect", _no_sync)


def _write(client: MlflowClient, n: int, rng: np.random.Generator) -> dict[str, int]:
    ids = {}
    for name in EXPERIMENTS:
        exp = client.get_experiment_by_name(name)
        ids[name] = exp.experiment_id if exp else client.create_experiment(name)
    parent = client.create_run(ids["lr-sweep"], start_time=T0, tags={"phase": "sweep", "project": "lr-sweep"},
                               run_name="lr-sweep").info.run_id
    client.set_terminated(parent, "FINISHED", end_time=T0 + n * 60_000)
    fates = {"finished": 1, "failed": 0, "killed": 0, "pruned": 0}
    final = n - 2  # the last run written: the largest compute
    for i in range(n - 1):
        exp = EXPERIMENTS[i % len(EXPERIMENTS)]
        size = rng.choice(list(SIZES))
        flops = 1e17 if i == final else 10 ** rng.uniform(12, 16.7)
        fate = "finished" if i == final else rng.choice(list(fates), p=[0.85, 0.06, 0.04, 0.05])
        done = 1.0 if fate == "finished" else rng.uniform(0.1, 0.9)  # share of the run's compute spent
        flops *= done
        seconds = flops / FLOPS_PER_SECOND
        phase = "final" if i == final else "sweep-trial" if exp == "lr-sweep" else rng.choice(["rl", "rl", "ablation"])
        tags = {"phase": phase, "project": exp, "task": "arithmetic", "model.name": f"llama-{size}",
                "model.params": str(int(SIZES[size])), "device.type": "cuda", "device.count": "1",
                "device.price_key": "h100", "seed": str(i % 5)}
        if exp == "lr-sweep":
            tags["mlflow.parentRunId"] = parent
        if fate == "pruned":
            tags["pruned"] = "true"
        if fate == "failed":
            tags |= {"error.class": "RuntimeError", "error.message": "CUDA error: an illegal memory access"}
        start = T0 + i * 60_000
        metrics = {"compute/flops": flops, "compute/device_seconds": seconds, "compute/gpu_hours": seconds / 3600,
                   "cost/usd": seconds / 3600 * USD_PER_GPU_HOUR, "data/samples": flops / (6 * SIZES[size] * 40),
                   "data/tokens/generated": flops / (6 * SIZES[size] * 4), "heartbeat": start / 1000 + seconds}
        if fate == "finished":
            accuracy = 0.9 - 0.85 * (flops / 1e12) ** -0.25 + rng.normal(0, 0.02)
            metrics["eval/accuracy"] = float(np.clip(accuracy, 0.0, 1.0))
        params = {"model.size": str(size), "grpo.steps": str(int(flops / 1e11) + 1),
                  "grpo.learning_rate": f"{10 ** rng.uniform(-5, -3):.2g}", "task.digits": "3", "seed": str(i % 5)}
        run_id = client.create_run(ids[exp], start_time=start, tags=tags, run_name=f"{exp}-{i}").info.run_id
        client.log_batch(run_id, metrics=[Metric(k, float(v), start + 1000, 100) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in params.items()])
        status = {"finished": "FINISHED", "failed": "FAILED"}.get(fate, "KILLED")
        client.set_terminated(run_id, status, end_time=start + max(1000, int(seconds * 1000)))
        fates[fate] += 1
    return fates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="SQLite file or tracking URI")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    fates = write_fake_runs(args.store, args.runs, args.seed)
    print(f"{args.runs} runs {fates} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
