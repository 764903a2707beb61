"""Where a GRPO step's time goes (run by hand): torch.profiler over the vs-TRL batch, by phase and by operator.

    python benchmarks/profile_grpo.py [--steps 10] [--prompts 8] [--verify]

The batch of benchmarks/vs_trl.py (8 prompts x 8 generations, at most 6 new tokens, beta 0, mu 1) on a tiny Llama.
Writes benchmarks/results/profile_grpo.json: seconds per step by trainer phase (the Meter's own timers) and the
operators with the most self CPU time; the Chrome trace goes to outputs/profile_grpo.json (open in Perfetto).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.tasks import ArithmeticParams, make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--verify", action="store_true", help="with self-verification")
    ap.add_argument("--out", default="benchmarks/results/profile_grpo.json")
    args = ap.parse_args()

    model, tok = load_model(ModelConfig(size="tiny"), seed=0)
    task = make_task(ArithmeticParams(digits=2))
    warmup = 2
    cfg = GRPOConfig(steps=warmup + args.steps, prompts_per_step=args.prompts, num_generations=8, max_new_tokens=6,
                     temperature=1.0, learning_rate=1e-4, beta=0.0, num_iterations=1, self_verify=args.verify)
    # phases from an unprofiled run (the profiler slows every op), operators from a profiled one
    meter = Meter(FlopModel.of(model))

    class Clock:
        start: dict[str, float] = {}
        t0 = 0.0

        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            if step == warmup:  # phase timers and the wall clock start after the warm-up
                Clock.start, Clock.t0 = dict(meter.seconds), time.perf_counter()

    train_grpo(model, tok, task, cfg, seed=0, meter=meter, callback=Clock())
    wall = (time.perf_counter() - Clock.t0) / args.steps
    phases = {p: round((meter.seconds[p] - Clock.start.get(p, 0.0)) / args.steps, 5) for p in meter.seconds}
    phases["other (rewards, optimizer step, bookkeeping)"] = round(wall - sum(phases.values()), 5)

    model, tok = load_model(ModelConfig(size="tiny"), seed=0)
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=warmup, active=args.steps,
                                                                     repeat=1)) as prof:

        class Step:
            def on_log(self, step: int, metrics: dict[str, float]) -> None:
                prof.step()

        train_grpo(model, tok, task, cfg, seed=0, meter=Meter(FlopModel.of(model)), callback=Step())
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    top = [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 4), "calls_per_step":
            round(e.count / args.steps, 1)} for e in ops[:15]]
    Path("outputs").mkdir(exist_ok=True)
    prof.export_chrome_trace("outputs/profile_grpo.json")
    result = {
        "benchmark": "profile_grpo", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "batch": f"{args.prompts} prompts x 8 generations, 6 new tokens, self_verify={args.verify}",
        "seconds_per_step": round(wall, 4), "seconds_per_step_by_phase": phases, "top_ops_by_self_cpu": top,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{wall:.3f} s/step")
    for p, s in phases.items():
        print(f"  {p:48s} {s:.4f} s ({s / wall:.0%})")
    for t in top:
        print(f"  {t['op']:48s} {t['self_cpu_share']:.1%}  {t['calls_per_step']} calls/step")


if __name__ == "__main__":
    main()
