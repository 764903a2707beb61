"""Recipe fits on a synthetic store whose recipes follow known sigmoids (noise, 3 seeds each): the fitted
asymptote A within 0.02, the ranking right, intervals from runs, scores kept in [0, 1]."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from rlscale.analysis.recipes import compare_recipes, run_curves, sigmoid
from rlscale.analysis.runs import load_runs
from rlscale.tracking.run import tracking_uri

# recipe -> (R0, A, B, C_mid): the truth each recipe's runs follow; runs span 5 decades, so that the 10x held-out
# check (the fit made below 1/10 of the largest run) has the curve's bend to fit
TRUTH = {"cispo": (0.05, 0.80, 1.2, 3e15), "dapo": (0.05, 0.72, 1.0, 2e15), "grpo": (0.05, 0.60, 1.5, 1e15)}


def _score(p, c):
    R0, A, B, C_mid = p
    return R0 + (A - R0) / (1 + (C_mid / c) ** B)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes") / "mlruns"
    uri = tracking_uri(None, root)
    client = MlflowClient(uri)
    exp = client.create_experiment("recipes")
    rng = np.random.default_rng(0)
    now = int(time.time() * 1000)
    for recipe, p in TRUTH.items():
        for seed in range(3):
            run = client.create_run(exp, run_name=f"{recipe}-s{seed}", tags={"recipe": recipe, "phase": "rl"})
            flops = np.geomspace(1e12, 1e17, 21) * rng.uniform(0.9, 1.1)
            metrics = []
            for step, c in enumerate(flops, 1):
                score = float(np.clip(_score(p, c) + rng.normal(0, 0.006), 0, 1))
                metrics += [Metric("eval/accuracy", score, now, step), Metric("compute/flops", float(c), now, step),
                            Metric("data/samples/solve", float(step * 64), now, step),
                            Metric("compute/gpu_hours", float(c / 1e15), now, step)]
            client.log_batch(run.info.run_id, metrics=metrics)
            client.set_terminated(run.info.run_id, "FINISHED")
    return uri, root


def test_recipe_fits_recover_the_asymptotes_and_ranking(store):
    uri, root = store
    curves = run_curves(load_runs(uri, ["recipes"], root=root), uri, root)
    assert len(curves) == 9 * 21 and set(curves["recipe"]) == set(TRUTH)
    result = compare_recipes(curves, n_boot=40)
    assert result["ranking"] == ["cispo", "dapo", "grpo"] and not result["skipped"]
    for f in result["recipes"]:
        assert f["params"]["A"] == pytest.approx(TRUTH[f["recipe"]][1], abs=0.02), f
        lo, hi = f["ci"]["A"]
        assert 0.0 <= lo <= f["params"]["A"] <= hi <= 1.0 and f["n_runs"] == 3
        assert f["dropped_points"] > 0 and f["warmup_fraction"] == 0.1
        assert 0 <= f["forecast_band"][0] <= f["forecast"] <= f["forecast_band"][1] <= 1
        assert "params" in f["samples"]
        assert f["forecast_ok"] and f["heldout"]["mae"] < 0.05 and f["heldout"]["n_test"] > 0
    assert "cispo (" in result["statement"] and "asymptote A =" in result["statement"]


def test_a_recipe_whose_curve_breaks_late_gets_no_forecast(store):
    """A held-out check that fails withholds the forecast: the report says why instead of extrapolating."""
    uri, root = store
    curves = run_curves(load_runs(uri, ["recipes"], root=root), uri, root)
    late = (curves["recipe"] == "cispo") & (curves["flops"] > 0.6 * curves["flops"].max())
    curves.loc[late, "score"] -= 0.3  # collapses past the middle of its budget: no sigmoid from the early part
    result = compare_recipes(curves, n_boot=20)
    by = {f["recipe"]: f for f in result["recipes"]}
    assert not by["cispo"]["forecast_ok"] and by["cispo"]["heldout"]["mae"] > 0.05
    assert by["dapo"]["forecast_ok"] and result["ranking"][-1] == "cispo"
    assert "cispo: fitted A =" in result["statement"] and "no 10x forecast: held-out error" in result["statement"]
    assert "cispo (" not in result["statement"]  # no number stated for it at the 10x budget


def test_report_has_the_recipe_fits_table_and_plot(store, tmp_path):
    """`rlscale report` on the store: fits.json key `recipes` (one entry per recipe with the fields tools read), the
    recipe table and ranking in report.md, one recipes plot; the pooled fit says it mixes recipes."""
    import json

    from rlscale.analysis.report import build_report

    uri, root = store
    result = build_report(uri, ["recipes"], None, None, tmp_path / "rep", root=root, log_to_mlflow=False)
    fits = json.loads(result.fits_json.read_text())
    assert [f["recipe"] for f in fits["recipes"]] == ["cispo", "dapo", "grpo"]
    for f in fits["recipes"]:
        assert {"recipe", "n_runs", "params", "ci", "warmup_fraction", "r2"} <= set(f)
        assert set(f["params"]) == {"R0", "A", "B", "C_mid"} and f["n_runs"] == 3
    assert fits["recipe_comparison"]["ranking"] == ["cispo", "dapo", "grpo"]
    text = result.markdown.read_text()
    assert "## Which recipe scales" in text and "| cispo | cispo | 3 |" in text and "![" in text
    assert "Does RL keep paying?" in text and "plots/recipes.png" in text
    assert result.plots["recipes"].read_bytes()[:4] == b"\x89PNG"
    assert fits["pooled"]["recipes"] == ["cispo", "dapo", "grpo"]


def test_recipe_labels_name_what_sets_each_recipe_apart():
    import pandas as pd

    from rlscale.analysis.recipes import recipe_labels

    runs = pd.DataFrame({
        "tags.recipe": ["a1", "a1", "b2", "b2", "c3"],
        "params.grpo.loss_type": ["cispo", "cispo", "dapo", "dapo", "dapo"],
        "params.model.size": ["nano", "nano", "nano", "nano", "micro"],
        "params.grpo.steps": ["20", "60", "20", "60", "20"],  # a budget: varies inside a recipe
        "params.seed": ["0", "1", "0", "1", "0"], "params.name": ["x", "x", "x", "x", "y"],
        "params.tracking.phase": ["rl", "rl", "rl", "rl", "final"],
        "params.grpo.beta": ["0.04"] * 5,  # the same everywhere: sets nothing apart
    })
    assert recipe_labels(runs) == {"a1": "grpo.loss_type=cispo, model.size=nano",
                                   "b2": "grpo.loss_type=dapo, model.size=nano",
                                   "c3": "grpo.loss_type=dapo, model.size=micro"}


def test_the_sigmoid_at_a_steep_trial_point_is_its_floor_without_a_warning():
    """A fit trying a steep B far below C_mid overflows (C_mid / C)^B: R is then R0, and the report prints nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = sigmoid((0.1, 0.9, 500.0, 1e6), [1.0, 1e6, 1e9])
    assert r.tolist() == pytest.approx([0.1, 0.5, 0.9])
