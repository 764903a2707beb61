"""Which recipe scales: each run's held-out score against its cumulative RL compute (its compute less the SFT
warm start and the evals: the part RL spends), pooled per recipe, fitted the ScaleRL way (arXiv 2510.13786) with
R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) after dropping the warm-up, and recipes compared by asymptote A and
efficiency (B, C_mid). Each recipe is forecast at HORIZON x its own largest compute, and the forecast is stated
only when the same fit made one HORIZON earlier predicted what followed. Quick evals (the first
`grpo.eval_problems` problems) and full evals (all `eval.problems`) meet on one footing: each point is weighted by
the number of problems behind it (`eval/problems`), its inverse binomial variance up to p(1 - p). Intervals come
from a bootstrap over runs, so seeds count, plus the binomial noise of the shared eval set; a score and its
intervals stay in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlscale.analysis.fits import extrapolation, fit
from rlscale.analysis.runs import Progress, metric_histories

SCORE, COMPUTE, HOURS, SAMPLES = "eval/accuracy", "compute/flops", "compute/gpu_hours", "data/samples/solve"
PROBLEMS = "eval/problems"  # how many eval problems stand behind each score
NOT_RL = ("compute/flops/sft", "compute/flops/eval")  # compute that is not RL training
CURVE_COLUMNS = ["run_id", "recipe", "step", "score", "flops", "rl_flops", "device_hours", "samples", "eval_problems"]
NEEDED = 4  # the sigmoid's parameters: the fewest distinct points a recipe's fit takes
UNFITTED_PHASES = ("report", "sweep", "sft")  # report runs, sweep parents, shared SFT runs: no recipe's curve
HORIZON = 10.0  # the forecast budget: 10x the largest compute a recipe ran
WARMUP = 0.1  # points below this fraction of a recipe's largest compute are warm-up, not fitted (ScaleRL drops ~15%)
HELD_OUT_CUT = 0.5  # the held-out check scores the points at or above this fraction of the largest compute
MAX_HELD_OUT_ERROR = 0.05  # a forecast is stated only when the held-out mean absolute error is at most this


def run_curves(runs: pd.DataFrame, uri: str | None = None, root: str | Path = "mlruns",
               progress: Progress | None = None) -> pd.DataFrame:
    """Every held-out eval of every finished run with a `recipe` tag (after SFT, each quick eval in RL, the final
    one) with the run's cumulative compute (all of it, and RL's: less SFT and evals), device-hours, RL samples and
    the number of eval problems behind the score at that step (NaN where not logged), read from MLflow's history in
    bulk; in run order (as in `runs`), then step order. Shared SFT runs (phase=sft) are no curve. A run started from
    a shared SFT logs the SFT model's eval at the SFT's steps with compute 0 and counts only its own work after it,
    so its RL compute (compute less its evals) is on the same axis as a run that trained its own SFT (compute less
    SFT and evals)."""
    tagged = _recipe_runs(runs)
    keys = [SCORE, COMPUTE, HOURS, SAMPLES, PROBLEMS, *NOT_RL]
    histories = metric_histories(list(tagged["run_id"]), keys, uri, root, at=SCORE, progress=progress)
    if histories.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    # one row a run and step, one column a key; a step logged twice: its latest value
    frame = histories.groupby(["run_id", "step", "key"])["value"].last().unstack("key").reindex(columns=keys)
    frame[[*NOT_RL]] = frame[[*NOT_RL]].groupby(level="run_id").ffill().fillna(0.0)  # absent: none spent
    frame = frame.dropna(subset=[SCORE, COMPUTE]).reset_index()
    position = pd.Series(range(len(tagged)), index=tagged["run_id"])
    frame = frame.iloc[np.lexsort((frame["step"], frame["run_id"].map(position)))]
    curves = pd.DataFrame({
        "run_id": frame["run_id"], "recipe": frame["run_id"].map(tagged.set_index("run_id")["tags.recipe"]),
        "step": frame["step"].astype(int), "score": frame[SCORE], "flops": frame[COMPUTE],
        "rl_flops": frame[COMPUTE] - (frame[NOT_RL[0]] + frame[NOT_RL[1]]), "device_hours": frame[HOURS],
        "samples": frame[SAMPLES], "eval_problems": frame[PROBLEMS]})
    return curves.reset_index(drop=True) if len(curves) else pd.DataFrame(columns=CURVE_COLUMNS)


def _recipe_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a recipe's curve may use: finished, tagged with a recipe, not a report, sweep parent or shared SFT
    (a shared SFT's score is already the first point of each run that starts from it)."""
    keep = runs["fate"] == "finished" if "fate" in runs else pd.Series(True, index=runs.index)
    if "tags.phase" in runs:
        keep &= ~runs["tags.phase"].isin(UNFITTED_PHASES)
    recipe = runs["tags.recipe"] if "tags.recipe" in runs else pd.Series(None, index=runs.index, dtype=object)
    return runs[keep & recipe.map(lambda r: isinstance(r, str) and r != "")]


