"""`rlscale fit`, `rlscale cost` and `rlscale report` as a user runs them: JSON contracts and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from rlscale.experiments.cli import app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _saturating_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    c = np.logspace(12, 18, 30)
    acc = 0.9 - 5.0 * c ** -0.1 + rng.normal(0, 0.005, c.size)
    path = tmp_path / "runs.csv"
    pd.DataFrame({"compute/flops": c, "eval/accuracy": acc}).to_csv(path, index=False)
    return path


def test_fit_json_contract(tmp_path):
    csv = _saturating_csv(tmp_path)
    out = CliRunner().invoke(app, ["fit", "--csv", str(csv), "--x", "compute/flops", "--y", "eval/accuracy",
                                   "--form", "saturating", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert {"form", "params", "ci", "r2"} <= set(result) and result["form"] == "saturating"
    assert set(result["params"]) == {"E", "A", "alpha"}
    assert result["params"]["alpha"] == pytest.approx(0.1, rel=0.2) and result["r2"] > 0.95
    lo, hi = result["ci"]["E"]
    assert lo <= result["params"]["E"] <= hi
    table = CliRunner().invoke(app, ["fit", "--csv", str(csv), "--x", "compute/flops", "--y", "eval/accuracy",
                                     "--form", "power", "--exclude-below", "1e13"])
    assert table.exit_code == 0 and "excluded below 1e+13" in table.stdout


def test_fit_reproduces_chinchilla_from_the_command_line(tmp_path):
    if not (SHARED / "chinchilla_epoch_2024.csv").is_file():
        pytest.skip(f"reference data absent: {SHARED / 'chinchilla_epoch_2024.csv'}")
    df = pd.read_csv(SHARED / "chinchilla_epoch_2024.csv")
    df = df.nsmallest(len(df) - 5, "loss")  # Epoch's exclusion of the 5 highest-loss points
    df["D"] = df["Training FLOP"] / (6 * df["Model Size"])
    path = tmp_path / "chinchilla.csv"
    df[["Model Size", "D", "loss"]].to_csv(path, index=False)
    out = CliRunner().invoke(app, ["fit", "--csv", str(path), "--x", "Model Size", "--x2", "D", "--y", "loss",
                                   "--form", "chinchilla", "--json"])
    assert out.exit_code == 0, out.output
    p = json.loads(out.stdout)["params"]
    assert p["alpha"] == pytest.approx(0.3473, rel=0.03) and p["beta"] == pytest.approx(0.3672, rel=0.03)


@pytest.mark.parametrize("args, message", [
    (["--form", "cubic"], "--form 'cubic'"),
    (["--y", "nope"], "nope"),
])
def test_fit_errors_are_one_line(tmp_path, args, message):
    csv = _saturating_csv(tmp_path)
    base = {"--csv": str(csv), "--x": "compute/flops", "--y": "eval/accuracy", "--form": "power"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    out = CliRunner().invoke(app, ["fit", *[a for kv in base.items() for a in kv]])
    assert out.exit_code == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


LEDGER = """
[[item]]
name = "annotators"
category = "human_data"
hours = 10
usd_per_hour = 40

[[item]]
name = "workstation"
category = "hardware"
capex_usd = 3000
amortization_years = 3
used_years = 0.5

[[item]]
name = "final training (rented)"
category = "final_run"
gpu_hours = 100
usd_per_gpu_hour = 2.0
device = "h100"
"""


def test_cost_json_from_a_ledger_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no store here: a ledger alone is valid input, and no store is created
    (tmp_path / "ledger.toml").write_text(LEDGER)
    out = CliRunner().invoke(app, ["cost", "--ledger", "ledger.toml", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["total_usd"] == 400 + 500 + 200 and result["final_run_usd"] == 200
    assert result["ratio_total_to_final"] == pytest.approx(5.5)
    assert result["by_category"]["human_data"] == 400 and result["by_category"]["hardware"] == 500
    assert sum(result["runs"].values()) == 0
    assert not (tmp_path / "mlruns").exists()
    table = CliRunner().invoke(app, ["cost", "--ledger", "ledger.toml"])
    assert table.exit_code == 0 and "total / final = 5.5x" in table.stdout
    bad = CliRunner().invoke(app, ["cost", "--ledger", "missing.toml"])
    assert bad.exit_code == 2 and "missing.toml" in bad.stderr
