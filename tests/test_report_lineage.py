"""Issue 25, the report side: a shared SFT run is billed once, each model's lineage (pretraining, shared SFT, the
run) is traced and set against the project and the declared pretraining, score fits leave SFT runs out and place
each run at the compute that produced its model, and an empty plot says the true reason.

The stores are filled here the way the training side writes them (tracking/SCHEMA.md): a shared SFT run (phase=sft,
sft.key, no recipe tag), RL runs tagged sft.run_id that count only their own work plus compute/flops/lineage and
cost/usd_lineage, old-style runs that trained their own SFT, declared pretrain/* metrics, a final run from a sweep.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rlscale.analysis.cost import lineage, project_cost
from rlscale.analysis.recipes import compare_recipes, no_curve_reason, run_curves
from rlscale.analysis.report import MODEL_FLOPS, build_report, fit_groups, md, no_points_reason, score_points
from rlscale.analysis.runs import load_runs
from rlscale.experiments.cli import app

T0 = 1_750_000_000_000  # ms
SFT_STEPS = 100
PARAMS = 134_515_008
TOKENS = 2e12
PRETRAIN = 6 * PARAMS * TOKENS  # 6ND
SOURCE = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M (model card: 2 trillion tokens)"
DECLARED = {"pretrain/flops": PRETRAIN, "pretrain/tokens": TOKENS}
PRE_TAGS = {"pretrain.source": SOURCE, "pretrain.flops_from": "6ND", "model.name": "smollm2-135m",
            "model.params": str(PARAMS)}
# the shared SFT and its eval: every RL run below starts from this model
SFT = {"flops": 1e15, "usd": 0.5, "score": 0.30}


class Store:
    """A temporary SQLite MLflow store and a way to write runs into it."""

    def __init__(self, root):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.t = T0

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name)

    def run(self, exp: str, name: str, tags: dict[str, str], history: dict[int, dict[str, float]],
            status: str = "FINISHED") -> str:
        """A run whose metrics are `history` (step -> metrics); each metric's last value is its value at its largest
        step."""
        self.t += 60_000
        rid = self.client.create_run(exp, start_time=self.t, run_name=name, tags=tags).info.run_id
        self.client.log_batch(rid, metrics=[Metric(k, float(v), self.t, step) for step, m in history.items()
                                            for k, v in m.items()])
        self.client.set_terminated(rid, status, end_time=self.t + 30_000)
        return rid


def sft_run(store: Store, exp: str, pretraining: bool = True, key: str = "5f1e0c") -> str:
    """A shared SFT run: its own SFT FLOPs and eval at its last step, its model's pretraining declared."""
    return store.run(exp, f"sft-{key}", {"phase": "sft", "sft.key": key} | (PRE_TAGS if pretraining else {}),
                     {SFT_STEPS: {"compute/flops": SFT["flops"], "compute/flops/sft": SFT["flops"] * 0.95,
                                  "compute/flops/eval": SFT["flops"] * 0.05, "cost/usd": SFT["usd"],
                                  "compute/device_seconds": 1800.0, "eval/accuracy": SFT["score"],
                                  "data/samples": 0.0} | (DECLARED if pretraining else {})})


