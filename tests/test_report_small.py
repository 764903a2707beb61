"""Issue 24 items 16 and 17: a report over the smallest store (one run, as after one `rlscale train`) shows money
with the digits it has and draws every plot's data, or says why not."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from rlscale.analysis.report import build_report
from rlscale.tracking.run import tracking_uri

T0 = 1_750_000_000_000  # ms


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """One finished 25-minute run tagged phase=final (three evals, $0.0012) and a $0.0152 ledger item: the run is
    7.3% of the total."""
    tmp = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = MlflowClient(tracking_uri(None, tmp / "mlruns"))
        exp = client.create_experiment("smollm2")
        rid = client.create_run(exp, start_time=T0, run_name="smollm2",
                                tags={"phase": "final", "recipe": "a1b2c3"}).info.run_id
        metrics = [Metric("cost/usd", 0.0012, T0, 60)]
        for step, (flops, score, n) in enumerate([(1e15, 0.30, 200.0), (5e15, 0.35, 64.0), (1e16, 0.41, 200.0)]):
            metrics += [Metric("compute/flops", flops, T0, 30 * step), Metric("eval/accuracy", score, T0, 30 * step),
                        Metric("eval/problems", n, T0, 30 * step)]
        client.log_batch(rid, metrics=metrics)
        client.set_terminated(rid, "FINISHED", end_time=T0 + 25 * 60_000)
        ledger = tmp / "ledger.toml"
        ledger.write_text('[[item]]\nname = "annotation"\ncategory = "other"\nusd = 0.0152\n', encoding="utf-8")
        result = build_report(None, None, ledger, None, tmp / "report", root=tmp / "mlruns", log_to_mlflow=False)
    return result


def test_money_keeps_its_significant_digits(one_run):
    """The cost table rounded dollars to cents: the final run read '0' next to its 7.3% share."""
    text = one_run.markdown.read_text(encoding="utf-8")
    assert "| final\\_run | \\$0.0012 | 7.32 |" in text, text
    assert "| total | \\$0.0164 | 100 |" in text and "| finished | \\$0.0012 |" in text
    assert "Final run cost: \\$0.0012" in text
    page = one_run.html.read_text(encoding="utf-8")
    assert "<td>final_run</td>\n      <td>$0.0012</td>" in page
    assert json.loads(one_run.cost_json.read_text())["final_run_usd"] == 0.0012
    assert pd.read_csv(one_run.runs_csv)["cost/usd"].tolist() == [0.0012]


def _colored_span(png: bytes | str) -> float:
    """The share of the image's width that its colored (not grey) pixels span: data, not frames or text."""
    rgb = imread(png)[..., :3]
    columns = np.nonzero(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2).any(axis=0))[0]
    return (columns[-1] - columns[0]) / rgb.shape[1] if len(columns) else 0.0


def test_one_run_shows_in_every_plot(one_run):
    """The spend plot was an empty frame spanning 2025-2029 and the recipes plot said 'no recipe' for a run with a
    recipe tag and three evals. Now the run's spend is a step across the plot (its 25 minutes) and its evals a curve,
    with the reason it is not fitted. Plots that cannot draw (no data volume, no law) say so in words."""
    plots = one_run.plots
    assert _colored_span(plots["spend_over_time"]) > 0.6
    assert _colored_span(plots["recipes"]) > 0.5
    assert _colored_span(plots["cost_breakdown"]) > 0.5 and _colored_span(plots["total_vs_final"]) > 0.3
    fits = one_run.fits
    assert fits["recipe_comparison"]["skipped"] == {"a1b2c3": "3 distinct point(s), 4 needed: 1 run(s) with 3 "
                                                               "eval(s) after RL began"}  # counted from the data
