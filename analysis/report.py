"""The project report: what it cost (runs of every fate plus a ledger) and how score scales with compute.

`build_report` writes into one folder: report.html (self-contained, plots embedded as PNG data URIs),
report.md (plots as plots/*.png), runs.csv, cost.json and fits.json, and logs them as the artifacts of a run
tagged phase=report in the experiment "reports". Report runs and sweep parents never enter costs or fits; failed,
killed and pruned runs count in the cost, and only finished runs with a score and compute enter the score fits.
Every run is billed once, for its own work: a shared SFT run (phase=sft) once, however many RL runs start from it.
The final run's model is traced through its lineage (its shared SFT run, and the base model's pretraining when a
run declares it) and set against the whole project and against that pretraining.

Score vs compute: a point is a finished run (not a report, sweep parent or shared SFT run) at the compute that
produced its model (`compute/flops/lineage` where recorded, else `compute/flops`), fitted per recipe where recipes
have enough runs, else per model size, else pooled with the reason stated; fits.json keeps every group under
`groups` and the headline group's fit (the final run's, else the largest) at its top level. Each recipe (runs tagged
with one `recipe`) also gets its own fit of its runs' eval curves against RL compute (analysis/recipes.py). A
forecast is stated only when a held-out extrapolation check passes (mean error <= MAX_HELD_OUT_ERROR). An empty plot
says why, counted from the runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from mlflow.tracking import MlflowClient

from rlscale.analysis.cost import (
    CATEGORIES,
    LINEAGE_FLOPS,
    cost_table,
    load_ledger,
    missing_ancestors,
    project_cost,
    reprice,
    spend_over_time,
)
from rlscale.analysis.fits import FORMS, Fit, compare_forms, fit
from rlscale.analysis.recipes import HORIZON as RECIPE_HORIZON
from rlscale.analysis.recipes import (
    MAX_HELD_OUT_ERROR,
    WARMUP,
    compare_recipes,
    no_curve_reason,
    recipe_labels,
    run_curves,
    sigmoid,
)
from rlscale.analysis.runs import FATES, Progress, load_run_ids, load_runs
from rlscale.tracking.run import experiment_id, tracking_uri

SCORE, COMPUTE = "eval/accuracy", "compute/flops"
MODEL_FLOPS = "model_flops"  # points' x: the compute that produced the model (lineage where recorded, else own)
X_NAME = f"{LINEAGE_FLOPS} where recorded, else {COMPUTE}"
DATA_VOLUME = {"data/samples": "sampled completions", "data/tokens/generated": "generated tokens"}
SCORE_FORMS = ("saturating", "sigmoid", "power")
LAWS = {"saturating": "accuracy = E - A C^-alpha", "sigmoid": "accuracy = R0 + (A - R0) / (1 + (C_mid / C)^B)",
        "power": "accuracy = a C^b"}
REPORT_EXPERIMENT = "reports"
UNFITTED_PHASES = ("report", "sweep", "sft")  # report runs, sweep parents (no training), shared SFT runs (no RL)
MIN_GROUP = min(len(FORMS[f]) + 1 for f in SCORE_FORMS)  # distinct compute values the smallest form needs
NO_TAG = {"recipe": "(no recipe tag)", "model size": "(no model name)"}
HORIZON = 10.0  # the extrapolation reaches this multiple of the largest run's compute
HELD_OUT = 0.25  # share of the distinct compute values held out above the extrapolation cut
# Bootstrap resamples by default: MAX_BOOT, or BOOT_POINTS over the points one resample refits, at least MIN_BOOT
MAX_BOOT, MIN_BOOT, BOOT_POINTS = 200, 50, 2_000_000
PLOTS = {
    "score_vs_compute": "Score vs compute, with the fitted laws extrapolated to 10x the largest run",
    "score_vs_data": "Score vs RL data volume",
    "recipes": "Each recipe's eval curves against RL compute, its fitted sigmoid and (where checked) its extrapolation",
    "cost_breakdown": "Cost by category, phase and run fate",
    "spend_over_time": "Cumulative spend on runs over time",
    "total_vs_final": "The whole project vs the final model's lineage and the final run",
}

Block = tuple[str, Any]  # ("h2", text) | ("h3", text) | ("p", text) | ("table", DataFrame) | ("plot", name)


@dataclass
class ReportResult:
    """Where the report was written, its numbers, and the MLflow run holding it (None when not logged)."""

    out: Path
    html: Path
    markdown: Path
    runs_csv: Path
    cost_json: Path
    fits_json: Path
    plots: dict[str, Path]
    cost: dict[str, Any]
    fits: dict[str, Any]
    report_run_id: str | None


def build_report(uri: str | None, experiments: list[str] | None, ledger: str | Path | None,
                 final_run_id: str | None, out: str | Path, *, root: str | Path = "mlruns",
                 log_to_mlflow: bool = True, prices: str | Path | None = None, n_boot: int | None = None,
                 progress: Progress | None = None) -> ReportResult:
    """Write the report of the named experiments (all when None) of the store `uri` into `out`.

    `ledger` is a TOML ledger of costs outside MLflow; `final_run_id` overrides the run tagged phase=final. With
    `log_to_mlflow`, the files become the artifacts of a new run tagged phase=report in the experiment "reports"
    (artifacts under `<root>/artifacts/reports` on the embedded SQLite store). With `prices`, every run's cost is
    recomputed with that price table. `n_boot` is the number of bootstrap resamples behind every interval and band
    (None: default_bootstrap's for this store). `progress` is told (what, done, total) as the work advances."""
    if n_boot is not None and n_boot < 0:
        raise ValueError(f"the number of bootstrap resamples must be >= 0, got {n_boot}")
    step = progress or (lambda what, done, total: None)
    out = Path(out)
    ledger_items = load_ledger(ledger) if ledger else None  # everything is read and checked before anything is written
    step("reading runs", 0, 1)
    runs = load_runs(uri, experiments, root=root)
    runs = runs[_phase(runs) != "report"].reset_index(drop=True)
    if prices is not None:
        runs = reprice(runs, prices)
    cost = project_cost(runs, ledger_items, final_run_id)
    if cost["final_run_id"] and (outside := _ancestors(runs, cost["final_run_id"], uri, root)) is not None:
        cost = project_cost(runs, ledger_items, final_run_id,  # the lineage names runs of other experiments
                            reprice(outside, prices) if prices is not None else outside)
    step("reading runs", 1, 1)
    labels = recipe_labels(runs)
    points = score_points(runs)
    curves = run_curves(runs, uri, root, progress=progress)
    boot = default_bootstrap(len(curves), len(points)) if n_boot is None else n_boot
    fits, fitted = fit_groups(points, labels, cost["final_run_id"], n_boot=boot, progress=progress)
    comparison = compare_recipes(curves, labels, n_boot=boot, runs=runs, progress=progress)
    comparison["nothing_drawn"] = no_curve_reason(runs, curves) if not (curves["rl_flops"] > 0).any() else None
    fits["recipes"] = comparison.pop("recipes")
    fits["recipe_comparison"] = comparison
    fits["bootstrap"] = {"resamples": boot, "sized_for_store": n_boot is None}
    step("drawing plots", 0, 1)
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):  # names in plots are literal text
        pngs = {"score_vs_compute": _plot_score_vs_compute(points, fitted, fits, cost["final_run_id"], runs),
                "score_vs_data": _plot_score_vs_data(points, runs),
                "recipes": _plot_recipes(curves, fits["recipes"], comparison["skipped"], comparison["nothing_drawn"]),
                "cost_breakdown": _plot_cost_breakdown(cost), "spend_over_time": _plot_spend(runs, cost),
                "total_vs_final": _plot_total_vs_final(cost)}
    plots = {name: out / "plots" / f"{name}.png" for name in pngs}
    title = f"Project report: {', '.join(experiments) if experiments else 'all experiments'}"
    blocks = (_cost_blocks(cost) + _lineage_blocks(cost) + _pretraining_blocks(cost) + _fit_blocks(points, fits, runs)
              + _recipe_blocks(fits))
    files = {"html": out / "report.html", "markdown": out / "report.md", "runs_csv": out / "runs.csv",
             "cost_json": out / "cost.json", "fits_json": out / "fits.json"}
    step("drawing plots", 1, 1)
    step("writing files", 0, 1)
    _claim_out(out, [*plots.values(), *files.values()])  # a folder or file rlscale did not write is refused
    for name, png in pngs.items():
        _write(plots[name], png)
    _write(files["html"], _html(title, blocks, pngs).encode())
    _write(files["markdown"], _markdown(title, blocks).encode())
    _write(files["runs_csv"], csv_safe(runs).to_csv(index=False).encode())
    _write(files["cost_json"], json_text(cost).encode())
    _write(files["fits_json"], json_text(fits).encode())
    run_id = (_log_report(tracking_uri(uri, Path(root)), Path(root), list(files.values()), out / "plots", experiments)
              if log_to_mlflow else None)
    step("writing files", 1, 1)
    return ReportResult(out=out, **files, plots=plots, cost=cost, fits=fits, report_run_id=run_id)


