"""Runs already in the store: list them, and mark runs whose heartbeat stopped (SIGKILL, power loss) KILLED."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow.entities import RunStatus, ViewType
from mlflow.tracking import MlflowClient

from rlscale.tracking.spool import SyncResult, sync_spool


def experiment_ids(client: MlflowClient, names: list[str] | None = None) -> list[str]:
    """Ids of the named experiments (all when none are named); an unknown name is a ValueError."""
    if not names:
        return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(f"no experiment named {name!r} in the store")
        ids.append(exp.experiment_id)
    return ids


VIEW_KEY = "rlscale"  # the experiments' saved runs-table view: `#/experiments/<id>?viewStateShareKey=rlscale`
VIEW_COLUMNS = ["attributes.`Dataset`", "attributes.`Models`", "attributes.`Source`", "attributes.`Description`",
                "tags.`phase`", "tags.`model.name`", "metrics.`eval/accuracy`", "metrics.`eval/rl_gain`",
                "metrics.`eval/verify_balanced_accuracy`", "metrics.`compute/flops`", "metrics.`cost/usd`"]


def save_runs_view(client: MlflowClient, names: list[str] | None = None) -> dict[str, str]:
    """Save the runs table that matters (phase, model, accuracy and RL gain, self-verification, FLOPs, cost; newest
    first) as a shared view of each named experiment (all when none are named); returns name -> experiment id.

    It is MLflow's own shared-view mechanism: an experiment tag `mlflow.sharedViewState.rlscale` that the UI applies
    when the URL carries `viewStateShareKey=rlscale`."""
    view = json.dumps({"selectedColumns": VIEW_COLUMNS, "orderByKey": "attributes.start_time", "orderByAsc": False,
                       "runsHiddenMode": "SHOW_ALL"})
    out = {}
    for exp_id in experiment_ids(client, names):
        exp = client.get_experiment(exp_id)
        if exp.tags.get(f"mlflow.sharedViewState.{VIEW_KEY}") != view:
            client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", view)
        out[exp.name] = exp_id
    return out


def reconcile(client: MlflowClient, names: list[str] | None = None, stale_seconds: float = 90.0) -> list[str]:
    """Mark RUNNING runs whose last heartbeat (or start) is older than `stale_seconds` as KILLED.

    Their recorded compute stays: only the status changes (and the tag `reconciled` is set)."""
    now = time.time()
    killed = []
    for run in client.search_runs(experiment_ids(client, names), "attributes.status = 'RUNNING'"):
        last = run.data.metrics.get("heartbeat", run.info.start_time / 1000.0)
        if now - last > stale_seconds:
            client.set_tag(run.info.run_id, "reconciled", "heartbeat stopped")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED), end_time=int(last * 1000))
            killed.append(run.info.run_id)
    return killed


def list_runs(client: MlflowClient, names: list[str] | None = None) -> list[dict]:
    """One row per run: name, status, phase, recipe, compute, cost and score."""
    rows = []
    for run in client.search_runs(experiment_ids(client, names), order_by=["attributes.start_time DESC"]):
        m, t = run.data.metrics, run.data.tags
        rows.append({
            "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "phase": t.get("phase", ""), "recipe": t.get("recipe", ""), "flops": m.get("compute/flops"),
            "device_hours": m.get("compute/gpu_hours"),
            "cost_usd": m.get("cost/usd"), "accuracy": m.get("eval/accuracy"),
        })
    return rows


def sync(spool_dir: str | Path, uri: str | None = None) -> SyncResult:
    """Deliver what runs spooled while their store was down (`<tracking root>/spool/*.jsonl`: metrics, tags,
    small artifacts, final status) to `uri`, else to the current store (only the files written for it). A file is
    removed only once the store took all of it; one that fails stays for the next sync and is listed in `failed`. A
    run that `reconcile` marked KILLED meanwhile gets its real final status (and loses the `reconciled` tag)."""
    return sync_spool(spool_dir, uri)

