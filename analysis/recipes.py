"""Which recipe scales: each run's held-out score against its cumulative compute, pooled per recipe, fitted the
ScaleRL way (arXiv 2510.13786) with R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) after dropping the warm-up, and
recipes compared by asymptote A and efficiency (B, C_mid). Intervals come from a bootstrap over runs, so seeds
count; a score and its intervals stay in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.fits import Fit, fit
from analysis.runs import metric_history

SCORE, COMPUTE, HOURS, SAMPLES = "eval/accuracy", "compute/flops", "compute/gpu_hours", "data/samples/solve"
CURVE_COLUMNS = ["run_id", "recipe", "step", "score", "flops", "device_hours", "samples"]
HORIZON = 10.0  # the forecast budget: 10x the largest compute a recipe ran
WARMUP = 0.1  # points below this fraction of a recipe's largest compute are warm-up, not fitted (ScaleRL drops ~15%)


def run_curves(runs: pd.DataFrame, uri: str | None = None, root: str | Path = "mlruns") -> pd.DataFrame:
    """Every held-out eval of every finished run with a `recipe` tag (after SFT, each quick eval in RL, the final
    one) with the run's cumulative compute, device-hours and RL samples at that step, read from MLflow's history."""
    rows = []
    keep = runs[(runs["fate"] == "finished")] if "fate" in runs else runs
    for run in keep.to_dict("records"):
        recipe = run.get("tags.recipe")
        if not isinstance(recipe, str) or not recipe:
            continue
        history = {key: metric_history(run["run_id"], key, uri, root).set_index("step")["value"]
                   for key in (SCORE, COMPUTE, HOURS, SAMPLES)}
        frame = pd.DataFrame(history).dropna(subset=[SCORE, COMPUTE])
        for step, r in frame.iterrows():
            rows.append({"run_id": run["run_id"], "recipe": recipe, "step": int(step), "score": r[SCORE],
                         "flops": r[COMPUTE], "device_hours": r.get(HOURS), "samples": r.get(SAMPLES)})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def fit_recipe(curves: pd.DataFrame, x: str = "flops", warmup: float = WARMUP, n_boot: int = 200,
               seed: int = 0, horizon: float = HORIZON) -> dict[str, Any]:
    """The sigmoid of one recipe's pooled curves against `x` (flops, device_hours or samples), points below
    `warmup` x the largest x dropped; intervals from refits on runs resampled with replacement. Returns the
    parameters, their 95% intervals, r2, and the forecast at `horizon` x the largest x with its band, the gain the
    next `horizon`-fold of x brings and how far the recipe is from its asymptote A."""
    data = curves[(curves[x] > 0) & np.isfinite(curves[x])]
    top = float(data[x].max())
    fitted_points = data[data[x] >= warmup * top]
    best = fit(fitted_points[x], fitted_points["score"], "sigmoid", n_boot=0, score=True)
    draws = _bootstrap_runs(fitted_points, x, n_boot, seed)
    target = horizon * top
    now, later = float(best.predict([top])[0]), float(best.predict([target])[0])
    out: dict[str, Any] = {
        "recipe": str(data["recipe"].iloc[0]), "x": x, "n_runs": int(data["run_id"].nunique()),
        "n_points": len(fitted_points), "warmup_fraction": warmup, "dropped_points": len(data) - len(fitted_points),
        "params": best.params, "r2": best.r2, "largest_x": top, "forecast_x": target, "score_now": now,
        "forecast": later, "gain_next": later - now, "to_asymptote": best.params["A"] - now,
    }
    if len(draws):
        curves_at = np.array([[_sigmoid(d, top), _sigmoid(d, target)] for d in draws])
        q = [2.5, 97.5]
        out["ci"] = {k: [float(v) for v in np.percentile(draws[:, i], q)] for i, k in enumerate(best.params)}
        out["forecast_band"] = [float(v) for v in np.percentile(curves_at[:, 1], q)]
        out["gain_next_band"] = [float(v) for v in np.percentile(curves_at[:, 1] - curves_at[:, 0], q)]
        out["n_boot"] = len(draws)
    return out


def compare_recipes(curves: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Every recipe fitted against compute (and RL samples), ranked by the forecast at 10x the largest compute any
    recipe ran, with which differences lie inside the intervals and whether RL is still paying."""
    fits, skipped = [], {}
    budget = HORIZON * float(curves["flops"].max()) if len(curves) else 0.0
    for recipe, group in curves.groupby("recipe", sort=True):
        try:
            f = fit_recipe(group, "flops", n_boot=n_boot, seed=seed, horizon=budget / float(group["flops"].max()))
        except (ValueError, RuntimeError) as e:
            skipped[str(recipe)] = str(e)
            continue
        if group["samples"].notna().any() and (group["samples"] > 0).sum() >= 4:
            try:
                f["samples"] = fit_recipe(group, "samples", n_boot=n_boot, seed=seed)
            except (ValueError, RuntimeError) as e:
                f["samples"] = {"skipped": str(e)}
        f["tapering"] = _tapering(f)
        fits.append(f)
    fits.sort(key=lambda f: f["forecast"], reverse=True)
    return {"budget_flops": budget, "recipes": fits, "skipped": skipped, "ranking": [f["recipe"] for f in fits],
            "statement": _statement(fits, budget)}


def _sigmoid(p: np.ndarray, x: float) -> float:
    R0, A, B, C_mid = p
    return float(R0 + (A - R0) / (1 + (C_mid / x) ** B))


def _bootstrap_runs(points: pd.DataFrame, x: str, n_boot: int, seed: int) -> np.ndarray:
    """Sigmoid parameters refitted on `n_boot` resamples of the runs (a run's points stay together)."""
    rng = np.random.default_rng(seed)
    ids = points["run_id"].unique()
    by_run = {i: points[points["run_id"] == i] for i in ids}
    draws = []
    for _ in range(n_boot if len(ids) > 1 else 0):
        sample = pd.concat([by_run[i] for i in rng.choice(ids, len(ids))])
        try:
            f: Fit = fit(sample[x], sample["score"], "sigmoid", n_boot=0, score=True)
        except (ValueError, RuntimeError):
            continue
        draws.append(list(f.params.values()))
    return np.array(draws).reshape(-1, 4)


def _tapering(f: dict[str, Any]) -> bool:
    """RL has stopped paying when the next 10x of compute is expected to add under a point, or the recipe is within
    a point of its asymptote."""
    return f["gain_next"] < 0.01 or f["to_asymptote"] < 0.01


def _statement(fits: list[dict[str, Any]], budget: float) -> str:
    if not fits:
        return "No recipe could be fitted."
    lines = [f"At {budget:.3g} FLOPs (10x the largest run), the recipes rank "
             + " > ".join(f"{f['recipe']} ({f['forecast']:.3f})" for f in fits) + "."]
    for a, b in zip(fits, fits[1:], strict=False):
        if "forecast_band" in a and "forecast_band" in b:
            overlap = a["forecast_band"][0] <= b["forecast_band"][1]
            verdict = "inside the intervals (not a resolved difference)." if overlap else "a resolved difference."
            lines.append(f"{a['recipe']} vs {b['recipe']}: {verdict}")
    for f in fits:
        lines.append(f"{f['recipe']}: asymptote A = {f['params']['A']:.3f}; the next 10x of compute "
                     f"{'adds' if f['gain_next'] >= 0 else 'changes'} {f['gain_next']:+.3f}"
                     + (" (RL is tapering off)." if f["tapering"] else " (RL is still paying)."))
    return " ".join(lines)
