"""analysis.report on a store of real (tiny) trainings of every fate, on fake runs, and on an empty store."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import Boom
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from tiny import fake_runs

from rlscale.analysis.cost import load_ledger, project_cost
from rlscale.analysis.report import PLOTS, build_report, md
from rlscale.analysis.runs import load_runs
from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.tracking.run import tracking_uri

LEDGER = """
[[item]]
name = "engineer"
category = "staff"
hours = 3
usd_per_hour = 50

[[item]]
name = "labelled problems"
category = "human_data"
usd = 12.5
"""
FILES = ("report.html", "report.md", "runs.csv", "cost.json", "fits.json")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class Pruned(Exception):
    """What an Optuna pruner would raise."""


class Quiet:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


def _cfg(tmp: Path, name: str, *extra: str):
    return load_config(None, [
        "name=tracked", "model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=2",
        "sft.batch_size=8", "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.num_generations=2",
        "grpo.max_new_tokens=3", "grpo.verify_max_new_tokens=4", "eval.problems=2", "eval.samples=2",
        "eval.max_new_tokens=3", "eval.verify_max_new_tokens=4", f"output_dir={tmp / 'out' / name}",
        f"tracking.root={tmp / 'mlruns'}", *extra,
    ])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Six tiny trainings (five finished, one of them phase=final), one failed and one pruned, and a report."""
    tmp = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ids = {}
        for name, extra in [("nano-1", []), ("nano-3", ["grpo.steps=3"]), ("micro-1", ["model.size=micro"]),
                            ("micro-3", ["model.size=micro", "grpo.steps=3"]),
                            ("final", ["model.size=micro", "grpo.steps=4", "tracking.phase=final"])]:
            ids[name] = run_experiment(_cfg(tmp, name, *extra), Quiet(), run_name=name).run_id
        with pytest.raises(RuntimeError, match="injected"):
            run_experiment(_cfg(tmp, "failed", "grpo.steps=3"), Boom(3, RuntimeError("injected")), run_name="failed")
        with pytest.raises(Pruned):
            run_experiment(_cfg(tmp, "pruned", "grpo.steps=3"), Boom(3, Pruned()), run_name="pruned",
                           tags={"phase": "sweep-trial"}, pruned_on=(Pruned,))
        ledger = tmp / "ledger.toml"
        ledger.write_text(LEDGER, encoding="utf-8")
        result = build_report(None, ["tracked"], ledger, None, tmp / "report", root=tmp / "mlruns")
    return {"tmp": tmp, "ids": ids, "ledger": ledger, "result": result, "uri": tracking_uri(None, tmp / "mlruns")}


def _images(page: str) -> list[bytes]:
    """The PNGs embedded in an HTML page as data URIs."""
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(sources) == len(re.findall(r"<img\b", page))
    assert all(s.startswith("data:image/png;base64,") for s in sources), [s[:40] for s in sources]
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def _total_in(text: str) -> float:
    return float(re.search(r"Total cost: \\?\$([\d,.e+-]+)", text).group(1).replace(",", ""))  # \$ in report.md


def test_every_file_and_self_contained_html(real):
    result, out = real["result"], real["tmp"] / "report"
    assert all((out / name).is_file() for name in FILES)
    assert set(result.plots) == set(PLOTS) and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                                                   for p in result.plots.values())
    page = result.html.read_text(encoding="utf-8")
    images = _images(page)
    assert len(images) == len(PLOTS) == 6
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 for png in images)
    assert sorted(images) == sorted(p.read_bytes() for p in result.plots.values())
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    md = result.markdown.read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    assert sorted(linked) == sorted(f"plots/{name}.png" for name in PLOTS)
    assert all((out / p).is_file() for p in linked)


