"""Scaling-law fits: parameter recovery, Chinchilla reproduction, prediction, extrapolation, input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlscale.analysis.fits import FORMS, compare_forms, extrapolation, fit, fit_csv

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLOPS = np.geomspace(1e12, 1e20, 40)
# form -> (true parameters, noise-free curve); noise is added in `synthetic`.
TRUE = {
    "power": ({"a": 2e-3, "b": 0.5}, lambda x, p: p["a"] * x ** p["b"]),
    "saturating": ({"E": 0.8, "A": 9.5, "alpha": 0.1}, lambda x, p: p["E"] - p["A"] * x ** -p["alpha"]),
    "loss": ({"E": 1.7, "A": 400.0, "alpha": 0.15}, lambda x, p: p["E"] + p["A"] * x ** -p["alpha"]),
    "sigmoid": (
        {"R0": 0.2, "A": 0.7, "B": 0.8, "C_mid": 1e16},
        lambda x, p: p["R0"] + (p["A"] - p["R0"]) / (1 + (p["C_mid"] / x) ** p["B"]),
    ),
}
NOISE = {"power": 0.05, "saturating": 0.005, "loss": 0.02, "sigmoid": 0.01}


def synthetic(form: str, x: np.ndarray = FLOPS, seed: int = 1) -> np.ndarray:
    """The true curve at x plus noise: multiplicative for power, additive otherwise."""
    params, curve = TRUE[form]
    noise = np.random.default_rng(seed).normal(0, NOISE[form], len(x))
    return curve(x, params) * np.exp(noise) if form == "power" else curve(x, params) + noise


def chinchilla_loss(N: np.ndarray, D: np.ndarray, p: dict[str, float]) -> np.ndarray:
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def assert_recovered(result, true: dict[str, float]) -> None:
    assert list(result.params) == list(true)
    for name, value in true.items():
        low, high = result.ci[name]
        assert low <= value <= high, (name, value, result.ci[name])
        assert (high - low) / abs(value) < 0.5, (name, result.ci[name])


@pytest.mark.parametrize("form", list(TRUE))
def test_recovers_known_parameters(form):
    result = fit(FLOPS, synthetic(form), form, n_boot=200, seed=0)
    assert_recovered(result, TRUE[form][0])
    assert result.n == len(FLOPS) and result.r2 > 0.95


def test_recovers_known_chinchilla_parameters():
    true = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37}
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e11, 10), np.geomspace(1e9, 1e13, 10)))
    L = chinchilla_loss(N, D, true) * np.exp(np.random.default_rng(0).normal(0, 0.003, N.size))
    result = fit(N, L, "chinchilla", x2=D, n_boot=100, seed=0)
    assert_recovered(result, true)


def test_reproduces_epoch_chinchilla_fit():
    path = DATA / "chinchilla_epoch_2024.csv"
    if not path.exists():
        pytest.skip(f"reference data missing: {path}")
    frame = pd.read_csv(path).nsmallest(240, "loss")  # Epoch drop the 5 highest-loss points
    N = frame["Model Size"].to_numpy()
    D = frame["Training FLOP"].to_numpy() / (6 * N)
    result = fit(N, frame["loss"].to_numpy(), "chinchilla", x2=D, n_boot=0)
    epoch = {"E": 1.817, "A": 478.0, "B": 2143.0, "alpha": 0.3473, "beta": 0.3672}
    for name, value in epoch.items():
        assert result.params[name] == pytest.approx(value, rel=0.03), name
    assert result.n == 240 and result.r2 > 0.99


@pytest.mark.parametrize("form", list(TRUE))
def test_predict_invert_round_trip(form):
    result = fit(FLOPS, synthetic(form), form, n_boot=0)
    for x in (3e13, 1e17):
        y = float(result.predict(x))
        assert result.invert(y) == pytest.approx(x, rel=1e-6)
        assert result.predict([x, x]) == pytest.approx([y, y])


def test_invert_rejects_unreachable_targets():
    saturating = fit(FLOPS, synthetic("saturating"), "saturating", n_boot=0)
    with pytest.raises(ValueError, match="unreachable by the saturating fit"):
        saturating.invert(saturating.params["E"] + 0.01)
    sigmoid = fit(FLOPS, synthetic("sigmoid"), "sigmoid", n_boot=0)
    with pytest.raises(ValueError, match="unreachable"):
        sigmoid.invert(0.1)  # below R0
    N, D = np.geomspace(1e7, 1e10, 6), np.geomspace(1e9, 1e12, 6)
    L = chinchilla_loss(N, D, {"E": 2, "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3})
    chinchilla = fit(N, L, "chinchilla", x2=D, n_boot=0)
    with pytest.raises(ValueError, match="single-variable"):
        chinchilla.invert(3.0)


def test_exclude_below_drops_the_early_regime():
    y = synthetic("loss")
    early = FLOPS < 1e14
    y[early] = 9.0  # a flat warm-up phase that is not part of the law
    kept = fit(FLOPS, y, "loss", exclude_below=1e14, n_boot=50)
    assert (kept.n, kept.n_excluded, kept.exclude_below) == ((~early).sum(), early.sum(), 1e14)
    assert_recovered(kept, TRUE["loss"][0])
    assert abs(fit(FLOPS, y, "loss", n_boot=0).params["E"] - TRUE["loss"][0]["E"]) > 0.5  # biased when kept


def test_extrapolation_scores_held_out_points_only():
    y = synthetic("saturating")
    y[FLOPS >= 1e18] += 0.05  # a shift only the held-out points carry
    result = extrapolation(FLOPS, y, "saturating", cut=1e18)
    held_out = FLOPS >= 1e18
    assert (result["n_train"], result["n_test"]) == ((~held_out).sum(), held_out.sum())
    error = result["fit"].predict(FLOPS[held_out]) - y[held_out]
    assert result["mae"] == pytest.approx(np.mean(np.abs(error)))
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean(error**2)))
    assert result["mae"] > 0.04  # the shift shows up in the error...
    assert result["fit"].rmse < 0.01  # ...but never reached the fit


def test_compare_forms_ranks_by_held_out_error():
    table = compare_forms(FLOPS, synthetic("saturating"), ["power", "saturating"], cut=1e17)
    assert list(table["form"]) == ["saturating", "power"]
    assert table["rmse"].iloc[1] > 3 * table["rmse"].iloc[0]
    assert {"mae", "mre", "r2_train", "n_train", "n_test"} <= set(table.columns)


def test_interval_and_dict():
    result = fit(FLOPS, synthetic("sigmoid"), "sigmoid", n_boot=100)
    x = np.geomspace(1e12, 1e21, 20)
    low, high = result.predict_interval(x)
    assert np.all(low <= result.predict(x) + 1e-9) and np.all(result.predict(x) <= high + 1e-9)
    assert np.all(high - low < 0.1)
    summary = json.loads(json.dumps(result.to_dict()))
    assert {"form", "params", "ci", "r2", "rmse", "n"} <= set(summary)
    assert summary["ci"]["C_mid"][0] < summary["params"]["C_mid"] < summary["ci"]["C_mid"][1]
    with pytest.raises(ValueError, match="n_boot > 0"):
        fit(FLOPS, synthetic("sigmoid"), "sigmoid", n_boot=0).predict_interval(x)


@pytest.mark.parametrize(
    ("x", "y", "form", "message"),
    [
        (FLOPS, synthetic("loss"), "cubic", "unknown form 'cubic'"),
        (FLOPS[:3], synthetic("sigmoid")[:3], "sigmoid", "sigmoid has 4 parameters but only 3 distinct points"),
        (-FLOPS, synthetic("power"), "power", "x must be > 0"),
        (FLOPS, -synthetic("power"), "power", "y must be > 0"),
        (FLOPS, np.where(FLOPS > 1e15, np.nan, 1.0), "loss", "y contains NaN"),
        (FLOPS, synthetic("loss")[:-1], "loss", "lengths differ"),
        (FLOPS, synthetic("loss"), "chinchilla", "chinchilla needs x2"),
    ],
)
def test_bad_input_raises(x, y, form, message):
    with pytest.raises(ValueError, match=message):
        fit(x, y, form)


def test_fit_csv(tmp_path):
    path = tmp_path / "runs.csv"
    pd.DataFrame({"flops": FLOPS, "score": synthetic("saturating")}).to_csv(path, index=False)
    from_csv = fit_csv(path, "flops", "score", "saturating", n_boot=0)
    assert from_csv.params == fit(FLOPS, synthetic("saturating"), "saturating", n_boot=0).params
    with pytest.raises(ValueError, match=r"column 'reward' not in .*available: flops, score"):
        fit_csv(path, "flops", "reward", "saturating")
    with pytest.raises(ValueError, match="cannot read"):
        fit_csv(tmp_path / "absent.csv", "flops", "score", "saturating")


def test_every_form_is_tested():
    assert set(FORMS) == set(TRUE) | {"chinchilla"}


@pytest.mark.parametrize("form", ["power", "saturating", "sigmoid"])
def test_integer_weights_count_a_point_that_many_times(form):
    """Weighted least squares (issue 24 item 6: evals weighted by their problems): weight 3 on a point is the point
    given three times; equal weights change nothing; chinchilla and bad weights are refused."""
    x, y = FLOPS[::2], synthetic(form)[::2]
    w = np.where(np.arange(len(x)) % 4 == 0, 3.0, 1.0)
    weighted = fit(x, y, form, n_boot=0, weights=w)
    repeated = fit(np.repeat(x, w.astype(int)), np.repeat(y, w.astype(int)), form, n_boot=0)
    for k, v in repeated.params.items():
        assert weighted.params[k] == pytest.approx(v, rel=1e-4), k
    assert fit(x, y, form, n_boot=0, weights=np.full(len(x), 7.0)).params == pytest.approx(
        fit(x, y, form, n_boot=0).params, rel=1e-6)
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        fit(x, y, form, weights=np.zeros(len(x)))
    with pytest.raises(ValueError, match="one value a point"):
        fit(x, y, form, weights=[1.0])
    with pytest.raises(ValueError, match="not supported for the chinchilla"):
        fit(x, np.abs(y) + 0.1, "chinchilla", x2=x, weights=w)
