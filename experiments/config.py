"""Experiment configs: TOML files validated by a typed schema, with `--set key.sub=value` overrides."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlscale.rl.pipeline import PipelineConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the file and the key."""


class TrackingConfig(BaseModel):
    """Where and how a run is recorded in MLflow."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Record the run in MLflow.")
    uri: str | None = Field(None, description="Tracking URI (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db).")
    root: str = Field("mlruns", description="Folder of the embedded SQLite store and its artifacts.")
    prices: str | None = Field(None, description="Price table TOML (default: tracking/prices.toml).")
    price_key: str | None = Field(None, description="Bill as this price-table entry (default: by device name).")
    phase: str = Field("rl", description="Phase tag: sft, rl, eval, sweep-trial, ablation, final, ...")
    recipe: str | None = Field(None, description="Recipe tag (default: a hash of the config without its scale knobs).")
    flush_seconds: float = Field(10.0, gt=0.0, le=30.0, description="Longest wait before metrics are sent.")
    log_model: bool = Field(False, description="Log the final model (safetensors) as an artifact of the run.")
    log_checkpoints: bool = Field(False, description="Log the latest resumable checkpoint as an artifact at the end.")
    system_metrics: bool = Field(False, description="MLflow system metrics (CPU, memory, disk, GPU use) every 10 s.")


class SearchDim(BaseModel):
    """One dimension of a sweep's search space."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"] = Field("float", description="Kind of values sampled.")
    low: float | None = Field(None, description="Smallest value (float, int).")
    high: float | None = Field(None, description="Largest value (float, int).")
    log: bool = Field(False, description="Sample on a log scale (float, int).")
    step: float | None = Field(None, gt=0, description="Spacing of the values (float, int; not with log).")
    choices: list[Any] | None = Field(None, min_length=1, description="The values (categorical).")

    @model_validator(mode="after")
    def _check(self) -> SearchDim:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs choices")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs low < high")
        elif self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("a log dimension needs low > 0 and no step")
        return self


class SweepConfig(BaseModel):
    """An Optuna study over config fields: its space, objective, sampler, pruner and storage."""

    model_config = ConfigDict(extra="forbid")
    trials: int = Field(8, ge=1, description="Trials in the study (complete or pruned); --trials overrides.")
    metric: str = Field("eval/accuracy", description="Objective: a metric of the run's final eval.")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="Optimisation direction.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    sampler_seed: int = Field(0, description="Sampler seed (a 1-worker sweep is then reproducible).")
    pruner: Literal["median", "none", "scaling"] = Field(
        "median", description="Prune on intermediate evals (grpo.eval_every): median, none, or scaling (a trial whose "
        "own curve cannot reach the best finished trial by its full budget).")
    pruner_startup_trials: int = Field(2, ge=0, description="Trials completed before any pruning.")
    pruner_warmup_steps: int = Field(0, ge=0, description="RL steps of a trial before it can be pruned.")
    storage: str | None = Field(None, description="Optuna storage URL (default: journal file <root>/optuna.log).")
    study: str | None = Field(None, description="Study name (default: '<name>-sweep').")
    space: dict[str, SearchDim] = Field(default_factory=dict, description="Config field -> search dimension.")


class GridConfig(BaseModel):
    """A cartesian grid of runs over config fields."""

    model_config = ConfigDict(extra="forbid")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="Config field -> the values it takes.")