def why_no_curve(runs: pd.DataFrame, curves: pd.DataFrame) -> dict[str, str]:
    """For each recipe of a finished, recipe-tagged run that has no eval after RL began in `curves` (run_curves),
    the reason read from the data: its runs logged no eval/accuracy history with compute, or every eval is at RL
    compute 0 (the SFT model)."""
    tagged = _recipe_runs(runs)
    out: dict[str, str] = {}
    if tagged.empty:
        return out
    for recipe, group in tagged.groupby("tags.recipe", sort=True):
        points = curves[curves["recipe"] == recipe] if len(curves) else curves
        n = len(group)
        if points.empty:
            out[str(recipe)] = (f"{n} finished run(s), none with an eval/accuracy history logged with compute/flops: "
                                "nothing to draw")
        elif not (points["rl_flops"] > 0).any():
            out[str(recipe)] = (f"{n} finished run(s), {len(points)} eval(s), every one at RL compute 0 (the SFT "
                                "model): no eval after RL began")
    return out


def no_curve_reason(runs: pd.DataFrame, curves: pd.DataFrame) -> str:
    """Why no recipe curve can be drawn, from the data: no finished run, none tagged with a recipe, or, for each
    recipe, why its runs give no eval after RL began (why_no_curve)."""
    fates = runs["fate"].value_counts().to_dict() if "fate" in runs and len(runs) else {}
    if not len(runs):
        return "no runs in the store"
    if not fates.get("finished"):
        return f"no finished run ({', '.join(f'{v} {k}' for k, v in sorted(fates.items()))})"
    if _recipe_runs(runs).empty:
        finished = runs[runs["fate"] == "finished"]
        sft = int((finished.get("tags.phase") == "sft").sum()) if "tags.phase" in finished else 0
        return (f"none of the {len(finished)} finished run(s) is a recipe's run (a recipe tag, not a report, sweep "
                "parent" + (f" or shared SFT run: {sft} of them are shared SFT runs" if sft else " or shared SFT run")
                + ")")
    gaps = why_no_curve(runs, curves)
    return "; ".join(f"recipe {r}: {why}" for r, why in gaps.items()) or "no eval after RL began"


def too_few_points(group: pd.DataFrame, warmup: float = WARMUP, x: str = "rl_flops") -> str | None:
    """Why one recipe's curves cannot take the sigmoid, counted from the data ("3 distinct points, 4 needed: ..."),
    or None when they have enough distinct points."""
    runs = group["run_id"].nunique()
    rl = group[(group[x] > 0) & np.isfinite(group[x])]
    at_zero = len(group) - len(rl)
    if rl.empty:
        return (f"0 points, {NEEDED} needed: {runs} run(s), {len(group)} eval(s), every one at RL compute 0 (the SFT "
                "model)")
    kept = rl[rl[x] >= warmup * rl[x].max()]
    distinct = int(kept[x].nunique())
    if distinct >= NEEDED:
        return None
    per_run = rl.groupby("run_id").size()
    parts = [f"{runs} run(s) with {len(rl)} eval(s) after RL began"]
    if len(rl) > len(kept):
        parts.append(f"{len(rl) - len(kept)} of them warm-up (below {warmup:g}x the largest RL compute)")
    if at_zero:
        parts.append(f"{at_zero} at RL compute 0 (the SFT model, not fitted)")
    if per_run.max() <= 1:
        parts.append("each run has only its final eval after RL began: no eval during RL (grpo.eval_every)")
    return f"{distinct} distinct point(s), {NEEDED} needed: " + "; ".join(parts)


