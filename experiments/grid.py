"""Scaling grids: one tracked run per point of a cartesian grid over config fields, resumable.

A point is identified by a hash of its whole resolved config (`grid.id` tag), so a point already FINISHED in
the store is skipped when the grid is run again, and a point that was interrupted resumes from its
checkpoint into the same MLflow run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlscale.experiments.config import ExperimentConfig, load_config
from rlscale.experiments.runner import run_experiment
from rlscale.tracking.run import open_client


@dataclass
class GridPoint:
    """One point of the grid: its coordinates, its config and its id."""

    values: dict[str, Any]
    cfg: ExperimentConfig
    id: str


def grid_points(config: str, overrides: list[str]) -> list[GridPoint]:
    """Every point of the config's grid, in row-major order of `grid.axes`."""
    base = load_config(config, overrides)
    if base.grid is None or not base.grid.axes:
        raise ValueError(f"{config}: no [grid] with axes (grid.axes)")
    keys = list(base.grid.axes)
    points = []
    for combo in itertools.product(*base.grid.axes.values()):
        values = dict(zip(keys, combo))
        cfg = load_config(config, overrides, values)
        ident = json.dumps(cfg.model_dump(exclude={"tracking": True, "output_dir": True, "sweep": True, "grid": True,
                                                   "sft": {"reuse"}}), sort_keys=True)  # shared or not: same point
        pid = hashlib.sha256(ident.encode()).hexdigest()[:12]
        cfg = cfg.model_copy(update={"output_dir": f"{base.output_dir}/grid/{pid}"})
        points.append(GridPoint(values, cfg, pid))
    return points


def finished_ids(cfg: ExperimentConfig) -> set[str]:
    """`grid.id` of the runs of this experiment that FINISHED."""
    client = open_client(cfg.tracking.uri, Path(cfg.tracking.root))
    exp = client.get_experiment_by_name(cfg.name)
    if exp is None:
        return set()
    ids, token = set(), None
    while True:
        page = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                  page_token=token)
        ids |= {r.data.tags["grid.id"] for r in page if "grid.id" in r.data.tags}
        token = page.token
        if not token:
            return ids


def run_point(point: GridPoint, progress) -> str | None:
    """Train one grid point as a run tagged with its coordinates; returns its MLflow run id."""
    tags = {"grid.id": point.id} | {f"grid.{k}": json.dumps(v) if not isinstance(v, str) else v
                                    for k, v in point.values.items()}
    name = "grid-" + "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.values.items())
    return run_experiment(point.cfg, progress, resume=True, tags=tags, run_name=name[:250]).run_id
