"""What RLScaleCallback costs a TRL GRPO step on SmolLM2-135M-Instruct (by hand, on a quiet machine).

    python benchmarks/trl_callback_overhead.py [--steps 5] [--warmup 2] [--repeats 3]

The README's example trainer (`experiments/trl_grpo.py`: LoRA r16, 2 prompts x 4 completions, up to 48 new tokens,
chat prompts, 2 torch threads) runs without and with the callback (no held-out score: that is work the user asks
for, billed as eval), alternated A B A B, each run its own process. Two measures: the wall time per step after
`--warmup` steps (its difference between the sides is within this machine's drift), and, directly, the seconds
spent inside the callback (its hooks' counting, its per-step events, MLflow writes) as a share of the run's steps.
Writes benchmarks/results/trl_callback_overhead.json. Target: under 2% of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "trl_callback_overhead.json"
TIMED = ("on_step_end", "on_log", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "_count", "_phase",
         "_close_span", "on_train_begin", "on_train_end")


def worker(track: bool, steps: int, warmup: int) -> dict:
    import warnings

    import torch
    from transformers import TrainerCallback

    from rlscale.experiments import trl_callback
    from rlscale.experiments.trl_grpo import build

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    inside = {"seconds": 0.0, "depth": 0}
    for name in TIMED:  # time spent inside the callback's own code (the hooks' work is `_count` and `_phase`)
        original = getattr(trl_callback.RLScaleCallback, name)

        def timed(*a, _f=original, **kw):
            inside["depth"] += 1
            t = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                inside["depth"] -= 1
                if not inside["depth"]:  # the outermost call only
                    inside["seconds"] += time.perf_counter() - t

        setattr(trl_callback.RLScaleCallback, name, timed)

    ends: list[float] = []
    marks: list[float] = []  # seconds inside the callback so far, at each step's end

    class Clock(TrainerCallback):  # added last: runs after RLScaleCallback's on_step_end
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            marks.append(inside["seconds"])

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(steps=warmup + steps, eval_problems=0, output_dir=f"{tmp}/out", root=f"{tmp}/store",
                        track=track, disable_tqdm=True)
        trainer.add_callback(Clock())
        start = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([start, *ends], ends)]
    per_step = [b - a for a, b in zip([0.0, *marks], marks)]
    return {"track": track, "seconds_per_step": statistics.mean(times[warmup:]), "step_seconds": times,
            "inside_seconds_per_step": statistics.mean(per_step[warmup:]),
            "inside_share": sum(per_step[warmup:]) / sum(times[warmup:]),
            "inside_seconds_total": inside["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker is not None:
        print("RESULT " + json.dumps(worker(a.worker == "1", a.steps, a.warmup)), flush=True)
        return
    env = os.environ | {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    pairs = []
    for r in range(a.repeats):
        pair = {}
        for track in (False, True):
            out = subprocess.run([sys.executable, __file__, "--worker", "1" if track else "0", "--steps", str(a.steps),
                                  "--warmup", str(a.warmup)], capture_output=True, text=True, env=env, cwd=ROOT)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(out.stdout[-2000:] + out.stderr[-3000:])
            pair["with" if track else "without"] = json.loads(line[7:])
            print(f"repeat {r} track={track}: {pair['with' if track else 'without']['seconds_per_step']:.3f} s/step",
                  flush=True)
        pair["wall_difference"] = pair["with"]["seconds_per_step"] / pair["without"]["seconds_per_step"] - 1
        pairs.append(pair)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs", "steps": a.steps, "warmup": a.warmup,
        "inside_share_median": statistics.median(p["with"]["inside_share"] for p in pairs),
        "inside_share": [p["with"]["inside_share"] for p in pairs],
        "wall_difference_median": statistics.median(p["wall_difference"] for p in pairs),
        "wall_difference": [p["wall_difference"] for p in pairs],
        "seconds_per_step_without": [p["without"]["seconds_per_step"] for p in pairs],
        "seconds_per_step_with": [p["with"]["seconds_per_step"] for p in pairs], "pairs": pairs,
    }
    result["target_met"] = result["inside_share_median"] < 0.02
    OUT.write_text(json.dumps(result, indent=1))
    print(f"inside the callback: {100 * result['inside_share_median']:.2f}% of the run (median over {a.repeats}); "
          f"wall difference per step: {100 * result['wall_difference_median']:+.1f}% -> {OUT}")


if __name__ == "__main__":
    main()
