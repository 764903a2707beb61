"""Does `rlscale train --nproc 2` learn what one process learns with the same global batch? (run by hand)

    python benchmarks/ddp_vs_single.py [--seeds 0 1 2] [--config experiments/demo.toml]

For each seed, the same config runs once in one process and once under torchrun with 2 ranks (gloo, 1 thread
each; the global batch, learning rate and step budget are the same: each rank samples half of a step's prompts).
Scores, compute and data come back from the MLflow store they were logged to (a temp store). The two are
expected to differ by sampling noise only: the per-seed differences are reported against the seed-to-seed spread.
Writes benchmarks/results/ddp_vs_single.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

METRICS = ("eval/sft_accuracy", "eval/accuracy", "eval/verify_balanced_accuracy", "train/reward_mean",
           "compute/flops", "data/samples", "data/tokens/trained")


def train(config: str, seed: int, nproc: int, root: Path) -> tuple[dict[str, float], float]:
    name = f"ddp{nproc}"
    sets = [f"name={name}", f"seed={seed}", f"output_dir={root / f'{name}-s{seed}'}",
            f"tracking.root={root / 'mlruns'}", "grpo.eval_every=0"]
    cmd = [sys.executable, "-m", "rlscale.experiments.cli", "train", config, "--nproc", str(nproc), "--no-resume",
           *[a for s in sets for a in ("--set", s)]]
    env = os.environ | {"OMP_NUM_THREADS": str(2 // nproc)}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(name).experiment_id], f"params.seed = '{seed}'")[0]
    return {k: run.data.metrics[k] for k in METRICS}, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/demo.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/ddp_vs_single.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for seed in args.seeds:
            for nproc in (1, 2):
                m, wall = train(args.config, seed, nproc, Path(d))
                rows.append({"seed": seed, "nproc": nproc, "wall_seconds": round(wall, 1), **m})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for k in (*METRICS, "wall_seconds"):
        one = [r[k] for r in rows if r["nproc"] == 1]
        two = [r[k] for r in rows if r["nproc"] == 2]
        diffs = [b - a for a, b in zip(one, two)]
        summary[k] = {"single_mean": statistics.mean(one), "ddp2_mean": statistics.mean(two),
                      "mean_diff": statistics.mean(diffs),
                      "seed_sd_single": statistics.stdev(one) if len(one) > 1 else None}
    result = {"benchmark": "ddp_vs_single", "config": args.config, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores; 1 process x 2 threads vs 2 ranks x 1 thread",
              "runs": rows, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, s in summary.items():
        sd = "" if s["seed_sd_single"] is None else f"  (seed sd {s['seed_sd_single']:.4g})"
        print(f"{k:32s} single {s['single_mean']:.4g}  2 ranks {s['ddp2_mean']:.4g}  diff {s['mean_diff']:+.4g}{sd}")


if __name__ == "__main__":
    main()
