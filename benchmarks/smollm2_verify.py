"""SmolLM2 checks its own homework: experiments/smollm2_verify.toml over seeds, labelled RL against label-free RL
from the same SFT (run by hand, on a quiet machine).

    python benchmarks/smollm2_verify.py [--seeds 0 1 2] [--modes labelled label_free] [--set grpo.steps=30]

Per seed: one SFT (verdict format taught on reference and perturbed answers), then from it (a) labelled RL: the
verifier's reward, the check trained on the step's own answers, balanced (grpo.verify_own); (b) label-free RL: the
reward is the model's own P(yes) on its answer, the training answers never read, same steps and batch. Both are
scored by the program verifier on the same held-out problems: greedy, pass@4, majority vote@4, self-verified
best-of-4, verification-weighted vote@4, and the check as a verifier (TPR, TNR, balanced accuracy, ECE).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from smollm2_seeds import Curve, seeds_parser

from rlscale.experiments.config import load_config
from rlscale.rl.pipeline import run_pipeline

LABEL_FREE = ["grpo.reward=self_verdict", "grpo.self_verify=false", "grpo.verify_own=false", "grpo.verify_sft_coef=0"]
SCORES = ("accuracy", "pass_at_4", "maj_at_4_accuracy", "best_of_4_accuracy", "weighted_vote_at_4_accuracy",
          "verify_tpr", "verify_tnr", "verify_balanced_accuracy", "verify_ece", "verify_auc",
          "sample_accuracy")


class VerifyCurve(Curve):
    KEYS = (*Curve.KEYS, "train/verdict_rate", "train/verify_sft_loss", "train/verify_checked",
            "eval/verify_balanced_accuracy")


def scores(m: dict[str, float], prefix: str = "eval/") -> dict[str, float]:
    return {k: round(m[prefix + k], 4) for k in SCORES if prefix + k in m}


def plot(result: dict, path: Path) -> None:
    """Left: held-out greedy accuracy against RL step, labelled (solid) and label-free (dashed) from the same SFT.
    Right: label-free runs' verdict rate (share of own answers the model calls right) beside their true accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, seed in enumerate(result["seeds"]):
        c = colors[i % len(colors)]
        for mode, ls in (("labelled", "-"), ("label_free", "--")):
            r = seed["runs"].get(mode)
            if r is None:
                continue
            pts = [(row["step"] - seed["sft_steps"], row["eval/accuracy"]) for row in r["curve"]
                   if "eval/accuracy" in row]
            left.plot(*zip(*pts, strict=True), ls=ls, marker="o", color=c,
                      label=f"seed {seed['seed']} {mode.replace('_', '-')} ({r['rl_gain_points']:+.1f})")
            if mode == "label_free":
                rows = [row for row in r["curve"] if "train/verdict_rate" in row]
                steps = [row["step"] - seed["sft_steps"] for row in rows]
                right.plot(steps, [row["train/verdict_rate"] for row in rows], color=c, label=f"seed {seed['seed']}"
                           " verdict rate")
                right.plot(steps, [row["train/accuracy"] for row in rows], color=c, ls=":", label="true accuracy")
    left.set(xlabel="GRPO step (0: the shared SFT)", ylabel="held-out greedy accuracy",
             title="SmolLM2-135M, word problems: labelled vs label-free RL")
    right.set(xlabel="GRPO step", ylabel="share of training answers", ylim=(0, 1),
              title="label-free: own verdict rate vs true accuracy")
    for ax in (left, right):
        ax.legend(frameon=False, fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def run(cfg, **kw) -> tuple[dict, VerifyCurve, float]:
    curve = VerifyCurve()
    r = run_pipeline(cfg, curve, resume=False, **kw)
    return r.metrics, curve, time.perf_counter() - curve.t0


def main() -> None:
    ap = seeds_parser(__doc__, "experiments/smollm2_verify.toml", "benchmarks/results/smollm2_verify.json")
    ap.add_argument("--modes", nargs="+", default=["labelled", "label_free"], choices=["labelled", "label_free"])
    ap.add_argument("--merge", type=Path, help="Seeds already measured (a result JSON or its .partial.json), kept; "
                    "--seeds lists only the seeds to run now (none: just summarise).")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    seeds = []
    if args.merge:
        done = json.loads(args.merge.read_text())
        seeds = done["seeds"] if isinstance(done, dict) else done
    for seed in args.seeds:
        root = f"outputs/bench-smollm2-verify-{seed}"
        cfg = load_config(args.config, [*args.overrides, f"seed={seed}", f"output_dir={root}/sft-run"])
        sft, sft_curve, sft_wall = run(cfg, sft_only=True)
        entry = {"seed": seed, "sft_wall_seconds": round(sft_wall, 1), "sft_steps": int(sft["eval/sft_steps"]),
                 "sft": scores(sft), "sft_compute_flops": sft["compute/flops"], "sft_curve": sft_curve.rows, "runs": {}}
        for mode in args.modes:
            extra = LABEL_FREE if mode == "label_free" else []
            cfg = load_config(args.config, [*args.overrides, *extra, f"seed={seed}", f"output_dir={root}/{mode}"])
            m, curve, wall = run(cfg, warm_start=Path(root) / "sft-run" / "sft")
            entry["runs"][mode] = {
                "rl_wall_seconds": round(wall, 1),
                "run_wall_seconds": round(sft_wall + wall, 1),  # what one run from the base model takes
                "rl_gain_points": round(100 * m["eval/rl_gain"], 2),
                **scores(m),
                "rl_compute_flops": m["compute/flops"],
                "device_seconds_by_phase": {k.split("/")[-1]: round(v, 1) for k, v in m.items()
                                            if k.startswith("compute/device_seconds/")},
                "curve": curve.rows,
            }
            print(json.dumps({"seed": seed, "mode": mode} | {k: v for k, v in entry["runs"][mode].items()
                                                             if k != "curve"}), flush=True)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(seeds + [entry], indent=2) + "\n")
        seeds.append(entry)
    mean = {}
    for mode in args.modes:
        runs = [s["runs"][mode] for s in seeds]
        keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
        mean[mode] = {k: round(statistics.mean(r[k] for r in runs if k in r), 4) for k in keys}
    targets = {}
    if "labelled" in args.modes:
        lab, mm = [s["runs"]["labelled"] for s in seeds], mean["labelled"]
        targets = {
            "verify_balanced_accuracy_at_least_70_every_seed": all(  # both classes present, so it is not one recall
                "verify_tpr" in r and "verify_tnr" in r and r["verify_balanced_accuracy"] >= 0.70 for r in lab),
            "best_of_4_at_least_greedy_plus_3_on_the_mean": mm["best_of_4_accuracy"] >= mm["accuracy"] + 0.03,
            "best_of_4_at_least_majority_vote_on_the_mean": mm["best_of_4_accuracy"] >= mm["maj_at_4_accuracy"],
            "rl_gain_at_least_5_points_every_seed": all(r["rl_gain_points"] >= 5 for r in lab),
            "each_run_within_40_minutes": all(r["run_wall_seconds"] <= 2400 for r in lab),
        }
    result = {
        "benchmark": "smollm2_verify", "config": args.config, "overrides": args.overrides,
        "label_free_overrides": LABEL_FREE, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "seeds": sorted(seeds, key=lambda s: s["seed"]), "mean": mean, "targets_met": targets,
    }
    print(json.dumps({"mean": mean, "targets_met": targets}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
