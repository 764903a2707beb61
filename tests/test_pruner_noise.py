"""The scaling pruner against the sampling noise of quick evals, measured by simulation: how often it prunes a
trial that is truly 0.05 better than the best finished one (target: at most 5%), and how often it still prunes a
clear loser. The README's pruner paragraph states these rates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from rlscale.experiments.sweep import ScalingPruner

BEST = 0.50  # true final accuracy of the best finished trial
# (RL steps, quick eval every, grpo.eval_problems, eval.problems): the demo's eval sizes over 100 RL steps, and
# benchmarks/pruners.py's sweep (800 RL steps, experiments/recipes.toml's eval sizes)
SETUPS = {"demo": (100, 10, 50, 100), "benchmark": (800, 25, 100, 200)}


def curve(shape: str, end: float, steps: np.ndarray, total: int) -> np.ndarray:
    """True accuracy at each RL step: flat at `end`, or rising 0.2 to `end` and flattening (concave)."""
    if shape == "flat":
        return np.full(len(steps), end)
    rise = (np.exp(-3 * steps / total) - np.exp(-3)) / (1 - np.exp(-3))
    return end - 0.2 * rise


def prune_rate(setup: str, shape: str, end: float, sims: int, seed: int = 0) -> float:
    """Share of simulated trials the pruner stops: each quick eval and the best's final eval are binomial draws
    of their problem counts; the pruner sees the trial's evals one by one, as in a sweep."""
    total, every, quick_n, final_n = SETUPS[setup]
    rng = np.random.default_rng(seed)
    steps = np.arange(every, total, every)  # quick evals stop before the last step (the final eval is there)
    p = curve(shape, end, steps, total)
    pruner = ScalingPruner(total, quick_problems=quick_n, final_problems=final_n)
    pruned = 0
    for _ in range(sims):
        study = optuna.create_study(direction="maximize")
        study.add_trial(create_trial(value=rng.binomial(final_n, BEST) / final_n, state=TrialState.COMPLETE))
        evals = rng.binomial(quick_n, p) / quick_n
        for k in range(1, len(steps) + 1):
            trial = create_trial(state=TrialState.RUNNING,
                                 intermediate_values=dict(zip(steps[:k].tolist(), evals[:k].tolist())))
            if pruner.prune(study, trial):
                pruned += 1
                break
    return pruned / sims


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("setup", ["demo", "benchmark"])
@pytest.mark.parametrize("shape", ["flat", "rising"])
def test_false_prune_rate_of_a_better_trial(setup, shape):
    rate = prune_rate(setup, shape, BEST + 0.05, sims=1000)
    print(f"false-prune rate, {setup} sizes, {shape} curve: {rate:.3f}")
    assert rate <= 0.05


@pytest.mark.parametrize(("setup", "least"), [("demo", 0.4), ("benchmark", 0.9)])
def test_a_clear_loser_is_still_pruned(setup, least):
    rate = prune_rate(setup, "flat", BEST - 0.2, sims=300)
    print(f"prune rate of a trial 0.2 worse, {setup} sizes: {rate:.3f}")
    assert rate >= least


def test_the_pruner_benchmark_never_empties_a_folder_it_did_not_write(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pruners_bench", Path(__file__).parents[1] / "benchmarks/pruners.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mine = tmp_path / "median"
    (mine / "mlruns").mkdir(parents=True)
    (mine / "sweep.toml").write_text("x")
    bench.clear(mine)
    assert mine.is_dir() and not any(mine.iterdir())
    (mine / "notes.txt").write_text("the user's")
    (mine / "mlruns").mkdir()
    with pytest.raises(SystemExit, match="notes.txt"):
        bench.clear(mine)
    assert (mine / "notes.txt").read_text() == "the user's" and (mine / "mlruns").is_dir()
    theirs = tmp_path / "theirs"  # benchmarks/demo_time.py's folder names: a link named like one is never followed
    (theirs / "keep").mkdir(parents=True)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "out").symlink_to(theirs)
    with pytest.raises(SystemExit, match="out"):
        bench.clear(tmp_path / "demo", ("demo.toml", "out", "mlruns", "report"))
    assert (theirs / "keep").is_dir()