def recipe_labels(runs: pd.DataFrame, most: int = 3) -> dict[str, str]:
    """A readable name for each recipe tag: the config values (MLflow params) that set it apart from the other
    recipes, e.g. 'grpo.loss_type=cispo'; keys that vary inside a recipe (budget, seed) or only name the run are
    left out. A recipe nothing sets apart keeps its tag."""
    if "tags.recipe" not in runs:
        return {}
    tagged = runs[runs["tags.recipe"].notna() & (runs["tags.recipe"].astype(str) != "")]
    keys = [c for c in tagged.columns if c.startswith("params.") and not c.startswith("params.tracking.")
            and not c.endswith(("name", "output_dir", "seed"))]
    groups = tagged.groupby("tags.recipe")
    steady = [k for k in keys if (groups[k].nunique(dropna=False) <= 1).all() and tagged[k].nunique() > 1]
    labels = {}
    for recipe, group in groups:
        first = group.iloc[0]
        apart = [k for k in steady if (tagged.loc[tagged["tags.recipe"] != recipe, k] != first[k]).any()]
        shown = [f"{k.removeprefix('params.')}={first[k]}" for k in apart[:most]]
        labels[str(recipe)] = ", ".join(shown) + (f" (+{len(apart) - most})" if len(apart) > most else "") \
            if shown else str(recipe)
    return labels


def fit_recipe(curves: pd.DataFrame, x: str = "rl_flops", warmup: float = WARMUP, n_boot: int = 200,
               seed: int = 0, horizon: float = HORIZON) -> dict[str, Any]:
    """The sigmoid of one recipe's pooled curves against `x` (rl_flops, flops, device_hours or samples), points below
    `warmup` x the largest x dropped, each point weighted by its eval problems (when every point has them);
    intervals from refits on runs resampled with replacement, each resample's scores shifted by the binomial noise
    of the eval set. Returns the parameters, their 95% intervals, r2, the held-out check (_held_out), and the
    forecast at `horizon` x the recipe's own largest x with its band, the gain that next `horizon`-fold brings and
    how far the recipe is from its asymptote A; `forecast_ok` says whether the check allows stating it."""
    data = curves[(curves[x] > 0) & np.isfinite(curves[x])]
    top = float(data[x].max())
    fitted_points = data[data[x] >= warmup * top]
    n = fitted_points["eval_problems"] if "eval_problems" in fitted_points else pd.Series(np.nan, fitted_points.index)
    weighted = bool((n > 0).all())
    weights = n.to_numpy(float) if weighted else None
    best = fit(fitted_points[x], fitted_points["score"], "sigmoid", n_boot=0, score=True, weights=weights)
    draws = _bootstrap_runs(fitted_points.assign(eval_problems=n), x, n_boot, seed, list(best.params.values()),
                            weighted)
    target = horizon * top
    now, later = float(best.predict([top])[0]), float(best.predict([target])[0])
    heldout = _held_out(data, x, top, horizon, warmup)
    out: dict[str, Any] = {
        "recipe": str(data["recipe"].iloc[0]), "x": x, "n_runs": int(data["run_id"].nunique()),
        "n_points": len(fitted_points), "warmup_fraction": warmup, "dropped_points": len(data) - len(fitted_points),
        "weights": "eval problems" if weighted else "equal (eval/problems not logged for every point)",
        "eval_problems": sorted({int(v) for v in n.dropna()}),
        "params": best.params, "r2": best.r2, "fitted_from": float(fitted_points[x].min()), "largest_x": top,
        "horizon": horizon, "forecast_x": target, "score_now": now,
        "forecast": later, "gain_next": later - now, "to_asymptote": best.params["A"] - now, "heldout": heldout,
        "forecast_ok": "mae" in heldout and heldout["mae"] <= MAX_HELD_OUT_ERROR,
    }
    if len(draws):
        curves_at = np.array([sigmoid(d, [top, target]) for d in draws])
        q = [2.5, 97.5]
        out["ci"] = {k: [float(v) for v in np.percentile(draws[:, i], q)] for i, k in enumerate(best.params)}
        out["forecast_band"] = [float(v) for v in np.percentile(curves_at[:, 1], q)]
        out["gain_next_band"] = [float(v) for v in np.percentile(curves_at[:, 1] - curves_at[:, 0], q)]
        out["n_boot"] = len(draws)
        out["band_has_eval_noise"] = weighted
    return out