def test_cost_matches_the_store_and_counts_every_fate(real):
    result, ids = real["result"], real["ids"]
    runs = load_runs(real["uri"], ["tracked"])
    expected = project_cost(runs, load_ledger(real["ledger"]))
    cost = json.loads(result.cost_json.read_text())
    assert cost == json.loads(json.dumps(expected)) and result.cost == expected
    sft = runs[runs["tags.phase"] == "sft"]  # one shared SFT per model size (sft.reuse), billed once
    assert len(sft) == 2 and cost["by_phase"]["sft"] == pytest.approx(sft["cost/usd"].sum())
    assert cost["runs"] == {"finished": 5 + len(sft), "failed": 1, "killed": 0, "pruned": 1, "running": 0}
    assert cost["by_status"]["failed"] > 0 and cost["by_status"]["pruned"] > 0  # their compute is paid for
    assert cost["final_run_id"] == ids["final"] and cost["ratio_total_to_final"] > 1
    assert cost["ledger_items"] == 2 and cost["ledger_usd"] == 3 * 50 + 12.5
    assert cost["by_category"]["staff"] == 150 and cost["by_category"]["human_data"] == 12.5
    assert cost["total_usd"] == pytest.approx(cost["runs_usd"] + 162.5) and cost["runs_usd"] > 0
    text = result.markdown.read_text(encoding="utf-8")
    page = result.html.read_text(encoding="utf-8")
    assert _total_in(text) == pytest.approx(expected["total_usd"], rel=5e-3)
    assert _total_in(page) == _total_in(text)
    assert md(f"Final run cost: ${expected['final_run_usd']:.3g} (run {ids['final']})") in text
    assert f"{expected['ratio_total_to_final']:.3g}x the final run" in text
    assert "Runs by fate: 7 finished, 1 failed, 0 killed, 1 pruned, 0 running" in text
    for word in ("staff", "human_data", "sweep-trial", "pruned"):
        assert f"| {md(word)} |" in text and f"<td>{word}</td>" in page
    table = pd.read_csv(result.runs_csv)
    assert len(table) == 9 and sorted(table["fate"]) == ["failed"] + ["finished"] * 7 + ["pruned"]


def test_only_finished_scored_runs_enter_fits(real):
    result, ids = real["result"], real["ids"]
    fits = json.loads(result.fits_json.read_text())
    assert sorted(fits["run_ids"]) == sorted(ids.values()) and fits["n_points"] == 5
    runs = load_runs(real["uri"], ["tracked"]).set_index("run_name")
    assert (runs.loc[["failed", "pruned"], "fate"] == ["failed", "pruned"]).all()
    if runs.loc[list(ids), "eval/accuracy"].nunique() == 1:  # tiny runs all score the same: nothing to fit
        assert fits["forms"] == {} and set(fits["skipped"]) == {"saturating", "sigmoid", "power"}
        assert "no trend to fit" in result.markdown.read_text()