def default_bootstrap(eval_points: int, scored_runs: int) -> int:
    """Bootstrap resamples sized for the store: MAX_BOOT, or fewer when one resample refits many points (each
    recipe's eval points against RL compute and RL samples, each scored run in three score forms):
    BOOT_POINTS / (2 x eval_points + 3 x scored_runs), at least MIN_BOOT."""
    points = 2 * eval_points + 3 * scored_runs
    return MAX_BOOT if points == 0 else max(MIN_BOOT, min(MAX_BOOT, BOOT_POINTS // points))


OUT_MARKER = ".rlscale.json"  # in --out: {"kind": "report", "files": [...]}, the files rlscale wrote there


def _claim_out(out: Path, paths: list[Path]) -> None:
    """Refuse (ValueError, one line) an --out folder rlscale did not write, or a file or link in the way of `paths`
    that it did not write; else record `paths` in the folder's marker. Nothing is ever deleted."""
    marker, listed = out / OUT_MARKER, []
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            m = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() and not marker.is_symlink() else None
        except (OSError, ValueError):
            m = None
        if not (isinstance(m, dict) and m.get("kind") == "report" and isinstance(m.get("files"), list)):
            raise ValueError(f"--out {out} is not empty and holds no report rlscale wrote: rlscale never overwrites "
                             "files it did not write; choose a new or empty folder")
        listed = m["files"]
    names = [p.relative_to(out).as_posix() for p in paths]
    for p, name in zip(paths, names):
        between = [out / d for d in reversed(Path(name).parents[:-1])]  # plots/ for plots/x.png
        if any(d.is_symlink() or (d.exists() and not d.is_dir()) for d in between) or p.is_symlink() or (
                p.exists() and (name not in listed or not p.is_file())):
            raise ValueError(f"{p} is in the way and rlscale did not write it (or it is a link): move it away or "
                             "choose another --out")
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    _write(marker, json.dumps({"kind": "report", "files": sorted(set(listed) | set(names))}).encode())


def _write(path: Path, data: bytes) -> None:
    """Write `path` whole: a new temporary file renamed over it (never written through a link)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    f = open(tmp, "xb")  # exclusive: fails on anything already there, a link included
    try:
        with f:
            f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ancestors(runs: pd.DataFrame, run_id: str, uri: str | None, root: str | Path) -> pd.DataFrame | None:
    """The runs of `run_id`'s lineage that `runs` lacks (a shared SFT run in another experiment), read from the
    store; None when there are none."""
    found = None
    for _ in range(8):  # a lineage is a short chain: SFT, RL
        missing = missing_ancestors(runs, run_id, found)
        more = load_run_ids(missing, uri, root) if missing else None
        if more is None or more.empty:
            break
        found = more if found is None else pd.concat([found, more], ignore_index=True)
    return found


def score_points(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a score fit may use: finished, not a report, sweep parent or shared SFT run, with a score and
    compute > 0. Their x (MODEL_FLOPS) is the compute that produced the model: `compute/flops/lineage` where
    recorded (the run's own plus its shared SFT's), else `compute/flops` (a run that trained its own SFT)."""
    columns = ["run_id", "run_name", "tags.model.name", "tags.recipe", COMPUTE, LINEAGE_FLOPS, SCORE, *DATA_VOLUME]
    df = pd.DataFrame({c: runs[c] if c in runs else pd.Series(np.nan, index=runs.index) for c in columns})
    for c in columns[4:]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    lineage = df[LINEAGE_FLOPS]
    df.insert(4, MODEL_FLOPS, lineage.where(np.isfinite(lineage) & (lineage > 0), df[COMPUTE]))
    keep = ((runs["fate"] == "finished") & ~_phase(runs).isin(UNFITTED_PHASES) & np.isfinite(df[SCORE])
            & np.isfinite(df[MODEL_FLOPS]) & (df[MODEL_FLOPS] > 0))
    return df[keep].sort_values(MODEL_FLOPS, kind="stable", ignore_index=True)


def no_points_reason(runs: pd.DataFrame) -> str:
    """Why no run is a point of the score fits, counted from the runs."""
    if runs.empty:
        return "no runs in the store"
    finished = runs[runs["fate"] == "finished"]
    if finished.empty:
        return f"no finished run ({', '.join(f'{v} {k}' for k, v in runs['fate'].value_counts().items())})"
    phase = _phase(finished)
    left = finished[~phase.isin(UNFITTED_PHASES)]
    parts = [f"{len(finished)} finished run(s)"]
    for name, what in (("sft", "shared SFT run(s) (phase=sft, not points)"), ("sweep", "sweep parent(s)")):
        if (n := int((phase == name).sum())):
            parts.append(f"{n} {what}")
    if len(left):
        score = pd.to_numeric(left.get(SCORE, pd.Series(np.nan, index=left.index)), errors="coerce")
        flops = pd.to_numeric(left.get(COMPUTE, pd.Series(np.nan, index=left.index)), errors="coerce")
        if (n := int((~np.isfinite(score)).sum())):
            parts.append(f"{n} without {SCORE}")
        if (n := int((np.isfinite(score) & ~(flops > 0)).sum())):
            parts.append(f"{n} with a score but no {COMPUTE} > 0")
    return "no run can be a point: " + ", ".join(parts)


def _grouping(points: pd.DataFrame, labels: dict[str, str]) -> tuple[str, str | None, list, dict[str, str]]:
    """How the score fits split the points: by recipe where at least one recipe has runs at MIN_GROUP distinct
    compute values, else by model size where one size has, else all runs pooled (with the reason when they mix
    recipes or model sizes). Returns (by, pooled_reason, [(group, label, points)], {unfitted group: why})."""
    keys = {"recipe": points["tags.recipe"].fillna(NO_TAG["recipe"]).astype(str),
            "model size": points["tags.model.name"].fillna(NO_TAG["model size"]).astype(str)}
    pooled = [("all runs", "all runs", points)]
    if all(k.nunique() <= 1 for k in keys.values()):
        return "all runs", None, pooled, {}
    counts = {}
    for by, key in keys.items():
        if key.nunique() < 2:
            continue
        distinct = points.groupby(key)[MODEL_FLOPS].nunique().sort_values(ascending=False, kind="stable")
        counts[by] = distinct
        if (distinct >= MIN_GROUP).any():
            name = labels.get if by == "recipe" else (lambda g, _: g)
            groups = [(g, name(g, g), points[key == g]) for g, d in distinct.items() if d >= MIN_GROUP]
            unfitted = {g: f"{int((key == g).sum())} run(s) at {d} distinct compute value(s), {MIN_GROUP} needed"
                        for g, d in distinct.items() if d < MIN_GROUP}
            return by, None, groups, unfitted
    why = " and no ".join(f"{by} has runs at {MIN_GROUP} distinct compute values ("
                          + ", ".join(f"{g}: {d}" for g, d in c.items()) + ")" for by, c in counts.items())
    return "all runs", f"no {why}", pooled, {}


def fit_groups(points: pd.DataFrame, labels: dict[str, str] | None = None, final_run_id: str | None = None,
               n_boot: int = MAX_BOOT, progress: Progress | None = None
               ) -> tuple[dict[str, Any], dict[str, dict[str, Fit]]]:
    """The score fits of every group of points (_grouping): each group's fit_scores summary (with `by`, `group`,
    `label`, `run_ids`, what it pools and its forecast verdict) under "groups", the group holding the final run
    first (else the largest); the top level repeats that headline group's fit, with `n_points` and `run_ids` of
    every point, `grouped_by`, `pooled_reason` (why one curve pools recipes or model sizes, None otherwise) and
    `unfitted_groups` (group: why it has too few runs). Returns it and each group's fitted forms. `n_boot`
    bootstrap resamples make each form's intervals; `progress` is told each group fitted."""
    by, reason, groups, unfitted = _grouping(points, labels or {})
    summaries, fitted = [], {}
    for done, (group, label, g) in enumerate(groups):
        if progress is not None:
            progress("fitting score vs compute", done, len(groups))
        summary, forms = fit_scores(g[MODEL_FLOPS].to_numpy(), g[SCORE].to_numpy(), n_boot)
        summary |= {"by": by, "group": group, "label": label, "run_ids": list(g["run_id"]), "pooled": _pooled(g)}
        _judge_forecast(summary)
        summaries.append(summary)
        fitted[group] = forms
    if progress is not None:
        progress("fitting score vs compute", len(groups), len(groups))
    summaries.sort(key=lambda f: (final_run_id not in f["run_ids"], -f["n_points"]))
    fits = dict(summaries[0]) | {"n_points": len(points), "run_ids": list(points["run_id"]), "pooled": _pooled(points),
                                 "grouped_by": by, "pooled_reason": reason, "headline": summaries[0]["group"],
                                 "groups": summaries, "unfitted_groups": unfitted}
    return fits, fitted


def fit_scores(x: np.ndarray, y: np.ndarray, n_boot: int = MAX_BOOT) -> tuple[dict[str, Any], dict[str, Fit]]:
    """Each form of SCORE_FORMS fitted to score y vs compute x (intervals from `n_boot` bootstrap resamples), the
    held-out extrapolation check and the next 10x.

    A form needs one distinct compute value more than its parameters; a form that cannot be fitted is listed in
    "skipped" with the reason. The best form is the one with the lowest held-out rmse (else training rmse)."""
    summary: dict[str, Any] = {"x": X_NAME, "y": SCORE, "n_points": len(x), "forms": {}, "skipped": {},
                               "extrapolation": None, "extrapolation_note": None, "extrapolation_reach": None,
                               "best_form": None,
                               "best_run": None, "next_10x": {}}
    distinct = len(np.unique(x))
    fitted: dict[str, Fit] = {}
    for form in SCORE_FORMS:
        need = len(FORMS[form]) + 1
        if distinct < need:
            summary["skipped"][form] = f"needs {need} distinct compute values, has {distinct}"
        elif np.ptp(y) == 0:
            summary["skipped"][form] = f"every score is {y[0]:g}: no trend to fit"
        else:
            try:
                fitted[form] = fit(x, y, form, score=True, n_boot=n_boot)
            except (ValueError, RuntimeError) as e:
                summary["skipped"][form] = str(e)
    summary["forms"] = {form: f.to_dict() | {"law": LAWS[form]} for form, f in fitted.items()}
    if len(x):
        best = int(np.argmax(y))
        summary["best_run"] = {"score": float(y[best]), "compute": float(x[best])}
    summary["extrapolation"], summary["extrapolation_note"] = _extrapolation_check(x, y, list(fitted))
    if summary["extrapolation"]:  # how far the check extrapolated: the largest run over the largest one fitted
        summary["extrapolation_reach"] = float(x.max() / x[x < summary["extrapolation"][0]["cut"]].max())
    ranked = [r["form"] for r in summary["extrapolation"] or []] or sorted(fitted, key=lambda f: fitted[f].rmse)
    summary["best_form"] = ranked[0] if ranked else None
    if fitted:
        target = HORIZON * float(x.max())
        for form, f in fitted.items():
            low, high = _band(f, np.array([target]))
            predicted = float(np.clip(f.predict([target])[0], 0, 1))  # a power law would leave [0, 1]
            at_largest = float(np.clip(f.predict([x.max()])[0], 0, 1))
            summary["next_10x"][form] = {"compute": target, "predicted": predicted, "low": float(low[0]),
                                         "high": float(high[0]), "gain_over_best": predicted - float(y.max()),
                                         "fit_at_largest": at_largest, "gain_over_fit": predicted - at_largest}
    return summary, fitted


def _extrapolation_check(x: np.ndarray, y: np.ndarray, forms: list[str]) -> tuple[list[dict] | None, str | None]:
    """compare_forms below a cut that holds out the top HELD_OUT of distinct compute values, or why not."""
    values = np.unique(x)
    cut = float(values[-max(1, round(HELD_OUT * len(values)))]) if len(values) else math.nan
    train = np.unique(x[x < cut])
    usable = [f for f in forms if len(train) >= len(FORMS[f]) + 1]
    if not usable:
        return None, (f"too few runs below the cut for a held-out check ({len(train)} distinct compute values)"
                      if forms else "no form was fitted")
    try:
        return compare_forms(x, y, usable, cut, score=True).to_dict("records"), None
    except (ValueError, RuntimeError) as e:
        return None, f"held-out check failed: {e}"


def _pooled(points: pd.DataFrame) -> dict[str, Any]:
    """What the pooled fit mixes: how many recipes and model sizes its runs span."""
    recipes = points["tags.recipe"].dropna().astype(str)
    models = points["tags.model.name"].dropna().astype(str)
    return {"recipes": sorted(set(recipes)), "model_sizes": sorted(set(models))}


def _judge_forecast(fits: dict[str, Any]) -> None:
    """Set fits["forecast_ok"] and fits["forecast_note"]: the next-10x forecast of the pooled fit is stated only
    when the best form's held-out mean error is at most MAX_HELD_OUT_ERROR; the note says why not otherwise."""
    why = []
    if fits["extrapolation"]:
        error = fits["extrapolation"][0]["mae"]
        if not error <= MAX_HELD_OUT_ERROR:
            why.append(f"the best form misses the held-out runs by {error:.3g} on average "
                       f"(the threshold is {MAX_HELD_OUT_ERROR:g})")
    else:
        why.append(fits["extrapolation_note"] or "no form was fitted")
    pooled = fits["pooled"]
    if why and (len(pooled["recipes"]) > 1 or len(pooled["model_sizes"]) > 1):
        why.append(f"the runs mix {len(pooled['recipes'])} recipe(s) and {len(pooled['model_sizes'])} model "
                   "size(s) on one curve (see the per-recipe fits)")
    fits["forecast_ok"] = not why and fits["best_form"] is not None
    fits["forecast_note"] = "; ".join(why) if why else None


def _band(f: Fit, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fit's 95% bootstrap band at x, kept in [0, 1] (NaN without bootstrap draws)."""
    if len(f.draws) == 0:
        return np.full(len(x), np.nan), np.full(len(x), np.nan)
    low, high = f.predict_interval(x)
    return np.clip(low, 0, 1), np.clip(high, 0, 1)


def _phase(runs: pd.DataFrame) -> pd.Series:
    return runs["tags.phase"].fillna("") if "tags.phase" in runs else pd.Series("", index=runs.index, dtype=str)


# ---- text ----

def _usd(v: float | str | None) -> str:
    """Dollars with the digits they have: cents from $1 up, else 3 significant digits ($0.00139)."""
    if isinstance(v, str):  # a table cell that says why there is no amount
        return v
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"${v:,.2f}" if abs(v) >= 1 else f"${v:.3g}"


def _num(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _cost_blocks(cost: dict[str, Any]) -> list[Block]:
    n_runs = sum(cost["runs"].values())
    blocks: list[Block] = [
        ("h2", "Cost"),
        ("p", f"Total cost: {_usd(cost['total_usd'])} ({_usd(cost['runs_usd'])} in {n_runs} recorded runs of "
              f"every fate, {_usd(cost['ledger_usd'])} in {cost['ledger_items']} ledger items); "
              f"{_hours(cost['device_hours'])}, {cost['flops_total']:.3g} FLOPs."),
    ]
    if cost["final_run_usd"] is None:
        blocks.append(("p", "No final run: no run is tagged phase=final (and none was named), so there is no "
                            "total/final multiplier."))
    else:
        which = f"run {cost['final_run_id']}" if cost["final_run_id"] else "ledger items of category final_run"
        ratio = cost["ratio_total_to_final"]
        blocks.append(("p", f"Final run cost: {_usd(cost['final_run_usd'])} ({which}). The whole project cost "
                            + (f"{ratio:.3g}x the final run." if ratio else "n/a x the final run (it cost $0).")))
    fates = ", ".join(f"{cost['runs'][f]} {f}" for f in FATES)
    blocks.append(("p", f"Runs by fate: {fates}; {cost['runs_without_cost']} without a recorded cost (counted as $0)."))
    if n_sft := cost["runs_by_phase"].get("sft", 0):
        blocks.append(("p", f"Each run is billed once, for its own work: the {n_sft} shared SFT run(s) (phase=sft) "
                            f"cost {_usd(cost['by_phase']['sft'])} once, and the {cost['runs_from_shared_sft']} run(s) "
                            "started from them bill only their own RL and evals (their lineage metrics, own plus "
                            "SFT, are never added to these totals)."))
    blocks += [
        ("table", cost_table(cost)),
        ("table", _split(cost["by_phase"], "phase", cost["runs_usd"])),
        ("table", _split(cost["by_status"], "fate", cost["runs_usd"]).assign(
            runs=[cost["runs"][f] for f in cost["by_status"]])),
        ("plot", "cost_breakdown"), ("plot", "total_vs_final"), ("plot", "spend_over_time"),
    ]
    return blocks


def _hours(device_hours: dict[str, float]) -> str:
    """Device-hours by unit, e.g. '0.25 GPU-hours + 3.1 vCPU-hours'."""
    return " + ".join(f"{h:.4g} {u}-hours" for u, h in device_hours.items()) or "0 device-hours"


def _split(usd: dict[str, float], name: str, total: float, share: str = "share_of_runs_pct") -> pd.DataFrame:
    """Dollars by `name`, with each one's share of `total` in percent (unrounded: tiny CPU runs cost micro-dollars)."""
    df = pd.DataFrame({name: list(usd), "usd": list(usd.values())})
    return df.assign(**{share: df["usd"] / total * 100 if total else math.nan})


def _law(form: str, d: dict[str, Any]) -> str:
    shown = ", ".join(f"{k} = {v:.4g}" + (" [{:.4g}, {:.4g}]".format(*d["ci"][k]) if k in d["ci"] else "")
                      for k, v in d["params"].items())
    return (f"{form}: {d['law']} with {shown} (C = the compute that produced each run's model, in FLOPs; 95% "
            f"bootstrap intervals over {d['n_boot']} resamples; r2 = {d['r2']:.3g}, rmse = {d['rmse']:.3g}, "
            f"n = {d['n']}).")


def _group_title(f: dict[str, Any]) -> str:
    """A score-fit group's name: 'recipe 2020eeb371 (model.size=micro)', 'model size llama-nano', 'all runs'."""
    if f["by"] == "all runs":
        return "all runs"
    return f"{f['by']} {f['group']}" + (f" ({f['label']})" if f["label"] != f["group"] else "")


def _fit_blocks(points: pd.DataFrame, fits: dict[str, Any], runs: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = [("h2", "Score vs compute")]
    if points.empty:
        blocks.append(("p", f"No fits: no finished run has both eval/accuracy and compute/flops above 0 "
                            f"({no_points_reason(runs)})."))
        return blocks + [("plot", "score_vs_compute"), ("plot", "score_vs_data")]
    best = points.loc[points[SCORE].idxmax()]
    lineage = int(np.isfinite(points[LINEAGE_FLOPS]).sum())
    x = (f"{LINEAGE_FLOPS} (its own FLOPs plus its shared SFT run's) for the {lineage} run(s) that record it, else "
         f"{COMPUTE} (a run that trained its own SFT counted it)" if lineage else
         f"{COMPUTE} (no run records {LINEAGE_FLOPS}: each trained its own SFT, counted in its own compute)")
    blocks.append(("p", f"{len(points)} finished runs with eval/accuracy and compute above 0 are points (failed, "
                        "killed, pruned, report, sweep-parent and shared SFT runs are not: a shared SFT's model is "
                        f"the start of every RL run trained from it). Each point sits at the compute that produced "
                        f"its model: {x}. Best run now: {best['run_name']} with accuracy {best[SCORE]:.4g} at "
                        f"{best[MODEL_FLOPS]:.3g} FLOPs."))
    groups = fits["groups"]
    if fits["grouped_by"] != "all runs":
        blocks.append(("p", f"Fitted per {fits['grouped_by']}: {len(groups)} {fits['grouped_by']}(s) have runs at "
                            f"{MIN_GROUP} or more distinct compute values (the fewest the power law needs), each "
                            "fitted on its own; no curve mixes them."
                            + (" Shown but not fitted: " + "; ".join(f"{g}: {why}" for g, why in
                                                                      fits["unfitted_groups"].items()) + "."
                               if fits["unfitted_groups"] else "")))
    elif fits["pooled_reason"]:
        pooled = fits["pooled"]
        mix = [f"{len(pooled['recipes'])} recipes"] if len(pooled["recipes"]) > 1 else []
        if len(pooled["model_sizes"]) > 1:
            mix.append(f"{len(pooled['model_sizes'])} model sizes ({', '.join(pooled['model_sizes'])})")
        blocks.append(("p", f"Pooled: these fits put the final score of runs of {' and '.join(mix) or 'every kind'} "
                            f"on one curve, because {fits['pooled_reason']}. The curve describes this set of runs, "
                            "not how one recipe scales (the recipe section fits each recipe's eval curves on its "
                            "own)."))
    for f in groups:
        if len(groups) > 1:
            blocks.append(("h3", f"{_group_title(f)}: {f['n_points']} runs"))
        blocks += _group_blocks(f)
    return blocks + [("plot", "score_vs_compute"), ("plot", "score_vs_data")]


def _group_blocks(fits: dict[str, Any]) -> list[Block]:
    """One group's laws, skipped forms, forecast (or why none) and held-out check."""
    blocks: list[Block] = [("p", _law(form, d)) for form, d in fits["forms"].items()]
    blocks += [("p", f"{form} not fitted: {why}.") for form, why in fits["skipped"].items() if fits["n_points"]]
    if fits["best_form"] and not fits["forecast_ok"]:
        blocks.append(("p", f"No forecast: no law extrapolates on these runs, because {fits['forecast_note']}."))
    if fits["best_form"] and fits["forecast_ok"]:
        form, nxt = fits["best_form"], fits["next_10x"][fits["best_form"]]
        band = "" if math.isnan(nxt["low"]) else f" [{nxt['low']:.3g}, {nxt['high']:.3g}]"
        blocks.append(("p", f"Next 10x of compute: at {nxt['compute']:.3g} FLOPs ({HORIZON:g}x the largest run) the "
                            f"{form} law (best at extrapolating, held-out error {fits['extrapolation'][0]['mae']:.3g}) "
                            f"predicts accuracy {nxt['predicted']:.3g}{band}, "
                            f"vs {fits['best_run']['score']:.3g} for the best run now "
                            f"({nxt['gain_over_best']:+.3g}); along the law itself, from {nxt['fit_at_largest']:.3g} "
                            f"at the largest run, the next 10x buys {nxt['gain_over_fit']:+.3g}."))
        blocks.append(("table", pd.DataFrame([{"form": f} | v for f, v in fits["next_10x"].items()])))
    if fits["extrapolation"]:
        first = fits["extrapolation"][0]
        blocks += [("p", f"Held-out extrapolation check: each form fitted on the {first['n_train']} runs below "
                         f"{first['cut']:.3g} FLOPs, scored on the {first['n_test']} runs at or above it "
                         f"(errors in accuracy; mre is relative), best first. It extrapolates up to "
                         f"{fits['extrapolation_reach']:.3g}x past the largest run it was fitted on; the forecast "
                         f"reaches {HORIZON:g}x past the largest run"
                         + (", so the check backs it only part of the way." if fits["extrapolation_reach"] < HORIZON
                            else ".")),
                   ("table", pd.DataFrame(fits["extrapolation"]))]
    elif fits["extrapolation_note"] and fits["n_points"]:
        blocks.append(("p", f"No held-out extrapolation check: {fits['extrapolation_note']}."))
    return blocks


def _ratio_text(r: float | None) -> str:
    """A ratio as a multiple and a percentage: '0.0177 (1.77%)'; 'n/a' without a denominator."""
    return "n/a" if r is None else f"{r:.3g} ({100 * r:.3g}%)"


def _run_name(step: dict[str, Any]) -> str:
    return f"{step['run_name'] or '(unnamed)'} ({step['run_id']})"


def _lineage_blocks(cost: dict[str, Any]) -> list[Block]:
    """What the final model cost: the final run alone, its lineage (pretraining first when declared, the shared SFT
    run, the final run), the whole project, the ratios, and the sweep that chose its parameters."""
    blocks: list[Block] = [("h2", "What the final model cost")]
    line = cost["final_lineage"]
    if line is None and cost["final_run_usd"] is not None:
        return blocks + [("p", "The final run is only in the ledger (category final_run), not a recorded run: there "
                               "is no lineage to trace.")]
    if line is None:
        return blocks + [("p", "No final run: no run is tagged phase=final (and none was named), so there is no final "
                               "model to trace.")]
    steps, final, pre = line["steps"], line["steps"][-1], line["pretraining"]
    ancestors = steps[:-1]
    if ancestors:
        how = ("It started from " + ", ".join(f"the {s['kind']} run {_run_name(s)}" for s in ancestors)
               + ": each of those runs is billed once in the project, for its own work, however many runs start "
                 "from it; the lineage adds it to the final run's own work.")
    elif line["missing"]:
        how = ""
    elif line["own_sft_flops"]:
        how = (f"It trained its own SFT ({line['own_sft_flops']:.3g} FLOPs, in its own cost): its lineage of "
               "recorded runs is the run itself.")
    else:
        how = "It started from no other run: its lineage of recorded runs is the run itself."
    if line["missing"]:
        how += (f" Its ancestor run {', '.join(line['missing'])} is not in the store: its share is taken from the "
                "final run's recorded lineage metrics.")
    blocks.append(("p", f"The final run is {_run_name(final)}. {how}".strip()))
    rows = []
    if pre:
        rows.append({"step": "1. pretraining of the base model (declared, not a run)",
                     "run": pre["model"] or "(base model)", "FLOPs": pre["flops"],
                     "usd": pre["usd"] if pre["usd"] is not None else "not declared", "in the project": "no"})
    for s in steps:
        rows.append({"step": f"{len(rows) + 1}. {s['kind']}", "run": _run_name(s), "FLOPs": s["flops"], "usd": s["usd"],
                     "in the project": "yes" if s["in_project"] else f"no (experiment {s['experiment']})"})
    blocks.append(("table", pd.DataFrame(rows)))
    if pre:
        blocks.append(("p", f"Pretraining is the first ancestor, as declared by the runs: {_pretraining_text(pre)}"))
    project = line["project"]
    summary = [{"what": "the final run alone", "runs": 1, "FLOPs": line["final"]["flops"], "usd": line["final"]["usd"]},
               {"what": "its lineage (the runs its model came from)", "runs": len(steps),
                "FLOPs": line["lineage"]["flops"], "usd": line["lineage"]["usd"]}]
    if line["with_pretraining"]:
        with_pre = line["with_pretraining"]
        summary.append({"what": "its lineage with pretraining", "runs": len(steps), "FLOPs": with_pre["flops"],
                        "usd": with_pre["usd"] if with_pre["usd"] is not None else "pretraining cost not declared"})
    summary.append({"what": "the whole project (every run, every fate)", "runs": project["runs"],
                    "FLOPs": project["flops"], "usd": project["usd"]})
    blocks.append(("table", pd.DataFrame(summary)))
    names = {"final_to_lineage": "final run / its lineage", "final_to_project": "final run / whole project",
             "lineage_to_project": "lineage / whole project"}
    blocks.append(("table", pd.DataFrame([{"ratio": names[k], "of dollars": _ratio_text(v["usd"]),
                                           "of FLOPs": _ratio_text(v["flops"])} for k, v in line["ratios"].items()])))
    lineage_to_project = line["ratios"]["lineage_to_project"]["usd"]
    blocks.append(("p", f"Making the final model took {_ratio_text(lineage_to_project)} of the project's run spend: "
                        "the rest went to runs whose models were not kept (grid points, sweep trials, failed, "
                        "killed and pruned runs)."
                        + (f" Ledger items ({_usd(cost['ledger_usd'])}) are outside these run totals; with them the "
                           f"project cost {_usd(cost['total_usd'])}." if cost["ledger_items"] else "")))
    sweep = line["sweep"]
    if sweep:
        blocks.append(("p", "Its parameters are the best trial of a sweep: "
                            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sweep.items()) + "."
                            + (f" The sweep's {line['sweep_cost']['runs']} trial run(s) cost "
                               f"{_usd(line['sweep_cost']['usd'])} in all ({line['sweep_cost']['flops']:.3g} FLOPs)."
                               if line["sweep_cost"] else "")))
    return blocks


def _pretraining_text(p: dict[str, Any]) -> str:
    """A declared pretraining in words: its FLOPs and how they were had, its cost when declared, its source."""
    how = "declared"
    if p["flops_from"] == "6ND" and p["tokens"] and p["params"]:
        how = f"6 N D = 6 x {p['params']:.4g} parameters x {p['tokens']:.4g} tokens"
    elif p["flops_from"] == "6ND" and p["tokens"]:
        how = f"6 N D with D = {p['tokens']:.4g} tokens"
    return (f"{p['model'] or 'the base model'}: {p['flops']:.3g} FLOPs ({how}), "
            + (f"{_usd(p['usd'])} declared" if p["usd"] is not None else "no cost declared")
            + f"; source: {p['source'] or '(none given)'}")


def _pretraining_blocks(cost: dict[str, Any]) -> list[Block]:
    """RL against pretraining: the project's and the final lineage's compute (and dollars) as a share of the
    declared pretraining, or one sentence saying that nothing is declared."""
    blocks: list[Block] = [("h2", "RL against pretraining")]
    shares = cost["pretraining"]
    if not shares["declared"]:
        return blocks + [("p", "No run declares its base model's pretraining (model.pretrain_tokens or "
                               "model.pretrain_flops, with model.pretrain_source), so RL's share of pretraining is "
                               "left out: no number is guessed.")]
    for g in shares["declared"]:
        blocks.append(("p", f"Pretraining of {_pretraining_text(g)}"))
        rows = [{"what": f"the whole project on this base model ({g['runs']} runs, every fate)",
                 "FLOPs": g["run_flops"], "% of pretraining FLOPs": 100 * g["share_flops"], "usd": g["run_usd"],
                 "% of pretraining usd": _pct(g["share_usd"])},
                {"what": "of which RL (less SFT and evals)", "FLOPs": g["rl_flops"],
                 "% of pretraining FLOPs": 100 * g["share_rl_flops"], "usd": "", "% of pretraining usd": ""}]
        final = shares["final_lineage"]
        if final and final["pretraining"]["flops"] == g["flops"] and final["pretraining"]["source"] == g["source"]:
            rows.append({"what": "the final model's lineage (SFT + RL, pretraining excluded)", "FLOPs": final["flops"],
                         "% of pretraining FLOPs": 100 * final["share_flops"], "usd": final["usd"],
                         "% of pretraining usd": _pct(final["share_usd"])})
        blocks.append(("table", pd.DataFrame(rows)))
        times = g["flops"] / g["run_flops"] if g["run_flops"] else None
        blocks.append(("p", f"All the post-training this project did on it is {100 * g['share_flops']:.3g}% of the "
                            "compute that pretrained it"
                            + (f" (pretraining took {times:.3g}x more)" if times else "")
                            + (f", and {_pct(g['share_usd'])}% of its declared cost." if g["share_usd"] is not None
                               else "; its pretraining cost is not declared (model.pretrain_usd), so the dollar share "
                                    "is left out.")))
    if shares["undeclared_runs"]:
        blocks.append(("p", f"{shares['undeclared_runs']} run(s) with compute declare no pretraining and are in "
                            "none of these shares."))
    return blocks


def _pct(share: float | None) -> str:
    return "not declared" if share is None else f"{100 * share:.3g}"


def _recipe_blocks(fits: dict[str, Any]) -> list[Block]:
    """Which recipe scales: the table of sigmoid fits per recipe, the ranking statement, the plot."""
    comparison = fits["recipe_comparison"]
    blocks: list[Block] = [("h2", "Which recipe scales"),
                           ("p", "Each recipe's runs (tag `recipe`: same config but for budget and seed) give one "
                                 "curve of held-out accuracy at every eval against the run's cumulative RL compute "
                                 "(its FLOPs less the SFT warm start and the evals); the "
                                 "sigmoid R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) is fitted to the pooled curves "
                                 f"after dropping the first {100 * WARMUP:g}% of compute as warm-up (ScaleRL, arXiv "
                                 "2510.13786). Each point is weighted by the number of eval problems behind it "
                                 "(quick evals score the first grpo.eval_problems problems, the evals after SFT and "
                                 "at the end all eval.problems), so both kinds sit on one curve at their own "
                                 "precision. A is the asymptote, B and C_mid the efficiency; intervals are 95% "
                                 f"bootstrap over runs ({fits['bootstrap']['resamples']} resamples), so seeds count, "
                                 "with the binomial noise of the shared eval "
                                 f"set added. Each recipe is forecast at {RECIPE_HORIZON:g}x its own largest RL "
                                 "compute, and only when the same fit made one "
                                 f"{RECIPE_HORIZON:g}x earlier (below 1/{RECIPE_HORIZON:g} of the largest compute) "
                                 f"predicts the points in the top half within {MAX_HELD_OUT_ERROR:g} on average: "
                                 "the check extrapolates as far as the forecast does.")]
    if not any(f["weights"] == "eval problems" for f in fits["recipes"]) and fits["recipes"]:
        blocks.append(("p", "These runs logged no eval/problems, so their points are weighted equally and the bands "
                            "leave out the noise of the eval set."))
    if not fits["recipes"]:
        why = comparison["statement"] if comparison["skipped"] else \
            f"No recipe fitted: {comparison['nothing_drawn'] or 'no recipe has an eval after RL began'}."
        return blocks + [("p", why), ("plot", "recipes")]
    rows = []
    for f in fits["recipes"]:
        ci = f.get("ci", {})
        held = f["heldout"].get("mae")
        mult = f"{f['horizon']:g}x"
        row = {"recipe": f["recipe"], "what sets it apart": f["label"], "runs": f["n_runs"],
               "points": f["n_points"], "A": f["params"]["A"],
               "A 95%": "[{:.3f}, {:.3f}]".format(*ci["A"]) if "A" in ci else "",
               "B": f["params"]["B"], "C_mid (RL FLOPs)": f["params"]["C_mid"],
               "r2": f["r2"], "largest run (RL FLOPs)": f["largest_x"],
               f"held-out error ({mult} check)": held if held is not None else "no check",
               f"forecast at {mult} its largest": f["forecast"] if f["forecast_ok"] else "withheld",
               f"95% band at {mult}": "[{:.3f}, {:.3f}]".format(*f["forecast_band"])
               if f["forecast_ok"] and "forecast_band" in f else "",
               f"next {mult} gain": f["gain_next"] if f["forecast_ok"] else "withheld",
               "to A": f["to_asymptote"]}
        samples = f.get("samples", {})
        if "gain_next" in samples and samples["forecast_ok"]:
            row[f"next {samples['horizon']:g}x RL samples gain"] = samples["gain_next"]
        rows.append(row)
    blocks += [("table", pd.DataFrame(rows)), ("p", comparison["statement"])]
    taper = [f["label"] for f in fits["recipes"] if f["forecast_ok"] and f["tapering"]]
    paying = [f["label"] for f in fits["recipes"] if f["forecast_ok"] and not f["tapering"]]
    if taper or paying:
        blocks.append(("p", "Does RL keep paying? "
                            + (f"Still paying: {', '.join(paying)}. " if paying else "")
                            + (f"Tapering off (under a point from the next {RECIPE_HORIZON:g}x of its own compute, "
                               "or within a point of A): "
                               f"{', '.join(taper)}." if taper else "")))
    else:
        blocks.append(("p", "Does RL keep paying? Not answerable from these runs: no recipe's forecast passed its "
                            "held-out check."))
    if comparison["skipped"]:
        blocks.append(("p", "Not fitted: " + "; ".join(f"{r}: {e}" for r, e in comparison["skipped"].items())
                            + "."))
    return blocks + [("plot", "recipes")]


def _cells(df: pd.DataFrame) -> pd.DataFrame:
    """Table cells as text; money columns (named usd) as dollars with their significant digits."""
    return pd.DataFrame({c: df[c].map(_usd if c == "usd" else _num).astype(str) for c in df.columns})


_MD_SPECIAL = re.compile(r"([\\`*_~\[\]|$@])")
_MD_AUTOLINK = re.compile(r"(?<=[A-Za-z]):(?=\S)|(?<=www)\.", re.IGNORECASE)  # scheme: and www. start autolinks


def md(text: object) -> str:
    """Text made literal in Markdown (the one path every report.md value takes): HTML escaped; the characters that
    make code, emphasis, strikethrough, links, images, math, mentions or e-mail links, or end a table cell ('\\',
    '`', '*', '_', '~', '[', ']', '|', '$', '@') backslash-escaped; the ':' after a scheme (http:, mailto:) and
    the '.' of 'www.' escaped so that no bare URL becomes a GitHub autolink; one line."""
    text = _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).splitlines()), quote=False))
    return _MD_AUTOLINK.sub(lambda m: "\\" + m.group(0), text)


