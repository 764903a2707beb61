"""Experiment configs: TOML files validated by a typed schema, with `--set key.sub=value` overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rl.pipeline import PipelineConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the file and the key."""


class TrackingConfig(BaseModel):
    """Where and how a run is recorded in MLflow."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Record the run in MLflow.")
    uri: str | None = Field(None, description="Tracking URI (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db).")
    root: str = Field("mlruns", description="Folder of the embedded SQLite store and its artifacts.")
    prices: str | None = Field(None, description="Price table TOML (default: tracking/prices.toml).")
    phase: str = Field("rl", description="Phase tag: sft, rl, eval, sweep-trial, ablation, final, ...")
    flush_seconds: float = Field(10.0, gt=0.0, le=30.0, description="Longest wait before metrics are sent.")
    log_model: bool = Field(False, description="Log the final model (safetensors) as an artifact of the run.")


class ExperimentConfig(PipelineConfig):
    """One experiment: the training pipeline plus where and under which name it is recorded."""

    name: str = Field("rlscale", min_length=1, max_length=200, description="Experiment name (MLflow experiment).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")


def parse_value(text: str) -> Any:
    """A `--set` value: TOML literal (number, bool, list, quoted string), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `key.sub=value` to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {p} is not a table")
        node = child
    node[parts[-1]] = parse_value(text.strip())


def _describe(err: ValidationError, where: str) -> str:
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    if len(loc) > 1 and loc[0] == "task" and loc[1] in ("arithmetic", "countdown", "recipe"):
        loc.pop(1)  # the union tag pydantic inserts
    key = ".".join(loc) or "(root)"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "union_tag_invalid":
        msg = f"unknown task {e['input'].get('name')!r}; choose arithmetic, countdown or recipe"
    elif "input" in e and not isinstance(e["input"], dict):
        msg = f"{msg} (got {e['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate a config; any problem is a one-line ConfigError."""
    data: dict = {}
    where = str(path) if path else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{where}: no such config file")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: not valid TOML: {e}") from None
    for o in overrides or []:
        apply_override(data, o)
    if isinstance(data.get("task"), dict):
        data["task"].setdefault("name", "arithmetic")  # the default task, as when [task] is absent
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, where)) from None
