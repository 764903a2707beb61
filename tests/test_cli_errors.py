"""Bad input stops before training with one clear error line, exit code 2, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlscale.experiments.cli import app

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "addition.toml")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "task.name=chess"], "unknown task 'chess'"),
        (["--set", "model.path=/nonexistent/model"], "is not a model directory"),
        (["--set", "task.digits=1", "--set", "eval.problems=500"], "cannot draw 500 distinct eval problems"),
        (["--set", "grpo.stepz=3"], "grpo.stepz: unknown key"),
        (["--set", "grpo.steps=abc"], "grpo.steps"),
        (["--set", "grpo.steps=-5"], "grpo.steps"),
        (["--set", "model.size=huge"], "unknown model.size 'huge'"),
        (["--set", "novalue"], "expected key=value"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, expected):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", CONFIG, "--set", f"output_dir={out}", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_malformed_and_missing_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nsize = 'tiny'\n")
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 2 and "not valid TOML" in result.stderr
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "no such config file" in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(app, ["train", CONFIG, "--debug", "--set", "model.path=/nonexistent"])
    assert result.exit_code == 2 and "Traceback" in result.stderr