def _markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {md(title)}", ""]
    for kind, item in blocks:
        if kind in ("h2", "h3"):
            lines += [f"{'#' * int(kind[1])} {md(item)}", ""]
        elif kind == "p":
            lines += [md(item), ""]
        elif kind == "table":
            cells = _cells(item)
            lines += ["| " + " | ".join(map(md, cells.columns)) + " |", "|" + " --- |" * len(cells.columns)]
            lines += ["| " + " | ".join(map(md, row)) + " |" for row in cells.itertuples(index=False)] + [""]
        else:
            lines += [f"![{PLOTS[item]}](plots/{item}.png)", ""]
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
         "td:first-child{text-align:left}"
         "img{max-width:100%;display:block;margin:1em 0}figcaption{color:#555;font-size:.9em}")


def _html(title: str, blocks: list[Block], pngs: dict[str, bytes]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for kind, item in blocks:
        if kind in ("h2", "h3", "p"):
            parts.append(f"<{kind}>{html.escape(item)}</{kind}>")
        elif kind == "table":
            parts.append(_cells(item).to_html(index=False, border=0))
        else:
            data = base64.b64encode(pngs[item]).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(PLOTS[item])}'>"
                         f"<figcaption>{html.escape(PLOTS[item])}</figcaption></figure>")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(parts + [f"<p><small>Generated {stamp}.</small></p></body></html>"])


