"""Fill an MLflow store with fake training runs of the run schema, fast (nothing is trained).

    python benchmarks/fake_runs.py STORE [--runs 1000] [--seed 0] [--recipes 4]

STORE is a SQLite file (created, WAL journal) or a tracking URI. By default runs spread over a few experiments:
compute from 1e12 to 1e17 FLOPs, eval/accuracy on a saturating curve with noise, cost from device-seconds at the
H100 price; mostly finished, some failed (no eval), killed or pruned, one sweep parent with its trials, one run
phase=final; each metric has one value.

With --recipes R, every run is a finished recipe run of the experiment "recipes", like those `rlscale grid` writes:
a `recipe` tag (R recipes, one GRPO loss type each), a GRPO budget of 100 to 1,600 steps, and EVALS evals during RL
logged as metric history (step = SFT steps + RL step) with the cumulative compute, cost, samples and eval problems
at each; each recipe's score follows ScaleRL's sigmoid in RL compute with run-level and binomial noise. The last
run written is phase=final. Each run is one create_run, one log_batch and one set_terminated.
"""

from __future__ import annotations

import argparse
import hashlib
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
# Recipe runs: GRPO loss type -> ScaleRL sigmoid (R0, A, B, C_mid in RL FLOPs) its eval score follows
LOSS_TYPES = {"grpo": (0.25, 0.62, 1.6, 8e13), "dapo": (0.25, 0.66, 1.9, 6e13), "cispo": (0.25, 0.55, 2.3, 5e13),
              "gspo": (0.25, 0.6, 1.4, 1.2e14), "dr_grpo": (0.25, 0.64, 1.7, 7e13), "bnpo": (0.25, 0.58, 2.0, 9e13)}
BUDGETS = (100, 200, 400, 800, 1600)  # GRPO steps
EVALS = 10  # evals a run logs during RL, the last one on the full eval set
SFT_STEPS, SFT_FLOPS = 400, 4e12
RL_FLOPS_PER_STEP = 2e11
EVAL_FLOPS_PER_PROBLEM = 2e8
QUICK_PROBLEMS, FULL_PROBLEMS = 50, 100  # grpo.eval_problems, eval.problems
SAMPLES_PER_STEP = 64


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


def write_fake_runs(store: str | Path, n: int = 1000, seed: int = 0, recipes: int = 0) -> dict[str, int]:
    """Write `n` runs into `store`; returns the count of each fate. Without `recipes`, runs of every fate over a few
    experiments (one of them the sweep parent, one phase=final); with `recipes` (1 to len(LOSS_TYPES)), finished
    recipe runs with an eval history of EVALS points each."""
    if not 0 <= recipes <= len(LOSS_TYPES):
        raise ValueError(f"recipes must be 0 to {len(LOSS_TYPES)}, got {recipes}")
    event.listen(Engine, "connect", _no_sync)
    try:
        client, rng = MlflowClient(store_uri(store)), np.random.default_rng(seed)
        return _write_recipes(client, n, rng, recipes) if recipes else _write(client, n, rng)
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


def _write_recipes(client: MlflowClient, n: int, rng: np.random.Generator, recipes: int) -> dict[str, int]:
    exp = client.get_experiment_by_name("recipes")
    exp_id = exp.experiment_id if exp else client.create_experiment("recipes")
    loss_types = list(LOSS_TYPES)[:recipes]
    for i in range(n):
        loss = loss_types[i % recipes]
        R0, A, B, C_mid = LOSS_TYPES[loss]
        budget = BUDGETS[(i // recipes) % len(BUDGETS)]
        seed = i // (recipes * len(BUDGETS))
        per_step = RL_FLOPS_PER_STEP * rng.uniform(0.9, 1.1)  # completions of varying length
        shift = rng.normal(0, 0.02)  # the seed's own level
        start = T0 + i * 60_000
        tags = {"phase": "final" if i == n - 1 else "rl", "project": "recipes",
                "recipe": hashlib.sha1(loss.encode()).hexdigest()[:10], "task": "arithmetic",
                "model.name": "llama-micro", "model.params": "600000", "device.type": "cuda", "device.count": "1",
                "device.price_key": "h100", "seed": str(seed)}
        params = {"grpo.loss_type": loss, "grpo.steps": str(budget), "grpo.learning_rate": "0.0001",
                  "grpo.eval_every": str(budget // EVALS), "grpo.eval_problems": str(QUICK_PROBLEMS),
                  "eval.problems": str(FULL_PROBLEMS), "sft.steps": str(SFT_STEPS), "model.size": "micro",
                  "task.digits": "2", "seed": str(seed)}
        metrics, eval_flops = [], 0.0
        for k in range(1, EVALS + 1):
            rl_step = budget * k // EVALS
            problems = FULL_PROBLEMS if k == EVALS else QUICK_PROBLEMS
            rl = rl_step * per_step
            eval_flops += problems * EVAL_FLOPS_PER_PROBLEM
            flops = SFT_FLOPS + rl + eval_flops
            seconds = flops / FLOPS_PER_SECOND
            p = float(np.clip(R0 + (A - R0) / (1 + (C_mid / rl) ** B) + shift, 0.0, 1.0))
            samples = rl_step * SAMPLES_PER_STEP
            values = {"eval/accuracy": rng.binomial(problems, p) / problems, "eval/problems": problems,
                      "compute/flops": flops, "compute/flops/sft": SFT_FLOPS, "compute/flops/eval": eval_flops,
                      "compute/device_seconds": seconds, "compute/gpu_hours": seconds / 3600,
                      "cost/usd": seconds / 3600 * USD_PER_GPU_HOUR, "data/samples/solve": samples,
                      "data/samples": samples, "data/tokens/generated": samples * 4}
            at = start + 1000 * k
            metrics += [Metric(key, float(v), at, SFT_STEPS + rl_step) for key, v in values.items()]
        run_id = client.create_run(exp_id, start_time=start, tags=tags, run_name=f"{loss}-{budget}-s{seed}").info.run_id
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run_id, "FINISHED", end_time=start + 1000 * (EVALS + 1))
    return {"finished": n, "failed": 0, "killed": 0, "pruned": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="SQLite file or tracking URI")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", type=int, default=0, help=f"recipe runs of this many recipes (1-{len(LOSS_TYPES)}) "
                    f"with {EVALS} evals each (default 0: runs of every fate, one value a metric)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    fates = write_fake_runs(args.store, args.runs, args.seed, args.recipes)
    print(f"{args.runs} runs {fates} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
