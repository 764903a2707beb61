"""GRPO throughput on a fixed config: completions per second and seconds per step (run by hand).

    python benchmarks/grpo_throughput.py [--steps 20] [--no-verify]

Writes benchmarks/results/grpo_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import ModelConfig, count_params, load_model
from rlscale.rl.tasks import ArithmeticParams, make_task


class Timer:
    """Callback that records the wall time at each step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.times.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/grpo_throughput.json")
    args = ap.parse_args()

    model, tok = load_model(ModelConfig(size=args.size), seed=0)
    task = make_task(ArithmeticParams(digits=2))
    cfg = GRPOConfig(steps=args.warmup + args.steps, prompts_per_step=8, num_generations=8, max_new_tokens=6,
                     temperature=1.0, learning_rate=1e-4, beta=0.0, self_verify=not args.no_verify)
    meter, timer = Meter(FlopModel.of(model)), Timer()
    train_grpo(model, tok, task, cfg, seed=0, meter=meter, callback=timer)
    t = timer.times[args.warmup - 1 :]
    sec_per_step = (t[-1] - t[0]) / args.steps
    completions = cfg.prompts_per_step * cfg.num_generations
    result = {
        "benchmark": "grpo_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": f"llama-{args.size}",
        "params": count_params(model),
        "config": {"prompts_per_step": 8, "num_generations": 8, "max_new_tokens": 6, "self_verify": cfg.self_verify},
        "steps_timed": args.steps,
        "seconds_per_step": round(sec_per_step, 4),
        "completions_per_second": round(completions / sec_per_step, 1),
        "seconds_by_phase_per_step": {k: round(v / cfg.steps, 4) for k, v in meter.seconds.items()},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
