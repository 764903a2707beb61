"""Recipes: runs that differ only in budget, seed, names or eval sizes share a `recipe` tag; any other change is a
new recipe; `tracking.recipe` names one by hand; `rlscale runs list` shows it."""

from __future__ import annotations

from rlscale.experiments.config import load_config, recipe_of


def _recipe(*sets: str) -> str:
    return recipe_of(load_config(None, ["model.size=nano", *sets]))


def test_budget_seed_and_names_do_not_change_the_recipe():
    base = _recipe()
    assert len(base) == 10 and base == _recipe()
    assert base == _recipe("grpo.steps=999", "sft.steps=3", "seed=7", "name=other", "output_dir=x",
                           "eval.problems=17", "eval.samples=2", "grpo.eval_every=5", "tracking.phase=final",
                           "grpo.optim=adamw_torch_fused")
    assert "optim" not in load_config(None, ["model.size=nano"]).model_dump()["grpo"]  # older runs' params unchanged


def test_a_setting_that_changes_the_training_is_a_new_recipe():
    base = _recipe()
    changed = {_recipe("grpo.learning_rate=1e-4"), _recipe("grpo.loss_type=cispo"), _recipe("model.size=mini"),
               _recipe("grpo.importance_sampling_level=sequence"), _recipe("task.digits=3")}
    assert base not in changed and len(changed) == 5


def test_recipe_named_by_hand():
    assert _recipe("tracking.recipe=baseline") == "baseline"