def warm_run(store: Store, exp: str, name: str, sft_id: str, rl: float, usd: float, scores: list[float],
             tags: dict[str, str] | None = None, pretraining: bool = True) -> str:
    """An RL run started from `sft_id`: the SFT model's eval at the SFT's steps with compute 0, then evals during
    RL; own compute = `rl` FLOPs of RL plus 1e13 per eval; lineage = own + the SFT's."""
    history = {SFT_STEPS: {"compute/flops": 0.0, "compute/flops/eval": 0.0, "eval/accuracy": SFT["score"],
                           "cost/usd": 0.0}}
    n = len(scores)
    for i, score in enumerate(scores, 1):
        own = rl * i / n + 1e13 * i
        history[SFT_STEPS + 10 * i] = {"compute/flops": own, "compute/flops/eval": 1e13 * i, "eval/accuracy": score,
                                       "cost/usd": usd * i / n, "compute/flops/lineage": own + SFT["flops"],
                                       "cost/usd_lineage": usd * i / n + SFT["usd"],
                                       "data/samples": 64.0 * i}
    history[SFT_STEPS + 10 * n] |= DECLARED if pretraining else {}
    base = {"phase": "rl", "recipe": "r1", "sft.run_id": sft_id, "sft.key": "5f1e0c"}
    return store.run(exp, name, base | (PRE_TAGS if pretraining else {}) | (tags or {}), history)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Experiment 'lineage': one shared SFT run, two grid RL runs from it, a sweep (parent + two trials from it), the
    final run trained with the best trial's parameters, an old-style run that trained its own SFT, and a failed RL
    run. Experiment 'bare': the same shape without any declared pretraining."""
    store = Store(tmp_path_factory.mktemp("lineage") / "mlruns")
    exp = store.experiment("lineage")
    ids = {"sft": sft_run(store, exp)}
    ids["rl-a"] = warm_run(store, exp, "rl-a", ids["sft"], 2e14, 0.25, [0.32, 0.35, 0.37, 0.38])
    ids["rl-b"] = warm_run(store, exp, "rl-b", ids["sft"], 6e14, 0.75, [0.35, 0.40, 0.44, 0.46])
    ids["sweep"] = store.run(exp, "demo-sweep", {"phase": "sweep"}, {0: {"sweep/trials_complete": 2.0}})
    for i, lr in enumerate(("1e-4", "3e-4")):
        ids[f"trial-{i}"] = warm_run(store, exp, f"trial-{i}", ids["sft"], 1e14, 0.125, [0.31, 0.33],
                                     {"phase": "sweep-trial", "recipe": f"lr{lr}", "mlflow.parentRunId": ids["sweep"]})
    ids["final"] = warm_run(store, exp, "final", ids["sft"], 4e14, 0.5, [0.34, 0.39, 0.42, 0.43],
                            {"phase": "final", "sweep.parent_run_id": ids["sweep"], "sweep.best_trial": "1",
                             "sweep.best_run_id": ids["trial-1"], "sweep.study": "demo-sweep"})
    ids["old"] = store.run(exp, "old-style", {"phase": "rl", "recipe": "r2"} | PRE_TAGS, {
        SFT_STEPS: {"compute/flops": 1.05e15, "compute/flops/sft": 1e15, "compute/flops/eval": 5e13,
                    "eval/accuracy": 0.3},
        SFT_STEPS + 20: {"compute/flops": 1.4e15, "compute/flops/sft": 1e15, "compute/flops/eval": 1e14,
                         "eval/accuracy": 0.36, "cost/usd": 1.0} | DECLARED})
    ids["failed"] = store.run(exp, "failed", {"phase": "rl", "recipe": "r1", "sft.run_id": ids["sft"]} | PRE_TAGS,
                              {SFT_STEPS + 5: {"compute/flops": 5e13, "cost/usd": 0.0625,
                                               "compute/flops/lineage": 5e13 + SFT["flops"],
                                               "cost/usd_lineage": 0.0625 + SFT["usd"]} | DECLARED}, "FAILED")
    bare = store.experiment("bare")
    bare_sft = sft_run(store, bare, pretraining=False, key="0b0b0b")
    bare_final = warm_run(store, bare, "bare-final", bare_sft, 3e14, 0.4, [0.33, 0.36], {"phase": "final"},
                          pretraining=False)
    out = store.root.parent
    report = build_report(store.uri, ["lineage"], None, None, out / "report", root=store.root, log_to_mlflow=False)
    bare_report = build_report(store.uri, ["bare"], None, None, out / "bare-report", root=store.root,
                               log_to_mlflow=False)
    return {"store": store, "ids": ids, "report": report, "bare": bare_report, "bare_ids": (bare_sft, bare_final)}


def _row(*cells: str) -> str:
    """A row of a report.md table."""
    return "| " + " | ".join(md(c) for c in cells) + " |"


def _own(runs: pd.DataFrame, key: str) -> float:
    return math.fsum(runs[key].fillna(0.0))


def test_one_sft_two_rl_runs_total_counts_the_sft_once(tmp_path, monkeypatch):
    """1 SFT run + 2 RL runs from it: the project total is the SFT once plus both RL runs (their own work), never
    their lineage metrics; each RL run's lineage is its own plus the SFT's. `rlscale cost --json` says the same."""
    store = Store(tmp_path / "mlruns")
    exp = store.experiment("grid")
    sft = sft_run(store, exp)
    a = warm_run(store, exp, "a", sft, 2e14, 0.25, [0.32, 0.35])
    b = warm_run(store, exp, "b", sft, 6e14, 0.75, [0.35, 0.40])
    runs = load_runs(store.uri, ["grid"], root=store.root)
    cost = project_cost(runs)
    assert cost["total_usd"] == 0.5 + 0.25 + 0.75 and cost["runs"]["finished"] == 3
    own_flops = SFT["flops"] + (2e14 + 2e13) + (6e14 + 2e13)
    assert cost["flops_total"] == pytest.approx(own_flops, rel=1e-12)
    assert cost["by_phase"] == {"rl": 1.0, "sft": 0.5} and cost["runs_from_shared_sft"] == 2
    summed_lineage = _own(runs, "cost/usd_lineage") + cost["by_phase"]["sft"]
    assert summed_lineage == 2.5 and cost["total_usd"] != summed_lineage  # what summing lineages would have billed
    for rid, own_usd, own_flops in ((a, 0.25, 2.2e14), (b, 0.75, 6.2e14)):
        line = lineage(runs, rid)
        assert [s["kind"] for s in line["steps"]] == ["shared SFT", "final run"]
        assert line["steps"][0]["run_id"] == sft and line["missing"] == []
        assert line["lineage"]["usd"] == own_usd + SFT["usd"]
        assert line["lineage"]["flops"] == pytest.approx(own_flops + SFT["flops"], rel=1e-12)
        assert line["lineage"] == pytest.approx(line["recorded"], rel=1e-12)  # the training side's own metrics agree
    twice = project_cost(pd.concat([runs, runs.iloc[[0]]], ignore_index=True))  # a run listed twice counts once
    assert twice["total_usd"] == cost["total_usd"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = CliRunner().invoke(app, ["cost", "--uri", store.uri, "--experiment", "grid", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["total_usd"] == 1.5


def test_final_model_lineage_table_and_ratios(project):
    ids, report = project["ids"], project["report"]
    runs = load_runs(project["store"].uri, ["lineage"], root=project["store"].root)
    cost = report.cost
    line = cost["final_lineage"]
    project_usd, project_flops = _own(runs, "cost/usd"), _own(runs, "compute/flops")
    assert cost["runs_usd"] == project_usd and cost["flops_total"] == pytest.approx(project_flops, rel=1e-12)
    assert [s["run_id"] for s in line["steps"]] == [ids["sft"], ids["final"]]
    assert line["final"] == {"usd": 0.5, "flops": pytest.approx(4e14 + 4e13)}
    assert line["lineage"]["usd"] == 1.0 and line["lineage"]["flops"] == pytest.approx(4.4e14 + SFT["flops"])
    ratios = line["ratios"]
    assert ratios["final_to_lineage"]["usd"] == 0.5
    assert ratios["final_to_project"]["usd"] == pytest.approx(0.5 / project_usd)
    assert ratios["lineage_to_project"]["usd"] == pytest.approx(1.0 / project_usd)
    assert ratios["lineage_to_project"]["flops"] == pytest.approx(1.44e15 / project_flops)
    assert line["pretraining"]["flops"] == PRETRAIN and line["with_pretraining"]["flops"] == PRETRAIN + 1.44e15
    assert line["with_pretraining"]["usd"] is None  # no pretraining cost declared: not guessed
    assert line["sweep"] == {"study": "demo-sweep", "parent_run_id": ids["sweep"], "best_trial": "1",
                             "best_run_id": ids["trial-1"]}
    assert line["sweep_cost"] == {"runs": 2, "usd": 0.25, "flops": pytest.approx(2 * (1e14 + 2e13))}
    text = report.markdown.read_text(encoding="utf-8")
    section = text.split("## What the final model cost")[1].split("\n## ")[0]
    assert _row("1. pretraining of the base model (declared, not a run)", "smollm2-135m", f"{PRETRAIN:.4g}",
                "not declared", "no") in section
    assert _row("2. shared SFT", f"sft-5f1e0c ({ids['sft']})", "1e+15", "$0.5", "yes") in section
    assert _row("3. final run", f"final ({ids['final']})", "4.4e+14", "$0.5", "yes") in section
    assert _row("its lineage (the runs its model came from)", "2", "1.44e+15", "$1.00") in section
    assert _row("final run / its lineage", "0.5 (50%)", f"{4.4e14 / 1.44e15:.3g} ({100 * 4.4e14 / 1.44e15:.3g}%)") \
        in section
    assert _row("lineage / whole project", f"{1.0 / project_usd:.3g} ({100 / project_usd:.3g}%)",
                f"{1.44e15 / project_flops:.3g} ({100 * 1.44e15 / project_flops:.3g}%)") in section
    assert md("best trial 1") in section and md(f"best run id {ids['trial-1']}") in section
    assert md("study demo-sweep") in section and md("The sweep's 2 trial run(s) cost $0.25 in all") in section
    assert md(SOURCE) in section  # the pretraining's source, quoted
    page = report.html.read_text(encoding="utf-8")
    assert "<h2>What the final model cost</h2>" in page and "<td>2. shared SFT</td>" in page


def test_no_final_run_says_so(tmp_path):
    store = Store(tmp_path / "mlruns")
    exp = store.experiment("grid")
    warm_run(store, exp, "a", sft_run(store, exp), 2e14, 0.25, [0.32, 0.35])
    report = build_report(store.uri, ["grid"], None, None, tmp_path / "r", root=store.root, log_to_mlflow=False)
    assert report.cost["final_lineage"] is None
    section = report.markdown.read_text().split("## What the final model cost")[1].split("\n## ")[0]
    assert "No final run: no run is tagged phase=final" in section


def test_lineage_reaches_an_sft_run_in_another_experiment(tmp_path):
    """The final run's shared SFT lives in another experiment: the lineage names it (read from the store), the
    project's totals leave it out."""
    store = Store(tmp_path / "mlruns")
    sft = sft_run(store, store.experiment("warm-starts"))
    final = warm_run(store, store.experiment("final"), "final", sft, 2e14, 0.25, [0.32, 0.35], {"phase": "final"})
    report = build_report(store.uri, ["final"], None, None, tmp_path / "r", root=store.root, log_to_mlflow=False)
    line = report.cost["final_lineage"]
    assert [s["run_id"] for s in line["steps"]] == [sft, final] and line["missing"] == []
    assert line["steps"][0]["in_project"] is False and line["steps"][0]["experiment"] == "warm-starts"
    assert report.cost["total_usd"] == 0.25 and line["lineage"]["usd"] == 0.75
    assert f"| {md('no (experiment warm-starts)')} |" in report.markdown.read_text()


