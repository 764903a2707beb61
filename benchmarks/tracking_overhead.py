"""Tracking overhead: the same short GRPO run with and without MLflow tracking, alternated A B A B (by hand).

    python benchmarks/tracking_overhead.py [--steps 40] [--repeats 3]

Writes benchmarks/results/tracking_overhead.json. Target: tracking costs under 2% of step time. The wall-clock
difference between alternated runs is within machine drift here, so the direct measure is the time spent
inside tracking calls (run creation, per-step callback, batched flushes, close) as a share of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.tasks import ArithmeticParams, make_task
from rlscale.tracking.run import TrackedRun, tracking_uri


class Null:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


class Timed:
    """Adds up the seconds spent inside another callback."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        t0 = time.perf_counter()
        self.inner.on_log(step, metrics)
        self.seconds += time.perf_counter() - t0


def one_run(steps: int, tracked: bool, root: Path) -> tuple[float, float]:
    """Seconds per step of `steps` GRPO steps, and the seconds spent in tracking (create, log, flush, close)."""
    model, tok = load_model(ModelConfig(size="tiny"), seed=0)
    task = make_task(ArithmeticParams(digits=2))
    cfg = GRPOConfig(steps=steps, prompts_per_step=8, num_generations=8, max_new_tokens=6)
    meter = Meter(FlopModel.of(model), devices=torch.get_num_threads())
    t0 = time.perf_counter()
    if not tracked:
        train_grpo(model, tok, task, cfg, seed=0, meter=meter, callback=Null())
        return (time.perf_counter() - t0) / steps, 0.0
    client = MlflowClient(tracking_uri(None, root))
    run = TrackedRun(client, "overhead", "bench", {"phase": "rl"}, {"steps": str(steps)}, "cpu_core", root=root)
    timed = Timed(run)
    overhead = time.perf_counter() - t0
    with run:
        train_grpo(model, tok, task, cfg, seed=0, meter=meter, callback=timed)
        t1 = time.perf_counter()
    overhead += timed.seconds + time.perf_counter() - t1
    return (time.perf_counter() - t0) / steps, overhead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/tracking_overhead.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp()) / "mlruns"
    one_run(3, True, root)  # warm-up: creates the store and its tables
    plain, tracked, inside = [], [], []
    for _ in range(args.repeats):
        plain.append(one_run(args.steps, False, root)[0])
        per_step, seconds = one_run(args.steps, True, root)
        tracked.append(per_step)
        inside.append(100 * seconds / (per_step * args.steps))
    overhead = [100 * (t / p - 1) for p, t in zip(plain, tracked)]
    result = {
        "benchmark": "tracking_overhead", "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
        "store": "sqlite (embedded)", "seconds_per_step_untracked": [round(x, 4) for x in plain],
        "seconds_per_step_tracked": [round(x, 4) for x in tracked],
        "overhead_percent": [round(x, 2) for x in overhead],
        "overhead_percent_median": round(statistics.median(overhead), 2),
        "time_inside_tracking_percent": [round(x, 3) for x in inside],
        "time_inside_tracking_percent_median": round(statistics.median(inside), 3),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