class ExperimentConfig(PipelineConfig):
    """One experiment: the training pipeline plus where and under which name it is recorded."""

    name: str = Field("rlscale", min_length=1, max_length=200, description="Experiment name (MLflow experiment).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    sweep: SweepConfig | None = Field(None, description="Optuna sweep (`rlscale sweep`).")
    grid: GridConfig | None = Field(None, description="Scaling grid (`rlscale grid`).")


SCALE_KNOBS = ("name", "seed", "output_dir", "tracking", "sweep", "grid", "sft.steps", "grpo.steps", "grpo.eval_every",
               "grpo.eval_problems", "grpo.checkpoint_every", "grpo.optim", "eval.problems", "eval.samples",
               "eval.batch_size", "model.pretrain_tokens", "model.pretrain_flops", "model.pretrain_usd",
               "model.pretrain_source")


def recipe_of(cfg: ExperimentConfig) -> str:
    """The run's recipe: `tracking.recipe`, else a short stable hash of its config with the scale knobs (budget,
    seed, names, tracking, eval sizes, the optimizer's kernel) left out, so runs that differ only in budget or seed
    group together."""
    if cfg.tracking.recipe:
        return cfg.tracking.recipe
    data = cfg.model_dump(mode="json")
    for knob in SCALE_KNOBS:
        *path, last = knob.split(".")
        node = data
        for part in path:
            node = node.get(part, {})
        node.pop(last, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def parse_value(text: str) -> Any:
    """A `--set` value: TOML literal (number, bool, list, quoted string), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"--set value {text[:40]!r}...: nested too deeply") from None


def set_value(data: dict, key: str, value: Any, where: str) -> None:
    """Set the field `a.b.c` of a nested dict."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{where}: empty key in {key!r}")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {p} is not a table")
        node = child
    node[parts[-1]] = value


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `key.sub=value` to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, _, text = assignment.partition("=")
    set_value(data, key, parse_value(text.strip()), f"--set {assignment!r}")


def describe_error(err: ValidationError, where: str) -> str:
    """A validation error as one line: `where: key.path: what is wrong`."""
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    if len(loc) > 1 and loc[0] == "task" and loc[1] in ("arithmetic", "countdown", "dataset", "recipe"):
        loc.pop(1)  # the union tag pydantic inserts
    key = ".".join(loc) or "(root)"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "union_tag_invalid":
        msg = f"unknown task {e['input'].get('name')!r}; choose arithmetic, countdown, dataset or recipe"
    elif "input" in e and not isinstance(e["input"], dict):
        msg = f"{msg} (got {e['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Read, override (`--set` strings, then typed `values`) and validate a config; any problem is a one-line
    ConfigError. The fields a sweep or grid varies are checked too, with each of their values."""
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
        except RecursionError:
            raise ConfigError(f"{where}: not valid TOML: nested too deeply") from None
    for o in overrides or []:
        apply_override(data, o)
    for k, v in (values or {}).items():
        set_value(data, k, v, where)
    cfg = _validate(data, where)
    varied: dict[str, list[Any]] = dict(cfg.grid.axes) if cfg.grid else {}
    for k, dim in (cfg.sweep.space if cfg.sweep else {}).items():
        varied[k] = dim.choices if dim.type == "categorical" else [_cast(dim.type, dim.low), _cast(dim.type, dim.high)]
    for key, options in varied.items():
        if key.split(".")[0] in ("sweep", "grid", "name", "tracking"):
            raise ConfigError(f"{where}: {key}: a sweep or grid cannot vary this field")
        if not options:
            raise ConfigError(f"{where}: grid.axes.{key}: no values")
        for option in options:
            trial = copy.deepcopy(data)
            set_value(trial, key, option, where)
            _validate(trial, f"{where} ({key} = {option!r})")
    return cfg


def _cast(kind: str, x: float | None) -> Any:
    return int(x) if kind == "int" and x is not None else x


def _validate(data: dict, where: str) -> ExperimentConfig:
    if isinstance(data.get("task"), dict):
        data["task"].setdefault("name", "arithmetic")  # the default task, as when [task] is absent
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_error(e, where)) from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    _check_numbers(cfg.model_dump(), where)
    return cfg


INT_RANGE = (-(2**63), 2**63 - 1)  # what torch, numpy and the stores hold


def _check_numbers(data: Any, where: str, key: str = "") -> None:
    """The config's one number policy: every float finite, every int a 64-bit integer (checked before anything is
    created, so nothing fails halfway)."""
    if isinstance(data, dict):
        for k, v in data.items():
            _check_numbers(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list | tuple):
        for i, v in enumerate(data):
            _check_numbers(v, where, f"{key}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{where}: {key}: must be a finite number (got {data!r})")
    elif isinstance(data, int) and not isinstance(data, bool) and not INT_RANGE[0] <= data <= INT_RANGE[1]:
        raise ConfigError(f"{where}: {key}: out of range (got {data:.3g}; at most 2**63 - 1)")


def schema_rows(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every field, nested tables expanded (each task's own fields)."""
    import types
    import typing

    from pydantic_core import PydanticUndefined

    model = model or ExperimentConfig
    rows = []
    for name, f in model.model_fields.items():
        key, ann = prefix + name, f.annotation
        if typing.get_origin(ann) is dict and issubclass(typing.get_args(ann)[1], BaseModel):
            rows.append((key, "table of tables", "{}", f.description or ""))
            rows += schema_rows(typing.get_args(ann)[1], key + ".<field>.")
            continue
        args = typing.get_args(ann) if isinstance(ann, types.UnionType) or typing.get_origin(ann) else ()
        subs = [a for a in (args or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if subs:
            for sub in subs:
                tag = sub.model_fields.get("name")
                label = f"{key}" + (f" (name = {tag.default!r})" if tag is not None and len(subs) > 1 else "")
                rows.append((label, "table", "", f.description or ""))
                rows += schema_rows(sub, key + ".")
            continue
        if f.default_factory is not None:
            default = repr(f.default_factory())
        else:
            default = "" if f.default is PydanticUndefined else repr(f.default)
        if typing.get_origin(ann) is Literal:
            type_name = " | ".join(repr(a) for a in typing.get_args(ann))
        else:
            type_name = str(ann).replace("typing.", "") if typing.get_args(ann) else getattr(ann, "__name__", str(ann))
        rows.append((key, type_name, default, f.description or ""))
    return rows