def test_pretraining_share_from_declared_metrics(project):
    report = project["report"]
    runs = load_runs(project["store"].uri, ["lineage"], root=project["store"].root)
    shares = report.cost["pretraining"]
    (g,) = shares["declared"]
    assert g["flops"] == PRETRAIN and g["source"] == SOURCE and g["flops_from"] == "6ND"
    assert g["runs"] == len(runs) - 1  # every run but the sweep parent declares it (the SFT run too)
    assert g["run_flops"] == pytest.approx(_own(runs, "compute/flops"), rel=1e-12)  # each run once, its own
    assert g["share_flops"] == pytest.approx(_own(runs, "compute/flops") / PRETRAIN)
    rl = _own(runs, "compute/flops") - _own(runs, "compute/flops/sft") - _own(runs, "compute/flops/eval")
    assert g["rl_flops"] == pytest.approx(rl, rel=1e-9) and g["share_usd"] is None
    assert shares["final_lineage"]["share_flops"] == pytest.approx(1.44e15 / PRETRAIN)
    text = report.markdown.read_text(encoding="utf-8")
    section = text.split("## RL against pretraining")[1].split("\n## ")[0]
    assert md(f"6 N D = 6 x {PARAMS:.4g} parameters x {TOKENS:.4g} tokens") in section and md(SOURCE) in section
    assert f"is {100 * g['share_flops']:.3g}% of the compute that pretrained it" in section
    assert _row("the final model's lineage (SFT + RL, pretraining excluded)", "1.44e+15",
                f"{100 * 1.44e15 / PRETRAIN:.4g}", "$1.00", "not declared") in section
    assert "pretraining cost is not declared" in section


