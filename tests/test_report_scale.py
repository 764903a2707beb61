"""Reports at scale: metric histories read in bulk (the same values as one call per run and key), the number of
bootstrap resamples set by `rlscale report --bootstrap` or sized for the store, progress, on 30 fake recipe runs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine
from tiny import fake_runs
from typer.testing import CliRunner

from rlscale.analysis import fits as fits_module
from rlscale.analysis import recipes, report, runs
from rlscale.analysis.recipes import run_curves
from rlscale.analysis.report import build_report, default_bootstrap
from rlscale.analysis.runs import HISTORY_COLUMNS, load_runs, metric_histories
from rlscale.experiments.cli import app

KEYS = ["eval/accuracy", "compute/flops", "compute/flops/sft", "eval/problems", "odd/values", "never/logged"]
N_RUNS, N_RECIPES = 30, 3


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """30 recipe runs (3 recipes, 10 evals each) in the experiment "recipes"; two of them also log odd values: NaN,
    +-inf, a step logged twice (later timestamp), two values at one step and timestamp. The experiment "odd" holds
    two runs of recipe "odd" whose histories test what run_curves takes at each eval and carries forward."""
    root = tmp_path_factory.mktemp("scale") / "mlruns"
    fates = fake_runs().write_fake_runs(root / "mlflow.db", n=N_RUNS, seed=0, recipes=N_RECIPES)
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    ids = list(load_runs(uri)["run_id"])
    _odd_runs(MlflowClient(uri))
    odd = [
        Metric("odd/values", v, 1000 + t, s)
        for v, t, s in [
            (1.0, 0, 1),
            (float("nan"), 1, 2),
            (float("inf"), 2, 3),
            (-float("inf"), 3, 4),
            (2.0, 4, 5),
            (3.0, 9, 5),
            (4.0, 9, 6),
            (0.5, 9, 6),
        ]
    ]
    client = MlflowClient(uri)
    for run_id in ids[:2]:
        client.log_batch(run_id, metrics=odd)
    return {"uri": uri, "root": root, "ids": ids, "fates": fates}


def _odd_runs(client: MlflowClient) -> None:
    """Run "long": compute every step 1-50, evals at 10-50 (NaN at 20, logged twice at 30, no compute at 45),
    SFT compute NaN after its value at 40, eval compute only at 10 and 30, device-hours off the eval steps but at 50,
    samples NaN at 40. Run "bare": evals with compute and nothing else."""
    exp = client.create_experiment("odd")
    nan = float("nan")
    long = [Metric("compute/flops", s * 1e12, s, s) for s in range(1, 51) if s != 45]
    long += [Metric("compute/flops/sft", 5e12 * min(s, 20) / 20, s, s) for s in range(1, 51)]
    long += [
        Metric("compute/flops/sft", nan, 41, 40),
        Metric("compute/flops/eval", 1e11, 10, 10),
        Metric("compute/flops/eval", 2e11, 30, 30),
    ]
    long += [
        Metric("eval/accuracy", v, t, s)
        for v, t, s in [
            (0.2, 10, 10),
            (nan, 20, 20),
            (0.4, 30, 30),
            (0.45, 31, 30),
            (0.5, 40, 40),
            (0.55, 45, 45),
            (0.6, 50, 50),
        ]
    ]
    long += [Metric("eval/problems", 50.0, s, s) for s in (10, 30)] + [Metric("eval/problems", 100.0, 50, 50)]
    long += [Metric("compute/gpu_hours", h, s, s) for h, s in [(1.0, 5), (2.0, 25), (3.0, 50)]]
    long += [Metric("data/samples/solve", v, s, s) for v, s in [(nan, 40), (64.0, 50)]]
    bare = [Metric(k, v, s, s) for s in (3, 6) for k, v in [("eval/accuracy", s / 10), ("compute/flops", s * 1e9)]]
    for name, metrics in (("long", long), ("bare", bare)):
        run_id = client.create_run(exp, tags={"recipe": "odd", "phase": "rl"}, run_name=name).info.run_id
        client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id, "FINISHED")


def _one_call_per_run_and_key(uri: str, ids: list[str], keys: list[str]) -> pd.DataFrame:
    """The histories as MlflowClient.get_metric_history gives them, in metric_histories' order."""
    client = MlflowClient(uri)
    rows = [(i, k, m.step, m.timestamp, m.value) for i in ids for k in keys for m in client.get_metric_history(i, k)]
    df = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    return df.sort_values(["run_id", "key", "step", "timestamp", "value"], kind="stable", ignore_index=True)