def compare_recipes(curves: pd.DataFrame, labels: dict[str, str] | None = None, n_boot: int = 200,
                    seed: int = 0, runs: pd.DataFrame | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Every recipe fitted against RL compute (and RL samples), each forecast at HORIZON x its own largest RL compute,
    ranked by that forecast (recipes whose held-out check fails come last, by fitted A), with which differences lie
    inside the intervals and whether RL is still paying. `labels` (recipe_labels) name the recipes in the
    statement. A recipe not fitted is in `skipped` with the reason counted from its data (too_few_points); with
    `runs` (those `curves` came from), so are recipes whose runs gave no curve at all (why_no_curve). `progress`
    is told each recipe fitted."""
    fits, skipped = [], {}
    groups = list(curves.groupby("recipe", sort=True))
    for done, (recipe, group) in enumerate(groups):
        if progress is not None:
            progress("fitting recipes", done, len(groups))
        if why := too_few_points(group):
            skipped[str(recipe)] = why
            continue
        try:
            f = fit_recipe(group, "rl_flops", n_boot=n_boot, seed=seed)
        except (ValueError, RuntimeError) as e:
            skipped[str(recipe)] = str(e)
            continue
        if group["samples"].notna().any() and (group["samples"] > 0).sum() >= 4:
            try:
                f["samples"] = fit_recipe(group, "samples", n_boot=n_boot, seed=seed)
            except (ValueError, RuntimeError) as e:
                f["samples"] = {"skipped": str(e)}
        f["tapering"] = _tapering(f)
        f["label"] = (labels or {}).get(str(recipe), str(recipe))
        fits.append(f)
    if progress is not None and groups:
        progress("fitting recipes", len(groups), len(groups))
    if runs is not None:
        skipped |= {r: why for r, why in why_no_curve(runs, curves).items() if r not in skipped}
        skipped = dict(sorted(skipped.items()))
    fits.sort(key=lambda f: (f["forecast_ok"], f["forecast"] if f["forecast_ok"] else f["params"]["A"]),
              reverse=True)
    return {"horizon": HORIZON, "recipes": fits, "skipped": skipped, "ranking": [f["recipe"] for f in fits],
            "max_heldout_error": MAX_HELD_OUT_ERROR, "statement": _statement(fits, skipped)}


def _held_out(points: pd.DataFrame, x: str, top: float, horizon: float, warmup: float) -> dict[str, Any]:
    """The forecast's own procedure made one `horizon` earlier: the sigmoid fitted (warm-up dropped, weighted alike)
    on the points below cut = top / horizon and scored on those at or above HELD_OUT_CUT x top, so the check
    extrapolates as far as the forecast does (`reach`: top over the largest x it was fitted on); or a note saying
    why there is no check."""
    cut = top / horizon
    train = points[(points[x] >= warmup * cut) & (points[x] < cut)]
    test = points[points[x] >= HELD_OUT_CUT * top]
    n_train = int(train[x].nunique())
    if n_train < 5:
        return {"cut": cut, "note": f"too few points below 1/{horizon:g} of the largest run to check a {horizon:g}x "
                                    f"forecast ({n_train} distinct from {warmup * cut:.3g} to {cut:.3g}, the sigmoid "
                                    "needs 5)"}
    both = pd.concat([train, test])
    n = both["eval_problems"] if "eval_problems" in both else pd.Series(np.nan, both.index)
    weighted = bool((n[both[x] < cut] > 0).all())  # only the points it is fitted on carry weight
    try:
        result = extrapolation(both[x], both["score"], "sigmoid", cut, score=True,
                               weights=n.fillna(1.0).to_numpy(float) if weighted else None)
    except (ValueError, RuntimeError) as e:
        return {"cut": cut, "note": f"held-out fit failed: {e}"}
    return {k: result[k] for k in ("cut", "n_train", "n_test", "mae", "rmse")} | {"reach": top / float(train[x].max())}


def sigmoid(p: Any, x: Any) -> Any:
    """R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) at x, from p = (R0, A, B, C_mid); where (C_mid / C)^B overflows
    (a fit trying a steep B far below C_mid), R is its limit R0."""
    R0, A, B, C_mid = p
    with np.errstate(over="ignore"):
        return R0 + (A - R0) / (1 + (C_mid / np.asarray(x, dtype=float)) ** B)


def _bootstrap_runs(points: pd.DataFrame, x: str, n_boot: int, seed: int, best: Any, eval_noise: bool) -> np.ndarray:
    """Sigmoid parameters refitted (from `best`) on `n_boot` resamples of the runs (a run's points stay together).
    With `eval_noise`, each resample also draws the error of the shared eval set: the points scored on the same
    problems (same `eval_problems`; a smaller set is the first problems of a larger one) share one binomial error
    of sd sqrt(p (1 - p) / n) at the fitted p, taken as common to every run and step (an upper bound), and the refit
    is weighted by n as the fit is."""
    rng = np.random.default_rng(seed)
    run, ids = pd.factorize(points["run_id"])  # each point's run, numbered in order of first appearance
    order = np.argsort(run, kind="stable")  # the points run by run, each run's in their own order
    counts = np.bincount(run, minlength=len(ids))
    first = np.cumsum(counts) - counts  # where each run's points start in `order`
    xs, ys = points[x].to_numpy(float), points["score"].to_numpy(float)
    problems = points["eval_problems"].to_numpy(float)
    sizes = np.sort(points["eval_problems"].unique()) if eval_noise else np.array([])
    p_best = np.clip(sigmoid(list(best), xs), 0.0, 1.0) if eval_noise else None
    draws = []
    for _ in range(n_boot if len(ids) > 1 else 0):
        pick = rng.choice(len(ids), len(ids))
        length = counts[pick]
        rows = order[np.repeat(first[pick] - np.cumsum(length) + length, length) + np.arange(length.sum())]
        score, weights = ys[rows], None
        if eval_noise:  # the sum of per-problem errors over the first n problems, one draw per set, nested
            total = np.cumsum(rng.normal(0.0, np.sqrt(np.diff(sizes, prepend=0.0))))
            n, p = problems[rows], p_best[rows]
            score = np.clip(score + np.sqrt(p * (1 - p)) * total[np.searchsorted(sizes, n)] / n, 0.0, 1.0)
            weights = n
        try:
            f = fit(xs[rows], score, "sigmoid", n_boot=0, score=True, weights=weights, start=list(best))
        except (ValueError, RuntimeError):
            continue
        draws.append(list(f.params.values()))
    return np.array(draws).reshape(-1, 4)


def _tapering(f: dict[str, Any]) -> bool:
    """RL has stopped paying when the next HORIZON-fold of the recipe's own compute is expected to add under a point,
    or the recipe is within a point of its asymptote."""
    return f["gain_next"] < 0.01 or f["to_asymptote"] < 0.01


def _statement(fits: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    if not fits:
        return "No recipe could be fitted" + (": " + "; ".join(f"{r}: {e}" for r, e in skipped.items())
                                              if skipped else ".")
    ok = [f for f in fits if f["forecast_ok"]]
    lines = []
    if ok:
        lines.append(f"At {HORIZON:g}x each recipe's own largest RL compute, the recipes whose held-out check passes "
                     f"(mean error <= {MAX_HELD_OUT_ERROR:g} over a {HORIZON:g}x extrapolation) rank "
                     + " > ".join(f"{f['label']} ({f['forecast']:.3f} at {f['forecast_x']:.3g} RL FLOPs)"
                                  for f in ok) + ".")
        largest = [f["largest_x"] for f in ok]
        if max(largest) > 2 * min(largest):
            lines.append("Their largest runs differ by more than 2x, so these forecasts are at different compute.")
    for a, b in zip(ok, ok[1:], strict=False):
        if "forecast_band" in a and "forecast_band" in b:
            overlap = a["forecast_band"][0] <= b["forecast_band"][1]
            verdict = "inside the intervals (not a resolved difference)." if overlap else "a resolved difference."
            lines.append(f"{a['label']} vs {b['label']}: {verdict}")
    for f in fits:
        if f["forecast_ok"]:
            lines.append(f"{f['label']}: asymptote A = {f['params']['A']:.3f}; the next {f['horizon']:g}x of its "
                         f"compute (to {f['forecast_x']:.3g} RL FLOPs) "
                         f"{'adds' if f['gain_next'] >= 0 else 'changes'} {f['gain_next']:+.3f}"
                         + (" (RL is tapering off)." if f["tapering"] else " (RL is still paying)."))
        else:
            why = f["heldout"].get("note") or (f"held-out error {f['heldout']['mae']:.3f} > {MAX_HELD_OUT_ERROR:g} "
                                               f"over a {f['heldout']['reach']:.3g}x extrapolation")
            lines.append(f"{f['label']}: fitted A = {f['params']['A']:.3f}, but no {f['horizon']:g}x forecast: "
                         f"{why}.")
    return " ".join(lines)