def test_pretraining_usd_share_when_declared(tmp_path):
    store = Store(tmp_path / "mlruns")
    exp = store.experiment("paid")
    history = {10: {"compute/flops": 2e15, "cost/usd": 4.0, "pretrain/flops": 1e21, "pretrain/usd": 400.0,
                    "eval/accuracy": 0.5}}
    store.run(exp, "final", {"phase": "final", "pretrain.source": "declared by hand", "pretrain.flops_from": "declared",
                             "model.name": "m"}, history)
    report = build_report(store.uri, ["paid"], None, None, tmp_path / "r", root=store.root, log_to_mlflow=False)
    (g,) = report.cost["pretraining"]["declared"]
    assert g["share_flops"] == 2e15 / 1e21 and g["share_usd"] == 4.0 / 400.0
    assert report.cost["final_lineage"]["with_pretraining"] == {"flops": 1e21 + 2e15, "usd": 404.0}
    section = report.markdown.read_text().split("## RL against pretraining")[1].split("\n## ")[0]
    assert "and 1% of its declared cost." in section and "(declared), \\$400.00 declared" in section


def test_no_pretraining_declared_is_one_sentence_and_no_number(project):
    report = project["bare"]
    assert report.cost["pretraining"] == {"declared": [], "undeclared_runs": 2, "final_lineage": None}
    section = report.markdown.read_text(encoding="utf-8").split("## RL against pretraining")[1].split("\n## ")[0]
    body = [line for line in section.splitlines()[1:] if line.strip()]
    assert len(body) == 1 and body[0].startswith("No run declares its base model's pretraining")
    assert "%" not in section and "|" not in section
    line = report.cost["final_lineage"]
    assert line["pretraining"] is None and line["with_pretraining"] is None
    assert "pretraining of the base model" not in report.markdown.read_text()