# ---- plots ----

def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _empty(ax: Axes, why: str) -> None:
    """Why the plot has nothing to draw, in the middle of its axes, wrapped to their width."""
    width = max(20, int(ax.get_position().width * ax.figure.get_figwidth() * 11))  # ~11 characters an inch
    ax.text(0.5, 0.5, textwrap.fill(why, width), ha="center", va="center", transform=ax.transAxes, color="grey",
            fontsize=9)


def _plot_score_vs_compute(points: pd.DataFrame, fitted: dict[str, dict[str, Fit]], fits: dict[str, Any],
                           final_run_id: str | None, runs: pd.DataFrame) -> bytes:
    """Every point at the compute that produced its model; each group's fitted laws (one group: every form, with its
    held-out cut; several: each group's best form, in the group's color); extrapolation only where checked."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if points.empty:
        _empty(ax, no_points_reason(runs))
    else:
        groups = fits["groups"]
        single = len(groups) == 1
        shown = groups[:10]
        in_groups = set().union(*(g["run_ids"] for g in shown))
        rest = points[~points["run_id"].isin(in_groups)]
        if len(rest):
            ax.scatter(rest[MODEL_FLOPS], rest[SCORE], s=14, color="darkgrey", zorder=3,
                       label=f"not fitted: {len(rest)} run(s) of {fits['grouped_by']}s with too few runs")
        drawn = False
        for i, g in enumerate(shown):
            color = "black" if single else matplotlib.colormaps["tab10"].colors[i]
            gp = points[points["run_id"].isin(g["run_ids"])]
            x, y = gp[MODEL_FLOPS].to_numpy(), gp[SCORE].to_numpy()
            ax.scatter(x, y, s=14, color=color, zorder=3,
                       label="finished runs" if g["by"] == "all runs" else textwrap.fill(_group_title(g), 64))
            forms = fitted[g["group"]]
            if not single:
                forms = {g["best_form"]: forms[g["best_form"]]} if g["best_form"] else {}
            top = x.max()
            ahead = HORIZON * top if g["forecast_ok"] else top  # no extrapolation drawn that the check does not back
            inside, beyond = np.geomspace(x.min(), top, 200), np.geomspace(top, ahead, 60)
            palette = ("tab:blue", "tab:orange", "tab:green") if single else (color,) * 3
            for (form, f), c in zip(forms.items(), palette):
                drawn = True
                ax.plot(inside, np.clip(f.predict(inside), 0, 1), color=c,
                        label=f"{form} fit (r2 {f.r2:.3f})" if single else f"  its {form} fit (r2 {f.r2:.3f})")
                if g["forecast_ok"]:
                    ax.plot(beyond, np.clip(f.predict(beyond), 0, 1), color=c, ls="--")
                grid = np.concatenate([inside, beyond])
                ax.fill_between(grid, *_band(f, grid), color=c, alpha=0.15 if single else 0.08, lw=0)
            if single and forms:
                ax.axvline(top, color="grey", ls=":", lw=1, label="largest run (dashed beyond: extrapolation)"
                           if g["forecast_ok"] else "largest run (no extrapolation: held-out check not passed)")
            if single and g["extrapolation"]:
                ax.axvline(g["extrapolation"][0]["cut"], color="tab:red", ls=":", lw=1, label="held-out cut")
        if not drawn:
            why = [f"{_group_title(g)}: {next(iter(g['skipped'].values()))}" for g in shown if g["skipped"]]
            _empty(ax, "no law fitted: " + ("; ".join(why) if not single else why[0].split(": ", 1)[1]))
        final = points["run_id"] == final_run_id
        if final.any():
            ax.scatter(points.loc[final, MODEL_FLOPS], points.loc[final, SCORE], s=120, marker="*", color="gold",
                       edgecolor="black", zorder=4, label="final run")
        if len(groups) > len(shown):
            ax.text(0.01, 0.01, f"first {len(shown)} of {len(groups)} groups shown", transform=ax.transAxes,
                    fontsize=8)
        _log_x(ax)
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7 if not single else 8, loc="best")
    per = "" if fits["grouped_by"] == "all runs" else f", fitted per {fits['grouped_by']}"
    ax.set(xlabel="compute that produced each run's model (FLOPs: lineage where recorded, log scale)",
           ylabel="held-out accuracy (fraction correct)",
           title=f"Score vs compute{per} (bands: 95% bootstrap intervals)")
    return _png(fig)


def _log_x(ax: Axes) -> None:
    """A log x axis with few plain labels ('2e+12': no mathtext, which the report keeps literal): powers of ten,
    with 2x and 5x too when the data span under two decades; no minor labels."""
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    subs = (1.0, 2.0, 5.0) if high / low < 100 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # 1e+15; 1.2e+15 where ticks are linear
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plot_recipes(curves: pd.DataFrame, recipes: list[dict[str, Any]], skipped: dict[str, str],
                  nothing_drawn: str | None) -> bytes:
    """Every recipe's eval curves (fitted or not), its sigmoid and, where checked, its forecast with band; with
    nothing to draw, the reason (recipes.no_curve_reason)."""
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    drawn = curves[curves["rl_flops"] > 0] if len(curves) else curves
    if drawn.empty:
        _empty(ax, "no eval to draw: " + (nothing_drawn or "no eval after RL began"))
    colors = matplotlib.colormaps["tab10"].colors
    by_recipe = {f["recipe"]: f for f in recipes}
    order = [f["recipe"] for f in recipes] + sorted(set(drawn["recipe"]) - set(by_recipe)) if len(drawn) else []
    for recipe, color in zip(order[:10], colors):
        f = by_recipe.get(recipe)
        runs = drawn[drawn["recipe"] == recipe]
        name = f["label"] if f else recipe
        # one line for all its runs, broken (NaN) after each run's last eval: one artist, not one a run
        line = runs.sort_values("run_id", kind="stable", ignore_index=True)
        last = line["run_id"].ne(line["run_id"].shift(-1))
        line = pd.concat([line, line[last].assign(rl_flops=np.nan, score=np.nan)]).sort_index(kind="stable")
        ax.plot(line["rl_flops"], line["score"], "o-", ms=4, lw=0.8, alpha=0.6, color=color,
                label=f"{name}: {runs['run_id'].nunique()} run(s)" + ("" if f else ", not fitted"))
        if f is None:
            continue
        p = f["params"]
        top = f["largest_x"]
        end = f["forecast_x"] if f["forecast_ok"] else top
        inside, beyond = np.geomspace(f["fitted_from"], top, 100), np.geomspace(top, end, 60)
        ax.plot(inside, sigmoid(p.values(), inside), color=color, lw=2, label=f"{name}: fit, A = {p['A']:.3f}")
        if f["forecast_ok"]:
            ax.plot(beyond, sigmoid(p.values(), beyond), color=color, lw=2, ls="--")
            if "forecast_band" in f:
                ax.errorbar([end], [f["forecast"]], yerr=[[f["forecast"] - f["forecast_band"][0]],
                                                         [f["forecast_band"][1] - f["forecast"]]],
                            color=color, capsize=4, fmt="s", ms=5)
    if len(order) > 10:
        ax.text(0.01, 0.01, f"first 10 of {len(order)} recipes shown", transform=ax.transAxes, fontsize=8)
    unfitted = [f"{r}: {why}" for r, why in skipped.items() if r in order[:10]]
    if unfitted:
        ax.text(0.01, 0.99, "not fitted: " + "; ".join(unfitted), transform=ax.transAxes, fontsize=8, va="top",
                wrap=True, color="dimgrey")
    if order:
        _log_x(ax)
        ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set(xlabel="cumulative RL compute of the run at each eval (FLOPs less SFT and evals, log scale)",
           ylabel="held-out accuracy (fraction correct)",
           title=f"Recipes: eval curves, sigmoid fits, forecasts at {RECIPE_HORIZON:g}x each recipe's largest run "
                 "(dashed, 95% band) where checked")
    return _png(fig)


def _plot_score_vs_data(points: pd.DataFrame, runs: pd.DataFrame) -> bytes:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    column = next((c for c in DATA_VOLUME if (points[c] > 0).any()), None)
    if column is None:
        _empty(ax, no_points_reason(runs) if points.empty else
               f"none of the {len(points)} scored run(s) logged {' or '.join(DATA_VOLUME)} > 0")
        ax.set_xlabel("RL data volume")
    else:
        ok = points[points[column] > 0]
        for model, group in ok.groupby(ok["tags.model.name"].fillna("unknown model")):
            ax.scatter(group[column], group[SCORE], s=14, label=model)
        _log_x(ax)
        ax.legend(fontsize=8, title="model")
        ax.set_xlabel(f"RL data volume ({DATA_VOLUME[column]} per run, {column}, log scale)")
    ax.set(ylabel="held-out accuracy (fraction correct)", title="Score vs RL data volume")
    return _png(fig)


def _plot_cost_breakdown(cost: dict[str, Any]) -> bytes:
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 3)
    splits = [("by category (runs + ledger)", {c: cost["by_category"][c] for c in CATEGORIES}),
              ("by phase (runs)", cost["by_phase"]), ("by fate (runs)", {f: cost["by_status"][f] for f in FATES})]
    for ax, (name, usd) in zip(axes, splits):
        if any(v > 0 for v in usd.values()):
            bars = ax.barh(list(usd), list(usd.values()), color="tab:blue")
            ax.bar_label(bars, labels=[_usd(v) if v else "" for v in usd.values()], fontsize=7, padding=2)
            ax.invert_yaxis()
            ax.set_xlim(0, 1.25 * max(usd.values()))  # room for the labels
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _usd(v)))
        else:
            _empty(ax, _no_cost_reason(cost, runs_only=name != splits[0][0]))
        ax.set(xlabel="cost (US dollars)", title=f"Cost {name}")
    fig.tight_layout()
    return _png(fig)


def _plot_spend(runs: pd.DataFrame, cost: dict[str, Any]) -> bytes:
    """Cumulative cost of runs over time, from $0 at the first start; each run's end is a point, so one run or
    runs within seconds show; the time axis spans the runs (an hour around them when they take no time)."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    spend = spend_over_time(runs).dropna(subset=["time"])
    if spend.empty:
        _empty(ax, "no runs" if runs.empty else "no run has a start or end time")
    else:
        times = spend["time"].dt.tz_convert(None)
        starts = runs["start_time"].dropna().dt.tz_convert(None)
        first = min(times.min(), starts.min()) if len(starts) else times.min()
        ax.step([first, *times], [0.0, *spend["cumulative_usd"]], where="post", color="tab:blue")
        ax.plot(times, spend["cumulative_usd"], "o", ms=5, color="tab:blue", label="a run ends (one running: starts)")
        ax.annotate(_usd(spend["cumulative_usd"].iloc[-1]), (times.iloc[-1], spend["cumulative_usd"].iloc[-1]),
                    textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=8)
        span = times.max() - first
        pad = span * 0.05 if span > pd.Timedelta(seconds=1) else pd.Timedelta(minutes=30)
        ax.set_xlim(first - pad, times.max() + pad)
        top = spend["cumulative_usd"].max()
        ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
        if top <= 0:
            _empty(ax, "the runs recorded no cost ($0)")
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.legend(fontsize=8, loc="upper left")
    note = f" (+{_usd(cost['ledger_usd'])} undated ledger items)" if cost["ledger_items"] else ""
    ax.set(xlabel="time (UTC)", ylabel="cumulative cost of runs (US dollars)",
           title=f"Cumulative spend on runs{note}")
    return _png(fig)


