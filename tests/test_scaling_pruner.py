"""sweep.pruner = "scaling": a trial is pruned only when even a line through its recent evals, carried to its full
budget and widened by its noise, stays below the best finished trial."""

from __future__ import annotations

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from rlscale.experiments.config import load_config
from rlscale.experiments.sweep import Reporter, ScalingPruner, open_study


def _study(direction: str = "maximize", best: float = 0.6) -> optuna.Study:
    study = optuna.create_study(direction=direction)
    study.add_trial(create_trial(value=best, state=TrialState.COMPLETE))
    return study


def _running(values: dict[int, float], params: dict | None = None):
    dists = {k: IntDistribution(1, 10_000) for k in params or {}}
    return create_trial(state=TrialState.RUNNING, intermediate_values=values, params=params, distributions=dists)


def _pruner(total_steps: int = 100, **kw) -> ScalingPruner:
    return ScalingPruner(total_steps, quick_problems=200, final_problems=500, **kw)  # the config's default sizes


def test_prunes_a_flat_trial_and_keeps_a_rising_one():
    pruner = _pruner()
    study = _study()
    assert pruner.prune(study, _running({10: 0.10, 20: 0.12, 30: 0.13, 40: 0.135}))  # ends near 0.2 < 0.6
    assert not pruner.prune(study, _running({10: 0.10, 20: 0.30, 30: 0.45}))  # on its way past 0.6
    assert not pruner.prune(study, _running({10: 0.10, 20: 0.12}))  # too few evals to judge
    assert not pruner.prune(_study(best=0.2), _running({10: 0.10, 20: 0.12, 30: 0.13, 40: 0.135}))  # within noise
    assert not _pruner(warmup_steps=50).prune(study, _running({10: 0.1, 20: 0.1, 30: 0.1}))
    assert not pruner.prune(optuna.create_study(), _running({10: 0.1, 20: 0.1, 30: 0.1}))  # nothing finished yet


def test_minimised_metric():
    study = _study("minimize", best=0.2)
    pruner = _pruner()
    assert pruner.prune(study, _running({10: 0.9, 20: 0.88, 30: 0.87, 40: 0.865}))
    assert not pruner.prune(study, _running({10: 0.9, 20: 0.6, 30: 0.4}))


def test_config_selects_it(tmp_path):
    cfg = load_config(None, ["sweep.pruner=scaling", "sft.steps=10", "grpo.steps=30", "sweep.pruner_warmup_steps=5",
                             "sweep.trials=2"])
    study = open_study(cfg, str(tmp_path / "j.log"), "s")
    assert isinstance(study.pruner, ScalingPruner) and study.pruner.total_steps == 30  # the RL budget
    assert (study.pruner.quick_problems, study.pruner.final_problems) == (cfg.grpo.eval_problems, cfg.eval.problems)
    assert study.pruner.startup_trials == cfg.sweep.pruner_startup_trials


def test_waits_for_the_startup_trials(tmp_path):
    """sweep.pruner_startup_trials finished trials before any pruning, as the median pruner does."""
    cfg = load_config(None, ["sweep.pruner=scaling", "grpo.steps=100", "sweep.pruner_startup_trials=5"])
    study = open_study(cfg, str(tmp_path / "j.log"), "s")
    flat = {10: 0.10, 20: 0.12, 30: 0.13, 40: 0.135}  # pruned once enough trials are done (above)
    for n in range(1, 6):
        study.add_trial(create_trial(value=0.6, state=TrialState.COMPLETE))
        assert study.pruner.prune(study, _running(flat)) == (n == 5), n


def test_budget_is_the_trials_own_grpo_steps():
    """With grpo.steps searched, a trial is carried to the budget it drew, not the base config's."""
    pruner = _pruner(total_steps=30)  # the base config's grpo.steps
    study = _study(best=0.6)
    rising = {10: 0.10, 20: 0.15, 30: 0.20, 40: 0.25}  # +0.005 a step: 0.25 at 40, past 0.6 by step 120
    assert pruner.prune(study, _running(rising))  # judged at 30 steps it cannot get there
    assert not pruner.prune(study, _running(rising, {"grpo.steps": 300}))  # it drew 300 steps
    assert pruner.prune(study, _running(rising, {"grpo.steps": 50}))


def test_trials_report_at_their_rl_step():
    """Intermediate values are keyed by RL step, so trials whose SFT stopped at different steps line up and the
    scaling pruner's budget is grpo.steps."""
    study = optuna.create_study()
    trial = study.ask()
    reporter = Reporter(trial, "eval/accuracy")
    reporter.on_log(412, {"eval/accuracy": 0.3, "train/rl_step": 25.0})
    reporter.on_log(437, {"eval/accuracy": 0.4, "train/rl_step": 50.0})
    reporter.on_log(487, {"eval/accuracy": 0.5})  # the final eval: not an intermediate value
    assert study.trials[0].intermediate_values == {25: 0.3, 50: 0.4}