@pytest.fixture
def metric_queries():
    """The SQL statements that read MLflow's metrics table, counted while the test runs."""
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if "from metrics" in " ".join(statement.lower().split()):
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    yield seen
    event.remove(Engine, "before_cursor_execute", count)


def test_fake_recipe_runs(store):
    assert store["fates"] == {"finished": N_RUNS, "failed": 0, "killed": 0, "pruned": 0}
    frame = load_runs(store["uri"], ["recipes"])
    assert frame["tags.recipe"].nunique() == N_RECIPES and frame["tags.recipe"].notna().all()
    assert (frame["tags.phase"] == "final").sum() == 1 and frame["params.grpo.loss_type"].nunique() == N_RECIPES
    curves = run_curves(frame, store["uri"])
    assert (curves.groupby("run_id").size() == 10).all() and curves["run_id"].nunique() == N_RUNS
    assert (curves.groupby("run_id")["step"].diff().dropna() > 0).all()  # each run's evals in step order
    assert (curves["rl_flops"] > 0).all() and (curves["eval_problems"].isin([50.0, 100.0])).all()


def test_bulk_histories_equal_one_call_per_run_and_key(store, metric_queries, monkeypatch):
    uri, ids = store["uri"], store["ids"]
    expected = _one_call_per_run_and_key(uri, ids, KEYS)
    metric_queries.clear()
    bulk = metric_histories(ids, KEYS, uri)
    assert len(metric_queries) == 1  # every run and key in one query
    pd.testing.assert_frame_equal(bulk, expected)
    odd = bulk[(bulk["run_id"] == ids[0]) & (bulk["key"] == "odd/values")]
    assert len(odd) == 8 and odd["value"].isna().sum() == 1 and not (bulk["key"] == "never/logged").any()
    assert math.isinf(odd["value"].iloc[2]) or odd["value"].iloc[2] > 1e300  # MLflow stores inf as the largest float
    monkeypatch.setattr(runs, "BULK_RUNS", 8)
    metric_queries.clear()
    pd.testing.assert_frame_equal(metric_histories(ids, KEYS, uri), expected)
    assert len(metric_queries) == math.ceil(N_RUNS / 8)
    monkeypatch.setattr(runs, "BULK_DIALECTS", ())  # a store read one call per run and key (a tracking server)
    metric_queries.clear()
    pd.testing.assert_frame_equal(metric_histories(ids, KEYS, uri), expected)
    assert len(metric_queries) >= N_RUNS * len(KEYS)
    assert metric_histories([], KEYS, uri).empty and list(metric_histories(ids, [], uri).columns) == HISTORY_COLUMNS


def test_curves_read_at_eval_steps_equal_curves_read_whole(store, monkeypatch):
    """run_curves reads, on a SQL store, only each key's row that decides its value at (or carried to) each eval:
    the curves equal those built from every row, read one call per run and key."""
    frame = load_runs(store["uri"], ["odd"])
    keys = [recipes.SCORE, recipes.COMPUTE, recipes.HOURS, recipes.SAMPLES, recipes.PROBLEMS, *recipes.NOT_RL]
    ids = list(frame["run_id"])
    needed = metric_histories(ids, keys, store["uri"], at=recipes.SCORE)
    every = metric_histories(ids, keys, store["uri"])
    assert len(needed) < len(every) / 3 and len(needed.merge(every)) == len(needed)  # fewer rows, all of them real
    curves = run_curves(frame, store["uri"])
    monkeypatch.setattr(runs, "BULK_DIALECTS", ())
    pd.testing.assert_frame_equal(curves, run_curves(frame, store["uri"]))
    long = curves[curves["run_id"] == frame.loc[frame["run_name"] == "long", "run_id"].item()].set_index("step")
    assert list(long.index) == [10, 30, 40, 50]  # 20: NaN score; 45: no compute
    assert long.loc[30, "score"] == 0.45 and long.loc[30, "rl_flops"] == 30e12 - (5e12 + 2e11)
    assert long.loc[40, "rl_flops"] == 40e12 - (5e12 + 2e11)  # SFT's NaN at 40 logged after its value
    assert long["device_hours"].isna().tolist() == [True, True, True, False] and long.loc[50, "samples"] == 64.0
    assert long["eval_problems"].tolist()[::3] == [50.0, 100.0] and math.isnan(long.loc[40, "eval_problems"])
    bare = curves[curves["run_id"] == frame.loc[frame["run_name"] == "bare", "run_id"].item()]
    assert bare["rl_flops"].tolist() == bare["flops"].tolist() == [3e9, 6e9]  # no SFT or eval compute: none spent