def test_sft_runs_are_not_points_and_x_is_the_lineage(project):
    ids, fits = project["ids"], project["report"].fits
    assert ids["sft"] not in fits["run_ids"] and ids["sweep"] not in fits["run_ids"]
    assert ids["failed"] not in fits["run_ids"]
    assert set(fits["run_ids"]) == {ids[k] for k in ("rl-a", "rl-b", "trial-0", "trial-1", "final", "old")}
    runs = load_runs(project["store"].uri, ["lineage"], root=project["store"].root)
    points = score_points(runs).set_index("run_id")
    assert points.loc[ids["rl-a"], MODEL_FLOPS] == pytest.approx(2.4e14 + SFT["flops"])  # its lineage, not 2.4e14
    assert points.loc[ids["old"], MODEL_FLOPS] == 1.4e15  # old-style: its own compute holds its SFT
    assert no_points_reason(runs[runs["run_id"] == ids["sft"]]) == ("no run can be a point: 1 finished run(s), 1 "
                                                                    "shared SFT run(s) (phase=sft, not points)")


def test_score_fits_per_recipe_not_pooled(project):
    """Recipe r1 (two grid runs and the final run) has 3 runs at distinct compute: it is fitted on its own; the
    other recipes (one run each) are named with the count, not pooled into its curve."""
    ids, fits = project["ids"], project["report"].fits
    assert fits["grouped_by"] == "recipe" and fits["pooled_reason"] is None
    assert [g["group"] for g in fits["groups"]] == ["r1"] and fits["headline"] == "r1"
    assert set(fits["groups"][0]["run_ids"]) == {ids["rl-a"], ids["rl-b"], ids["final"]}
    assert "power" in fits["groups"][0]["forms"] and fits["forms"] == fits["groups"][0]["forms"]
    assert fits["unfitted_groups"]["r2"] == "1 run(s) at 1 distinct compute value(s), 3 needed"
    text = project["report"].markdown.read_text()
    assert "Fitted per recipe: 1 recipe(s) have runs at 3 or more distinct compute values" in text
    assert "Pooled:" not in text


def test_pooled_only_with_the_reason():
    points = pd.DataFrame({"run_id": list("abcdef"), "run_name": list("abcdef"),
                           "tags.recipe": ["x", "x", "y", "y", "z", "z"],
                           "tags.model.name": ["m1", "m1", "m2", "m2", "m1", "m1"],
                           MODEL_FLOPS: [1e12, 2e12, 4e12, 8e12, 1.6e13, 3.2e13],
                           "eval/accuracy": [0.1, 0.2, 0.3, 0.35, 0.4, 0.42]})
    fits, _ = fit_groups(points)
    assert fits["grouped_by"] == "model size" and [g["group"] for g in fits["groups"]] == ["m1"]
    fits, fitted = fit_groups(points.assign(**{"tags.model.name": ["m1", "m1", "m2", "m2", "m3", "m3"]}))
    assert fits["grouped_by"] == "all runs" and len(fits["groups"]) == 1 and fits["n_points"] == 6
    assert fits["pooled_reason"] == ("no recipe has runs at 3 distinct compute values (x: 2, y: 2, z: 2) and no "
                                     "model size has runs at 3 distinct compute values (m1: 2, m2: 2, m3: 2)")
    alone, _ = fit_groups(points.assign(**{"tags.recipe": "x", "tags.model.name": "m1"}))
    assert alone["grouped_by"] == "all runs" and alone["pooled_reason"] is None  # one recipe: nothing is mixed


