"""A real pretrained model on this CPU: experiments/smollm2.toml over 3 seeds (run by hand, on a quiet machine).

    python benchmarks/smollm2_seeds.py [--seeds 0 1 2] [--set grpo.steps=40]

experiments/smollm2.toml is sized for that budget: SFT stops at 25% training accuracy (RL gets room), RL trains the
solver only (training the check in RL too, as smollm2_verify.toml does, takes 16 s a step instead of 10), and the
held-out evals sample 2 answers a problem. What self-verification reaches is still measured by both evals: the
yes/no verdict the model learned in SFT (a quarter of its SFT examples), P(yes) read on from each answer's own KV
cache. Each run's `eval_share` is the evaluation's part of its device-seconds (SFT's accuracy checks included);
target <= 25%.
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


class Curve:
    """Keeps the per-step training and eval metrics of one run."""

    KEYS = ("sft/loss", "train/reward_mean", "train/accuracy", "train/verify_reward_mean", "eval/accuracy")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        row = {k: round(v, 4) for k, v in metrics.items() if k in self.KEYS}
        if row:
            self.rows.append({"step": step, "seconds": round(time.perf_counter() - self.t0, 1)} | row)
            print(json.dumps(self.rows[-1]), flush=True)


def plot(result: dict, path: Path) -> None:
    """Held-out accuracy against RL step for each seed: after SFT and at the end on all held-out problems, the
    quick evals in between on the first 64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in result["runs"]:
        evals = [(row["step"] - r["sft_steps"], row["eval/accuracy"]) for row in r["curve"] if "eval/accuracy" in row]
        (line,) = ax.plot(*zip(*evals, strict=True), marker="o", label=f"seed {r['seed']} (+{r['rl_gain_points']:.1f})")
        ax.plot([evals[0][0], evals[-1][0]], [evals[0][1], evals[-1][1]], ls=":", color=line.get_color())
    ax.set(xlabel="GRPO step (0: after SFT)", ylabel="held-out greedy accuracy",
           title="SmolLM2-135M-Instruct, word problems, 2 CPU cores")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def seeds_parser(doc: str, config: str, out: str) -> argparse.ArgumentParser:
    """The options of a benchmark over seeds of one config (this one's and benchmarks/smollm2_verify.py's)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--config", default=config)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--out", default=out)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--plot-only", action="store_true", help="Redraw the plot of --out without training.")
    return ap


def main() -> None:
    args = seeds_parser(__doc__, "experiments/smollm2.toml", "benchmarks/results/smollm2_seeds.json").parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    runs = []
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.overrides, f"seed={seed}", f"output_dir=outputs/bench-smollm2-{seed}"])
        curve = Curve()
        r = run_pipeline(cfg, curve, resume=False)
        wall = time.perf_counter() - curve.t0
        m, n = r.metrics, cfg.eval.samples
        by_phase = {k.split("/")[-1]: round(v, 1) for k, v in m.items() if k.startswith("compute/device_seconds/")}
        runs.append({
            "seed": seed,
            "wall_seconds": round(wall, 1),
            "sft_steps": int(m["eval/sft_steps"]),
            "sft_accuracy": m["eval/sft_accuracy"],
            "rl_accuracy": m["eval/accuracy"],
            "rl_gain_points": round(100 * m["eval/rl_gain"], 2),
            "sft_verify_balanced_accuracy": round(m["eval/sft_verify_balanced_accuracy"], 4),
            "verify_balanced_accuracy": round(m["eval/verify_balanced_accuracy"], 4),
            f"best_of_{n}_accuracy": m[f"eval/best_of_{n}_accuracy"],
            f"pass_at_{n}": round(m[f"eval/pass_at_{n}"], 4),
            "heldout_problems": int(m["eval/problems"]),
            "compute_flops": m["compute/flops"],
            "device_seconds_by_phase": by_phase,
            "eval_share": round(by_phase["eval"] / sum(by_phase.values()), 4),  # SFT's accuracy checks included
            "curve": curve.rows,
        })
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
    scalar = [k for k, v in runs[0].items() if isinstance(v, int | float) and k != "seed"]
    mean = {k: round(statistics.mean(r[k] for r in runs), 4) for k in scalar}
    spread = {k: round(statistics.stdev(r[k] for r in runs), 4) if len(runs) > 1 else 0.0 for k in scalar}
    targets = {
        "rl_gain_at_least_5_points_every_seed": all(r["rl_gain_points"] >= 5 for r in runs),
        "each_run_within_30_minutes": all(r["wall_seconds"] <= 1800 for r in runs),
        "eval_at_most_25_percent_every_seed": all(r["eval_share"] <= 0.25 for r in runs),
    }
    result = {
        "benchmark": "smollm2_seeds", "config": args.config, "overrides": args.overrides,
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "runs": runs, "mean": mean, "stdev": spread, "targets_met": targets,
    }
    print(json.dumps({"mean": mean, "stdev": spread, "targets_met": targets}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
