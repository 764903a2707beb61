"""GRPO steps from a finished SFT, timed by phase (run by hand, on a quiet machine): a config's RL from a model
folder such as benchmarks/smollm2_seeds.py's `outputs/bench-smollm2-0/sft`, its evals cut to a few problems.

    python benchmarks/grpo_time.py MODEL_DIR --label after [--config experiments/smollm2.toml] [--steps 12]

Each result is kept in benchmarks/results/grpo_time.json under its label: run it from two checkouts (code before
and after a change, e.g. `PYTHONPATH=<worktree parent>`) alternately on the same folder. The training losses and
rewards step by step show whether both sides trained alike; the rollout and policy device-seconds what it cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rlscale.experiments.config import load_config
from rlscale.rl.pipeline import run_pipeline

KEYS = ("train/reward_mean", "train/loss", "train/entropy", "train/zero_std_frac")


class Steps:
    """Keeps each RL step's KEYS and the cumulative device-seconds by phase."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if "train/loss" in metrics:
            self.rows.append({k: round(metrics[k], 5) for k in KEYS} | {
                k.removeprefix("compute/"): round(v, 2) for k, v in metrics.items()
                if k.startswith(("compute/device_seconds/", "compute/flops/"))})

    def __getattr__(self, name: str):  # the pipeline's other callbacks: nothing to keep
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--label", required=True, help="Name of this measurement, e.g. before_1 or after_1.")
    ap.add_argument("--config", default="experiments/smollm2.toml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="benchmarks/results/grpo_time.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*args.overrides, f"grpo.steps={args.steps}", "grpo.eval_every=0",
                                        "eval.problems=4", "eval.samples=1", f"output_dir={tmp}"])
        steps, load, t = Steps(), os.getloadavg()[0], time.perf_counter()
        run_pipeline(cfg, steps, resume=False, warm_start=Path(args.model_dir))
        wall = time.perf_counter() - t
    last = steps.rows[-1]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "config": args.config, "overrides": args.overrides,
        "model_dir": args.model_dir, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "load_average_before": round(load, 2), "steps": args.steps, "wall_seconds": round(wall, 1),
        "device_seconds": {p: last[f"device_seconds/{p}"] for p in ("rollout", "policy")},
        "flops": {p: last[f"flops/{p}"] for p in ("rollout", "policy")},
        "by_step": {k: [r[k] for r in steps.rows] for k in KEYS},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "by_step"}, indent=2))
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps(kept | {args.label: result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
