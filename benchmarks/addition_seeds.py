"""The RL-core acceptance run: experiments/addition.toml over 3 seeds (run by hand, ~25 minutes on 2 cores).

    python benchmarks/addition_seeds.py [--seeds 0 1 2]

Each seed runs the CLI's pipeline end to end (SFT, eval, GRPO with self-verification, eval on 500 held-out
problems) and is timed; results go to benchmarks/results/addition_seeds.json with the targets checked:
RL gain >= 10 points, self-verification balanced accuracy >= 75%, self-verified best-of-8 > greedy (on the mean, and
balanced accuracy >= 75% and best-of-8 >= greedy on every seed), next to majority vote@8 and the weighted vote.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from rlscale.experiments.config import load_config
from rlscale.rl.pipeline import run_pipeline


class Quiet:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="experiments/addition.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/addition_seeds.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    runs = []
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.overrides, f"seed={seed}", f"output_dir=outputs/bench-seed{seed}"])
        t0 = time.perf_counter()
        r = run_pipeline(cfg, Quiet(), resume=False)
        wall = time.perf_counter() - t0
        m, n = r.metrics, cfg.eval.samples
        runs.append({
            "seed": seed,
            "wall_seconds": round(wall, 1),
            "sft_accuracy": m["eval/sft_accuracy"],
            "rl_accuracy": m["eval/accuracy"],
            "rl_gain_points": round(100 * m["eval/rl_gain"], 2),
            "verify_accuracy": round(m["eval/verify_accuracy"], 4),
            "verify_balanced_accuracy": round(m["eval/verify_balanced_accuracy"], 4),
            "verify_tpr": round(m.get("eval/verify_tpr", float("nan")), 4),  # absent: no correct answers
            "verify_tnr": round(m.get("eval/verify_tnr", float("nan")), 4),  # absent: no wrong answers
            "verify_ece": round(m["eval/verify_ece"], 4),
            f"best_of_{n}_accuracy": m[f"eval/best_of_{n}_accuracy"],
            f"weighted_vote_at_{n}_accuracy": m[f"eval/weighted_vote_at_{n}_accuracy"],
            f"maj_at_{n}_accuracy": m[f"eval/maj_at_{n}_accuracy"],
            f"pass_at_{n}": round(m[f"eval/pass_at_{n}"], 4),
            "heldout_problems": int(m["eval/problems"]),
            "compute_flops": m["compute/flops"],
        })
        print(json.dumps(runs[-1]), flush=True)
    mean = {k: round(statistics.mean(r[k] for r in runs), 4) for k in runs[0] if k != "seed"}
    n = load_config(args.config).eval.samples
    targets = {
        "rl_gain_at_least_10_points": mean["rl_gain_points"] >= 10,
        "verify_balanced_accuracy_at_least_75": mean["verify_balanced_accuracy"] >= 0.75,
        f"best_of_{n}_beats_greedy": mean[f"best_of_{n}_accuracy"] > mean["rl_accuracy"],
        "every_seed_verify_balanced_accuracy_at_least_75": all(r["verify_balanced_accuracy"] >= 0.75 for r in runs),
        f"every_seed_best_of_{n}_at_least_greedy": all(r[f"best_of_{n}_accuracy"] >= r["rl_accuracy"] for r in runs),
        "each_run_under_10_minutes": all(r["wall_seconds"] < 600 for r in runs),
    }
    result = {
        "benchmark": "addition_seeds", "config": args.config, "overrides": args.overrides,
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "runs": runs, "mean": mean, "targets_met": targets,
    }
    print(json.dumps({"mean": mean, "targets_met": targets}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