def test_report_run_holds_the_files_and_is_left_out_of_later_reports(real, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = real["result"]
    client = MlflowClient(real["uri"])
    run = client.get_run(result.report_run_id)
    assert run.data.tags["phase"] == "report" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "reports"
    top = {f.path for f in client.list_artifacts(result.report_run_id)}
    assert set(FILES) | {"plots"} <= top
    plots = {f.path for f in client.list_artifacts(result.report_run_id, "plots")}
    assert plots == {f"plots/{name}.png" for name in PLOTS}
    later = build_report(None, None, real["ledger"], None, tmp_path / "again", root=real["tmp"] / "mlruns",
                         log_to_mlflow=False)  # every experiment, the "reports" one included
    assert later.report_run_id is None and later.cost == result.cost
    assert result.report_run_id not in set(pd.read_csv(later.runs_csv)["run_id"])


def test_fits_on_fake_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "mlruns"
    fates = fake_runs().write_fake_runs(root / "mlflow.db", n=120, seed=1)
    client = MlflowClient(tracking_uri(None, root))
    exp = client.get_experiment_by_name("scaling-nano").experiment_id
    t0 = 1_750_000_000_000
    for tags, metrics in [({"phase": "report"}, {"cost/usd": 1e6, "compute/flops": 1e20, "eval/accuracy": 1.0}),
                          ({"phase": "rl"}, {"cost/usd": 0.5, "compute/flops": 1e15, "eval/accuracy": float("nan")})]:
        rid = client.create_run(exp, start_time=t0, tags=tags).info.run_id
        client.log_batch(rid, metrics=[Metric(k, v, t0, 0) for k, v in metrics.items()])
        client.set_terminated(rid, "FINISHED")
    result = build_report(None, None, None, None, tmp_path / "report", root=root)
    cost, fits = result.cost, result.fits
    assert cost["runs"] == fates | {"finished": fates["finished"] + 1, "running": 0}  # the NaN run counts
    assert cost["total_usd"] < 1e3 and fits["n_points"] == fates["finished"] - 1  # no parent, NaN or report run
    sat = fits["forms"]["saturating"]
    assert sat["params"]["E"] == pytest.approx(0.9, abs=0.05) and sat["params"]["alpha"] == pytest.approx(0.25, 0.3)
    nxt = fits["next_10x"][fits["best_form"]]
    largest = max(load_runs(tracking_uri(None, root), phase="final")["compute/flops"])
    assert nxt["compute"] == pytest.approx(10 * largest) and nxt["low"] <= nxt["predicted"] <= nxt["high"]
    assert fits["extrapolation"][0]["n_test"] > 0 and fits["extrapolation"][0]["form"] == fits["best_form"]
    md = result.markdown.read_text()
    assert re.search(r"accuracy = E - A C\^-alpha with E = 0\.\d+ \\\[0\.\d+, 0\.\d+\\\], A = ", md)  # [ ] escaped
    assert "Next 10x of compute: at " in md and "Held-out extrapolation check" in md and fits["forecast_ok"]
    assert f"E = {sat['params']['E']:.4g} \\[{sat['ci']['E'][0]:.4g}, {sat['ci']['E'][1]:.4g}\\]" in md
    on_disk = json.loads(result.fits_json.read_text())
    assert on_disk["forms"]["saturating"]["params"] == sat["params"]


def test_empty_store_with_a_ledger(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ledger = tmp_path / "ledger.toml"
    ledger.write_text(LEDGER, encoding="utf-8")
    result = build_report(None, None, ledger, None, tmp_path / "report", root=tmp_path / "mlruns")
    assert result.cost["total_usd"] == 162.5 and result.cost["runs"]["finished"] == 0
    assert result.fits["forms"] == {} and result.fits["n_points"] == 0
    md = result.markdown.read_text()
    assert "Total cost: \\$162.50" in md and "No final run" in md and "No fits: no finished run" in md
    assert len(_images(result.html.read_text())) == 6
    assert json.loads(result.fits_json.read_text())["best_form"] is None
    assert result.report_run_id and MlflowClient(tracking_uri(None, tmp_path / "mlruns")).get_run(
        result.report_run_id).data.tags["phase"] == "report"


def test_chromium_renders_every_image(real, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)}); "
                    "install one, e.g. apt-get install chromium")
    probe = ("<script>window.addEventListener('load', () => { const all = [...document.images];"
             " const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;"
             " const p = document.createElement('pre'); p.textContent = `RENDERED ${ok}/${all.length}`;"
             " document.body.appendChild(p); });</script>")
    page = tmp_path / "report.html"
    page.write_text(real["result"].html.read_text(encoding="utf-8").replace("</body>", probe + "</body>"))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r"RENDERED (\d+)/(\d+)", done.stdout)
    assert found, (done.returncode, done.stdout[-500:], done.stderr[-2000:])
    assert found.groups() == ("6", "6")


def test_no_forecast_when_no_law_extrapolates(tmp_path, monkeypatch):
    """Runs whose score climbs and then collapses at the largest budgets: every form misses the held-out runs, so
    the report states no next-10x number and says why (and draws no extrapolation)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "mlruns"
    client = MlflowClient(tracking_uri(None, root))
    exp = client.create_experiment("collapse")
    t0 = 1_750_000_000_000
    for i, (flops, score) in enumerate([(1e12, 0.10), (2e12, 0.2), (4e12, 0.3), (8e12, 0.4), (1.6e13, 0.5),
                                        (3.2e13, 0.6), (6.4e13, 0.1), (1.28e14, 0.05)]):
        rid = client.create_run(exp, start_time=t0, run_name=f"r{i}", tags={"phase": "rl"}).info.run_id
        client.log_batch(rid, metrics=[Metric("compute/flops", flops, t0, 0), Metric("eval/accuracy", score, t0, 0)])
        client.set_terminated(rid, "FINISHED")
    result = build_report(None, ["collapse"], None, None, tmp_path / "report", root=root, log_to_mlflow=False)
    assert not result.fits["forecast_ok"] and result.fits["extrapolation"][0]["mae"] > 0.05
    md = result.markdown.read_text()
    assert "Next 10x of compute" not in md
    assert "No forecast: no law extrapolates on these runs, because the best form misses the held-out runs" in md
