"""sweep.pruner = "scaling": a trial is pruned only when even a line through its recent evals, carried to its full
budget and widened by its noise, stays below the best finished trial."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState, create_trial

from rlscale.experiments.config import load_config
from rlscale.experiments.sweep import Reporter, ScalingPruner, open_study


def _study(direction: str = "maximize", best: float = 0.6) -> optuna.Study:
    study = optuna.create_study(direction=direction)
    study.add_trial(create_trial(value=best, state=TrialState.COMPLETE))
    return study


def _running(values: dict[int, float]):
    return create_trial(state=TrialState.RUNNING, intermediate_values=values)


def test_prunes_a_flat_trial_and_keeps_a_rising_one():
    pruner = ScalingPruner(total_steps=100)
    study = _study()
    assert pruner.prune(study, _running({10: 0.10, 20: 0.12, 30: 0.13, 40: 0.135}))  # ends near 0.2 < 0.6
    assert not pruner.prune(study, _running({10: 0.10, 20: 0.30, 30: 0.45}))  # on its way past 0.6
    assert not pruner.prune(study, _running({10: 0.10, 20: 0.12}))  # too few evals to judge
    assert not pruner.prune(_study(best=0.2), _running({10: 0.10, 20: 0.12, 30: 0.13, 40: 0.135}))  # within noise
    assert not ScalingPruner(100, warmup_steps=50).prune(study, _running({10: 0.1, 20: 0.1, 30: 0.1}))
    assert not pruner.prune(optuna.create_study(), _running({10: 0.1, 20: 0.1, 30: 0.1}))  # nothing finished yet


def test_minimised_metric():
    study = _study("minimize", best=0.2)
    pruner = ScalingPruner(total_steps=100)
    assert pruner.prune(study, _running({10: 0.9, 20: 0.88, 30: 0.87, 40: 0.865}))
    assert not pruner.prune(study, _running({10: 0.9, 20: 0.6, 30: 0.4}))


def test_config_selects_it(tmp_path):
    cfg = load_config(None, ["sweep.pruner=scaling", "sft.steps=10", "grpo.steps=30", "sweep.pruner_warmup_steps=5",
                             "sweep.trials=2"])
    study = open_study(cfg, str(tmp_path / "j.log"), "s")
    assert isinstance(study.pruner, ScalingPruner) and study.pruner.total_steps == 30  # the RL budget


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