def _no_cost_reason(cost: dict[str, Any], runs_only: bool = False) -> str:
    """Why a cost plot has no bar, counted: no runs (and no ledger items), or none with a cost above $0."""
    n_runs = sum(cost["runs"].values())
    if runs_only or not cost["ledger_items"]:
        if not n_runs:
            return "no runs" + (" (ledger items have no phase or fate)" if cost["ledger_items"] else "")
        return (f"none of the {n_runs} run(s) cost more than $0"
                + (f" ({cost['runs_without_cost']} recorded no cost/usd)" if cost["runs_without_cost"] else ""))
    return f"none of the {n_runs} run(s) and {cost['ledger_items']} ledger item(s) cost more than $0"


def _plot_total_vs_final(cost: dict[str, Any]) -> bytes:
    """The whole project (by category) next to the final model's lineage (by run: its shared SFT, the final run;
    pretraining, never a run, is left out) and the final run alone."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    bottom = 0.0
    for category in CATEGORIES:
        usd = cost["by_category"][category]
        if usd > 0:
            ax.bar("whole project", usd, bottom=bottom, label=category)
            bottom += usd
    if bottom > 0:
        ax.annotate(_usd(bottom), ("whole project", bottom), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=8)
    line = cost["final_lineage"]
    if cost["final_run_usd"] is None:
        ax.set_title("Whole project (no final run tagged phase=final)")
    else:
        if line is not None and len(line["steps"]) > 1:
            height = 0.0
            for step, hatch in zip(line["steps"], ("//", "..", "xx", "")):
                ax.bar("final model's lineage", step["usd"], bottom=height, color="tab:gray", hatch=hatch,
                       edgecolor="white", label=f"lineage: {step['kind']}")
                height += step["usd"]
            ax.annotate(_usd(line["lineage"]["usd"]), ("final model's lineage", height), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
        final = ax.bar("final run", cost["final_run_usd"], color="tab:gray")
        ax.bar_label(final, labels=[_usd(cost["final_run_usd"])], fontsize=8, padding=3)
        ratio = cost["ratio_total_to_final"]
        to_lineage = line["ratios"]["lineage_to_project"]["usd"] if line is not None else None
        ax.set_title("Whole project vs final run" + (f": {ratio:.3g}x" if ratio else "")
                     + (f" ({1 / to_lineage:.3g}x its model's lineage)" if to_lineage else ""))
    if bottom > 0:
        ax.legend(fontsize=8, title="category")
        ax.set_ylim(0, 1.12 * bottom)
    else:
        _empty(ax, _no_cost_reason(cost))
    ax.set_ylabel("cost (US dollars)")
    return _png(fig)


# ---- output ----

def json_text(value: Any, indent: int | None = 2) -> str:
    """Strict JSON (the one path every JSON output takes): NaN and infinities are null, never `NaN`/`Infinity`."""
    return json.dumps(_json_ready(value), indent=indent, allow_nan=False)


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A table safe to open in a spreadsheet (the one path every CSV takes): a text cell that starts like a formula
    ('=', '+', '-', '@', or a tab or CR before one) is prefixed with a quote, so it stays text."""
    def cell(v: Any) -> Any:
        return f"'{v}" if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v

    return df.map(cell)


def _json_ready(value: Any) -> Any:
    """Plain JSON values: NaN and inf become null, numpy numbers Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _log_report(uri: str, root: Path, files: list[Path], plots: Path, experiments: list[str] | None) -> str:
    """A FINISHED run tagged phase=report in the experiment "reports" holding the files; its id."""
    client = MlflowClient(uri)
    tags = {"phase": "report", "project": REPORT_EXPERIMENT,
            "report.experiments": ",".join(experiments) if experiments else "(all)"}
    run_id = client.create_run(experiment_id(client, REPORT_EXPERIMENT, root), tags=tags,
                               run_name="report").info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path))
        client.log_artifacts(run_id, str(plots), "plots")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