def test_warm_started_curve_has_the_same_rl_axis_as_an_old_style_run(tmp_path):
    """The same RL work recorded by a run that trained its own SFT and by one started from a shared SFT (whose
    history starts at the SFT's steps with compute 0) gives the same RL-compute points."""
    store = Store(tmp_path / "mlruns")
    exp = store.experiment("axes")
    sft = sft_run(store, exp)
    warm = store.run(exp, "warm", {"phase": "rl", "recipe": "w", "sft.run_id": sft}, {
        100: {"compute/flops": 0.0, "compute/flops/eval": 0.0, "eval/accuracy": 0.3},
        110: {"compute/flops": 1.5e14, "compute/flops/eval": 5e13, "eval/accuracy": 0.35,
              "compute/flops/lineage": 1.15e15},
        120: {"compute/flops": 3.5e14, "compute/flops/eval": 1e14, "eval/accuracy": 0.4,
              "compute/flops/lineage": 1.35e15}})
    old = store.run(exp, "old", {"phase": "rl", "recipe": "o"}, {
        100: {"compute/flops": 1.05e15, "compute/flops/sft": 1e15, "compute/flops/eval": 5e13, "eval/accuracy": 0.3},
        110: {"compute/flops": 1.2e15, "compute/flops/sft": 1e15, "compute/flops/eval": 1e14, "eval/accuracy": 0.35},
        120: {"compute/flops": 1.4e15, "compute/flops/sft": 1e15, "compute/flops/eval": 1.5e14,
              "eval/accuracy": 0.4}})
    curves = run_curves(load_runs(store.uri, ["axes"], root=store.root), store.uri, store.root)
    assert sft not in set(curves["run_id"])  # a shared SFT run is no recipe's curve
    by = {rid: c.sort_values("step")["rl_flops"].tolist() for rid, c in curves.groupby("run_id")}
    assert by[warm] == pytest.approx(by[old]) and by[warm] == pytest.approx([0.0, 1e14, 2.5e14])


def test_empty_recipe_plot_names_the_real_cause(tmp_path):
    """Grid runs with recipe tags whose only evals are the SFT model's (compute 0) and the final one: each recipe
    has too few points, counted, and the reason says evals during RL are missing; recipe runs with no eval
    history at all are named as such. Never 'no run has a recipe tag' when they have one."""
    store = Store(tmp_path / "mlruns")
    exp = store.experiment("grid")
    sft = sft_run(store, exp)
    for budget in (1e14, 3e14, 9e14):
        warm_run(store, exp, f"grid-{budget:g}", sft, budget, 0.1, [0.4], {"recipe": "nano"})
    for i in range(2):
        store.run(exp, f"silent-{i}", {"phase": "rl", "recipe": "micro"}, {5: {"compute/flops": 1e14}})
    report = build_report(store.uri, ["grid"], None, None, tmp_path / "r", root=store.root, log_to_mlflow=False)
    skipped = report.fits["recipe_comparison"]["skipped"]
    assert skipped["nano"] == ("3 distinct point(s), 4 needed: 3 run(s) with 3 eval(s) after RL began; 3 at RL "
                               "compute 0 (the SFT model, not fitted); each run has only its final eval after RL "
                               "began: no eval during RL (grpo.eval_every)")
    assert skipped["micro"] == ("2 finished run(s), none with an eval/accuracy history logged with compute/flops: "
                                "nothing to draw")
    text = report.markdown.read_text()
    section = text.split("## Which recipe scales")[1]
    assert md(skipped["nano"]) in section and md(skipped["micro"]) in section
    assert "no finished run has a recipe tag" not in text and "no finished run with a recipe tag" not in text
    # nothing after RL at all: the empty plot's caption counts why
    runs = load_runs(store.uri, ["grid"], root=store.root)
    no_rl = runs[runs["run_name"].str.startswith("silent") | (runs["tags.phase"] == "sft")]
    curves = run_curves(no_rl, store.uri, store.root)
    assert no_curve_reason(no_rl, curves) == ("recipe micro: 2 finished run(s), none with an eval/accuracy history "
                                              "logged with compute/flops: nothing to draw")
    only_sft = runs[runs["tags.phase"] == "sft"]
    assert no_curve_reason(only_sft, run_curves(only_sft, store.uri, store.root)) == (
        "none of the 1 finished run(s) is a recipe's run (a recipe tag, not a report, sweep parent or shared SFT "
        "run: 1 of them are shared SFT runs)")
    comparison = compare_recipes(curves, runs=no_rl)
    assert comparison["recipes"] == [] and "micro: 2 finished run(s), none with" in comparison["statement"]