def test_default_bootstrap_rule():
    assert default_bootstrap(0, 0) == default_bootstrap(100, 18) == 200  # a small grid: the full 200
    assert default_bootstrap(10_000, 1_000) == 86  # 1,000 runs of 10 evals: 2e6 / (2 x 10,000 + 3 x 1,000)
    assert default_bootstrap(10**6, 10**5) == 50  # never fewer than 50


@pytest.fixture
def resamples(monkeypatch) -> list[int]:
    """The n_boot of every bootstrap the fit code runs (score forms and recipe sigmoids), 0 left out."""
    seen: list[int] = []

    def spy(real):
        def wrapped(*args, **kwargs):
            names = real.__code__.co_varnames[: real.__code__.co_argcount]
            n_boot = dict(zip(names, args)).get("n_boot", kwargs.get("n_boot"))
            if n_boot:  # fits without intervals (held-out checks, each refit itself) ask for none
                seen.append(n_boot)
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(fits_module, "_bootstrap", spy(fits_module._bootstrap))
    monkeypatch.setattr(recipes, "_bootstrap_runs", spy(recipes._bootstrap_runs))
    return seen


def test_report_bootstrap_option(store, resamples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report run's artifacts go under ./mlruns
    args = ["report", "--uri", store["uri"], "--experiment", "recipes"]
    out = CliRunner().invoke(app, [*args, "--out", "rep", "--bootstrap", "7"])
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("report: ") and out.stderr == ""  # no progress bar when stderr is no terminal
    assert resamples and set(resamples) == {7}
    saved = json.loads((tmp_path / "rep" / "fits.json").read_text())
    assert saved["bootstrap"] == {"resamples": 7, "sized_for_store": False}
    assert len(saved["recipes"]) == N_RECIPES and all(0 < f["n_boot"] <= 7 for f in saved["recipes"])
    assert "bootstrap over runs (7 resamples)" in (tmp_path / "rep" / "report.md").read_text()
    resamples.clear()
    none = CliRunner().invoke(app, [*args, "--out", "rep0", "--bootstrap", "0"])
    assert none.exit_code == 0, none.output
    assert resamples == []
    saved = json.loads((tmp_path / "rep0" / "fits.json").read_text())
    assert all("ci" not in f for f in saved["recipes"]) and saved["bootstrap"]["resamples"] == 0
    bad = CliRunner().invoke(app, [*args, "--out", "rep1", "--bootstrap", "-1"])
    assert bad.exit_code == 2 and not (tmp_path / "rep1").exists()


def test_report_sized_for_store_with_progress(store, resamples, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_BOOT", 9)  # small stores get MAX_BOOT resamples (kept small: a fast test)
    monkeypatch.setattr(report, "MIN_BOOT", 3)
    told: list[tuple[str, int, int]] = []
    result = build_report(
        store["uri"],
        ["recipes"],
        None,
        None,
        tmp_path / "rep",
        root=store["root"],
        log_to_mlflow=False,
        progress=lambda what, done, total: told.append((what, done, total)),
    )
    assert result.fits["bootstrap"] == {"resamples": 9, "sized_for_store": True} and set(resamples) == {9}
    assert result.html.is_file() and len(result.fits["recipes"]) == N_RECIPES
    stages = list(dict.fromkeys(what for what, _, _ in told))
    assert stages == [
        "reading runs",
        "reading metric histories",
        "fitting score vs compute",
        "fitting recipes",
        "drawing plots",
        "writing files",
    ]
    for stage in stages:  # each stage ends complete, never goes back
        done = [d for what, d, _ in told if what == stage]
        total = {t for what, _, t in told if what == stage}
        assert done == sorted(done) and len(total) == 1 and done[-1] == total.pop()
    assert ("reading metric histories", N_RUNS, N_RUNS) in told and ("fitting recipes", N_RECIPES, N_RECIPES) in told


def test_bootstrap_results_are_deterministic(store):
    curves = run_curves(load_runs(store["uri"], ["recipes"]), store["uri"])
    first = recipes.compare_recipes(curves, n_boot=12)["recipes"]
    again = recipes.compare_recipes(curves, n_boot=12)["recipes"]
    more = recipes.compare_recipes(curves, n_boot=24)["recipes"]
    assert [f["ci"] for f in first] == [f["ci"] for f in again]
    assert [f["params"] for f in first] == [f["params"] for f in more]  # the estimates need no resamples
    assert [f["ci"] for f in first] != [f["ci"] for f in more] and all(f["n_boot"] > 12 for f in more)
