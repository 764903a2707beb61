"""analysis.cost: ledger pricing and validation, and the project total over runs of every fate plus the ledger."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

from rlscale.analysis.cost import CATEGORIES, LedgerError, cost_table, load_ledger, project_cost, spend_over_time
from rlscale.analysis.runs import FATES

LEDGER = """
[[item]]
name = "labelled problems"
category = "human_data"
hours = 12.5
usd_per_hour = 40

[[item]]
name = "external final-run rental"
category = "other"
gpu_hours = 10
usd_per_gpu_hour = 2.25
device = "h100"
note = "spot"

[[item]]
name = "workstation"
category = "hardware"
capex_usd = 3000
amortization_years = 4
used_years = 0.5

[[item]]
name = "engineer"
category = "staff"
usd = 1234.5
"""


def ledger_file(tmp_path, text: str):
    path = tmp_path / "ledger.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_each_pricing_method_is_exact(tmp_path):
    df = load_ledger(ledger_file(tmp_path, LEDGER))
    assert list(df.columns) == ["name", "category", "method", "usd", "gpu_hours", "device", "note"]
    assert list(df["method"]) == ["hours", "gpu_hours", "capex", "usd"]
    assert list(df["usd"]) == [12.5 * 40, 10 * 2.25, 3000 * 0.5 / 4, 1234.5] == [500.0, 22.5, 375.0, 1234.5]
    assert df["gpu_hours"][1] == 10.0 and df["gpu_hours"].isna().sum() == 3
    assert (df["device"][1], df["note"][1]) == ("h100", "spot")
    assert df["usd"].dtype == float


def test_empty_ledger(tmp_path):
    df = load_ledger(ledger_file(tmp_path, "# nothing yet\n"))
    assert df.empty and "usd" in df.columns


ITEM = '[[item]]\nname = "ok"\ncategory = "other"\nusd = 1\n\n'


@pytest.mark.parametrize("body, label, problem", [
    ('name = "x"\ncategory = "lunch"\nusd = 1', "'x'", "category"),
    ('name = "x"\ncategory = "staff"\nusd = -1', "'x'", "greater than or equal to 0"),
    ('name = "x"\ncategory = "staff"\nhours = -2\nusd_per_hour = 3', "'x'", "hours"),
    ('name = "x"\ncategory = "staff"', "'x'", "no price"),
    ('name = "x"\ncategory = "staff"\nnote = "free?"', "'x'", "no price"),
    ('name = "x"\ncategory = "staff"\nusd = 1\nhours = 2\nusd_per_hour = 3', "'x'", "2 prices (usd, hours)"),
    ('name = "x"\ncategory = "hardware"\ngpu_hours = 5', "'x'", "needs usd_per_gpu_hour"),
    ('name = "x"\ncategory = "hardware"\ncapex_usd = 5\namortization_years = 2\nused_years = 3', "'x'",
     "used_years (3.0) exceeds amortization_years (2.0)"),
    ('name = "x"\ncategory = "hardware"\ncapex_usd = 5\namortization_years = 0\nused_years = 0', "'x'",
     "amortization_years"),
    ('name = "x"\ncategory = "staff"\nusd = 1\ncolour = "red"', "'x'", "unknown key 'colour'"),
    ('name = "x"\ncategory = "staff"\nusd = "12"', "'x'", "usd: Input should be a valid number"),
    ('name = "x"\ncategory = "staff"\nusd = true', "'x'", "usd: Input should be a valid number"),
    ('name = "x"\ncategory = "staff"\nusd = nan', "'x'", "finite"),
    ('name = "x"\ncategory = "staff"\nusd = 1\ndevice = "h100"', "'x'", "device is only for gpu_hours"),
    ('category = "staff"\nusd = 1', "item #2", "name: Field required"),
])
def test_bad_item_names_the_file_and_item(tmp_path, body, label, problem):
    path = ledger_file(tmp_path, ITEM + "[[item]]\n" + body + "\n")
    with pytest.raises(LedgerError) as e:
        load_ledger(path)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    assert str(path) in message and "item #2" in message and label in message and problem in message


@pytest.mark.parametrize("text, problem", [
    ('[[item]\nname = "x"', "cannot read ledger"),
    ('title = "costs"\n' + ITEM, "unknown top-level key(s) title"),
    ('item = 3\n', "'item' must be [[item]] tables"),
    ('item = [1]\n', "item #1: must be a table"),
])
def test_bad_file(tmp_path, text, problem):
    path = ledger_file(tmp_path, text)
    with pytest.raises(LedgerError, match=re.escape(problem)) as e:
        load_ledger(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(LedgerError, match="nope.toml: cannot read ledger"):
        load_ledger(tmp_path / "nope.toml")


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """Runs as analysis.runs.load_runs returns them (only the columns cost reads, plus times)."""
    df = pd.DataFrame(rows)
    if len(df) and "tags.device.type" not in df:
        df["tags.device.type"] = "cuda"  # GPU runs: their device-hours are GPU-hours
    for col in ("start_time", "end_time"):
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    return df


RUNS = runs_frame([
    {"run_id": "a", "fate": "finished", "tags.phase": "sft", "cost/usd": 0.5, "compute/gpu_hours": 0.25,
     "compute/flops": 1e15, "start_time": 0, "end_time": 10},
    {"run_id": "b", "fate": "failed", "tags.phase": "rl", "cost/usd": 0.25, "compute/gpu_hours": 0.125,
     "compute/flops": 2e15, "start_time": 5, "end_time": 20},
    {"run_id": "c", "fate": "killed", "tags.phase": "rl", "cost/usd": 0.125, "compute/gpu_hours": 0.0625,
     "compute/flops": 3e15, "start_time": 6, "end_time": 15},
    {"run_id": "d", "fate": "pruned", "tags.phase": "sweep-trial", "cost/usd": 1.0, "compute/gpu_hours": 0.5,
     "compute/flops": 4e15, "start_time": 7, "end_time": 30},
    {"run_id": "e", "fate": "running", "tags.phase": "rl", "cost/usd": math.nan, "compute/gpu_hours": math.nan,
     "compute/flops": math.nan, "start_time": 40, "end_time": None},
    {"run_id": "f", "fate": "finished", "tags.phase": "final", "cost/usd": 2.0, "compute/gpu_hours": 1.0,
     "compute/flops": 8e15, "start_time": 50, "end_time": 90},
    {"run_id": "g", "fate": "finished", "tags.phase": None, "cost/usd": 0.0625, "compute/gpu_hours": 0.03125,
     "compute/flops": 5e14, "start_time": 1, "end_time": 2},
])
RUNS_USD = 0.5 + 0.25 + 0.125 + 1.0 + 2.0 + 0.0625  # every value a binary fraction: float sums are exact


def check_sums(result: dict) -> None:
    assert set(result["by_category"]) == set(CATEGORIES) == set(result["gpu_hours_by_category"])
    assert set(result["by_status"]) == set(FATES) == set(result["runs"])
    assert math.fsum(result["by_category"].values()) == result["total_usd"]
    assert result["runs_usd"] + result["ledger_usd"] == result["total_usd"]
    assert math.fsum(result["by_status"].values()) == result["runs_usd"]
    assert math.fsum(result["by_phase"].values()) == result["runs_usd"]
    assert math.fsum(result["gpu_hours_by_category"].values()) == result["gpu_hours_total"]
    json.dumps(result, allow_nan=False)


def test_runs_with_a_final_run():
    result = project_cost(RUNS)
    check_sums(result)
    assert result["total_usd"] == RUNS_USD == result["runs_usd"] and result["ledger_usd"] == 0.0
    assert result["final_run_id"] == "f" and result["final_run_usd"] == 2.0
    assert result["ratio_total_to_final"] == RUNS_USD / 2.0
    assert result["by_category"] == {"final_run": 2.0, "prior_runs": RUNS_USD - 2.0, "human_data": 0.0,
                                     "hardware": 0.0, "staff": 0.0, "other": 0.0}
    assert result["by_status"] == {"finished": 2.5625, "failed": 0.25, "killed": 0.125, "pruned": 1.0, "running": 0.0}
    assert result["by_phase"] == {"(none)": 0.0625, "final": 2.0, "rl": 0.375, "sft": 0.5, "sweep-trial": 1.0}
    assert result["runs"] == {"finished": 3, "failed": 1, "killed": 1, "pruned": 1, "running": 1}
    assert result["runs_without_cost"] == 1
    assert result["gpu_hours_total"] == RUNS_USD / 2 and result["gpu_hours_final"] == 1.0
    assert result["flops_total"] == 18.5e15 and result["flops_final"] == 8e15


def test_runs_and_ledger(tmp_path):
    result = project_cost(RUNS, load_ledger(ledger_file(tmp_path, LEDGER)))
    check_sums(result)
    ledger_usd = 500.0 + 22.5 + 375.0 + 1234.5
    assert result["total_usd"] == RUNS_USD + ledger_usd and result["ledger_usd"] == ledger_usd
    assert result["by_category"]["human_data"] == 500.0 and result["by_category"]["hardware"] == 375.0
    assert result["by_category"]["other"] == 22.5 and result["by_category"]["staff"] == 1234.5
    assert result["ratio_total_to_final"] == (RUNS_USD + ledger_usd) / 2.0
    assert result["gpu_hours_total"] == RUNS_USD / 2 + 10 and result["gpu_hours_by_category"]["other"] == 10.0
    assert result["ledger_items"] == 4


def test_no_final_run():
    result = project_cost(RUNS[RUNS["run_id"] != "f"])
    check_sums(result)
    assert result["final_run_usd"] is None and result["ratio_total_to_final"] is None
    assert result["final_run_id"] is None and result["gpu_hours_final"] is None and result["flops_final"] is None
    assert result["by_category"]["final_run"] == 0.0 and result["total_usd"] == RUNS_USD - 2.0


def test_explicit_final_run():
    result = project_cost(RUNS, final_run_id="d")
    check_sums(result)
    assert result["final_run_id"] == "d" and result["final_run_usd"] == 1.0
    assert result["ratio_total_to_final"] == RUNS_USD and result["flops_final"] == 4e15
    assert result["by_category"]["prior_runs"] == RUNS_USD - 1.0
    with pytest.raises(ValueError, match="'zzz' is not among the 7 runs"):
        project_cost(RUNS, final_run_id="zzz")


def test_final_run_without_cost_has_no_ratio():
    result = project_cost(RUNS, final_run_id="e")
    assert result["final_run_usd"] == 0.0 and result["ratio_total_to_final"] is None


def test_two_final_runs_need_a_choice():
    runs = RUNS.assign(**{"tags.phase": RUNS["tags.phase"].where(RUNS["run_id"] != "a", "final")})
    with pytest.raises(ValueError, match="2 runs are tagged phase=final"):
        project_cost(runs)
    assert project_cost(runs, final_run_id="a")["final_run_usd"] == 0.5


def test_ledger_alone(tmp_path):
    ledger = load_ledger(ledger_file(tmp_path, LEDGER + '[[item]]\nname = "r"\ncategory = "final_run"\nusd = 64\n'))
    result = project_cost(pd.DataFrame(), ledger)
    check_sums(result)
    assert result["total_usd"] == 2132.0 + 64 and result["final_run_usd"] == 64.0
    assert result["ratio_total_to_final"] == 2196.0 / 64 and result["flops_final"] is None
    assert result["runs"] == dict.fromkeys(FATES, 0) and result["by_phase"] == {} and result["runs_usd"] == 0.0
    assert project_cost(pd.DataFrame())["total_usd"] == 0.0


def test_cost_table_rounds_only_for_display(tmp_path):
    result = project_cost(RUNS, load_ledger(ledger_file(tmp_path, LEDGER)))
    table = cost_table(result)
    assert list(table["category"]) == [*CATEGORIES, "total"]
    assert list(table.columns) == ["category", "usd", "share_pct", "GPU_hours"]
    assert table["usd"].iloc[-1] == round(result["total_usd"], 2) and table["share_pct"].iloc[-1] == 100.0
    assert table.set_index("category")["usd"]["final_run"] == 2.0


def test_spend_over_time():
    df = spend_over_time(RUNS)
    assert list(df["run_id"]) == ["g", "a", "c", "b", "d", "e", "f"]  # by end, a running run at its start
    assert df["cumulative_usd"].iloc[-1] == RUNS_USD and df["cumulative_usd"].is_monotonic_increasing
    assert spend_over_time(pd.DataFrame()).empty