def test_every_empty_plot_says_the_counted_reason(tmp_path, monkeypatch):
    """A store holding only a shared SFT run and a failed RL run: the score plots and the recipe plot are empty, and
    each says why from the runs (an SFT run is no point, the failed run is not finished), not a generic caption."""
    import rlscale.analysis.report as report_module

    said = []
    empty = report_module._empty
    monkeypatch.setattr(report_module, "_empty", lambda ax, why: (said.append(why), empty(ax, why)))
    store = Store(tmp_path / "mlruns")
    exp = store.experiment("early")
    sft = sft_run(store, exp)
    store.run(exp, "crashed", {"phase": "rl", "recipe": "r1", "sft.run_id": sft},
              {110: {"compute/flops": 1e13, "cost/usd": 0.01}}, "FAILED")
    report = build_report(store.uri, ["early"], None, None, tmp_path / "r", root=store.root, log_to_mlflow=False)
    no_point = "no run can be a point: 1 finished run(s), 1 shared SFT run(s) (phase=sft, not points)"
    no_recipe = ("no eval to draw: none of the 1 finished run(s) is a recipe's run (a recipe tag, not a report, sweep "
                 "parent or shared SFT run: 1 of them are shared SFT runs)")
    assert said.count(no_point) == 2 and no_recipe in said  # score vs compute, score vs data, recipes
    assert len(said) == 3  # the cost plots have costs to draw
    assert report.fits["recipe_comparison"]["nothing_drawn"] == no_recipe.removeprefix("no eval to draw: ")
    text = report.markdown.read_text()
    assert md(f"No fits: no finished run has both eval/accuracy and compute/flops above 0 ({no_point}).") in text
    assert md(f"No recipe fitted: {no_recipe.removeprefix('no eval to draw: ')}.") in text


def test_histories_are_read_in_bulk_and_match_per_run_reads(project, monkeypatch):
    """run_curves reads every recipe run's history in bulk (one query per metric on a SQL store); the result is the
    per-run read's, and so is the fallback for a store without a bulk read (a tracking server)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from rlscale.analysis.runs import metric_histories, metric_history

    store, ids = project["store"], project["ids"]
    wanted = [ids["rl-a"], ids["old"], ids["sft"]]
    keys = ["eval/accuracy", "compute/flops"]
    bulk = metric_histories(wanted, keys, store.uri, store.root)
    one_by_one = pd.concat([metric_history(rid, key, store.uri, store.root).assign(run_id=rid, key=key)
                            for rid in wanted for key in keys], ignore_index=True)
    one_by_one = one_by_one.sort_values(["run_id", "key", "step", "timestamp"], kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(bulk, one_by_one[bulk.columns])
    assert len(bulk) == 5 * 2 + 2 * 2 + 1 * 2  # rl-a: SFT point + 4 evals; old: 2 points; sft: 1
    monkeypatch.delattr(SqlAlchemyStore, "get_metric_history_bulk")
    pd.testing.assert_frame_equal(metric_histories(wanted, keys, store.uri, store.root), bulk)


def test_cost_command_prints_the_final_models_lineage(project):
    """`rlscale cost` (text) names the runs the final model came from and what they cost, beside the project total."""
    store = project["store"]
    runs = load_runs(store.uri, ["lineage"], root=store.root)
    out = CliRunner().invoke(app, ["cost", "--uri", store.uri, "--experiment", "lineage"])
    assert out.exit_code == 0, out.output
    share = 100 * 1.0 / _own(runs, "cost/usd")
    assert f"final model's lineage: shared SFT $0.50 + final run $0.50 = $1.00 ({share:.0f}% of the project)" \
        in out.stdout
