"""Pruners compared on one sweep (run by hand, on a quiet machine): the same trials (random sampler, same seed) with
no pruner, Optuna's median pruner and rlscale's scaling pruner; compute spent and best score found by each, and
the seed spread of the unpruned sweep's best config (it retrained with two more seeds).

    python benchmarks/pruners.py [--trials 8] [--steps 800] [--out benchmarks/results/pruners.json]

Each sweep writes to its own SQLite store under outputs/bench-pruners/<pruner>/; compute is the sum of
compute/flops over every trial run (finished and pruned), read back from MLflow.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from rlscale.analysis.runs import load_runs
from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.experiments.sweep import run_sweep

BASE = Path("experiments/recipes.toml")  # micro model, two-digit addition, quick evals every 10 RL steps
SWEEP = """
[sweep]
trials = {trials}
metric = "eval/accuracy"
sampler = "random"       # the same trials in every sweep: only the pruner differs
sampler_seed = 0
pruner = "{pruner}"
pruner_startup_trials = 2

[sweep.space."grpo.learning_rate"]
type = "float"
low = 1e-5
high = 3e-3
log = true

[sweep.space."grpo.loss_type"]
type = "categorical"
choices = ["grpo", "dapo", "cispo"]
"""


def config_for(pruner: str, trials: int, steps: int, folder: Path) -> Path:
    """experiments/recipes.toml without its grid, `steps` RL steps, a sweep using `pruner`, recorded in `folder`."""
    text = BASE.read_text().split("[grid.axes]")[0]
    text = text.replace("[grpo]\nsteps = 400", f"[grpo]\nsteps = {steps}")
    text = text.replace('output_dir = "outputs/recipes"', f'output_dir = "{folder}/out"')
    text = text.replace('name = "recipes"', f'name = "pruner-{pruner}"')
    path = folder / "sweep.toml"
    path.write_text(text + f'\n[tracking]\nroot = "{folder}/mlruns"\n' + SWEEP.format(trials=trials, pruner=pruner))
    return path


class Quiet:
    """A training callback that keeps nothing."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


OWN = ("sweep.toml", "out", "mlruns")  # what a sweep of this script writes into its folder (the study is in mlruns/)


def clear(folder: Path, own: tuple[str, ...] = OWN) -> None:
    """Remove an earlier run of a benchmark from `folder`: only what it writes (`own`), and only from a folder that
    holds nothing else (a user's folder given as --root is refused, never emptied; a link is never followed)."""
    if not folder.exists():
        return
    other = sorted(p.name for p in folder.iterdir() if p.name not in own or p.is_symlink())
    if folder.is_symlink() or other:
        sys.exit(f"{folder}: holds {', '.join(other) or 'a link'}, not written by this benchmark; use another --root")
    for name in own:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def sweep(pruner: str, trials: int, steps: int, root: Path, fresh: bool) -> dict:
    """One sweep (resumed where its study already is, unless `fresh`); wall time from the trials' own clocks."""
    folder = root / pruner
    if fresh:
        clear(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_for(pruner, trials, steps, folder)
    study = run_sweep(str(config), [], workers=1)
    wall = (max(t.datetime_complete for t in study.trials)
            - min(t.datetime_start for t in study.trials)).total_seconds()
    runs = load_runs(None, [f"pruner-{pruner}"], root=folder / "mlruns")
    trials_runs = runs[runs["tags.phase"].fillna("") != "sweep"]
    states = [t.state.name for t in study.trials]
    best = study.best_trial
    return {"pruner": pruner, "config": str(config), "wall_seconds": round(wall, 1),
            "compute_flops": float(trials_runs["compute/flops"].sum()),
            "device_seconds": float(trials_runs["compute/device_seconds"].sum()),
            "trials": len(states), "pruned": states.count("PRUNED"), "complete": states.count("COMPLETE"),
            "best_value": best.value, "best_params": best.params,
            "trial_values": [t.value for t in study.trials], "trial_states": states,
            "trial_params": [t.params for t in study.trials]}


def seed_spread(result: dict, seeds: list[int]) -> dict:
    """The unpruned sweep's best config retrained with more seeds: its final scores and their spread."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in result["best_params"].items()]
    scores = [result["best_value"]]
    for seed in seeds:
        cfg = load_config(result["config"], overrides + [f"seed={seed}", "tracking.phase=seeds"])
        scores.append(run_experiment(cfg, Quiet()).metrics["eval/accuracy"])
    return {"seeds": [0, *seeds], "scores": scores, "spread": max(scores) - min(scores),
            "stdev": statistics.stdev(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=800, help="RL steps a trial (RL then outweighs SFT)")
    parser.add_argument("--root", default="outputs/bench-pruners")
    parser.add_argument("--out", default="benchmarks/results/pruners.json")
    parser.add_argument("--resume", action="store_true", help="keep finished sweeps under --root (default: start over)")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    results = {p: sweep(p, args.trials, args.steps, root, not args.resume) for p in ("none", "median", "scaling")}
    spread = seed_spread(results["none"], [1, 2])
    base = results["none"]
    for r in results.values():
        r["compute_saved_pct"] = round(100 * (1 - r["compute_flops"] / base["compute_flops"]), 1)
        r["device_seconds_saved_pct"] = round(100 * (1 - r["device_seconds"] / base["device_seconds"]), 1)
        r["best_within_seed_spread"] = r["best_value"] >= base["best_value"] - spread["spread"]
    out = {"benchmark": "pruners", "base_config": str(BASE), "trials": args.trials, "rl_steps": args.steps,
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "sweeps": results, "unpruned_best_seed_spread": spread,
           "scaling_target_met": {  # >= 30% saved with the best within the seed spread, by each measure
               m: results["scaling"][f"{m}_saved_pct"] >= 30 and results["scaling"]["best_within_seed_spread"]
               for m in ("compute", "device_seconds")}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in results.values():
        print(f"{r['pruner']:>8}: {r['compute_flops']:.3g} FLOPs ({r['compute_saved_pct']:+.1f}% saved), "
              f"{r['device_seconds']:.0f} device-s ({r['device_seconds_saved_pct']:+.1f}% saved), "
              f"{r['pruned']}/{r['trials']} pruned, best {r['best_value']:.3f}, {r['wall_seconds']:.0f} s")
    print(f"seed spread of the unpruned best: {spread['scores']} -> {spread['spread']:.3f}")


if __name__ == "__main__":
    main()
