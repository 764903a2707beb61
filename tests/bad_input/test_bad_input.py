"""Every malformed file in this folder, fed to the command that reads it: one clear error line, exit 2, nothing written.

`cases.toml` maps each file to the command and the text its error line must contain. Each case runs in an empty
temp folder (so the default store `mlruns/` and `outputs/` would appear there) with no MLFLOW_TRACKING_URI, and
that folder must still be empty afterwards. A case of a `dataset` task config names its data files (`data`,
`eval_data`, relative to this folder), passed as `--set task.path=<absolute path>` (`task.eval_path`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlscale.experiments.cli import app

HERE = Path(__file__).resolve().parent
CASES = tomllib.loads((HERE / "cases.toml").read_text())["case"]


def _argv(case: dict) -> list[str]:
    path = str(HERE / case["file"])
    command, _, form = case["command"].partition(" --form ")
    if command == "cost":
        return ["cost", "--ledger", path]
    if command == "fit":
        return ["fit", "--csv", path, "--x", "x", "--y", "y", "--form", form or "power"]
    data = [("task.path", case.get("data")), ("task.eval_path", case.get("eval_data"))]
    sets = [f"--set={key}={json.dumps(str(HERE / file))}" for key, file in data if file]
    return [*command.split(), path, *sets]


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if "xfail" in case else []
        yield pytest.param(case, marks=marks, id=f"{case['command'].split()[0]}:{case['file']}")


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_clear_error_line(case, empty_cwd):
    result = CliRunner().invoke(app, _argv(case))
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case["expect"] in lines[0], lines[0]
    assert result.stdout.strip() == ""
    assert list(empty_cwd.iterdir()) == []  # no store, no run, no output folder


def test_every_file_here_has_a_case_and_there_are_enough():
    files = {str(p.relative_to(HERE)) for p in HERE.rglob("*") if p.is_file() and p.parent != HERE}
    covered = {c[key] for c in CASES for key in ("file", "data", "eval_data") if key in c}
    assert files <= covered, sorted(files - covered)
    assert len(files) >= 30 and len(CASES) >= 30


def test_debug_shows_the_traceback(empty_cwd):
    result = CliRunner().invoke(app, ["train", str(HERE / "config" / "missing_model_path.toml"), "--debug"])
    assert result.exit_code == 2 and "Traceback" in result.stderr
    assert "is not a model directory" in result.stderr.splitlines()[-1]
    assert list(empty_cwd.iterdir()) == []
